"""AWQ: activation-aware weight quantization by per-input-channel scaling.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han, "AWQ: Activation-aware
Weight Quantization for On-Device LLM Compression and Acceleration", MLSys 2024.

Weights that meet large activations matter most. AWQ scales input channel j of
the kernel up by ``s_j`` before quantizing and divides the activation by it
(``y = (x / s) @ Q(diag(s) w)``), which shrinks the relative rounding error of
the salient rows. The scales are ``s = a^alpha`` for a per-channel activation
magnitude ``a`` (the paper uses the mean |x|), normalized by
``sqrt(max(s) min(s))``, with ``alpha`` grid-searched in [0, 1] to minimize the
layer's output error on a sample of calibration inputs. ``alpha = 0`` gives
``s = 1``, plain RTN, so on that sample AWQ is never worse than RTN.

The division by ``s`` is folded into the layer before (a norm's scale, or a
linear layer's output columns); layers that share an input (q, k, v after one
LayerNorm) must share ``s``, so ``awq_search`` takes all their kernels at once.

After the scale search the paper's recipe also clips the weights
(``auto_clip`` in its code; ``awq_clip_search`` here): per output channel and
group, the weight range ``[-a, a]`` is shrunk to ``[-r a, r a]`` with ``r``
from a grid over ``[1 - max_shrink, 1]`` chosen to minimise that group's
contribution to the output error on calibration inputs. The clipped kernel
is then quantized as usual, so its scales come from the clipped range and
real mode stores it exactly.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.algorithms.rtn import (SpecLike, as_kernels, check_kernel, kernel_spec,
                                       output_error, rtn_scale)
from lowbit_jax.core import QuantSpec, as_spec, fake_quant, scale_shape
from lowbit_jax.core._qarray import block_shape

_HI = lax.Precision.HIGHEST
Kernels = Union[jax.Array, Sequence[jax.Array]]


class AWQResult(NamedTuple):
  """What ``awq_search`` returns.

  Attributes:
    scales: ``s[K]``: the kernels become ``diag(s) w``, the inputs ``x / s``.
    alpha: the chosen exponent (float32 scalar).
    errors: ``[n_grid]`` output error (summed over the kernels) per grid point.
    weights: per kernel, ``Q(diag(s) w)``: the fake-quantized scaled kernel.
      The kernel to use with the unscaled inputs is ``weights[i] / s[:, None]``.
  """
  scales: jax.Array
  alpha: jax.Array
  errors: jax.Array
  weights: tuple


def _calibration_rows(x, k: int, who: str) -> jax.Array:
  """Calibration inputs ``x[..., K]`` as rows ``[n, K]``, checked for ``who``."""
  x = jnp.asarray(x)
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features but the kernels take {k}")
  x = x.reshape(-1, k)
  if x.shape[0] == 0:
    raise ValueError(f"x has no rows; {who} needs a sample of calibration inputs")
  return x


def awq_scales(act_scale: jax.Array, alpha) -> jax.Array:
  """The AWQ scales ``a^alpha``, clamped at 1e-4, normalized by ``sqrt(max min)``.

  Args:
    act_scale: ``[K]`` per-input-channel activation magnitude.
    alpha: the exponent in [0, 1].

  Returns:
    float32 ``s[K]``.
  """
  s = jnp.maximum(jnp.power(jnp.asarray(act_scale, jnp.float32), alpha), 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("specs", "act_spec", "n_grid"))
def _search(x, ws, act_scale, *, specs: tuple, act_spec: Optional[QuantSpec],
            n_grid: int):
  x = x.astype(jnp.float32)
  refs = tuple(jnp.matmul(x, w.astype(jnp.float32), precision=_HI) for w in ws)
  alphas = jnp.linspace(0.0, 1.0, n_grid, dtype=jnp.float32)

  def quant(s):
    out = []
    for w, spec in zip(ws, specs):
      ws_ = w.astype(jnp.float32) * s[:, None]
      out.append(ws_ if spec is None else fake_quant(ws_, spec))
    return tuple(out)

  def error(alpha):
    s = awq_scales(act_scale, alpha)
    xs = x / s
    if act_spec is not None:
      xs = fake_quant(xs, act_spec)
    tot = jnp.float32(0)
    for wq, ref in zip(quant(s), refs):
      d = jnp.matmul(xs, wq, precision=_HI) - ref
      tot = tot + jnp.sum(d * d)
    return tot

  errors = lax.map(error, alphas)
  best = jnp.argmin(errors)
  alpha = alphas[best]
  s = awq_scales(act_scale, alpha)
  wq = tuple(q.astype(w.dtype) for q, w in zip(quant(s), ws))
  return AWQResult(s, alpha, errors, wq)


def awq_search(x: jax.Array, weights: Kernels,
               spec: Union[SpecLike, Sequence[Optional[SpecLike]]], *,
               act_scale: Optional[jax.Array] = None, n_grid: int = 20,
               act_spec: Optional[SpecLike] = None) -> AWQResult:
  """Grid-searches the AWQ scales of kernels that share an input (Lin et al. 2024).

  Args:
    x: calibration inputs of the layer(s), ``[M, K]`` (or ``[..., K]``).
    weights: one kernel ``[K, N]`` or several sharing the input, ``[K, N_i]``.
    spec: weight QuantSpec or format name (unset axis: K, see ``rtn``), or
      one per kernel (None: that kernel stays float).
    act_scale: ``[K]`` per-channel activation magnitude; None: mean |x| over
      ``x`` (as the paper does).
    n_grid: grid points for alpha, ``linspace(0, 1, n_grid)``.
    act_spec: if given, the scaled inputs are fake-quantized with it inside the
      objective (for weight-and-activation quantization); an unset axis means
      per token.

  Returns:
    ``AWQResult(scales, alpha, errors, weights)``.

  Raises:
    ValueError: shapes disagree or n_grid < 1.
  """
  ws = as_kernels(weights)
  k = ws[0].shape[0]
  x = _calibration_rows(x, k, "AWQ's scale search")
  if not isinstance(n_grid, int) or n_grid < 1:
    raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
  if act_scale is None:
    act_scale = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=0)
  act_scale = jnp.asarray(act_scale, jnp.float32)
  if act_scale.shape != (k,):
    raise ValueError(f"act_scale must have shape ({k},), got {act_scale.shape}")
  aspec = None
  if act_spec is not None:
    aspec = as_spec(act_spec)
    if aspec.axis is None and aspec.tile is None:
      aspec = aspec.replace(axis=-1)
  if isinstance(spec, (list, tuple)):
    if len(spec) != len(ws):
      raise ValueError(f"got {len(spec)} specs for {len(ws)} kernels; give one spec "
                       "or one per kernel")
    specs = tuple(None if s is None else kernel_spec(s) for s in spec)
  else:
    specs = (kernel_spec(spec),) * len(ws)
  if all(s is None for s in specs):
    raise ValueError("every spec is None: nothing to quantize")
  return _search(x, ws, act_scale, specs=specs, act_spec=aspec, n_grid=n_grid)


class AWQClipResult(NamedTuple):
  """What ``awq_clip_search`` returns.

  Attributes:
    ratios: ``[nK, nN]`` (the scale grid of the kernel under the spec) the
      chosen shrink ratio of each block's range, in ``(0, 1]``.
    clipped: the float kernel clamped to ``[-r a, r a]`` per block: quantize
      this one (RTN or GPTQ); its range is the clipped range.
    weight: ``fake_quant(clipped, spec, scale=scale)``: the RTN result.
    scale: the scale grid RTN rounded ``clipped`` with (``rtn_scale``):
      ``quantize(weight, spec, scale=scale)`` stores ``weight`` exactly.
    errors: ``[n_ratios]`` the blocks' errors on ``x`` (summed; no cross
      terms between groups) with one ratio for every block (the grid, from 1
      down).
    error: output error on ``x`` of ``weight``.
    rtn_error: output error on ``x`` of plain RTN (ratio 1 everywhere).
  """
  ratios: jax.Array
  clipped: jax.Array
  weight: jax.Array
  scale: jax.Array
  errors: jax.Array
  error: jax.Array
  rtn_error: jax.Array


def clip_ratios(n_grid: int, max_shrink: float) -> jax.Array:
  """AWQ's clip grid: ``1 - i / n_grid`` for ``i < max_shrink * n_grid`` (1 first)."""
  n = max(int(max_shrink * n_grid), 1)
  return 1.0 - jnp.arange(n, dtype=jnp.float32) / n_grid


