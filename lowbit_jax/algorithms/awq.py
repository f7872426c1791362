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
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.algorithms.rtn import SpecLike, as_kernels, kernel_spec
from lowbit_jax.core import QuantSpec, as_spec, fake_quant

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
  x = jnp.asarray(x)
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features but the kernels take {k}")
  x = x.reshape(-1, k)
  if x.shape[0] == 0:
    raise ValueError("x has no rows; AWQ needs a sample of calibration inputs")
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
