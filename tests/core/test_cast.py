"""lowbit_jax.cast / encode / decode: bit-exact against ml_dtypes and numpy references.

For every ml_dtypes type the generic ExMy emulation must give the same float32
bits as ml_dtypes' own cast (NaN bits included), and ``encode`` the same codes
as ml_dtypes' bytes, on: every representable value, every rounding midpoint and
+-1 float32 ulp around each of them, overflow, underflow, subnormals, +-0, NaN,
+-inf, every bfloat16 bit pattern and 2**20 random float32 bit patterns. Inputs
in float16 and bfloat16 are checked on all their 65536 bit patterns.
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import formats as F
from lowbit_jax.core import decode, encode

ML_TYPES = [
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn),
    ("fp8_e5m2", ml_dtypes.float8_e5m2),
    ("fp8_e4m3fnuz", ml_dtypes.float8_e4m3fnuz),
    ("fp8_e5m2fnuz", ml_dtypes.float8_e5m2fnuz),
    ("fp8_e4m3b11fnuz", ml_dtypes.float8_e4m3b11fnuz),
    ("fp8_e3m4", ml_dtypes.float8_e3m4),
    ("fp8_e4m3ieee", ml_dtypes.float8_e4m3),
    ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
    ("fp6_e3m2", ml_dtypes.float6_e3m2fn),
    ("fp4_e2m1", ml_dtypes.float4_e2m1fn),
    ("e8m0", ml_dtypes.float8_e8m0fnu),
]
IDS = [n for n, _ in ML_TYPES]


def _quiet():
  """numpy warns on NaN/overflow casts; those are the point here."""
  ctx = warnings.catch_warnings()
  ctx.__enter__()
  warnings.simplefilter("ignore", RuntimeWarning)
  return ctx


def _ml(x: np.ndarray, dt) -> np.ndarray:
  ctx = _quiet()
  try:
    with np.errstate(all="ignore"):
      return x.astype(dt)
  finally:
    ctx.__exit__(None, None, None)


@functools.lru_cache(maxsize=None)
def _jit_cast(name, saturate):
  return jax.jit(lambda v: lb.cast(v, name, saturate=saturate))


@functools.lru_cache(maxsize=None)
def _jit_encode(name):
  fmt = F.get(name)
  return jax.jit(lambda v: encode(lb.cast(v, fmt), fmt))


def _f32(bits) -> np.ndarray:
  return np.asarray(bits, np.uint32).view(np.float32)


def _ulp_neighbours(v: np.ndarray) -> np.ndarray:
  v = v.astype(np.float32)
  return np.concatenate([v, np.nextafter(v, np.float32(np.inf)),
                         np.nextafter(v, np.float32(-np.inf))])


def _grid_inputs(fmt) -> np.ndarray:
  """Representable values, midpoints, overflow/underflow points, +-1 ulp around."""
  vals = fmt.values().astype(np.float64)  # finite, sorted
  pos = np.unique(np.abs(vals))
  mids = (pos[1:] + pos[:-1]) / 2  # exact in float32: few significant bits
  top_step = 2.0 ** (fmt.max_exponent - fmt.man_bits)
  over = np.array([fmt.max + top_step / 2, fmt.max + top_step, 2 * fmt.max,
                   fmt.max * 1.5])
  under = np.array([fmt.min_subnormal / 2, fmt.min_subnormal / 4,
                    fmt.min_subnormal * 0.75, fmt.min_subnormal * 1.5])
  mag = np.concatenate([pos, mids, over, under])
  with np.errstate(over="ignore"):  # e8m0: 2 * max is beyond float32 (inf)
    mag = _ulp_neighbours(mag.astype(np.float32))
  return np.concatenate([mag, -mag])


def _special_inputs() -> np.ndarray:
  bits = [0x00000000, 0x80000000,  # +-0
          0x7F800000, 0xFF800000,  # +-inf
          0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFBFFFFF, 0x7FFFFFFF,  # NaNs
          0x7F7FFFFF, 0xFF7FFFFF,  # +-float32 max
          0x00800000, 0x80800000,  # +-smallest normal
          0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00400000,  # subnormals
          0x3F800000, 0xBF800000]
  return _f32(bits)


def _random_bits(n=1 << 20, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return _f32(rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32))


def _in_range_random(fmt, n=1 << 16, seed=1) -> np.ndarray:
  """Random values log-uniform over (and a little beyond) the format's range."""
  rng = np.random.default_rng(seed)
  lo = np.log2(fmt.min_subnormal) - 3
  hi = np.log2(fmt.max) + 2
  with np.errstate(over="ignore"):  # e8m0: some land beyond float32 (inf)
    mag = np.exp2(rng.uniform(lo, hi, n)).astype(np.float32)
  return np.where(rng.random(n) < 0.5, -mag, mag).astype(np.float32)