def _blocks_of(a, bs, grid):
  """``[K, N]`` -> ``[nK, bk, nN, bn]`` (zero-padded to whole blocks)."""
  (bk, bn), (nk, nn) = bs, grid
  pad = [(0, nk * bk - a.shape[0]), (0, nn * bn - a.shape[1])]
  return jnp.pad(a, pad).reshape(nk, bk, nn, bn)


def _from_grid(v, bs, shape):
  """A ``[nK, nN]`` grid array repeated over its blocks, cut to ``shape``."""
  v = jnp.repeat(jnp.repeat(v, bs[0], axis=0), bs[1], axis=1)
  return v[: shape[0], : shape[1]]


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def _clip_search(x, w, *, spec: QuantSpec, n_grid: int, max_shrink: float):
  k, n = w.shape
  bs = block_shape(spec, (k, n))
  grid = scale_shape((k, n), spec)
  if len(grid) != 2:
    grid = (1, 1)
  wf = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(_blocks_of(wf, bs, grid)), axis=(1, 3))   # [nK, nN]
  amax_full = _from_grid(amax, bs, (k, n))
  nk, bk = grid[0], bs[0]
  xb = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, nk * bk - k)]).reshape(-1, nk, bk)
  ratios = clip_ratios(n_grid, max_shrink)

  def quant(lim):
    wc = jnp.clip(wf, -lim, lim)
    return wc, fake_quant(wc, spec)

  def block_err(wq):
    e = jnp.pad(wq - wf, [(0, nk * bk - k), (0, 0)]).reshape(nk, bk, n)
    out = jnp.einsum("mgj,gjn->mgn", xb, e, precision=_HI)
    sq = jnp.sum(out * out, axis=0)                                 # [nK, N]
    nn_, bn = grid[1], bs[1]
    sq = jnp.pad(sq, [(0, 0), (0, nn_ * bn - n)]).reshape(nk, nn_, bn)
    return jnp.sum(sq, axis=2)                                      # [nK, nN]

  def err(r):
    return block_err(quant(r * amax_full)[1])

  errs = lax.map(err, ratios)                                       # [R, nK, nN]
  best = jnp.argmin(errs, axis=0)      # ties: the first, i.e. the larger ratio
  chosen = ratios[best]
  clipped, _ = quant(_from_grid(chosen, bs, (k, n)) * amax_full)
  scale = rtn_scale(clipped, spec)
  weight = fake_quant(clipped, spec, scale=scale)
  return (chosen, clipped.astype(w.dtype), weight.astype(w.dtype), scale,
          jnp.sum(errs, axis=(1, 2)), output_error(x, w, weight),
          output_error(x, w, fake_quant(w, spec)))


