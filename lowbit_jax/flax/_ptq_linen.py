"""The Linen-only extension of ``apply_ptq``: transforms folded at call boundaries.

``apply_ptq(..., "awq" | "smoothquant" | "rotation")`` runs here (``linen_ptq``);
block-wise OmniQuant (``flax._omniquant``) shares its fold machinery. The
quantizers and searches are the shared pure functions of ``algorithms``
(``awq_search``, ``smoothquant_scales``, ``gptq``, ``rtn``) and ``_experts``;
what is Linen-only is how folds are found and checked (``apply_ptq``'s
docstring says why these methods do not go through ``ptq_params``).

This driver

1. runs the model on calibration batches and collects, per ``nn.Dense``, input
   statistics (``capture_dense_stats``: Gram matrix, per-channel absmax and
   mean |x|, a retained sample of rows) and the structure seen at call
   boundaries (which layers read the same array; which norm or Dense produced
   it);
2. computes one transformation (SmoothQuant, AWQ, rotation) per group of
   layers reading the same input and folds it into
   the parameters where that is exact: the inverse scaling into the producing
   ``nn.LayerNorm`` / ``nn.RMSNorm`` (scale and bias) or ``nn.Dense`` (kernel
   columns and bias), the forward one into the consumers' kernel rows;
3. quantizes every selected Dense kernel with RTN or GPTQ (on the transformed
   kernel and the transformed Gram matrix) and returns float parameters whose
   kernels hold the fake-quantized values.

Foldability is checked, not assumed: a fold is applied only if a random
transformation of the same kind folded the same way leaves the float model's
output unchanged (relative error below ``fold_rtol``) on the first calibration
batch. That rejects, for example, a LayerNorm whose output also feeds a
residual connection (post-LN BERT: every LayerNorm), a rotation into a norm
(only diagonal scalings fold into a norm), or a producer whose output is also
read elsewhere. A group without an exact fold is skipped (its layers get the
plain quantizer) unless ``unfoldable="simulate"``: then the kernel is returned
as ``T^-1 Q(T w)``, which equals running the transformation online with
weight-only quantization, but is not on the spec's grid and is not valid with
activation quantization. Attention's value->output pair is linear per channel
but passes through an einsum, so it is not seen at call boundaries; declare it
with ``extra_folds={"…/out": "…/value"}`` (diagonal scalings fold exactly; a
rotation needs ``rotation_block_size`` = the head size).

MoE experts and convolutions: see ``lowbit_jax.flax.ptq``'s module docstring.
"""
from __future__ import annotations

import functools
import re
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import _ptq as ptq_lib
from lowbit_jax._experts import clip_experts, expert_spec, quantize_experts
from lowbit_jax._ptq_scaling import _close, _grid
from lowbit_jax.algorithms._tree import with_leaves
from lowbit_jax.algorithms.awq import awq_clip_search, awq_scales, awq_search
from lowbit_jax.algorithms.gptq import block_ranges, gptq
from lowbit_jax.algorithms.rotation import random_hadamard
from lowbit_jax.algorithms.rtn import rtn, rtn_scales, sqnr_db
from lowbit_jax.algorithms.smoothquant import smoothquant_scales
from lowbit_jax.core import QuantSpec
from lowbit_jax.flax._capture import (Capture, DenseStats, ExpertStats,
                                     capture_dense_stats, conv_matrix, conv_unmatrix,
                                     split_batch)
from lowbit_jax.flax.ptq import (_HI, WeightSpec, _conv_spec, _node, _resolve_spec,
                                 _spec_name, output_sqnr)

# ---------------------------------------------------------------------------
# Transformations: x' = x M, w' = M^-1 w


class _Transform:
  """A diagonal scaling (``x / s``, ``diag(s) w``) or a rotation (``x R``, ``R^T w``)."""

  def __init__(self, s: Optional[jax.Array] = None, r: Optional[jax.Array] = None):
    self.s, self.r = s, r

  @property
  def diagonal(self) -> bool:
    return self.s is not None

  def weight(self, w):
    w32 = w.astype(jnp.float32)
    if self.diagonal:
      return (w32 * self.s[:, None]).astype(w.dtype)
    return jnp.matmul(self.r.T, w32, precision=_HI).astype(w.dtype)

  def unweight(self, w):
    w32 = w.astype(jnp.float32)
    if self.diagonal:
      return (w32 / self.s[:, None]).astype(w.dtype)
    return jnp.matmul(self.r, w32, precision=_HI).astype(w.dtype)

  def inputs(self, x):
    if self.diagonal:
      return x / self.s
    return jnp.matmul(x, self.r, precision=_HI)

  def gram(self, g):
    if self.diagonal:
      return g / (self.s[:, None] * self.s[None, :])
    return jnp.matmul(jnp.matmul(self.r.T, g, precision=_HI), self.r, precision=_HI)

  def stats(self, st: DenseStats) -> DenseStats:
    sample = self.inputs(st.sample)
    if self.diagonal:
      absmax, abssum = st.absmax / self.s, st.abssum / self.s
    else:
      # Not determined by the untransformed statistics: from the sample.
      absmax = jnp.max(jnp.abs(sample), axis=0) if sample.shape[0] else st.absmax
      abssum = (jnp.mean(jnp.abs(sample), axis=0) * st.count if sample.shape[0]
                else st.abssum)
    return DenseStats(self.gram(st.gram), absmax, abssum, st.count, sample)

  def fold_into(self, params: dict, kind: str, path: str) -> dict:
    """Folds the input-side transformation into the producer at ``path``."""
    node = _node(params, path)
    if kind == "norm":
      new = {"scale": (node["scale"].astype(jnp.float32) / self.s).astype(
          node["scale"].dtype)}
      if "bias" in node:
        new["bias"] = (node["bias"].astype(jnp.float32) / self.s).astype(
            node["bias"].dtype)
      return with_leaves(params, path, **new)
    k = node["kernel"]
    if self.diagonal:
      new = {"kernel": (k.astype(jnp.float32) / self.s[None, :]).astype(k.dtype)}
      if "bias" in node:
        new["bias"] = (node["bias"].astype(jnp.float32) / self.s).astype(
            node["bias"].dtype)
    else:
      new = {"kernel": jnp.matmul(k.astype(jnp.float32), self.r,
                                  precision=_HI).astype(k.dtype)}
      if "bias" in node:
        new["bias"] = jnp.matmul(node["bias"].astype(jnp.float32), self.r,
                                 precision=_HI).astype(node["bias"].dtype)
    return with_leaves(params, path, **new)


