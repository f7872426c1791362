"""OmniQuant on every front end: ``ptq_params(..., method="omniquant")``.

Shao et al. 2024, "OmniQuant: Omnidirectionally Calibrated Quantization for
Large Language Models" (ICLR 2024), with a **layer-wise** objective: a model
given as a jaxpr has no blocks (``apply_ptq``'s Linen driver trains
transformer blocks, ``algorithms.omniquant_block``), so every weight site is
trained against its own output on the captured calibration inputs,
``mean_rows ||X W - Q_a(X') Q(W'; clip)||^2``.

* **LWC** on every site the rules quantize: per block of the weight's scale
  grid (an output channel, or a group along the contraction) the clipping
  strengths ``sigmoid(gamma)`` (and ``sigmoid(beta)`` for asymmetric specs)
  of ``algorithms.omniquant``'s ``lwc_init`` / ``lwc_quant`` / ``lwc_step``
  (the same functions the block-wise driver uses), started at logit
  ``OmniQuantOptions.lwc_init`` (4: strength 0.98, as the paper's code), on
  the site's ``[K, N]`` matrix; straight-through rounding, the LSQ gradient
  into the step.
* **LET** where the model's jaxpr shows an exact fold
  (``_fold.find_scaling_folds``, as AWQ uses them in ``_ptq_scaling``): one
  per-feature scale ``s`` per producer, shared by its readers (``x / s``
  folded into the producer, ``diag(s) W`` into the readers), learned jointly
  with the readers' LWC logits on the sum of their layer-wise errors, with
  each reader's activation spec applied to its scaled input ``X / s`` (on the
  ``[rows, K]`` input matrix, the spec's unset axis filled as the ops fill
  it: exact for a matmul's dynamic ranges; for a conv's patches or static
  ranges a dynamic per-row stand-in). ``s`` starts from SmoothQuant's
  ``max|x|^a / max|w|^(1-a)`` (``let_alpha``), as the Linen driver's. The
  folds carry a scaling only, so LET learns no shift here (the shift would
  add ``delta @ W`` to each reader's bias, which the fold analysis does not
  track). Sites without an exact fold get LWC alone, with the reason in the
  report. With ``let=None`` LET runs where a reader quantizes activations
  (the paper's recipe: LWC alone for weight-only).

The folds are learned in the plan's order, each on the kernels the previous
ones left; a reader whose kernel a later fold changes again (it is also a
producer: its output columns are divided) has its LWC trained again on the
final kernel, from its learned logits. The float model is checked unchanged
by the folds on the first batch (``fold_rtol``), then each kernel is
fake-quantized with its learned step, which is returned as its scale grid so
real mode stores exactly these codes. Each training keeps its iterate with
the lowest objective (the start included); where none beats round to nearest
(no LET, no clipping) on the objective, the group is not folded (its readers
get LWC alone) and a site is rounded to nearest (``rtn_fallback``). A site
trained alone thus never ends above RTN's objective on the retained rows; a
LET group is judged on its readers' summed objective, so one reader of a
folded group can end above its own RTN objective while the group is below
(its report entry has both, ``objective`` and ``objective_rtn``).

MoE experts (``ragged_dot`` stacks ``[E, K, N]``, captured with one Hessian
per expert) are not trained: each expert is rounded to nearest with its own
scales and the report says so (``OMNI_EXPERT_REASON``); a fold read by
experts learns no LET, since its scale would have to be shared by every
expert's objective, which this layer-wise training does not assemble.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from lowbit_jax import _rules
from lowbit_jax._fold import apply_scaling
from lowbit_jax._ptq_scaling import (_expert_layer, _put, _row_features,
                                     capture_with_folds, check_folds, group_scales,
                                     quantized_folds)
from lowbit_jax.algorithms.omniquant import (OmniQuantOptions, _grid_layout, lwc_init,
                                             lwc_quant, lwc_step)
from lowbit_jax.algorithms.gptq import block_ranges
from lowbit_jax.algorithms.rtn import hessian_error, rtn_scale
from lowbit_jax.core import fake_quant, scale_shape
from lowbit_jax.core._qarray import block_shape

_HI = lax.Precision.HIGHEST
_S_FLOOR = 1e-5            # as let_fold: LET scales are floored there


def _member_error(x, m, y, r, s, logits, *, kspec, aspec, lwc):
  """One site's layer-wise error: ``mean_rows sum_out (Q_a(x/s) Q(s W) - x W)^2``."""
  if s is not None:
    sr = jnp.maximum(s, _S_FLOOR)[r]
    x, m = x / sr[None, :], m * sr[:, None]
  if aspec is not None:
    x = fake_quant(x, aspec)
  wq = lwc_quant(m, kspec, logits)[0] if lwc else fake_quant(m, kspec)
  d = jnp.matmul(x, wq, precision=_HI) - y
  return jnp.mean(jnp.sum(d * d, axis=1))


