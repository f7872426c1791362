"""The fused quantize / dequantize / fake_quant against the unfused reference.

``tests/core/_reference.py`` is the implementation as it was before the fused
rewrite (issue 12). Every format and granularity is run on random inputs that
hold NaN and inf blocks, an all-zero block, exact ties, tiny (subnormal) and
huge values; codes, scales, zero points, dequantized values, fake-quant values
and the straight-through gradient must agree bit for bit.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.core import _cast
from lowbit_jax.formats import FloatFormat, LookupFormat
from lowbit_jax.formats import get as get_format
from tests.core import _reference as ref

SHAPE = (256, 96)

# (id, format, QuantSpec keywords, input dtype, extra call keywords)
CASES = [
    ("int8_ch", "int8", dict(axis=0), "bfloat16", {}),
    ("int8_g128", "int8", dict(axis=0, group_size=128), "bfloat16", {}),
    ("int4_ch", "int4", dict(axis=0), "float32", {}),
    ("int4_g128", "int4", dict(axis=0, group_size=128), "bfloat16", {}),
    ("int4_g32_ax1", "int4", dict(axis=1, group_size=32), "float32", {}),
    ("int3_g64", "int3", dict(axis=0, group_size=64), "bfloat16", {}),
    ("int2_g32", "int2", dict(axis=0, group_size=32), "float32", {}),
    ("uint8_ch", "uint8", dict(axis=0), "bfloat16", {}),
    ("uint4_g32_ax1", "uint4", dict(axis=1, group_size=32), "float32", {}),
    ("fp8_e4m3_ch", "fp8_e4m3", dict(axis=0), "bfloat16", {}),
    ("fp8_e5m2_ax1", "fp8_e5m2", dict(axis=1), "float32", {}),
    ("fp8_e4m3_tensor", "fp8_e4m3", dict(axis="tensor"), "float32", {}),
    ("fp6_e2m3_g32", "fp6_e2m3", dict(axis=0, group_size=32), "bfloat16", {}),
    ("fp6_e3m2_ch", "fp6_e3m2", dict(axis=0), "float32", {}),
    ("fp4_g32", "fp4_e2m1", dict(axis=0, group_size=32), "bfloat16", {}),
    ("nf4", "nf4", dict(axis=0), "bfloat16", {}),
    ("binary", "binary", dict(axis=0), "float32", {}),
    ("ternary_ax1", "ternary", dict(axis=1), "bfloat16", {}),
    ("mxfp8_e4m3", "mxfp8_e4m3", dict(axis=0), "bfloat16", {}),
    ("mxfp8_e5m2_ax1", "mxfp8_e5m2", dict(axis=1), "float32", {}),
    ("mxfp6_e2m3", "mxfp6_e2m3", dict(axis=0), "bfloat16", {}),
    ("mxfp6_e3m2", "mxfp6_e3m2", dict(axis=0), "float32", {}),
    ("mxfp4", "mxfp4", dict(axis=0), "bfloat16", {}),
    ("mxfp4_ax1_ceil", "mxfp4", dict(axis=1, scale_rounding="ceil"), "float32", {}),
    ("mxint8", "mxint8", dict(axis=0), "bfloat16", {}),
    ("nvfp4", "nvfp4", dict(axis=0), "bfloat16", {}),
    ("nvfp4_ax1", "nvfp4", dict(axis=1), "float32", {}),
    # Scale dtypes, static ranges, clipping, padding, tiles, stochastic rounding.
    ("int8_bf16scale", "int8", dict(axis=0, scale_dtype="bfloat16"), "bfloat16", {}),
    ("fp8_e4m3_fp8scale_g32", "fp8_e4m3",
     dict(axis=0, group_size=32, scale_dtype="fp8_e4m3"), "float32", {}),
    ("int4_clip", "int4", dict(axis=0, clip_ratio=0.8), "bfloat16", {}),
    ("int8_amax", "int8", dict(axis=0), "float32", dict(amax=1.5)),
    ("uint8_range", "uint8", dict(axis=0), "float32", dict(amax=2.0, amin=-1.0)),
    ("nvfp4_tensor_amax", "nvfp4", dict(axis=0), "float32", dict(tensor_amax=3.0)),
    ("int4_g128_pad", "int4", dict(axis=0, group_size=160, pad=True), "bfloat16", {}),
    ("int8_tile", "int8", dict(tile=(32, 32)), "float32", {}),
    ("int4_stoch", "int4", dict(axis=0, group_size=64, rounding="stochastic"),
     "float32", dict(key=True)),
    ("mxfp4_stoch", "mxfp4", dict(axis=1, rounding="stochastic"), "bfloat16",
     dict(key=True)),
]


def _inputs(dtype: str, seed: int) -> np.ndarray:
  """Random rows of very different magnitudes, with every hard case in it."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  # Per-column magnitudes from 2**-40 to 2**40 (huge and subnormal-ish blocks).
  x *= np.exp2(rng.integers(-40, 41, size=(1, SHAPE[1]))).astype(np.float32)
  x[:, 3] = 0.0  # an all-zero column
  x[5, 7] = np.nan  # NaN blocks
  x[200, 7] = -np.inf
  x[17, 11] = np.inf  # inf blocks
  x[40, 13] = -np.nan
  x[:64, 20] = np.float32(3e38) * np.sign(x[:64, 20])  # near the top of float32
  x[:, 21] = np.float32(1e-39) * rng.integers(-4, 5, SHAPE[0])  # float32 subnormals
  # Exact ties on the integer grid: k + 0.5 times a power of two.
  x[:, 22] = (rng.integers(-127, 127, SHAPE[0]) + 0.5) * np.float32(2.0 ** -3)
  x[0, 22] = 127.0 / 8.0
  x[1:, 23] = rng.integers(-7, 8, SHAPE[0] - 1).astype(np.float32)  # on the grid
  x[0, 23] = 7.0
  x[:, 24] = 0.0
  x[9, 24] = -1e-30  # one tiny element in a zero block
  if dtype == "bfloat16":
    return np.asarray(jnp.asarray(x, jnp.bfloat16))
  return x