def _foldable_kind(params: dict, kind: str, path: str, k: int, diagonal: bool):
  """None if a transformation of width k can fold into the producer, else why not."""
  node = _node(params, path)
  if node is None:
    return f"producer {path!r} has no parameters"
  if kind == "norm":
    if not diagonal:
      return "a rotation does not fold into a norm (only diagonal scalings do)"
    if "scale" not in node:
      return f"norm {path!r} has no scale parameter (use_scale=False)"
    if tuple(node["scale"].shape) != (k,):
      return f"norm {path!r} scale has shape {node['scale'].shape}, not ({k},)"
    return None
  if "kernel" not in node or node["kernel"].ndim != 2 or node["kernel"].shape[1] != k:
    return f"producer {path!r} is not a 2-d Dense with {k} outputs"
  return None


# ---------------------------------------------------------------------------
# The Linen-only path: transforms folded at call boundaries


def linen_ptq(model: nn.Module, cur: dict, calib_batches: list, method: str,
               weight_spec: WeightSpec, aspec: Optional[QuantSpec], *, quantizer: str,
               layers: str, alpha: float, n_grid: int, rotation_seed: int,
               rotation_block_size: Optional[int], extra_folds: dict, unfoldable: str,
               token_mask, max_samples: int, fold_rtol: float, apply_kwargs,
               other_variables, awq_clip: bool, awq_clip_skip: Optional[str],
               gptq_kw: dict):
  """``apply_ptq``'s awq/smoothquant/rotation on ``capture_dense_stats``'s
  call-boundary capture (module docstring); returns ``(new params, report)``."""
  t0 = time.perf_counter()
  cap: Capture = capture_dense_stats(
      model, cur, calib_batches, layers=layers, token_mask=token_mask,
      max_samples=max_samples, apply_kwargs=apply_kwargs,
      other_variables=other_variables)
  capture_seconds = time.perf_counter() - t0
  stats = dict(cap.stats)
  selected = [p for p in cap.order
              if _node(cur, p) is not None and "kernel" in _node(cur, p)
              and _node(cur, p)["kernel"].ndim == 2
              and p not in cap.convs
              and not isinstance(stats[p], ExpertStats)]
  expert_layers = [p for p in cap.order if isinstance(stats[p], ExpertStats)]
  specs = {p: _resolve_spec(weight_spec, p) for p in selected}
  transforms: dict = {}   # path -> (_Transform, status)
  folds = []

  expert_done = set()   # expert layers an awq/smoothquant fold transformed
  conv_scalings: dict = {}   # conv path -> its folded input scaling s[cin]
  apply_kwargs_ = dict(apply_kwargs or {})
  variables_extra = dict(other_variables or {})
  args, kwargs = split_batch(calib_batches[0])

  @jax.jit
  def forward_(p):
    return model.apply({"params": p, **variables_extra}, *args, **kwargs,
                       **apply_kwargs_)

  def forward(p):
    # Full float32 matmuls, so that a fold's rounding stays far below the
    # tolerance on backends whose default is TF32/bf16 passes.
    with jax.default_matmul_precision("float32"):
      return forward_(p)

  ref_out = forward(cur)
  fold_rtol, _ = fold_tolerance(model, cur, variables_extra, args, kwargs,
                                      apply_kwargs_, fold_rtol)
  probe_key = jax.random.key(rotation_seed + 1)
  rot_key = jax.random.key(rotation_seed)
  cur = _conv_transforms(cur, cap, stats, method, weight_spec, aspec, forward,
                         ref_out, jax.random.fold_in(probe_key, 7919), fold_rtol,
                         alpha, n_grid, folds, conv_scalings)
  groups = _groups_with_extra(cap, extra_folds)
  # MoE experts reading the routed tokens of a norm's output (a gather):
  # a diagonal scaling shared by all experts folds into that norm.
  expert_down = ({} if method == "rotation" else
                 _expert_down_pairs(cur, stats, expert_layers, forward, ref_out,
                                    probe_key, fold_rtol))
  attached = ({} if method == "rotation" else
              _attach_expert_readers(cur, cap, groups, expert_layers,
                                     set(expert_down)))
  for gi, (members, producer) in enumerate(groups):
    members = [m for m in members if m in specs]
    experts_here = attached.get(gi, [])
    if not members:
      continue
    why = _fold_why(cur, producer, members, experts_here, method != "rotation",
                    jax.random.fold_in(probe_key, gi), rotation_block_size, forward,
                    ref_out, fold_rtol)
    if why is not None:
      experts_here = []
    entry = {"layers": members + experts_here,
             "producer": None if producer is None else producer[1]}
    if method == "awq" and all(specs[m] is None for m in members) and not experts_here:
      folds.append({**entry, "status": "skipped",
                    "reason": "weight_spec leaves all these layers in float"})
      continue
    if why is not None and unfoldable == "skip":
      folds.append({**entry, "status": "skipped", "reason": why})
      continue
    st0 = stats[members[0]]
    kernels = [_node(cur, m)["kernel"] for m in members]
    kspecs = [specs[m] for m in members]
    for m in experts_here:   # every expert's kernel, searched on all tokens
      w = _node(cur, m)["kernel"]
      kernels += [w[e] for e in range(w.shape[0])]
      kspecs += [_resolve_spec(weight_spec, m)] * w.shape[0]
    tr, found = _group_transform(method, st0, kernels, kspecs, aspec,
                                 jax.random.fold_in(rot_key, gi), alpha=alpha,
                                 n_grid=n_grid, block=rotation_block_size)
    entry.update(found)
    status = "folded" if why is None else "simulated"
    if why is None:
      cur = tr.fold_into(cur, *producer)
      for m in members:
        cur = with_leaves(cur, m, kernel=tr.weight(_node(cur, m)["kernel"]))
      for m in experts_here:
        cur = with_leaves(cur, m, kernel=_scale_rows(_node(cur, m)["kernel"], tr.s))
        stats[m] = _scale_expert_stats(stats[m], tr.s)
        expert_done.add(m)
    else:
      entry["reason"] = why
    for m in members:
      stats[m] = tr.stats(stats[m])
      transforms[m] = (tr, status)
    folds.append({**entry, "status": status})

  # Each expert's down projection: a scaling per expert, from the tokens
  # routed to it, folded into that expert's up-projection columns.
  for p, producer_p in expert_down.items():
    cur, stats[p], entry = _expert_down_transform(
        method, cur, stats[p], p, producer_p, _resolve_spec(weight_spec, p), aspec,
        alpha, n_grid)
    folds.append(entry)
    expert_done.add(p)

  report_layers = {}
  weight_scales = {}
  cur = _quantize_convs(cur, cap, stats, method, weight_spec, quantizer, aspec,
                        folds, report_layers, weight_scales, conv_scalings,
                        method == "awq" and awq_clip, awq_clip_skip,
                        **gptq_kw)
  clip = (method == "awq" and awq_clip, awq_clip_skip)
  for i, p in enumerate(expert_layers):
    sim = None   # "rotation" with unfoldable="simulate": R per expert layer
    if p not in expert_done:
      if method == "rotation" and unfoldable == "simulate":
        sim = random_hadamard(jax.random.fold_in(jax.random.key(rotation_seed + 2), i),
                              _node(cur, p)["kernel"].shape[1],
                              block_size=rotation_block_size)
      folds.append({"layers": [p], "producer": None,
                    "status": "skipped" if sim is None else "simulated",
                    "reason": _EXPERT_ROTATION_WHY if method == "rotation" else
                    ("no norm or expert layer produces these experts' input in a "
                     "way a scaling folds into exactly (checked numerically)")})
    new_w, entry, scale = _quantize_expert_layer(
        p, _node(cur, p)["kernel"], stats[p], _resolve_spec(weight_spec, p), sim,
        quantizer, aspec, clip, gptq_kw)
    cur = with_leaves(cur, p, kernel=new_w)
    if scale is not None:
      weight_scales[p] = scale
    entry["transform"] = method if (p in expert_done or sim is not None) else "none"
    report_layers[p] = entry
  for p in selected:
    tr, status = transforms.get(p, (None, "none"))
    w = _node(cur, p)["kernel"]
    new_w, entry, scale = _quantize_dense(p, w, stats[p], specs[p], tr, status, method,
                                          quantizer, aspec, clip, gptq_kw)
    cur = with_leaves(cur, p, kernel=new_w.astype(w.dtype))
    if scale is not None:
      weight_scales[p] = scale
    report_layers[p] = entry

  return cur, {"method": method, "quantizer": quantizer, "layers": report_layers,
               "folds": folds, "capture_seconds": capture_seconds,
               "quant_scales": _nest(_scale_entries(weight_scales))}


