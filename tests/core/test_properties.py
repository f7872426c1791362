"""Property tests (hypothesis) of quantize / fake_quant.

* Idempotence, fake_quant(fake_quant(x)) == fake_quant(x), holds exactly where
  the scale reproduces itself: power-of-two (E8M0) scales with every rounding
  (MX, and integer/float elements with scale_dtype="e8m0"), and float32 absmax
  scales (amax / element max) of symmetric formats, NF4 included. It holds to
  a few ulp where the scale is recomputed from a float32 mean (binary,
  ternary) or from a product of rounded scales (NVFP4: the new tensor amax is
  6 * fl(t * s), and t' can differ from t by an ulp). It does not hold for
  asymmetric formats (the rounded zero point maps the minimum to a code other
  than 0, which narrows the next range), nor where the scale is rounded to a
  coarse type (fp8_e4m3 or bf16 scales of int8: a scale rounded up moves the
  block's largest code, and with it the next scale).
* The error of an in-range value is at most half a grid step times the scale
  (nearest rounding).
* Quantization is monotone within a block.
* Stochastic rounding is unbiased: the mean over many draws is within 3
  standard errors of x.

Shapes are fixed so every spec compiles once; hypothesis draws the values.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit_jax as lb
from lowbit_jax import formats as F

F32 = np.float32
SHAPE = (4, 64)
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@st.composite
def tensors(draw, shape=SHAPE):
  """float32 tensors: mixed magnitudes, zeros, repeated values, heavy tails."""
  scale = draw(st.sampled_from([1e-3, 1.0, 37.0, 1e4]))
  kind = draw(st.sampled_from(["normal", "t3", "grid", "hyp"]))
  if kind == "hyp":
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(
        -1e4, 1e4, width=32, allow_subnormal=False), fill=st.just(F32(0.5))))
  else:
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) if kind != "t3" else rng.standard_t(3, shape)
    if kind == "grid":
      x = np.round(x * 8) / 8
    x = (x * scale).astype(F32)
  zero_rows = draw(st.lists(st.integers(0, shape[0] - 1), max_size=2))
  x = np.array(x, F32)
  x[zero_rows] = 0
  return x


def _ids(specs):
  return [str(s.format.name) + ("" if s.symmetric else "-asym") + (f"-{s.scale_dtype}-{s.scale_rounding}"
                                if s.scale_dtype == "e8m0" else "") for s in specs]


EXACT_SPECS = [
    lb.QuantSpec("int8", axis=-1), lb.QuantSpec("int4", axis=-1, group_size=32),
    lb.QuantSpec("int3", axis=-1), lb.QuantSpec("int2", axis="tensor"),
    lb.QuantSpec("fp8_e4m3"), lb.QuantSpec("fp8_e5m2", axis=-1),
    lb.QuantSpec("fp6_e2m3", axis=-1, group_size=16),
    lb.QuantSpec("fp4_e2m1", axis=-1, group_size=32), lb.QuantSpec("e3m3", axis=-1),
    lb.QuantSpec("nf4", axis=-1), lb.QuantSpec("mxfp4", axis=-1), lb.QuantSpec("mxfp8_e4m3", axis=-1),
    lb.QuantSpec("mxfp6_e3m2", axis=-1), lb.QuantSpec("mxint8", axis=-1),
    lb.QuantSpec(F.BlockFormat(F.get("fp4_e2m1"), "e8m0", 32, scale_rounding="ceil"),
                 axis=-1),
    lb.QuantSpec(F.BlockFormat(F.get("fp8_e5m2"), "e8m0", 32,
                               scale_rounding="nearest"), axis=-1),
    lb.QuantSpec("int4", axis=-1, scale_dtype="e8m0", scale_rounding="ceil"),
]
NEAR_SPECS = [lb.QuantSpec("nvfp4", axis=-1), lb.QuantSpec("ternary", axis=-1),
              lb.QuantSpec("binary", axis=-1)]
ASYM_SPECS = [lb.QuantSpec("uint4", axis=-1), lb.QuantSpec("uint8", axis=-1)]


@functools.lru_cache(maxsize=None)
def _fq(spec):
  return jax.jit(lambda v: lb.fake_quant(v, spec))


@functools.lru_cache(maxsize=None)
def _q(spec):
  return jax.jit(lambda v: lb.quantize(v, spec))


# float32 absmax scales reproduce only with correctly rounded division (CPU;
# XLA's float32 division on GPU is not); power-of-two scales need no division.
_CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu",
                               reason="needs correctly rounded float32 division")


@pytest.mark.parametrize("spec", [
    s if s.scale_dtype == "e8m0" else pytest.param(s, marks=_CPU_ONLY)
    for s in EXACT_SPECS], ids=_ids(EXACT_SPECS))
@SETTINGS
@given(x=tensors())
def test_idempotent_where_the_scale_reproduces(spec, x):
  once = np.asarray(_fq(spec)(x))
  twice = np.asarray(_fq(spec)(once))
  np.testing.assert_array_equal(twice, once)


@pytest.mark.parametrize("spec", NEAR_SPECS, ids=_ids(NEAR_SPECS))
@SETTINGS
@given(x=tensors())
def test_idempotent_to_a_few_ulp_for_recomputed_ranges(spec, x):
  once = np.asarray(_fq(spec)(x))
  twice = np.asarray(_fq(spec)(once))
  scale = np.max(np.abs(once)) + F32(1e-30)
  np.testing.assert_allclose(twice, once, rtol=4e-7, atol=float(scale) * 4e-7)


def _scale_per_element(q, shape):
  """Float value of each element's scale (and zero point), from the QArray."""
  s = np.asarray(q.scale)
  if q.spec.scale_dtype == "e8m0":
    s = np.exp2(s.astype(np.float64) - 127)
  else:
    s = np.asarray(jnp.asarray(q.scale).astype(jnp.float32)).astype(np.float64)
  if q.tensor_scale is not None:
    s = s * np.float64(np.asarray(q.tensor_scale))
  reps = [d // n for d, n in zip(shape, s.shape)]
  s = np.kron(s, np.ones(reps))
  zp = None
  if q.zero_point is not None:
    zp = np.kron(np.asarray(q.zero_point).astype(np.float64), np.ones(reps))
  return s, zp


HALF_STEP_SPECS = EXACT_SPECS + NEAR_SPECS[:1] + ASYM_SPECS


@pytest.mark.parametrize("spec", HALF_STEP_SPECS, ids=_ids(HALF_STEP_SPECS))
@SETTINGS
@given(x=tensors())
def test_error_within_half_a_step_times_the_scale(spec, x):
  q = _q(spec)(x)
  y = np.asarray(_fq(spec)(x)).astype(np.float64)
  s, zp = _scale_per_element(q, x.shape)
  xv = x.astype(np.float64)
  ok = s > 0
  u = np.where(ok, xv / np.where(ok, s, 1), 0)  # x on the element grid's axis
  if zp is not None:
    u = u + zp
    grid = np.arange(0, 2 ** spec.format.bits, dtype=np.float64)
  elif isinstance(spec.element, F.IntFormat):
    m = spec.element.max
    grid = np.arange(-m * 2 ** spec.element.frac_bits, m * 2 ** spec.element.frac_bits
                     + 1) / 2 ** spec.element.frac_bits
  else:
    grid = np.unique(np.asarray(spec.element.values(), F32).astype(np.float64))
  inside = (u >= grid[0]) & (u <= grid[-1])
  hi = np.clip(np.searchsorted(grid, u, side="left"), 0, grid.size - 1)
  lo = np.clip(hi - 1, 0, grid.size - 1)
  step = grid[hi] - grid[lo]
  bound = step / 2 * s
  err = np.abs(y - xv)
  # float32 rounding of x / s and of code * s: a few ulp of the values.
  slack = 4 * np.spacing(np.maximum(np.abs(xv), np.abs(y)).astype(F32)).astype(np.float64)
  bad = inside & (err > bound + slack)
  assert not bad.any(), (x[bad][:4], y[bad][:4], bound[bad][:4])


MONO_SPECS = [lb.QuantSpec("int4", axis=-1, group_size=32), lb.QuantSpec("fp8_e4m3"),
              lb.QuantSpec("nf4", axis=-1), lb.QuantSpec("mxfp4", axis=-1),
              lb.QuantSpec("nvfp4", axis=-1), lb.QuantSpec("uint4", axis=-1),
              lb.QuantSpec("e2m2", axis=-1), lb.QuantSpec("ternary", axis=-1)]


@pytest.mark.parametrize("spec", MONO_SPECS, ids=_ids(MONO_SPECS))
@SETTINGS
@given(x=tensors())
def test_monotone_within_a_block(spec, x):
  xs = np.sort(x, axis=-1)
  y = np.asarray(_fq(spec)(xs))
  g = spec.group_size or SHAPE[-1]
  d = np.diff(y.reshape(SHAPE[0], -1, g), axis=-1)
  assert np.all(d >= 0)


STOCH = [("int8", {}), ("int4", {}), ("fp8_e4m3", {}), ("fp4_e2m1", {}),
         ("e3m3", {}), ("nf4", {"axis": "tensor"}), ("uint4", {}),
         ("mxfp4", {"axis": -1}), ("nvfp4", {"axis": -1})]
N_DRAWS = 4096


@functools.lru_cache(maxsize=None)
def _stoch_fns(name, items):
  """(stochastic fake_quant, quantize) with a static range [-a, a]."""
  kw = dict(items)
  spec = lb.QuantSpec(name, rounding="stochastic", **kw)
  amin = (lambda a: None) if spec.symmetric else (lambda a: -a)
  fq = jax.jit(lambda v, k, a: lb.fake_quant(v, spec, key=k, amax=a, amin=amin(a)))
  q = jax.jit(lambda v, k, a: lb.quantize(v, spec, key=k, amax=a, amin=amin(a)))
  return spec, fq, q


def _element_grid(spec):
  e = spec.storage_format
  if isinstance(e, F.IntFormat):
    lim = e.max if spec.symmetric else e.qmax
    lo = -lim if spec.symmetric else 0
    return np.arange(lo * 2 ** e.frac_bits, lim * 2 ** e.frac_bits + 1) / 2 ** e.frac_bits
  return np.unique(np.asarray(e.values(), F32).astype(np.float64))


@pytest.mark.parametrize("name,kw", STOCH, ids=[n for n, _ in STOCH])
@settings(max_examples=12, deadline=None, derandomize=True)
@given(frac=st.floats(-1.0, 1.0, width=32), seed=st.integers(0, 2 ** 31 - 1))
def test_stochastic_rounding_is_unbiased(name, kw, frac, seed):
  spec, fq, qz = _stoch_fns(name, tuple(kw.items()))
  amax = F32(3.0)  # a static range: the scale is the same for every draw
  v = F32(frac) * amax
  x = jnp.full((N_DRAWS, 32), v, jnp.float32)
  key = jax.random.key(seed)
  y = np.asarray(fq(x, key, amax)).astype(np.float64)
  # v's two grid neighbours (the scale, from the QArray of one row).
  s, zp = _scale_per_element(qz(x[:1], key, amax), (1, 32))
  s, u = s[0, 0], float(v) / s[0, 0] + (0 if zp is None else zp[0, 0])
  grid = _element_grid(spec)
  assume(grid[0] <= u <= grid[-1])  # in range (a zero point can shift the range)
  hi = grid[np.searchsorted(grid, u, side="left")]
  lo = grid[np.searchsorted(grid, u, side="right") - 1]
  off = 0 if zp is None else zp[0, 0]
  near = [(lo - off) * s, (hi - off) * s]
  for val in np.unique(y):  # each draw is one of the two neighbours
    assert np.isclose(val, near, rtol=1e-6, atol=0).any(), (val, near)
  # The mean is within 3 standard errors of v. The standard error is that of
  # the Bernoulli draw between the neighbours (p = (u - lo) / (hi - lo)); a
  # sample of identical draws has zero spread but is still a fair result when
  # p is tiny.
  p = 0.0 if hi == lo else (u - lo) / (hi - lo)
  p_down = 0.0 if hi == lo else (hi - u) / (hi - lo)  # 1 - p, without cancellation
  se = (hi - lo) * s * np.sqrt(p * p_down / y.size)
  tol = 3 * se + 4 * np.spacing(np.abs(v))
  assert abs(y.mean() - float(v)) <= tol, (y.mean(), v, se)
