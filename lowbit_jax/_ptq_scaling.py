"""AWQ, SmoothQuant and the per-layer rotation on every front end, over exact folds.

``ptq_params(..., method="awq" | "awq_noclip" | "smoothquant")`` runs here.
The folds come from the model's jaxpr (``_fold.find_scaling_folds``: a norm
gain, or the previous linear layer through views, ``p @ v`` attention and
gated products); the statistics from the rules' calibrate-mode capture
(``_ptq.capture_hessians`` with ``max_samples``); the scales from the
algorithms' own functions (``algorithms.awq``: Lin et al. 2024, "AWQ:
Activation-aware Weight Quantization for On-Device LLM Compression and
Acceleration"; ``algorithms.smoothquant``: Xiao et al. 2023, "SmoothQuant:
Accurate and Efficient Post-Training Quantization for Large Language Models").

Every group of readers of one producer shares one scaling ``s`` over the
producer's features. A reader whose rows repeat a feature (a conv's window
taps, GQA's query heads sharing a value head) takes ``s`` of its feature on
each row; its per-feature activation magnitude is the mean (AWQ) or max
(SmoothQuant) over those rows. The readers' kernels become ``diag(s) W``, the
producer's parameters ``/ s``; the float model is checked unchanged on the
first calibration batch, then every weight site is rounded to nearest (after
AWQ's clip search for "awq") on its rule's grid, and the scales it was
rounded with are returned for real mode.

"rotation" folds a randomized Hadamard (``algorithms.random_hadamard``, as
``apply_ptq``'s per-layer rotation) into the folds where a rotation is exact
(``ScalingFold.rotation_why`` is None), rounds the rotated kernels to nearest
and reports their errors in the original domain.

MoE experts (``ragged_dot`` sites, weight ``[E, K, N]``): every expert reads
rows of one producer's output (a gather of the routed tokens), so a scaling
per expert has no exact fold into that producer; the exact fold is one scale
per input channel shared by all experts and the producer's other readers
(the router). AWQ and SmoothQuant use that: the experts join the producer's
group (``_fold`` follows the token gather into the grouped matmul), their
statistics are those of all routed tokens (SmoothQuant: the absmax over them,
and each input row's max over every expert's kernel; AWQ: mean |x| over
them, and the grid's error summed over the experts, each on the retained
rows routed to it), and every expert's rows take ``s``. Each expert is then
rounded to nearest on its own grid; for "awq" after AWQ's clip search run on
each expert with only the retained rows routed to it (``x / s``;
``_experts.clip_experts``, the same function ``apply_ptq`` uses), so its
clipped range is the scale real mode stores. An expert none of whose rows
was retained (one the router never picked) is rounded unclipped, listed in
its layer's ``"clip_rtn_fallback"`` and in ``report["skipped"]`` as
``"path[e]"``; ``awq_clip_skip`` applies to expert layers as to dense ones.
An expert layer without such a fold (the down experts, whose input is
produced per expert; the per-expert fold into the up experts' columns is
``apply_ptq``'s) is rounded to nearest unscaled (still clipped by "awq"),
with the reason (``EXPERT_REASON``) in its entry.

The rotation rotates experts where it folds exactly: when every expert reads
rows of a linear producer's output through the row gather (and the fold
analysis finds nothing else a rotation does not commute with), one ``R`` is
shared by all experts and the producer's other readers: the producer's
output features take ``R`` (``W R``, ``b R``) and every expert's ``[K, N]``
slice becomes ``R^T w_e``; each expert is rounded to nearest on its own grid
and its error is reported in the original domain (``R Q(R^T w_e)`` against
``w_e``, on its own Hessian). Elsewhere (a norm's gain producing the experts'
input, the down experts) the experts are rounded unrotated with the reason.
"""
from __future__ import annotations

import functools
import re
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import _experts
from lowbit_jax import _rules
from lowbit_jax._fold import apply_scaling, feature_index, find_scaling_folds, rotate_param
from lowbit_jax.algorithms.awq import awq_clip_search, awq_scales, awq_search
from lowbit_jax.algorithms.rtn import hessian_error, rtn_scales
from lowbit_jax.algorithms.rotation import random_hadamard
from lowbit_jax.algorithms.smoothquant import smoothquant_scales
from lowbit_jax.core import fake_quant, quantize