def _all_bf16_as_f32() -> np.ndarray:
  return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


def _all_inputs(fmt) -> np.ndarray:
  return np.concatenate([_special_inputs(), _grid_inputs(fmt), _all_bf16_as_f32(),
                         _in_range_random(fmt), _random_bits()])


def _assert_same_bits(x, got, ref, what):
  got_b = np.asarray(got).view(np.uint32 if got.dtype.itemsize == 4 else np.uint16)
  ref_b = np.asarray(ref).view(got_b.dtype)
  bad = np.nonzero(got_b != ref_b)[0]
  if bad.size:
    i = bad[:8]
    raise AssertionError(
        f"{what}: {bad.size} of {x.size} differ; inputs {x[i]!r} "
        f"(bits {[hex(v) for v in np.asarray(x).view(np.uint32 if x.dtype.itemsize == 4 else np.uint16)[i]]}) "
        f"ref {ref[i]!r} got {np.asarray(got)[i]!r}")


@pytest.mark.parametrize("name,dt", ML_TYPES, ids=IDS)
def test_cast_bit_exact_vs_ml_dtypes(name, dt):
  fmt = F.get(name)
  assert fmt.ml_dtype is dt
  x = _all_inputs(fmt)
  assert x.size >= (1 << 20) + (1 << 16)
  ref = _ml(x, dt).astype(np.float32)
  got = np.asarray(_jit_cast(name, False)(x))
  assert got.dtype == np.float32
  _assert_same_bits(x, got, ref, f"cast to {name}")


@pytest.mark.parametrize("name,dt", ML_TYPES, ids=IDS)
def test_encode_codes_equal_ml_dtypes_bytes(name, dt):
  fmt = F.get(name)
  x = _all_inputs(fmt)
  ref = _ml(x, dt).view(np.uint8)
  got = np.asarray(_jit_encode(name)(x))
  assert got.dtype == np.uint32
  bad = np.nonzero(got != ref)[0]
  assert bad.size == 0, (name, x[bad[:8]], ref[bad[:8]], got[bad[:8]])


@pytest.mark.parametrize("name,dt", ML_TYPES, ids=IDS)
def test_decode_every_code(name, dt):
  fmt = F.get(name)
  codes = np.arange(1 << fmt.bits, dtype=np.uint32)
  got = np.asarray(jax.jit(lambda c: decode(c, fmt))(codes))
  ref = codes.astype(np.uint8).view(dt).astype(np.float32)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  ok = ~np.isnan(ref)
  _assert_same_bits(codes[ok].view(np.float32), got[ok], ref[ok], f"decode {name}")
  # encode inverts decode on every non-NaN code (fnuz has no -0: code 0x80 is NaN).
  back = np.asarray(jax.jit(lambda v: encode(v, fmt))(got[ok]))
  np.testing.assert_array_equal(back, codes[ok])


