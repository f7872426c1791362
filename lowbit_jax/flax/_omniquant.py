"""OmniQuant on a Linen model's blocks, in sequence: ``apply_ptq(..., "omniquant")``.

Shao et al. 2024, "OmniQuant" (ICLR 2024); the algorithm on one block is
``lowbit_jax.algorithms.omniquant_block``. This driver

1. captures every Dense layer's input statistics and the model's structure
   (``capture_dense_stats``: which layers read one activation, and which norm
   or Dense produced it), and checks each LET group's fold numerically on the
   whole float model, as the other transformations do (``extra_folds``
   declares links the capture cannot see, e.g. ``{".../down_proj":
   ".../up_proj"}``);
2. records the modules whose path matches ``OmniQuantOptions.blocks`` and
   their inputs on the calibration batches (their first argument, and any
   array argument with one row per example, e.g. a mask, as the first block
   received it; the other arguments, e.g. rotary positions, as each block
   received them on the first batch; they must agree across batches), and
   checks that each block reads the previous block's output;
3. trains the blocks in order, each on the quantized model's inputs to it
   (the outputs of the blocks already quantized, activation quantization
   included) against the float block's outputs on the float model's inputs,
   as the paper does;
4. rounds every other selected Dense layer (outside the blocks, e.g. the
   output head) with RTN.

Activation quantization (``act_spec``) applies, while training, to the
inputs of every Dense layer of a block, as the sweep's rule ``".*"`` does at
inference. The block loss counts every position (``token_mask`` weights only
the captured statistics).
"""
from __future__ import annotations

import re
import time
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax._rules import QuantRule
from lowbit_jax.algorithms.omniquant import LETGroup, OmniQuantOptions, omniquant_block
from lowbit_jax.algorithms.rtn import rtn, rtn_scales, sqnr_db
from lowbit_jax.flax._capture import capture_dense_stats, layer_path, split_batch
from lowbit_jax.algorithms._tree import with_leaves


def _record_blocks(model, params, batch, regex: str, apply_kwargs, other_variables):
  """``[(path, unbound module, args, kwargs, output)]`` of the blocks, in call order."""
  rec = []

  def icpt(f, args, kwargs, ctx):
    out = f(*args, **kwargs)
    if ctx.method_name == "__call__" and re.fullmatch(regex, layer_path(ctx.module)):
      rec.append((layer_path(ctx.module), ctx.module.clone(parent=None, name=None),
                  args, kwargs, out))
    return out

  a, kw = split_batch(batch)
  with jax.default_matmul_precision("float32"), nn.intercept_methods(icpt):
    model.apply({"params": params, **dict(other_variables or {})}, *a, **kw,
                **dict(apply_kwargs or {}))
  return rec


def _rounded(tree, path: str, spec, transform: str, **extra) -> tuple:
  """``(tree with path's kernel rounded to nearest, its scale grid, its report
  entry)``."""
  from lowbit_jax.flax import ptq as ptq_lib   # (it imports this module)
  w = ptq_lib._node(tree, path)["kernel"]   # pylint: disable=protected-access
  wq = rtn(w, spec)
  entry = {"spec": ptq_lib._spec_name(spec), "transform": transform,  # pylint: disable=protected-access
           "fold": "none", "weight_sqnr_db": sqnr_db(w, wq), **extra}
  return with_leaves(tree, path, kernel=wq.astype(w.dtype)), rtn_scales(w, spec), entry