SCALING_METHODS = ("awq", "awq_noclip", "smoothquant", "rotation")
# The clip search leaves the query and key projections alone (their error
# passes through q.k and a softmax); apply_ptq's default too.
AWQ_CLIP_SKIP = r".*(q_proj|k_proj|query|key)"
EXPERT_REASON = (
    "MoE experts (ragged_dot) without an exact shared fold are rounded per expert, "
    "unscaled (AWQ: after its clip search on each expert's rows; a scaling per "
    "expert has no exact fold into a producer all experts read; apply_ptq folds "
    "per-expert scalings into producing experts on Linen models)")


def as_function(model, params, front: str):
  """``(fn, tree)``: the model as ``fn(tree, *args, **kwargs)`` of its parameter tree."""
  from lowbit_jax import _ptq
  if front == "function":
    return model, params
  if front == "linen":
    rest = ({k: v for k, v in params.items() if k != "params"}
            if _ptq._is_variables(params, front) else {})   # pylint: disable=protected-access
    tree = _ptq._param_tree(model, params, front)   # (unboxed)  pylint: disable=protected-access

    def fn(p, *args, **kwargs):
      return model.apply({**rest, "params": p}, *args, **kwargs)
    return fn, tree
  from flax import nnx
  graph, pstate, rest = nnx.split(model, nnx.Param, ...)

  def fn(p, *args, **kwargs):
    st = jax.tree.map(lambda x: x, pstate)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graph, st, rest)(*args, **kwargs)
  return fn, nnx.to_pure_dict(pstate)


def is_box(x) -> bool:
  """Whether ``x`` is a Flax metadata box (``nn.with_partitioning``'s)."""
  from flax.core import meta   # pylint: disable=g-import-not-at-top
  return isinstance(x, meta.AxisMetadata)


def _put(tree, new: dict):
  """``tree`` with the leaves at the paths of ``new`` (``_rules.path_str``)
  replaced; a leaf in a metadata box is replaced inside it (the box kept)."""
  if not new:
    return tree

  def put(kp, x):
    v = new.get(_rules.path_str(kp))
    if v is None:
      return x
    return x.replace_boxed(v) if is_box(x) else v
  return jax.tree_util.tree_map_with_path(
      put, tree, is_leaf=lambda x: _rules.is_qarray(x) or is_box(x))


def _row_features(st, layout, shape) -> np.ndarray:
  """The feature of each row of ``st.as_matrix(w)`` (a reader's input rows)."""
  idx = feature_index(shape, layout)
  if st.op == "ragged_dot":   # an expert stack [E, K, N]: every expert's rows
    return np.asarray(idx)[0, :, 0]
  return np.asarray(st.as_matrix(jnp.asarray(idx)))[:, 0]


def _per_feature(v, rows: np.ndarray, n: int, how: str) -> np.ndarray:
  """Per-row values reduced to features (max, or mean over a feature's rows)."""
  v = np.asarray(v, np.float32)
  if how == "max":
    out = np.full((n,), -np.inf, np.float32)
    np.maximum.at(out, rows, v)
    return out
  tot = np.zeros((n,), np.float32)
  np.add.at(tot, rows, v)
  return tot / np.bincount(rows, minlength=n).astype(np.float32)