def test_e8m0_rounds_float32_subnormals_to_the_nearer_power_of_two():
  """Between 2**-127 and 2**-126 (float32 subnormals) the nearer one wins.

  Independent of ml_dtypes (which before 0.7 sent all of (2**-127, 2**-126) up):
  the tie 1.5 * 2**-127 goes up, as every e8m0 tie does; below 2**-127 the
  smallest code is the answer (e8m0 has no zero).
  """
  lo, hi = 2.0 ** -127, 2.0 ** -126
  bits = np.array([0x400000, 0x400001, 0x5FFFFF, 0x600000, 0x600001, 0x7FFFFF,
                   0x200000, 0x3FFFFF, 0x000001], np.uint32)
  want = np.array([lo, lo, lo, hi, hi, hi, lo, lo, lo], np.float32)
  got = np.asarray(_jit_cast("e8m0", False)(_f32(bits)))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("in_dtype", [np.float16, ml_dtypes.bfloat16],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name,dt", ML_TYPES, ids=IDS)
def test_cast_half_precision_inputs(name, dt, in_dtype):
  bits = np.arange(1 << 16, dtype=np.uint16)
  x = bits.view(in_dtype)
  got = np.asarray(_jit_cast(name, False)(jnp.asarray(x)))
  assert got.dtype == in_dtype
  # ml_dtypes casts the 16-bit input directly (no float32 detour) and back.
  # e8m0 codes above float16's range come back as inf (ml_dtypes >= 0.7 warns).
  with np.errstate(over="ignore"):
    ref = _ml(x, dt).astype(in_dtype)
  ref_nan = np.isnan(ref.astype(np.float32))
  got_nan = np.isnan(got.astype(np.float32))
  np.testing.assert_array_equal(got_nan, ref_nan)
  _assert_same_bits(x[~ref_nan], got[~ref_nan], ref[~ref_nan], f"{name} from {in_dtype}")


@pytest.mark.parametrize("name,dt", ML_TYPES, ids=IDS)
def test_cast_saturate(name, dt):
  """saturate=True: finite overflow and inf clamp to +-max, NaN stays NaN."""
  fmt = F.get(name)
  x = np.concatenate([_special_inputs(), _grid_inputs(fmt), _all_bf16_as_f32(),
                      _in_range_random(fmt)])
  got = np.asarray(_jit_cast(name, True)(x))
  clipped = np.clip(x, np.float32(-fmt.max), np.float32(fmt.max))
  ref = _ml(clipped, dt).astype(np.float32)
  nan_in = np.isnan(x)
  assert np.all(np.isnan(got[nan_in])), "NaN stays NaN"
  # Only e8m0 (unsigned, no zero) makes NaN of non-NaN inputs (<= 0).
  if name != "e8m0":
    assert not np.any(np.isnan(got[~nan_in]))
    assert not np.any(np.isinf(got))
  _assert_same_bits(x[~nan_in], got[~nan_in], ref[~nan_in], f"saturating {name}")
  big = np.float32([np.inf, -np.inf, 3e38, -3e38])
  exp = [fmt.max, -fmt.max, fmt.max, -fmt.max] if name != "e8m0" else [
      fmt.max, np.nan, fmt.max, np.nan]
  np.testing.assert_array_equal(np.asarray(_jit_cast(name, True)(big)),
                                np.float32(exp))


def test_overflow_without_saturate_follows_the_type():
  big = np.float32([1e6, -1e6, np.inf])
  e5m2 = np.asarray(lb.cast(big, "fp8_e5m2"))
  np.testing.assert_array_equal(e5m2, np.float32([np.inf, -np.inf, np.inf]))
  assert np.all(np.isnan(np.asarray(lb.cast(big, "fp8_e4m3"))))  # fn: NaN
  np.testing.assert_array_equal(np.asarray(lb.cast(big, "fp4_e2m1")),
                                np.float32([6, -6, 6]))  # no inf/NaN: saturates
  np.testing.assert_array_equal(np.asarray(lb.cast(big, "e3m3")),
                                np.float32([30, -30, 30]))


# ---------------------------------------------------------------------------
# Bare eXmY formats ml_dtypes lacks: an independent numpy reference.


def _ocp_positive_grid(x: int, y: int) -> np.ndarray:
  """Non-negative values of an OCP-convention eXmY format, in code order."""
  bias = 2 ** (x - 1) - 1
  out = []
  for e in range(2 ** x):
    for m in range(2 ** y):
      if e == 0:
        out.append(m * 2.0 ** (1 - bias - y))
      else:
        out.append((1 + m / 2 ** y) * 2.0 ** (e - bias))
  return np.array(out)


def _np_round_ocp(xs: np.ndarray, x: int, y: int) -> np.ndarray:
  """Round half to even (by code) onto the grid, saturating; ml_dtypes' NaN rule."""
  grid = _ocp_positive_grid(x, y)
  with np.errstate(invalid="ignore"):  # signalling NaN inputs
    a = np.abs(xs.astype(np.float64))
  finite = np.isfinite(a)
  a = np.where(finite, np.minimum(a, grid[-1]), grid[-1])
  hi = np.clip(np.searchsorted(grid, a, side="left"), 0, grid.size - 1)
  lo = np.maximum(hi - 1, 0)
  dl, dh = a - grid[lo], grid[hi] - a
  if y > 0:
    tie = np.where(hi % 2 == 0, hi, lo)  # the even code (even significand)
  else:
    # No mantissa bits: the significand of every normal is the implicit 1, so a
    # tie goes up in magnitude (ml_dtypes' e8m0 does the same); only the tie
    # between 0 and the smallest normal goes to 0.
    tie = np.where(lo == 0, lo, hi)
  pick = np.where(dh < dl, hi, np.where(dl < dh, lo, tie))
  val = grid[pick]
  out = np.where(np.signbit(xs), -val, val).astype(np.float32)
  # No NaN code: like ml_dtypes' fp6/fp4, +NaN becomes -0 and -NaN +0.
  nan = np.isnan(xs)
  return np.where(nan, np.where(np.signbit(xs), np.float32(0), np.float32(-0.0)), out)


@pytest.mark.parametrize("name", ["e3m3", "e2m2", "e5m3", "e1m2", "e4m0", "e4m1",
                                  "e3m5", "e6m2", "e2m1", "e2m3", "e3m2"])
def test_bare_formats_bit_exact_vs_numpy_reference(name):
  x_, y_ = int(name[1]), int(name[3])
  fmt = F.FloatFormat(x_, y_)  # the generic convention, built directly
  assert fmt == F.get(name) or F.get(name).ml_dtype is not None
  xs = np.concatenate([_special_inputs(), _grid_inputs(fmt), _all_bf16_as_f32(),
                       _in_range_random(fmt)])
  ref = _np_round_ocp(xs, x_, y_)
  got = np.asarray(jax.jit(lambda v: lb.cast(v, fmt))(xs))
  _assert_same_bits(xs, got, ref, f"bare {name}")
  # Codes: the sign bit, then the index in the positive grid.
  codes = np.asarray(jax.jit(lambda v: encode(lb.cast(v, fmt), fmt))(xs))
  grid = _ocp_positive_grid(x_, y_)
  idx = np.searchsorted(grid, np.abs(ref.astype(np.float64)))
  ref_codes = (np.signbit(ref).astype(np.uint32) << (x_ + y_)) | idx.astype(np.uint32)
  np.testing.assert_array_equal(codes, ref_codes)


# ---------------------------------------------------------------------------
# Integer and codebook casts.

INT_FORMATS = ["int8", "int4", "int3", "int2", "uint8", "uint4"]


def _int_inputs() -> np.ndarray:
  k = np.arange(-300, 300, dtype=np.float32)
  mids = _ulp_neighbours(np.concatenate([k, k + np.float32(0.5)]))
  return np.concatenate([_special_inputs(), mids, _all_bf16_as_f32()])


@pytest.mark.parametrize("name", INT_FORMATS + ["mxint8_element"])
def test_integer_cast_half_even_full_twos_complement(name):
  fmt = F.get("mxint8").element if name == "mxint8_element" else F.get(name)
  x = _int_inputs()
  got = np.asarray(jax.jit(lambda v: lb.cast(v, fmt))(x))
  scale = np.float32(2 ** fmt.frac_bits)
  with np.errstate(all="ignore"):
    ref = np.clip(np.round(x * scale), fmt.qmin, fmt.qmax) / scale  # np.round: half even
  np.testing.assert_array_equal(np.isnan(got), np.isnan(x))
  ok = ~np.isnan(x)
  np.testing.assert_array_equal(got[ok], ref[ok].astype(np.float32))
  # The full two's complement range: int4 reaches -8 (symmetric quantizers use +-7).
  assert np.min(got[ok]) == fmt.qmin / scale and np.max(got[ok]) == fmt.qmax / scale
  # saturate changes nothing for integers (they always clamp).
  np.testing.assert_array_equal(np.asarray(lb.cast(x, fmt, saturate=True)),
                                np.asarray(lb.cast(x, fmt)))


def test_integer_cast_examples():
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 7.5, -8.5, 100.0, -100.0])
  np.testing.assert_array_equal(np.asarray(lb.cast(x, "int4")),
                                [0, 2, 2, -0.0, -2, 7, -8, 7, -8])
  np.testing.assert_array_equal(np.asarray(lb.cast(x, "int2")),
                                [0, 1, 1, -0.0, -2, 1, -2, 1, -2])
  np.testing.assert_array_equal(np.asarray(lb.cast(x, "uint4")),
                                [0, 2, 2, 0, 0, 8, 0, 15, 0])


