"""quantize / dequantize / fake_quant: pure functions over QuantSpec and QArray.

The scale rules:

* integers, symmetric: ``scale = amax / qmax`` (qmax = 2**(b-1) - 1; 1 where
  amax is 0); codes round half to even and clamp to [-qmax, qmax].
* integers, asymmetric (Jacob et al. 2018): ``scale = (max - min) / (2**b - 1)``
  over a range widened to include 0, ``zero_point = round(-min / scale)``.
* floats and codebooks: ``scale = amax / element_max``.
* E8M0 scales (OCP Microscaling Formats v1.0): ``2**(floor(log2 amax) - emax)``
  (``floor``), ``2**ceil(log2(amax / element_max))`` (``ceil``) or the nearest
  power of two (``nearest``).
* Any granularity: a block holding a NaN or an inf gets a NaN scale (E8M0: the
  NaN code 255) and dequantizes to NaN; other blocks are unaffected.
* NVFP4 (two-level): per-tensor ``t = amax / (6 * 448)`` (1 when amax is 0; the
  amax over finite values),
  block ``s = e4m3(clamp(block_amax / (6 * t), 2**-6, 448))`` (one division
  by the rounded product, in every program and in the GPU kernel), elements
  ``fp4(clamp(x * ((1 / t) / s), -6, 6))``, value ``element * (t * s)``.
* binary (BWN, Rastegari et al. 2016): ``scale = mean |x|``; ternary (TWN, Li &
  Liu 2016): threshold ``0.7 * mean |x|``, scale the mean |x| above it.
* Tiny and huge ranges (docs/formats.md, "Tiny and huge ranges"): float32 and
  bfloat16 scales are at least 2**-126 (float16: 2**-24, at most 65504;
  bfloat16 at most its maximum), NVFP4's tensor scale at least 2**-126;
  NVFP4 computes on the tensor scale's significand and applies its power of
  two last, E8M0 scales apply as two power-of-two factors, so no
  intermediate is subnormal or inf where the result is a normal number;
  values beyond the float32 maximum saturate.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax import lax

from lowbit_jax.core import _cast
from lowbit_jax.core._qarray import (FIELDS, QArray, block_shape, codes_unit,
                                     default_pack_axis, normalize_axis, pack,
                                     pack_unit, unpack)
from lowbit_jax.core._spec import QuantSpec, as_spec
from lowbit_jax.formats import BlockFormat, FloatFormat, IntFormat, LookupFormat
from lowbit_jax.formats import get as get_format

_E4M3 = get_format("fp8_e4m3")
_E8M0_BIAS = 127
_F32_MAX = np.finfo(np.float32).max
# Input dtypes whose block amax is reduced without a float32 copy (they have
# an inf, and their max converts to float32 exactly).
_NATIVE_REDUCE = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                  jnp.dtype(jnp.float16))


# Integer images of the floating types a reduction reads: (unsigned type of
# the same width, sign-clearing mask, the bits of +inf).
_KEY_BITS = {jnp.dtype(jnp.float32): (jnp.uint32, 0x7FFFFFFF, 0x7F800000),
             jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x7FFF, 0x7F80),
             jnp.dtype(jnp.float16): (jnp.uint16, 0x7FFF, 0x7C00)}

# On CPU the block amax reduces ``_abs_key(x)`` (``_CPU_AMAX_KEY``).
_CPU_AMAX_KEY = True


def _abs_key(v: jax.Array) -> jax.Array:
  """``where(isfinite(v), |v|, inf)`` in ``v``'s own dtype, from its bits.

  A float's magnitude is its bits with the sign cleared, and non-negative
  floats order as their bits do, so ``min(bits & ~sign, bits(inf))`` is
  ``|v|`` for finite values and +inf for an inf or a NaN: the same array as
  the float expression, with no NaN left for a max to drop. XLA's CPU backend
  computes the float expression of a 16-bit array through float32 converts
  before its reduction; the integer one is cheaper (quantize and fake_quant
  of a bf16 [2048, 2048] 1.1-1.6x faster with it alone:
  benchmarks/cpu_amax_key.md's ``key`` column).
  """
  ut, mask, inf = _KEY_BITS[jnp.dtype(v.dtype)]
  k = jnp.minimum(lax.bitcast_convert_type(v, ut) & ut(mask), ut(inf))
  return lax.bitcast_convert_type(k, v.dtype)


def _range_keys(v: jax.Array):
  """``where(isfinite(v), v, inf)`` and ``where(isfinite(v), v, -inf)`` from
  ``v``'s bits, as ``_abs_key`` (the asymmetric range's max and min)."""
  ut, mask, inf = _KEY_BITS[jnp.dtype(v.dtype)]
  u = lax.bitcast_convert_type(v, ut)
  bad = (u & ut(mask)) >= ut(inf)
  sign = ut(mask + 1)
  return (lax.bitcast_convert_type(jnp.where(bad, ut(inf), u), v.dtype),
          lax.bitcast_convert_type(jnp.where(bad, ut(inf) | sign, u), v.dtype))


# ---------------------------------------------------------------------------
# Blocks


def _to_blocks(x: jax.Array, bs: tuple) -> jax.Array:
  """[d0, d1, ...] -> [d0/b0, b0, d1/b1, b1, ...]."""
  new = []
  for d, b in zip(x.shape, bs):
    new += [d // b, b]
  return x.reshape(new)


def _red_axes(ndim: int) -> tuple:
  return tuple(range(1, 2 * ndim, 2))


def _block_reduce(v: jax.Array, red: tuple, op) -> jax.Array:
  """``jnp.max`` / ``jnp.min`` (``op``) of a blocked array over its block axes.

  Blocks of 17 to 32 along a non-minor axis (MX and FP4 g32 blocks of a
  ``[K, N]`` weight along K) are reduced in two halves whose results are
  combined elementwise: XLA's GPU emitter gives a column reduction of fewer
  than 32 rows to its loop emitter (each thread reads its column's rows in
  turn, at memory bandwidth), but from 32 rows on it uses the tiled column
  reduction, which for so few rows spends its time in shared memory and warp
  shuffles (126 us on the H200 for a bf16 [8192, 8192] in blocks of 32,
  against 47 us for whole columns). Max and min are exact in any order, so
  the result is the same.
  """
  big = [a for a in red if v.shape[a] > 1]
  if (len(big) == 1 and 16 < v.shape[big[0]] <= 32
      and any(d > 1 for d in v.shape[big[0] + 1:])):
    a = big[0]
    parts = [lax.slice_in_dim(v, i, i + 1, axis=a) for i in range(v.shape[a])]
    while len(parts) > 1:  # a balanced tree of elementwise max / min
      pair = jnp.maximum if op is jnp.max else jnp.minimum
      parts = [pair(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
               for i in range(0, len(parts), 2)]
    v = parts[0]
  return op(v, axis=red)


def _expand(s: jax.Array, bs: tuple, shape: tuple) -> jax.Array:
  """Per-block array [n0, n1, ...] broadcast back to ``shape``."""
  if s.ndim == 0:
    return s
  if all(n == 1 or b == 1 for n, b in zip(s.shape, bs)):
    # Pure broadcast (per-tensor / per-channel): no repeat needed.
    return s if all(n == d or n == 1 for n, d in zip(s.shape, shape)) else \
        jnp.broadcast_to(s, shape)
  inter = []
  for n in s.shape:
    inter += [n, 1]
  s = s.reshape(inter)
  full = []
  for n, b in zip(s.shape[::2], bs):
    full += [n, b]
  return jnp.broadcast_to(s, full).reshape(shape)


# From this many elements of the full-size array on, _per_block materializes.
# Below it the per-element recomputation costs less than each gather adds to
# the compile: the MiniLM sweep (experiments/sweep.py, compile-bound: small
# weights, [6144, 384] activations, a program per scheme) spent 10% more CPU
# time with it from 2**20 on, none from 2**22 on.
_PER_BLOCK_MIN_ELEMENTS = 1 << 22


def _per_block(n: int, t: jax.Array) -> jax.Array:
  """``t``, a per-block array (a scale, its inverse, a zero point), computed
  once instead of once per element on CPU.

  XLA's CPU fusion pulls the cheap elementwise producers of a broadcast
  operand into the full-size loop that consumes it: an E8M0 scale's
  ``_pow2_pair`` (a floor division, two clamps, two shifts) then ran for each
  of the 4M elements of a [2048, 2048] MXINT8 dequantize instead of for its
  131k blocks, and made it slower than the unfused jnp reference (0.36x in
  benchmarks/primitives_cpu_s26.json; materialized, 1.48x faster than
  recomputed: benchmarks/cpu_per_block.md). A gather is never fused into its consumer
  there, so an identity gather (its indices behind an optimization barrier,
  which keeps the simplifier from seeing an iota) writes ``t`` out once. The
  values are the same bits. One gather per array: a single gather of several
  arrays stacked pulled the block reduction they came from into itself once
  per array (MXFP4 fake_quant 4.3 -> 26 ms).

  ``n`` is the element count of the full-size array that consumes ``t``:
  below ``_PER_BLOCK_MIN_ELEMENTS`` it is returned as it is. On GPU and TPU
  the recomputation costs nothing next to memory traffic, and a separate
  kernel would: ``t`` is returned unchanged there.
  """
  if (jax.default_backend() != "cpu" or n < _PER_BLOCK_MIN_ELEMENTS
      or jnp.ndim(t) == 0):
    return t
  flat = jnp.asarray(t).reshape(-1)
  idx = lax.optimization_barrier(lax.iota(jnp.int32, flat.size))
  return flat[idx].reshape(jnp.shape(t))


# On CPU the scaled elements go through one no-op ReducePrecision before the
# rounding reads them (``_one_use``). XLA's CPU fusion does not fuse an
# expensive producer (the division ``x / s``) into a consumer that reads it
# more than once, and the rounding reads it several times (clamp, NaN test,
# subnormal branch, bits): the float32 quotient of the whole tensor was then
# written out and read back (fp8 e4m3 per channel: six kernels). Behind a
# single cheap user the division fuses into the rounding's loop. The values
# are the same bits (float32's own exponent and mantissa widths: nothing is
# rounded). On GPU and TPU the fusion already happens; nothing is added there.
_CPU_ONE_USE = True


def _one_use(y: jax.Array) -> jax.Array:
  """``y`` behind a single no-op user on CPU (see ``_CPU_ONE_USE``)."""
  if not _CPU_ONE_USE or jax.default_backend() != "cpu" or y.dtype != jnp.float32:
    return y
  return lax.reduce_precision(y, exponent_bits=8, mantissa_bits=23)


def _f32_of(x: jax.Array) -> jax.Array:
  """``x`` as float32 holding ``x``'s own dtype's values.

  XLA on a GPU allows excess precision: an ``x`` narrowed to bf16 in the
  same program (a bf16 layer's cast of float32 weights, a float32 norm's
  output cast to bf16, a rotation's result) and widened here is not
  rounded there, so the quantizer saw values bf16 does not hold, while the
  reductions (which read ``x`` in bf16) saw bf16 ones: codes one step off
  in 4.8% of int8 code bytes and 0.6% of int4 / NVFP4 ones, against CPU and
  against the same weight stored and quantized later (under
  tests/_excess_precision.py's emulation of the GPU's rule;
  experiments/bench_narrow_rounding.py). A
  16-bit ``x`` is rounded again after widening (``_cast.astype_holding``:
  one ReducePrecision an element for bf16; off on CPU, whose XLA keeps the
  rounding: there it changes no bit, and its cost was lost in the host's
  noise, experiments/bench_narrow_rounding.py).
  """
  return _cast.astype_holding(x, jnp.float32)


def _local_block_shape(scale_shape: tuple, shape: tuple) -> tuple:
  return tuple(d // n if n else d for d, n in zip(shape, scale_shape))


@custom_batching.custom_vmap
def _div_exact(a: jax.Array, b: jax.Array) -> jax.Array:
  return lax.div(a, lax.optimization_barrier(b))


@_div_exact.def_vmap
def _div_exact_vmap(axis_size, in_batched, a, b):
  # Batch both operands before the barrier: a divisor broadcast by vmap after
  # it would be rewritten again.
  a = a if in_batched[0] else jnp.broadcast_to(a, (axis_size,) + a.shape)
  b = b if in_batched[1] else jnp.broadcast_to(b, (axis_size,) + b.shape)
  return _div_exact(a, b), True


@jax.custom_jvp
def _div_same_shape(a: jax.Array, b: jax.Array) -> jax.Array:
  return _div_exact(a, b)


@_div_same_shape.defjvp
def _div_same_shape_jvp(primals, tangents):
  a, b = primals
  ta, tb = tangents
  q = _div_same_shape(a, b)
  return q, (ta - q * tb) / b


def _div(a, b) -> jax.Array:
  """IEEE float32 ``a / b``, also when ``b`` is a broadcast scalar or constant.

  XLA rewrites a division by a broadcast (``x / scale``, ``amax / 7``) into a
  multiplication by the rounded reciprocal, which is off by an ulp about a third
  of the time: scales would not be ``amax / 7`` and the NVFP4 recipe would not
  be followed bit for bit. Both operands are broadcast to one shape and the
  divisor is hidden behind an optimization barrier (under vmap too), which
  keeps a true division. (On GPU, XLA's float32 division itself is not
  correctly rounded, so scales there can differ from CPU in the last bit.)
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  shape = jnp.broadcast_shapes(a.shape, b.shape)
  return _div_same_shape(jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape))