def _bits(a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.itemsize == 4:
    return a.view(np.uint32)
  if a.dtype.itemsize == 2:
    return a.view(np.uint16)
  return a.view(np.uint8)


def _assert_same(got, want, what: str):
  """Bit-for-bit equality; any two NaNs count as equal."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype, (
      what, got.shape, got.dtype, want.shape, want.dtype)
  if jnp.issubdtype(got.dtype, jnp.floating):
    gn = np.isnan(got.astype(np.float32))
    wn = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(gn, wn, err_msg=f"{what}: NaN positions")
    got, want = np.where(gn, 0, got), np.where(wn, 0, want)
  bad = _bits(got) != _bits(want)
  if bad.any():
    idx = np.argwhere(bad)[:5]
    raise AssertionError(f"{what}: {bad.sum()} elements differ, e.g. at {idx.tolist()}: "
                         f"got {got[tuple(idx.T)]}, want {want[tuple(idx.T)]}")


def _run(mod, x, spec, kw, w):
  q = mod.quantize(x, spec, **kw)
  deq = mod.dequantize(q)
  fq, vjp = jax.vjp(lambda v: mod.fake_quant(v, spec, **kw), x)
  (g,) = vjp(w)
  return q, deq, fq, g


# Every format family and path once in the default run; the rest with --runslow.
FAST = {"int8_ch", "int4_g128", "uint8_ch", "fp8_e4m3_ch", "fp6_e2m3_g32", "nf4",
        "ternary_ax1", "mxfp8_e4m3", "mxfp4", "nvfp4", "int8_amax", "int4_stoch"}


@pytest.mark.parametrize("case", [
    c if c[0] in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=[c[0] for c in CASES])
def test_fused_matches_reference(case):
  _check_case(case)


@pytest.mark.parametrize("case_id", ["fp8_e4m3_ch", "mxfp8_e5m2_ax1"])
def test_fused_with_native_fp8_matches_reference(case_id, monkeypatch):
  """The GPU/TPU path (XLA's float8 converts) on the whole pipeline."""
  monkeypatch.setattr(_cast, "_NATIVE_ON_CPU", True)
  _check_case(next(c for c in CASES if c[0] == case_id))


def _check_case(case):
  _, name, skw, dtype, ckw = case
  spec = lb.QuantSpec(name, **skw)
  x = np.array(_inputs(dtype, seed=len(case[0])))
  if (not spec.symmetric or spec.element.name in ("binary", "ternary")
      or spec.scale_dtype == "e8m0"):
    # The frozen reference overflows where the range hi - lo or the sum of
    # |x| exceeds the float32 maximum, and flushes E8M0 scales of 2**+-127
    # (issue 11 fixed the library there; tests/core/test_extreme_ranges.py
    # checks it): keep column 20 below that.
    x[:, 20] = np.asarray(np.asarray(x[:, 20], np.float32) * np.float32(1e-3), x.dtype)
  # Column 21 holds float32 subnormals. Where a whole block is subnormal, the
  # frozen reference divides by a subnormal scale amax / fmt.max: XLA's CPU
  # backend flushes subnormals (codes 0, as the library's), the GPU keeps them
  # (no .ftz in its PTX: codes up to fmt.max), while the library holds float
  # scales at the smallest normal (issue 11, commit 6f43451; codes 0 on every
  # backend). A normal element every 16 rows gives every block of column 21 a
  # normal scale on both, and leaves its other elements subnormal.
  x[::16, 21] = np.asarray(np.float32(2.0 ** -100), x.dtype)
  x = jnp.asarray(x)
  if "pad" in skw:
    x = x[:200]
  kw = dict(ckw)
  if kw.pop("key", False):
    kw["key"] = jax.random.key(7)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), x.dtype)
  got = jax.jit(lambda v, w_: _run(lb, v, spec, kw, w_))(x, w)
  want = jax.jit(lambda v, w_: _run(ref, v, spec, kw, w_))(x, w)
  gq, wq = got[0], want[0]
  assert gq.spec == wq.spec and gq.pack_axis == wq.pack_axis and gq.shape == wq.shape
  fmt = spec.storage_format
  if isinstance(fmt, FloatFormat) and fmt.special == "none" and "pad" not in skw:
    # A format without a NaN code stores a NaN as a zero whose sign is the
    # NaN's: which NaN a product of two NaNs returns is the compiler's choice
    # (operand order), so only there the sign bit may differ.
    gc = ref.unpack(gq.codes, fmt, gq.pack_axis)
    wc = ref.unpack(wq.codes, fmt, wq.pack_axis)
    sign = np.uint32(1 << (fmt.bits - 1))
    nan_in = np.isnan(np.asarray(x, np.float32))
    _assert_same(np.where(nan_in, gc & ~sign, gc), np.where(nan_in, wc & ~sign, wc),
                 "codes")
  elif isinstance(fmt, LookupFormat) and 0.0 not in fmt.table:
    # A grid without 0 (binary): the library stores an all-zero block (scale
    # 0) as the codes of zeros' signs, +0 -> the positive end (code 1), where
    # the frozen reference took the tie's first entry (-1); both read back as
    # zeros. Column 3 is all zeros (of sign +).
    zero = np.all(np.asarray(x, np.float32) == 0, axis=0)
    gc, wc = np.asarray(gq.codes), np.asarray(wq.codes)
    assert zero[3] and np.all(gc[:, 3] == 0xFF), gc[:, 3]
    _assert_same(gc[:, ~zero], wc[:, ~zero], "codes")
  else:
    _assert_same(gq.codes, wq.codes, "codes")
  fmt_e = spec.element
  if isinstance(fmt, LookupFormat) and 0.0 not in fmt.table:
    # ...and reads it back as zeros of x's sign (the reference: -0).
    zero = np.all(np.asarray(x, np.float32) == 0, axis=0)
    want = (want[0],) + tuple(jnp.where(zero, x.astype(v.dtype), v) for v in want[1:3]) + (
        want[3],)
  if (jax.default_backend() != "cpu" and getattr(fmt_e, "scale_method", "absmax")
      in ("mean_abs", "twn")):
    # A mean's sum is reduced in an order of the compiler's choosing on the
    # GPU (it differs between the two fusions): the scale may differ in its
    # last bit there, and every value with it. Codes still agree exactly.
    for a, b in ((gq.scale, wq.scale), (got[1], want[1]), (got[2], want[2])):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=2.5e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))
    return
  _assert_same(gq.scale, wq.scale, "scale")
  for attr in ("zero_point", "tensor_scale"):
    a, b = getattr(gq, attr), getattr(wq, attr)
    assert (a is None) == (b is None), attr
    if a is not None:
      _assert_same(a, b, attr)
  _assert_same(got[1], want[1], "dequantize")
  _assert_same(got[2], want[2], "fake_quant")
  # Outside NaN blocks the straight-through gradient is the reference's. In
  # a NaN block the reference's clip mask depended on whether XLA's max kept
  # the NaN (on CPU it can drop it); the fused version treats every NaN or
  # inf block alike (its range is inf).
  nan_out = np.isnan(np.asarray(want[2], np.float32))
  _assert_same(np.where(nan_out, 0, got[3]), np.where(nan_out, 0, want[3]),
               "fake_quant gradient")
  # The fused dequantize equals the fused fake_quant (as numbers: integer
  # codes do not keep the sign of a zero).
  np.testing.assert_array_equal(np.asarray(got[1], np.float32),
                                np.asarray(got[2], np.float32))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp8_e3m4", "fp8_e4m3ieee",
                                  "fp6_e2m3", "fp6_e3m2", "fp4_e2m1"])
