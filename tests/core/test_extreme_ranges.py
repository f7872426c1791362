"""Every format over the whole float32 range: no NaN, no zeros, no disagreement.

Quantization commutes with power-of-two scaling: for ``x`` with amax near 1,
``quantize(x * 2**k)`` has the same codes as ``quantize(x)`` and scales (and
values) ``2**k`` times larger, exactly, as long as the scaled scale is a
representable number. The sweep checks the library at amax ``m * 2**k`` for
every float32 exponent ``k`` of a normal amax (-126..127, block amaxes with
several significands ``m``, blocks 2**20 apart, blocks mixing a tiny and a
large element) against the frozen reference (tests/core/_reference.py) run
at amax ``m``, scaled by ``2**k`` in float64, bit for bit. Inputs hold normal
numbers only: elements that would be subnormal at ``2**k`` are zeros (on both
sides). Where the exact scale is not representable, the documented clamp is
applied to the reference through static ranges (docs/formats.md, "Tiny and
huge ranges"): float32 and bfloat16 scales are held at 2**-126, E8M0
exponents at -127, NVFP4's tensor scale at 2**-126 (asymmetric integer
formats: a float32 numpy computation of the same rule). Results below
2**-126 (float32 subnormals: flushed by XLA on CPU, kept on GPU) are compared
as zeros. At every amax, ``dequantize(quantize(x)) == fake_quant(x)``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.core._qarray import block_shape, normalize_axis
from lowbit_jax.formats import LookupFormat
from tests.core import _reference as ref

# (id, QuantSpec keywords)
SPECS = [
    ("int8", dict(format="int8", axis=-1)),
    ("int4_g32", dict(format="int4", axis=-1, group_size=32)),
    ("uint8", dict(format="uint8", axis=-1, symmetric=False)),
    ("uint4_g32", dict(format="uint4", axis=-1, group_size=32, symmetric=False)),
    ("fp8_e4m3", dict(format="fp8_e4m3", axis=-1)),
    ("fp8_e5m2_tensor", dict(format="fp8_e5m2", axis="tensor")),
    ("fp6_e3m2", dict(format="fp6_e3m2", axis=-1, group_size=32)),
    ("fp4_e2m1", dict(format="fp4_e2m1", axis=-1, group_size=32)),
    ("int2", dict(format="int2", axis=-1)),
    ("nf4", dict(format="nf4", axis=-1, group_size=32)),
    ("int8_bf16_scale", dict(format="int8", axis=-1, scale_dtype="bfloat16")),
    ("binary", dict(format="binary", axis=-1)),
    ("ternary", dict(format="ternary", axis=-1)),
    ("mxfp8", dict(format="mxfp8_e4m3", axis=-1)),
    ("mxfp8_e5m2", dict(format="mxfp8_e5m2", axis=-1)),
    ("mxfp6", dict(format="mxfp6_e3m2", axis=-1)),
    ("mxfp4", dict(format="mxfp4", axis=-1)),
    ("mxint8", dict(format="mxint8", axis=-1)),
    ("int8_e8m0_ceil", dict(format="int8", axis=-1, group_size=32, scale_dtype="e8m0",
                            scale_rounding="ceil")),
    ("nvfp4", dict(format="nvfp4", axis=-1)),
]
EXPONENTS = np.arange(-126, 128)
TINY = 2.0 ** -126
_F32_MAX = float(np.finfo(np.float32).max)


def _base():
  """[6, 64]: 32-element blocks with amaxes 1, 1, 1.3 and 2 - 2**-23 (rows
  0-3), a block 2**20 below the rest and a block of 1 and 2**-24 (row 4), a
  lone 2**-3 among zeros and an all-zero block (row 5)."""
  rng = np.random.default_rng(0)
  mag = 2.0 ** rng.uniform(-5, 0, (6, 64))  # within 2**5 of the amax
  x = (np.sign(rng.standard_normal((6, 64))) * mag).astype(np.float32)
  x[:, ::32] = np.float32(1.0)
  x[1, 1] = np.float32(-1.0)
  x[2, ::32] = np.float32(1.3)
  x[2, 40:44] = 0.0
  x[3, ::32] = np.nextafter(np.float32(2.0), np.float32(0.0))
  x[4, :32] *= np.float32(2.0 ** -20)
  x[4, 33] = np.float32(2.0 ** -24)
  x[5] = 0.0
  x[5, 7] = np.float32(-2.0 ** -3)
  return x


@functools.lru_cache(maxsize=None)
def _fns(key):
  spec = lb.QuantSpec(**dict(SPECS)[key])
  lib = jax.jit(jax.vmap(lambda x: (lb.quantize(x, spec), lb.fake_quant(x, spec),
                                    lb.dequantize(lb.quantize(x, spec)))))
  return spec, lib


def _blocks(v, spec):
  """[n, 6, 64] -> [n, blocks..., elements] for the spec's blocks."""
  bs = block_shape(spec.replace(axis=normalize_axis(spec.axis, 2)), v.shape[1:])
  n0, n1 = v.shape[1] // bs[0], v.shape[2] // bs[1]
  v = v.reshape(v.shape[0], n0, bs[0], n1, bs[1]).transpose(0, 1, 3, 2, 4)
  return v.reshape(v.shape[0], n0, n1, -1)


