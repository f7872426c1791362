"""Round-to-nearest (RTN) weight quantization, the PTQ baseline, and shared helpers.

RTN quantizes every weight to the nearest point of its block's grid, the scale
chosen from the block's own range (as in e.g. Dettmers et al. 2022, "LLM.int8()",
and the RTN baselines of Frantar et al. 2023, "GPTQ"). Every other algorithm in
this package reduces to it in some limit (GPTQ with an identity Hessian, AWQ and
SmoothQuant with unit scales).

Weight layout everywhere in ``lowbit_jax.algorithms``: a Flax Dense kernel
``w[K, N]``, K input features (the contraction axis), N outputs; ``y = x @ w``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.core import QuantSpec, as_spec, fake_quant, init_scale, quantize
from lowbit_jax.core._quantize import _check_tensor_amax
from lowbit_jax.formats import Format, LookupFormat

SpecLike = Union[QuantSpec, str, Format]


def kernel_spec(spec: SpecLike) -> QuantSpec:
  """The spec of a ``[K, N]`` kernel, its unset axis filled with K (axis 0).

  An unset axis means "the contraction axis" (as ``core.ops`` fills it): per
  output channel, or groups of ``group_size`` along K.

  Args:
    spec: a QuantSpec or a format name.

  Returns:
    The spec with ``axis=0`` where it was unset (tiles are left as they are).

  Raises:
    TypeError: spec is neither a QuantSpec nor a format name.
  """
  spec = as_spec(spec)
  if spec.axis is None and spec.tile is None:
    spec = spec.replace(axis=0)
  return spec


def check_kernel(w: jax.Array, name: str = "w") -> jax.Array:
  """Validates a 2-D float kernel ``[K, N]`` and returns it as a jax array.

  Raises:
    ValueError: not 2-D.
    TypeError: not a float array.
  """
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"{name} must be a 2-d Dense kernel [in_features, out_features], "
                     f"got shape {w.shape}; reshape it to 2-d first")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"{name} must be a float array, got dtype {w.dtype}")
  return w


def rtn(w: jax.Array, spec: SpecLike, *, key: Optional[jax.Array] = None) -> jax.Array:
  """Round-to-nearest fake quantization of a kernel: the PTQ baseline.

  Args:
    w: float kernel ``[K, N]``.
    spec: weight QuantSpec or format name; an unset axis becomes K (axis 0):
      per output channel, or groups along K with ``group_size``.
    key: PRNG key, only for a stochastically rounded spec.

  Returns:
    The fake-quantized kernel (w's shape and dtype).

  Raises:
    ValueError: w is not 2-d, or the spec does not fit its shape.
  """
  w = check_kernel(w)
  return _rtn(w, key, spec=kernel_spec(spec))


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn(w, key, *, spec: QuantSpec):
  return fake_quant(w, spec, key=key)


def sqnr_db(ref: jax.Array, approx: jax.Array) -> float:
  """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)``.

  The one definition the library uses (PTQ reports, the sweeps' per-layer
  SQNR, the format report).

  Args:
    ref: the exact values.
    approx: their approximation, same shape.

  Returns:
    The SQNR in dB: ``inf`` when they are equal, ``-inf`` when ``ref`` is all
    zeros and they differ, NaN when either holds a NaN (never a good-looking
    number).

  Raises:
    ValueError: the shapes differ (no broadcasting) or the arrays are empty.
  """
  r = np.asarray(ref, np.float64)
  a = np.asarray(approx, np.float64)
  if r.shape != a.shape:
    raise ValueError(f"sqnr_db needs two arrays of one shape, got {r.shape} and "
                     f"{a.shape}")
  if r.size == 0:
    raise ValueError("sqnr_db of empty arrays is undefined")
  e = r - a
  num, den = float(np.sum(r * r)), float(np.sum(e * e))
  if math.isnan(num) or math.isnan(den):
    return float("nan")
  if den == 0.0:
    return float("inf")
  if num == 0.0:
    return float("-inf")
  return float(10.0 * np.log10(num / den))


def output_error(x: jax.Array, w: jax.Array, w_q: jax.Array) -> jax.Array:
  """Squared output error ``||x w - x w_q||_F^2`` of a quantized kernel.

  Args:
    x: inputs ``[M, K]``.
    w: exact kernel ``[K, N]``.
    w_q: its approximation.

  Returns:
    A float32 scalar.
  """
  hi = jax.lax.Precision.HIGHEST
  d = jnp.matmul(x.astype(jnp.float32), (w - w_q).astype(jnp.float32), precision=hi)
  return jnp.sum(d * d)


def hessian_error(gram: jax.Array, w: jax.Array, w_q: jax.Array) -> jax.Array:
  """``trace(E^T G E)`` with ``E = w - w_q``: the output error for ``G = x^T x``.

  Equals ``output_error(x, w, w_q)`` for ``gram = x.T @ x``, without the inputs.

  Args:
    gram: ``[K, K]`` Gram matrix of the layer's inputs.
    w: exact kernel ``[K, N]``.
    w_q: its approximation.

  Returns:
    A float32 scalar.
  """
  hi = jax.lax.Precision.HIGHEST
  e = (w - w_q).astype(jnp.float32)
  return jnp.sum(e * jnp.matmul(gram.astype(jnp.float32), e, precision=hi))


def hessian_error_parts(gram: jax.Array, w: jax.Array, w_q: jax.Array) -> tuple:
  """``hessian_error`` as ``(t, e_max, g_max)`` with the error equal to
  ``t * e_max**2 * g_max``: E and G each divided by its largest magnitude, so
  that the parts stay finite in float32 where the error itself overflows
  (weights near 1e20). Multiply them in float64 on the host."""
  e = (w - w_q).astype(jnp.float32)
  g = gram.astype(jnp.float32)
  e_max, g_max = jnp.max(jnp.abs(e)), jnp.max(jnp.abs(g))
  t = hessian_error(g / jnp.where(g_max > 0, g_max, 1.0),
                    e / jnp.where(e_max > 0, e_max, 1.0), jnp.zeros((), jnp.float32))
  return t, e_max, g_max


def as_kernels(weights) -> tuple:
  """One kernel or several sharing an input, checked: a tuple of [K, N_i]."""
  if isinstance(weights, (list, tuple)):
    ws = tuple(check_kernel(w, f"weights[{i}]") for i, w in enumerate(weights))
  else:
    ws = (check_kernel(weights, "weights"),)
  if not ws:
    raise ValueError("weights is empty; pass at least one [K, N] kernel")
  if any(w.shape[0] != ws[0].shape[0] for w in ws):
    raise ValueError("kernels that share an input must have the same number of "
                     f"input features, got {[w.shape for w in ws]}")
  return ws


def rtn_scale(w: jax.Array, spec: SpecLike,
              tensor_amax: Optional[jax.Array] = None) -> jax.Array:
  """The scale grid RTN rounds a kernel with, as ``quantize(..., scale=)`` takes it.

  ``fake_quant(w, spec, scale=rtn_scale(w, spec))`` equals ``rtn(w, spec)``
  (not for ternary, whose 0.7 mean|x| threshold no scale alone gives), and
  re-quantizing ``rtn(w, spec)`` with that scale reproduces its codes, so
  a PTQ result can be stored packed exactly (real mode equals fake mode).
  Binary and ternary take the scale their mean-magnitude rule stores.
  For most specs this is ``init_scale(w, spec, "amax")``; power-of-two (E8M0,
  OCP MX) scales follow the format's own rule ``2**(floor(log2 amax) -
  emax)``, which ``amax / element max`` rounded down to a power of two is not,
  so their stored exponents are decoded instead. Two-level (NVFP4) specs:
  each block's stored E4M3 scale times the tensor scale, to be stored under
  that same tensor scale (``rtn_scales``).

  Args:
    w: float kernel ``[K, N]``.
    spec: weight QuantSpec or format name (unset axis: K).
    tensor_amax: two-level specs: the tensor range (``quantize``'s
      keyword; GPTQ's ``GPTQResult.tensor_amax``), default ``w``'s own.

  Returns:
    float32 scales shaped ``scale_shape(w.shape, spec)``.
  """
  return rtn_scales(w, spec, tensor_amax)[0]


def rtn_scales(w: jax.Array, spec: SpecLike,
               tensor_amax: Optional[jax.Array] = None) -> tuple:
  """``(rtn_scale(w, spec), tensor scale)``: the tensor scale is the float32
  one a two-level (NVFP4) spec stores ``w`` under, None for other specs.

  ``quantize(w, spec, scale=s, tensor_scale=t)`` with ``s, t = rtn_scales(w,
  spec)`` stores ``rtn(w, spec)`` exactly. Without ``tensor_scale`` it is
  rebuilt from the largest block scale, ``max(s) / 448``, which can land an
  ulp off ``t`` (``fl(fl(448 t) / 448)`` is not always ``t``), and for a
  GPTQ result, whose groups need not reach the tensor's range, far off it.
  ``tensor_amax`` as ``rtn_scale``'s.
  """
  spec = kernel_spec(spec)
  _check_tensor_amax(spec, None, tensor_amax)
  if spec.scale_dtype == "e8m0":
    q = quantize(w, spec)
    if q.tensor_scale is not None:  # quantize refuses these today
      raise NotImplementedError("rtn_scale: E8M0 block scales under a tensor "
                                "scale have no single float32 scale per block")
    # 2**(code - 127) from its float32 bits: exact for every code (code 0 is
    # the subnormal 2**-127). exp2 is not: XLA's CPU exp2 misses most integer
    # powers of two by an ulp (a floor-rounded scale then drops a binade) and
    # flushes 2**-127 to 0.
    code = q.scale.astype(jnp.uint32)
    bits = jnp.where(code == 0, jnp.uint32(0x00400000), code << 23)
    bits = jnp.where(code == 255, jnp.uint32(0x7FC00000), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32), None
  if spec.tensor_scale:
    # Two levels (NVFP4): the block scales RTN stored (E4M3) times the tensor
    # scale, so that under that tensor scale each block's E4M3 code comes
    # back; the raw amax / element-max per block (init_scale) rounds to
    # other codes under a tensor scale an ulp away.
    q = quantize(w, spec, tensor_amax=tensor_amax)
    return q.scale.astype(jnp.float32) * q.tensor_scale, q.tensor_scale
  fmt = spec.format
  if isinstance(fmt, LookupFormat) and fmt.scale_method != "absmax":
    # Binary (mean |x|) and ternary (mean |x| above 0.7 mean |x|): the scale
    # their own rule stores, not amax / element max.
    return quantize(w, spec).scale.astype(jnp.float32), None
  return init_scale(w, spec, "amax"), None