def _fold_why(params, producer, members: list, experts: list, diagonal: bool, key,
              block: Optional[int], forward: Callable, ref_out,
              rtol: float) -> Optional[str]:
  """None if a group's transformation folds exactly into ``producer``, else why not.

  The check folds a random transformation of the same kind (``diagonal``: a
  scaling, else a rotation of block size ``block``) into the producer and the
  members' (and the experts') kernels, and compares the float model's output
  with ``ref_out``.
  """
  if producer is None:
    return "no norm or Dense produces this input directly"
  k = _node(params, members[0])["kernel"].shape[0]
  why = _foldable_kind(params, producer[0], producer[1], k, diagonal)
  if why is not None:
    return why
  probe = _probe_transform(key, k, diagonal, block)
  trial = probe.fold_into(params, *producer)
  for m in members:
    trial = with_leaves(trial, m, kernel=probe.weight(_node(trial, m)["kernel"]))
  for m in experts:
    trial = with_leaves(trial, m, kernel=_scale_rows(_node(trial, m)["kernel"], probe.s))
  if not _close(ref_out, forward(trial), rtol):
    return (f"folding into {producer[1]!r} changes the model output beyond "
            f"fold_rtol={rtol:.3g} (its output is used elsewhere too, e.g. by a "
            "residual connection; or a low-precision model's rounding exceeds "
            "the tolerance: raise fold_rtol)")
  return None


def fold_tolerance(model, params, other_variables: dict, args, kwargs,
                   apply_kwargs: dict, fold_rtol: float) -> tuple:
  """``(tolerance, note)`` of the numerical fold checks: ``fold_rtol``,
  widened to a few epsilons of a 16-bit model (bf16 parameters or compute),
  whose output moves by its own rounding when a fold rescales its weights
  (the shared path's ``_ptq_rotation.float_check_rtol``)."""
  from lowbit_jax import _ptq_rotation  # pylint: disable=g-import-not-at-top
  return _ptq_rotation.float_check_rtol(
      lambda p, *a: model.apply({"params": p, **other_variables}, *a, **kwargs,
                                **apply_kwargs), params, args, fold_rtol)