def test_native_fp8_rounding_matches_emulation(name, monkeypatch):
  """ReducePrecision rounding (and the native float8 codes, or the codes from
  the float32 bits) are the emulation.

  Dense: every float32 pattern around each grid point of the format (the grid
  point, the midpoints to its neighbours and one ulp either side of them),
  every binade edge down through the float32 subnormals, NaN, inf, and 2**18
  random patterns over the whole range.
  """
  fmt = get_format(name)
  grid = np.asarray(fmt.values(), np.float32)
  grid = np.unique(np.abs(grid[np.isfinite(grid)]))
  mids = (grid[:-1].astype(np.float64) + grid[1:]) / 2
  pts = np.concatenate([grid, mids.astype(np.float32), [fmt.max * 1.5, 3e38]])
  u = pts.astype(np.float32).view(np.uint32).astype(np.int64)
  near = (u[:, None] + np.arange(-2, 3)[None, :]).ravel()
  edges = (np.arange(0, 255, dtype=np.int64)[:, None] << 23) + np.array([0, 1, 2, 0x7FFFFF])
  rng = np.random.default_rng(0)
  rand = rng.integers(0, 0x7F800000, 1 << 18)
  mags = np.concatenate([near, edges.ravel(), rand]).clip(0, 0x7F7FFFFF)
  mags = mags.astype(np.uint32)
  y = np.concatenate([mags, mags | np.uint32(0x80000000)]).view(np.float32)
  y = np.concatenate([y, np.array([np.nan, -np.nan, np.inf, -np.inf], np.float32)])
  monkeypatch.setattr(_cast, "_NATIVE_ON_CPU", True)  # the GPU/TPU path, anywhere
  assert _cast._reduce_precision_ok(fmt)
  got = jax.jit(lambda v: _cast._cast_float(v, fmt, True, None))(y)
  want = jax.jit(lambda v: ref._cast_float(v, fmt, True, None))(y)
  _assert_same(got, want, f"{name} rounding")
  _assert_same(np.signbit(np.asarray(got)), np.signbit(np.asarray(want)), "NaN signs")
  want_codes = jax.jit(lambda v: ref.encode(v, fmt))(want)
  # What quantize stores: the codes of saturated grid values and NaN.
  codes = jax.jit(lambda v: _cast.encode_grid(v, fmt))(want)
  ok = ~np.isnan(np.asarray(want)) | (_cast._native_dtype(fmt) is None)
  _assert_same(np.where(ok, codes, 0), np.where(ok, want_codes, 0), f"{name} grid codes")
  m = np.float32(fmt.max)
  if _cast._rounds_by_thresholds(fmt):  # FP4: codes from the grid's midpoints
    direct = jax.jit(lambda v: _cast.encode_grid(jnp.clip(v, -m, m), fmt))(y)
    _assert_same(direct, want_codes, f"{name} codes of unrounded values")
  if _cast._native_dtype(fmt) is None:
    return  # no native float8 type: encode keeps the emulation
  codes = jax.jit(lambda v: _cast.encode(v, fmt))(want)
  _assert_same(codes, want_codes, f"{name} codes")
  # quantize's codes straight from the clamped, unrounded values (the
  # convert rounds): the emulation's codes of the rounded values.
  direct = jax.jit(lambda v: _cast.encode_grid(jnp.clip(v, -m, m), fmt))(y)
  fin = ~np.isnan(y)
  _assert_same(np.where(fin, direct, 0), np.where(fin, want_codes, 0),
               f"{name} codes of unrounded values")