def group_scales(method: str, mats: list, specs: list, inputs: list, counts: list,
                 rows: list, size: int, *, alpha: float, n_grid: int) -> tuple:
  """One group's scaling ``s[size]``: a pure function of (weights, statistics, spec).

  Args:
    method: "awq", "awq_noclip" or "smoothquant".
    mats: each reader's kernel as its ``[K_i, N_i]`` matrix (MoE experts: the
      ``[E, K, N]`` stack; its errors are summed over the experts, each on
      the retained rows routed to it, ``InputStats.sample_group``).
    specs: each reader's ``[K, N]`` weight spec (``_ptq._matrix_spec``).
    inputs: each reader's ``InputStats``.
    counts: each reader's row count.
    rows: each reader's ``[K_i]`` feature of every matrix row.
    size: the number of features.
    alpha: SmoothQuant's migration strength.
    n_grid: AWQ's grid size over its exponent.

  Returns:
    ``(s, alpha)``: float32 ``s[size]`` and the exponent used (AWQ: the
    searched one).
  """
  def row_max(m):   # max |w| of each input row (of every expert of a stack)
    m = np.abs(np.asarray(m, np.float32))
    return np.max(m, axis=(0, 2)) if m.ndim == 3 else np.max(m, axis=1)

  if method == "smoothquant":
    amax = _per_feature(inputs[0].abs_max, rows[0], size, "max")
    wmax = [_per_feature(row_max(m), r, size, "max")[:, None]
            for m, r in zip(mats, rows)]
    return smoothquant_scales(amax, wmax, alpha), float(alpha)
  act = _per_feature(np.asarray(inputs[0].abs_sum)
                     / max(float(np.sum(counts[0])), 1.0), rows[0], size, "mean")
  errors = jnp.zeros((n_grid,), jnp.float32)
  for m, sp, inp, r in zip(mats, specs, inputs, rows):
    if np.ndim(m) == 3:   # experts: each on the rows routed to it
      grp = np.asarray(inp.sample_group)
      for e in np.unique(grp):
        errors = errors + awq_search(inp.sample[grp == e], m[e], sp,
                                     act_scale=act[r], n_grid=n_grid).errors
      continue
    errors = errors + awq_search(inp.sample, m, sp, act_scale=act[r],
                                 n_grid=n_grid).errors
  best = float(np.linspace(0.0, 1.0, n_grid, dtype=np.float32)[int(jnp.argmin(errors))])
  return np.asarray(awq_scales(act, best)), best


def _close(ref, out, rtol: float) -> bool:
  ref = [np.asarray(a, np.float32) for a in jax.tree.leaves(ref)]
  out = [np.asarray(a, np.float32) for a in jax.tree.leaves(out)]
  return all(np.max(np.abs(a - b), initial=0.0) <= rtol * max(np.max(np.abs(a),
                                                                      initial=0.0), 1e-6)
             for a, b in zip(ref, out))


@functools.partial(jax.jit, static_argnames=("meta",))
def _from_matrix(m, *, meta):
  from lowbit_jax import _ptq
  return _ptq.SiteStats(None, None, *meta).from_matrix(m)


def _grid(w_in, spec):
  """``(scale, tensor scale)`` that ``w_in`` was rounded with, for real mode to
  store exactly those codes: an asymmetric spec's is the ``(scale, zero
  point)`` pair of ``w_in``'s own ranges (re-derived from the rounded kernel,
  whose blocks need not reach them, they would give other codes: AWQ's
  clipped kernels did)."""
  if spec.symmetric:
    return rtn_scales(w_in, spec)
  q = quantize(w_in, spec)
  return (q.scale.astype(jnp.float32), q.zero_point), None


@functools.partial(jax.jit, static_argnames=("meta", "spec"))
def _round(w_in, w, sr, hessian, count, *, meta, spec):
  """RTN of one (scaled, clipped) kernel ``w_in``: ``(w_q, scale, tensor scale,
  codes reproduced, error, RTN's error)`` (the tensor scale: two-level specs).
  The errors are those of ``w_q / s`` and of plain RTN against the float
  kernel on unscaled inputs (``w / s``, ``w`` unclipped), ``tr(dW^T H dW) /
  rows`` (jitted per site kind)."""
  from lowbit_jax import _ptq
  st = _ptq.SiteStats(hessian, count, *meta)
  plan = _ptq._plan(st, spec)   # pylint: disable=protected-access
  wq = fake_quant(w_in, plan.spec)
  scale, tscale = _grid(w_in, plan.spec)
  exact = _ptq._scales_exact(wq, plan.spec, scale, tscale)   # pylint: disable=protected-access
  ref = st.as_matrix(w).astype(jnp.float32) / sr[:, None]
  qm = st.as_matrix(wq).astype(jnp.float32) / sr[:, None]
  rtn_m = st.as_matrix(fake_quant(st.from_matrix(ref), plan.spec))
  rows = jnp.maximum(count, 1.0)
  return (wq, scale, tscale, exact, hessian_error(hessian, ref, qm) / rows,
          hessian_error(hessian, ref, rtn_m) / rows)