def _flush(v):
  v = np.asarray(v, np.float64)
  return np.where(np.abs(v) < TINY, 0.0, v)


def _unblock(v, spec, shape):
  """``_blocks``' inverse: [n, blocks..., elements] -> [n, *shape]."""
  bs = block_shape(spec.replace(axis=normalize_axis(spec.axis, 2)), shape)
  n0, n1 = shape[0] // bs[0], shape[1] // bs[1]
  v = v.reshape(v.shape[0], n0, n1, bs[0], bs[1]).transpose(0, 1, 3, 2, 4)
  return v.reshape((v.shape[0],) + tuple(shape))


@functools.lru_cache(maxsize=None)
def _ref_fn(spec, kw):
  """The reference, jitted and vmapped over binades, with a static range."""
  if kw is None:
    return jax.jit(jax.vmap(lambda v: (ref.quantize(v, spec).codes,
                                       ref.fake_quant(v, spec))))
  return jax.jit(jax.vmap(lambda v, a: (ref.quantize(v, spec, **{kw: a}).codes,
                                        ref.fake_quant(v, spec, **{kw: a}))))


def _clamped_reference(spec, z, ks):
  """The reference's values and codes for inputs ``z`` [n, 6, 64] (amax near
  1) standing for ``z * 2**ks``, with the library's clamp of a scale below
  the smallest it holds at ``2**ks``. Scale rules are monotone in the range,
  so the clamp is the reference's own rule at the static range ``max(a,
  a_min)``, ``a_min`` the range whose scale is that smallest one. Asymmetric
  specs: a float32 numpy computation of the same ops for clamped blocks."""
  fmt = spec.element
  j = (-126.0 - ks)[:, None, None]  # 2**-126 in the scaled world
  zb = _blocks(z, spec)
  with np.errstate(over="ignore", under="ignore"):
    tiny = (2.0 ** j).astype(np.float32)  # 0 far below: no clamp
  if not spec.symmetric:
    codes, fq = _ref_fn(spec, None)(jnp.asarray(z))
    hi = np.maximum(zb.max(-1), 0).astype(np.float32)
    lo = np.minimum(zb.min(-1), 0).astype(np.float32)
    levels = np.float32(spec.storage_format.qmax)
    clamp = (hi - lo > 0) & ((hi - lo) / levels < tiny)
    sc = np.where(clamp, tiny, np.float32(1))[..., None]  # 1: unused
    zp = np.clip(np.rint(-lo[..., None] / sc), 0, levels).astype(np.float32)
    y = (zb / sc).astype(np.float32) + zp
    vals = (np.clip(np.rint(y), 0, levels) - zp).astype(np.float64) * sc
    vals = np.where(clamp[..., None], vals, _blocks(np.asarray(fq), spec))
    return _unblock(vals, spec, z.shape[1:]), None
  if spec.tensor_scale:
    a_t = np.abs(z).max(axis=(1, 2)).astype(np.float32)
    a_min = np.float32(fmt.max * 448.0) * tiny[:, 0, 0]
    codes, fq = _ref_fn(spec, "tensor_amax")(jnp.asarray(z),
                                              jnp.asarray(np.maximum(a_t, a_min)))
    return np.asarray(fq), np.asarray(codes)
  if isinstance(fmt, LookupFormat) and fmt.scale_method == "mean_abs":
    a1 = np.abs(zb).astype(np.float64).mean(-1)
  elif isinstance(fmt, LookupFormat) and fmt.scale_method == "twn":
    m = np.abs(zb).astype(np.float64).mean(-1, keepdims=True)
    sel = np.abs(zb) > (0.7 * m.astype(np.float32)).astype(np.float32)
    a1 = (np.where(sel, np.abs(zb), 0).astype(np.float64).sum(-1)
          / np.maximum(sel.sum(-1), 1))
  else:
    a1 = np.abs(zb).max(-1)
  a1 = a1.astype(np.float32)
  if spec.scale_dtype == "e8m0":  # the exponent -127 at 2**ks
    emin = tiny * np.float32(0.5)
    a_min = emin * (np.float32(2.0 ** fmt.emax) if spec.scale_rounding == "floor"
                    else np.float32(fmt.max))
  else:  # float32 and bfloat16 scales: 2**-126 at 2**ks
    a_min = tiny * np.float32(fmt.max)
  amax = np.where(a1 > 0, np.maximum(a1, a_min), a1)
  codes, fq = _ref_fn(spec, "amax")(jnp.asarray(z), jnp.asarray(amax))
  return np.asarray(fq), np.asarray(codes)