def _group_transform(method: str, st: DenseStats, kernels: list, kspecs: list,
                     aspec: Optional[QuantSpec], key, *, alpha: float, n_grid: int,
                     block: Optional[int]) -> tuple:
  """``(transform, report fields)`` of one group reading statistics ``st``:
  SmoothQuant's or AWQ's scaling (searched on all the group's kernels), or a
  randomized Hadamard."""
  if method == "smoothquant":
    return _Transform(s=smoothquant_scales(st.absmax, kernels, alpha)), {}
  if method == "awq":
    res = awq_search(st.sample, kernels, kspecs, act_scale=st.mean_abs, n_grid=n_grid,
                     act_spec=aspec)
    return _Transform(s=res.scales), {"alpha": float(res.alpha)}
  k = kernels[0].shape[0]
  return _Transform(r=random_hadamard(key, k, block_size=block)), {}


def _quantize_dense(path: str, w: jax.Array, st: DenseStats, spec: Optional[QuantSpec],
                    tr: Optional[_Transform], status: str, method: str, quantizer: str,
                    aspec: Optional[QuantSpec], clip: tuple, gptq_kw: dict) -> tuple:
  """RTN or GPTQ of one Dense kernel, after its transform (``transforms``).

  ``w`` and ``st`` are already in the transformed domain where the fold was
  applied; a "simulated" fold quantizes ``T w`` and returns ``T^-1 Q(T w)``
  (no scale: off the spec's grid). ``clip``: (AWQ's clip search on, the
  regex of paths it skips).

  Returns:
    ``(new kernel, report entry, (scale grid, tensor scale) or None)`` (the
    tensor scale: two-level specs, else None; ``rtn_scales``).
  """
  t1 = time.perf_counter()
  simulated = status == "simulated"
  w_in = tr.weight(w) if simulated else w   # the kernel in the quantized domain
  w_ref = w_in   # before any clipping
  scale, clip_entry = None, {}
  if spec is None:
    w_q = w_in
  else:
    w_in, clip_entry = _awq_clip(*clip, path, st, w_in, spec)
    t_amax = None
    res = None
    if quantizer == "gptq":
      res = gptq(w_in, st.gram, spec, **gptq_kw)
      w_q, t_amax = res.weight, res.tensor_amax
      full = block_ranges(res.amax, w_in.shape, spec)
    else:
      w_q, full = rtn(w_in, spec), w_in
    if spec.symmetric and not simulated:   # the range each block was rounded with
      scale = rtn_scales(full, spec, t_amax)
    elif res is not None and not simulated:   # asymmetric GPTQ: its ranges' pair
      scale = (ptq_lib.asym_pair(w_q, full, block_ranges(res.amin, w_in.shape, spec),
                                 spec), None)   # (weight_scale, no tensor scale)
    elif not simulated:   # asymmetric RTN (of a clipped kernel): its own ranges' pair
      scale = _grid(w_in, spec)
  # Quality, measured in the domain the kernel was quantized in; the weight
  # SQNR maps rows back to the input's original scale.
  to_orig = (lambda a: a) if tr is None else tr.unweight
  entry = {"spec": None if spec is None else _spec_name(spec),
           "transform": method if tr is not None else "none", "fold": status,
           "weight_sqnr_db": sqnr_db(to_orig(w_ref), to_orig(w_q)), **clip_entry}
  if st.sample.shape[0]:
    entry["output_sqnr_db"] = output_sqnr(st.sample, w_ref, w_q, aspec)
  entry["seconds"] = time.perf_counter() - t1
  return (tr.unweight(w_q) if simulated else w_q), entry, scale


def _quantize_expert_layer(path: str, w: jax.Array, st: ExpertStats,
                           spec: Optional[QuantSpec], sim: Optional[jax.Array],
                           quantizer: str, aspec: Optional[QuantSpec], clip: tuple,
                           gptq_kw: dict) -> tuple:
  """RTN or GPTQ of each expert of a ``[G, K, N]`` kernel (AWQ's clip first).

  ``sim``: the rotation of ``unfoldable="simulate"`` (each expert quantized
  as ``R Q(R^T w_e)``, no scale: off the spec's grid), or None.

  Returns:
    ``(new kernel, report entry, (scale grid, tensor scale) or None)``.
  """
  w_rot = w
  if sim is not None:   # each expert's kernel in the rotated domain: R^T w_e
    w_rot = jnp.einsum("kj,gkn->gjn", sim, w.astype(jnp.float32), precision=_HI)
    st = _rotate_expert_stats(st, sim)
  w_in, clip_entry = _awq_clip_experts(*clip, path, st, w_rot, spec)
  new_w, entry, scale = _quantize_experts(w_in, st, spec, quantizer, aspec, ref=w_rot,
                                          **gptq_kw)
  entry.update(clip_entry)
  if sim is not None:   # back: R Q(R^T w_e)
    new_w = jnp.einsum("jk,gkn->gjn", sim, new_w.astype(jnp.float32),
                       precision=_HI).astype(w.dtype)
    scale = None
    entry["fold"] = "simulated"
  return new_w, entry, scale


_EXPERT_ROTATION_WHY = (
    "a rotation of an expert's input has no exact fold: the gate/up experts read "
    "a gather of a norm's output (a rotation does not fold into a norm's "
    "elementwise gain, and their group's router reads the same norm), and the "
    "down experts read silu(gate) * up (an elementwise product, which a rotation "
    "does not commute with); unfoldable='simulate' rotates each expert's kernel "
    "on its own (R Q(R^T w_e), weight-only); method='quarot' folds a residual "
    "rotation into every expert exactly")


def _conv_axes(cap: Capture, path: str, ndim: int) -> tuple:
  return (cap.conv_axes or {}).get(path, (ndim - 2, ndim - 1))


