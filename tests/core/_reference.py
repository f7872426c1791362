"""The unfused implementation of quantize / dequantize / fake_quant, frozen.

A verbatim copy of ``lowbit_jax.core._cast``, ``_quantize`` and the packing
functions of ``_qarray`` as they were before the fused rewrite (issue 12):
tests/core/test_fused.py checks the library against it bit for bit. It is a
test fixture, not library code: nothing in ``lowbit_jax`` imports it.
"""
# pylint: skip-file
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax import lax

from lowbit_jax.core._qarray import (QArray, block_shape, default_pack_axis,
                                     normalize_axis, pack_unit, code_dtype)
from lowbit_jax.core._spec import QuantSpec, as_spec
from lowbit_jax.formats import (BlockFormat, FloatFormat, Format, IntFormat,
                                LookupFormat)
from lowbit_jax.formats import get as get_format

_U32 = jnp.uint32


def _f32_bits(x: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(x.astype(jnp.float32), _U32)


def _bits_f32(b: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(b.astype(_U32), jnp.float32)


def _max_bits(fmt: FloatFormat) -> int:
  return int(np.float32(fmt.max).view(np.uint32))


def _float_round_bits(a: jax.Array, fmt: FloatFormat, noise: Optional[jax.Array]):
  """Rounds float32 magnitudes (bits ``a``, finite) to the format's precision.

  The exponent range is unbounded above (overflow is handled by the caller), the
  format's subnormal spacing applies below. Returns float32 magnitude bits.
  """
  m_bits = fmt.man_bits
  e32 = (a >> 23).astype(jnp.int32)
  m32 = a & 0x7FFFFF
  is_sub = e32 == 0
  # float32 subnormals are normalized to their true exponent, so a format whose
  # normal range reaches below 2**-126 (only e8m0) rounds them to the nearer of
  # their two grid neighbours, as ml_dtypes >= 0.7 does (older ml_dtypes read
  # them in the 2**-126 binade and sent everything in (2**-127, 2**-126) up).
  # For every other format the result is the same either way: the extra
  # left shift of ``sig`` is dropped again by the larger ``d_full``.
  lead = 31 - lax.clz(jnp.maximum(m32, 1)).astype(jnp.int32)  # 0..22
  e_true = jnp.where(is_sub, lead - 149, e32 - 127)
  sig = jnp.where(is_sub, m32 << (23 - lead).astype(_U32),
                  m32 | 0x800000)  # value = sig * 2**(e_true - 23)
  emin = fmt.min_exponent
  d_full = 23 - m_bits + jnp.maximum(0, emin - e_true)  # bits dropped from sig
  # At most 31 bits are dropped at once (uint32 shifts). Beyond that the value
  # is below 2**-7 of the format's smallest step: it rounds to 0 to nearest, and
  # stochastically rounds up with probability sig / 2**d_full, which the low
  # 31 bits of noise give for the pre-shifted sig.
  pre = jnp.clip(d_full - 31, 0, 31).astype(_U32)
  d = jnp.minimum(d_full, 31).astype(_U32)
  sig = sig >> pre
  q = sig >> d
  rem = sig & ((_U32(1) << d) - 1)
  if noise is None:
    half = (_U32(1) << d) >> 1
    up = (rem > half) | ((rem == half) & (half > 0) & ((q & 1) == 1))
  else:
    up = rem > (noise & ((_U32(1) << d) - 1))
  q = q + up.astype(_U32)
  qe = e_true - 23 + d_full  # exponent of q's last bit
  n = 31 - lax.clz(q).astype(jnp.int32)  # q < 2**24, so n <= 23
  big_e = qe + n
  normal_bits = (((big_e + 127).astype(_U32) << 23)
                 | ((q << jnp.clip(23 - n, 0, 31).astype(_U32)) & 0x7FFFFF))
  sub_shift = jnp.clip(qe + 149, 0, 31).astype(_U32)
  sub_bits = q << sub_shift
  out = jnp.where(big_e >= -126, normal_bits, sub_bits)
  return jnp.where(q == 0, _U32(0), out)


def _cast_float(x: jax.Array, fmt: FloatFormat, saturate: bool,
                noise: Optional[jax.Array]) -> jax.Array:
  u = _f32_bits(x)
  s = u & _U32(0x80000000)
  if jnp.dtype(x.dtype).itemsize == 2:
    # The sign of a 16-bit NaN, from its own bits: converting to float32 may
    # drop it (XLA on GPU), and formats without NaN code NaN by its sign.
    s = (lax.bitcast_convert_type(x, jnp.uint16).astype(_U32) >> 15) << 31
  a = u & 0x7FFFFFFF
  is_nan = a > 0x7F800000
  is_inf = a == 0x7F800000
  r = _float_round_bits(jnp.where(is_nan | is_inf, _U32(0), a), fmt, noise)
  max_b = _U32(_max_bits(fmt))
  overflow = (r > max_b) | is_inf
  nan_b = _U32(0x7FC00000)
  inf_b = _U32(0x7F800000)
  sp = fmt.special
  if sp == "e8m0":
    # Unsigned and no zero: ml_dtypes maps negatives, zero, inf and NaN to NaN,
    # and positive values below 2**-127 to the smallest code.
    min_b = _U32(int(np.float32(fmt.min_subnormal).view(np.uint32)))
    r = jnp.maximum(r, min_b)
    bad = (s != 0) | (a == 0) | is_nan
    if saturate:
      r = jnp.where(overflow, max_b, r)
      bad = bad & ~(is_inf & (s == 0))
    else:
      bad = bad | overflow
    return _bits_f32(jnp.where(bad, nan_b, r)).astype(x.dtype)
  if saturate:
    mag = jnp.where(overflow, max_b, r)
    mag = jnp.where(is_nan, nan_b, mag)
  elif sp == "ieee":
    mag = jnp.where(overflow, inf_b, r)
    mag = jnp.where(is_nan, nan_b, mag)
  elif sp in ("fn", "fnuz"):
    mag = jnp.where(overflow | is_nan, nan_b, r)
  else:  # "none": saturates; having no NaN code, ml_dtypes turns NaN into a zero
    # of the opposite sign (+NaN -> -0.0).
    mag = jnp.where(overflow, max_b, r)
    mag = jnp.where(is_nan, _U32(0), mag)
    s = jnp.where(is_nan, s ^ _U32(0x80000000), s)
  if sp == "fnuz":
    s = jnp.where(mag == 0, _U32(0), s)  # no negative zero
    # The only NaN code is 0b1000...0, the negative-zero pattern: ml_dtypes
    # reads it back as a NaN with the sign bit set, whatever the input's sign.
    s = jnp.where(mag == nan_b, _U32(0x80000000), s)
  out = s | mag  # other NaNs keep the input's sign, as ml_dtypes' codes do
  return _bits_f32(out).astype(x.dtype)


def _cast_int(x: jax.Array, fmt: IntFormat, saturate: bool, noise, lo=None, hi=None):
  del saturate  # integers have no inf/NaN codes: they always clamp.
  scale = float(1 << fmt.frac_bits)
  y = x.astype(jnp.float32) * scale
  if noise is None:
    y = jnp.round(y)  # half to even
  else:
    u = (noise >> 8).astype(jnp.float32) * (1.0 / (1 << 24))  # U[0, 1)
    y = jnp.floor(y + u)
  lo = fmt.qmin if lo is None else lo
  hi = fmt.qmax if hi is None else hi
  y = jnp.clip(y, lo, hi) / scale
  return y.astype(x.dtype)


def lookup_round_index(x: jax.Array, fmt: LookupFormat, noise=None) -> jax.Array:
  """Index of the nearest table entry (ties to the even index), as int32."""
  table = jnp.asarray(fmt.table, jnp.float32)
  xf = x.astype(jnp.float32)
  # Index of the largest entry <= x (clamped into [0, n-2] so hi exists).
  lo_idx = jnp.clip(jnp.searchsorted(table, xf, side="right") - 1, 0, len(fmt.table) - 2)
  lo = table[lo_idx]
  hi = table[lo_idx + 1]
  if noise is None:
    dl = jnp.abs(xf - lo)
    dh = jnp.abs(hi - xf)
    pick_hi = (dh < dl) | ((dh == dl) & (lo_idx % 2 == 1))
  else:
    u = (noise >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    frac = jnp.clip((xf - lo) / (hi - lo), 0.0, 1.0)
    pick_hi = u < frac
  idx = jnp.where(pick_hi, lo_idx + 1, lo_idx)
  idx = jnp.where(xf <= table[0], 0, idx)
  idx = jnp.where(xf >= table[-1], len(fmt.table) - 1, idx)
  return idx.astype(jnp.int32)


def _cast_lookup(x, fmt: LookupFormat, noise):
  idx = lookup_round_index(x, fmt, noise)
  y = jnp.asarray(fmt.table, jnp.float32)[idx]
  return jnp.where(jnp.isnan(x), jnp.nan, y).astype(x.dtype)


def random_bits(key: jax.Array, shape) -> jax.Array:
  """uint32 random bits for stochastic rounding."""
  return jax.random.bits(key, shape, jnp.uint32)


def cast(x: jax.Array, fmt: str | Format, saturate: bool = False, *,
         rounding: str = "nearest", key: Optional[jax.Array] = None) -> jax.Array:
  """Rounds ``x`` to the nearest value of an element format (no scale).

  The result has x's dtype; rounding is done in float32.

  Args:
    x: a float array.
    fmt: an element format or its name (``"fp8_e4m3"``, ``"e3m3"``, ``"int4"``,
      ``"nf4"``...). Block formats are not element formats: use ``quantize``.
    saturate: without it, overflow does what ml_dtypes does (inf or NaN as the
      type defines; formats with neither saturate). With it, finite overflow and
      inf clamp to +-max and NaN stays NaN.
    rounding: "nearest" (half to even) or "stochastic" (needs ``key``).
    key: PRNG key for stochastic rounding.

  Returns:
    The rounded array, dtype of x.

  Raises:
    ValueError: a block format, an unknown rounding, or stochastic without a key.
  """
  fmt = get_format(fmt)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"cast() rounds float arrays; got dtype {x.dtype}. Convert with "
                    "x.astype(jnp.float32) first")
  noise = _noise(x.shape, rounding, key)
  if isinstance(fmt, FloatFormat):
    return _cast_float(x, fmt, saturate, noise)
  if isinstance(fmt, IntFormat):
    return _cast_int(x, fmt, saturate, noise)
  if isinstance(fmt, LookupFormat):
    return _cast_lookup(x, fmt, noise)
  raise ValueError(f"cast() takes an element format; {fmt.name!r} is a block format "
                   f"(use lowbit_jax.quantize / fake_quant with it, or cast to its "
                   f"element format {fmt.element.name!r})")


def _noise(shape, rounding: str, key):
  if rounding == "nearest":
    if key is not None:
      raise ValueError("a key was given but rounding='nearest'; pass "
                       "rounding='stochastic' to use it")
    return None
  if rounding == "stochastic":
    if key is None:
      raise ValueError("stochastic rounding needs an explicit PRNG key: "
                       "key=jax.random.key(0)")
    return random_bits(key, shape)
  raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


# ---------------------------------------------------------------------------
# Codes: the integer bit patterns a format stores.


def encode(y: jax.Array, fmt: Format) -> jax.Array:
  """Codes (uint32) of values already on the format's grid (output of ``cast``).

  Floats: the IEEE-style bit pattern (NaN gets the format's NaN code; formats
  without NaN code it as ml_dtypes does). Ints: two's complement in ``bits``
  bits. Lookup: the table index.
  """
  if isinstance(fmt, IntFormat):
    c = jnp.round(y.astype(jnp.float32) * (1 << fmt.frac_bits)).astype(jnp.int32)
    c = jnp.where(jnp.isnan(y), 0, c)
    return (c.astype(_U32) & ((1 << fmt.bits) - 1))
  if isinstance(fmt, LookupFormat):
    return lookup_round_index(y, fmt).astype(_U32)
  if not isinstance(fmt, FloatFormat):
    raise ValueError(f"encode() takes an element format, got {fmt.name!r}")
  x_, y_ = fmt.exp_bits, fmt.man_bits
  u = _f32_bits(y)
  s = (u >> 31)
  a = u & 0x7FFFFFFF
  e32 = (a >> 23).astype(jnp.int32)
  m32 = a & 0x7FFFFF
  n_sub = 31 - lax.clz(jnp.maximum(m32, _U32(1))).astype(jnp.int32)
  e_true = jnp.where(e32 == 0, n_sub - 149, e32 - 127)  # the value's own binade
  sig = jnp.where(e32 == 0, m32 << jnp.clip(23 - n_sub, 0, 31).astype(_U32),
                  m32 | 0x800000)  # value = sig * 2**(e_true - 23)
  emin = fmt.min_exponent
  normal = e_true >= emin
  fe = jnp.where(normal, e_true + fmt.bias, 0).astype(_U32)
  shift_n = 23 - y_
  fm_n = (sig & 0x7FFFFF) >> shift_n
  sub_shift = jnp.clip((emin - y_) - (e_true - 23), 0, 31).astype(_U32)
  fm_s = sig >> sub_shift
  fm = jnp.where(normal, fm_n, fm_s)
  is_nan = a > 0x7F800000
  is_inf = a == 0x7F800000
  if fmt.special == "e8m0":
    code = jnp.where(is_nan | (s == 1) | (a == 0), _U32(0xFF), fe)
    return code
  code = (s << (x_ + y_)) | (fe << y_) | fm
  code = jnp.where(a == 0, s << (x_ + y_), code)
  all_e = (1 << x_) - 1
  if fmt.special == "ieee":
    code = jnp.where(is_inf, (s << (x_ + y_)) | (all_e << y_), code)
    code = jnp.where(is_nan, (s << (x_ + y_)) | (all_e << y_) | (1 << (y_ - 1)), code)
  elif fmt.special == "fn":
    code = jnp.where(is_nan | is_inf, (s << (x_ + y_)) | ((1 << (x_ + y_)) - 1), code)
  elif fmt.special == "fnuz":
    code = jnp.where(a == 0, _U32(0), code)
    code = jnp.where(is_nan | is_inf, _U32(1 << (x_ + y_)), code)
  else:  # no NaN code: as ml_dtypes, +NaN codes -0 and -NaN codes +0
    code = jnp.where(is_nan, (1 - s) << (x_ + y_), code)
  return code


def decode(codes: jax.Array, fmt: Format) -> jax.Array:
  """float32 values of codes (inverse of ``encode``)."""
  codes = codes.astype(jnp.int32)
  if isinstance(fmt, IntFormat):
    c = codes & ((1 << fmt.bits) - 1)
    if fmt.signed:
      c = jnp.where(c >= (1 << (fmt.bits - 1)), c - (1 << fmt.bits), c)
    return c.astype(jnp.float32) / (1 << fmt.frac_bits)
  if isinstance(fmt, LookupFormat):
    return jnp.asarray(fmt.table, jnp.float32)[codes]
  if isinstance(fmt, FloatFormat):
    return jnp.asarray(fmt.decode_table())[codes]
  raise ValueError(f"decode() takes an element format, got {fmt.name!r}")


def pack(codes: jax.Array, fmt: Format, axis: int) -> jax.Array:
  """Packs uint32 codes (already padded to whole units along ``axis``)."""
  bits = fmt.bits
  n_codes, n_bytes = pack_unit(bits)
  if n_codes == 1:
    dt = code_dtype(fmt)
    if bits == 8:
      return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), dt)
    return codes.astype(dt)
  c = jnp.moveaxis(codes, axis, -1)
  lead = c.shape[:-1]
  c = c.reshape(lead + (c.shape[-1] // n_codes, n_codes))
  shifts = jnp.arange(n_codes, dtype=jnp.uint32) * bits
  word = jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)
  byts = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(n_bytes)], axis=-1)
  out = byts.reshape(lead + (-1,)).astype(jnp.uint8)
  return jnp.moveaxis(out, -1, axis)