def test_integer_codes_twos_complement():
  fmt = F.get("int4")
  v = jnp.arange(-8, 8, dtype=jnp.float32)
  codes = np.asarray(encode(v, fmt))
  np.testing.assert_array_equal(codes, np.arange(-8, 8) & 0xF)
  np.testing.assert_array_equal(np.asarray(decode(codes, fmt)), np.asarray(v))


def test_lookup_cast_nearest_ties_to_even_index():
  fmt = F.get("nf4")
  t = np.asarray(fmt.table, np.float32)
  mids = ((t[1:].astype(np.float64) + t[:-1]) / 2).astype(np.float32)
  x = np.concatenate([t, _ulp_neighbours(mids), np.float32([-5, 5, 0])])
  got = np.asarray(jax.jit(lambda v: lb.cast(v, fmt))(x))
  d = np.abs(x[:, None].astype(np.float64) - t[None, :].astype(np.float64))
  best = d.min(axis=1, keepdims=True)
  cand = np.where(d == best, np.arange(16)[None, :], 99)
  even = np.where((cand % 2 == 0) & (cand < 99), cand, 99).min(axis=1)
  first = cand.min(axis=1)
  ties = (d == best).sum(axis=1) > 1
  idx = np.where(ties & (even < 99), even, first)
  np.testing.assert_array_equal(got, t[idx])
  idx_got = np.asarray(encode(jnp.asarray(got), fmt))
  np.testing.assert_array_equal(t[idx_got], got)