def awq_clip_search(x: jax.Array, w: jax.Array, spec: SpecLike, *, n_grid: int = 20,
                    max_shrink: float = 0.5) -> AWQClipResult:
  """Grid-searches a per-block weight clipping ratio (AWQ's ``auto_clip``).

  For every block of the kernel's scale grid (an output channel, or a group of
  ``group_size`` inputs of one output channel) and every ratio ``r`` of
  ``clip_ratios(n_grid, max_shrink)``, the block is clamped to ``[-r a, r
  a]`` (``a`` its max |w|), quantized, and its contribution ``sum_m (x_g .
  (Q(w_g) - w_g))^2`` to the output error on ``x`` is measured; each block
  keeps its best ratio (ties: the larger). For per-channel kernels that is
  the whole output error of the channel, so the result is never worse than
  RTN on ``x``; with groups the blocks' errors add up to the output error
  only up to cross terms between groups, as in the paper (Lin et al. 2024,
  AWQ, section 3.3 and its ``auto_clip``).

  Args:
    x: calibration inputs ``[M, K]`` (or ``[..., K]``), e.g. 512 tokens (the
      paper's sample); with AWQ's scales, the scaled inputs ``x / s``.
    w: float kernel ``[K, N]`` (the scaled one, ``diag(s) w``).
    spec: weight QuantSpec or format name (unset axis: K). Blocks must run
      along K (per channel, groups, MX/NV blocks) or cover the tensor.
    n_grid: grid resolution: ratios ``1 - i / n_grid``.
    max_shrink: the smallest ratio is ``1 - max_shrink`` (about); in (0, 1).

  Returns:
    ``AWQClipResult``.

  Raises:
    ValueError: shapes disagree, no rows, a bad grid, or a spec whose blocks
      do not run along K.
  """
  w = check_kernel(w, "w")
  sp = kernel_spec(spec)
  k = w.shape[0]
  x = _calibration_rows(x, k, "the clip search")
  if not isinstance(n_grid, int) or isinstance(n_grid, bool) or n_grid < 1:
    raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
  if not 0.0 < float(max_shrink) < 1.0:
    raise ValueError(f"max_shrink must be in (0, 1), got {max_shrink!r}")
  bs = block_shape(sp, tuple(w.shape))
  if sp.tile is not None or (bs[1] != 1 and bs != tuple(w.shape)):
    raise ValueError(f"the clip search needs blocks along the input axis K (per "
                     f"output channel, groups or MX/NV blocks of a [K, N] kernel) "
                     f"or one per tensor; this spec's blocks are {bs} (axis "
                     f"{sp.axis}, tile {sp.tile}): use axis=0 (or leave it unset)")
  return AWQClipResult(*_clip_search(x, w, spec=sp, n_grid=n_grid,
                                     max_shrink=float(max_shrink)))