@pytest.mark.parametrize("name", ["nf4", "binary", "ternary", "dynamic8"])
def test_lookup_rounding_matches_reference(name):
  """Table lookups without a binary search or a gather: same indices and values,
  nearest (ties to even) and stochastic, at every entry and midpoint and one
  to three ulps either side, NaN, +-inf, +-0 and random values."""
  fmt = get_format(name)
  t = np.asarray(fmt.table, np.float32)
  pts = np.concatenate([t, (t[:-1] + t[1:]) / 2,
                        [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 5.0, -5.0]])
  u = pts.astype(np.float32).view(np.uint32).astype(np.int64)
  near = (u[:, None] + np.arange(-3, 4)).ravel().astype(np.uint32).view(np.float32)
  rng = np.random.default_rng(0)
  x = np.concatenate([near, rng.standard_normal(1 << 14).astype(np.float32) * 1.2])
  noise = rng.integers(0, 2 ** 32, x.shape, dtype=np.uint32)
  for noise_ in (None, noise):
    got = jax.jit(lambda v, n: _cast.lookup_round_index(v, fmt, n))(x, noise_)
    want = jax.jit(lambda v, n: ref.lookup_round_index(v, fmt, n))(x, noise_)
    _assert_same(got, want, f"{name} indices")
  got = jax.jit(lambda v: _cast._cast_lookup(v, fmt, None))(x)
  _assert_same(got, jax.jit(lambda v: ref._cast_lookup(v, fmt, None))(x), name)