# ---------------------------------------------------------------------------
# Stochastic rounding and argument checks.


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "e3m3", "e8m0",
                                  "int4", "nf4"])
def test_stochastic_cast_lands_on_the_grid(name):
  fmt = F.get(name)
  rng = np.random.default_rng(0)
  mag = np.exp2(rng.uniform(-140, 20, 1 << 14)).astype(np.float32)
  x = np.where(rng.random(mag.size) < 0.5, -mag, mag).astype(np.float32)
  if name == "e8m0":
    x = np.abs(x)  # unsigned
  y = np.asarray(jax.jit(lambda v, k: lb.cast(v, fmt, saturate=True,
                                                rounding="stochastic", key=k))(
                                                    x, jax.random.key(3)))
  grid = np.unique(np.asarray(fmt.values(), np.float32).astype(np.float64))
  # Each result is one of x's two grid neighbours (x clamped to the range).
  xc = np.clip(x.astype(np.float64), grid[0], grid[-1])
  hi = np.clip(np.searchsorted(grid, xc, side="left"), 0, grid.size - 1)
  lo = np.clip(np.searchsorted(grid, xc, side="right") - 1, 0, grid.size - 1)
  y64 = y.astype(np.float64)
  ok = (y64 == grid[lo]) | (y64 == grid[hi])
  assert np.all(ok), (x[~ok][:5], y[~ok][:5])


