"""Rounding to a number format's grid, emulated with integer ops on float32 bits.

One generic ExMy emulation serves every float format. It works on the IEEE bits
of float32 with integer arithmetic only, so it does not depend on how a backend
treats float32 subnormals (XLA on CPU flushes them), and it agrees bit for bit
with ml_dtypes for every type ml_dtypes has (tests/core/test_cast.py checks every
representable value, every midpoint, overflow, underflow, subnormals, +-0, NaN and
+-inf).

Stochastic rounding adds uniform random bits below the kept precision before
truncation, so E[round(x)] = x (Connolly et al. 2021, "Stochastic rounding and
its probabilistic backward error analysis").
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax.formats import FloatFormat, Format, IntFormat, LookupFormat
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


# Formats whose codes ``encode`` takes from XLA's own convert: grid values
# (what ``encode`` is given) convert exactly, and the codes are a real output,
# so the convert cannot be elided. Rounding onto the grid never uses it (see
# ``_cast_float_rp``). XLA's CPU convert to the 6 and 4-bit types does not
# compile today; on CPU the convert is slower than the vectorized emulation
# (measured: twice the time on [2048, 2048]), so the CPU keeps the emulation
# unless asked.
_NATIVE_SATURATING = {("fp8_e4m3", 4, 3, 7, "fn"): jnp.float8_e4m3fn,
                      ("fp8_e5m2", 5, 2, 15, "ieee"): jnp.float8_e5m2}
_NATIVE_ON_CPU = False  # tests set it to check the native path on CPU


def _native_dtype(fmt: Format):
  """The jnp float8 dtype whose convert replaces the emulation, or None."""
  if not isinstance(fmt, FloatFormat):
    return None
  if not _NATIVE_ON_CPU and jax.default_backend() == "cpu":
    return None
  return _NATIVE_SATURATING.get((fmt.name, fmt.exp_bits, fmt.man_bits, fmt.bias,
                                 fmt.special))


def _reduce_precision_ok(fmt: Format) -> bool:
  """Whether ``_cast_float_rp`` rounds ``fmt`` (saturating, to nearest even).

  Saturating rounding clamps to ``+-fmt.max`` and keeps NaN in every format,
  so only the grid matters: formats without inf/NaN codes (``"none"``: FP6,
  FP4) round the same way as ``"fn"``/``"ieee"`` ones, at a quarter of the
  emulation's integer ops (the emulation's count-leading-zeros chain kept the
  FP4/FP6 kernels compute-bound on the GPU). The format's exponents must lie
  in ReducePrecision's normal range (one bit wider, standard bias): a bias in
  ``[0, 2**exp_bits - 1]``; a custom format biased beyond it takes the
  emulation (ReducePrecision would overflow its top values to inf or flush
  its smallest to 0). The subnormal step ``2**-(bias - 1 + man_bits)`` must
  have a float32 reciprocal (a larger one is inf: 0 * inf gives NaN), and
  the format needs a mantissa bit: with none, ReducePrecision rounds ties
  down where the emulation (and ml_dtypes' e8m0) round them up.
  """
  return (isinstance(fmt, FloatFormat) and fmt.special in ("fn", "ieee", "none")
          and fmt.exp_bits <= 7 and 0 <= fmt.bias <= 2 ** fmt.exp_bits - 1
          and fmt.man_bits >= 1 and fmt.bias - 1 + fmt.man_bits <= 126)


def _cast_float_rp(x: jax.Array, fmt: FloatFormat) -> jax.Array:
  """Saturating round-to-nearest-even onto ``fmt``'s grid with XLA's ReducePrecision.

  Bit-exact with the integer emulation below (tests/core/test_fused.py checks
  it densely) and cheaper, on every backend. Normal values round with
  ``lax.reduce_precision`` to ``fmt``'s mantissa in a type one exponent bit
  wider (so no finite value of ``fmt`` overflows it, and its normals cover
  ``fmt``'s subnormal binades); values below ``fmt``'s smallest normal round
  onto the fixed subnormal spacing with ``round``. Not
  ``x.astype(float8).astype(float32)``: XLA on the GPU elides a narrowing
  convert that is converted straight back (it allows excess precision), so
  that pair leaves the input unrounded; ReducePrecision is never elided.
  """
  m = np.float32(fmt.max)
  y = jnp.clip(x, -m, m)
  n = lax.reduce_precision(y, exponent_bits=min(fmt.exp_bits + 1, 8),
                           mantissa_bits=fmt.man_bits)
  k = fmt.bias - 1 + fmt.man_bits  # subnormals are multiples of 2**-k
  sub = jnp.round(y * np.float32(2.0 ** k)) * np.float32(2.0 ** -k)
  r = jnp.where(jnp.abs(y) < np.float32(fmt.min_normal), sub, n)
  return jnp.where(jnp.isnan(x), _nan_with_sign(x), r)


def _nan_with_sign(x: jax.Array) -> jax.Array:
  """The emulation's NaN for a float32 NaN input: quiet, with its sign."""
  return _bits_f32((_f32_bits(x) & _U32(0x80000000)) | _U32(0x7FC00000))


def _cast_float(x: jax.Array, fmt: FloatFormat, saturate: bool,
                noise: Optional[jax.Array]) -> jax.Array:
  if saturate and noise is None and _reduce_precision_ok(fmt) and x.dtype == jnp.float32:
    return _cast_float_rp(x, fmt)
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


@functools.lru_cache(maxsize=None)
def _float_format_of(dtype) -> Optional[FloatFormat]:
  """The FloatFormat with ``dtype``'s semantics (float16 and the ml_dtypes
  narrow floats), None for bfloat16 (rounded by ReducePrecision) and others."""
  from lowbit_jax.formats import _formats  # pylint: disable=import-outside-toplevel
  dt = jnp.dtype(dtype)
  if dt == jnp.dtype(jnp.float16):
    return FloatFormat(5, 10, 15, "ieee", name="float16")
  for (e, m, b, sp), ml in _formats._ML_DTYPE_BY_KEY.items():  # pylint: disable=protected-access
    if dt == jnp.dtype(ml):
      return FloatFormat(e, m, b, sp, name=dt.name)
  return None


def round_to_dtype(x: jax.Array, dtype) -> jax.Array:
  """``x`` rounded to ``dtype``'s values and kept in ``x``'s dtype: what
  ``x.astype(dtype).astype(x.dtype)`` gives on CPU, in a form no backend
  drops.

  XLA on the GPU allows excess precision: a narrowing float convert that is
  converted straight back inside one program is removed (its
  SimplifyFPConversions pass), so that pair leaves ``x`` unrounded there
  (the interpreted dequantizer's bf16 values, written as float32, came back
  unrounded in an H100 run of session 55). Bfloat16 rounds with ReducePrecision (same
  exponent width as float32: bit for bit, subnormals included); float16
  with ReducePrecision and its subnormals apart (ReducePrecision flushes
  them); the ml_dtypes narrow floats with ``_cast_float``'s emulation; all
  bit for bit with their converts (tests/core/test_cast.py). A ``dtype`` at
  least as wide as ``x``'s, or a non-float one, is the plain pair (nothing
  to drop). A float64 ``x`` (x64 mode) rounds through float32, as XLA's
  convert from float64 to a narrower type does on CPU (twice). Its
  derivative is the identity (the subnormal ``round`` and the emulation's
  bit operations have none; the convert pair would round the cotangent).
  """
  dt, src = jnp.dtype(dtype), jnp.dtype(x.dtype)
  floats = jnp.issubdtype(dt, jnp.floating) and jnp.issubdtype(src, jnp.floating)
  if not floats or dt == src:
    return x.astype(dt).astype(src)
  fi, fs = jnp.finfo(dt), jnp.finfo(src)
  if fi.nmant >= fs.nmant and fi.maxexp >= fs.maxexp and fi.minexp <= fs.minexp:
    return x  # every value of x's dtype is one of dtype's
  if src.itemsize > 4:  # float64 (x64 mode): through float32 (see above)
    return round_to_dtype(x.astype(jnp.float32), dt).astype(src)
  if dt != jnp.dtype(jnp.bfloat16) and _float_format_of(dt) is None:
    raise ValueError(f"round_to_dtype: no rounding for {dt.name}; it rounds "
                     f"to bfloat16, float16 and the ml_dtypes narrow floats")
  return _round_to(x, dt)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _round_to(x: jax.Array, dt) -> jax.Array:
  """``round_to_dtype``'s rounding of a 16/32-bit float ``x`` to ``dt``."""
  src = x.dtype
  x32 = x.astype(jnp.float32)
  if dt == jnp.dtype(jnp.bfloat16):
    r = lax.reduce_precision(x32, exponent_bits=8, mantissa_bits=7)
  elif dt == jnp.dtype(jnp.float16):
    # ReducePrecision for normals (and overflow to inf), float16's fixed
    # subnormal spacing 2**-24 with round (half to even) below 2**-14.
    n = lax.reduce_precision(x32, exponent_bits=5, mantissa_bits=10)
    sub = jnp.round(x32 * np.float32(2.0 ** 24)) * np.float32(2.0 ** -24)
    r = jnp.where(jnp.abs(x32) < np.float32(2.0 ** -14), sub, n)
  else:
    r = _cast_float(x32, _float_format_of(dt), False, None)
  return r.astype(src)


@_round_to.defjvp
def _round_to_jvp(dt, primals, tangents):
  (x,), (t,) = primals, tangents
  return _round_to(x, dt), t


# Whether ``astype_holding`` (and the quantizer's ``_f32_of``) round a
# widened 16-bit value again. "auto": on every backend but CPU, whose XLA
# keeps a convert pair (there the rounding would change no bit; its cost
# is experiments/bench_narrow_rounding.py's); True / False force it (tests
# force it on CPU under tests/_excess_precision.py's emulation of the GPU).
_KEEP_NARROW_ROUNDING = "auto"


def keeps_narrow_rounding() -> bool:
  """Whether widened narrow values are rounded again (``_KEEP_NARROW_ROUNDING``)."""
  on = _KEEP_NARROW_ROUNDING
  return jax.default_backend() != "cpu" if on == "auto" else bool(on)


def astype_holding(v: jax.Array, dtype) -> jax.Array:
  """``v.astype(dtype)`` that holds ``v``'s values where ``dtype`` is a wider
  float: a bf16 ``v`` made in the same program (a dequantized or fake
  quantized operand, a cast activation) reaches XLA on a GPU as the float32
  value it was narrowed from, and its widening would hand that on unrounded;
  ``round_to_dtype`` after the widening keeps ``v``'s rounding."""
  out = v.astype(dtype)
  if (out.dtype != v.dtype and jnp.issubdtype(out.dtype, jnp.floating)
      and jnp.issubdtype(v.dtype, jnp.floating)
      and out.dtype.itemsize > v.dtype.itemsize and keeps_narrow_rounding()):
    out = round_to_dtype(out, v.dtype)
  return out


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


_SHORT_TABLE = 32  # lookup tables up to this long round with fused select chains


def _table_at(table: tuple, idx: jax.Array, start: int = 0) -> jax.Array:
  """``table[idx + start]`` (float32) for int32 indices in range, as a select chain.

  A short static table: a few fused selects per element, where a gather
  would not fuse on CPU.
  """
  out = jnp.full(idx.shape, np.float32(table[start]), jnp.float32)
  for i in range(1, len(table) - start):
    out = jnp.where(idx == i, np.float32(table[i + start]), out)
  return out


def _f32_order(v: np.ndarray) -> np.ndarray:
  """float32 -> int64 keys in the floats' order (-0 and +0 both map to 0)."""
  u = np.asarray(v, np.float32).view(np.uint32).astype(np.int64)
  return np.where(u >= 1 << 31, -(u - (1 << 31)), u)


def _f32_from_order(k: np.ndarray) -> np.ndarray:
  k = np.asarray(k, np.int64)
  u = np.where(k < 0, (-k) + (1 << 31), k)
  return u.astype(np.uint32).view(np.float32)


@functools.lru_cache(maxsize=None)
def _nearest_thresholds(table: tuple) -> np.ndarray:
  """For each gap of a sorted table, the smallest float32 that rounds up.

  ``lookup_round_index``'s nearest rounding picks the upper entry of the gap
  ``[t[i], t[i+1])`` holding x where ``|t[i+1] - x| < |x - t[i]|`` in float32
  arithmetic (ties to the even index). Both sides are monotone in x, so the
  choice flips once: at ``c[i]``, found here by bisection over the float32
  values of the gap with numpy's (IEEE) float32 arithmetic, and the index is
  then the number of thresholds ``<= x``.
  """
  t = np.asarray(table, np.float32)
  out = []
  for i in range(len(t) - 1):
    lo, hi = t[i], t[i + 1]

    def up(k, lo=lo, hi=hi, i=i):
      x = _f32_from_order(k)
      dl = np.abs(np.float32(x - lo))
      dh = np.abs(np.float32(hi - x))
      return bool((dh < dl) or (dh == dl and i % 2 == 1))

    a, b = int(_f32_order(lo)), int(_f32_order(hi))  # up(a) is False, up(b) True
    while b - a > 1:
      mid = (a + b) // 2
      if up(mid):
        b = mid
      else:
        a = mid
    out.append(_f32_from_order(b))
  return np.asarray(out, np.float32)


def select_tree(bits: list, vals: list):
  """``vals[p]`` where ``p`` is the number whose binary digits are ``bits``
  (most significant first; ``len(vals) == 2**len(bits)``): a tree of
  ``len(vals) - 1`` selects, the last bit's pairs first."""
  for b in reversed(bits):
    vals = [jnp.where(b, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
  return vals[0]


def bisect_bits(y: jax.Array, thresholds) -> list:
  """The binary digits (most significant first) of the number of sorted
  ``thresholds`` at or below ``y``, by binary search.

  L = ``len(thresholds).bit_length()`` comparisons, each against the
  threshold the digits found so far select (``select_tree``), the list padded
  with NaN to ``2**L - 1`` (a NaN threshold compares false, as one above
  every value would). The same count as one comparison per threshold summed,
  for every float32 ``y`` (NaN: 0): NF4's 15 thresholds take 4 comparisons
  and 11 selects instead of 15 comparisons, conversions and additions, and
  its value 15 more selects instead of a chain of 15 comparisons and selects
  (on CPU a bf16 [2048, 2048] NF4 quantize 1.3x and fake_quant 1.4x faster:
  benchmarks/cpu_nf4_bisect.md).
  """
  c = [np.float32(v) for v in thresholds]
  levels = max(1, len(c).bit_length())
  c += [np.float32(np.nan)] * ((1 << levels) - 1 - len(c))
  bits = []
  for lvl in range(levels):
    step = 1 << (levels - 1 - lvl)
    # For each prefix p of the digits found so far, the last threshold of
    # the lower half of the index range p leaves.
    bits.append(y >= select_tree(bits, [c[p * 2 * step + step - 1]
                                        for p in range(1 << lvl)]))
  return bits


# On CPU short codebooks round by ``bisect_bits`` (``_LOOKUP_BISECT``);
# elsewhere, or off, by one comparison per threshold, summed (the same
# indices and values). Not on GPU: for XLA's GPU compiler (deviceless H200
# target, experiments/gpu_fusion_survey.py) the search's first comparison
# went into the amax reduction's fusion and was written out, NF4 fake_quant
# moving 566 MB against 432.
_LOOKUP_BISECT = True


def _bisect_here() -> bool:
  return _LOOKUP_BISECT and jax.default_backend() == "cpu"


def _threshold_index(xf: jax.Array, table: tuple) -> jax.Array:
  """Nearest-entry index (int32) of float32 ``xf`` in a short table; NaN -> 0."""
  c = _nearest_thresholds(table)
  if not _bisect_here():
    return sum((xf >= v).astype(jnp.int32) for v in c)
  return bits_value(bisect_bits(xf, c), np.int32)


def bits_value(bits: list, dtype) -> jax.Array:
  """The number whose binary digits (most significant first) are the boolean
  arrays ``bits``, in integer ``dtype``: an OR of selected powers of two."""
  idx = None
  for lvl, b in enumerate(bits):
    term = jnp.where(b, dtype(1 << (len(bits) - 1 - lvl)), dtype(0))
    idx = term if idx is None else idx | term
  return idx


def _nearest_value(xf: jax.Array, table: tuple) -> jax.Array:
  """The nearest entry (float32) of float32 ``xf`` in a short table (NaN:
  ``table[0]``): ``table[_threshold_index(xf, table)]``, through the same
  digits' select tree where ``_bisect_here()``."""
  if not _bisect_here():
    return _table_at(table, _threshold_index(xf, table))
  bits = bisect_bits(xf, _nearest_thresholds(table))
  vals = [np.float32(v) for v in table]
  vals += [vals[-1]] * ((1 << len(bits)) - len(vals))
  return select_tree(bits, vals)


def lookup_round_index(x: jax.Array, fmt: LookupFormat, noise=None) -> jax.Array:
  """Index of the nearest table entry (ties to the even index), as int32."""
  table = fmt.table
  n = len(table)
  xf = x.astype(jnp.float32)
  if noise is None and n <= _SHORT_TABLE:
    # One comparison per gap against its precomputed threshold: the same
    # index as the distance comparison below (_nearest_thresholds), at a
    # fifth of the ops (NF4's quantize was compute-bound on the GPU).
    return jnp.where(jnp.isnan(xf), n - 2, _threshold_index(xf, table))
  # Index of the largest entry <= x (clamped into [0, n-2] so hi exists).
  if n <= _SHORT_TABLE:
    # A count of comparisons and select chains: fused, no loop, no gather.
    count = sum((xf >= np.float32(t)).astype(jnp.int32) for t in table)
  else:
    # Long tables (8-bit codebooks: 256 entries) would make that thousands of
    # ops per element, and an HLO so large that compiling an optimizer over a
    # model's moments takes minutes and gigabytes: an unrolled binary search
    # (log2 n compares) and a gather instead. Same indices.
    t32 = jnp.asarray(table, jnp.float32)
    count = jnp.searchsorted(t32, xf, side="right", method="scan_unrolled").astype(
        jnp.int32)
  count = jnp.where(jnp.isnan(xf), n, count)  # searchsorted puts NaN last
  lo_idx = jnp.clip(count - 1, 0, n - 2)
  if n <= _SHORT_TABLE:
    lo = _table_at(table, lo_idx)
    hi = _table_at(table, lo_idx, start=1)
  else:
    lo, hi = jnp.take(t32, lo_idx), jnp.take(t32, lo_idx + 1)
  if noise is None:
    dl = jnp.abs(xf - lo)
    dh = jnp.abs(hi - xf)
    pick_hi = (dh < dl) | ((dh == dl) & (lo_idx % 2 == 1))
  else:
    u = (noise >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    frac = jnp.clip((xf - lo) / (hi - lo), 0.0, 1.0)
    pick_hi = u < frac
  idx = jnp.where(pick_hi, lo_idx + 1, lo_idx)
  idx = jnp.where(xf <= np.float32(table[0]), 0, idx)
  idx = jnp.where(xf >= np.float32(table[-1]), n - 1, idx)
  return idx.astype(jnp.int32)


def _cast_lookup(x, fmt: LookupFormat, noise):
  if noise is None and len(fmt.table) <= _SHORT_TABLE:
    # NaN's index does not matter here (its value is NaN): one isnan, or XLA
    # writes the isnan mask out and reads it back (binary on the GPU).
    y = _nearest_value(x.astype(jnp.float32), fmt.table)
    return jnp.where(jnp.isnan(x), jnp.nan, y).astype(x.dtype)
  idx = lookup_round_index(x, fmt, noise)
  if len(fmt.table) <= _SHORT_TABLE:
    y = _table_at(fmt.table, idx)
  else:
    y = jnp.take(jnp.asarray(fmt.table, jnp.float32), idx)
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
      type defines; formats with neither saturate), and NaN in a format without
      a NaN code (FP6, FP4) becomes a zero of the opposite sign (+NaN -> -0.0),
      as ml_dtypes converts it. With it, finite overflow and inf clamp to +-max
      and NaN stays NaN in every format. Integer formats and codebooks keep NaN.
      The table per format is in docs/formats.md ("NaN and inf").
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
    c = jnp.round(y.astype(jnp.float32) * np.float32(2.0 ** fmt.frac_bits)).astype(
        jnp.int32)
    c = jnp.where(jnp.isnan(y), 0, c)
    return (c.astype(_U32) & ((1 << fmt.bits) - 1))
  if isinstance(fmt, LookupFormat):
    return lookup_round_index(y, fmt).astype(_U32)
  if not isinstance(fmt, FloatFormat):
    raise ValueError(f"encode() takes an element format, got {fmt.name!r}")
  native = _native_dtype(fmt)
  if native is not None and y.dtype == jnp.float32:
    # Grid values convert exactly; only NaN and inf need the format's codes.
    s7 = (_f32_bits(y) >> 31) << 7
    c = lax.bitcast_convert_type(
        jnp.where(jnp.isfinite(y), y, 0.0).astype(native), jnp.uint8).astype(_U32)
    if fmt.special == "ieee":  # e5m2: inf and a quiet NaN
      c = jnp.where(jnp.isinf(y), s7 | 0x7C, c)
      return jnp.where(jnp.isnan(y), s7 | 0x7E, c)
    return jnp.where(jnp.isfinite(y), c, s7 | 0x7F)  # e4m3fn: one NaN code
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


def encode_grid(q: jax.Array, fmt: Format) -> jax.Array:
  """``encode`` for what ``quantize`` rounds: finite grid values and NaN.

  With a native float8 type, float32 values within the format's range need
  not be on the grid: the convert rounds them to nearest even (XLA's CPU
  convert and the GPU's ``cvt.rn.satfinite`` round once from float32;
  tests/core/test_fused.py and test_fused_gpu.py check it against the
  emulation).

  The values were rounded saturating (no inf), so with a native float8 type
  the codes are XLA's convert alone: one use of ``q``, which lets XLA fuse the
  rounding into the kernel that writes the codes (``encode``'s separate NaN
  and inf selects made it write the rounded values out and read them back, on
  the GPU). A NaN converts to one of the type's NaN codes; which sign it keeps
  is the compiler's (as a NaN's sign after a division already is).
  """
  native = _native_dtype(fmt)
  if native is not None and q.dtype == jnp.float32:
    return lax.bitcast_convert_type(q.astype(native), jnp.uint8).astype(_U32)
  if _rounds_by_thresholds(fmt) and q.dtype == jnp.float32:
    return encode_nearest(q, fmt)
  if (isinstance(fmt, FloatFormat) and fmt.special in ("fn", "ieee", "none")
      and fmt.man_bits >= 1 and q.dtype == jnp.float32
      and fmt.min_exponent - fmt.man_bits >= -126):
    return _encode_float_grid(q, fmt)
  if isinstance(fmt, LookupFormat) and len(fmt.table) <= _SHORT_TABLE:
    # A grid value equals its table entry: its index is the count of entries
    # below it (a NaN gets lookup_round_index's n - 2).
    t = fmt.table
    idx = sum((q >= np.float32(v)).astype(jnp.int32) for v in t[1:])
    return jnp.where(jnp.isnan(q), len(t) - 2, idx).astype(_U32)
  return encode(q, fmt)


def _rounds_by_thresholds(fmt: Format) -> bool:
  """Whether ``encode_nearest`` takes ``fmt``'s codes (FP4: 8 magnitudes).

  Not formats without mantissa bits (e2m0, e3m0): their ties lie between two
  powers of two, where ``cast`` (like ml_dtypes' e8m0) rounds up in
  magnitude, not to the even code."""
  return (isinstance(fmt, FloatFormat) and fmt.special == "none"
          and fmt.man_bits >= 1 and fmt.exp_bits + fmt.man_bits <= 3)


def encode_nearest(y: jax.Array, fmt: FloatFormat) -> jax.Array:
  """Codes (uint32) of float32 ``y`` within ``+-fmt.max`` (or NaN), rounded to
  nearest even, by comparing ``|y|`` with the midpoints of the grid.

  For formats of a few magnitudes (FP4) this is cheaper than rounding onto
  the grid and encoding the result: quantize needs only the codes. A
  magnitude's code is its index among the format's magnitudes, so the count
  of midpoints below ``|y|`` is the code; at a midpoint itself the tie goes
  to the even code (``>=`` where the upper code is even). Grid values give
  their own codes, so ``encode_grid`` takes this path for them as well. NaN
  codes as ``encode`` does (no NaN code: +NaN -> -0, -NaN -> +0).
  """
  e_, m_ = fmt.exp_bits, fmt.man_bits
  mags = np.unique(np.abs(np.asarray(fmt.decode_table(), np.float64)))
  mags = mags[np.isfinite(mags)]
  a = jnp.abs(y)
  code = None
  for k in range(1, len(mags)):
    mid = np.float32((mags[k - 1] + mags[k]) / 2)  # exact: a few bits each
    up = (a >= mid) if k % 2 == 0 else (a > mid)
    term = up.astype(_U32)
    code = term if code is None else code + term
  s = _f32_bits(y) >> 31
  code = (s << (e_ + m_)) | code
  return jnp.where(jnp.isnan(y), (1 - s) << (e_ + m_), code)


def _encode_float_grid(q: jax.Array, fmt: FloatFormat) -> jax.Array:
  """``encode`` of finite grid values and NaN, from the float32 bits directly.

  A normal grid value's code is its float32 exponent and top mantissa bits
  shifted down, less the difference of the biases (one shift and one
  subtraction); a subnormal one's is ``|q| / 2**(emin - m)``, an exact small
  integer (the format's subnormals are normal float32 numbers here). The
  generic ``encode`` normalizes with a count-leading-zeros chain, which made
  FP4/FP6 quantize compute-bound on the GPU.
  """
  e_, m_ = fmt.exp_bits, fmt.man_bits
  u = _f32_bits(q)
  s = u >> 31
  a = u & 0x7FFFFFFF
  normal = a >= _U32(int(np.float32(fmt.min_normal).view(np.uint32)))
  mag_n = (a >> (23 - m_)) - _U32((127 - fmt.bias) << m_)
  inv_step = np.float32(2.0 ** (m_ - fmt.min_exponent))  # exact: a power of two
  mag_s = (_bits_f32(a) * inv_step).astype(jnp.int32).astype(_U32)
  code = (s << (e_ + m_)) | jnp.where(normal, mag_n, mag_s)
  is_nan = a > 0x7F800000
  if fmt.special == "ieee":
    nan_code = (s << (e_ + m_)) | _U32((((1 << e_) - 1) << m_) | (1 << (m_ - 1)))
  elif fmt.special == "fn":
    nan_code = (s << (e_ + m_)) | _U32((1 << (e_ + m_)) - 1)
  else:  # no NaN code: as ml_dtypes, +NaN codes -0 and -NaN codes +0
    nan_code = (1 - s) << (e_ + m_)
  return jnp.where(is_nan, nan_code, code)


def _float_bits_decode(c: jax.Array, fmt: FloatFormat) -> jax.Array:
  """float32 values of codes ``c`` (uint32) of a float format from its bits;
  the format's inf and NaN codes (read off its ``decode_table``) are patched
  in afterwards.

  The magnitude bits go under float32's exponent field with the bias
  difference added: a normal code's value exactly. A subnormal code
  (exponent 0) gets exponent 1 instead, i.e. ``2**(1 - bias) * (1 + f)``,
  and then ``2**(1 - bias)`` subtracted, which leaves ``2**(1 - bias) * f``
  exactly (two floats within a factor of two subtract without rounding); no
  float32 subnormal occurs on the way (XLA's CPU backend flushes those).
  About 10 operations against the 17 of decoding sign, exponent and
  mantissa fields separately; bit for bit the same values, -0 included.
  """
  if fmt.bias > 127:
    # Its normals reach below float32's (exponent 1 - bias < -126): the bit
    # construction below would need float32 subnormals on the way, which
    # XLA's CPU backend flushes. A select chain over the decoded table (these
    # formats are narrow: at most 128 codes) keeps the exact values.
    table = fmt.decode_table()
    if len(table) > 256:
      return jnp.asarray(table)[c.astype(jnp.int32)]
    return _table_at(tuple(table), jnp.minimum(c, np.uint32(len(table) - 1)).astype(
        jnp.int32))
  e_, m_ = fmt.exp_bits, fmt.man_bits
  nb = e_ + m_
  mag = c & np.uint32((1 << nb) - 1)
  sub = mag < np.uint32(1 << m_)
  bits = ((mag << np.uint32(23 - m_)) + np.uint32((127 - fmt.bias) << 23)
          + jnp.where(sub, np.uint32(1 << 23), np.uint32(0)))
  v = (lax.bitcast_convert_type(bits, jnp.float32)
       - jnp.where(sub, np.float32(2.0 ** (1 - fmt.bias)), np.float32(0.0)))
  sign = (c >> np.uint32(nb)) << np.uint32(31)
  v = lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.uint32) | sign,
                               jnp.float32)
  table = fmt.decode_table()
  for code in np.flatnonzero(~np.isfinite(table)):
    v = jnp.where(c == np.uint32(code), np.float32(table[code]), v)
  return v


def _lookup_decode(c: jax.Array, fmt: LookupFormat) -> jax.Array:
  """Codebook values: a tree of selects on the code's bits where the table
  fills the code space, else a chain that clamps codes past the end to the
  last value (as ``decode``'s gather does)."""
  t = [np.float32(v) for v in fmt.table]
  bits = fmt.bits
  if len(t) == 1 << bits:
    level = t
    for j in range(bits):
      bit = (c & np.uint32(1 << j)) != np.uint32(0)
      level = [jnp.where(bit, level[i + 1], level[i])
               for i in range(0, len(level), 2)]
    return level[0]
  return _table_at(fmt.table, jnp.minimum(c, np.uint32(len(t) - 1)).astype(jnp.int32))


def decode_arith(codes: jax.Array, fmt: Format) -> jax.Array:
  """``decode`` from arithmetic and selects only, no gather: what a Pallas
  kernel body can run (lowbit_jax.kernels.gpu_dequantize), and what
  ``decode`` uses for integers, and on CPU for floats narrower than 8 bits,
  where XLA's CPU backend ran a table gather slower (dequantize of MXFP4, fp4,
  fp6, MXFP6 and NVFP4 1.3-4.1x faster without it:
  benchmarks/cpu_decode_s26/README.md). Integers by sign extension, floats
  from their fields (``decode_table``'s inf and NaN codes patched in),
  codebooks by a tree of selects on the code's bits where the table fills
  the code space, else ``_table_at``'s chain on the clamped code.

  Args:
    codes: unsigned codes below ``2**fmt.bits`` (any integer dtype).
    fmt: an element format (IntFormat, FloatFormat, LookupFormat).
  """
  c = codes.astype(jnp.uint32)
  if isinstance(fmt, IntFormat):
    ci = c.astype(jnp.int32)
    if fmt.signed:
      ci = jnp.where(ci >= (1 << (fmt.bits - 1)), ci - (1 << fmt.bits), ci)
    v = ci.astype(jnp.float32)
    return v * np.float32(2.0 ** -fmt.frac_bits) if fmt.frac_bits else v
  if isinstance(fmt, LookupFormat):
    return _lookup_decode(c, fmt)
  if isinstance(fmt, FloatFormat):
    return _float_bits_decode(c, fmt)
  raise ValueError(f"decode_arith() takes an element format, got {fmt.name!r}")


def decode(codes: jax.Array, fmt: Format) -> jax.Array:
  """float32 values of codes (inverse of ``encode``)."""
  codes = codes.astype(jnp.int32)
  if isinstance(fmt, IntFormat):
    return decode_arith(codes & ((1 << fmt.bits) - 1), fmt)
  if isinstance(fmt, LookupFormat):
    return jnp.asarray(fmt.table, jnp.float32)[codes]
  if isinstance(fmt, FloatFormat):
    if fmt.bits < 8 and jax.default_backend() == "cpu":
      return decode_arith(codes, fmt)
    # On the GPU the table gather is the faster XLA program: with the
    # arithmetic decode, bf16 8192^2 dequantize on the H200 took 100 us for
    # NVFP4 (83 with the gather) and 98 for fp6 e2m3 (82)
    # (benchmarks/primitives_h200.md against primitives_h200_20261204.md).
    return jnp.asarray(fmt.decode_table())[codes]
  raise ValueError(f"decode() takes an element format, got {fmt.name!r}")