@functools.partial(jax.jit, static_argnames=("kspecs", "aspecs", "lwc", "steps",
                                             "lwc_lr", "let_lr", "wd"))
def _train(xs, ms, ys, rs, s0, logits0, *, kspecs, aspecs, lwc, steps, lwc_lr, let_lr,
           wd):
  """AdamW on ``{"lwc": logits per member, "let": s or None}`` over the members'
  summed layer-wise errors; returns ``(best theta, loss at start, best loss,
  losses per step, RTN's loss)`` (RTN: no LET, no clipping; jitted per group
  structure: equal layers compile once)."""

  def loss(th):
    return sum(_member_error(x, m, y, r, th["let"], lg, kspec=ks, aspec=as_, lwc=lwc)
               for x, m, y, r, lg, ks, as_ in zip(xs, ms, ys, rs, th["lwc"], kspecs,
                                                  aspecs))

  theta = {"lwc": logits0, "let": s0}
  tx = optax.multi_transform(
      {"lwc": optax.adamw(lwc_lr, weight_decay=wd),
       "let": optax.adamw(let_lr, weight_decay=wd)},
      {"lwc": "lwc", "let": "let"})

  def body(carry, _):
    th, st, best, best_th = carry
    val, g = jax.value_and_grad(loss)(th)
    keep = val < best
    best_th = jax.tree.map(lambda a, b: jnp.where(keep, a, b), th, best_th)
    best = jnp.where(keep, val, best)
    upd, st = tx.update(g, st, th)
    return (optax.apply_updates(th, upd), st, best, best_th), val

  l0 = loss(theta)
  init = (theta, tx.init(theta), jnp.float32(jnp.inf), theta)
  (th, _, best, best_th), losses = lax.scan(body, init, None, length=steps)
  last = loss(th)
  keep = last < best
  best_th = jax.tree.map(lambda a, b: jnp.where(keep, a, b), th, best_th)
  rtn = sum(_member_error(x, m, y, r, None, None, kspec=ks, aspec=as_, lwc=False)
            for x, m, y, r, ks, as_ in zip(xs, ms, ys, rs, kspecs, aspecs))
  return best_th, l0, jnp.minimum(last, best), losses, rtn


