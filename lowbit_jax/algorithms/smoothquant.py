"""SmoothQuant: migrate activation outliers into the weights before W8A8.

Xiao, Lin, Seznec, Wu, Demouth & Han, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023.

A few input channels of a linear layer carry activations far larger than the
rest, which ruins per-tensor or per-token activation quantization. SmoothQuant
divides channel j of the input by ``s_j`` and multiplies row j of the kernel by
it, an identity in exact arithmetic: ``x @ w == (x / s) @ (diag(s) w)``, with

    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)

(``alpha`` = 0.5 by default; ``max|w_j|`` and then ``s_j`` clamped at 1e-5,
as the paper's code does: a channel whose activations were all zero gets
``s_j = 1e-5``). ``max|w_j|`` runs over the outputs of every kernel that reads the same
input (q, k, v after one LayerNorm share ``s``). The division by ``s`` is
folded into the layer before: a norm's scale and bias, or a linear layer's
output columns.
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

from lowbit_jax.algorithms.rtn import as_kernels

Kernels = Union[jax.Array, Sequence[jax.Array]]


def smoothquant_scales(act_absmax: jax.Array, weights: Kernels, alpha: float = 0.5,
                       eps: float = 1e-5) -> jax.Array:
  """SmoothQuant's per-input-channel smoothing factors (Xiao et al. 2023).

  Args:
    act_absmax: ``[K]`` max |x_j| per input channel over calibration data.
    weights: a kernel ``[K, N]`` or the kernels ``[K, N_i]`` sharing the input.
    alpha: migration strength in [0, 1]: ``s_j = max|x_j|**alpha /
      max|w_j|**(1 - alpha)``, so 1 moves all of the activations' range into
      the weights (``s = max|x|``) and 0 moves all of the weights' range into
      the activations (``s = 1 / max|w|``: every weight row's max becomes 1);
      the paper's 0.5 balances them.
    eps: floor of ``max|w_j|`` and of ``s`` (the paper's code's 1e-5).

  Returns:
    float32 ``s[K]``: use ``x / s`` and ``s[:, None] * w``.

  Raises:
    ValueError: alpha outside [0, 1] or shapes disagree.
  """
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
  ws = as_kernels(weights)
  a = jnp.asarray(act_absmax, jnp.float32)
  if a.shape != (ws[0].shape[0],):
    raise ValueError(f"act_absmax must have shape ({ws[0].shape[0]},), got {a.shape}")
  wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
                            for w in ws]), axis=0)
  wmax = jnp.maximum(wmax, eps)
  return jnp.maximum(jnp.power(a, alpha) / jnp.power(wmax, 1.0 - alpha), eps)


def smooth_weights(weights: Kernels, scales: jax.Array) -> tuple:
  """``diag(s) w`` for each kernel (the inputs become ``x / s``).

  Args:
    weights: a kernel ``[K, N]`` or several sharing the input.
    scales: ``s[K]``.

  Returns:
    A tuple of smoothed kernels (dtypes kept).
  """
  ws = as_kernels(weights)
  s = jnp.asarray(scales, jnp.float32)
  return tuple((w.astype(jnp.float32) * s[:, None]).astype(w.dtype) for w in ws)


def smooth_inputs(x: jax.Array, scales: jax.Array) -> jax.Array:
  """``x / s`` over the last axis (x's dtype kept)."""
  x = jnp.asarray(x)
  return (x.astype(jnp.float32) / jnp.asarray(scales, jnp.float32)).astype(x.dtype)