@functools.partial(jax.jit, static_argnames=("meta", "spec"))
def _round_experts(w_in, w, sr, hessian, count, *, meta, spec):
  """``_round`` of an expert stack ``[E, K, N]`` whose rows were scaled by ``sr``
  (``w_in``: ``w`` after any clip search): per-expert errors against the
  unscaled float experts."""
  from lowbit_jax import _ptq
  plan = _ptq._plan(_ptq.SiteStats(hessian, count, *meta), spec)   # pylint: disable=protected-access
  wq = fake_quant(w_in, plan.spec)
  scale, tscale = _grid(w_in, plan.spec)
  exact = _ptq._scales_exact(wq, plan.spec, scale, tscale)   # pylint: disable=protected-access
  inv = 1.0 / sr[None, :, None]
  ref = w.astype(jnp.float32) * inv
  rtn_w = fake_quant(ref, plan.spec)
  rows = jnp.maximum(count, 1.0)
  err = jax.vmap(hessian_error)(hessian, ref, wq.astype(jnp.float32) * inv) / rows
  return (wq, scale, tscale, exact, err,
          jax.vmap(hessian_error)(hessian, ref, rtn_w) / rows)


@functools.partial(jax.jit, static_argnames=("meta", "spec"))
def _rot_errors(w, back, hessian, count, *, meta, spec):
  """Errors of a rotated site in the original domain: ``R Q(R^T W)`` and RTN of
  ``W`` (an expert stack: per expert, each on its own Hessian)."""
  from lowbit_jax import _ptq
  st = _ptq.SiteStats(hessian, count, *meta)
  plan = _ptq._plan(st, spec)   # pylint: disable=protected-access
  err = jax.vmap(hessian_error) if st.op == "ragged_dot" else hessian_error
  ref = st.as_matrix(w).astype(jnp.float32)
  rows = jnp.maximum(count, 1.0)
  rtn_m = st.as_matrix(fake_quant(w, plan.spec)).astype(jnp.float32)
  return (err(hessian, ref, st.as_matrix(back).astype(jnp.float32)) / rows,
          err(hessian, ref, rtn_m) / rows)


def _expert_layer(p: str, st, spec, w, sr, *, sample, rot) -> tuple:
  """One expert stack's rounding: ``(w_q, scale, tensor scale, report entry,
  skipped)``.

  ``w`` is the stack as folded: rows scaled by ``sr``, or rotated (``rot`` =
  ``(layout, R, the float stack before R)``; errors in the original domain).
  With a ``sample`` (AWQ's clip search), each expert is clipped on the
  retained rows routed to it (``x / sr``, ``_experts.clip_experts``); an
  expert none of whose rows was retained is rounded to nearest, listed in
  ``"clip_rtn_fallback"`` and in ``skipped`` as ``"path[e]"``.

  Raises:
    ValueError: the scales do not reproduce the codes.
  """
  from lowbit_jax import _ptq
  w_in, entry, skipped = w, {}, {}
  if sample is not None:
    x = np.asarray(sample.sample, np.float32) / sr
    w_in, ratios, empty = _experts.clip_experts(
        w, x, sample.sample_group, _ptq._matrix_spec(spec, p))  # pylint: disable=protected-access
    entry["clip_rtn_fallback"] = empty
    if ratios:
      entry["clip_mean_ratio"] = float(np.mean(list(ratios.values())))
    for name, e in zip(_experts.expert_names(p, empty), empty):
      skipped[name] = (f"no calibration row routed to expert {e} was retained: AWQ's "
                       "clip search did not run on it; rounded to nearest (RTN)")
  meta = tuple(st[2:])
  wq, scale, tscale, exact, err, rerr = _round_experts(
      w_in, w, sr, st.hessian, st.count, meta=meta, spec=spec)
  if not bool(exact):
    raise ValueError(f"{p}: rounding with its own scales does not reproduce the "
                     f"codes (spec {spec})")
  if rot is not None:
    lay, r, pre = rot
    err, rerr = _rot_errors(pre, rotate_param(wq, lay, r.T), st.hessian, st.count,
                            meta=meta, spec=spec)
  err, rerr, extra = _ptq._expert_entry(p, st, err, rerr, "rtn", {})  # pylint: disable=protected-access
  entry.update({"spec": str(spec), "error": err, "rtn_error": rerr,
                "error_vs_rtn": err / rerr if rerr > 0 else 1.0,
                "rows": float(jnp.sum(st.count)), **extra})
  return wq, scale, tscale, entry, skipped