# Run in CI: one spec per scale path (float32 scale, asymmetric, mean, E8M0,
# two-level); the sweep over all of them is marked slow.
FAST = ("int8", "uint8", "binary", "mxint8", "nvfp4")


@pytest.mark.parametrize("name", [
    s[0] if s[0] in FAST else pytest.param(s[0], marks=pytest.mark.slow)
    for s in SPECS])
def test_every_binade_matches_the_scaled_reference(name):
  spec, lib = _fns(name)
  base = _base()
  xs = (base.astype(np.float64)[None] * 2.0 ** EXPONENTS[:, None, None])
  xs = np.where(np.abs(xs) < TINY, 0.0, xs).astype(np.float32)  # normal inputs only
  assert np.all(np.isfinite(xs))
  z = (xs.astype(np.float64) * 2.0 ** -EXPONENTS[:, None, None]).astype(np.float32)
  qs, fqs, dqs = lib(jnp.asarray(xs))
  codes, fqs, dqs = np.asarray(qs.codes), np.asarray(fqs), np.asarray(dqs)
  assert np.all(np.isfinite(fqs)), f"{name}: non-finite values"
  bad = [int(k) for k, a, b in zip(EXPONENTS, fqs, dqs) if not np.array_equal(a, b)]
  assert not bad, f"{name}: fake_quant != dequantize(quantize) at 2**{bad[:6]}"
  # The reference at amax near 1, one jitted call vmapped over the binades.
  want_fq, want_codes = _clamped_reference(spec, z, EXPONENTS)
  binary_mean = spec.element.name in ("binary", "ternary")
  if binary_mean:
    # Scales are means: the sum's order may differ between compilations, so
    # the library matches the reference to an ulp at amax 1, and its own
    # result (scaled) exactly wherever no element was zeroed and no scale
    # clamps.
    i0 = int(np.flatnonzero(EXPONENTS == 0)[0])
    np.testing.assert_allclose(fqs[i0], want_fq[i0], rtol=2e-7)
  failures = []
  for i, k in enumerate(EXPONENTS):
    want = want_fq[i].astype(np.float64) * 2.0 ** k
    if binary_mean and np.array_equal(z[i], base):
      want = fqs[i0].astype(np.float64) * 2.0 ** k
    # Values beyond the float32 maximum saturate (docs/formats.md); exact
    # values below 2**-126 count as zeros (before their rounding to float32).
    want = np.clip(_flush(want), -_F32_MAX, _F32_MAX).astype(np.float32)
    got = _flush(fqs[i])
    if binary_mean and not np.array_equal(z[i], base):
      ok = np.allclose(got, want, rtol=2e-7, atol=0)  # the reference's mean
    else:
      ok = np.array_equal(got, want)
    if not ok:
      failures.append((int(k), "values"))
    elif (want_codes is not None and not binary_mean
          and not np.array_equal(codes[i], want_codes[i])):
      failures.append((int(k), "codes"))
  assert not failures, f"{name}: {len(failures)} binades fail: {failures[:8]}"


