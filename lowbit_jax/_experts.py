"""Per-expert PTQ math of grouped matmuls (``jax.lax.ragged_dot``: MoE experts).

Shared by ``_ptq.ptq_params`` on every front end (which ``flax.apply_ptq``
runs for RTN/GPTQ/QuaRot/SpinQuant) and ``apply_ptq``'s Linen-only extension
(``flax._ptq_linen``: AWQ, SmoothQuant, rotation), so both build the same
numbers: a grouped matmul ``ragged_dot(x [M, K], w [G, K, N], group_sizes
[G])`` takes rows sorted by group (the first ``group_sizes[0]`` rows are
expert 0's, ...; rows past ``sum(group_sizes)`` belong to none). Expert ``g``'s Hessian is the
Gram matrix of only the rows routed to it, and GPTQ (Frantar et al. 2023)
runs on each expert's ``[K, N]`` matrix with that Hessian; an expert that
received no calibration row has none and is rounded to nearest. AWQ's clip
search (Lin et al. 2024) likewise runs on each expert's matrix with only the
retained rows routed to it (``clip_experts``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.algorithms.awq import awq_clip_search
from lowbit_jax.algorithms.gptq import block_ranges, gptq
from lowbit_jax.algorithms.rtn import kernel_spec, rtn
from lowbit_jax.core import fake_quant, scaling
from lowbit_jax.core._qarray import block_shape
from lowbit_jax.core._spec import QuantSpec

_HI = jax.lax.Precision.HIGHEST


def group_ids(group_sizes: jax.Array, m: int):
  """(group of each of ``m`` sorted rows, whether the row is in a group)."""
  gs = jnp.asarray(group_sizes, jnp.int32)
  ends = jnp.cumsum(gs)
  rows = jnp.arange(m)
  gid = jnp.searchsorted(ends, rows, side="right")
  valid = rows < ends[-1]
  return jnp.minimum(gid, gs.shape[0] - 1), valid


def routed_rows(x: jax.Array, group_sizes: jax.Array):
  """``(xr [M, K] float32, xg [G, M, K], onehot [M, G], gid [M], valid [M])``.

  ``xg[g]`` is ``xr`` with every row not routed to group ``g`` zeroed; the
  one-hot is zero on rows past the groups.
  """
  m, k = x.shape
  g = group_sizes.shape[0]
  gid, valid = group_ids(group_sizes, m)
  xr = x.reshape(m, k).astype(jnp.float32)
  onehot = ((gid[:, None] == jnp.arange(g)[None]) & valid[:, None]).astype(
      jnp.float32)                                       # [M, G]
  xg = onehot.T[:, :, None] * xr[None]                   # [G, M, K]
  return xr, xg, onehot, gid, valid


def expert_hessians(x: jax.Array, group_sizes: jax.Array) -> tuple:
  """``(gram [G, K, K], count [G])`` of one call: ``gram[g] = sum x x^T`` over
  the rows routed to group ``g`` only, ``count[g]`` their number (float32)."""
  _, xg, onehot, _, _ = routed_rows(x, group_sizes)
  return (jnp.einsum("gmk,gmj->gkj", xg, xg, precision=_HI),
          jnp.sum(onehot, axis=0))


def expert_spec(spec: QuantSpec) -> QuantSpec:
  """A ``[K, N]`` kernel spec as the spec of the ``[G, K, N]`` expert stack."""
  ax = spec.axis
  if isinstance(ax, int):
    return spec.replace(axis=ax % 2 + 1)
  if isinstance(ax, tuple):
    return spec.replace(axis=tuple(a % 2 + 1 for a in ax))
  return spec


def stack_tensor_amax(w: jax.Array) -> jax.Array:
  """The tensor range a two-level (NVFP4) spec rounds every expert of the
  stack ``w`` under: real mode stores the stack as one tensor. Over finite
  values, as quantize takes a tensor's range (any positive range for an
  all-zero stack: its blocks are zero under every scale)."""
  t_amax = scaling.current_amax(w)
  return jnp.where(t_amax > 0, t_amax, jnp.float32(1.0))


def quantize_experts(w: jax.Array, grams: jax.Array, counts, spec: QuantSpec,
                     method: str, *, blocksize: int = 128, percdamp: float = 0.01,
                     act_order: bool = False) -> tuple:
  """RTN or GPTQ of each expert of a ``[G, K, N]`` stack, each with its own Hessian.

  Args:
    w: the float expert stack ``[G, K, N]``.
    grams: ``[G, K, K]``, expert ``g``'s Hessian from the rows routed to it.
    counts: ``[G]`` rows routed to each expert.
    spec: the ``[K, N]`` kernel spec (``algorithms.rtn.kernel_spec``: axis set).
    method: "gptq" or "rtn".
    blocksize, percdamp, act_order: GPTQ's options.

  Returns:
    ``(w_q [G, K, N] float32, amax [G, K, N], fallback, tensor_amax, amin)``:
    the fake-quantized stack, the range each element's block was rounded with
    (GPTQ's, or the weight's own magnitude for RTN; ``rtn_scales(amax,
    expert_spec(spec), tensor_amax)`` gives the stack's scale grid), the
    experts GPTQ rounded to nearest because no calibration row reached them,
    a two-level (NVFP4) spec's tensor range (the stack's, which every expert
    is rounded under, as real mode stores the stack as one tensor), else
    None, and for an asymmetric spec the block minimum each element's block
    was rounded with (``amax`` then holds the block maximum: GPTQ's ranges,
    or an RTN expert's own; the pair gives the stack's scale and zero point),
    else None.
  """
  counts = [float(c) for c in np.asarray(counts)]
  outs, amaxs, amins, fallback = [], [], [], []
  t_amax = stack_tensor_amax(w) if spec.tensor_scale else None
  for e in range(w.shape[0]):
    we = w[e]
    if method == "gptq" and counts[e] > 0:
      res = gptq(we, grams[e], spec, blocksize=blocksize, percdamp=percdamp,
                 act_order=act_order, tensor_amax=t_amax)
      outs.append(res.weight)
      amaxs.append(block_ranges(res.amax, we.shape, spec))
      if not spec.symmetric:
        amins.append(block_ranges(res.amin, we.shape, spec))
    else:
      if method == "gptq":
        fallback.append(e)
      outs.append(rtn(we, spec) if t_amax is None
                  else fake_quant(we, spec, tensor_amax=t_amax))
      if spec.symmetric:
        amaxs.append(jnp.abs(we))
      else:
        hi, lo = _block_extremes(we, spec)
        amaxs.append(hi)
        amins.append(lo)
  return (jnp.stack(outs), jnp.stack(amaxs), fallback, t_amax,
          jnp.stack(amins) if amins else None)


def _block_extremes(w: jax.Array, spec: QuantSpec) -> tuple:
  """The maximum and minimum of each block of a ``[K, N]`` kernel, spread over
  it (an asymmetric spec's RTN ranges, as ``block_ranges`` spreads GPTQ's)."""
  w = w.astype(jnp.float32)
  bs = block_shape(kernel_spec(spec), w.shape)
  pads = [(0, -d % b) for d, b in zip(w.shape, bs)]
  split = [n for d, b in zip(w.shape, bs) for n in (-(-d // b), b)]
  hi = jnp.pad(w, pads, constant_values=-np.inf).reshape(split).max(axis=(1, 3))
  lo = jnp.pad(w, pads, constant_values=np.inf).reshape(split).min(axis=(1, 3))
  return block_ranges(hi, w.shape, spec), block_ranges(lo, w.shape, spec)


def clip_experts(w: jax.Array, x, groups, spec: QuantSpec) -> tuple:
  """AWQ's clip search on each expert of a ``[G, K, N]`` stack, on its own rows.

  Expert ``g`` is searched (``algorithms.awq.awq_clip_search``: Lin et al.
  2024, "AWQ: Activation-aware Weight Quantization for On-Device LLM
  Compression and Acceleration") on the rows of ``x`` routed to it, zero-padded
  to the largest expert's row count (a zero row adds nothing to a block's
  error, so the search compiles once per stack); an expert without rows keeps
  its kernel (rounded to nearest afterwards).

  Args:
    w: the expert stack ``[G, K, N]`` (AWQ-scaled: ``diag(s) w_g``).
    x: ``[S, K]`` retained input rows in the same domain (``x / s``).
    groups: ``[S]`` the expert each row was routed to.
    spec: the ``[K, N]`` kernel spec (``algorithms.rtn.kernel_spec``: axis set).

  Returns:
    ``(clipped [G, K, N] in w's dtype, {g: mean clip ratio of expert g's
    blocks} for the searched experts, the experts without rows)``.
  """
  x, groups = np.asarray(x, np.float32), np.asarray(groups, np.int64)
  n = np.bincount(groups, minlength=w.shape[0])
  pad = np.zeros((max(int(n.max()), 1), w.shape[1]), np.float32)
  outs, ratios, empty = [], {}, []
  for e in range(w.shape[0]):
    if n[e] == 0:
      empty.append(e)
      outs.append(w[e])
      continue
    xe = pad.copy()
    xe[: n[e]] = x[groups == e]
    res = awq_clip_search(xe, w[e], spec)
    outs.append(res.clipped)
    ratios[e] = float(jnp.mean(res.ratios))
  return jnp.stack(outs).astype(w.dtype), ratios, empty


def expert_names(path: str, experts) -> list:
  """The report names of some experts of the layer at ``path``: ``path[e]``."""
  return [f"{path}[{e}]" for e in experts]


__all__ = ["group_ids", "routed_rows", "expert_hessians", "expert_spec",
           "quantize_experts", "clip_experts", "expert_names"]
