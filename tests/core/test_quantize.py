"""quantize / dequantize / fake_quant against independent numpy references.

MX follows the OCP Microscaling Formats v1.0 spec, NVFP4 the issue's recipe (in
float32, in that order), integers the symmetric restricted-range and asymmetric
zero-point rules. The references below are written from those definitions, not
from the library, and compared bit for bit.
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

F32 = np.float32
# Bit-exact comparisons with numpy's float32 division: XLA's float32 division is
# correctly rounded on CPU (where CI runs) but not on GPU.
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="needs correctly rounded float32 division")


def _quiet_cast(x, dt):
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", RuntimeWarning)
    return x.astype(dt)


@functools.lru_cache(maxsize=None)
def _qdq(spec):
  """jit'd (QArray, dequantize(QArray), fake_quant) for a static spec."""

  def run(x):
    q = lb.quantize(x, spec)
    return q, lb.dequantize(q), lb.fake_quant(x, spec)

  return jax.jit(run)


def _run(x, spec):
  q, y, fq = _qdq(spec)(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(fq))  # fq == dq(q)
  return q, np.asarray(y)


def _same_bits(got, ref):
  """Bit equality, NaN == NaN, and -0 == +0 (integer grids have no -0)."""
  got = np.asarray(got, F32) + F32(0)
  ref = np.asarray(ref, F32) + F32(0)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  ok = ~np.isnan(ref)
  np.testing.assert_array_equal(got[ok].view(np.uint32), ref[ok].view(np.uint32))