# Specs whose per-block arrays core._quantize._per_block materializes on CPU:
# E8M0 pairs, NVFP4's tensor-scale multipliers, float scales, zero points, and
# the given-scale (LSQ) path.
_PER_BLOCK_SPECS = [
    ("mxfp4", dict(axis=0)), ("mxint8", dict(axis=-1)), ("nvfp4", dict(axis=0)),
    ("int8", dict(axis=0)), ("int4", dict(axis=0, group_size=32)),
    ("uint8", dict(axis=0, symmetric=False)), ("fp8_e4m3", dict(axis=-1)),
    ("binary", dict(axis=0)),
]


@pytest.mark.parametrize("fmt,kw", _PER_BLOCK_SPECS, ids=[s[0] for s in _PER_BLOCK_SPECS])
def test_per_block_materialization_changes_no_bit(fmt, kw, monkeypatch):
  """The CPU's materialized per-block arrays (an identity gather, used from
  ``_PER_BLOCK_MIN_ELEMENTS`` elements on) give the same codes, scales,
  values and gradients as the per-element recomputation, on data with zero,
  NaN, inf and near-overflow blocks."""
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = rng.standard_normal((64, 96)).astype(np.float32) * 4
  x[:32, 0] = 0.0
  x[5, 1] = np.nan
  x[40, 2] = -np.inf
  x[:, 3] = np.float32(3e38)
  x[:32, 4] = np.float32(2.0 ** -120)
  x = jnp.asarray(x, jnp.bfloat16)
  spec = lb.QuantSpec(fmt, **kw)
  xg = jnp.asarray(x, jnp.float32)[:, 32:]
  s_given = lb.init_scale(xg, spec)

  def run():
    q = jax.jit(lambda v: lb.quantize(v, spec))(x)
    fq = jax.jit(lambda v: lb.fake_quant(v, spec))(x)
    g = jax.jit(jax.grad(lambda v: jnp.sum(lb.fake_quant(v, spec).astype(jnp.float32))))(x)
    dq = jax.jit(lb.dequantize)(q)
    given = jax.jit(lambda v, s: lb.fake_quant(v, spec, scale=s))(xg, s_given)
    lowered = jax.jit(lb.dequantize).lower(q).as_text()
    return [np.asarray(a) for a in jax.tree.leaves((q, fq, g, dq, given))], lowered

  # The library's inner jits cache their traces: cleared at each switch.
  monkeypatch.setattr(_quantize, "_PER_BLOCK_MIN_ELEMENTS", 1 << 62)
  jax.clear_caches()
  want, text_off = run()
  monkeypatch.setattr(_quantize, "_PER_BLOCK_MIN_ELEMENTS", 0)
  jax.clear_caches()
  got, text_on = run()
  jax.clear_caches()
  for a, b in zip(want, got):
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8),
                                  np.atleast_1d(b).view(np.uint8))
  if jax.default_backend() == "cpu" and fmt in ("mxfp4", "mxint8", "nvfp4"):
    # The gather is really there on CPU (no gather in the dequantize otherwise).
    assert "gather" in text_on and "gather" not in text_off


_CLIP_SPECS = _PER_BLOCK_SPECS + [
    ("fp8_e5m2", dict(axis=0)), ("nf4", dict(axis=0)), ("ternary", dict(axis=0)),
    ("fp6_e2m3", dict(axis=0)), ("int3", dict(axis=0, group_size=32))]