def _scale_axis(w: jax.Array, s: jax.Array, axis: int, divide: bool) -> jax.Array:
  """``w`` with index ``j`` of ``axis`` times (or divided by) ``s[j]``."""
  shape = [1] * w.ndim
  shape[axis] = -1
  s = jnp.reshape(jnp.asarray(s, jnp.float32), shape)
  w32 = w.astype(jnp.float32)
  return (w32 / s if divide else w32 * s).astype(w.dtype)


def _conv_fold_why(params, cap: Capture, producer, cin: int) -> Optional[str]:
  """None if a scaling of ``cin`` channels can fold into ``producer``, else why not."""
  if producer is None:
    return ("no conv, Dense or norm produces this input (directly or through "
            "elementwise ops: none returned an array of its shape)")
  kind, path = producer
  if kind == "norm":
    return _foldable_kind(params, kind, path, cin, True)
  node = _node(params, path)
  if node is None or "kernel" not in node:
    return f"producer {path!r} has no kernel"
  k = node["kernel"]
  if kind == "dense":
    if k.ndim != 2 or k.shape[1] != cin:
      return f"producer {path!r} is not a 2-d Dense with {cin} outputs"
    return None
  out_axis = _conv_axes(cap, path, k.ndim)[1]
  if k.shape[out_axis] != cin:
    return f"producer conv {path!r} has {k.shape[out_axis]} output channels, not {cin}"
  return None


def _conv_fold(params, cap: Capture, producer, members, s) -> dict:
  """Divides ``producer``'s output channels by ``s``, multiplies the members' inputs."""
  kind, path = producer
  node = _node(params, path)
  new = {}
  if kind == "norm":
    new["scale"] = _scale_axis(node["scale"], s, 0, True)
  else:
    k = node["kernel"]
    out_axis = k.ndim - 1 if kind == "dense" else _conv_axes(cap, path, k.ndim)[1]
    new["kernel"] = _scale_axis(k, s, out_axis, True)
  if "bias" in node:
    new["bias"] = _scale_axis(node["bias"], s, 0, True)
  params = with_leaves(params, path, **new)
  for m in members:
    k = _node(params, m)["kernel"]
    params = with_leaves(params, m, kernel=_scale_axis(
        k, s, _conv_axes(cap, m, k.ndim)[0], False))
  return params


