"""GPTQ: weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023. It builds on
Optimal Brain Surgeon (Hassibi & Stork 1993) through Optimal Brain Compression
(Frantar & Alistarh 2022).

For a Dense kernel ``w[K, N]`` (K inputs, the contraction axis) and the Gram
matrix ``H = X^T X`` of the layer's calibration inputs, GPTQ minimizes
``||X w - X w_q||^2`` greedily: it quantizes one input row ``w[i, :]`` at a time
(all N outputs at once, they share ``H``) and spreads that row's rounding error
over the rows not yet quantized, using the upper Cholesky factor ``U`` of the
damped inverse Hessian (``H + damp I``, ``damp = percdamp * mean(diag(H))``):
``w[j, :] -= U[i, j] / U[i, i] * (w[i, :] - q_i)`` for ``j > i``. Updates are
applied lazily in blocks of ``blocksize`` rows (a rank-``blocksize`` update of
the remaining rows per block). Group scales are computed when their group is
reached, from the group's rows as updated so far. With ``act_order`` rows are
visited in descending ``diag(H)`` order and the permutation is undone at the
end; the group scales are then computed up front from the original weights, in
the original group layout ("static groups"), so that the result still has one
scale per group of consecutive input rows, the layout the QuantSpec describes.

Any spec whose scale blocks tile ``[K, N]`` works: per output channel, groups
along K, per tensor, 2-D tiles, groups along N, and float, integer (symmetric or
asymmetric), NF4 and block (MX, NVFP4) formats with nearest rounding.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.algorithms.rtn import SpecLike, check_kernel, kernel_spec
from lowbit_jax.core import QuantSpec, fake_quant
from lowbit_jax.core._quantize import _check_tensor_amax
from lowbit_jax.core._qarray import block_shape, expand_grid
from lowbit_jax.formats import LookupFormat

_HI = lax.Precision.HIGHEST


class GPTQResult(NamedTuple):
  """What ``gptq`` returns.

  Attributes:
    weight: the fake-quantized kernel ``[K, N]`` (w's dtype).
    amax: the range each scale block was quantized with, shaped like the
      spec's scale grid ``[ceil(K / bk), ceil(N / bn)]`` (the block maximum
      for asymmetric specs, else the block absmax).
    amin: the block minimum (asymmetric specs), else None.
    tensor_amax: a two-level spec's (NVFP4's) tensor range, the one its
      float32 tensor scale was taken from (a scalar), else None.

  ``quantize(weight, spec, amax=amax, amin=amin, tensor_amax=tensor_amax)``
  stores exactly these values (a plain ``quantize(weight, spec)`` may not: a
  group's final values need not reach the range its scale was chosen for,
  and GPTQ's updated groups need not reach the tensor's range).
  """
  weight: jax.Array
  amax: jax.Array
  amin: Optional[jax.Array]
  tensor_amax: Optional[jax.Array] = None


def _check_spec(spec: QuantSpec) -> None:
  if spec.rounding != "nearest":
    raise ValueError("gptq rounds to nearest; use a spec with rounding='nearest'")
  el = spec.element
  if isinstance(el, LookupFormat) and el.scale_method != "absmax":
    raise ValueError(f"gptq needs a format whose scale follows the block absmax; "
                     f"{el.name!r} chooses it by {el.scale_method!r}. Use rtn for it")


def _row_block(bk: int, blocksize: int) -> int:
  """Rows per lazy-update block: a multiple of the group, or a divisor of it."""
  if bk <= blocksize:
    return bk * (blocksize // bk)
  return max(d for d in range(1, blocksize + 1) if bk % d == 0)


def _inverse_cholesky(h: jax.Array, damp: jax.Array) -> jax.Array:
  """Upper Cholesky factor U of ``(h + damp I)^-1`` (``U^T U``); damp grows on failure.

  On failure the damping becomes ``max(10 damp, 1e-3 mean(diag(h)))``.
  """
  floor = 1e-3 * jnp.mean(jnp.diagonal(h))
  eye = jnp.eye(h.shape[0], dtype=h.dtype)

  def attempt(d):
    low = jnp.linalg.cholesky(h + d * eye)
    hinv = jax.scipy.linalg.cho_solve((low, True), eye)
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.linalg.cholesky(hinv).T

  def bad(u):
    return ~jnp.all(jnp.isfinite(u))

  def body(c):
    d, _, k = c
    d = jnp.maximum(d * 10.0, floor)
    return d, attempt(d), k + 1

  _, u, _ = lax.while_loop(lambda c: bad(c[1]) & (c[2] < 8), body,
                           (damp, attempt(damp), 0))
  return u


@functools.partial(jax.jit, static_argnames=("spec", "blocksize", "act_order"))
def _gptq(w, h, percdamp, tensor_amax, *, spec: QuantSpec, blocksize: int,
          act_order: bool):
  k, n = w.shape
  bk, bn = block_shape(spec, (k, n))
  b = _row_block(bk, blocksize)
  step = max(b, bk)
  kp = -(-k // step) * step
  np_ = -(-n // bn) * bn
  sym = spec.symmetric
  tensor_scale = spec.tensor_scale
  row_spec = spec.replace(axis=0, group_size=1, tile=None, pad=False)

  wp = jnp.pad(w.astype(jnp.float32), ((0, kp - k), (0, np_ - n)))
  hp = jnp.pad(h.astype(jnp.float32), ((0, kp - k), (0, kp - k)))
  diag = jnp.diagonal(hp)
  dead = diag <= 0
  hp = hp + jnp.diag(jnp.where(dead, 1.0, 0.0))
  # Dampening from the live inputs' mean (the 1s of dead ones would set it
  # for small activations: the result would depend on the Hessian's scale).
  n_live = jnp.sum(~dead[:k])
  damp = percdamp * jnp.where(
      n_live > 0, jnp.sum(jnp.where(dead[:k], 0.0, diag[:k])) / jnp.maximum(n_live, 1),
      1.0)
  livef = (~dead).astype(jnp.float32)
  t_amax = None
  if tensor_scale:
    t_amax = (jnp.max(jnp.abs(wp)) if tensor_amax is None
              else jnp.asarray(tensor_amax, jnp.float32))

  def stats(rows, live):
    """Per-column range of a group's rows, reduced over column blocks of bn.

    Rows of dead inputs (``live`` 0) are left out where the group has a live
    one: their weights meet only zeros, so they must not widen the live
    rows' scale (they are rounded on that grid, clipped to it)."""
    rows = jnp.where(jnp.any(live > 0), rows * live[:, None], rows)
    if sym:
      hi = jnp.max(jnp.abs(rows), axis=0).reshape(np_ // bn, bn).max(axis=1)
      if tensor_scale:
        hi = jnp.minimum(hi, t_amax)
      return hi, None
    # Widened to hold 0, as a range taken from the data is: a constant block
    # (hi == lo != 0) is no static range to core, which made it NaN.
    hi = jnp.maximum(jnp.max(rows, axis=0).reshape(np_ // bn, bn).max(axis=1), 0.0)
    lo = jnp.minimum(jnp.min(rows, axis=0).reshape(np_ // bn, bn).min(axis=1), 0.0)
    return hi, lo

  def expand(v):
    return None if v is None else jnp.repeat(v, bn)

  def quant_row(row, hi, lo):
    if tensor_scale:
      # One extra column carries the tensor-wide range, so the second-level
      # scale is the same for every row.
      row = jnp.concatenate([row, jnp.zeros((1,), row.dtype)])
      hi = jnp.concatenate([hi, t_amax[None]])
    q = fake_quant(row[None], row_spec, amax=hi[None],
                   amin=None if lo is None else lo[None])[0]
    return q[:np_]

  if act_order:
    perm = jnp.argsort(-diag[:k], stable=True)
    perm = jnp.concatenate([perm, jnp.arange(k, kp)])
    groups = wp.reshape(kp // bk, bk, np_)
    g_hi, g_lo = jax.vmap(stats)(groups, livef.reshape(kp // bk, bk))
    row_hi = jnp.repeat(g_hi, bk, axis=0)[perm]
    row_lo = None if g_lo is None else jnp.repeat(g_lo, bk, axis=0)[perm]
    wp = wp[perm]
    hp = hp[perm][:, perm]
  u = _inverse_cholesky(hp, damp)

  def rows_loop(lo_row, n_rows, w1, q1, e1, u1, get_range):
    """Quantizes rows [lo_row, lo_row + n_rows) of the block w1 one by one."""
    def body(r, c):
      w1, q1, e1 = c
      i = lo_row + r
      row = lax.dynamic_index_in_dim(w1, i, 0, keepdims=False)
      hi, lo = get_range(i)
      q = quant_row(row, hi, lo)
      d = u1[i, i]
      err = (row - q) / d
      w1 = w1 - jnp.outer(lax.dynamic_index_in_dim(u1, i, 0, keepdims=False), err)
      q1 = lax.dynamic_update_index_in_dim(q1, q, i, 0)
      e1 = lax.dynamic_update_index_in_dim(e1, err, i, 0)
      return w1, q1, e1
    return lax.fori_loop(0, n_rows, body, (w1, q1, e1))

  n_groups = kp // bk
  grid_hi = jnp.zeros((n_groups, np_ // bn), jnp.float32)
  grid_lo = None if sym else jnp.zeros((n_groups, np_ // bn), jnp.float32)

  def block_body(bi, carry):
    wcur, g_hi_, g_lo_, cur_hi, cur_lo = carry
    i1 = bi * b
    w1 = lax.dynamic_slice(wcur, (i1, 0), (b, np_))
    u1 = lax.dynamic_slice(u, (i1, i1), (b, b))
    q1 = jnp.zeros_like(w1)
    e1 = jnp.zeros_like(w1)
    if act_order:
      def get_range(i):
        hi = expand(lax.dynamic_index_in_dim(row_hi, i1 + i, 0, keepdims=False))
        lo = None if row_lo is None else expand(
            lax.dynamic_index_in_dim(row_lo, i1 + i, 0, keepdims=False))
        return hi, lo
      w1, q1, e1 = rows_loop(0, b, w1, q1, e1, u1, get_range)
    elif bk > b:
      # A group spans several blocks: its range is taken when its first block
      # starts, from the rows as they stand then (all earlier updates applied).
      g = i1 // bk
      starts = (i1 % bk) == 0
      new_hi, new_lo = stats(lax.dynamic_slice(wcur, (g * bk, 0), (bk, np_)),
                             lax.dynamic_slice(livef, (g * bk,), (bk,)))
      cur_hi = jnp.where(starts, new_hi, cur_hi)
      g_hi_ = lax.dynamic_update_index_in_dim(g_hi_, cur_hi, g, 0)
      if not sym:
        cur_lo = jnp.where(starts, new_lo, cur_lo)
        g_lo_ = lax.dynamic_update_index_in_dim(g_lo_, cur_lo, g, 0)
      hi_e, lo_e = expand(cur_hi), expand(cur_lo)
      w1, q1, e1 = rows_loop(0, b, w1, q1, e1, u1, lambda i: (hi_e, lo_e))
    else:
      def group_body(gi, c):
        w1, q1, e1, g_hi_, g_lo_ = c
        hi, lo = stats(lax.dynamic_slice(w1, (gi * bk, 0), (bk, np_)),
                       lax.dynamic_slice(livef, (i1 + gi * bk,), (bk,)))
        g = i1 // bk + gi
        g_hi_ = lax.dynamic_update_index_in_dim(g_hi_, hi, g, 0)
        if not sym:
          g_lo_ = lax.dynamic_update_index_in_dim(g_lo_, lo, g, 0)
        hi_e, lo_e = expand(hi), expand(lo)
        w1, q1, e1 = rows_loop(gi * bk, bk, w1, q1, e1, u1, lambda i: (hi_e, lo_e))
        return w1, q1, e1, g_hi_, g_lo_
      w1, q1, e1, g_hi_, g_lo_ = lax.fori_loop(
          0, b // bk, group_body, (w1, q1, e1, g_hi_, g_lo_))
    # Lazy batch update of every later row; rows < i1 have U[i1:, :i1] = 0.
    u_rows = lax.dynamic_slice(u, (i1, 0), (b, kp))
    wcur = wcur - jnp.matmul(u_rows.T, e1, precision=_HI)
    wcur = lax.dynamic_update_slice(wcur, q1, (i1, 0))
    return wcur, g_hi_, g_lo_, cur_hi, cur_lo

  zeros_n = jnp.zeros((np_ // bn,), jnp.float32)
  carry = (wp, grid_hi, grid_lo, zeros_n, None if sym else zeros_n)
  wq, grid_hi, grid_lo, _, _ = lax.fori_loop(0, kp // b, block_body, carry)
  if act_order:
    wq = wq[jnp.argsort(perm)]
    grid_hi, grid_lo = g_hi, g_lo
  n_gk, n_gn = -(-k // bk), -(-n // bn)
  amin = None if grid_lo is None else grid_lo[:n_gk, :n_gn]
  return GPTQResult(wq[:k, :n].astype(w.dtype), grid_hi[:n_gk, :n_gn], amin,
                    t_amax)


def block_ranges(amax: jax.Array, shape: tuple, spec: SpecLike) -> jax.Array:
  """``GPTQResult.amax`` spread over the ``[K, N]`` kernel: each element gets
  its block's range (padded last groups cut short), so ``rtn_scales(
  block_ranges(res.amax, w.shape, spec), spec, res.tensor_amax)`` gives the
  scale grid (and a two-level spec's tensor scale) that stores ``res.weight``
  exactly."""
  shape = tuple(shape)
  return jnp.broadcast_to(
      expand_grid(amax, shape, block_shape(kernel_spec(spec), shape)), shape)


def gptq(w: jax.Array, hessian: jax.Array, spec: SpecLike, *, blocksize: int = 128,
         percdamp: float = 0.01, act_order: bool = False,
         tensor_amax: Optional[jax.Array] = None) -> GPTQResult:
  """Quantizes a Dense kernel with GPTQ (Frantar et al. 2023).

  Args:
    w: float kernel ``[K, N]`` (``y = x @ w``).
    hessian: ``[K, K]`` Gram matrix ``X^T X`` of the layer's calibration inputs
      (any positive multiple gives the same result). Inputs that are always
      zero (``H[i, i] == 0``) are rounded without compensation and left out
      of their group's range, so their weights do not widen the scale of the
      live ones (AutoGPTQ zeroes them instead; either way the outputs on the
      calibration inputs are the same), and out of the dampening's mean.
    spec: weight QuantSpec or format name; an unset axis becomes K (axis 0):
      per output channel, or groups along K with ``group_size``.
    blocksize: rows per lazy batch update (made a multiple of the group size,
      or a divisor of it when groups are longer).
    percdamp: dampening, as a fraction of the mean Hessian diagonal; raised
      (times 10, at least to 1e-3, up to 8 times) if the damped Hessian is not
      numerically positive definite.
    act_order: visit inputs in descending ``diag(H)`` order (static groups).
    tensor_amax: a two-level spec's (NVFP4's) tensor range, a positive
      scalar: the tensor scale every block is stored under, and the cap of
      every group's range. Default: ``max|w|``. An expert stack quantized as
      one tensor passes the stack's, so its experts share one tensor scale.

  Returns:
    ``GPTQResult(weight, amax, amin, tensor_amax)``.

  Raises:
    ValueError: the Hessian is not finite, has a negative diagonal entry or
      cannot be factorized even with the dampening raised (an indefinite
      Hessian with a positive diagonal is damped until it factorizes: pass
      ``X^T X``), shapes disagree, the spec does not fit ``w`` (axis not a
      multiple of the group without ``pad=True``), or the spec rounds
      stochastically / sets its scale by mean magnitude (binary, ternary).
  """
  w = check_kernel(w)
  hessian = jnp.asarray(hessian)
  k, n = w.shape
  if hessian.shape != (k, k):
    raise ValueError(f"hessian must be [K, K] = [{k}, {k}] for a kernel of shape "
                     f"{w.shape}, got {hessian.shape}")
  if not isinstance(blocksize, int) or blocksize < 1:
    raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
  if not 0 <= float(percdamp) < 1e3:
    raise ValueError(f"percdamp must be >= 0 (e.g. 0.01), got {percdamp!r}")
  spec = kernel_spec(spec)
  _check_spec(spec)
  _check_tensor_amax(spec, None, tensor_amax)
  bk, bn = block_shape(spec, (k, n))
  if (k % bk or n % bn) and not spec.pad:
    ax, d, bsz = (0, k, bk) if k % bk else (1, n, bn)
    raise ValueError(f"kernel axis {ax} has length {d}, not a multiple of the block "
                     f"size {bsz}; pass pad=True in the spec or choose a group size "
                     f"that divides {d}")
  concrete = not isinstance(hessian, jax.core.Tracer) and not isinstance(w, jax.core.Tracer)
  if concrete and not bool(jnp.all(jnp.isfinite(hessian))):
    raise ValueError("hessian holds NaN or inf (non-finite calibration inputs, or "
                     "values above ~1e19 whose squares overflow float32); check the "
                     "inputs it was built from")
  if concrete and bool(jnp.any(jnp.diagonal(hessian) < 0)):
    raise ValueError("hessian has a negative diagonal entry, which no X^T X has; "
                     "pass the Gram matrix of the layer's inputs "
                     "(lowbit_jax.algorithms.gram)")
  res = _gptq(w, hessian, jnp.float32(percdamp),
              None if tensor_amax is None else jnp.asarray(tensor_amax, jnp.float32),
              spec=spec, blocksize=blocksize, act_order=bool(act_order))
  if (concrete and not bool(jnp.all(jnp.isfinite(res.weight)))
      and bool(jnp.all(jnp.isfinite(w)))):
    raise ValueError("hessian could not be factorized even with the dampening "
                     "raised 10^8-fold (it is no X^T X); pass the Gram matrix of "
                     "the layer's inputs (lowbit_jax.algorithms.gram)")
  return res


def gram(x: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
  """``X^T X`` over all leading axes of ``x[..., K]`` (rows weighted if given).

  Args:
    x: layer inputs ``[..., K]``.
    weights: optional per-row weights ``x.shape[:-1]`` (e.g. a padding mask).

  Returns:
    float32 ``[K, K]``.
  """
  x = jnp.asarray(x, jnp.float32)
  x2 = x.reshape(-1, x.shape[-1])
  if weights is not None:
    wts = jnp.asarray(weights, jnp.float32).reshape(-1, 1)
    return jnp.matmul((x2 * wts).T, x2, precision=_HI)
  return jnp.matmul(x2.T, x2, precision=_HI)