@pytest.mark.parametrize("fmt,kw", _CLIP_SPECS, ids=[s[0] for s in _CLIP_SPECS])
def test_dequantize_skips_its_clip_only_where_nothing_can_overflow(fmt, kw, monkeypatch):
  """On CPU dequantize leaves out the saturating clip where the per-block
  scales show that no value can overflow: the same bits as with the clip,
  on clean data (the fast path runs), on data with near-overflow, NaN and inf
  blocks, and on scales raised by hand until code * scale overflows, where the
  clip must saturate at the float32 maximum (the fast path must not run)."""
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_quantize, "_DEQUANT_SKIP_CLIP_MIN_ELEMENTS", 0)  # small arrays too
  jax.clear_caches()
  rng = np.random.default_rng(5)
  clean = jnp.asarray(rng.standard_normal((64, 96)) * 4, jnp.bfloat16)
  edgy = np.asarray(rng.standard_normal((64, 96)), np.float32)
  edgy[:, 3] = np.float32(3e38)
  edgy[5, 1] = np.nan
  edgy[40, 2] = -np.inf
  spec = lb.QuantSpec(fmt, **kw)
  emax = _quantize._max_abs_element(spec.storage_format)  # pylint: disable=protected-access
  with_clip = jax.jit(lambda qq: _quantize._dequantize_jnp(  # pylint: disable=protected-access
      qq, _quantize._dequant_totals(qq), True))  # pylint: disable=protected-access
  can_skip = jax.jit(lambda qq: _quantize._dequantize_cannot_overflow(  # pylint: disable=protected-access
      qq, _quantize._dequant_totals(qq), emax))  # pylint: disable=protected-access
  qs = [lb.quantize(clean, spec), lb.quantize(jnp.asarray(edgy, jnp.bfloat16), spec)]
  if fmt in ("int8", "int4", "fp8_e4m3"):  # float32 scales, raised by hand
    q32 = lb.quantize(clean.astype(jnp.float32), spec)  # float32 out: no bf16 inf
    big = q32.scale.at[(0,) * q32.scale.ndim].set(np.float32(3e38))
    qs.append(dataclasses.replace(q32, scale=big))
  # The fast path is for one scale factor per block (not E8M0's pair, not
  # under NVFP4's tensor scale) and formats without inf codes (not e5m2).
  skips = emax is not None and spec.scale_dtype != "e8m0" and qs[0].tensor_scale is None
  assert (emax is None) == (fmt == "fp8_e5m2")
  for i, q in enumerate(qs):
    got = jax.jit(lb.dequantize)(q)
    want = with_clip(q)
    bits = np.uint16 if got.dtype == jnp.bfloat16 else np.uint32
    np.testing.assert_array_equal(np.asarray(got).view(bits), np.asarray(want).view(bits))
    if skips:  # clean scales only
      assert bool(can_skip(q)) == (i == 0), i
  if len(qs) == 3:  # the overflow really happened and saturated
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert np.abs(np.asarray(got, np.float32)).max() > 1e38
  # The conditional picks the program for float32 QArrays; a 16-bit one never
  # clips (core._quantize._DEQUANT_16BIT_NO_CLIP: the 16-bit convert takes the
  # float32 maximum to inf as it takes inf), so it has no conditional at all.
  text32 = jax.jit(lb.dequantize).lower(
      lb.quantize(clean.astype(jnp.float32), spec)).as_text()
  assert ("stablehlo.case" in text32 or "conditional" in text32) == skips, text32[:2000]
  text16 = jax.jit(lb.dequantize).lower(qs[0]).as_text()
  assert "stablehlo.case" not in text16 and "conditional" not in text16
  jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bf16", "f16", "f32"])