def _conv_transforms(cur, cap: Capture, stats: dict, method: str,
                     weight_spec: WeightSpec, aspec, forward, ref_out, key,
                     rtol: float, alpha: float, n_grid: int, folds: list,
                     scalings: dict):
  """AWQ / SmoothQuant scalings of conv inputs, folded exactly where they can be.

  A group of convs reading the same input takes one per-input-channel scaling
  ``s[cin]`` (the kernels' input-channel axis times ``s``, their im2col
  patches divided by ``s`` tiled over the window positions), folded into the
  module that produced the input: a norm's scale and bias (LayerNorm,
  RMSNorm, BatchNorm, GroupNorm), a Dense's output columns, or a conv's
  output channels (and bias), found through elementwise ops by shape
  (``Capture.convs``). The fold is checked as Dense folds are: a random
  positive scaling folded the same way must leave the float model's output
  unchanged (a ReLU between passes, a GELU or a residual connection does
  not). SmoothQuant's ``s`` comes from the per-channel absmax of the input
  and of the kernels' rows; AWQ's from the grid search of ``alpha`` with
  ``s = mean|x|^alpha`` (normalized), the error summed over the group's
  convs, each on its own retained patches. The rotation method does not
  transform convs (only diagonal scalings commute with ReLU and fold into a
  norm). Fills ``folds``, ``stats`` (transformed patches) and ``scalings``
  in place.

  Returns:
    The params with every exact fold applied.
  """
  convs = set(cap.convs)
  for members in cap.groups:
    here = [m for m in members if m in convs]
    if not here:
      continue
    others = [m for m in members if m not in convs]
    producer = cap.producers.get(here[0])
    entry = {"layers": here, "producer": None if producer is None else producer[1],
             "conv": True}
    specs = {m: _resolve_spec(weight_spec, m) for m in here}
    kernels = {m: _node(cur, m)["kernel"] for m in here}
    axes = {m: _conv_axes(cap, m, kernels[m].ndim) for m in here}
    cins = {kernels[m].shape[axes[m][0]] for m in here}
    why = None
    if method == "rotation":
      why = ("the rotation method does not transform convs: a rotation of a conv's "
             "input channels does not commute with the ReLU or fold into the norm "
             "that usually precedes it (only diagonal scalings do)")
    elif others:
      why = (f"this input is also read by non-conv layers {others}, which a conv "
             "fold would not scale")
    elif method == "awq" and all(specs[m] is None for m in here):
      why = "weight_spec leaves all these layers in float"
    elif len(cins) != 1:
      why = f"the convs reading this input disagree on its channels {sorted(cins)}"
    else:
      why = _conv_fold_why(cur, cap, producer, cins.pop())
    cin = kernels[here[0]].shape[axes[here[0]][0]]
    if why is None:
      probe = jnp.exp(jax.random.uniform(jax.random.fold_in(key, len(folds)), (cin,),
                                         jnp.float32, -0.7, 0.7))
      if not _close(ref_out, forward(_conv_fold(cur, cap, producer, here,
                                                        probe)), rtol):
        why = (f"folding into {producer[1]!r} changes the model output (its output "
               "is also used elsewhere, e.g. by a residual connection, or passes "
               "through an op a positive scaling does not commute with, e.g. GELU)")
    if why is not None:
      folds.append({**entry, "status": "skipped", "reason": why})
      continue
    mats = {m: conv_matrix(kernels[m], *axes[m]) for m in here}
    windows = {m: mats[m].shape[0] // cin for m in here}
    if method == "smoothquant":
      amax = functools.reduce(jnp.maximum, [
          jnp.max(stats[m].absmax.reshape(windows[m], cin), axis=0) for m in here])
      rows = [jnp.swapaxes(mats[m].reshape(windows[m], cin, -1), 0, 1).reshape(cin, -1)
              for m in here]
      scale = smoothquant_scales(amax, rows, alpha)
    else:
      m0 = here[0]
      act = jnp.mean(stats[m0].mean_abs.reshape(windows[m0], cin), axis=0)
      errors = 0.0
      for m in here:
        if specs[m] is None:
          continue
        if stats[m].sample.shape[0] == 0:
          raise ValueError(f"conv {m!r} kept no calibration rows for AWQ's search "
                           "(max_samples=0?); raise max_samples")
        errors = errors + awq_search(stats[m].sample, mats[m], specs[m],
                                     act_scale=jnp.tile(act, windows[m]),
                                     n_grid=n_grid, act_spec=aspec).errors
      best = float(jnp.linspace(0.0, 1.0, n_grid)[int(jnp.argmin(errors))])
      scale = awq_scales(act, best)
      entry["alpha"] = best
    cur = _conv_fold(cur, cap, producer, here, scale)
    for m in here:
      stats[m] = _Transform(s=jnp.tile(scale, windows[m])).stats(stats[m])
      scalings[m] = scale
    folds.append({**entry, "status": "folded"})
  return cur


def _quantize_convs(cur, cap: Capture, stats: dict, method: str,
                    weight_spec: WeightSpec, base_quant: str, aspec, folds: list,
                    report_layers: dict, weight_scales: dict, scalings: dict,
                    awq_clip: bool, awq_clip_skip: Optional[str], **gptq_kw):
  """RTN/GPTQ on the captured conv kernels as ``[prod(window)*cin, cout]`` matmuls.

  The kernel is reshaped to the matmul its im2col patches meet
  (``conv_matrix``: rows in ``(*window, cin)`` order, as the capture builds
  them; a ConvTranspose's is that of the conv it lowers to), quantized with
  the patches' Gram matrix as GPTQ's Hessian (after an AWQ/SmoothQuant fold:
  the scaled kernel and the scaled patches' statistics), and reshaped back.
  With ``awq_clip`` the AWQ clip search runs first (as for Dense). Fills
  ``folds``, ``report_layers`` and ``weight_scales`` (the n-d scale grid real
  mode stores) in place.

  Returns:
    The params with each conv kernel replaced by its fake-quantized value.
  """
  for p, why in sorted((cap.skipped or {}).items()):
    folds.append({"layers": [p], "producer": None, "status": "skipped",
                  "reason": f"conv not quantized by apply_ptq: {why}"})
  for p in cap.convs:
    node = _node(cur, p)
    if node is None or "kernel" not in node:
      continue
    t1 = time.perf_counter()
    w = node["kernel"]
    spec = _resolve_spec(weight_spec, p)
    folded = p in scalings
    if spec is None:
      report_layers[p] = {"spec": None, "transform": method if folded else "none",
                          "fold": "folded" if folded else "none", "conv": True}
      continue
    axes = _conv_axes(cap, p, w.ndim)
    spec_n = _conv_spec(spec, p, tuple(w.shape), axes)
    w2 = conv_matrix(w, *axes)
    st = stats[p]
    w_in, clip_entry = _awq_clip(awq_clip, awq_clip_skip, p, st, w2, spec)
    t_amax = res = None
    if base_quant == "gptq":
      res = gptq(w_in, st.gram, spec, **gptq_kw)
      w_q, t_amax = res.weight, res.tensor_amax
      full = block_ranges(res.amax, w2.shape, spec)
    else:
      w_q = rtn(w_in, spec)
      full = w_in
    if spec.symmetric:
      weight_scales[p] = rtn_scales(conv_unmatrix(full, w.shape, *axes), spec_n,
                                    t_amax)
    elif res is not None:   # asymmetric GPTQ: the pair of its ranges
      weight_scales[p] = (ptq_lib.asym_pair(
          conv_unmatrix(w_q, w.shape, *axes).astype(jnp.float32),
          conv_unmatrix(full, w.shape, *axes),
          conv_unmatrix(block_ranges(res.amin, w2.shape, spec), w.shape, *axes),
          spec_n), None)   # (weight_scale, no tensor scale)
    else:   # asymmetric RTN (of a clipped kernel): its own ranges' pair
      weight_scales[p] = _grid(conv_unmatrix(w_in, w.shape, *axes), spec_n)
    cur = with_leaves(cur, p, kernel=conv_unmatrix(w_q, w.shape, *axes).astype(w.dtype))
    # The weight SQNR with the rows at the input's original scale.
    s_rows = (jnp.tile(scalings[p], w2.shape[0] // scalings[p].shape[0])[:, None]
              if folded else 1.0)
    entry = {"spec": _spec_name(spec), "transform": method if folded else "none",
             "fold": "folded" if folded else "none", "conv": True,
             "weight_sqnr_db": sqnr_db(w2 / s_rows, w_q / s_rows), **clip_entry}
    if st.sample.shape[0]:
      entry["output_sqnr_db"] = output_sqnr(st.sample, w2, w_q, aspec)
    entry["seconds"] = time.perf_counter() - t1
    report_layers[p] = entry
  return cur


def _scale_rows(w: jax.Array, s: jax.Array) -> jax.Array:
  """An expert stack ``[G, K, N]`` with input row ``j`` times ``s[j]`` (or ``s[g, j]``)."""
  s = jnp.asarray(s, jnp.float32)
  s = s[None, :, None] if s.ndim == 1 else s[:, :, None]
  return (w.astype(jnp.float32) * s).astype(w.dtype)


def _scale_expert_stats(st: ExpertStats, s: jax.Array) -> ExpertStats:
  """Statistics of the inputs ``x / s`` (``s [K]`` shared, or ``[G, K]`` per expert)."""
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), st.absmax.shape)
  sample = st.sample
  if sample.shape[0]:
    sample = sample / s[jnp.clip(st.sample_group, 0, s.shape[0] - 1)]
  return st._replace(gram=st.gram / (s[:, :, None] * s[:, None, :]),
                     absmax=st.absmax / s, abssum=st.abssum / s, sample=sample)