def unpack(packed: jax.Array, fmt: Format, axis: int) -> jax.Array:
  """Inverse of ``pack``: uint32 codes."""
  bits = fmt.bits
  n_codes, n_bytes = pack_unit(bits)
  if n_codes == 1:
    if packed.dtype.itemsize == 1:
      return jax.lax.bitcast_convert_type(packed, jnp.uint8).astype(jnp.uint32)
    return packed.astype(jnp.uint32)
  p = jnp.moveaxis(packed, axis, -1).astype(jnp.uint32)
  lead = p.shape[:-1]
  p = p.reshape(lead + (p.shape[-1] // n_bytes, n_bytes))
  word = jnp.zeros(p.shape[:-1], jnp.uint32)
  for j in range(n_bytes):
    word = word | (p[..., j] << (8 * j))
  shifts = jnp.arange(n_codes, dtype=jnp.uint32) * bits
  c = (word[..., None] >> shifts) & ((1 << bits) - 1)
  c = c.reshape(lead + (-1,))
  return jnp.moveaxis(c, -1, axis)



_E4M3 = get_format("fp8_e4m3")
_HALF = {"float16": FloatFormat(5, 10, 15, "ieee", name="float16"),
         "bfloat16": FloatFormat(8, 7, 127, "ieee", name="bfloat16")}
_E8M0_BIAS = 127


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
  return jnp.ldexp(jnp.ones(e.shape, jnp.float32), e)


def _store_float_scale(s: jax.Array, dtype: str):
  """(stored, float32 value) of a scale in a float scale dtype."""
  if dtype == "float32":
    return s, s
  if dtype in ("bfloat16", "float16"):
    # Rounded with the bit-exact emulation, not s.astype(dtype).astype(f32):
    # XLA may elide that round trip (excess precision, on GPU), and the fake
    # path would then use an unrounded scale that dequantize never sees.
    v = _cast_float(s, _HALF[dtype], False, None)
    return v.astype(dtype), v
  if dtype == "fp8_e4m3":
    v = cast(jnp.clip(s, _E4M3.min_subnormal, _E4M3.max), _E4M3, saturate=True)
    return v.astype(jnp.float8_e4m3fn), v
  raise ValueError(f"no float scale dtype {dtype!r}")


def _mark_bad(stored: jax.Array, value: jax.Array, bad: jax.Array):
  """NaN scales (stored and value) for blocks that hold a NaN or an inf.

  The stored scale must be NaN too, or ``dequantize(quantize(x))`` would read
  the block back as finite numbers while ``fake_quant`` gives NaN.
  """
  stored = jnp.where(bad, jnp.asarray(jnp.nan, stored.dtype), stored)
  return stored, jnp.where(bad, jnp.float32(jnp.nan), value)


def _mean_abs(absx, red, vb, bs) -> jax.Array:
  """Per-block mean of |x| over the valid (unpadded) elements."""
  if vb is None:
    return _div(jnp.sum(absx, axis=red), np.float32(math.prod(bs)))
  return _div(jnp.sum(absx, axis=red), jnp.sum(vb, axis=red))


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


def _grid(x, spec: QuantSpec, bs, valid, key, amax, amin, tensor_amax=None):
  """Elements on the format's grid (float32), scales and zero points.

  ``tensor_amax`` (formats with a tensor scale only) fixes the per-tensor range
  that sets the tensor scale; the block scales still follow the data.

  Returns:
    (q, scale_f32 per block, stored scale, zero_point per block or None,
     tensor scale or None, clipped mask)
  """
  fmt = spec.element
  xf = x.astype(jnp.float32)
  xb = _to_blocks(xf, bs)
  red = _red_axes(xf.ndim)
  vb = None if valid is None else _to_blocks(valid, bs)
  noise = None
  if spec.rounding == "stochastic":
    if key is None:
      raise ValueError("this spec rounds stochastically: pass key=jax.random.key(...)")
    noise = random_bits(key, xf.shape)
  elif key is not None:
    raise ValueError("a key was given but the spec rounds to nearest; use "
                     "QuantSpec(..., rounding='stochastic') to use it")

  if not spec.symmetric:
    return _grid_asym(xf, xb, red, vb, spec, bs, noise, amax, amin)

  method = fmt.scale_method if isinstance(fmt, LookupFormat) else "absmax"
  absx = jnp.abs(xb)
  if amax is not None:
    a = jnp.broadcast_to(jnp.asarray(amax, jnp.float32),
                         tuple(d // b for d, b in zip(xf.shape, bs)))
  elif method == "absmax":
    a = jnp.max(absx, axis=red)
  else:
    mean_abs = _mean_abs(absx, red, vb, bs)
    if method == "mean_abs":
      a = mean_abs
    else:  # twn
      thr = 0.7 * mean_abs
      sel = absx > jnp.expand_dims(thr, red)
      n_sel = jnp.sum(sel, axis=red)
      a = _div(jnp.sum(jnp.where(sel, absx, 0.0), axis=red), jnp.maximum(n_sel, 1))
  a = a * np.float32(spec.clip_ratio)
  # A block holding a NaN or an inf gets a NaN scale. Tested on the elements:
  # XLA's vectorized max on CPU can drop a NaN, so the amax alone cannot tell.
  bad = ~jnp.isfinite(a) | jnp.any(~jnp.isfinite(xb), axis=red)

  tscale = None
  a_clip = a  # the range beyond which the straight-through gradient is zero
  if spec.tensor_scale:
    # The per-tensor amax is over finite values: a NaN or inf block turns
    # only itself into NaN.
    if tensor_amax is not None:
      emax_t = jnp.asarray(tensor_amax, jnp.float32) * np.float32(spec.clip_ratio)
    elif amax is None:
      emax_t = jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0))
    else:
      emax_t = jnp.max(a)
    smax = _E4M3.max if spec.scale_dtype == "fp8_e4m3" else 1.0
    t = _div(emax_t, np.float32(fmt.max * smax))
    t = jnp.where(emax_t == 0, np.float32(1.0), t)  # 1 where the amax is 0
    tscale = t
    if spec.scale_dtype == "fp8_e4m3":
      # E4M3 block scales clamp at 448, so nothing beyond the tensor range
      # survives (only a static tensor_amax can lie below a block's amax).
      a_clip = jnp.minimum(a, emax_t)
      s_raw = jnp.clip(_div(_div(a, np.float32(fmt.max)), t), _E4M3.min_normal,
                       _E4M3.max)
      s_stored, s_val = _store_float_scale(s_raw, "fp8_e4m3")
    else:
      s_stored, s_val = _store_float_scale(
          jnp.where(a > 0, _div(_div(a, np.float32(fmt.max)), t), 1.0),
          spec.scale_dtype)
    s_stored, s_val = _mark_bad(s_stored, s_val, bad)
    mult = _div(_div(np.float32(1.0), t), s_val)
    y = xb * jnp.expand_dims(mult, red)
    total = t * s_val
  elif spec.scale_dtype == "e8m0":
    e = _e8m0_exponent(a, fmt, spec.scale_rounding)
    s_stored = jnp.where(bad, 255, e + _E8M0_BIAS).astype(jnp.uint8)
    s_val = jnp.where(bad, jnp.nan, _pow2(e))
    y = xb * jnp.expand_dims(jnp.where(bad, jnp.nan, _pow2(-e)), red)
    total = s_val
  else:
    # Scale 1 where the amax is 0 (the block is all zeros and codes 0); a grid
    # without 0 (binary) needs scale 0 there, or zeros would read back as +-1.
    has_zero = not isinstance(fmt, LookupFormat) or 0.0 in fmt.table
    zero_scale = 1.0 if has_zero else 0.0
    s = jnp.where(a > 0, _div(a, np.float32(fmt.max)), zero_scale)
    s_stored, s_val = _store_float_scale(s, spec.scale_dtype)
    s_stored, s_val = _mark_bad(s_stored, s_val, bad)
    y = _div(xb, jnp.expand_dims(jnp.where(s_val == 0, 1.0, s_val), red))
    total = s_val

  y = y.reshape(xf.shape)
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
    q = _cast_int(y, fmt, True, noise, lo=-lim, hi=lim)
  elif isinstance(fmt, LookupFormat) and fmt.scale_method == "twn":
    thr = _expand(0.7 * _mean_abs(jnp.abs(xb), red, vb, bs), bs, xf.shape)
    q = jnp.where(jnp.abs(xf) > thr, jnp.sign(xf), 0.0)
    q = jnp.where(jnp.isnan(y), jnp.nan, q)
  elif isinstance(fmt, LookupFormat):
    q = _cast_lookup(y, fmt, noise)
  else:
    q = _cast_float(y, fmt, True, noise)
  return q, total, s_stored, None, tscale, clipped


def _grid_asym(xf, xb, red, vb, spec, bs, noise, amax, amin):
  fmt = spec.storage_format
  levels = float(fmt.qmax)
  if amax is not None or amin is not None:
    if amax is None or amin is None:
      raise ValueError("asymmetric static ranges need both amin and amax")
    shp = tuple(d // b for d, b in zip(xf.shape, bs))
    hi = jnp.broadcast_to(jnp.asarray(amax, jnp.float32), shp)
    lo = jnp.broadcast_to(jnp.asarray(amin, jnp.float32), shp)
  else:
    src_hi = xb if vb is None else jnp.where(vb, xb, -jnp.inf)
    src_lo = xb if vb is None else jnp.where(vb, xb, jnp.inf)
    hi = jnp.max(src_hi, axis=red)
    lo = jnp.min(src_lo, axis=red)
  hi = jnp.maximum(hi, 0.0) * np.float32(spec.clip_ratio)
  lo = jnp.minimum(lo, 0.0) * np.float32(spec.clip_ratio)
  rng = hi - lo
  s = jnp.where(rng > 0, _div(rng, np.float32(levels)), 1.0)
  s_stored, s_val = _store_float_scale(s, spec.scale_dtype)
  bad = (~(jnp.isfinite(hi) & jnp.isfinite(lo))
         | jnp.any(~jnp.isfinite(xb), axis=red))  # NaN/inf block: NaN scale
  s_stored, s_val = _mark_bad(s_stored, s_val, bad)
  zp = jnp.clip(jnp.round(_div(-lo, s_val)), 0, levels)
  zp = jnp.where(bad, 0.0, zp)
  y = _div(xb, jnp.expand_dims(s_val, red)) + jnp.expand_dims(zp, red)
  y = y.reshape(xf.shape)
  clipped = (y < -0.5) | (y > levels + 0.5)
  q = _cast_int(y, fmt, True, noise, lo=0, hi=int(levels))
  zp_dtype = jnp.uint8 if fmt.bits <= 8 else jnp.uint16
  return q, s_val, s_stored, zp.astype(zp_dtype), None, clipped


def _values(q, total, zp, bs, shape):
  """Dequantized float32 values from grid elements and per-block scales."""
  if zp is not None:
    q = q - _expand(zp.astype(jnp.float32), bs, shape)
  return q * _expand(total, bs, shape)


# ---------------------------------------------------------------------------
# Public API


def _check_tensor_amax(spec: QuantSpec, amax, tensor_amax) -> None:
  if tensor_amax is None:
    return
  if not spec.tensor_scale:
    raise ValueError(f"tensor_amax sets the per-tensor scale of a two-level block "
                     f"format (NVFP4); {spec.format.name!r} has none. Pass amax= "
                     "for a static range instead")
  if amax is not None:
    raise ValueError("give amax (a static range for every block) or tensor_amax "
                     "(a static tensor scale over dynamic block scales), not both")
  if jnp.ndim(tensor_amax) != 0:
    raise ValueError(f"tensor_amax must be a scalar, got shape "
                     f"{jnp.shape(tensor_amax)}")


def quantize(x: jax.Array, spec=None, *, key: Optional[jax.Array] = None,
             amax: Optional[jax.Array] = None, amin: Optional[jax.Array] = None,
             tensor_amax: Optional[jax.Array] = None, **spec_kwargs) -> QArray:
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
      ``tensor_amax=lax.pmax(jnp.max(jnp.abs(x)), "data")``.

  Returns:
    QArray whose ``dequantize()`` equals ``fake_quant(x, spec)``.

  Raises:
    ValueError: the spec does not fit x (axis not a multiple of the block size
      without pad=True, a block format without an axis, ...).
  """
  spec = as_spec(spec, **spec_kwargs)
  _check_tensor_amax(spec, amax, tensor_amax)
  # One jit per (spec, shape): run eagerly, the dozens of small ops would each
  # compile on first use (seconds for a new shape); inside a trace it inlines.
  return _quantize_jit(jnp.asarray(x), spec, key, amax, amin, tensor_amax)


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_jit(x, spec, key, amax, amin, tensor_amax):
  shape, dtype = tuple(x.shape), x.dtype
  xp, spec, bs, valid, pa = _prepare(x, spec)
  q, total, s_stored, zp, tscale, _ = _grid(xp, spec, bs, valid, key, amax, amin,
                                            tensor_amax)
  fmt = spec.storage_format
  codes = encode(q, fmt)
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
  return _dequantize_jit(q)


@jax.jit
def _dequantize_jit(q: QArray) -> jax.Array:
  spec = q.spec
  fmt = spec.storage_format
  codes = unpack(q.codes, fmt, q.pack_axis)
  vals = decode(codes, fmt)
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
  total = _scale_value(q.scale, spec.scale_dtype)
  if q.tensor_scale is not None:
    total = q.tensor_scale * total
  out = _values(vals, total, q.zero_point, bs, shape)
  out = out[tuple(slice(0, min(d, s)) for d, s in zip(q.shape, shape))]
  return out.astype(q.dtype)


def _fake_quant_impl(x, spec, key, amax, amin, tensor_amax):
  shape, dtype = x.shape, x.dtype
  xp, spec, bs, valid, _ = _prepare(x, spec)
  q, total, _, zp, _, clipped = _grid(xp, spec, bs, valid, key, amax, amin,
                                      tensor_amax)
  out = _values(q, total, zp, bs, xp.shape)
  sl = tuple(slice(0, d) for d in shape)
  return out[sl].astype(dtype), clipped[sl]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quant(x, spec, key, amax, amin, tensor_amax):
  return _fake_quant_impl(x, spec, key, amax, amin, tensor_amax)[0]


def _fq_fwd(x, spec, key, amax, amin, tensor_amax):
  y, clipped = _fake_quant_impl(x, spec, key, amax, amin, tensor_amax)
  return y, (clipped, key, amax, amin, tensor_amax)


def _fq_bwd(spec, res, g):
  clipped, key, amax, amin, tensor_amax = res
  del spec
  gx = jnp.where(clipped, jnp.zeros_like(g), g)
  zero = lambda v: None if v is None else jnp.zeros_like(v)  # noqa: E731
  key_ct = None if key is None else np.zeros(key.shape, jax.dtypes.float0)
  return gx, key_ct, zero(amax), zero(amin), zero(tensor_amax)


_fake_quant.defvjp(_fq_fwd, _fq_bwd)


def fake_quant(x: jax.Array, spec=None, *, key: Optional[jax.Array] = None,
               amax: Optional[jax.Array] = None, amin: Optional[jax.Array] = None,
               tensor_amax: Optional[jax.Array] = None,
               **spec_kwargs) -> jax.Array:
  """Quantize-dequantize with a straight-through gradient.

  The values equal ``dequantize(quantize(x, spec))``. The gradient passes
  straight through (Bengio et al. 2013) inside the representable range and is
  zero where values were clipped; the scale is treated as a constant.

  Args: as ``quantize``.

  Returns:
    An array of x's shape and dtype.
  """
  spec = as_spec(spec, **spec_kwargs)
  _check_tensor_amax(spec, amax, tensor_amax)
  x = jnp.asarray(x)
  if key is not None and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key) if key.dtype == jnp.uint32 else key
  return _fake_quant(x, spec, key, amax, amin, tensor_amax)