def test_amax_keys_from_bits_equal_the_float_expressions(dtype):
  """``_abs_key`` and ``_range_keys`` (the CPU's block amax and range from
  the integer image of x) against numpy's ``where(isfinite(v), |v|, inf)``
  and ``where(isfinite(v), v, +-inf)``: every 16-bit pattern (signed zeros,
  subnormals, infs, NaNs of both signs and any payload), and 2**20 random
  float32 patterns plus the same special values."""
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top
  if jnp.dtype(dtype).itemsize == 2:
    bits = np.arange(1 << 16, dtype=np.uint16)
  else:
    rng = np.random.default_rng(7)
    special = np.array([0, 0x80000000, 1, 0x807FFFFF, 0x7F800000, 0xFF800000,
                        0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x7F7FFFFF], np.uint32)
    bits = np.concatenate([special, rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32)])
  v = bits.view(jnp.dtype(dtype))
  vf = v.astype(np.float32)
  fin = np.isfinite(vf)
  ut = bits.dtype

  def as_bits(a):
    return np.asarray(a).view(ut)

  got = jax.jit(_quantize._abs_key)(v)  # pylint: disable=protected-access
  want = np.where(fin, np.abs(v), np.array(np.inf, v.dtype)).astype(v.dtype)
  np.testing.assert_array_equal(as_bits(got), as_bits(want))
  hi, lo = jax.jit(_quantize._range_keys)(v)  # pylint: disable=protected-access
  np.testing.assert_array_equal(
      as_bits(hi), as_bits(np.where(fin, v, np.array(np.inf, v.dtype)).astype(v.dtype)))
  np.testing.assert_array_equal(
      as_bits(lo), as_bits(np.where(fin, v, np.array(-np.inf, v.dtype)).astype(v.dtype)))


_CPU_PATH_SPECS = [
    ("int8", dict(axis=0)), ("int4", dict(axis=0, group_size=32)),
    ("int3", dict(axis=-1, group_size=16)), ("fp8_e4m3", dict(axis=0)),
    ("fp8_e5m2", dict(axis=-1)), ("fp6_e2m3", dict(axis=0)), ("nf4", dict(axis=0)),
    ("mxfp4", dict(axis=0)), ("mxint8", dict(axis=-1)), ("fp4_e2m1", dict(axis=0, group_size=32)),
    ("uint8", dict(axis=0, symmetric=False)), ("int4", dict(axis=-1, symmetric=False)),
]


def _cpu_path_cases():
  """Every spec on bf16; float16 and float32 inputs (the other key widths)
  for int8 and asymmetric uint8 by default, for all with --runslow."""
  out = []
  for fmt, kw in _CPU_PATH_SPECS:
    name = f"{fmt}-{'-'.join(map(str, kw.values()))}"
    for dtype, dname in ((jnp.bfloat16, "bf16"), (jnp.float16, "f16"), (jnp.float32, "f32")):
      slow = dname != "bf16" and name not in ("int8-0", "uint8-0-False")
      out.append(pytest.param(fmt, kw, dtype, id=f"{name}-{dname}",
                              marks=[pytest.mark.slow] if slow else []))
  return out


@pytest.mark.parametrize("fmt,kw,dtype", _cpu_path_cases())
def test_cpu_amax_keys_and_single_use_quotient_change_no_bit(fmt, kw, dtype, monkeypatch):
  """The CPU-only rewrites of core._quantize (``_CPU_AMAX_KEY``: the block
  amax and range reduced from x's bits; ``_CPU_ONE_USE``: the scaled values
  behind one no-op ReducePrecision so the division fuses into the rounding)
  give the same codes, scales, values and gradients as the plain jnp
  expressions, on data with zero, subnormal, NaN, inf and near-overflow
  blocks (any two NaNs count as equal, as everywhere here: which NaN an
  operation returns follows its operand order, which fusion may change)."""
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)
  x = rng.standard_normal((64, 96)).astype(np.float32) * 4
  big = float(jnp.finfo(dtype).max) * 0.9
  tiny = float(jnp.finfo(dtype).smallest_subnormal) * 3
  x[:32, 0] = 0.0
  x[5, 1] = np.nan
  x[6, 1] = -np.nan
  x[40, 2] = -np.inf
  x[41, 5] = np.inf
  x[:, 3] = big
  x[:32, 4] = tiny
  x[32:, 4] = -tiny
  x[7, 6] = -0.0
  x = jnp.asarray(x, dtype)
  spec = lb.QuantSpec(fmt, **kw)

  def run():
    q = jax.jit(lambda v: lb.quantize(v, spec))(x)
    fq = jax.jit(lambda v: lb.fake_quant(v, spec))(x)
    g = jax.jit(jax.grad(lambda v: jnp.sum(lb.fake_quant(v, spec).astype(jnp.float32))))(x)
    return [np.asarray(a) for a in jax.tree.leaves((q, fq, g))]

  monkeypatch.setattr(_quantize, "_CPU_AMAX_KEY", False)
  monkeypatch.setattr(_quantize, "_CPU_ONE_USE", False)
  jax.clear_caches()
  want = run()
  monkeypatch.setattr(_quantize, "_CPU_AMAX_KEY", True)
  monkeypatch.setattr(_quantize, "_CPU_ONE_USE", True)
  jax.clear_caches()
  got = run()
  jax.clear_caches()
  assert len(got) == len(want)
  for i, (a, b) in enumerate(zip(want, got)):
    _assert_same(b, a, f"leaf {i}")