def _grid_max(full, spec, shape):
  """Per-block max of ``full`` (constant per block) on ``spec``'s scale grid."""
  bs = block_shape(spec, tuple(shape))
  padded = tuple(-(-d // b) * b for d, b in zip(shape, bs))
  if padded != tuple(shape):
    full = jnp.pad(full, [(0, p - d) for d, p in zip(shape, padded)])
  new = []
  for d, b in zip(padded, bs):
    new += [d // b, b]
  g = jnp.max(full.reshape(new), axis=tuple(range(1, len(new), 2)))
  return g.reshape(scale_shape(tuple(shape), spec))


@functools.partial(jax.jit, static_argnames=("meta", "spec", "kspec", "aspec", "rtn"))
def _finish(w, logits, sr, hessian, count, x, *, meta, spec, kspec, aspec, rtn):
  """The site's result: ``(w_q, scale, codes reproduced, error, RTN's error,
  objective, RTN's objective, mean clipping strength)``.

  ``rtn``: round to nearest (no clipping) instead of the logits' steps.
  Errors are ``tr(dW^T H dW) / rows`` in the unscaled input domain (the
  kernel ``W / s`` against ``Q(W) / s``); objectives the layer-wise error on
  the retained rows with activation quantization, against RTN of ``W / s``.
  """
  from lowbit_jax import _ptq
  st = _ptq.SiteStats(hessian, count, *meta)
  plan = _ptq._plan(st, spec)   # pylint: disable=protected-access
  m = st.as_matrix(w).astype(jnp.float32)
  if rtn:
    step, z, clip = rtn_scale(m, kspec), None, jnp.float32(1.0)
  else:
    step, z = lwc_step(m, kspec, logits)
    clip = jnp.mean(jax.nn.sigmoid(logits["gamma"]))
  qm = fake_quant(m, kspec, scale=step, zero_point=z)
  wq = st.from_matrix(qm).astype(w.dtype)
  full = block_ranges(step, m.shape, kspec)
  scale = _grid_max(st.from_matrix(full), plan.spec, w.shape)
  exact = jnp.array_equal(fake_quant(wq, plan.spec, scale=scale), wq)
  ref = m / sr[:, None]
  q_ref = st.as_matrix(wq).astype(jnp.float32) / sr[:, None]
  rtn_m = st.as_matrix(fake_quant(st.from_matrix(ref), plan.spec)).astype(jnp.float32)
  rows = jnp.maximum(count, 1.0)
  y = jnp.matmul(x, ref, precision=_HI)
  xs = x / sr[None, :]
  xa = xs if aspec is None else fake_quant(xs, aspec)
  xr = x if aspec is None else fake_quant(x, aspec)
  # (Of the kernel returned, in its dtype: a bf16 one is qm rounded again.)
  q_w = st.as_matrix(wq).astype(jnp.float32)
  obj = jnp.mean(jnp.sum((jnp.matmul(xa, q_w, precision=_HI) - y) ** 2, axis=1))
  obj_rtn = jnp.mean(jnp.sum((jnp.matmul(xr, rtn_m, precision=_HI) - y) ** 2, axis=1))
  return (wq, scale, exact, hessian_error(hessian, ref, q_ref) / rows,
          hessian_error(hessian, ref, rtn_m) / rows, obj, obj_rtn, clip)


OMNI_EXPERT_REASON = (
    "OmniQuant does not train MoE experts (ragged_dot): they are rounded to nearest "
    "per expert; GPTQ, AWQ and SmoothQuant in ptq_params treat experts")


def omniquant_ptq(model, params, batches: list, rules, *, front: str, token_mask,
                  options: Optional[OmniQuantOptions], max_samples: int, seed: int,
                  fold_rtol: float):
  """``ptq_params``'s OmniQuant path (see the module docstring).

  Args:
    model, params, batches, rules, front, token_mask: as ``ptq_params``.
    options: an ``OmniQuantOptions`` (None: defaults). Used here: ``steps``
      (AdamW steps per fold group and per LWC-only site, each on all retained
      rows), ``lwc``, ``let`` (None: where a reader quantizes activations),
      ``lwc_lr``, ``let_lr``, ``weight_decay``, ``lwc_init``, ``let_alpha``;
      ``blocks``, ``batch_size`` and ``seed`` are the block-wise driver's
      (the rows are chosen by ``ptq_params``'s ``seed``).
    max_samples: input rows retained per site (the objective's rows).
    seed: the key choosing them.
    fold_rtol: see ``ptq_params``.

  Returns:
    ``(changed, weight_scales, weight_tensor_scales, report)``: parameter
    path -> new value of every folded or quantized parameter, the learned
    steps in each weight's layout, the tensor scales of two-level experts
    (rounded to nearest; a learned site's tensor scale is rebuilt from its
    steps, as they were learned), and the report.

  Raises:
    TypeError: options that are not an ``OmniQuantOptions``.
    ValueError: no rows retained, a spec LWC cannot clip, a fold that changes
      the float model, a non-finite loss, or steps that do not reproduce the
      codes.
  """
  from lowbit_jax import _ptq
  t0 = time.perf_counter()
  opts = options if options is not None else OmniQuantOptions()
  if not isinstance(opts, OmniQuantOptions):
    raise TypeError(f"omniquant= takes an algorithms.OmniQuantOptions, got "
                    f"{type(opts).__name__}")
  cap, fn, tree0, args, kwargs, plan = capture_with_folds(
      model, params, batches, rules, who="omniquant", front=front,
      token_mask=token_mask, max_samples=max_samples, seed=seed)
  get = _ptq._get_path   # pylint: disable=protected-access
  train_kw = dict(lwc=opts.lwc, steps=opts.steps, lwc_lr=float(opts.lwc_lr),
                  let_lr=float(opts.let_lr), wd=float(opts.weight_decay))

  site = {}   # path -> (meta, weight spec, [K, N] spec, matrix activation spec, x)
  experts = [p for p, st in cap.stats.items() if st.op == "ragged_dot"]
  for p, st in cap.stats.items():
    if st.op == "ragged_dot":
      continue
    spec = cap.sites[p].weight
    kspec = _ptq._matrix_spec(spec, p)   # pylint: disable=protected-access
    k = math.prod(st.shape[i] for i in st.contract)
    try:
      _grid_layout(kspec, (k, math.prod(st.shape) // k))
    except ValueError as e:
      raise ValueError(f"{p}: {e}") from e
    a = cap.sites[p].activation
    aspec = None if a is None else _rules._fill(a, (1,), 2)  # pylint: disable=protected-access
    x = jnp.asarray(cap.inputs[p].sample, jnp.float32)
    if x.shape[0] == 0:
      raise ValueError(f"{p}: no calibration rows were retained for OmniQuant's "
                       "training; raise max_samples")
    site[p] = (tuple(st[2:]), spec, kspec, aspec, x)

  def matrix(tree, p):
    return _ptq._as_matrix(_rules.logical_value(get(tree, p)), meta=site[p][0])  # pylint: disable=protected-access

  def check(losses, what):
    losses = np.asarray(losses)
    if not np.all(np.isfinite(losses)):
      raise ValueError(f"OmniQuant's layer-wise loss of {what} became non-finite; "
                       "lower lwc_lr / let_lr")

  tree = tree0
  row_s: dict = {}     # reader path -> s per matrix row
  logits: dict = {}    # path -> learned LWC logits
  stage_w: dict = {}   # LET reader path -> its kernel when its logits were learned
  no_let: dict = {}    # path -> why it got LWC alone
  folds_report, applied = [], []
  for _, producer, fold, members, entry in quantized_folds(plan, cap, folds_report):
    if any(p in experts for p in members):
      why = (f"{OMNI_EXPERT_REASON}; this producer's readers include experts, so no "
             "equivalent transform is learned for it")
      folds_report.append({**entry, "status": "skipped", "reason": why})
      for p in members:
        no_let[p] = why
      continue
    with_act = any(site[p][3] is not None for p in members)
    if not opts.uses_let(with_act):
      why = ("LET is off: OmniQuantOptions.let=False" if opts.let is False else
             "LET is off for weight-only rules (OmniQuantOptions.let=None: the "
             "paper's recipe); pass let=True to learn it")
      folds_report.append({**entry, "status": "skipped", "reason": why})
      for p in members:
        no_let[p] = why
      continue
    lays = dict(fold.readers)
    mats, rows, xs, ys = [], [], [], []
    for p in members:
      st = cap.stats[p]
      mats.append(matrix(tree, p))
      rows.append(_row_features(st, lays[p], st.shape))
      xs.append(site[p][4])
      ys.append(jnp.matmul(site[p][4], mats[-1], precision=_HI))
    s0, _ = group_scales("smoothquant", mats, [site[p][2] for p in members],
                         [cap.inputs[p] for p in members], [], rows, fold.size,
                         alpha=float(opts.let_alpha), n_grid=1)
    lg0 = tuple(lwc_init(m, site[p][2], opts.lwc_init) for p, m in zip(members, mats))
    th, l0, loss, losses, rtn = _train(
        tuple(xs), tuple(mats), tuple(ys), tuple(jnp.asarray(r, jnp.int32) for r in rows),
        jnp.asarray(s0, jnp.float32), lg0,
        kspecs=tuple(site[p][2] for p in members),
        aspecs=tuple(site[p][3] for p in members), **train_kw)
    check(losses, f"the readers of {producer!r}")
    if not float(loss) < float(rtn):
      why = (f"LET + LWC (objective {float(loss):.4g}) did not beat round to nearest "
             f"({float(rtn):.4g}) on the readers' layer-wise objective: not folded")
      folds_report.append({**entry, "status": "skipped", "reason": why,
                           "loss_start": float(l0), "loss": float(loss),
                           "loss_rtn": float(rtn)})
      for p in members:
        no_let[p] = why
      continue
    s = np.maximum(np.asarray(th["let"], np.float32), _S_FLOOR)
    tree = apply_scaling(tree, fold, s, get, _put)
    applied.append(fold)
    for p, r, lg in zip(members, rows, th["lwc"]):
      row_s[p] = s[r]
      logits[p] = lg
      stage_w[p] = np.asarray(get(tree, p))
    folds_report.append({**entry, "status": "folded", "scales": s, "shift": None,
                         "loss_start": float(l0), "loss": float(loss),
                         "loss_rtn": float(rtn)})

  check_folds(fn, args, kwargs, tree0, tree, applied, folds_report,
              fold_rtol=fold_rtol, method="omniquant")

  # LWC alone: sites without LET, and LET readers whose kernel a later fold
  # changed (from their learned logits), on the final kernels.
  retrained, rtn_sites = set(), set()
  for p in site:
    if p in logits and np.array_equal(np.asarray(get(tree, p)), stage_w[p]):
      continue
    if not opts.lwc:
      break
    meta, _, kspec, aspec, x = site[p]
    m = matrix(tree, p)
    sr = row_s.get(p)
    xin = x if sr is None else x / jnp.asarray(sr)[None, :]
    lg0 = logits.get(p)
    if lg0 is None:
      lg0 = lwc_init(m, kspec, opts.lwc_init)
    else:
      retrained.add(p)
    th, _, loss, losses, rtn = _train(
        (xin,), (m,), (jnp.matmul(xin, m, precision=_HI),), (None,), None, (lg0,),
        kspecs=(kspec,), aspecs=(aspec,), **train_kw)
    check(losses, repr(p))
    logits[p] = th["lwc"][0]
    if not float(loss) < float(rtn):
      rtn_sites.add(p)

  new, scales, tscales, layers = {}, {}, {}, {}
  for p in experts:   # round to nearest per expert (unscaled: no fold was applied)
    st = cap.stats[p]
    new[p], scale, tscale, layers[p], _ = _expert_layer(
        p, st, cap.sites[p].weight, _rules.logical_value(get(tree, p)),
        np.ones((st.shape[1],), np.float32), sample=None, rot=None)
    if scale is not None:
      scales[p] = scale
    if tscale is not None:
      tscales[p] = tscale
    layers[p].update(fold=None, reason=OMNI_EXPERT_REASON)
  for p, st in cap.stats.items():
    if p in experts:
      continue
    meta, spec, kspec, aspec, x = site[p]
    w = _rules.logical_value(get(tree, p))
    sr = row_s.get(p)
    ones = np.ones((math.prod(st.shape[i] for i in st.contract),), np.float32)
    rtn = not opts.lwc or p in rtn_sites
    lg = None if rtn else logits[p]
    wq, scale, exact, err, rerr, obj, orr, clip = _finish(
        w, lg, jnp.asarray(ones if sr is None else sr), st.hessian, st.count, x,
        meta=meta, spec=spec, kspec=kspec, aspec=aspec, rtn=rtn)
    if not bool(exact):
      raise ValueError(f"{p}: the learned steps do not reproduce the codes in the "
                       f"weight's layout (spec {spec}); a group_size must divide the "
                       "last contraction axis")
    new[p] = wq
    scales[p] = scale
    err, rerr = float(err), float(rerr)
    entry = {"spec": str(spec), "error": err, "rtn_error": rerr,
             "error_vs_rtn": err / rerr if rerr > 0 else 1.0, "rows": float(st.count),
             "objective": float(obj), "objective_rtn": float(orr),
             "clip_mean": float(clip), "let": sr is not None,
             "rtn_fallback": p in rtn_sites,
             "lwc_retrained": p in retrained, "fold": plan.reader_of.get(p)}
    if sr is None:
      entry["fold"] = None
      entry["reason"] = no_let.get(p) or plan.skipped.get(
          p, "not read as the kernel of a matmul or conv in the model's jaxpr")
    layers[p] = entry
  changed = {p: get(tree, p) for f in applied for p, _ in f.divide + f.readers}
  changed.update(new)
  report = {"method": "omniquant", "layers": layers, "folds": folds_report,
            "skipped": dict(cap.skipped), "objective": "layer-wise",
            "unused_rules": [r.path for r in cap.unused_rules],
            "omniquant": opts, "seconds": time.perf_counter() - t0}
  return changed, scales, tscales, report