def _rotate_expert_stats(st: ExpertStats, r: jax.Array) -> ExpertStats:
  """Statistics of the inputs ``x @ r`` of a grouped matmul (an online rotation)."""
  gram = jnp.einsum("ki,gkl,lj->gij", r, st.gram, r, precision=_HI)
  sample = jnp.matmul(st.sample, r, precision=_HI)
  absmax, abssum = st.absmax, st.abssum
  if sample.shape[0]:   # not determined by the unrotated statistics: from the sample
    onehot = jax.nn.one_hot(st.sample_group, st.count.shape[0], dtype=jnp.float32)
    absmax = jnp.max(onehot[:, :, None] * jnp.abs(sample)[:, None, :], axis=0)
    frac = st.count / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
    abssum = jnp.einsum("sg,sk->gk", onehot, jnp.abs(sample)) * frac[:, None]
  return st._replace(gram=gram, absmax=absmax, abssum=abssum, sample=sample)


def _parent(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else ""


def _expert_down_pairs(params, stats, expert_layers, forward, ref_out, key,
                       rtol: float) -> dict:
  """``{consumer expert layer: producer expert layer}`` with an exact per-expert fold.

  A consumer ``[G, K, N]`` pairs with a producer ``[G, *, K]`` of the same
  parent module when a random per-expert diagonal scaling, divided out of the
  producer's output columns and multiplied into the consumer's input rows,
  leaves the model output unchanged (SwiGLU: ``down`` with ``up``, not with
  ``gate``, whose output passes through the SiLU).
  """
  pairs = {}
  for i, p in enumerate(expert_layers):
    wp = _node(params, p)["kernel"]
    g, k = wp.shape[0], wp.shape[1]
    for q in expert_layers:
      wq = _node(params, q)["kernel"]
      if q == p or _parent(q) != _parent(p) or wq.shape[0] != g or wq.shape[2] != k:
        continue
      s = jnp.exp(jax.random.uniform(jax.random.fold_in(key, 1000 + i), (g, k),
                                     jnp.float32, -0.7, 0.7))
      trial = with_leaves(params, q, kernel=(wq.astype(jnp.float32)
                                             / s[:, None, :]).astype(wq.dtype))
      trial = with_leaves(trial, p, kernel=_scale_rows(wp, s))
      if _close(ref_out, forward(trial), rtol):
        pairs[p] = q
        break
  return pairs


def _attach_expert_readers(params, cap: Capture, groups, expert_layers,
                           consumers: set) -> dict:
  """``{group index: expert layers}``: experts that read the routed rows of a norm.

  An expert layer whose input has no producer (a gather of routed tokens)
  and that is not the consumer of a per-expert fold is attached to the
  norm-produced group of a Dense of the same parent module (the router);
  the fold is then checked numerically with the group's.
  """
  out: dict = {}
  for p in expert_layers:
    if p in consumers or cap.producers.get(p) is not None:
      continue
    k = _node(params, p)["kernel"].shape[1]
    for gi, (members, producer) in enumerate(groups):
      if (producer is not None and producer[0] == "norm"
          and any(_parent(m) == _parent(p) and m not in expert_layers
                  and _node(params, m)["kernel"].shape[0] == k for m in members)):
        out.setdefault(gi, []).append(p)
        break
  return out


def _expert_down_transform(method: str, params, st: ExpertStats, path: str,
                           producer: str, spec: Optional[QuantSpec],
                           aspec: Optional[QuantSpec], alpha: float, n_grid: int):
  """AWQ or SmoothQuant scales per expert of ``path``, folded into ``producer``.

  Expert ``g``'s scales come from the rows routed to it only (SmoothQuant: its
  activation absmax; AWQ: the grid search on its retained rows); an expert
  without calibration rows keeps scale 1.

  Returns:
    ``(params, transformed stats, fold report entry)``.
  """
  w = _node(params, path)["kernel"]
  g, k = w.shape[0], w.shape[1]
  counts = np.asarray(st.count)
  groups = np.asarray(st.sample_group)
  scales, unscaled = [], []
  for e in range(g):
    rows = st.sample[groups == e] if st.sample.shape[0] else st.sample
    if counts[e] == 0 or (method == "awq" and (rows.shape[0] == 0 or spec is None)):
      scales.append(jnp.ones((k,), jnp.float32))
      unscaled.append(e)
    elif method == "smoothquant":
      scales.append(smoothquant_scales(st.absmax[e], [w[e]], alpha))
    else:
      scales.append(awq_search(rows, [w[e]], [spec], act_scale=st.mean_abs[e],
                               n_grid=n_grid, act_spec=aspec).scales)
  s = jnp.stack(scales)
  wq = _node(params, producer)["kernel"]
  params = with_leaves(params, producer, kernel=(wq.astype(jnp.float32)
                                                 / s[:, None, :]).astype(wq.dtype))
  params = with_leaves(params, path, kernel=_scale_rows(w, s))
  entry = {"layers": [path], "producer": producer, "status": "folded",
           "per_expert": True, "unscaled_experts": unscaled}
  return params, _scale_expert_stats(st, s), entry


def _quantize_experts(w: jax.Array, st: ExpertStats, spec: Optional[QuantSpec],
                      quant: str, aspec: Optional[QuantSpec], *, blocksize: int,
                      percdamp: float, act_order: bool, ref: Optional[jax.Array] = None):
  """RTN or GPTQ of each expert of a ``[G, K, N]`` kernel, each on its own tokens.

  GPTQ takes expert ``g``'s Hessian from the tokens routed to it
  (``st.gram[g]``); an expert that received no calibration token has none
  and is rounded to nearest (listed in ``rtn_fallback``). ``ref``: the float
  kernel the SQNRs are measured against (``w`` before AWQ's clip search;
  None: ``w``).

  Returns:
    ``(new kernel, report entry, (scale grid over [G, K, N], tensor scale) or
    None)``; an asymmetric stack's grid is its ``(scale, zero point)`` pair.
  """
  g = w.shape[0]
  counts = [int(c) for c in np.asarray(st.count)]
  entry = {"spec": None if spec is None else _spec_name(spec), "fold": "none",
           "experts": g, "calibration_tokens": counts, "rtn_fallback": []}
  t0 = time.perf_counter()
  if spec is None:
    entry.update(weight_sqnr_db=float("inf"), seconds=time.perf_counter() - t0)
    return w, entry, None
  w_q, amaxs, entry["rtn_fallback"], t_amax, amins = quantize_experts(
      w, st.gram, st.count, spec, quant, blocksize=blocksize, percdamp=percdamp,
      act_order=act_order)
  scale = None
  if spec.symmetric and spec.tile is None:
    # The range each block was rounded with (GPTQ's, or the weight's own),
    # under the stack's tensor range for a two-level spec.
    scale = rtn_scales(amaxs, expert_spec(spec), t_amax)
  elif spec.tile is None:   # asymmetric: the ranges' pair (GPTQ's or RTN's own)
    scale = (ptq_lib.asym_pair(w_q, amaxs, amins, expert_spec(spec)), None)
  w_q = w_q.astype(w.dtype)
  w = w if ref is None else ref
  entry["weight_sqnr_db"] = sqnr_db(w, w_q)
  if st.sample.shape[0]:
    entry["output_sqnr_db"] = output_sqnr(st.sample, w, w_q, aspec,
                                          groups=st.sample_group)
  entry["seconds"] = time.perf_counter() - t0
  return w_q, entry, scale


def _awq_clip(on: bool, skip: Optional[str], path: str, st: DenseStats, w, spec):
  """(kernel to quantize, report entries): AWQ's clip search where it applies."""
  if not on or (skip is not None and re.fullmatch(skip, path)):
    return w, {}
  if st.sample.shape[0] == 0:
    raise ValueError(f"layer {path!r} kept no calibration rows for AWQ's clip "
                     "search (max_samples=0?); raise max_samples or pass "
                     "awq_clip=False")
  res = awq_clip_search(st.sample, w, spec)
  rtn_err = float(res.rtn_error)
  return res.clipped, {"clip_mean_ratio": float(jnp.mean(res.ratios)),
                       "clip_error_vs_rtn": (float(res.error) / rtn_err
                                             if rtn_err > 0 else 1.0)}


def _awq_clip_experts(on: bool, skip: Optional[str], path: str, st: ExpertStats, w,
                      spec: Optional[QuantSpec]):
  """(stack to quantize, report entries): AWQ's clip search on each expert, on
  the retained rows routed to it (``_experts.clip_experts``, as ``ptq_params``);
  an expert without such rows is listed in ``clip_rtn_fallback``."""
  if not on or spec is None or (skip is not None and re.fullmatch(skip, path)):
    return w, {}
  if st.sample.shape[0] == 0:
    raise ValueError(f"layer {path!r} kept no calibration rows for AWQ's clip "
                     "search (max_samples=0?); raise max_samples or pass "
                     "awq_clip=False")
  clipped, ratios, empty = clip_experts(w, st.sample, st.sample_group, spec)
  entry = {"clip_rtn_fallback": empty}
  if ratios:
    entry["clip_mean_ratio"] = float(np.mean(list(ratios.values())))
  return clipped, entry


def _scale_entries(weight_scales: Mapping[str, tuple]) -> dict:
  """``{"<layer>/weight_scale": scale, "<layer>/weight_tensor_scale": t}`` from
  ``{kernel path: (scale, tensor scale or None)}`` (``rtn_scales``; an
  asymmetric kernel's scale is its ``(scale, zero point)`` pair)."""
  flat = {}
  for p, (s, t) in weight_scales.items():
    flat[f"{p}/weight_scale"] = s
    if t is not None:
      flat[f"{p}/weight_tensor_scale"] = t
  return flat


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = v
  return out


def _probe_transform(key, k: int, diagonal: bool, block: Optional[int]) -> _Transform:
  if diagonal:
    return _Transform(s=jnp.exp(jax.random.uniform(key, (k,), jnp.float32, -0.7, 0.7)))
  return _Transform(r=random_hadamard(key, k, block_size=block))


def _groups_with_extra(cap: Capture, extra_folds: Mapping[str, str]) -> list:
  """``[(members, producer or None)]``: input groups, with declared producers."""
  out = []
  for members in cap.groups:
    declared = {extra_folds[m] for m in members if m in extra_folds}
    if len(declared) > 1:
      raise ValueError(f"layers {members} read the same input but extra_folds names "
                       f"different producers {sorted(declared)}")
    if declared:
      producer = ("dense", declared.pop())
    else:
      producer = cap.producers.get(next((m for m in members if m not in cap.convs),
                                        members[0]))
    out.append((members, producer))
  unknown = set(extra_folds) - {m for g in cap.groups for m in g}
  if unknown:
    raise ValueError(f"extra_folds names layers that were not called (or not "
                     f"selected by layers=): {sorted(unknown)}")
  return out