@pytest.mark.parametrize("fmt,kw", [("int8", dict(axis=0)), ("mxfp4", dict(axis=0)),
                                    ("nvfp4", dict(axis=0)), ("fp8_e4m3", dict(axis=-1))],
                         ids=["int8", "mxfp4", "nvfp4", "fp8"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_16bit_dequantize_without_clip_changes_no_bit(fmt, kw, dtype, monkeypatch):
  """A 16-bit QArray dequantizes without the saturating clip
  (``_DEQUANT_16BIT_NO_CLIP``): the same bits as with it, on scales raised
  by hand until code * scale overflows float32 (the clip's float32 maximum
  and the overflow's inf both convert to the 16-bit inf), NaN and inf
  blocks and clean data."""
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  x = rng.standard_normal((64, 96)).astype(np.float32)
  x[5, 1], x[40, 2] = np.nan, -np.inf
  spec = lb.QuantSpec(fmt, **kw)
  q = lb.quantize(jnp.asarray(x, dtype), spec)
  qs = [q]
  if q.scale.dtype == jnp.float32:
    qs.append(dataclasses.replace(q, scale=q.scale.at[(0,) * q.scale.ndim].set(
        np.float32(3e38))))
  clip = jax.jit(lambda qq: _quantize._dequantize_jnp(  # pylint: disable=protected-access
      qq, _quantize._dequant_totals(qq), True))  # pylint: disable=protected-access
  for qq in qs:
    got = np.asarray(jax.jit(lb.dequantize)(qq)).view(np.uint16)
    want = np.asarray(clip(qq)).view(np.uint16)
    np.testing.assert_array_equal(got, want)
  if len(qs) == 2:  # the overflow happened: inf in 16 bits either way
    assert np.isinf(np.asarray(jax.jit(lb.dequantize)(qs[1]), np.float32)).any()


@pytest.mark.parametrize("fmt,kw", [("int8", dict(axis=0)), ("mxfp4", dict(axis=0)),
                                    ("nvfp4", dict(axis=0)), ("fp8_e4m3", dict(axis=-1)),
                                    ("int4", dict(axis=0, group_size=32))],
                         ids=["int8", "mxfp4", "nvfp4", "fp8", "int4_g32"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_16bit_fake_quant_without_clip_changes_no_bit(fmt, kw, dtype, monkeypatch):
  """fake_quant of a 16-bit array leaves out the saturating clip
  (``_FQ_16BIT_NO_CLIP``): the same bits as with it, values and gradients,
  on NaN and inf entries, clean data, and learned scales large enough that
  code * scale overflows float32 (the clip's float32 maximum and the
  overflow's inf both convert to the 16-bit inf)."""
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  x = rng.standard_normal((64, 96)).astype(np.float32)
  x[5, 1], x[40, 2] = np.nan, -np.inf
  x = jnp.asarray(x, dtype)
  spec = lb.QuantSpec(fmt, **kw)
  calls = [lambda a: lb.fake_quant(a, spec),
           lambda a: jax.grad(lambda b: jnp.sum(lb.fake_quant(b, spec)
                                                .astype(jnp.float32)))(a)]
  overflow = fmt in ("int8", "int4") and dtype == jnp.bfloat16
  if overflow:
    # A learned scale of 2e38: an entry of 3.2e38 rounds to code 2, whose
    # value 4e38 is past the float32 maximum.
    big = jnp.full(lb.scale_shape(x.shape, spec), 2e38, jnp.float32)
    calls.append(lambda a: lb.fake_quant(a.at[3, 3].set(3.2e38), spec, scale=big))
  for f in calls:
    monkeypatch.setattr(_quantize, "_FQ_16BIT_NO_CLIP", True)
    got = np.asarray(jax.jit(lambda a: f(a))(x))
    monkeypatch.setattr(_quantize, "_FQ_16BIT_NO_CLIP", False)
    want = np.asarray(jax.jit(lambda a: f(a))(x))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  if overflow:   # it happened: the 16-bit inf either way
    assert np.isposinf(got.astype(np.float32)[3, 3])