def check_folds(fn, args, kwargs, tree0, tree, applied: list, folds_report: list, *,
                fold_rtol: float, method: str) -> None:
  """Raises unless the folded ``tree`` gives ``tree0``'s float output on one batch.

  Args:
    fn, args, kwargs: the model as a function of its parameter tree, and the
      batch it is checked on.
    tree0, tree: the parameters before and after the folds.
    applied: the ``ScalingFold`` s folded, in order.
    folds_report: report entries; those with ``status == "folded"`` match
      ``applied`` in order and hold their ``"scales"`` or ``"rotation"``.
    fold_rtol: the largest relative change of any output (float rounding).
    method: the method's name (for the error).

  Raises:
    ValueError: naming the first fold that changes the output on its own, or
      saying that the folds do together.
  """
  from lowbit_jax import _ptq
  from lowbit_jax import _ptq_rotation  # pylint: disable=g-import-not-at-top
  get = _ptq._get_path   # pylint: disable=protected-access
  fwd = jax.jit(lambda p: fn(p, *args, **kwargs))
  # A bf16 model's output moves by its own rounding when a fold rescales its
  # weights: the rotation check's tolerance.
  fold_rtol, widened = _ptq_rotation.float_check_rtol(
      lambda p, *a: fn(p, *a, **kwargs), tree0, args, fold_rtol)
  with jax.default_matmul_precision("float32"):
    ref = fwd(tree0)
    if _close(ref, fwd(tree), fold_rtol):
      return
    for fold, fr in zip(applied, [f for f in folds_report if f["status"] == "folded"]):
      alone = (apply_scaling(tree0, fold, fr["scales"], get, _put)
               if "scales" in fr else _put(tree0, {
                   p: rotate_param(get(tree0, p), lay, fr["rotation"])
                   for p, lay in fold.divide + fold.readers}))
      if not _close(ref, fwd(alone), fold_rtol):
        raise ValueError(
            f"folding the {method} scaling of {list(fr['readers'])} into "
            f"{fold.producer!r} changes the float model's output beyond "
            f"rtol={fold_rtol}{widened}; the fold analysis missed a use of it: "
            "exclude these layers from the rules or report the model")
    raise ValueError(f"the {method} folds together change the float model's "
                     f"output beyond rtol={fold_rtol}{widened}")


def capture_with_folds(model, params, batches: list, rules, *, who: str, front: str,
                       token_mask, max_samples: int, seed: int) -> tuple:
  """What the fold-based methods start from: ``(capture, fn, tree, args,
  kwargs, plan)``, the rules' capture with ``max_samples`` retained input rows
  per site, the model as a function of its parameter tree, the first batch
  and the exact folds ``find_scaling_folds`` finds on it.

  Raises:
    ValueError: ``max_samples`` is not an int >= 1 (``who`` names the method).
  """
  from lowbit_jax import _ptq
  if not isinstance(max_samples, int) or max_samples < 1:
    raise ValueError(f"{who} needs calibration rows: max_samples must be an int "
                     f">= 1, got {max_samples!r}; raise max_samples")
  cap = _ptq.capture_hessians(model, params, batches, rules, token_mask=token_mask,
                              max_samples=max_samples, seed=seed)
  fn, tree0 = as_function(model, params, front)
  args, kwargs = _ptq._split_batch(batches[0])   # pylint: disable=protected-access
  plan = find_scaling_folds(fn, tree0, *args, **kwargs)
  return cap, fn, tree0, args, kwargs, plan