@pytest.mark.parametrize("scale_dtype,amax,scale", [
    ("float16", 1e38, 65504.0),  # beyond float16: held at its maximum
    ("float16", 1e10, 65504.0),
    ("float16", 1e-30, 2.0 ** -24),  # below float16: its smallest subnormal
    ("bfloat16", 2.0 ** -126 * 1.5, 2.0 ** -126),  # a float32 subnormal scale
])
def test_half_precision_scales_clamp_at_their_ends(scale_dtype, amax, scale):
  """A scale beyond the scale dtype's range is held at its end (never inf:
  the block would read back as NaN), the same in quantize and fake_quant."""
  x = (np.float32(amax) * np.linspace(-1, 1, 32, dtype=np.float32))[None]
  x = np.where(np.abs(x) < TINY, np.float32(0), x)  # normal inputs only
  spec = lb.QuantSpec("int8", axis=-1, scale_dtype=scale_dtype)
  q = lb.quantize(jnp.asarray(x), spec)
  fq = np.asarray(lb.fake_quant(jnp.asarray(x), spec))
  assert float(np.asarray(q.scale, np.float32)[0, 0]) == scale
  s = np.float32(scale)
  want = np.clip(np.rint(x / s), -127, 127) * s
  np.testing.assert_array_equal(fq, want)
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q)), fq)


def test_bfloat16_scale_at_the_float32_maximum_saturates():
  """binary at +-3.4e38: the mean rounds to bfloat16's inf; the scale is
  held at bfloat16's maximum instead."""
  x = np.full((1, 32), _F32_MAX, np.float32)
  x[0, 1::2] *= -1
  spec = lb.QuantSpec("binary", axis=-1, scale_dtype="bfloat16")
  fq = np.asarray(lb.fake_quant(jnp.asarray(x), spec))
  bf16_max = np.float32((2.0 - 2.0 ** -7) * 2.0 ** 127)
  np.testing.assert_array_equal(fq, np.sign(x) * bf16_max)
  np.testing.assert_array_equal(np.asarray(lb.dequantize(lb.quantize(x, spec))), fq)


@pytest.mark.parametrize("name", [
    s[0] if s[0] in ("int8", "nvfp4") else pytest.param(s[0], marks=pytest.mark.slow)
    for s in SPECS])
def test_tiny_beside_huge_matches_the_reference(name):
  """Blocks holding the float32 maximum, 2**100 or 2**-40 beside elements
  of 2**-126 (NVFP4: 16-blocks of 2**-126 alone in a tensor holding the
  maximum). The tiny elements change no scale (they vanish in a sum with the
  large ones) and round to 0, so the result is the reference's for the large
  elements alone, computed 2**64 lower (where its sums and ranges do not
  overflow and its E8M0 scales are normal) and scaled back."""
  spec = lb.QuantSpec(**dict(SPECS)[name])
  x = np.full((4, 64), np.float32(1.5 * TINY))
  x[:, ::3] = np.float32(-TINY)
  x[0, 0] = x[0, 32] = _F32_MAX
  x[0, 5] = x[0, 40] = np.float32(-3e38)
  x[1, ::16] = np.float32(2.0 ** 100)
  x[2, :] = np.float32(2.0 ** 127) * np.linspace(-1, 1, 64, dtype=np.float32)
  x[3, 1::16] = np.float32(-2.0 ** -40)
  f = jax.jit(lambda v: (lb.fake_quant(v, spec), lb.dequantize(lb.quantize(v, spec))))
  fq, dq = (np.asarray(v) for v in f(jnp.asarray(x)))
  assert np.all(np.isfinite(fq))
  np.testing.assert_array_equal(fq, dq)
  z = np.where(np.abs(x) > 2.0 ** -100, x.astype(np.float64) * 2.0 ** -64, 0.0)
  want = np.asarray(_ref_fn(spec, None)(jnp.asarray(z, jnp.float32)[None])[1])[0]
  want = np.clip(want.astype(np.float64) * 2.0 ** 64, -_F32_MAX, _F32_MAX)
  if spec.element.name in ("binary", "ternary"):
    np.testing.assert_allclose(fq, want, rtol=2e-7)
  else:
    np.testing.assert_array_equal(fq, want)
  if spec.element.name != "binary":  # binary has no 0: tiny ones read +-scale
    assert np.all(fq[0][np.abs(x[0]) < 1] == 0)  # 2**-126 beside 3.4e38