def _test_matrix(seed=0, rows=24, cols=256):
  """Rows of different character: normal, heavy-tailed, tiny, huge, zeros, sparse."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, cols)).astype(F32)
  x[1] = rng.standard_t(3, cols)
  x[2] *= F32(1e-30)
  x[3] *= F32(1e30)
  x[4] = 0
  x[5, ::7] = 0
  x[5, 3::9] *= 1000
  x[6] = np.round(x[6] * 4) / 4  # many exact grid points and ties
  x[7, :32] = 0  # one all-zero block in a nonzero row
  x[8] *= F32(2.0 ** -100)  # small, but results stay normal float32 (XLA CPU: FTZ)
  return x


# ---------------------------------------------------------------------------
# MX (OCP Microscaling v1.0)

MX = {  # name: (element ml_dtype or "int8", emax of the element, element max)
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8, 448.0),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15, 57344.0),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 2, 7.5),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4, 28.0),
    "mxfp4": (ml_dtypes.float4_e2m1fn, 2, 6.0),
    "mxint8": ("int8", 0, 127 / 64),
}


def _floor_log2(a):
  m, e = np.frexp(a.astype(np.float64))  # a = m * 2**e, m in [0.5, 1)
  return (e - 1).astype(np.int64)


def _mx_reference(x, name, rounding="floor"):
  """(values, e8m0 scale codes) of MX quantization along the last axis, blocks of 32."""
  dt, emax, emax_val = MX[name]
  xb = x.reshape(x.shape[:-1] + (-1, 32)).astype(np.float64)
  with np.errstate(invalid="ignore"):
    amax = np.max(np.abs(xb), axis=-1)
  bad = ~np.isfinite(amax)
  safe = np.where(bad | (amax == 0), 1.0, amax)
  if rounding == "floor":
    e = _floor_log2(safe) - emax
  else:
    r = safe / emax_val
    m, ex = np.frexp(r)
    if rounding == "ceil":
      e = np.where(m == 0.5, ex - 1, ex)
    else:
      fl = ex - 1
      e = fl + (r / np.exp2(fl) >= np.sqrt(2.0))
  e = np.where(amax == 0, -127, e)
  e = np.clip(e, -127, 127)
  scale = np.exp2(e.astype(np.float64))[..., None]
  y = np.clip(xb / scale, -emax_val, emax_val)
  with np.errstate(invalid="ignore"):
    if dt == "int8":
      elem = np.clip(np.round(y * 64), -127, 127) / 64 + 0.0  # ints have no -0
    else:
      elem = _quiet_cast(y.astype(F32), dt).astype(np.float64)
  val = elem * scale
  val = np.where(bad[..., None], np.nan, val)
  codes = np.where(bad, 255, e + 127).astype(np.uint8)
  return val.reshape(x.shape).astype(F32), codes, e


@pytest.mark.parametrize("name", list(MX))
def test_mx_matches_ocp_reference(name):
  x = _test_matrix()
  x[9, 40] = np.nan  # NaN block -> NaN
  x[10, 100] = np.inf  # inf block -> NaN
  x[11, 5] = -np.inf
  spec = lb.QuantSpec(name, axis=-1)
  q, y = _run(x, spec)
  ref, codes, _ = _mx_reference(x, name)
  assert q.scale.dtype == jnp.uint8 and q.scale.shape == (24, 8)
  np.testing.assert_array_equal(np.asarray(q.scale), codes)
  _same_bits(y, ref)
  # The NaN/inf blocks (and only they) are NaN; all-zero blocks are zeros.
  assert np.all(np.isnan(y[9, 32:64])) and not np.any(np.isnan(y[9, :32]))
  assert np.all(np.isnan(y[10, 96:128])) and np.all(np.isnan(y[11, :32]))
  assert np.all(y[4] == 0) and np.all(y[7, :32] == 0)
  assert np.asarray(q.scale)[4, 0] == 0  # zero block: the smallest scale, 2**-127


@pytest.mark.parametrize("name", list(MX))
@pytest.mark.parametrize("rounding", ["ceil", "nearest"])
def test_mx_other_scale_roundings(name, rounding):
  x = _test_matrix(seed=1)
  x = x[np.r_[0:2, 4:8]]  # keep within the range where 2**e stays a normal float32
  bf = F.BlockFormat(F.get(name).element, "e8m0", 32, scale_rounding=rounding)
  q, y = _run(x, lb.QuantSpec(bf, axis=-1))
  ref, codes, e = _mx_reference(x, name, rounding)
  np.testing.assert_array_equal(np.asarray(q.scale), codes)
  _same_bits(y, ref)
  if rounding == "ceil":
    # ceil never saturates: every |x| / scale is within the element's max.
    scale = np.exp2(e.astype(np.float64))
    xb = np.abs(x.reshape(x.shape[0], -1, 32).astype(np.float64))
    assert np.all(xb / scale[..., None] <= MX[name][2])


def test_mx_ceil_never_saturates_at_binade_edges():
  # amax just above element_max * 2**k: ceil must take the next power of two.
  for name, (_, _, emax_val) in MX.items():
    elem = F.get(name).element
    bf = F.BlockFormat(elem, "e8m0", 32, scale_rounding="ceil")
    base = (F32(emax_val) * np.exp2(np.arange(-60, 60)).astype(F32)).astype(F32)
    amax = np.concatenate([base, np.nextafter(base, F32(np.inf)),
                           np.nextafter(base, F32(0))])
    x = np.zeros((amax.size, 32), F32)
    x[:, 0] = amax
    x[:, 1] = -amax
    q, y = _run(x, lb.QuantSpec(bf, axis=-1))
    e = np.asarray(q.scale).astype(np.int64)[:, 0] - 127
    assert np.all(amax.astype(np.float64) / np.exp2(e) <= emax_val), name
    # ... and is the smallest such power of two.
    assert np.all(amax.astype(np.float64) / np.exp2(e - 1) > emax_val), name


def test_mx_floor_saturates_and_keeps_subnormals():
  x = np.zeros((1, 32), F32)
  x[0, :4] = [7.9, -7.9, 0.5, 0.25]  # amax 7.9: floor(log2) = 2 = emax, scale 1
  q, y = _run(x, lb.QuantSpec("mxfp4", axis=-1))
  assert int(np.asarray(q.scale)[0, 0]) == 127
  np.testing.assert_array_equal(y[0, :4], [6.0, -6.0, 0.5, 0.0])  # 0.5: subnormal kept
  x = np.zeros((1, 32), F32)
  x[0, :3] = [448.0, 2.0 ** -9, 3 * 2.0 ** -9]  # e4m3 subnormals with scale 1
  _, y = _run(x, lb.QuantSpec("mxfp8_e4m3", axis=-1))
  np.testing.assert_array_equal(y[0, :3], [448.0, 2.0 ** -9, 3 * 2.0 ** -9])


def test_mxint8_value_is_code_over_64():
  codes = np.concatenate([np.arange(-127, 128), [0]]).reshape(8, 32)
  codes[:, 0] = 127  # every block's amax is 127/64: floor(log2) = 0 = emax, scale 1
  x = (codes / 64).astype(F32)
  q, y = _run(x, lb.QuantSpec("mxint8", axis=-1))
  np.testing.assert_array_equal(np.asarray(q.scale), 127)
  assert q.codes.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q.codes).astype(np.int64), codes)
  np.testing.assert_array_equal(y, x)
  # With scale 2**-3 the value is code / 64 / 8.
  q, y = _run(x / 8, lb.QuantSpec("mxint8", axis=-1))
  np.testing.assert_array_equal(np.asarray(q.scale), 124)
  np.testing.assert_array_equal(y, x / 8)


# ---------------------------------------------------------------------------
# NVFP4: the recipe, in float32, in this order.


def _pack_nibbles(c):
  c = c.astype(np.uint8)
  return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def _nvfp4_reference(x, tensor_amax=None):
  """(values, tensor scale, e4m3 block scale bytes, packed fp4 codes).

  ``tensor_amax`` replaces the data's amax in the tensor scale (static).
  """
  x = np.asarray(x, F32)
  amax = np.max(np.abs(x)) if tensor_amax is None else F32(tensor_amax)
  t = F32(amax / F32(6 * 448)) if amax != 0 else F32(1.0)
  xb = x.reshape(x.shape[:-1] + (-1, 16))
  bam = np.max(np.abs(xb), axis=-1)
  s_raw = np.clip(bam / F32(6) / t, F32(2.0 ** -6), F32(448)).astype(F32)
  s8 = _quiet_cast(s_raw, ml_dtypes.float8_e4m3fn)
  s = s8.astype(F32)
  mult = ((F32(1) / t) / s).astype(F32)
  e = np.clip(xb * mult[..., None], F32(-6), F32(6)).astype(F32)
  e4 = _quiet_cast(e, ml_dtypes.float4_e2m1fn)
  val = e4.astype(F32) * (t * s).astype(F32)[..., None]
  codes = _pack_nibbles(e4.view(np.uint8).reshape(x.shape))
  return val.reshape(x.shape).astype(F32), t, s8.view(np.uint8), codes


@cpu_only
@pytest.mark.parametrize("case", ["normal", "heavy", "mixed", "zeros", "tiny", "huge",
                                  "one_hot", "bf16"])
def test_nvfp4_matches_recipe_bit_exactly(case):
  rng = np.random.default_rng(7)
  x = rng.standard_normal((16, 128)).astype(F32)
  if case == "heavy":
    x = rng.standard_t(3, (16, 128)).astype(F32)
  elif case == "mixed":
    x = _test_matrix(seed=3, rows=16, cols=128)
    x[3] = rng.standard_normal(128) * 1e3  # 1e30 rows would flush the rest to 0
  elif case == "zeros":
    x[:] = 0
  elif case == "tiny":
    x *= F32(1e-20)
  elif case == "huge":
    x *= F32(1e20)
  elif case == "one_hot":
    x[:] = 0
    x[3, 17] = 5.0  # every other block: amax 0 -> s clamped to 2**-6
  in_dtype = jnp.bfloat16 if case == "bf16" else jnp.float32
  xin = jnp.asarray(x).astype(in_dtype)
  q, y = _run(xin, lb.QuantSpec("nvfp4", axis=-1))
  val, t, s8, codes = _nvfp4_reference(np.asarray(xin.astype(jnp.float32)))
  assert q.tensor_scale.dtype == jnp.float32
  assert np.asarray(q.tensor_scale).view(np.uint32) == np.asarray(t).view(np.uint32)
  assert q.scale.dtype == jnp.float8_e4m3fn and q.scale.shape == (16, 8)
  np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), s8)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (16, 64)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  _same_bits(np.asarray(jnp.asarray(y, jnp.float32)),
             np.asarray(jnp.asarray(val).astype(in_dtype).astype(jnp.float32)))
  if case == "zeros":
    assert float(q.tensor_scale) == 1.0 and np.all(y == 0)


@cpu_only
@pytest.mark.parametrize("ratio", [0.25, 1.0, 4.0])
def test_nvfp4_static_tensor_scale_dynamic_block_scales(ratio):
  # A calibrated tensor range fixes t; block scales still follow each block.
  rng = np.random.default_rng(11)
  x = rng.standard_t(4, (16, 128)).astype(F32)
  ta = F32(np.max(np.abs(x)) * ratio)
  spec = lb.QuantSpec("nvfp4", axis=-1)
  q = lb.quantize(jnp.asarray(x), spec, tensor_amax=ta)
  y = lb.fake_quant(jnp.asarray(x), spec, tensor_amax=ta)
  val, t, s8, codes = _nvfp4_reference(x, tensor_amax=ta)
  assert np.asarray(q.tensor_scale).view(np.uint32) == np.asarray(t).view(np.uint32)
  np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), s8)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  _same_bits(np.asarray(y), val)
  _same_bits(np.asarray(lb.dequantize(q)), val)
  # Nothing exceeds the static range: block scales saturate at 448.
  assert np.max(np.abs(val)) <= ta * (1 + 2 ** -20)
  if ratio == 1.0:  # the data's own amax: exactly the dynamic result
    _same_bits(np.asarray(y), np.asarray(lb.fake_quant(jnp.asarray(x), spec)))


def test_nvfp4_tensor_amax_gradient_and_errors():
  x = jax.random.normal(jax.random.key(0), (4, 64)) * 3
  spec = lb.QuantSpec("nvfp4", axis=-1)
  ta = jnp.float32(1.0)  # well below the data: large values clip
  gx, gt = jax.grad(lambda v, t: jnp.sum(lb.fake_quant(v, spec, tensor_amax=t)),
                    argnums=(0, 1))(x, ta)
  big = np.abs(np.asarray(x)) > 1.0 + 1e-3
  assert big.any() and np.all(np.asarray(gx)[big] == 0)
  assert np.all(np.asarray(gx)[np.abs(np.asarray(x)) < 0.9] == 1)
  assert float(gt) == 0.0
  with pytest.raises(ValueError, match="tensor scale"):
    lb.fake_quant(x, "int8", tensor_amax=ta)
  with pytest.raises(ValueError, match="scalar"):
    lb.quantize(x, spec, tensor_amax=jnp.ones((4,)))


def test_nvfp4_static_block_ranges_under_a_tensor_range():
  # amax per block with tensor_amax: the blocks take their static ranges under
  # the tensor scale tensor_amax gives (GPTQ's NVFP4 rounding), not under the
  # largest amax; equal to the largest amax it is the amax-only result.
  x = jax.random.normal(jax.random.key(0), (4, 64)) * 3
  spec = lb.QuantSpec("nvfp4", axis=-1)
  a = jnp.max(jnp.abs(x.reshape(4, 4, 16)), axis=-1) * 0.5
  ta = jnp.float32(40.0)
  q = lb.quantize(x, spec, amax=a, tensor_amax=ta)
  ref_t = lb.quantize(x, spec, tensor_amax=ta).tensor_scale
  assert np.asarray(q.tensor_scale).view(np.uint32) == np.asarray(ref_t).view(np.uint32)
  # Each block's E4M3 scale is its amax / (6 * t) under that tensor scale.
  s = np.asarray(q.scale.astype(jnp.float32))
  want = np.asarray((a / (6 * ref_t)).astype(jnp.float8_e4m3fn).astype(jnp.float32))
  np.testing.assert_array_equal(s, want)
  _same_bits(np.asarray(lb.fake_quant(x, spec, amax=a, tensor_amax=ta)),
             np.asarray(lb.dequantize(q)))
  _same_bits(np.asarray(lb.fake_quant(x, spec, amax=a, tensor_amax=jnp.max(a))),
             np.asarray(lb.fake_quant(x, spec, amax=a)))


def test_nvfp4_given_scale_under_a_given_tensor_scale():
  # quantize(..., scale=, tensor_scale=) stores the block scales under that
  # tensor scale; rebuilt from the largest block scale (max(scale) / 448) it
  # can differ: GPTQ-like scales whose top block misses E4M3's 448.
  x = jax.random.normal(jax.random.key(1), (8, 64))
  spec = lb.QuantSpec("nvfp4", axis=-1)
  t = jnp.float32(0.0123)
  e4 = jnp.asarray([[16.0, 104.0, 240.0, 320.0]] * 8)  # top code 320 < 448
  scale = e4 * t
  q = lb.quantize(x, spec, scale=scale, tensor_scale=t)
  assert np.asarray(q.tensor_scale).view(np.uint32) == np.asarray(t).view(np.uint32)
  np.testing.assert_array_equal(np.asarray(q.scale.astype(jnp.float32)),
                                np.asarray(e4))
  y = lb.fake_quant(x, spec, scale=scale, tensor_scale=t)
  _same_bits(np.asarray(y), np.asarray(lb.dequantize(q)))
  rebuilt = lb.quantize(x, spec, scale=scale)
  assert float(rebuilt.tensor_scale) != float(t)   # 320 t / 448
  # The tensor scale is a constant: x and the block scales get LSQ's
  # gradients, the tensor scale none.
  gs, gt = jax.grad(lambda s_, t_: jnp.sum(lb.fake_quant(x, spec, scale=s_,
                                                         tensor_scale=t_) ** 2),
                    argnums=(0, 1))(scale, t)
  assert np.all(np.isfinite(np.asarray(gs))) and np.any(np.asarray(gs) != 0)
  assert float(gt) == 0.0
  with pytest.raises(ValueError, match="pass scale= with it"):
    lb.quantize(x, spec, tensor_scale=t)
  with pytest.raises(ValueError, match="has none"):
    lb.quantize(x, lb.QuantSpec("fp4_e2m1", axis=-1, group_size=16),
                scale=scale, tensor_scale=t)
  with pytest.raises(ValueError, match="must be a scalar"):
    lb.quantize(x, spec, scale=scale, tensor_scale=jnp.ones((2,)))
  with pytest.raises(ValueError, match="positive finite"):
    lb.quantize(x, spec, scale=scale, tensor_scale=0.0)


# ---------------------------------------------------------------------------
# Integers, codebooks, per-tensor floats


def _int_sym_reference(x, bits, group):
  qmax = F32(2 ** (bits - 1) - 1)
  xb = x.reshape(x.shape[:-1] + (-1, group))
  amax = np.max(np.abs(xb), axis=-1)
  s = np.where(amax > 0, amax / qmax, F32(1)).astype(F32)
  q = np.clip(np.round(xb / s[..., None]), -qmax, qmax)
  return (q * s[..., None]).reshape(x.shape).astype(F32), s


@cpu_only
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 256), (3, 32), (2, 64), (4, 1)])
def test_int_symmetric_scale_is_amax_over_qmax(bits, group):
  x = _test_matrix(seed=bits)
  x = x[np.r_[0:2, 4:8]]
  q, y = _run(x, lb.QuantSpec(f"int{bits}", axis=-1, group_size=group))
  ref, s = _int_sym_reference(x, bits, group)
  np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint32), s.view(np.uint32))
  _same_bits(y, ref)
  codes_seen = np.unique(np.round(y / np.repeat(s, group, axis=-1)))
  assert codes_seen.min() >= -(2 ** (bits - 1) - 1)  # restricted range: never -2**(b-1)


@cpu_only
def test_int4_g128_scale_one_where_amax_is_zero():
  x = np.zeros((2, 256), F32)
  x[1, 128:] = np.linspace(-3, 3, 128)
  q, y = _run(x, lb.QuantSpec("int4", axis=-1, group_size=128))
  np.testing.assert_array_equal(np.asarray(q.scale), [[1, 1], [1, F32(3) / F32(7)]])
  assert np.all(y[0] == 0) and np.all(y[1, :128] == 0)


def test_int2_is_minus_one_zero_one():
  x = jax.random.normal(jax.random.key(0), (4, 64))
  q, y = _run(x, lb.QuantSpec("int2", axis=-1))
  s = np.asarray(q.scale)
  assert set(np.unique(np.round(y / s)).tolist()) <= {-1.0, 0.0, 1.0}
  assert set(np.unique(np.round(y / s)).tolist()) == {-1.0, 0.0, 1.0}


@cpu_only
@pytest.mark.parametrize("bits", [4, 8])
def test_uint_asymmetric_zero_point(bits):
  x = _test_matrix(seed=10 + bits)[np.r_[0:2, 4:8]]
  x[0] += 2.0  # mostly positive rows: the zero point moves
  x[1] = np.abs(x[1])  # all >= 0: zero point 0
  x[2] = -np.abs(np.random.default_rng(1).standard_normal(256)).astype(F32)
  levels = F32(2 ** bits - 1)
  q, y = _run(x, lb.QuantSpec(f"uint{bits}", axis=-1))
  hi = np.maximum(x.max(axis=-1), 0)
  lo = np.minimum(x.min(axis=-1), 0)
  rng = (hi - lo).astype(F32)
  s = np.where(rng > 0, rng / levels, F32(1)).astype(F32)
  zp = np.clip(np.round(-lo / s), 0, levels)
  code = np.clip(np.round(x / s[:, None] + zp[:, None]), 0, levels)
  ref = ((code - zp[:, None]) * s[:, None]).astype(F32)
  np.testing.assert_array_equal(np.asarray(q.scale)[:, 0], s)
  np.testing.assert_array_equal(np.asarray(q.zero_point)[:, 0], zp)
  assert q.zero_point.dtype == jnp.uint8
  _same_bits(y, ref)
  assert np.asarray(q.zero_point)[1, 0] == 0
  assert np.asarray(q.zero_point)[2, 0] == levels  # all negative: zero at the top


def test_asymmetric_int_spec_on_signed_name():
  x = jax.random.normal(jax.random.key(0), (4, 32)) + 1.0
  q, y = _run(x, lb.QuantSpec("int4", axis=-1, symmetric=False))
  assert q.zero_point is not None and q.spec.storage_format.name == "uint4"
  assert float(np.max(np.abs(y - np.asarray(x)))) <= float(np.max(q.scale)) / 2 * 1.0001


def test_nf4_blocks_of_64_absmax():
  x = jax.random.normal(jax.random.key(1), (4, 256))
  q, y = _run(x, lb.QuantSpec("nf4", axis=-1))
  assert q.scale.shape == (4, 4)
  xb = np.asarray(x).reshape(4, 4, 64)
  amax = np.abs(xb).max(-1)
  np.testing.assert_array_equal(np.asarray(q.scale), amax)
  t = np.asarray(F.get("nf4").table, F32)
  r = xb / amax[..., None]
  idx = np.argmin(np.abs(r[..., None] - t), axis=-1)
  np.testing.assert_allclose(y.reshape(4, 4, 64), t[idx] * amax[..., None], rtol=1e-6)


def test_binary_and_ternary_scales():
  x = np.asarray(jax.random.normal(jax.random.key(2), (4, 64)))
  _, y = _run(x, lb.QuantSpec("binary", axis=-1))
  m = np.abs(x).mean(-1, keepdims=True)
  np.testing.assert_allclose(y, np.where(x > 0, m, -m), rtol=1e-6)
  _, y = _run(x, lb.QuantSpec("ternary", axis=-1))
  thr = 0.7 * np.abs(x).mean(-1, keepdims=True)
  sel = np.abs(x) > thr
  a = (np.abs(x) * sel).sum(-1, keepdims=True) / sel.sum(-1, keepdims=True)
  np.testing.assert_allclose(y, np.sign(x) * sel * a, rtol=1e-6)


@cpu_only
@pytest.mark.parametrize("name,dt", [("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                                     ("fp8_e5m2", ml_dtypes.float8_e5m2),
                                     ("fp4_e2m1", ml_dtypes.float4_e2m1fn),
                                     ("fp6_e3m2", ml_dtypes.float6_e3m2fn)])
def test_float_per_tensor_and_per_channel(name, dt):
  x = _test_matrix(seed=4)[np.r_[0:2, 5:7]]
  fmax = F32(F.get(name).max)
  _, y = _run(x, lb.QuantSpec(name))  # axis unset: per-tensor
  s = F32(np.max(np.abs(x))) / fmax
  ref = _quiet_cast(x / s, dt).astype(F32) * s
  _same_bits(y, ref)
  _, y = _run(x, lb.QuantSpec(name, axis=0))  # per output channel of a [K, N] weight
  s = (np.max(np.abs(x), axis=0) / fmax).astype(F32)
  ref = _quiet_cast(x / s, dt).astype(F32) * s
  _same_bits(y, ref)


# ---------------------------------------------------------------------------
# fake_quant == dequantize(quantize(x)) for every format; shapes and dtypes


def _spec_for_name(name, **kw):
  f = F.get(name)
  if isinstance(f, F.BlockFormat):
    return lb.QuantSpec(name, axis=-1, **kw)
  if name in ("binary", "ternary", "nf4"):
    return lb.QuantSpec(name, axis=-1, **kw)
  return lb.QuantSpec(name, axis=-1, group_size=32, **kw)


ALL_ELEMENT_NAMES = [n for n in F.names() if n != "e8m0"]


def test_fake_quant_equals_dequantize_quantize_every_format():
  rng = np.random.default_rng(3)
  x = (rng.standard_t(3, (6, 2, 192)) * 0.5).astype(F32)
  x[0, 0, :] = 0
  x[1, 1, 5] = np.nan
  specs = {name: _spec_for_name(name) for name in ALL_ELEMENT_NAMES}

  @jax.jit
  def run(v):  # one compilation for every format
    out = {}
    for name, spec in specs.items():
      q = lb.quantize(v, spec)
      out[name] = (q, lb.dequantize(q), lb.fake_quant(v, spec))
    return out

  for name, (q, y, fq) in run(jnp.asarray(x)).items():
    spec = specs[name]
    y, fq = np.asarray(y), np.asarray(fq)
    np.testing.assert_array_equal(y, fq, err_msg=name)  # NaN == NaN here
    assert y.shape == x.shape and y.dtype == np.float32, name
    assert q.shape == x.shape and q.dtype == "float32", name
    assert np.all(y[0, 0] == 0), name
    gs = spec.group_size or x.shape[-1]  # the NaN's block, and only it, is NaN
    assert np.all(np.isnan(y[1, 1, :gs])) and not np.any(np.isnan(y[1, 1, gs:])), name
    assert not np.any(np.isnan(y[2:])), name


@pytest.mark.parametrize("name", ["int4", "fp8_e4m3", "nvfp4"])
def test_other_dtypes_come_back_in_their_dtype(name):
  x = jax.random.normal(jax.random.key(0), (4, 64)).astype(jnp.bfloat16)
  q, y = _run(x, _spec_for_name(name))
  assert y.dtype == jnp.bfloat16 and q.dtype == "bfloat16"
  ref = np.asarray(_qdq(_spec_for_name(name))(x.astype(jnp.float32))[2])
  np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                np.asarray(jnp.asarray(ref).astype(jnp.bfloat16)
                                           .astype(jnp.float32)))


def test_fake_quant_keyword_forms_equal_spec_forms():
  x = jax.random.normal(jax.random.key(0), (4, 256))
  a, b, c, d = jax.jit(lambda v: (
      lb.fake_quant(v, "int4", axis=-1, group_size=128),
      lb.fake_quant(v, lb.QuantSpec("int4", axis=-1, group_size=128)),
      lb.fake_quant(v, "mxfp4", axis=-1),
      lb.fake_quant(v, lb.QuantSpec("mxfp4", axis=-1, group_size=32))))(x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))

  def scale_shape(v, *args, **kw):
    return jax.eval_shape(lambda u: lb.quantize(u, *args, **kw), v).scale.shape

  assert scale_shape(x, "fp8_e4m3") == (1, 1)  # no axis: per-tensor
  assert scale_shape(x, "fp8_e4m3", axis="tensor") == (1, 1)
  assert scale_shape(x, "int8", axis=-1) == (4, 1)  # per-token activations
  assert scale_shape(x.T, "int8", axis=0) == (1, 4)  # weight [K, N]: per channel
  assert scale_shape(x.T, "int4", axis=0, group_size=128) == (2, 4)  # groups along K
  assert scale_shape(x, "int8", tile=(2, 128)) == (2, 2)
  assert scale_shape(x.reshape(4, 2, 128), "int8", axis=(0, 2)) == (1, 2, 1)
  assert scale_shape(x, "nvfp4", axis=-1) == (4, 16)


@pytest.mark.parametrize("sd", ["float32", "bfloat16", "float16", "e8m0", "fp8_e4m3"])
def test_scale_dtypes(sd):
  x = jax.random.normal(jax.random.key(4), (8, 64))
  q, y = _run(x, lb.QuantSpec("int8", axis=-1, scale_dtype=sd))
  want = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "e8m0": jnp.uint8, "fp8_e4m3": jnp.float8_e4m3fn}[sd]
  assert q.scale.dtype == want
  err = np.abs(y - np.asarray(x))
  amax = np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True)
  # Half a step (amax / 127 / 2) plus the scale's own rounding: up to 2**-4
  # relative for an fp8_e4m3 scale (rounded down, the top values saturate).
  rel = {"float32": 0, "bfloat16": 2 ** -8, "float16": 2 ** -11, "e8m0": 0,
         "fp8_e4m3": 2 ** -4}[sd]
  assert np.all(err <= amax * (1 / 127 + rel) * 1.0001)


# ---------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("name,kw", [("int4", {"group_size": 32}),
                                     ("uint4", {"group_size": 32}),
                                     ("mxfp4", {}), ("nf4", {"group_size": 32}),
                                     ("binary", {"group_size": 32}),
                                     ("ternary", {"group_size": 32}),
                                     ("fp8_e4m3", {"group_size": 32})])
def test_pad_never_changes_a_blocks_range(name, kw):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 40)).astype(F32) + 0.3  # last block: 8 real elements
  with pytest.raises(ValueError, match="pad=True"):
    lb.quantize(x, name, axis=-1, **kw)
  _, y = _run(x, lb.QuantSpec(name, axis=-1, pad=True, **kw))
  assert y.shape == x.shape
  # The partial block is quantized exactly as those 8 elements on their own.
  kw8 = dict(kw, group_size=8)
  f = F.get(name)
  spec8 = lb.QuantSpec(F.BlockFormat(f.element, f.scale, 8) if isinstance(
      f, F.BlockFormat) else name, axis=-1, **({} if isinstance(f, F.BlockFormat)
                                               else kw8))
  _, y8 = _run(x[:, 32:], spec8)
  np.testing.assert_array_equal(y[:, 32:], y8)
  _, y32 = _run(x[:, :32], lb.QuantSpec(name, axis=-1, **kw))
  np.testing.assert_array_equal(y[:, :32], y32)


@pytest.mark.parametrize("name,kw", [
    ("int3", {"tile": (16, 32)}), ("fp6_e2m3", {"axis": 1, "group_size": 8}),
    ("int4", {"axis": 1}), ("binary", {"axis": -1}), ("uint4", {"axis": (0, 2)}),
    ("int2", {"axis": 0, "group_size": 2})])
def test_pad_tiles_and_odd_pack_axes(name, kw):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 37, 50)).astype(F32)
  q, y = _run(x, lb.QuantSpec(name, pad=True, **kw))
  assert y.shape == x.shape and q.shape == x.shape
  assert np.all(np.isfinite(y))
  assert np.corrcoef(y.ravel(), x.ravel())[0, 1] > 0.6


def test_non_multiple_axis_is_an_error_by_default():
  x = jnp.ones((5, 37, 50))
  with pytest.raises(ValueError, match="not a multiple of the block size"):
    lb.quantize(x, "int4", tile=(16, 32))
  with pytest.raises(ValueError, match="pad=True"):
    lb.fake_quant(x, "mxfp4", axis=1)


# ---------------------------------------------------------------------------
# Static ranges, clipping and gradients


def _grad(spec, x, **kw):
  return np.asarray(jax.jit(jax.grad(
      lambda v: jnp.sum(lb.fake_quant(v, spec, **kw) * 1.0)))(x))


@pytest.mark.parametrize("name,kw", [
    ("int8", {"axis": -1}), ("int4", {"axis": -1, "group_size": 64}),
    ("int2", {"axis": -1}), ("fp8_e4m3", {}), ("fp8_e5m2", {"axis": -1}),
    ("fp4_e2m1", {"axis": -1, "group_size": 32}), ("nf4", {"axis": -1}),
    ("nvfp4", {"axis": -1}), ("uint4", {"axis": -1}), ("uint8", {"axis": -1}),
    ("int8", {"axis": -1, "scale_dtype": "bfloat16"}),
    ("int4", {"axis": -1, "scale_dtype": "e8m0", "scale_rounding": "ceil"})])
def test_gradient_is_straight_through_inside_the_range(name, kw):
  x = jax.random.normal(jax.random.key(0), (32, 256)) * 3
  g = _grad(lb.QuantSpec(name, **kw), x)
  np.testing.assert_array_equal(g, np.ones_like(g))


def test_gradient_zero_where_clipped_by_clip_ratio():
  x = jax.random.normal(jax.random.key(1), (16, 128))
  spec = lb.QuantSpec("int8", axis=-1, clip_ratio=0.5)
  g = _grad(spec, x)
  amax = np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True)
  inside = np.abs(np.asarray(x)) <= F32(0.5) * amax
  np.testing.assert_array_equal(g, inside.astype(F32))
  assert 0 < inside.mean() < 1
  # The clipped values saturate at the range's edge.
  y = np.asarray(lb.fake_quant(x, spec))
  np.testing.assert_allclose(np.max(np.abs(y), axis=-1, keepdims=True), 0.5 * amax,
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "nf4"])
def test_gradient_zero_where_clipped_by_static_amax(name):
  x = jax.random.normal(jax.random.key(2), (16, 64)) * 2
  spec = lb.QuantSpec(name, axis="tensor" if name != "nf4" else -1)
  g = np.asarray(jax.grad(lambda v: jnp.sum(lb.fake_quant(v, spec, amax=1.5)))(x))
  np.testing.assert_array_equal(g, (np.abs(np.asarray(x)) <= 1.5).astype(F32))
  # d/d amax is zero (the range is a constant), and a per-block amax works.
  ga = jax.grad(lambda a: jnp.sum(lb.fake_quant(x, spec, amax=a)))(jnp.float32(1.5))
  assert float(ga) == 0.0
  y = np.asarray(lb.fake_quant(x, spec, amax=1.5))
  assert np.max(np.abs(y)) <= 1.5 * (1 + 1e-6)


def test_gradient_asymmetric_static_range():
  x = jnp.linspace(-3, 3, 64).reshape(1, 64)
  spec = lb.QuantSpec("uint8", axis="tensor")
  g = np.asarray(jax.grad(lambda v: jnp.sum(
      lb.fake_quant(v, spec, amin=-1.0, amax=2.0)))(x))
  xv = np.asarray(x)
  np.testing.assert_array_equal(g[(xv > -0.99) & (xv < 1.99)], 1.0)
  np.testing.assert_array_equal(g[(xv < -1.02) | (xv > 2.02)], 0.0)
  with pytest.raises(ValueError, match="both amin and amax"):
    lb.fake_quant(x, spec, amax=2.0)


def test_gradient_mx_floor_zero_exactly_where_saturated():
  x = jax.random.normal(jax.random.key(3), (16, 128)) * 3
  spec = lb.QuantSpec("mxfp4", axis=-1)
  q, _ = _run(x, spec)
  scale = np.exp2(np.asarray(q.scale).astype(np.float64) - 127)
  y = np.abs(np.asarray(x)).reshape(16, 4, 32) / scale[..., None]
  g = _grad(spec, x).reshape(16, 4, 32)
  np.testing.assert_array_equal(g, (y <= 6.0).astype(F32))
  assert (y > 6).any()


def test_stochastic_quantize_needs_key_and_matches_fake_quant():
  x = jax.random.normal(jax.random.key(0), (8, 64))
  spec = lb.QuantSpec("int4", axis=-1, rounding="stochastic")
  with pytest.raises(ValueError, match="key"):
    lb.quantize(x, spec)
  with pytest.raises(ValueError, match="rounding='stochastic'"):
    lb.quantize(x, "int4", axis=-1, key=jax.random.key(0))
  k = jax.random.key(1)
  fq = jax.jit(lambda v, kk: lb.fake_quant(v, spec, key=kk))
  a = jax.jit(lambda v, kk: lb.dequantize(lb.quantize(v, spec, key=kk)))(x, k)
  b = fq(x, k)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = fq(x, jax.random.key(2))
  assert not np.array_equal(np.asarray(b), np.asarray(c))
  # A raw uint32 key gives the same bits as the typed key it wraps.
  raw = jax.random.key_data(k)
  np.testing.assert_array_equal(np.asarray(fq(x, raw)), np.asarray(b))
  g = jax.jit(jax.grad(lambda v: jnp.sum(lb.fake_quant(v, spec, key=k))))(x)
  np.testing.assert_array_equal(np.asarray(g), 1.0)


# ---------------------------------------------------------------------------
# jit and vmap


def test_jit_equals_eager():
  x = jax.random.normal(jax.random.key(6), (8, 128))
  for spec in (lb.QuantSpec("int4", axis=-1, group_size=32),):  # eager is slow
    eager = lb.fake_quant(x, spec)
    jitted = jax.jit(lambda v, spec=spec: lb.fake_quant(v, spec))(x)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


@pytest.mark.parametrize("spec", [lb.QuantSpec("int4", axis=-1, group_size=32),
                                  lb.QuantSpec("mxfp4", axis=-1),
                                  lb.QuantSpec("nvfp4", axis=-1),
                                  lb.QuantSpec("uint4", axis=-1)],
                         ids=["int4", "mxfp4", "nvfp4", "uint4"])
def test_vmap_equals_per_example(spec):
  xs = jax.random.normal(jax.random.key(7), (5, 4, 64))
  batched = jax.jit(jax.vmap(lambda v: lb.fake_quant(v, spec)))(xs)
  for i in range(xs.shape[0]):
    np.testing.assert_array_equal(np.asarray(batched[i]),
                                  np.asarray(_qdq(spec)(xs[i])[2]))
  # vmap of quantize gives a batched QArray; vmap of dequantize reads it back.
  qs = jax.jit(jax.vmap(lambda v: lb.quantize(v, spec)))(xs)
  assert qs.codes.shape[0] == 5 and qs.scale.shape[0] == 5
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(lb.dequantize))(qs)),
                                np.asarray(batched))


def test_errors_for_bad_inputs():
  with pytest.raises(TypeError, match="float array"):
    lb.quantize(jnp.ones(4, jnp.int32), "int8")
  with pytest.raises(ValueError, match="reshape"):
    lb.quantize(jnp.float32(1.0), "int8")
  with pytest.raises(ValueError, match="out of range"):
    lb.quantize(jnp.ones((4, 4)), "int8", axis=2)
  with pytest.raises(TypeError, match="QArray"):
    lb.dequantize(jnp.ones(4))
  with pytest.raises(ValueError, match="needs at least 2 dims"):
    lb.quantize(jnp.ones(8), "int8", tile=(2, 2))


def test_nvfp4_block_scale_is_one_division_in_every_program():
  # A block amax whose (a / 6) / t and a / (6 * t) straddle an E4M3 midpoint:
  # XLA rewrote quantize's (a / 6) / t into the second and left fake_quant's
  # (tn behind a barrier), so the stored scale was 320 and fake_quant's 288,
  # an 11% error on the whole block.
  t_amax, a = np.float32(61.056942), np.float32(41.43149)
  x = np.zeros((1, 32), np.float32)
  x[0, 0], x[0, 16] = t_amax, a
  x[0, 17:] = a * np.linspace(-0.9, 0.9, 15).astype(np.float32)
  x = jnp.asarray(x)
  q = lb.quantize(x, "nvfp4", axis=-1)
  t = np.float32(t_amax / np.float32(6 * 448))
  want = np.float32(a / (np.float32(6) * t)).astype(jnp.float8_e4m3fn)
  assert float(q.scale[0, 1].astype(jnp.float32)) == float(want.astype(np.float32))
  _same_bits(np.asarray(lb.fake_quant(x, "nvfp4", axis=-1)), np.asarray(lb.dequantize(q)))
  _same_bits(np.asarray(jax.jit(lambda v: lb.fake_quant(v, "nvfp4", axis=-1))(x)),
             np.asarray(lb.dequantize(q)))