def test_stochastic_tiny_values_round_to_zero_or_smallest_subnormal():
  # Far below the smallest subnormal: 0 or the smallest step, never in between.
  fmt = F.get("fp8_e4m3")
  for v in (2.0 ** -20, 2.0 ** -11, 2.0 ** -40):
    x = jnp.full((1 << 16,), v, jnp.float32)
    y = np.asarray(lb.cast(x, fmt, rounding="stochastic", key=jax.random.key(0)))
    assert set(np.unique(y).tolist()) <= {0.0, fmt.min_subnormal}
    p = v / fmt.min_subnormal
    frac = float(np.mean(y > 0))
    se = np.sqrt(p * (1 - p) / y.size)
    assert abs(frac - p) <= 4 * se + 1e-9, (v, frac, p)


def test_cast_argument_errors():
  x = jnp.ones(4)
  with pytest.raises(ValueError, match="rounding='stochastic'"):
    lb.cast(x, "fp8_e4m3", key=jax.random.key(0))
  with pytest.raises(ValueError, match="key=jax.random.key"):
    lb.cast(x, "fp8_e4m3", rounding="stochastic")
  with pytest.raises(ValueError, match="'nearest' or 'stochastic'"):
    lb.cast(x, "fp8_e4m3", rounding="up")
  with pytest.raises(ValueError, match="block format"):
    lb.cast(x, "mxfp4")
  with pytest.raises(TypeError, match="astype"):
    lb.cast(jnp.ones(4, jnp.int32), "fp8_e4m3")
  with pytest.raises(KeyError):
    lb.cast(x, "no_such_format")


def _code_table(f):
  """float32 value of every code, from the format's definition (numpy)."""
  codes = np.arange(2 ** f.bits)
  if isinstance(f, F.FloatFormat):
    return f.decode_table().astype(np.float32)
  if isinstance(f, F.LookupFormat):  # codes past the table clamp to its end
    t = np.asarray(f.table, np.float32)
    return t[np.minimum(codes, len(t) - 1)]
  v = np.where(f.signed & (codes >= 2 ** (f.bits - 1)), codes - 2 ** f.bits, codes)
  return (v * 2.0 ** -f.frac_bits).astype(np.float32)


def _element_formats():
  out = []
  for name in F.names():
    f = F.get(name)
    if isinstance(f, (F.IntFormat, F.FloatFormat, F.LookupFormat)) and f.bits <= 8 and not (
        isinstance(f, F.FloatFormat) and f.special == "e8m0"):
      out.append(name)
  return out


@pytest.mark.parametrize("name", _element_formats())
def test_decoders_equal_the_format_table_on_every_code(name):
  # decode_arith (gather-free: the GPU dequantizer's, and decode's for floats
  # below 8 bits) and decode itself give the table's float32 bits.
  from lowbit_jax.core import _cast  # pylint: disable=g-import-not-at-top
  f = F.get(name)
  c = jnp.arange(2 ** f.bits, dtype=jnp.uint32)
  want = _code_table(f)
  for got in (np.asarray(_cast.decode_arith(c, f)), np.asarray(decode(c, f))):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 15, 16, 31])