@pytest.mark.parametrize("name,scale,amax", [
    ("mxfp8_e4m3", 2.0 ** -127, 2.0 ** -120),  # E8M0's smallest (subnormal)
    ("mxint8", 2.0 ** 127, 2.0 ** 127),
    pytest.param("nvfp4", 2.0 ** -126, 2.0 ** -124,  # tensor scale held at 2**-126
                 marks=pytest.mark.slow),
])
def test_learned_scales_at_the_ends_of_the_range(name, scale, amax):
  """An explicit (LSQ) scale at the ends of the range: the values are
  ``grid(x / scale) * scale`` exactly, in fake_quant and in dequantize."""
  spec = lb.QuantSpec(name, axis=-1)
  x = (np.float32(amax) * np.linspace(-1, 1, 32, dtype=np.float32))[None]
  x = np.where(np.abs(x) < TINY, np.float32(0), x)
  s = jnp.full(lb.scale_shape(x.shape, spec), np.float32(scale))
  fq = np.asarray(lb.fake_quant(jnp.asarray(x), spec, scale=s))
  dq = np.asarray(lb.dequantize(lb.quantize(jnp.asarray(x), spec, scale=s)))
  np.testing.assert_array_equal(fq, dq)
  y = x.astype(np.float64) / scale  # exact: scale is a power of two
  grid = np.asarray(lb.cast(jnp.asarray(y, jnp.float32), spec.element, saturate=True))
  if name == "mxint8":
    grid = np.clip(np.rint(y * 64) / 64, -127 / 64, 127 / 64)
  want = _flush(grid.astype(np.float64) * scale)
  np.testing.assert_array_equal(_flush(fq), want)
  assert np.count_nonzero(fq) > 16


def test_twn_scale_off_the_cpu_equals_the_cpu_formulation(monkeypatch):
  """TWN's scale off the CPU (``_quantize._selected_mean``: the count and the
  selected sum in one reduction, blocks whose sum could overflow scaled by
  2**-64 first) gives the CPU formulation's codes, scales and values bit for
  bit. Every column's sums are exact in float32, so the order of the additions
  cannot differ: ordinary values, a huge column (mean near 2**116), one whose
  selected sum overflows float32 (the CPU path's rescaled sum), one holding a
  NaN and one of zeros."""
  rng = np.random.default_rng(7)
  k = 256
  x = rng.integers(-64, 65, (k, 6)).astype(np.float32) / 8
  x[:, 1] *= np.float32(2.0 ** 115)
  big = np.where(rng.random(k) < 0.5, 1.5 * 2.0 ** 126, 2.0 ** 120)
  x[:, 2] = (big * np.where(rng.random(k) < 0.5, -1, 1)).astype(np.float32)
  x[5, 3] = np.nan
  x[:, 4] = 0
  spec = lb.QuantSpec("ternary", axis=0)
  # The plain selected sum of column 2 overflows: the rescaled path is taken.
  sel = np.abs(x[:, 2]) > 0.7 * np.mean(np.abs(x[:, 2].astype(np.float64)))
  with np.errstate(over="ignore"):
    assert np.isinf(np.sum(np.abs(x[sel, 2])))

  def run():
    jax.clear_caches()  # the jitted primitives were traced for the CPU
    q = lb.quantize(jnp.asarray(x), spec)
    return (np.asarray(q.codes), np.asarray(q.scale),
            np.asarray(lb.fake_quant(jnp.asarray(x), spec)))
  cpu = run()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  gpu = run()
  monkeypatch.undo()
  jax.clear_caches()
  for a, b in zip(cpu, gpu):
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
  scale = cpu[1].reshape(-1)
  assert np.isnan(scale[3]) and np.isfinite(scale[[0, 1, 2, 5]]).all()
  assert scale[2] == np.float32(1.5 * 2.0 ** 126)