def run(model, cur, calib_batches, weight_spec, aspec, *, layers: str,
        extra_folds: Mapping[str, str], token_mask, max_samples: int, fold_rtol: float,
        apply_kwargs, other_variables, options: Optional[OmniQuantOptions]):
  """OmniQuant over a Linen model; returns ``(new params, report)`` (see apply_ptq)."""
  # pylint: disable=g-import-not-at-top
  from lowbit_jax._ptq_scaling import _close
  from lowbit_jax.flax import _ptq_linen
  from lowbit_jax.flax import ptq as ptq_lib
  node_at = ptq_lib._node  # pylint: disable=protected-access
  from lowbit_jax.flax._linen import quantize_linen
  t_start = time.perf_counter()
  opts = options if options is not None else OmniQuantOptions()
  if not isinstance(opts, OmniQuantOptions):
    raise TypeError(f"omniquant= takes an OmniQuantOptions, got {type(opts).__name__}")
  if weight_spec is None:
    raise ValueError("omniquant learns clipping against a weight format: give "
                     "weight_spec")
  use_let = opts.uses_let(aspec is not None)
  other = dict(other_variables or {})

  t0 = time.perf_counter()
  cap = capture_dense_stats(model, cur, calib_batches, layers=layers,
                            token_mask=token_mask, max_samples=max_samples,
                            apply_kwargs=apply_kwargs, other_variables=other_variables)
  capture_seconds = time.perf_counter() - t0
  selected = [p for p in cap.order
              if node_at(cur, p) is not None and "kernel" in node_at(cur, p)
              and node_at(cur, p)["kernel"].ndim == 2]
  # Expert stacks ([E, K, N] kernels of RaggedDense) are not trained here:
  # named in the report as left float, never silently.
  experts = [p for p in cap.order
             if node_at(cur, p) is not None and "kernel" in node_at(cur, p)
             and node_at(cur, p)["kernel"].ndim == 3
             and ptq_lib._resolve_spec(weight_spec, p) is not None]  # pylint: disable=protected-access
  specs = {p: ptq_lib._resolve_spec(weight_spec, p) for p in selected}  # pylint: disable=protected-access

  # Blocks and their inputs.
  recs = [_record_blocks(model, cur, b, opts.blocks, apply_kwargs, other_variables)
          for b in calib_batches]
  if not recs[0]:
    raise ValueError(f"no module path matched OmniQuantOptions.blocks="
                     f"{opts.blocks!r}; give the regex of the model's blocks (e.g. "
                     "r'layers_\\d+' for the Llama decoder)")
  paths = [r[0] for r in recs[0]]
  if len(set(paths)) != len(paths):
    raise ValueError(f"blocks {paths} are called more than once per forward pass; "
                     "OmniQuant trains each block once, in sequence")
  for i in range(1, len(paths)):
    prev_out, x_in = recs[0][i - 1][4], recs[0][i][2][0] if recs[0][i][2] else None
    if (x_in is None or not isinstance(prev_out, jax.Array)
        or prev_out.shape != x_in.shape
        or not np.allclose(np.asarray(prev_out), np.asarray(x_in), rtol=1e-5,
                           atol=1e-6)):
      raise ValueError(f"block {paths[i]!r} does not read block {paths[i - 1]!r}'s "
                       "output as its first argument; OmniQuant trains blocks that "
                       "feed each other in sequence (choose OmniQuantOptions.blocks "
                       "accordingly)")
  in_block = {}
  for p in selected:
    for b in paths:
      if p.startswith(b + "/"):
        in_block[p] = b

  # Block inputs over all batches: the first argument, plus any other array
  # argument with one row per example (e.g. a mask); the rest must agree.
  def batch_inputs(j):
    recs_j = recs[j]
    if [r[0] for r in recs_j] != paths:
      raise ValueError("the calibration batches call different blocks")
    _, _, args, kwargs, _ = recs_j[0]
    return args, kwargs

  args0, _ = batch_inputs(0)
  if not args0 or not isinstance(args0[0], jax.Array) or not args0[0].ndim:
    raise ValueError(f"block {paths[0]!r} takes no array as its first argument; "
                     "OmniQuant trains blocks called as block(x, ...)")
  n0 = args0[0].shape[0]
  batched = [isinstance(a, jax.Array) and a.ndim > 0 and a.shape[0] == n0
             for a in args0]
  xs = []
  for j in range(len(calib_batches)):
    args, _ = batch_inputs(j)
    for i, a in enumerate(args[1:], 1):
      if batched[i]:
        continue
      if not (np.shape(a) == np.shape(args0[i]) and np.array_equal(np.asarray(a),
                                                                   np.asarray(args0[i]))):
        raise ValueError(f"argument {i} of block {paths[0]!r} differs between "
                         "calibration batches (e.g. another sequence length); give "
                         "OmniQuant batches of one shape")
    xs.append(tuple(a for a, bt in zip(args, batched) if bt))
  x_fp = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *xs)
  x_q = x_fp

  # Foldable LET groups, checked on the whole float model.
  ref_args, ref_kwargs = split_batch(calib_batches[0])
  akw = dict(apply_kwargs or {})

  @jax.jit
  def forward_(p):
    return model.apply({"params": p, **other}, *ref_args, **ref_kwargs, **akw)

  def forward(p):
    with jax.default_matmul_precision("float32"):
      return forward_(p)

  folds = [{"layers": [p], "producer": None, "status": "skipped",
            "reason": "nn.Conv: omniquant does not treat convs; the kernel stays float"}
           for p in cap.convs]
  folds += [{"layers": [p], "producer": None, "status": "skipped",
             "reason": f"nn.Conv not quantized by apply_ptq: {why}"}
            for p, why in sorted((cap.skipped or {}).items())]
  let_groups = {b: [] for b in paths}
  if use_let:
    ref_out = forward(cur)
    fold_rtol, _ = _ptq_linen.fold_tolerance(model, cur, other, ref_args, ref_kwargs,
                                             akw, fold_rtol)
    probe_key = jax.random.key(opts.seed + 1)
    for gi, (members, producer) in enumerate(_ptq_linen._groups_with_extra(  # pylint: disable=protected-access
        cap, extra_folds)):
      members = [m for m in members if m in specs]
      if not members or all(specs[m] is None for m in members):
        continue
      blk = in_block.get(members[0])
      entry = {"layers": members, "producer": None if producer is None else producer[1]}
      k = node_at(cur, members[0])["kernel"].shape[0]
      why = None
      if blk is None or any(in_block.get(m) != blk for m in members):
        why = "the layers are not all inside one block"
      elif producer is None:
        why = "no norm or Dense produces this input directly"
      elif not producer[1].startswith(blk + "/"):
        why = f"the producer {producer[1]!r} is outside block {blk!r}"
      else:
        why = _ptq_linen._foldable_kind(cur, producer[0], producer[1], k, True)  # pylint: disable=protected-access
      if why is None:
        test = _ptq_linen._probe_transform(jax.random.fold_in(probe_key, gi), k, True,  # pylint: disable=protected-access
                                        None)
        trial = test.fold_into(cur, *producer)
        for m in members:
          trial = with_leaves(trial, m, kernel=test.weight(node_at(trial, m)["kernel"]))
        if not _close(ref_out, forward(trial), fold_rtol):
          why = (f"folding into {producer[1]!r} changes the model output beyond "
                 f"fold_rtol={fold_rtol:.3g} (its output is used elsewhere too, e.g. "
                 "by a residual connection; or a low-precision model's rounding "
                 "exceeds the tolerance: raise fold_rtol)")
      if why is not None:
        folds.append({**entry, "status": "skipped", "reason": why})
        continue
      st = cap.stats[members[0]]
      prod_node = node_at(cur, producer[1])
      shift = None
      if "bias" in prod_node and all("bias" in node_at(cur, m) for m in members) \
          and st.sample.shape[0]:
        shift = 0.5 * (jnp.max(st.sample, axis=0) + jnp.min(st.sample, axis=0))
      cut = len(blk) + 1
      let_groups[blk].append(LETGroup((producer[0], producer[1][cut:]),
                                      tuple(m[cut:] for m in members), st.absmax,
                                      shift))
      folds.append({**entry, "status": "learned", "shift": shift is not None})

  act_q = (quantize_linen([QuantRule(".*", activation=aspec)], mode="fake")
           if aspec is not None else None)
  report_layers, weight_scales, blocks_report = {}, {}, {}
  chunk = max(1, min(opts.batch_size, x_fp[0].shape[0]))
  fns = {}   # blocks of one structure share their functions (and compilations)

  def block_fns(module, args, kwargs, other_b):
    key = (module, tuple(id(a) for a, bt in zip(args, batched) if not bt),
           tuple((k, id(v)) for k, v in sorted(kwargs.items())),
           tuple((c, id(v)) for c, v in sorted(other_b.items())))
    if key not in fns:
      def block_fn(p, inp):
        it = iter(inp)
        full = [next(it) if bt else a for a, bt in zip(args, batched)]
        return module.apply({"params": p, **other_b}, *full, **kwargs)
      q_fn = block_fn if act_q is None else act_q(block_fn)
      fns[key] = (block_fn, q_fn, jax.jit(block_fn), jax.jit(q_fn))
    return fns[key]

  def run_chunks(f, p, inp):
    n = inp[0].shape[0]
    return jnp.concatenate([f(p, jax.tree.map(lambda a, i=i: a[i:i + chunk], inp))
                            for i in range(0, n, chunk)], axis=0)

  for bi, b in enumerate(paths):
    t1 = time.perf_counter()
    module, args, kwargs = recs[0][bi][1], recs[0][bi][2], recs[0][bi][3]
    other_b = {c: node_at(v, b) for c, v in other.items() if node_at(v, b) is not None}
    block_fn, q_fn, block_jit, q_jit = block_fns(module, args, kwargs, other_b)
    del block_fn
    bparams = node_at(cur, b)

    y_fp = run_chunks(block_jit, bparams, x_fp)
    cut = len(b) + 1
    bspecs = {p[cut:]: specs[p] for p in selected
              if in_block.get(p) == b and specs[p] is not None}
    if not bspecs:
      x_fp = (y_fp,) + tuple(x_fp[1:])
      x_q = (run_chunks(q_jit, bparams, x_q),) + tuple(x_q[1:])
      continue
    res = omniquant_block(q_fn, bparams, x_q, y_fp, bspecs, groups=let_groups[b],
                          options=opts, with_activations=aspec is not None)
    # A block that ends above RTN's loss (training from LET's start can) is
    # rounded to nearest instead: never worse than RTN without saying so.
    fallback = not res.loss <= res.loss_rtn
    new_b = bparams
    for rel, spec in bspecs.items():
      full = f"{b}/{rel}"
      if fallback:
        new_b, weight_scales[full], report_layers[full] = _rounded(
            new_b, rel, spec, "rtn_fallback",
            reason=f"the block's OmniQuant loss {res.loss:.4g} ended above "
                   f"RTN's {res.loss_rtn:.4g}: rounded to nearest")
        continue
      # Learned scales: the tensor scale of a two-level spec is rebuilt from
      # them as the learning defined it (quantize(..., scale=) alone).
      weight_scales[full] = (res.scales[rel], None)
      wf = node_at(res.folded, rel)["kernel"]
      report_layers[full] = {
          "spec": ptq_lib._spec_name(spec), "transform": "omniquant",  # pylint: disable=protected-access
          "fold": "let" if any(rel in g.consumers for g in let_groups[b]) else "none",
          "lwc_mean_clip": res.clip[rel],
          "weight_sqnr_db": sqnr_db(wf, node_at(res.params, rel)["kernel"])}
    if not fallback:
      new_b = res.params
    else:   # the block's learned LET folds were discarded with it
      for f in folds:
        if f.get("status") == "learned" and str(f.get("producer", "")).startswith(
            f"{b}/"):
          f["status"] = "discarded"
          f["reason"] = "the block ended above RTN's loss and was rounded to nearest"
    cur = _replace(cur, b, new_b)
    x_q = (run_chunks(q_jit, new_b, x_q),) + tuple(x_q[1:])
    x_fp = (y_fp,) + tuple(x_fp[1:])
    blocks_report[b] = {"loss_rtn": res.loss_rtn, "loss_init": res.loss_init,
                        "loss": res.loss, "steps": int(res.losses.shape[0]),
                        "let_groups": len(let_groups[b]) if use_let else 0,
                        "rtn_fallback": fallback,
                        "seconds": time.perf_counter() - t1}

  # Selected layers outside every block: RTN.
  for p in selected:
    spec = specs[p]
    if p in in_block or spec is None:
      if spec is None:
        report_layers[p] = {"spec": None, "transform": "none", "fold": "none"}
      continue
    cur, weight_scales[p], report_layers[p] = _rounded(cur, p, spec, "none")
  skipped = {}
  for p in experts:
    why = ("an expert stack: apply_ptq's OmniQuant trains dense kernels only, so "
           "it stays float; quantize experts with ptq_params(..., "
           "method='omniquant') (per-expert RTN) or another method")
    report_layers[p] = {"spec": None, "transform": "none", "fold": "none",
                        "reason": why}
    skipped[p] = why
  report = {"method": "omniquant", "quantizer": "omniquant", "layers": report_layers,
            "skipped": skipped,
            "folds": folds, "blocks": blocks_report, "capture_seconds": capture_seconds,
            "omniquant": {"lwc": opts.lwc, "let": use_let, "steps": opts.steps},
            "total_seconds": time.perf_counter() - t_start,
            "quant_scales": _ptq_linen._nest(  # pylint: disable=protected-access
                _ptq_linen._scale_entries(weight_scales))}  # pylint: disable=protected-access
  return cur, report


def _replace(tree: dict, path: str, value) -> dict:
  """A copy of ``tree`` with the node at ``path`` replaced by ``value``."""
  parent, _, name = path.rpartition("/")
  return with_leaves(tree, parent, **{name: value})