def _div_computed(a, b) -> jax.Array:
  """``_div`` for a dividend that is computed array data of the full shape.

  Per-block arrays reduced from x (a block amax, never a broadcast) divided
  by a constant or a scalar: ``_div_data``'s select keeps the true division
  and fuses, where ``_div``'s barrier writes the broadcast divisor out as an
  array of its own. A ``b`` of ``a``'s shape that is itself computed from
  such data (never a broadcast) is divided directly. Not for broadcast data
  (a static range): XLA could then see through the select.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if b.shape == a.shape and a.ndim:
    return lax.div(a, b)
  if a.ndim and jnp.broadcast_shapes(a.shape, b.shape) == a.shape:
    return _div_data(a, b)
  return _div(a, b)


def _div_scalar_data(a, b, data) -> jax.Array:
  """IEEE float32 ``a / b`` for scalars, where ``data`` is computed from x.

  ``_div``'s barrier makes each division a kernel of its own on the GPU: for
  NVFP4's tensor scale (``amax / 2688``, then ``1 / tn``) that is two dependent
  launches of a scalar per quantized tensor. Here the divisor goes through a
  select on ``data`` (a scalar reduced from x, never a constant), as in
  ``_div_data``: XLA cannot fold it into a constant, so it keeps a true
  division, and the scalar arithmetic fuses. ``data`` must not be NaN where
  the quotient matters (a NaN ``data`` gives NaN).
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return lax.div(a, jnp.where(jnp.isnan(data), np.float32(np.nan), b))


def _div_data(x: jax.Array, s: jax.Array) -> jax.Array:
  """IEEE float32 ``x / s`` of full-size data by a per-block scale, fused.

  ``_div`` keeps a true division by materializing the broadcast divisor
  behind a barrier: fine for per-block arrays, a full extra pass over the
  tensor here. Instead the divisor goes through a select on the data,
  ``where(isnan(x), nan, s)``, which XLA cannot turn back into a broadcast
  (so it does not rewrite the division into a reciprocal multiply), and the
  division fuses with the block scale's broadcast and everything around it.
  No value changes: a NaN dividend gives NaN over any divisor.

  Args:
    x: float32 data.
    s: float32 scales, broadcastable to ``x``.

  Returns:
    ``x / s``, correctly rounded where the backend's division is.
  """
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape)
  return lax.div(x, jnp.where(jnp.isnan(x), np.float32(np.nan), s))


# ---------------------------------------------------------------------------
# Scales


def _log2_parts(a: jax.Array):
  """(floor(log2 a), the 23 fraction bits of a's significand), from the bits.

  For positive finite float32 (subnormals are normalized), exactly.
  """
  u = lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32)
  e = ((u >> 23) & 0xFF).astype(jnp.int32)
  m = u & 0x7FFFFF
  n_sub = 31 - lax.clz(jnp.maximum(m, jnp.uint32(1))).astype(jnp.int32)
  frac = jnp.where(e == 0, (m << jnp.clip(23 - n_sub, 0, 31).astype(jnp.uint32))
                   & 0x7FFFFF, m)
  return jnp.where(e == 0, n_sub - 149, e - 127), frac


def _f32_ceil(v: float) -> np.float32:
  """The smallest float32 >= v."""
  f = np.float32(v)
  return f if float(f) >= v else np.nextafter(f, np.float32(np.inf))


def _e8m0_exponent(amax: jax.Array, elem, rounding: str) -> jax.Array:
  """The E8M0 scale exponent (int32, in [-127, 127]) for each block amax.

  ceil and nearest compare significands instead of dividing amax by the
  element max: amax / max = (sa / sm) * 2**(ea - em) with sa, sm in [1, 2).
  A division would not do: XLA's float32 division is not correctly rounded on
  GPU, and one ulp decides ceil at a power of two (the scale would then
  saturate the block's largest element).
  """
  ea, fa = _log2_parts(amax)
  if rounding == "floor":
    e = ea - elem.emax
  else:
    m, ex = math.frexp(float(np.float32(elem.max)))  # max = (2m) * 2**(ex - 1)
    sm = 2.0 * m
    k = ea - (ex - 1)
    if rounding == "ceil":  # sa > sm: above sm * 2**k, so one binade up
      e = k + jnp.where(fa > np.uint32(round((sm - 1.0) * 2 ** 23)), 1, 0)
    else:  # nearest power of two of amax / max in the log domain
      sa = lax.bitcast_convert_type(fa | np.uint32(0x3F800000), jnp.float32)
      up = sa >= _f32_ceil(math.sqrt(2.0) * sm)  # sa / sm >= sqrt(2)
      down = sa < _f32_ceil(sm / math.sqrt(2.0))  # sa / sm < 1 / sqrt(2)
      e = k + jnp.where(up, 1, 0) - jnp.where(down, 1, 0)
  e = jnp.where(amax > 0, e, -_E8M0_BIAS)
  return jnp.clip(e, -_E8M0_BIAS, _E8M0_BIAS)


def _pow2(e: jax.Array) -> jax.Array:
  """``2.0**e`` (float32) for int32 ``e``: exact for -126 <= e <= 127, 0 below
  (a float32 subnormal, flushed as XLA's CPU ``ldexp`` does) and inf above.

  Built from the exponent bits: ``jnp.ldexp`` lowers to a ``pow`` per element,
  which also keeps XLA's GPU loop emitter from vectorizing the fusion.
  """
  e = jnp.asarray(e, jnp.int32)
  bits = (jnp.clip(e, -127, 128) + 127).astype(jnp.uint32) << 23
  return lax.bitcast_convert_type(bits, jnp.float32)


def _pow2_pair(e: jax.Array):
  """``2**e`` (int32 ``e`` in [-252, 252]) as two normal float32 factors.

  ``x * f1 * f2`` equals ``x * 2**e`` rounded once, without ever forming
  ``2**e`` itself: an E8M0 scale of ``2**-127`` is a float32 subnormal, which
  XLA flushes to zero on CPU (and ``2**127``'s inverse likewise), though the
  scaled value is a normal number. ``floor(e / 2)`` is an arithmetic shift
  (``jnp.floor_divide`` emits a sign, remainder and select chain, which XLA's
  CPU fusion then ran once per element); this also runs inside the Mosaic
  GPU kernels (lowbit_jax.kernels.gpu_quantize, gpu_dequantize).
  """
  e = jnp.asarray(e, jnp.int32)
  h = lax.shift_right_arithmetic(e, jnp.int32(1))
  return _pow2(h), _pow2(e - h)


def _split_pow2(t: jax.Array):
  """``(tn, 2**-p, 2**p)`` with ``t = tn * 2**p`` and ``tn`` in [1, 2).

  For a positive normal float32 ``t`` (NVFP4's tensor scale, at least
  2**-126) all three are exact normal numbers (``p`` in [-126, 126]). The
  tensor-scale arithmetic runs on ``tn`` and applies ``2**p`` last: ``t *
  s`` and ``(1 / t) / s`` themselves would be subnormal or infinite for a
  tensor scale near either end of the float32 range, though the scaled
  values are normal numbers. Where they are normal, the result equals the
  unsplit one bit for bit (power-of-two scaling is exact). NaN and inf stay
  NaN and inf in ``tn``.
  """
  # The exponent field alone (no count-leading-zeros: ``t`` is normal, and
  # XLA recomputes this scalar inside the per-element pass it fuses into).
  u = lax.bitcast_convert_type(t.astype(jnp.float32), jnp.uint32)
  p = jnp.clip(((u >> 23) & 0xFF).astype(jnp.int32) - 127, -126, 126)
  down = _pow2(-p)
  return t * down, down, _pow2(p)


# The smallest scale a float scale dtype holds that is a normal float32: a
# smaller one would be a float32 subnormal, which XLA flushes to zero, or (fp16)
# would round to zero, so a tensor or block whose amax / element max lies below
# it uses this scale (and fewer grid levels). float16's subnormals (down to
# 2**-24) are normal float32 numbers and stay usable.
_MIN_SCALE = {"float32": np.float32(2.0 ** -126), "bfloat16": np.float32(2.0 ** -126),
              "float16": np.float32(2.0 ** -24)}


# The largest scale a half-precision scale dtype holds: a larger one would
# round to inf there (float16 above 65504, bfloat16 within its last rounding
# of the float32 maximum), and the block would read back as NaN; it is held
# at the maximum instead, and the block's largest elements saturate.
_MAX_SCALE = {"float16": np.float32(65504.0),
              "bfloat16": np.float32((2.0 - 2.0 ** -7) * 2.0 ** 127),
              # amax / max overflows where an element format's max is below 1
              # (a custom codebook of +-0.01, say) and amax is near float32's.
              "float32": np.float32(np.finfo(np.float32).max)}


def _clamp_scale(s: jax.Array, dtype: str) -> jax.Array:
  lo, hi = _MIN_SCALE.get(dtype), _MAX_SCALE.get(dtype)
  s = s if lo is None else jnp.maximum(s, lo)
  return s if hi is None else jnp.minimum(s, hi)


def _sum_div(v: jax.Array, red, n, rebuild=None) -> jax.Array:
  """``sum(v) / n`` over ``red`` for ``v >= 0``, also where the sum overflows.

  A block of values near the float32 maximum has an infinite sum but a finite
  mean: there the sum is taken of ``v * 2**-64`` and the mean scaled back.
  On the CPU that second sum runs only when some block's sum overflowed (a
  ``lax.cond``; the same numbers either way): XLA's CPU reductions each write
  their input out first, so an unconditional second sum made ternary
  fake_quant 1.8x slower than the jnp reference (benchmarks/primitives_cpu.md).
  On GPU and TPU both sums fuse into one pass over ``v``, and a conditional
  would cost a device-to-host sync, so both always run there.

  ``rebuild`` (optional) returns ``v`` again from arrays already in memory
  (the input x): the conditional's operands are written out before it runs,
  taken or not, and closing over ``v`` itself wrote a float32 copy of it on
  every call (3.5 of ternary fake_quant's 17 ms on a bf16 [2048, 2048] on
  CPU).
  """
  total = jnp.sum(v, axis=red)

  def rescaled():
    vv = v if rebuild is None else rebuild()
    small = _div(jnp.sum(vv * np.float32(2.0 ** -64), axis=red), n) * np.float32(2.0 ** 64)
    return jnp.where((total == np.float32(np.inf)) & jnp.isfinite(small), small,
                     _div(total, n))
  if jax.default_backend() == "cpu":
    return lax.cond(jnp.any(total == np.float32(np.inf)), rescaled,
                    lambda: _div(total, n))
  return rescaled()


def _store_float_scale(s: jax.Array, dtype: str):
  """(stored, float32 value) of a scale in a float scale dtype."""
  if dtype == "float32":
    return s, s
  if dtype in ("bfloat16", "float16"):
    # Rounded with round_to_dtype, not s.astype(dtype).astype(f32): XLA may
    # elide that round trip (excess precision, on GPU), and the fake path
    # would then use an unrounded scale that dequantize never sees.
    v = _cast.round_to_dtype(s, dtype)
    return v.astype(dtype), v
  if dtype == "fp8_e4m3":
    v = _cast.cast(jnp.clip(s, _E4M3.min_subnormal, _E4M3.max), _E4M3, saturate=True)
    return v.astype(jnp.float8_e4m3fn), v
  raise ValueError(f"no float scale dtype {dtype!r}")


def _mark_bad(stored: jax.Array, value: jax.Array, bad: jax.Array):
  """NaN scales (stored and value) for blocks that hold a NaN or an inf.

  The stored scale must be NaN too, or ``dequantize(quantize(x))`` would read
  the block back as finite numbers while ``fake_quant`` gives NaN.
  """
  stored = jnp.where(bad, jnp.asarray(jnp.nan, stored.dtype), stored)
  return stored, jnp.where(bad, jnp.float32(jnp.nan), value)


def _selected_mean(absx, sel, red, mean_abs, n_max: int) -> jax.Array:
  """TWN's mean of ``|x|`` where ``sel`` (at least one element), off the CPU.

  One pass over ``x`` with two sums, the count and the selected values, each
  block's values scaled by 2**-64 first where their block's mean of ``|x|``
  (``mean_abs``, over at most ``n_max`` elements) leaves room for an overflow
  (``mean_abs * n_max`` above 2**120). ``_sum_div`` takes a plain and a
  rescaled sum instead; with the count that made three sums, and XLA's GPU
  compiler, which fused the two sums into one kernel, left the count in a
  kernel of its own: a third full read of ``x`` (ternary quantize of a bf16
  [8192, 8192]: 575 -> 437 MB of traffic in XLA's deviceless compile). The
  two sums are one variadic reduction: as two ``jnp.sum`` XLA put them in one
  kernel for fake_quant but not for quantize.

  The same mean as ``_sum_div``'s for the same order of additions: in a
  scaled block every selected element exceeds ``0.7 * 2**120 / n_max``, so
  the scaled values and their partial sums are normal floats, scaling by a
  power of two commutes with each rounding, and the mean equals the unscaled
  one wherever that sum is finite (``test_extreme_ranges``'s
  ``test_twn_scale_off_the_cpu_equals_the_cpu_formulation`` checks it bit for
  bit against the CPU formulation on sums that are exact in any order).
  """
  big = mean_abs > np.float32(2.0 ** 120 / n_max)
  f = jnp.where(big, np.float32(2.0 ** -64), np.float32(1.0))
  masked = jnp.where(sel, absx * jnp.expand_dims(f, red), np.float32(0.0))
  z = np.float32(0.0)
  n_sel, total = lax.reduce((sel.astype(jnp.float32), masked), (z, z),
                            lambda a, b: (a[0] + b[0], a[1] + b[1]), red)
  mean = _div(total, jnp.maximum(n_sel, 1))
  return jnp.where(big, mean * np.float32(2.0 ** 64), mean)