def test_bisect_bits_count_the_thresholds_at_or_below(n):
  """``_cast.bisect_bits`` (binary search, NaN-padded to 2**L - 1) gives the
  count of sorted thresholds <= y that one comparison per threshold gives,
  for thresholds with repeats and y on, beside and between them, signed
  zeros, infinities and NaN."""
  from lowbit_jax.core import _cast  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(n)
  c = np.sort(np.round(rng.standard_normal(n), 1).astype(np.float32))
  y = np.concatenate([
      c, np.nextafter(c, np.float32(-np.inf)), np.nextafter(c, np.float32(np.inf)),
      np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38], np.float32),
      rng.standard_normal(4096).astype(np.float32) * 2]).astype(np.float32)

  got = np.asarray(jax.jit(lambda v: _cast.bits_value(_cast.bisect_bits(v, c),
                                                    np.int32))(y))
  # The oracle in XLA too: its CPU backend compares subnormals as zero
  # (y = nextafter(-0.0, -inf) >= -0.0 there, not in numpy).
  want = np.asarray(jax.jit(lambda v: sum((v >= t).astype(jnp.int32) for t in c)
                            if n else jnp.zeros(v.shape, jnp.int32))(y))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("table", [
    (-1.0, 1.0), (-1.0, 0.0, 1.0), (-1.0, -0.25, 0.0, 0.5, 1.0),
    tuple(np.linspace(-1, 1, 9)), "nf4", tuple(np.unique(np.round(
        np.random.default_rng(0).standard_normal(23), 2)).tolist())],
    ids=["2", "3", "5", "9", "nf4", "21"])
def test_lookup_rounding_by_bisection_equals_the_threshold_sum(table, monkeypatch):
  """Short codebooks' nearest-entry indices (quantize) and values
  (fake_quant) through ``bisect_bits`` equal the sum of one comparison per
  threshold, bit for bit, at every threshold, its neighbours and random
  values (NaN: its value is NaN either way)."""
  from lowbit_jax.core import _cast  # pylint: disable=g-import-not-at-top
  fmt = F.get(table) if isinstance(table, str) else F.LookupFormat(table, name="t")
  c = _cast._nearest_thresholds(fmt.table)  # pylint: disable=protected-access
  y = np.concatenate([c, np.nextafter(c, np.float32(-np.inf)),
                      np.nextafter(c, np.float32(np.inf)), np.asarray(fmt.table, np.float32),
                      np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38], np.float32),
                      np.random.default_rng(1).uniform(-1.5, 1.5, 8192).astype(np.float32)])
  y = jnp.asarray(y, jnp.float32)

  def run():
    idx = jax.jit(lambda v: _cast.lookup_round_index(v, fmt))(y)
    val = jax.jit(lambda v: _cast._cast_lookup(v, fmt, None))(y)  # pylint: disable=protected-access
    return np.asarray(idx), np.asarray(val)

  monkeypatch.setattr(_cast, "_LOOKUP_BISECT", False)
  want = run()
  monkeypatch.setattr(_cast, "_LOOKUP_BISECT", True)
  got = run()
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1].view(np.uint32), want[1].view(np.uint32))


def test_custom_formats_round_alike_on_every_path():
  # A large bias (subnormal step 2**-129: its reciprocal was inf, so zeros and
  # tiny values became NaN on the saturating path) and no mantissa bit (ties
  # went down on the saturating path, up in cast(), as ml_dtypes' e8m0 does).
  big_bias = lb.formats.FloatFormat(7, 2, bias=127)
  x = jnp.asarray([0.0, -0.0, 0.5, 1e-38, -3e-39, 1.0], jnp.float32)
  for sat in (False, True):
    got = np.asarray(lb.cast(x, big_bias, saturate=sat))
    assert np.all(np.isfinite(got)), (sat, got)
    np.testing.assert_array_equal(got[[0, 2, 5]], [0.0, 0.5, 1.0])
  q = lb.QuantSpec(big_bias, axis=-1)
  z = jnp.zeros((2, 8)).at[1].set(jnp.linspace(-1, 1, 8))
  np.testing.assert_array_equal(lb.fake_quant(z, q), lb.dequantize(lb.quantize(z, q)))
  m0 = lb.formats.FloatFormat(3, 0)
  ties = jnp.asarray([0.75, 3.0, 12.0, -6.0], jnp.float32)
  want = [1.0, 4.0, 16.0, -8.0]   # ties up (ml_dtypes: e8m0(3.0) == 4.0)
  assert float(np.float32(3.0).astype(ml_dtypes.float8_e8m0fnu)) == 4.0
  for sat in (False, True):
    np.testing.assert_array_equal(lb.cast(ties, m0, saturate=sat), want)