def quantized_folds(plan, cap, folds_report: list):
  """The plan's folds with a reader the rules quantize: ``(index, producer,
  fold, quantized readers, report entry)``; the others go into
  ``folds_report`` as skipped."""
  for gi, (producer, fold) in enumerate(plan.folds.items()):
    members = [p for p, _ in fold.readers if p in cap.stats]
    entry = {"producer": producer, "kind": fold.kind,
             "readers": [p for p, _ in fold.readers]}
    if not members:
      folds_report.append({**entry, "status": "skipped",
                           "reason": "no reader is quantized by the rules"})
      continue
    yield gi, producer, fold, members, entry


def scaling_ptq(model, params, batches: list, rules, *, method: str, front: str,
                token_mask, alpha: float, n_grid: int, max_samples: int, seed: int,
                fold_rtol: float, awq_clip_skip: Optional[str],
                rotation_block_size: Optional[int] = None):
  """``ptq_params``'s AWQ/SmoothQuant path (see the module docstring).

  Returns:
    ``(changed, weight_scales, weight_tensor_scales, report)``: parameter
    path -> new value of every folded or quantized parameter, the scales, the
    tensor scales of two-level specs, and the report.

  Raises:
    ValueError: no rows retained, a spec the matrix search cannot take, or a
      fold that changes the float model on the first batch (naming it).
  """
  from lowbit_jax import _ptq
  t0 = time.perf_counter()
  cap, fn, tree0, args, kwargs, plan = capture_with_folds(
      model, params, batches, rules, who=method, front=front, token_mask=token_mask,
      max_samples=max_samples, seed=seed)
  get = _ptq._get_path   # pylint: disable=protected-access
  tree = tree0
  row_s: dict = {}     # reader path -> s per matrix row
  rot: dict = {}       # reader path -> (layout, R, its float kernel before R)
  rot_skipped: dict = {}
  folds_report, applied = [], []
  for gi, producer, fold, members, entry in quantized_folds(plan, cap, folds_report):
    if method == "rotation":
      if fold.rotation_why is not None:
        folds_report.append({**entry, "status": "skipped",
                             "reason": fold.rotation_why})
        for p in members:
          rot_skipped[p] = f"its input's producer {producer!r}: {fold.rotation_why}"
        continue
      r = np.asarray(random_hadamard(jax.random.fold_in(jax.random.key(seed), gi),
                                     fold.size, block_size=rotation_block_size))
      for p, lay in fold.readers:
        if p in cap.stats:
          rot[p] = (lay, r, get(tree, p))
      tree = _put(tree, {p: rotate_param(get(tree, p), lay, r)
                         for p, lay in fold.divide + fold.readers})
      applied.append(fold)
      folds_report.append({**entry, "status": "folded", "rotation": r})
      continue
    lays = dict(fold.readers)
    mats, specs, inputs, counts, rows = [], [], [], [], []
    for p in members:
      st = cap.stats[p]
      w = _rules.logical_value(get(tree, p))
      mats.append(_ptq._as_matrix(w, meta=tuple(st[2:])))  # pylint: disable=protected-access
      specs.append(_ptq._matrix_spec(cap.sites[p].weight, p))  # pylint: disable=protected-access
      if method != "smoothquant" and cap.inputs[p].sample.shape[0] == 0:
        what = ("routed to its experts" if st.op == "ragged_dot" else "retained")
        raise ValueError(f"{p}: no calibration rows were {what} for AWQ's search; "
                         "raise max_samples")
      inputs.append(cap.inputs[p])
      counts.append(st.count)
      rows.append(_row_features(st, lays[p], st.shape))
    s, a = group_scales(method, mats, specs, inputs, counts, rows, fold.size,
                        alpha=alpha, n_grid=n_grid)
    tree = apply_scaling(tree, fold, s, get, _put)
    applied.append(fold)
    for p, r in zip(members, rows):
      row_s[p] = np.asarray(s, np.float32)[r]
    folds_report.append({**entry, "status": "folded", "alpha": a, "scales": s})

  # The float model must be unchanged by the folds (before any rounding).
  check_folds(fn, args, kwargs, tree0, tree, applied, folds_report,
              fold_rtol=fold_rtol, method=method)

  new, scales, tscales, layers, skipped = {}, {}, {}, {}, dict(cap.skipped)
  clip_skip = re.compile(awq_clip_skip) if awq_clip_skip else None
  for p, st in cap.stats.items():
    spec = cap.sites[p].weight
    w = _rules.logical_value(get(tree, p))
    layer = p.rsplit("/", 1)[0]
    clip = method == "awq" and not (clip_skip and clip_skip.fullmatch(layer))
    if st.op == "ragged_dot":   # experts: per expert (clip search on its own rows)
      sr = row_s.get(p, np.ones((st.shape[1],), np.float32))
      new[p], scale, tscale, layers[p], why = _expert_layer(
          p, st, spec, w, sr, sample=cap.inputs[p] if clip else None, rot=rot.get(p))
      skipped.update(why)
      if scale is not None:
        scales[p] = scale
      if tscale is not None:
        tscales[p] = tscale
      if p in row_s or p in rot:
        layers[p]["fold"] = plan.reader_of.get(p)
      else:
        layers[p]["fold"] = None
        layers[p]["reason"] = rot_skipped.get(p) or (
            f"{EXPERT_REASON}: {plan.skipped[p]}" if p in plan.skipped else EXPERT_REASON)
      continue
    sr = row_s.get(p)
    mat = _ptq._as_matrix(w, meta=tuple(st[2:]))   # pylint: disable=protected-access
    w_in, entry = w, {}
    if clip:
      x = cap.inputs[p].sample
      if x.shape[0] == 0:
        raise ValueError(f"{p}: no calibration rows were retained for AWQ's clip "
                         "search; raise max_samples or use method='awq_noclip'")
      x = x if sr is None else jnp.asarray(np.asarray(x, np.float32) / sr)
      res = awq_clip_search(x, mat, _ptq._matrix_spec(spec, p))  # pylint: disable=protected-access
      w_in = _from_matrix(res.clipped, meta=tuple(st[2:])).astype(w.dtype)
      entry["clip_mean_ratio"] = float(jnp.mean(res.ratios))
    ones = np.ones((mat.shape[0],), np.float32)
    wq, scale, tscale, exact, err, rerr = _round(
        w_in, w, ones if sr is None else sr, st.hessian, st.count, meta=tuple(st[2:]),
        spec=spec)
    if not bool(exact):
      raise ValueError(f"{p}: rounding with its own scales does not reproduce the "
                       f"codes (spec {spec})")
    new[p] = wq
    if scale is not None:
      scales[p] = scale
    if tscale is not None:
      tscales[p] = tscale
    if p in rot:   # errors in the original domain: R Q(R^T W) against W
      lay, r, pre = rot[p]
      err, rerr = _rot_errors(pre, rotate_param(wq, lay, r.T), st.hessian, st.count,
                              meta=tuple(st[2:]), spec=spec)
    err, rerr = float(err), float(rerr)
    entry.update({"spec": str(spec), "error": err, "rtn_error": rerr,
                  "error_vs_rtn": err / rerr if rerr > 0 else 1.0,
                  "rows": float(st.count), "fold": plan.reader_of.get(p)})
    if p in rot_skipped:
      entry["fold"] = None
      entry["reason"] = rot_skipped[p]
    elif p not in row_s and p not in rot:
      entry["fold"] = None
      entry["reason"] = plan.skipped.get(
          p, "not read as the kernel of a matmul or conv in the model's jaxpr")
    layers[p] = entry
  changed = {p: get(tree, p) for f in applied for p, _ in f.divide + f.readers}
  changed.update(new)
  report = {"method": method, "layers": layers, "folds": folds_report,
            "skipped": skipped, "unused_rules": [r.path for r in cap.unused_rules],
            "seconds": time.perf_counter() - t0}
  return changed, scales, tscales, report