def _mean_abs(absx, red, vb, bs, rebuild=None) -> jax.Array:
  """Per-block mean of |x| over the valid (unpadded) elements (``rebuild``:
  ``_sum_div``'s)."""
  if vb is None:
    return _sum_div(absx, red, np.float32(math.prod(bs)), rebuild)
  return _sum_div(absx, red, jnp.sum(vb, axis=red), rebuild)


def _scale_value(stored: jax.Array, dtype: str) -> jax.Array:
  if dtype == "e8m0":
    code = stored.astype(jnp.int32)
    return jnp.where(code == 255, jnp.float32(jnp.nan), _pow2(code - _E8M0_BIAS))
  return stored.astype(jnp.float32)


# ---------------------------------------------------------------------------
# The core: grid values + scales, shared by quantize and fake_quant


def _prepare(x, spec: QuantSpec):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize() takes a float array, got dtype {x.dtype}")
  if x.dtype == jnp.float64:
    # Scales and grids are computed in float32: float64 values beyond its
    # range (1e300, 1e-300) would come back as NaN or 0.
    raise TypeError("quantize() and fake_quant() compute in float32 and do not take "
                    "float64 arrays (jax_enable_x64): cast with x.astype(jnp.float32) "
                    "first, after checking the values fit float32's range")
  if x.ndim == 0:
    raise ValueError("quantize() needs at least a 1-d array; reshape the scalar "
                     "with x.reshape(1)")
  if isinstance(spec.format, BlockFormat) and spec.axis is None and spec.tile is None:
    raise ValueError(f"{spec.format.name!r} is a block format: say which axis its "
                     f"blocks of {spec.group_size} run along, e.g. axis=-1 (the "
                     "matmul's reduction axis)")
  if spec.group_size is not None and spec.axis is None and spec.tile is None:
    raise ValueError(f"group_size={spec.group_size} needs the axis its groups run "
                     "along, e.g. axis=-1 (an unset axis is filled in only by the "
                     "quantized ops and rules)")
  ax = normalize_axis(spec.axis, x.ndim)
  if ax is not None and ax != spec.axis:
    spec = spec.replace(axis=ax)
  bs = block_shape(spec, x.shape)
  padded = tuple(-(-d // b) * b for d, b in zip(x.shape, bs))
  pa = default_pack_axis(spec, x.ndim)
  if padded != x.shape and not spec.pad:
    bad = [(i, d, b) for i, (d, b) in enumerate(zip(x.shape, bs)) if d % b]
    i, d, b = bad[0]
    raise ValueError(f"axis {i} has length {d}, not a multiple of the block size {b}; "
                     "pass pad=True to zero-pad it (the result keeps x's shape), or "
                     f"choose a group size that divides {d}")
  valid = None
  if padded != x.shape:
    widths = [(0, p - d) for d, p in zip(x.shape, padded)]
    valid = jnp.pad(jnp.ones(x.shape, bool), widths)
    x = jnp.pad(x, widths)
  return x, spec, bs, valid, pa


def _grid(x, spec: QuantSpec, bs, valid, key, amax, amin, tensor_amax=None,
          for_codes=False, block_amax=None):
  """Elements on the format's grid (float32), scales and zero points.

  ``tensor_amax`` (formats with a tensor scale only) fixes the per-tensor range
  that sets the tensor scale; the block scales still follow the data.
  ``for_codes``: the elements only go to ``_cast.encode_grid`` (quantize).
  ``block_amax``: the dynamic range of each block, already reduced (float32,
  one value per block; a block holding a NaN or an inf has inf), as the
  reduction below computes it, for symmetric absmax scales without a tensor
  scale or padding only: ``kernels.gpu_quantize``'s amax kernel passes it, so
  that the scale arithmetic stays this function's.
  Float formats with a native type (``_cast._native_dtype``: FP8 on GPU and
  TPU) then come back as the scaled values clamped to the format's range,
  unrounded: XLA's convert to the float8 type rounds them to nearest even in
  one step (on the H200 one ``cvt.rn.satfinite`` per pair), where the
  ReducePrecision chain would spend about half of the quantize kernel's
  instructions.

  Returns:
    (q, scale_f32 per block, stored scale, zero_point per block or None,
     tensor scale or None, clipped mask)
  """
  fmt = spec.element
  xf = _f32_of(x)
  xb = _to_blocks(xf, bs)
  red = _red_axes(xf.ndim)
  vb = None if valid is None else _to_blocks(valid, bs)
  noise = None
  if spec.rounding == "stochastic":
    if key is None:
      raise ValueError("this spec rounds stochastically: pass key=jax.random.key(...)")
    noise = _cast.random_bits(key, xf.shape)
  elif key is not None:
    raise ValueError("a key was given but the spec rounds to nearest; use "
                     "QuantSpec(..., rounding='stochastic') to use it")

  if not spec.symmetric:
    return _grid_asym(x, xf, xb, red, vb, spec, bs, noise, amax, amin)

  method = fmt.scale_method if isinstance(fmt, LookupFormat) else "absmax"
  nb = tuple(d // b for d, b in zip(xf.shape, bs))
  # Reductions read x in its own dtype (abs, max and isfinite are exact there),
  # so no float32 copy of x is ever materialized.
  xn = _to_blocks(x if x.dtype in _NATIVE_REDUCE else xf, bs)

  def abs_x():
    # |x| in float32 from x itself (abs is exact in x's dtype): the
    # rescaled sums' rebuild (_sum_div), whose operand is then x as it lies
    # in memory.
    return jnp.abs(xn).astype(jnp.float32)
  if block_amax is not None and (method != "absmax" or spec.tensor_scale
                                 or valid is not None):
    raise ValueError("block_amax stands for the absmax reduction of a "
                     "symmetric scale without a tensor scale or padding; "
                     f"this spec ({spec}) reduces otherwise")
  if method == "absmax" or amax is not None or spec.tensor_scale:
    if block_amax is not None:
      a_dyn = jnp.asarray(block_amax, jnp.float32).reshape(nb)
      blk_bad = a_dyn == np.float32(np.inf)
    elif spec.tensor_scale:
      # The block amax over finite values also gives the tensor amax (over
      # finite values: a NaN or inf block turns only itself into NaN).
      # Both from one pass over x: a two-operand reduction (max, or) that
      # XLA emits as one kernel (two separate reductions were fused one
      # into the reduction and one into the scale kernel, reading x twice).
      # XLA's CPU backend runs a two-operand reduction of 16-bit floats
      # unvectorized (8.2 ms for a bf16 [2048, 2048] in NVFP4's blocks):
      # there it reduces x converted to float32 in the same pass (0.46 ms).
      xr = xn.astype(jnp.float32) if jax.default_backend() == "cpu" else xn
      fin = jnp.isfinite(xr)
      a_fin, blk_bad = lax.reduce(
          (jnp.where(fin, jnp.abs(xr), jnp.zeros((), xr.dtype)), ~fin),
          (np.array(0, xr.dtype), np.array(False)),
          lambda a, b: (lax.max(a[0], b[0]), lax.bitwise_or(a[1], b[1])), red)
      a_fin = a_fin.astype(jnp.float32)
      a_dyn = jnp.where(blk_bad, np.float32(np.inf), a_fin)
    else:
      # One reduction gives the amax and the bad-block flag: a NaN or an inf
      # counts as inf (a max over NaN would not be reliable: XLA's vectorized
      # max on CPU can drop one), and finite blocks have a finite amax.
      if _CPU_AMAX_KEY and jax.default_backend() == "cpu":
        # The same amax from the integer image (no max tree: that is for
        # the GPU's emitter).
        a_dyn = jnp.max(_abs_key(xn), axis=red).astype(jnp.float32)
      else:
        a_dyn = _block_reduce(jnp.where(jnp.isfinite(xn), jnp.abs(xn), np.inf), red,
                              jnp.max).astype(jnp.float32)
      blk_bad = a_dyn == np.float32(np.inf)
  if amax is not None:
    a = jnp.broadcast_to(jnp.asarray(amax, jnp.float32), nb)
    # A static range of 0 or below (concrete ones are refused by
    # check_static_range; traced ones get here) cannot scale nonzero data:
    # those blocks become NaN instead of silently using a scale of 1.
    blk_bad = blk_bad | ((a <= 0) & (a_dyn > 0))
  elif method == "absmax":
    a = a_dyn
  else:
    absx = jnp.abs(xb)
    mean_abs = _mean_abs(absx, red, vb, bs, rebuild=abs_x)
    if method == "mean_abs":
      a = mean_abs
      # A block holding a NaN or an inf has a NaN or inf sum: no second pass.
      blk_bad = ~jnp.isfinite(mean_abs)
    else:  # twn
      thr = 0.7 * mean_abs
      sel = absx > jnp.expand_dims(thr, red)
      if jax.default_backend() == "cpu":
        # Counted in float32 (exact below 2**24 elements per block): XLA's CPU
        # sums an int32 array through a slow tree of reduce-windows.
        n_sel = jnp.sum(sel.astype(jnp.float32), axis=red)

        def selected():
          ax = abs_x()
          return jnp.where(ax > jnp.expand_dims(thr, red), ax, 0.0)
        a = _sum_div(jnp.where(sel, absx, 0.0), red, jnp.maximum(n_sel, 1), selected)
      else:
        a = _selected_mean(absx, sel, red, mean_abs, math.prod(bs))
      # As for mean_abs: a block's mean of |x| is NaN or inf exactly where it
      # holds a NaN or an inf (an overflowing sum of finite values is
      # rescaled to a finite mean), so no pass of its own over x (XLA's CPU
      # backend spent 3.3 ms of ternary's 17 on that any()).
      blk_bad = ~jnp.isfinite(mean_abs)
  # Whether the block has a range, taken before clip_ratio and from the sum
  # for a mean: a mean (or a clipped amax) of normal numbers can be a float32
  # subnormal, which XLA flushes to zero on CPU, though the block is not zero.
  pos = (jnp.sum(absx, axis=red) > 0) if (method == "mean_abs" and amax is None) \
      else a > 0
  a = a * np.float32(spec.clip_ratio)
  # A block holding a NaN or an inf gets a NaN scale.
  bad = ~jnp.isfinite(a) | blk_bad

  tscale = None
  a_clip = a  # the range beyond which the straight-through gradient is zero
  if spec.tensor_scale:
    # The per-tensor amax is over finite values: a NaN or inf block turns
    # only itself into NaN.
    if tensor_amax is not None:
      t_amax = jnp.asarray(tensor_amax, jnp.float32)
      emax_t = t_amax * np.float32(spec.clip_ratio)
      t_pos = t_amax > 0
      bad = bad | (~t_pos & (a > 0))  # a traced static range <= 0 or NaN
    elif amax is None:
      emax_t = jnp.max(a_fin)
      t_pos = emax_t > 0
    else:
      emax_t = jnp.max(a)
      t_pos = jnp.any(pos)
    smax = _E4M3.max if spec.scale_dtype == "fp8_e4m3" else 1.0
    # The tensor amax reduced from x (no static range, which may be a
    # constant) divides without a barrier (_div_scalar_data).
    from_x = tensor_amax is None and amax is None
    # The tensor scale is a normal float32 (at least 2**-126).
    t_max = np.float32(fmt.max * smax)
    t = _clamp_scale(_div_scalar_data(emax_t, t_max, emax_t) if from_x
                     else _div(emax_t, t_max), "float32")
    t = jnp.where(t_pos, t, np.float32(1.0))  # 1 where the amax is 0
    tscale = t
    # Everything below runs on tn = t / 2**p in [1, 2) (_split_pow2): t * s
    # and (1 / t) / s would leave float32's normal range for a tensor scale
    # near either end of it.
    tn, p_down, p_up = _split_pow2(t)
    inv_t = (_div_scalar_data(np.float32(1.0), tn, emax_t) if from_x
             else _div(np.float32(1.0), tn))
    if from_x and not for_codes:
      # fake_quant: the tensor scale's scalars in one vector behind a barrier,
      # so that XLA computes them in one kernel (NVFP4's fake_quant went from
      # 8 kernels to 6 in a deviceless compile for the H200:
      # benchmarks/qat_step_programs.md). Without it XLA splits them into
      # sibling scalar fusions, one dependent launch each. quantize keeps
      # them apart: its tensor scale is an output, and a slice of the vector
      # would be one more kernel.
      packed = lax.optimization_barrier(jnp.stack([tn, p_down, p_up, inv_t, emax_t]))
      tn, p_down, p_up, inv_t, emax_t = (packed[i] for i in range(5))
    a_n = a * p_down
    # Block amaxes reduced from x (no static amax) divide without a barrier.
    bdiv = _div if amax is not None else _div_computed
    if spec.scale_dtype == "fp8_e4m3":
      # E4M3 block scales clamp at 448, so nothing beyond the tensor range
      # survives (only a static tensor_amax can lie below a block's amax).
      a_clip = jnp.minimum(a, emax_t)
      # One division by the rounded product: XLA's simplifier rewrites a
      # (a_n / 6) / tn into this where it sees tn (quantize) and not where
      # tn sits behind fake_quant's barrier, which gave the two programs
      # scales an E4M3 step apart on rare blocks.
      s_raw = jnp.clip(bdiv(a_n, np.float32(fmt.max) * tn), _E4M3.min_normal,
                       _E4M3.max)
      s_stored, s_val = _store_float_scale(s_raw, "fp8_e4m3")
    else:
      s_stored, s_val = _store_float_scale(
          jnp.where(pos, bdiv(a_n, np.float32(fmt.max) * tn), 1.0),
          spec.scale_dtype)
    s_stored, s_val = _mark_bad(s_stored, s_val, bad)
    mult = (lax.div(jnp.broadcast_to(inv_t, s_val.shape), s_val)
            if amax is None else _div(inv_t, s_val))
    mult, ts_val = _per_block(xf.size, mult), _per_block(xf.size, tn * s_val)
    # x * 2**-p first: exact, and no larger than the tensor range over tn.
    y = (xb * p_down) * jnp.expand_dims(mult, red)
    total = (ts_val, p_up)
  elif spec.scale_dtype == "e8m0":
    e = _e8m0_exponent(a, fmt, spec.scale_rounding)
    s_stored = jnp.where(bad, 255, e + _E8M0_BIAS).astype(jnp.uint8)
    # Two power-of-two factors each way (_pow2_pair): exact at e = +-127.
    i1, i2 = _pow2_pair(-e)
    t1, t2 = _pow2_pair(e)
    i1, i2, t1, t2 = (_per_block(xf.size, v) for v in (
        jnp.where(bad, jnp.nan, i1), i2, jnp.where(bad, jnp.nan, t1), t2))
    y = xb * jnp.expand_dims(i1, red) * jnp.expand_dims(i2, red)
    total = (t1, t2)
  else:
    # Scale 1 where the amax is 0 (the block is all zeros and codes 0); a grid
    # without 0 (binary) needs scale 0 there, or zeros would read back as +-1.
    has_zero = not isinstance(fmt, LookupFormat) or 0.0 in fmt.table
    zero_scale = 1.0 if has_zero else 0.0
    s = jnp.where(pos, _clamp_scale(_div(a, np.float32(fmt.max)), spec.scale_dtype),
                  zero_scale)
    s_stored, s_val = _store_float_scale(s, spec.scale_dtype)
    s_stored, s_val = _mark_bad(s_stored, s_val, bad)
    s_div, s_val = (_per_block(xf.size, v) for v in (
        jnp.where(s_val == 0, 1.0, s_val), s_val))
    y = _div_data(xb, jnp.expand_dims(s_div, red))
    if not has_zero:
      # An all-zero block (scale 0) reads back as zeros of x's sign: +0 picks
      # the grid's positive end (a tie between -1 and 1 would pick -1: -0).
      y = jnp.where(jnp.expand_dims(s_val == 0, red), jnp.copysign(1.0, xb), y)
    total = s_val

  y = _one_use(y.reshape(xf.shape))
  if method == "absmax" and spec.scale_dtype != "e8m0":
    # The scale maps [-a, a] onto the element range; only values beyond a (a
    # clip_ratio < 1 or a static amax) are clipped. Comparing |y| with the max
    # instead would flag the amax element itself whenever the rounded scale
    # makes a / s land an ulp above it.
    clipped = jnp.abs(xf) > _expand(a_clip, bs, xf.shape)
  else:
    # E8M0 scales are powers of two, so y is exact: elements beyond the max
    # saturate (OCP MX floor rounding can do that by design).
    clipped = jnp.abs(y) > np.float32(fmt.max)
  if isinstance(fmt, IntFormat):
    lim = fmt.qmax  # restricted symmetric range
    q = _cast._cast_int(y, fmt, True, noise, lo=-lim, hi=lim)
  elif isinstance(fmt, LookupFormat) and fmt.scale_method == "twn":
    thr = _expand(0.7 * _mean_abs(jnp.abs(xb), red, vb, bs, rebuild=abs_x), bs,
                  xf.shape)
    q = jnp.where(jnp.abs(xf) > thr, jnp.sign(xf), 0.0)
    # NaN where y is: the blocks holding a NaN or an inf (their scale is NaN;
    # elsewhere the scale is positive and finite, so x / s is never NaN).
    # Taken from the block flag, not from y, which XLA's GPU compiler wrote
    # out as a mask in a pass of its own (bf16 8192^2 ternary quantize for an
    # H200 target, experiments/gpu_fusion_survey.py: 979 -> 711 MB moved).
    q = jnp.where(_expand(bad, bs, xf.shape), jnp.nan, q)
  elif isinstance(fmt, LookupFormat):
    q = _cast._cast_lookup(y, fmt, noise)
  elif for_codes and noise is None and (_cast._native_dtype(fmt) is not None
                                        or _cast._rounds_by_thresholds(fmt)):
    # The codes round (encode_grid: a native float8 convert, or FP4's
    # comparisons with the grid's midpoints).
    q = jnp.clip(y, np.float32(-fmt.max), np.float32(fmt.max))
  else:
    q = _cast._cast_float(y, fmt, True, noise)
  return q, total, s_stored, None, tscale, clipped


def _grid_asym(x, xf, xb, red, vb, spec, bs, noise, amax, amin):
  fmt = spec.storage_format
  levels = float(fmt.qmax)
  # One pass gives the range and the bad-block flag: a NaN or an inf counts as
  # +inf for the max and -inf for the min, and only such blocks reach them.
  xn = _to_blocks(x if x.dtype in _NATIVE_REDUCE else xf, bs)
  if _CPU_AMAX_KEY and jax.default_backend() == "cpu":
    src_hi, src_lo = _range_keys(xn)
  else:
    fin = jnp.isfinite(xn)
    src_hi = jnp.where(fin, xn, np.inf)
    src_lo = jnp.where(fin, xn, -np.inf)
  if vb is not None:
    src_hi = jnp.where(vb, src_hi, -np.inf)
    src_lo = jnp.where(vb, src_lo, np.inf)
  d_hi = _block_reduce(src_hi, red, jnp.max).astype(jnp.float32)
  d_lo = _block_reduce(src_lo, red, jnp.min).astype(jnp.float32)
  blk_bad = (d_hi == np.float32(np.inf)) | (d_lo == np.float32(-np.inf))
  if amax is not None or amin is not None:
    if amax is None or amin is None:
      raise ValueError("asymmetric static ranges need both amin and amax")
    shp = tuple(d // b for d, b in zip(xf.shape, bs))
    hi = jnp.broadcast_to(jnp.asarray(amax, jnp.float32), shp)
    lo = jnp.broadcast_to(jnp.asarray(amin, jnp.float32), shp)
  else:
    hi, lo = d_hi, d_lo
  # A static range's own width, before 0 joins it: amin >= amax is no range
  # (the eager check refuses it; traced, it must not read as [0, amax]).
  raw_width = hi - lo
  # Whether the range is wider than 0, before clip_ratio: a clipped range of
  # normal numbers can be a float32 subnormal (flushed to 0 on CPU).
  pos = (hi > 0) | (lo < 0)
  hi = jnp.maximum(hi, 0.0) * np.float32(spec.clip_ratio)
  lo = jnp.minimum(lo, 0.0) * np.float32(spec.clip_ratio)
  rng = hi - lo
  s = _div(rng, np.float32(levels))
  # A range wider than the float32 maximum (hi and lo near +-3.4e38): halved
  # and doubled back, which rounds as rng / levels would (power-of-two
  # scaling is exact; a half of hi or lo small enough to be subnormal is
  # below the rounding of the other).
  s = jnp.where(rng == np.float32(np.inf),
                _div(hi * np.float32(0.5) - lo * np.float32(0.5), np.float32(levels))
                * np.float32(2.0), s)
  s = jnp.where(pos, _clamp_scale(s, spec.scale_dtype), 1.0)
  s_stored, s_val = _store_float_scale(s, spec.scale_dtype)
  bad = ~(jnp.isfinite(hi) & jnp.isfinite(lo)) | blk_bad  # NaN/inf: NaN scale
  if amax is not None:  # a traced static range of width 0 cannot hold nonzero data
    bad = bad | (((rng <= 0) | (raw_width <= 0)) & ((d_hi > 0) | (d_lo < 0)))
  s_stored, s_val = _mark_bad(s_stored, s_val, bad)
  zp = jnp.clip(jnp.round(_div(-lo, s_val)), 0, levels)
  zp = jnp.where(bad, 0.0, zp)
  s_val, zp = _per_block(xf.size, s_val), _per_block(xf.size, zp)
  y = _div_data(xb, jnp.expand_dims(s_val, red)) + jnp.expand_dims(zp, red)
  y = _one_use(y.reshape(xf.shape))
  clipped = (y < -0.5) | (y > levels + 0.5)
  q = _cast._cast_int(y, fmt, True, noise, lo=0, hi=int(levels))
  zp_dtype = jnp.uint8 if fmt.bits <= 8 else jnp.uint16
  return q, s_val, s_stored, zp.astype(zp_dtype), None, clipped


def _e8m0_round_scale(s: jax.Array, rounding: str) -> jax.Array:
  """Exponent (int32, in [-127, 127]) of a given positive scale rounded to a
  power of two: "floor" the largest power of two <= s, "ceil" the smallest
  >= s, "nearest" the nearer one in the log domain. Non-positive scales get
  the smallest code."""
  e, frac = _log2_parts(s)
  if rounding == "ceil":
    e = e + jnp.where(frac > 0, 1, 0)
  elif rounding == "nearest":
    sig = lax.bitcast_convert_type(frac | np.uint32(0x3F800000), jnp.float32)
    e = e + jnp.where(sig >= _f32_ceil(math.sqrt(2.0)), 1, 0)
  e = jnp.where(s > 0, e, -_E8M0_BIAS)
  return jnp.clip(e, -_E8M0_BIAS, _E8M0_BIAS)


def _grid_bounds(spec: QuantSpec) -> tuple:
  """(lowest, highest) grid element the scaled values are clipped to."""
  fmt = spec.element
  if not spec.symmetric:
    return 0.0, float(spec.storage_format.qmax)
  if isinstance(fmt, IntFormat):
    return -float(fmt.qmax), float(fmt.qmax)
  if isinstance(fmt, LookupFormat):
    return float(fmt.table[0]), float(fmt.table[-1])
  return -float(fmt.max), float(fmt.max)


def _grid_scaled(xf, xb, red, spec: QuantSpec, bs, noise, scale, zero_point,
                 tensor_scale=None):
  """``_grid`` with a given (learned) scale per block (LSQ / LSQ+).

  A two-level spec's float32 tensor scale is ``tensor_scale`` where given,
  else rebuilt from the largest block scale (``max(scale) / 448``).

  Returns ``_grid``'s tuple plus ``dxds``: the derivative of each output value
  with respect to its block's effective scale (Esser et al. 2019, eq. 3):
  ``round(v) - v`` inside the grid, the clip bound outside (v = x / scale, and
  ``- zero_point`` on both for asymmetric specs).
  """
  fmt = spec.element
  grid = tuple(d // b for d, b in zip(xf.shape, bs))
  s_in = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), grid)
  bad = ~jnp.isfinite(s_in) | jnp.any(~jnp.isfinite(xb), axis=red)
  tscale = None
  zp = None
  lo_b, hi_b = _grid_bounds(spec)
  if not spec.symmetric:
    s_stored, s_val = _store_float_scale(s_in, spec.scale_dtype)
    s_stored, s_val = _mark_bad(s_stored, s_val, bad)
    s_safe = jnp.where(s_val == 0, 1.0, s_val)
    if zero_point is None:
      lo = jnp.minimum(jnp.min(xb, axis=red), 0.0)
      zp = jnp.clip(jnp.round(_div(-lo, s_safe)), lo_b, hi_b)
    else:
      zp = jnp.clip(jnp.round(jnp.broadcast_to(
          jnp.asarray(zero_point, jnp.float32), grid)), lo_b, hi_b)
    zp = jnp.where(bad, 0.0, zp)
    total = s_val
    y = _div(xb, jnp.expand_dims(s_safe, red)) + jnp.expand_dims(zp, red)
  elif spec.tensor_scale:
    smax = _E4M3.max if spec.scale_dtype == "fp8_e4m3" else 1.0
    if tensor_scale is not None:
      t = jnp.asarray(tensor_scale, jnp.float32)
    else:
      s_fin = jnp.where(bad, 0.0, s_in)
      s_top = jnp.max(s_fin)
      t = _clamp_scale(_div(s_top, np.float32(smax)), "float32")
      t = jnp.where(s_top > 0, t, np.float32(1.0))
    tscale = t
    # On tn = t / 2**p, as in _grid: t * s and 1 / (t * s) stay normal.
    tn, p_down, p_up = _split_pow2(t)
    s_raw = _div(s_in * p_down, tn)
    if spec.scale_dtype == "fp8_e4m3":
      s_raw = jnp.clip(s_raw, _E4M3.min_normal, _E4M3.max)
    s_stored, s_val = _store_float_scale(s_raw, spec.scale_dtype)
    s_stored, s_val = _mark_bad(s_stored, s_val, bad)
    mult = _div(_div(np.float32(1.0), tn), jnp.where(s_val == 0, 1.0, s_val))
    mult, ts_val = _per_block(xf.size, mult), _per_block(xf.size, tn * s_val)
    total = (ts_val, p_up)
    y = (xb * p_down) * jnp.expand_dims(mult, red)
  elif spec.scale_dtype == "e8m0":
    e = _e8m0_round_scale(s_in, spec.scale_rounding)
    s_stored = jnp.where(bad, 255, e + _E8M0_BIAS).astype(jnp.uint8)
    # Two power-of-two factors each way, as in _grid: exact at e = +-127.
    t1, t2 = _pow2_pair(e)
    i1, i2 = _pow2_pair(-e)
    i1, i2, t1, t2 = (_per_block(xf.size, v) for v in (
        jnp.where(bad, jnp.nan, i1), i2, jnp.where(bad, jnp.nan, t1), t2))
    total = (t1, t2)
    y = xb * jnp.expand_dims(i1, red) * jnp.expand_dims(i2, red)
  else:
    s_stored, s_val = _store_float_scale(s_in, spec.scale_dtype)
    s_stored, s_val = _mark_bad(s_stored, s_val, bad)
    total = s_val
    y = _div(xb, jnp.expand_dims(jnp.where(s_val == 0, 1.0, s_val), red))
  y = _one_use(y.reshape(xf.shape))
  # The clip region is closed, as in LSQ (v <= -Qn, v >= Qp) and PACT.
  clipped = (y <= lo_b) | (y >= hi_b)
  if not spec.symmetric:
    q = _cast._cast_int(y, spec.storage_format, True, noise, lo=int(lo_b),
                        hi=int(hi_b))
  elif isinstance(fmt, IntFormat):
    q = _cast._cast_int(y, fmt, True, noise, lo=int(lo_b), hi=int(hi_b))
  elif isinstance(fmt, LookupFormat):
    q = _cast._cast_lookup(y, fmt, noise)
  else:
    q = _cast._cast_float(y, fmt, True, noise)
  if zp is None:
    dxds = q - jnp.where(clipped, 0.0, y)
  else:
    zpe = _expand(zp, bs, xf.shape)
    dxds = (q - zpe) - jnp.where(clipped, 0.0, y - zpe)
  zp_out = None
  if zp is not None:
    zp_out = zp.astype(jnp.uint8 if spec.storage_format.bits <= 8 else jnp.uint16)
  return q, total, s_stored, zp_out, tscale, clipped, dxds


def _pact_mask(xf, alpha_full, symmetric: bool):
  """Where PACT (Choi et al. 2018) clips: |x| >= alpha, or (unsigned range
  [0, alpha]) x < 0 or x >= alpha."""
  if symmetric:
    return jnp.abs(xf) >= alpha_full
  return (xf < 0) | (xf >= alpha_full)


def _grid_any(xp, spec, bs, valid, key, amax, amin, tensor_amax, scale, zero_point,
              clip, for_codes=False, tensor_scale=None):
  """``_grid`` for every keyword: (q, total, stored scale, zero point, tensor
  scale, clipped mask, dxds or None)."""
  if scale is not None:
    noise = _noise_for(spec, key, xp.shape)
    xf = _f32_of(xp)
    return _grid_scaled(xf, _to_blocks(xf, bs), _red_axes(xf.ndim), spec, bs, noise,
                        scale, zero_point, tensor_scale)
  if clip is not None:
    grid = tuple(d // b for d, b in zip(xp.shape, bs))
    alpha = jnp.broadcast_to(jnp.asarray(clip, jnp.float32), grid)
    a_full = _expand(alpha, bs, xp.shape)
    xf = _f32_of(xp)
    lo = -a_full if spec.symmetric else 0.0
    xc = jnp.clip(xf, lo, a_full)
    out = _grid(xc, spec, bs, valid, key, alpha,
                None if spec.symmetric else jnp.zeros_like(alpha))
    return out[:5] + (_pact_mask(xf, a_full, spec.symmetric), None)
  return _grid(xp, spec, bs, valid, key, amax, amin, tensor_amax,
               for_codes=for_codes) + (None,)


def _noise_for(spec: QuantSpec, key, shape):
  if spec.rounding == "stochastic":
    if key is None:
      raise ValueError("this spec rounds stochastically: pass key=jax.random.key(...)")
    return _cast.random_bits(key, shape)
  if key is not None:
    raise ValueError("a key was given but the spec rounds to nearest; use "
                     "QuantSpec(..., rounding='stochastic') to use it")
  return None


def _values(q, total, zp, bs, shape, clip=True):
  """Dequantized float32 values from grid elements and per-block scales.

  ``total`` is a float32 array, or a pair of them (E8M0 scales as two
  power-of-two factors, ``_pow2_pair``) applied one after the other.
  ``clip=False`` leaves out the saturation, for callers that know no value
  can overflow (``_dequantize_cannot_overflow``).
  """
  if zp is not None:
    q = q - _expand(zp.astype(jnp.float32), bs, shape)
  if isinstance(total, tuple):
    out = q * _expand(total[0], bs, shape) * _expand(total[1], bs, shape)
  else:
    out = q * _expand(total, bs, shape)
  if not clip:
    return out
  # A range within an ulp of the float32 maximum (scale = amax / max rounded
  # up) can put the largest grid value a rounding beyond it: saturate there
  # instead of returning inf for finite data. NaN stays NaN.
  return jnp.clip(out, -_F32_MAX, _F32_MAX)


# ---------------------------------------------------------------------------
# The one-pass GPU kernel (lowbit_jax.kernels.gpu_quantize)


def _kernel_ok(x, spec: QuantSpec, values: bool, grad: bool = False, **kw) -> bool:
  """Whether the one-pass Mosaic GPU quantizer takes this call (GPU backend,
  a format its ``ENABLED`` lists, default keywords; ``gpu_quantize.dispatch``).
  The jnp path below stays the reference and runs everywhere else."""
  try:
    if jax.default_backend() != "gpu":
      return False
  except RuntimeError:
    return False
  from lowbit_jax.kernels import gpu_quantize  # pylint: disable=g-import-not-at-top
  return gpu_quantize.dispatch(x, spec, values=values, grad=grad, **kw)


# ---------------------------------------------------------------------------
# Public API


def check_static_range(amax, amin=None, tensor_amax=None, *, symmetric=True,
                       where: str = "") -> None:
  """Refuses a static range that cannot give a scale (concrete values only).

  A range of zero or below (what an observer returns for a layer that saw no
  data, or only zeros, NaN or inf) would silently fall back to a scale of 1.
  Traced values (inside jit) are not checked here: the quantizer turns every
  block whose static range is 0 or below (or NaN) while it holds nonzero data
  into NaN, and the rules add a ``checkify`` check naming the layer (see
  docs/formats.md, "NaN and inf").

  Raises:
    ValueError: some ``amax`` (or ``tensor_amax``, or ``amax - amin`` for an
      asymmetric range) entry is not a positive finite number.
  """
  checks = [("tensor_amax", tensor_amax)]
  if symmetric or amin is None:
    checks.append(("amax", amax))
  elif not isinstance(amax, jax.core.Tracer) and not isinstance(amin, jax.core.Tracer):
    try:
      checks.append(("amax - amin", np.asarray(amax, np.float64) - np.asarray(
          amin, np.float64)))
    except ValueError:
      pass  # shapes that do not broadcast: _check_range_shapes names them
  for name, v in checks:
    if v is None or isinstance(v, jax.core.Tracer):
      continue
    a = np.asarray(v, np.float64)
    bad = ~(np.isfinite(a) & (a > 0))
    if bad.any():
      raise ValueError(
          f"{where}{name} must be positive and finite; {int(bad.sum())} of {a.size} "
          f"entries are not (e.g. {a[bad].ravel()[0]!r}): a calibrated range of 0 "
          "or below means the observer saw no data, or only zeros, NaN or inf. "
          "Calibrate on batches that reach this tensor, or leave it dynamic")


def _check_tensor_amax(spec: QuantSpec, amax, tensor_amax, amin=None) -> None:
  check_static_range(amax, amin, tensor_amax, symmetric=spec.symmetric)
  if tensor_amax is None:
    return
  if not spec.tensor_scale:
    raise ValueError(f"tensor_amax sets the per-tensor scale of a two-level block "
                     f"format (NVFP4); {spec.format.name!r} has none. Pass amax= "
                     "for a static range instead")
  if jnp.ndim(tensor_amax) != 0:
    raise ValueError(f"tensor_amax must be a scalar, got shape "
                     f"{jnp.shape(tensor_amax)}")


def scale_shape(shape, spec=None, **spec_kwargs) -> tuple:
  """The shape of the scale grid ``quantize`` stores for an array of ``shape``.

  One entry per block along every dim: ``w[K, N]`` with ``axis=0`` (per output
  channel) gives ``(1, N)``; ``group_size=g`` along axis 0 gives ``(K // g, N)``;
  ``tile=(a, b)`` gives ``(K // a, N // b)``; per-tensor (``axis="tensor"`` or
  unset) gives all ones, ``(1, 1)``. A padded axis (``pad=True``) counts its
  last partial block. This is the shape ``fake_quant``'s ``scale``, ``clip`` and
  ``zero_point`` take (any shape that broadcasts to it is accepted too, e.g.
  ``()`` for per-tensor or ``(N,)`` for per-channel).

  Args:
    shape: the array's shape.
    spec: a QuantSpec, or a format name with QuantSpec keywords.

  Returns:
    A tuple of ints, one per dim of ``shape``.

  Raises:
    ValueError: the spec needs an axis (block formats, group sizes) it lacks.
  """
  spec = as_spec(spec, **spec_kwargs)
  shape = tuple(int(d) for d in shape)
  if not shape:
    raise ValueError("quantize() needs at least a 1-d array; reshape the scalar")
  if spec.axis is None and spec.tile is None and (
      isinstance(spec.format, BlockFormat) or spec.group_size is not None):
    raise ValueError(f"{spec.format.name!r} with blocks of {spec.group_size} needs "
                     "the axis they run along, e.g. axis=-1")
  ax = normalize_axis(spec.axis, len(shape))
  if ax is not None and ax != spec.axis:
    spec = spec.replace(axis=ax)
  bs = block_shape(spec, shape)
  # (an empty axis whole in one block, e.g. a per-tensor scale of an empty
  # batch, is one block of size 0)
  return tuple(-(-d // b) if b else 1 for d, b in zip(shape, bs))


def _check_range_shapes(spec: QuantSpec, x_shape, amax, amin) -> None:
  """A static amax/amin must broadcast to the scale grid (one per block)."""
  if amax is None and amin is None:
    return
  try:
    grid = scale_shape(x_shape, spec)
  except (ValueError, ZeroDivisionError):
    return  # the spec does not fit x: _prepare says why
  for name, v in (("amax", amax), ("amin", amin)):
    if v is None:
      continue
    shp = tuple(jnp.shape(v))
    try:
      ok = jnp.broadcast_shapes(shp, grid) == grid
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"{name} has shape {shp}, which does not broadcast to the scale "
                       f"grid {grid} of an array of shape {tuple(x_shape)} under this "
                       f"spec (one range per block); pass {name} of shape {grid}, or a "
                       "scalar for one range everywhere")


def _check_empty(x, what: str) -> None:
  if x.size == 0:
    raise ValueError(f"{what}() got an empty array of shape {tuple(x.shape)}: a "
                     "QArray needs at least one element per block; skip empty "
                     "inputs (fake_quant and the quantized ops return them as is)")


def _check_learned(spec: QuantSpec, x_shape, amax, amin, tensor_amax, scale,
                   zero_point, clip, tensor_scale=None):
  """Validates the learned-range keywords; returns (scale, zero_point, clip,
  tensor_scale) as float32 arrays (or None)."""
  tensor_scale = _check_tensor_scale(spec, scale, tensor_scale)
  if scale is not None and (amax is not None or amin is not None
                            or tensor_amax is not None or clip is not None):
    raise ValueError("scale sets the quantization step directly; it cannot be "
                     "combined with amax, amin, tensor_amax or clip (drop those, or "
                     "drop scale)")
  if clip is not None and (amax is not None or amin is not None
                           or tensor_amax is not None):
    raise ValueError("clip (PACT) is the range itself; do not also pass amax, "
                     "amin or tensor_amax")
  if zero_point is not None:
    if scale is None:
      raise ValueError("zero_point (LSQ+) is learned together with scale; pass "
                       "scale= too")
    if spec.symmetric:
      raise ValueError(f"zero_point needs an asymmetric spec; {spec.format.name!r} "
                       "here is symmetric (use e.g. 'uint8' or symmetric=False)")
  if scale is None and clip is None:
    _check_range_shapes(spec, x_shape, amax, amin)
    return None, None, None, None
  grid = scale_shape(x_shape, spec)
  out = []
  for name, v in (("scale", scale), ("zero_point", zero_point), ("clip", clip)):
    if v is None:
      out.append(None)
      continue
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
      v = v.astype(jnp.float32)
    try:
      ok = jnp.broadcast_shapes(v.shape, grid) == grid
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"{name} has shape {v.shape}, which does not broadcast to "
                       f"the scale grid {grid} of an array of shape "
                       f"{tuple(x_shape)} under this spec; pass an array of shape "
                       f"{grid} (lowbit_jax.scale_shape(x.shape, spec))")
    out.append(v)
  return tuple(out) + (tensor_scale,)


def _check_tensor_scale(spec: QuantSpec, scale, tensor_scale):
  """Validates ``tensor_scale=`` (with ``scale=``, two-level specs, a positive
  finite scalar where concrete); returns it as a float32 array, or None."""
  if tensor_scale is None:
    return None
  if not spec.tensor_scale:
    raise ValueError(f"tensor_scale fixes the per-tensor scale of a two-level block "
                     f"format (NVFP4); {spec.format.name!r} has none: drop it")
  if scale is None:
    raise ValueError("tensor_scale fixes the tensor scale under given block scales: "
                     "pass scale= with it (for a static tensor range over dynamic "
                     "block scales, pass tensor_amax= instead)")
  t = jnp.asarray(tensor_scale)
  if t.ndim != 0:
    raise ValueError(f"tensor_scale must be a scalar, got shape {t.shape}")
  if not jnp.issubdtype(t.dtype, jnp.floating):
    t = t.astype(jnp.float32)
  if not isinstance(t, jax.core.Tracer):
    v = float(t)
    if not (np.isfinite(v) and v >= np.finfo(np.float32).tiny):
      raise ValueError(f"tensor_scale must be a positive finite float32 normal "
                       f"number, got {v!r}; pass the tensor scale the block scales "
                       "were chosen under (QArray.tensor_scale, algorithms.rtn_scales)")
  return t.astype(jnp.float32)


def quantize(x: jax.Array, spec=None, *, key: Optional[jax.Array] = None,
             amax: Optional[jax.Array] = None, amin: Optional[jax.Array] = None,
             tensor_amax: Optional[jax.Array] = None,
             scale: Optional[jax.Array] = None, clip: Optional[jax.Array] = None,
             zero_point: Optional[jax.Array] = None,
             tensor_scale: Optional[jax.Array] = None, **spec_kwargs) -> QArray:
  """Quantizes ``x`` to a packed QArray.

  Args:
    x: float array.
    spec: a QuantSpec, or a format name with QuantSpec keywords in
      ``spec_kwargs`` (``quantize(x, "int4", axis=-1, group_size=128)``).
    key: PRNG key, needed by stochastic rounding.
    amax: a static range (from calibration) instead of the data's: a scalar or
      one value per block (broadcastable to the scale shape).
    amin: the static minimum, with amax, for asymmetric specs.
    tensor_amax: for formats with a tensor scale (NVFP4), a static per-tensor
      range: it fixes the float32 tensor scale while every block's E4M3 scale
      still comes from the block's own amax (the two-level recipe: static
      global scale from calibration, dynamic block scales). A scalar. Under
      ``shard_map`` it also makes shards agree, e.g.
      ``tensor_amax=lax.pmax(jnp.max(jnp.abs(x)), "data")``. With ``amax``
      too, the blocks take those static ranges under this tensor range
      (without it: under the largest ``amax``), as GPTQ rounds a two-level
      spec (``GPTQResult.tensor_amax``).
    scale: an explicit (e.g. learned, LSQ) scale per block, shaped like
      ``scale_shape(x.shape, spec)`` or broadcastable to it; stored rounded to
      the spec's scale dtype (see ``fake_quant``).
    clip: a PACT clipping level per block (see ``fake_quant``).
    zero_point: with ``scale``, an asymmetric spec's zero point (rounded to the
      grid, see ``fake_quant``).
    tensor_scale: with ``scale``, for formats with a tensor scale (NVFP4): the
      float32 tensor scale itself (a positive scalar, as ``QArray.tensor_scale``
      holds it), under which each block's ``scale`` is stored as
      ``e4m3(scale / tensor_scale)``. Without it the tensor scale is rebuilt
      as ``max(scale) / 448``, which for a scale grid another quantizer chose
      under its own tensor scale (GPTQ, whose blocks may miss the top E4M3
      code) can differ from it, so the stored codes would not reproduce that
      quantizer's values; PTQ results carry it (``algorithms.rtn_scales``).

  Returns:
    QArray whose ``dequantize()`` equals ``fake_quant(x, spec)`` called with
    the same keywords.

  Raises:
    ValueError: the spec does not fit x (axis not a multiple of the block size
      without pad=True, a block format without an axis, ...), or the range
      keywords conflict or have the wrong shape.
  """
  spec = as_spec(spec, **spec_kwargs)
  x = jnp.asarray(x)
  key = _as_key(key)
  _check_tensor_amax(spec, amax, tensor_amax, amin)
  _check_empty(x, "quantize")
  # Validated before a kernel can take the call (it takes none of them).
  scale, zero_point, clip, tensor_scale = _check_learned(
      spec, x.shape, amax, amin, tensor_amax, scale, zero_point, clip, tensor_scale)
  if _kernel_ok(x, spec, False, key=key, amax=amax, amin=amin,
                tensor_amax=tensor_amax, scale=scale, clip=clip,
                zero_point=zero_point):
    from lowbit_jax.kernels import gpu_quantize  # pylint: disable=g-import-not-at-top
    return gpu_quantize.quantize(x, spec, tensor_amax=tensor_amax)
  # One jit per (spec, shape): run eagerly, the dozens of small ops would each
  # compile on first use (seconds for a new shape); inside a trace it inlines.
  return _quantize_jit(x, spec, key, amax, amin, tensor_amax, scale, zero_point,
                       clip, tensor_scale)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_jit(x, spec, key, amax, amin, tensor_amax, scale=None, zero_point=None,
                  clip=None, tensor_scale=None):
  shape, dtype = tuple(x.shape), x.dtype
  xp, spec, bs, valid, pa = _prepare(x, spec)
  q, total, s_stored, zp, tscale, _, _ = _grid_any(
      xp, spec, bs, valid, key, amax, amin, tensor_amax, scale, zero_point, clip,
      for_codes=True, tensor_scale=tensor_scale)
  del total
  fmt = spec.storage_format
  codes = _cast.encode_grid(q, fmt)
  n_codes, _ = pack_unit(fmt.bits)
  extra = (-codes.shape[pa]) % n_codes
  if extra:
    widths = [(0, 0)] * codes.ndim
    widths[pa] = (0, extra)
    codes = jnp.pad(codes, widths)
  packed = pack(codes, fmt, pa)
  return QArray(codes=packed, scale=s_stored, zero_point=zp,
                tensor_scale=tscale, spec=spec, shape=shape, dtype=str(dtype),
                pack_axis=pa)


def dequantize(q: QArray) -> jax.Array:
  """The float array a QArray stands for (dtype and shape of the original)."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize() takes a QArray, got {type(q).__name__}")
  _check_arrays(q)
  return _dequantize_jit(q)


@functools.lru_cache(maxsize=1024)
def expected_fields(spec: QuantSpec, shape: tuple, dtype: str) -> QArray:
  """The abstract QArray ``quantize`` makes of a ``shape`` / ``dtype`` array
  (one trace per spec and shape): the shapes and dtypes its fields must have.
  (Rounding does not change them: a stochastic spec is traced as nearest.)"""
  if spec.rounding != "nearest":
    spec = spec.replace(rounding="nearest")
  return jax.eval_shape(lambda x: quantize(x, spec), jax.ShapeDtypeStruct(shape, dtype))


@functools.lru_cache(maxsize=1024)
def _expected_or_none(spec: QuantSpec, shape: tuple, dtype: str) -> Optional[QArray]:
  """``expected_fields``, or None for a spec and shape quantize does not make
  (cached too: an eager loop does not trace it again every call)."""
  try:
    return expected_fields(spec, shape, dtype)
  except Exception:   # pylint: disable=broad-except
    return None


def _check_arrays(q: QArray) -> None:
  """Refuses a QArray whose arrays are not those ``quantize`` makes for its
  recorded spec, shape and dtype, which dequantize would read silently
  wrong: codes of another rank (built under ``jax.vmap`` or stacked, or a
  stack quantized whole and then mapped over), of another shape (a
  ``shard_map`` output records its per-shard shape), or fields of another
  dtype (a ``tree.map`` cast of the parameters reached the codes or scales)."""
  nd = jnp.ndim(q.codes)
  if nd > len(q.shape):
    raise ValueError(
        f"this QArray records shape {tuple(q.shape)} but its codes have "
        f"{nd} dims ({tuple(jnp.shape(q.codes))}): it was made "
        "under jax.vmap (or its arrays were stacked), so its static shape is "
        "that of one example. Dequantize it under the same vmap "
        "(jax.vmap(lowbit_jax.dequantize)(q)) or a lax.scan over that axis, or "
        "quantize the stacked array in one call")
  if nd < len(q.shape):
    raise ValueError(
        f"this QArray records shape {tuple(q.shape)} but its codes have "
        f"{nd} dims ({tuple(jnp.shape(q.codes))}): a jax.vmap or lax.scan maps "
        "over a QArray quantized as one stacked array, whose static shape is the "
        "whole stack. To map over layers, quantize each one under the same map: "
        "jax.vmap(lambda w: lowbit_jax.quantize(w, spec))(stacked)")
  want = _expected_or_none(q.spec, tuple(q.shape), str(jnp.dtype(q.dtype)))
  if want is None:
    return   # a spec and shape quantize does not make: nothing to compare with
  for f in FIELDS:
    w, g = getattr(want, f), getattr(q, f)
    if w is None or g is None:
      continue
    # Smaller arrays are a shard of it (inside shard_map, which hands the body
    # the global QArray's local blocks; dequantize reads the arrays' own
    # extent); larger ones are arrays the record does not describe.
    if any(a > b for a, b in zip(jnp.shape(g), w.shape)):
      raise ValueError(
          f"this QArray records a {tuple(q.shape)} array, whose {f} quantize "
          f"makes {tuple(w.shape)}, but it holds {f} of shape "
          f"{tuple(jnp.shape(g))}: its recorded shape is not its arrays' (a "
          "shard_map or a pytree map changed the arrays but not the QArray's "
          "static shape). Dequantize it inside the same shard_map, or quantize "
          "the full array outside it")
    if jnp.result_type(g) != jnp.dtype(w.dtype):
      raise ValueError(
          f"this QArray's {f} are {jnp.result_type(g)}, not the "
          f"{jnp.dtype(w.dtype)} its spec {q.spec.format} stores: a cast of the "
          "parameter tree (jax.tree.map(lambda a: a.astype(...), params)) reached "
          "the QArray and would decode its codes as values. Leave QArrays out of "
          "the cast: jax.tree.map(f, params, is_leaf=lambda x: isinstance(x, "
          "lowbit_jax.QArray)) with f returning a QArray unchanged")


def _dequant_kernel(q: QArray):
  """The Mosaic GPU dequantizer module where it takes this call (GPU backend,
  a format its ``ENABLED`` lists; ``gpu_dequantize.dispatch``), else None (the
  kernels are not imported off the GPU). The jnp path stays the reference
  and runs everywhere else."""
  try:
    if jax.default_backend() != "gpu":
      return None
  except RuntimeError:
    return None
  from lowbit_jax.kernels import gpu_dequantize  # pylint: disable=g-import-not-at-top
  return gpu_dequantize if gpu_dequantize.dispatch(q) else None


@jax.jit
def _dequantize_jit(q: QArray) -> jax.Array:
  return dequantize_as(q, q.dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_as(q: QArray, dtype) -> jax.Array:
  """``dequantize(q).astype(dtype)`` (what the real-mode matmul asks for):
  where the GPU dequantizer takes ``q``, one kernel writes ``dtype`` directly
  (no float32 array written and converted for a float32-weight QArray in a
  bf16 model); elsewhere the jnp path, whose cast XLA fuses. Either way a
  wider ``dtype`` holds ``q.dtype``'s values (a bf16 QArray as float32 holds
  bf16 values): the jnp path widens with ``_cast.astype_holding``, since XLA
  on a GPU drops the float32 -> bf16 -> float32 convert pair."""
  _check_arrays(q)
  kernel = _dequant_kernel(q)
  if kernel is not None:
    return kernel.dequantize(q, dtype=dtype)
  return _cast.astype_holding(dequantize_jnp(q), dtype)


# On CPU, dequantize of a float32 QArray (a 16-bit one never clips:
# ``_DEQUANT_16BIT_NO_CLIP``) leaves out its saturating clip where no value
# can reach the float32 range (``_dequantize_cannot_overflow``, a check on
# the per-block scales): the clip's two extra operations per element cost XLA's CPU loop
# 1.05-1.12x for the integer formats in a first run (bf16 2048x2048, the two
# variants interleaved in one process, same bits), and 0.93-1.14x, within the
# noise, on a second host (benchmarks/cpu_dequant_clip.md). A ``lax.cond`` picks the program, so
# both are compiled: only from ``_DEQUANT_SKIP_CLIP_MIN_ELEMENTS`` elements on
# (the MiniLM sweep's weights, below it, are compile-bound). On GPU and TPU the
# predicate would be a device-to-host copy, so the clip stays. Not for E8M0
# scales or a tensor scale (MX, NVFP4): with their two factors the
# conditional's programs were 1.1-1.25x slower than the clip in the same
# comparison.
_DEQUANT_SKIP_CLIP = True
_DEQUANT_SKIP_CLIP_MIN_ELEMENTS = 1 << 22


def _max_abs_element(fmt) -> Optional[float]:
  """The largest finite |value| a format's codes decode to, None where some
  code decodes to inf (the clip would turn it into the float32 maximum: the
  fast path is off). NaN codes stay NaN with or without the clip."""
  if isinstance(fmt, FloatFormat) and np.isinf(fmt.decode_table()).any():
    return None
  return float(np.max(np.abs(fmt.values())))


def _dequantize_cannot_overflow(q: QArray, total, emax: float) -> jax.Array:
  """True where every ``(code - zp) * total`` is finite (``total``: one
  per-block scale array): the same product of the largest |code - zp| and the
  largest scale, in float32, is finite (rounding is monotone, so no element's
  product exceeds it). A NaN or inf scale makes it False."""
  b = jnp.float32(emax)
  if q.zero_point is not None:
    b = b + jnp.max(jnp.abs(q.zero_point.astype(jnp.float32)))
  return jnp.isfinite(b * jnp.max(jnp.abs(total)))


# A QArray of 16-bit floats dequantizes without the saturating clip on every
# backend: its values leave through a 16-bit convert, which takes the float32
# maximum the clip saturates at to inf (it lies past the last 16-bit float's
# rounding midpoint) just as it takes inf, so the clip cannot change a bit;
# without it there is no lax.cond either (``_DEQUANT_SKIP_CLIP``'s, about 5%
# of a bf16 [2048, 2048] integer dequantize on CPU).
_DEQUANT_16BIT_NO_CLIP = True


def _is_16bit_float(dtype) -> bool:
  """Whether ``dtype`` is bf16 or f16: their convert from float32 takes the
  float32 maximum to inf as it takes inf, so a saturating clip before it
  cannot change a bit (``_DEQUANT_16BIT_NO_CLIP``, ``_FQ_16BIT_NO_CLIP``)."""
  dt = jnp.dtype(dtype)
  return dt.itemsize == 2 and jnp.issubdtype(dt, jnp.floating)


def dequantize_jnp(q: QArray) -> jax.Array:
  """``dequantize``'s jnp path (the reference the GPU kernel is checked
  against; what runs on CPU and TPU)."""
  if _DEQUANT_16BIT_NO_CLIP and _is_16bit_float(q.dtype):
    return _dequantize_jnp(q, _dequant_totals(q), False)
  # One scale factor per block (not E8M0's pair, not under a tensor scale).
  emax = (_max_abs_element(q.spec.storage_format)
          if (_DEQUANT_SKIP_CLIP and jax.default_backend() == "cpu"
              and _n_elements(q) >= max(1, _DEQUANT_SKIP_CLIP_MIN_ELEMENTS)
              and q.spec.scale_dtype != "e8m0" and q.tensor_scale is None)
          else None)
  total = _dequant_totals(q)
  if emax is None:
    return _dequantize_jnp(q, total, True)
  # The per-block factors are computed once and handed to both programs.
  return lax.cond(_dequantize_cannot_overflow(q, total, emax),
                  lambda qq, t: _dequantize_jnp(qq, t, False),
                  lambda qq, t: _dequantize_jnp(qq, t, True), q, total)


def _n_elements(q: QArray) -> int:
  """Elements the codes hold (padding included)."""
  n_codes, unit = codes_unit(q.spec.storage_format.bits)
  return q.codes.size // unit * n_codes


def _e8m0_factors(stored: jax.Array):
  """E8M0 scale codes as two float32 powers of two whose product is the scale
  (``_pow2_pair``: exact at +-127), the NaN code 255 as NaN in the first."""
  code = stored.astype(jnp.int32)
  t1, t2 = _pow2_pair(code - _E8M0_BIAS)
  return jnp.where(code == 255, jnp.float32(jnp.nan), t1), t2


def _dequant_totals(q: QArray):
  """``total``: the per-block factors ``_values`` applies (E8M0 as a pair of
  powers of two, a tensor scale folded in as ``_grid`` applies it)."""
  spec = q.spec
  n = _n_elements(q)
  if spec.scale_dtype == "e8m0":
    t1, t2 = _e8m0_factors(q.scale)
    if q.tensor_scale is not None:
      t1 = q.tensor_scale * t1
    return _per_block(n, t1), _per_block(n, t2)
  total = _scale_value(q.scale, spec.scale_dtype)
  if q.tensor_scale is not None:
    tn, _, p_up = _split_pow2(q.tensor_scale)  # as _grid applies it
    return (_per_block(n, tn * total), p_up)
  if q.scale.dtype != jnp.float32:
    # A stored scale other than float32 (an FP8 or half-precision one)
    # converts once per block.
    return _per_block(n, total)
  return total


def _dequantize_jnp(q: QArray, total, clip: bool) -> jax.Array:
  spec = q.spec
  fmt = spec.storage_format
  codes = unpack(q.natural_codes(), fmt, q.pack_axis)
  vals = _cast.decode(codes, fmt)
  # Drop code padding along the pack axis (to the scale grid's extent).
  n_blocks = q.scale.shape
  full = list(vals.shape)
  if q.scale.ndim == vals.ndim:
    bs_guess = block_shape(spec, q.shape)
    target = [max(n * b, 1) if n > 1 else (q.shape[i] if i == q.pack_axis else full[i])
              for i, (n, b) in enumerate(zip(n_blocks, bs_guess))]
    target = [min(t, f) if i != q.pack_axis else
              (n_blocks[i] * bs_guess[i] if n_blocks[i] > 1 else min(q.shape[i], f))
              for i, (t, f) in enumerate(zip(target, full))]
    vals = vals[tuple(slice(0, t) for t in target)]
  shape = vals.shape
  bs = _local_block_shape(q.scale.shape, shape)
  out = _values(vals, total, q.zero_point, bs, shape, clip=clip)
  out = out[tuple(slice(0, min(d, s)) for d, s in zip(q.shape, shape))]
  return out.astype(q.dtype)


# fake_quant of a 16-bit array leaves out ``_values``' saturating clip for
# the same reason a 16-bit QArray's dequantize does (``_DEQUANT_16BIT_NO_CLIP``):
# the result leaves through a convert to bf16 / f16, which takes the float32
# maximum the clip saturates at to inf just as it takes inf, so the clip
# cannot change a bit of the output.
_FQ_16BIT_NO_CLIP = True


def _fq_clip(dtype) -> bool:
  """Whether fake_quant's values need the saturating clip for ``dtype``."""
  return not (_FQ_16BIT_NO_CLIP and _is_16bit_float(dtype))


def _fake_quant_impl(x, spec, key, amax, amin, tensor_amax):
  shape, dtype = x.shape, x.dtype
  xp, spec, bs, valid, _ = _prepare(x, spec)
  q, total, _, zp, _, clipped = _grid(xp, spec, bs, valid, key, amax, amin,
                                      tensor_amax)
  out = _values(q, total, zp, bs, xp.shape, clip=_fq_clip(dtype))
  sl = tuple(slice(0, d) for d in shape)
  return out[sl].astype(dtype), clipped[sl]


def _fake_quant_kernel(x, spec, key, amax, amin, tensor_amax):
  """The forward value from the one-pass GPU kernel, or None where it does
  not apply (the gradient rules below are unchanged either way)."""
  if not _kernel_ok(x, spec, True, key=key, amax=amax, amin=amin,
                    tensor_amax=tensor_amax):
    return None
  from lowbit_jax.kernels import gpu_quantize  # pylint: disable=g-import-not-at-top
  return gpu_quantize.fake_quant_forward(x, spec, tensor_amax=tensor_amax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quant(x, spec, key, amax, amin, tensor_amax):
  y = _fake_quant_kernel(x, spec, key, amax, amin, tensor_amax)
  if y is not None:
    return y
  return _fake_quant_impl(x, spec, key, amax, amin, tensor_amax)[0]


def _never_clips(spec: QuantSpec, amax, tensor_amax) -> bool:
  """Whether ``spec`` with these ranges statically clips nothing.

  A symmetric per-block absmax range taken from the data itself (no static
  ``amax``, ``clip_ratio >= 1``) holds every element of its block, so the
  straight-through gradient is the identity and no clip mask needs saving
  for the backward pass (one byte per element written and read back). E8M0
  scales (their floor rounding can saturate a block's largest elements) and
  two-level formats (an inf clips against the tensor range) keep the mask.
  """
  fmt = spec.element
  method = fmt.scale_method if isinstance(fmt, LookupFormat) else "absmax"
  return (amax is None and tensor_amax is None and spec.symmetric
          and method == "absmax" and not spec.tensor_scale
          and spec.scale_dtype != "e8m0" and spec.clip_ratio >= 1.0)


def _fq_fwd(x, spec, key, amax, amin, tensor_amax):
  if _kernel_ok(x, spec, True, grad=True, key=key, amax=amax, amin=amin,
                tensor_amax=tensor_amax):
    # The one-pass GPU kernel: the value, and the clip mask where the
    # gradient needs one (uint8, 1 where clipped).
    from lowbit_jax.kernels import gpu_quantize  # pylint: disable=g-import-not-at-top
    if _never_clips(spec, amax, tensor_amax):
      y = gpu_quantize.fake_quant_forward(x, spec, tensor_amax=tensor_amax)
      return y, (None, key, amax, amin, tensor_amax)
    y, clipped = gpu_quantize.fake_quant_forward_with_mask(
        x, spec, tensor_amax=tensor_amax)
    return y, (clipped, key, amax, amin, tensor_amax)
  y, clipped = _fake_quant_impl(x, spec, key, amax, amin, tensor_amax)
  if _never_clips(spec, amax, tensor_amax):
    clipped = None
  return y, (clipped, key, amax, amin, tensor_amax)


def _key_ct(key):
  return None if key is None else np.zeros(key.shape, jax.dtypes.float0)


def _fq_bwd(spec, res, g):
  clipped, key, amax, amin, tensor_amax = res
  del spec
  if clipped is not None and clipped.dtype != jnp.bool_:
    clipped = clipped != 0  # the GPU kernel's uint8 mask
  gx = g if clipped is None else jnp.where(clipped, jnp.zeros_like(g), g)
  zero = lambda v: None if v is None else jnp.zeros_like(v)  # noqa: E731
  return gx, _key_ct(key), zero(amax), zero(amin), zero(tensor_amax)


_fake_quant.defvjp(_fq_fwd, _fq_bwd)


# -- learned ranges: LSQ / LSQ+ scales and PACT clipping ---------------------


def _sum_to(v: jax.Array, shape: tuple) -> jax.Array:
  """Sums a scale-grid array down to ``shape`` (which broadcasts to it)."""
  lead = v.ndim - len(shape)
  if lead:
    v = jnp.sum(v, axis=tuple(range(lead)))
  axes = tuple(i for i, (d, n) in enumerate(zip(shape, v.shape)) if d == 1 and n != 1)
  if axes:
    v = jnp.sum(v, axis=axes, keepdims=True)
  return v.reshape(shape)


def _block_sum(v: jax.Array, bs: tuple) -> jax.Array:
  """float32 sum of each block of ``v`` (the scale grid's shape)."""
  if all(b == 1 for b in bs):
    return v.astype(jnp.float32)
  return jnp.sum(_to_blocks(v, bs), axis=_red_axes(v.ndim), dtype=jnp.float32)


def _learned_impl(x, spec, key, scale, zero_point, clip, tensor_scale=None):
  shape, dtype = x.shape, x.dtype
  xp, spec, bs, valid, _ = _prepare(x, spec)
  q, total, _, zp, _, clipped, dxds = _grid_any(
      xp, spec, bs, valid, key, None, None, None, scale, zero_point, clip,
      tensor_scale=tensor_scale)
  out = _values(q, total, zp, bs, xp.shape, clip=_fq_clip(dtype))
  sl = tuple(slice(0, d) for d in shape)
  # The LSQ factor is saved in x's dtype (float32 for wider ones): it is a
  # gradient term, within half a grid step inside the range.
  rdt = jnp.float32 if jnp.dtype(dtype).itemsize >= 4 else dtype
  res = (clipped, None if dxds is None else dxds.astype(rdt), total)
  return out[sl].astype(dtype), res


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quant_learned(x, spec, key, scale, zero_point, clip, tensor_scale):
  return _learned_impl(x, spec, key, scale, zero_point, clip, tensor_scale)[0]


def _fql_fwd(x, spec, key, scale, zero_point, clip, tensor_scale):
  y, (clipped, dxds, total) = _learned_impl(x, spec, key, scale, zero_point, clip,
                                            tensor_scale)
  res = (clipped, dxds, total if zero_point is not None else None,
         x if clip is not None else None, key, scale, zero_point, clip,
         tensor_scale)
  return y, res


def _fql_bwd(spec, res, g):
  clipped, dxds, total, x, key, scale, zero_point, clip, tensor_scale = res
  shape = g.shape
  ax = normalize_axis(spec.axis, len(shape))
  bs = block_shape(spec if ax == spec.axis else spec.replace(axis=ax), clipped.shape)
  if clipped.shape != shape:  # padded: pad the cotangent with zeros
    g = jnp.pad(g, [(0, p - d) for d, p in zip(shape, clipped.shape)])
  sl = tuple(slice(0, d) for d in shape)
  gx = jnp.where(clipped, jnp.zeros_like(g), g)[sl]
  gf = g.astype(jnp.float32)
  g_scale = g_zp = g_clip = None
  if scale is not None:
    g_scale = _sum_to(_block_sum(gf * dxds.astype(jnp.float32), bs),
                      scale.shape).astype(scale.dtype)
  if zero_point is not None:
    # d out / d zero_point = -scale where clipped, 0 inside (straight-through
    # for the rounding of the zero point).
    gz = -_block_sum(jnp.where(clipped, gf, 0.0), bs) * total
    g_zp = _sum_to(gz, zero_point.shape).astype(zero_point.dtype)
  if clip is not None:
    xf = x.astype(jnp.float32)
    if clipped.shape != shape:
      xf = jnp.pad(xf, [(0, p - d) for d, p in zip(shape, clipped.shape)])
    if spec.symmetric:
      d_alpha = jnp.where(clipped, jnp.sign(xf), 0.0)
    else:
      d_alpha = jnp.where(clipped & (xf > 0), 1.0, 0.0)
    g_clip = _sum_to(_block_sum(gf * d_alpha, bs), clip.shape).astype(clip.dtype)
  # A given tensor scale is a constant of the grid (no gradient), as a
  # static range is.
  g_t = None if tensor_scale is None else jnp.zeros_like(tensor_scale)
  return gx, _key_ct(key), g_scale, g_zp, g_clip, g_t


_fake_quant_learned.defvjp(_fql_fwd, _fql_bwd)


def _as_key(key):
  """A typed PRNG key from ``key=`` (raw uint32 key data is wrapped); a seed
  or another array is refused with the call to make."""
  if key is None:
    return None
  dt = getattr(key, "dtype", None)
  if dt is not None and jnp.issubdtype(dt, jax.dtypes.prng_key):
    return key
  if dt == jnp.uint32 and jnp.ndim(key) >= 1:
    return jax.random.wrap_key_data(key)
  raise TypeError(f"key must be a PRNG key, e.g. jax.random.key(0), got "
                  f"{type(key).__name__}"
                  + (f" of dtype {dt}" if dt is not None else f" {key!r}"))


def fake_quant(x: jax.Array, spec=None, *, key: Optional[jax.Array] = None,
               amax: Optional[jax.Array] = None, amin: Optional[jax.Array] = None,
               tensor_amax: Optional[jax.Array] = None,
               scale: Optional[jax.Array] = None, clip: Optional[jax.Array] = None,
               zero_point: Optional[jax.Array] = None,
               tensor_scale: Optional[jax.Array] = None,
               **spec_kwargs) -> jax.Array:
  """Quantize-dequantize with a straight-through, LSQ or PACT gradient.

  The values equal ``dequantize(quantize(x, spec, ...))`` with the same
  keywords. Without ``scale``/``clip`` the gradient passes straight through
  (Bengio et al. 2013) inside the representable range and is zero where values
  were clipped; the range is treated as a constant.

  Learned step size (LSQ; Esser et al. 2019, "Learned Step Size
  Quantization"): with ``scale`` given, ``v = x / s`` is rounded to the grid
  and clipped to its ends ``[-Qn, Qp]`` (integers: ``+-qmax``; floats, MX and
  NVFP4 elements: ``+-element max``; asymmetric: ``[0, 2**b - 1]``), and the
  gradient with respect to each block's ``s`` is the sum over the block of
  ``g * (round(v) - v)`` where ``-Qn < v < Qp`` and ``g * bound`` (``-Qn`` or
  ``Qp``) where v was clipped (eq. 3), without LSQ's gradient scale factor
  (apply ``1 / sqrt(n * Qp)`` in the training recipe). "round" is the
  format's own rounding (a float format's cast to its grid). The clip region
  is closed, as in the paper: the x gradient is straight-through where
  ``-Qn < v < Qp`` and zero elsewhere. The given scale is first rounded to the
  spec's scale dtype as ``quantize`` stores it (bf16/fp16/E4M3: to the
  nearest value; E8M0: to a power of two by the spec's ``scale_rounding``,
  "floor" = the largest power of two <= s), straight-through for that
  rounding. Scales must be positive (a zero scale reads the block back as 0).
  NVFP4 (two-level): ``scale`` is each block's total scale; it splits into
  the float32 tensor scale ``t = max(scale) / 448`` (1 if that is 0) and E4M3
  block scales ``e4m3(clamp(scale / t, 2**-6, 448))``, so the largest block
  scale is stored exactly; the LSQ gradient treats ``t * block`` as the
  scale. ``tensor_scale=t`` fixes that tensor scale instead (a constant: no
  gradient), as ``quantize`` takes it.

  LSQ+ (Bhalgat et al. 2020): for asymmetric integer specs, ``zero_point`` is
  a learned float offset in grid units; the forward uses it rounded and
  clamped to ``[0, 2**b - 1]`` (as ``quantize`` stores it), ``out = (clip(
  round(x / s + z), 0, 2**b - 1) - z) * s``; its gradient is straight-through
  for that rounding: ``-s * g`` summed where clipped, 0 inside; the scale
  gradient is eq. 3 with ``v = x / s``: ``round(v + z) - z - v`` inside,
  ``q - z`` outside. With ``scale`` alone, the zero point comes from the data
  as ``quantize`` chooses it (``round(-min(x, 0) / s)`` per block) and gets
  no gradient.

  PACT (Choi et al. 2018): ``clip=alpha`` (>= 0) clips x to ``[-alpha,
  alpha]`` (asymmetric/unsigned specs: ``[0, alpha]``, as in the paper) and
  quantizes with ``scale = alpha / element max``: the forward is
  ``fake_quant(clip(x, -alpha, alpha), amax=alpha)`` (asymmetric:
  ``amin=0``), which equals ``fake_quant(x, amax=alpha)`` whenever the scale
  maps alpha onto the grid's end (float scale dtypes). The gradient with
  respect to alpha is ``sign(x)`` where ``|x| >= alpha`` (asymmetric: 1 where
  ``x >= alpha``), else 0, summed per block; the x gradient is
  straight-through inside and zero where clipped.

  Args:
    x: float array.
    spec: a QuantSpec, or a format name with QuantSpec keywords.
    key: PRNG key, needed by stochastic rounding.
    amax, amin, tensor_amax: static ranges, as ``quantize``.
    scale: LSQ scale, float32, shaped ``scale_shape(x.shape, spec)`` (per
      tensor: all ones, or ``()``) or broadcastable to it; its gradient is
      summed back to its own shape. Not with amax/amin/tensor_amax/clip.
    clip: PACT clipping level alpha, a scalar or broadcastable to the scale
      grid. Not with amax/amin/tensor_amax.
    zero_point: LSQ+ zero point (asymmetric specs, with ``scale``).
    tensor_scale: with ``scale``, a two-level (NVFP4) spec's float32 tensor
      scale, as ``quantize``.

  Returns:
    An array of x's shape and dtype.

  Raises:
    ValueError: conflicting range keywords, a ``scale``/``clip``/
      ``zero_point`` that does not broadcast to the scale grid, or a spec that
      does not fit x.
  """
  spec = as_spec(spec, **spec_kwargs)
  _check_tensor_amax(spec, amax, tensor_amax, amin)
  x = jnp.asarray(x)
  key = _as_key(key)
  if x.size == 0 and x.ndim > 0 and jnp.issubdtype(x.dtype, jnp.floating):
    return x  # nothing to quantize: an empty array is its own fake quantization
  scale, zero_point, clip, tensor_scale = _check_learned(
      spec, x.shape, amax, amin, tensor_amax, scale, zero_point, clip, tensor_scale)
  if scale is None and clip is None:
    return _fake_quant(x, spec, key, amax, amin, tensor_amax)
  return _fake_quant_learned(x, spec, key, scale, zero_point, clip, tensor_scale)


def init_scale(x: jax.Array, spec=None, method: str = "lsq", **spec_kwargs) -> jax.Array:
  """An initial learned scale per block, shaped ``scale_shape(x.shape, spec)``.

  Args:
    x: the tensor the scale will quantize (weights, or a calibration batch).
    spec: a QuantSpec, or a format name with QuantSpec keywords.
    method: "lsq": ``2 * mean|x| / sqrt(Qp)`` per block (Esser et al. 2019,
      Qp = the grid's largest element: ``qmax`` for integers, ``2**b - 1``
      unsigned, the element max for float formats); "amax": the scale
      ``quantize`` would derive before rounding it to the scale dtype,
      ``clip_ratio * amax / element max`` (asymmetric: ``(max(x, 0) -
      min(x, 0)) / (2**b - 1)``).

  Returns:
    float32 array; all-zero blocks get 1, blocks holding a NaN or an inf give
    NaN or inf. Other scales are held within the scale dtype's range as
    ``quantize`` holds its own (docs/formats.md, "Tiny and huge ranges"):
    float32, bfloat16 and tensor-scaled (NVFP4) specs at least 2**-126,
    float16 within [2**-24, 65504], bfloat16 at most its maximum, E8M0 within
    [2**-127, 2**127] (below 2**-126: 2**-127, built from its bits), E4M3
    scales without a tensor scale within [2**-9, 448], and
    every scale at most the float32 maximum (an ``lsq`` mean times
    ``2 / sqrt(Qp)`` can overflow). A tiny block thus never starts at a scale
    that flushes to 0 or that reads back as 1.

  Raises:
    ValueError: an unknown method, or a spec that does not fit x.
  """
  if method not in ("lsq", "amax"):
    raise ValueError(f"method must be 'lsq' or 'amax', got {method!r}")
  spec = as_spec(spec, **spec_kwargs)
  x = jnp.asarray(x)
  return _init_scale_jit(x, spec, method)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_scale_jit(x, spec, method):
  xp, spec, bs, valid, _ = _prepare(x, spec)
  xf = xp.astype(jnp.float32)
  xb = _to_blocks(xf, bs)
  red = _red_axes(xf.ndim)
  vb = None if valid is None else _to_blocks(valid, bs)
  lo_b, hi_b = _grid_bounds(spec)
  absx = jnp.abs(xb)
  # Whether the block holds a nonzero, and a NaN or an inf: a scale of
  # normal data can underflow to 0 (or a subnormal, flushed on CPU) or
  # overflow, and must then be clamped, not read as "all zeros" (1).
  nonzero = jnp.any(absx > 0, axis=red)
  bad = jnp.any(~jnp.isfinite(xb), axis=red)
  if method == "lsq":
    s = _mean_abs(absx, red, vb, bs) * np.float32(2.0 / math.sqrt(hi_b))
  elif spec.symmetric:
    s = _div(jnp.max(absx, axis=red) * np.float32(spec.clip_ratio),
             np.float32(spec.element.max))
  else:
    hi = jnp.maximum(jnp.max(xb if vb is None else jnp.where(vb, xb, -jnp.inf),
                             axis=red), 0.0) * np.float32(spec.clip_ratio)
    lo = jnp.minimum(jnp.min(xb if vb is None else jnp.where(vb, xb, jnp.inf),
                             axis=red), 0.0) * np.float32(spec.clip_ratio)
    levels = np.float32(hi_b - lo_b)
    # A range beyond the float32 maximum: halved and doubled back, as _grid_asym.
    s = jnp.where(hi - lo == np.float32(np.inf),
                  _div(hi * np.float32(0.5) - lo * np.float32(0.5), levels)
                  * np.float32(2.0), _div(hi - lo, levels))
  raw = s
  if spec.scale_dtype == "e8m0":
    # E8M0 holds 2**-127 .. 2**127; 2**-127 is a float32 subnormal (from bits).
    s = jnp.where(s >= np.float32(2.0 ** -126), jnp.minimum(s, np.float32(2.0 ** 127)),
                  lax.bitcast_convert_type(jnp.uint32(0x00400000), jnp.float32))
  elif spec.scale_dtype == "fp8_e4m3" and not spec.tensor_scale:
    s = jnp.clip(s, _E4M3.min_subnormal, _E4M3.max)
  else:
    s = jnp.minimum(_clamp_scale(s, "float32" if spec.tensor_scale
                                 else spec.scale_dtype), _F32_MAX)
  return jnp.where(bad, raw, jnp.where(nonzero, s, np.float32(1.0)))