# round_to_dtype: x.astype(dtype).astype(x.dtype) in a form XLA keeps on a GPU
# (which drops such a convert pair: excess precision).
ROUND_TARGETS = [ml for _, ml in ML_TYPES] + [np.float16, jnp.bfloat16]


@pytest.mark.parametrize("dt", ROUND_TARGETS, ids=lambda d: np.dtype(d).name)
def test_round_to_dtype_equals_the_convert_pair_bit_for_bit(dt):
  from lowbit_jax.core._cast import round_to_dtype  # pylint: disable=import-outside-toplevel
  fmt_inputs = [_special_inputs(), _random_bits(1 << 16, seed=3),
                _all_bf16_as_f32()]
  if np.dtype(dt) not in (np.dtype(np.float16), np.dtype(jnp.bfloat16)):
    fmt = F.get(dict((np.dtype(m).name, n) for n, m in ML_TYPES)[np.dtype(dt).name])
    fmt_inputs += [_grid_inputs(fmt), _in_range_random(fmt)]
  else:
    with np.errstate(invalid="ignore"):  # nextafter of NaN
      fmt_inputs.append(_ulp_neighbours(_ml(_all_bf16_as_f32(), dt).astype(np.float32)))
  x = np.concatenate(fmt_inputs)
  for src in (np.float32, jnp.bfloat16):
    xs = _ml(x, src)
    got = np.asarray(jax.jit(lambda v, dt=dt: round_to_dtype(v, dt))(xs))
    want = _ml(_ml(xs, dt), src)
    assert got.dtype == want.dtype
    g32, w32 = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(g32), np.isnan(w32))
    ok = ~np.isnan(w32)
    np.testing.assert_array_equal(g32[ok].view(np.uint32), w32[ok].view(np.uint32))
    if np.dtype(dt) != np.dtype(src):  # it rounded something
      assert (g32[ok] != xs.astype(np.float32)[ok]).any()


def test_round_to_dtype_leaves_no_narrowing_convert_for_xla_to_drop():
  # What keeps it on a GPU: no value of the narrow type is left in the
  # program (XLA drops a convert into it that is converted straight back),
  # where the plain pair has one.
  from lowbit_jax.core._cast import round_to_dtype  # pylint: disable=import-outside-toplevel
  x = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.float32)
  for dt, hlo_type in ((jnp.bfloat16, "xbf16>"), (jnp.float16, "xf16>"),
                       (jnp.float8_e4m3fn, "xf8E4M3FN>")):
    pair = jax.jit(lambda v, dt=dt: v.astype(dt).astype(v.dtype)).lower(x).as_text()
    assert hlo_type in pair
    ours = jax.jit(lambda v, dt=dt: round_to_dtype(v, dt)).lower(x).as_text()
    assert hlo_type not in ours, ours
  # a dtype holding every value of x's: x itself, nothing added
  xb = x.astype(jnp.bfloat16)
  assert round_to_dtype(xb, jnp.float32) is xb


def test_round_to_dtype_passes_gradients_as_the_convert_pair_does():
  # The pair's derivative is the identity; the float16 subnormal branch
  # (round) and the float8 emulation (bit operations) would give none.
  from lowbit_jax.core._cast import round_to_dtype  # pylint: disable=import-outside-toplevel
  x = jnp.asarray([1e-6, 3e-8, 0.3, 2.0, -5e-7], jnp.float32)
  w = jnp.arange(1.0, 6.0)
  for dt in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2):
    g = jax.grad(lambda a, dt=dt: (round_to_dtype(a, dt) * w).sum())(x)
    np.testing.assert_array_equal(g, w)
    _, t = jax.jvp(lambda a, dt=dt: round_to_dtype(a, dt), (x,), (jnp.ones_like(x),))
    np.testing.assert_array_equal(t, np.ones(5, np.float32))
