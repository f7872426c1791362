"""Learned ranges in fake_quant / quantize: LSQ, LSQ+ and PACT gradients."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit_jax as lb

S = lb.QuantSpec


def _x(shape=(16, 8), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


@functools.lru_cache(maxsize=None)
def _fq_scale_fns(spec):
  """jit'd (forward, d/dscale, d/dx) of sum(ct * fake_quant(x, scale=s))."""
  def f(x, s, ct):
    return jnp.sum(ct * lb.fake_quant(x, spec, scale=s))
  return (jax.jit(lambda x, s: lb.fake_quant(x, spec, scale=s)),
          jax.jit(jax.grad(f, argnums=(0, 1))))


def _ref_grid(v, spec):
  """Reference rounding of scaled values to the element grid (numpy)."""
  e = spec.element
  if isinstance(e, lb.formats.IntFormat):
    lo, hi = (0, e.qmax) if not spec.symmetric else (-e.qmax, e.qmax)
    if not spec.symmetric:
      lo, hi = 0, 2 ** e.bits - 1
    return np.clip(np.round(v), lo, hi), lo, hi
  dt = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp4_e2m1": ml_dtypes.float4_e2m1fn}[e.name]
  return np.clip(v, -e.max, e.max).astype(dt).astype(np.float32), -e.max, e.max


def _ref_lsq(x, s_eff, spec, v=None, zp=0.0):
  """(values, d values / d scale, clipped) from LSQ eq. 3, per element."""
  v = x / s_eff if v is None else v
  q, lo, hi = _ref_grid(v + zp, spec)
  clipped = (v + zp <= lo) | (v + zp >= hi)
  d = np.where(clipped, q - zp, q - zp - v)
  return (q - zp) * s_eff, d, clipped


def _block_sum(a, grid):
  """Sums an [R, C] array over blocks so the result has shape ``grid``."""
  r, c = a.shape
  return a.reshape(grid[0], r // grid[0], grid[1], c // grid[1]).sum(axis=(1, 3))


def _expand(s, shape):
  return np.kron(s, np.ones((shape[0] // s.shape[0], shape[1] // s.shape[1]),
                            np.float32))


CASES = [
    S("int4"),                                   # per tensor
    S("int8", axis=0),                           # per channel of w[K, N]
    S("int4", axis=0, group_size=4),             # groups along K
    S("fp8_e4m3", axis=0),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.format.name}-{s.axis}-"
                         f"{s.group_size}")
def test_lsq_gradient_matches_eq3(spec):
  x = _x()
  grid = lb.scale_shape(x.shape, spec)
  # A scale below the data's range, so both branches of eq. 3 occur.
  s0 = np.asarray(lb.init_scale(x, spec, method="amax")) * 0.6
  ct = np.asarray(_x(seed=1))
  fwd, grad = _fq_scale_fns(spec)
  y = np.asarray(fwd(x, jnp.asarray(s0)))
  gx, gs = grad(x, jnp.asarray(s0), jnp.asarray(ct))
  s_eff = _expand(s0, x.shape)
  ref_y, d, clipped = _ref_lsq(np.asarray(x), s_eff, spec)
  assert clipped.any() and (~clipped).any()
  np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gs), _block_sum(ct * d, grid), rtol=1e-5,
                             atol=1e-5)
  # The x gradient is straight-through exactly where nothing was clipped.
  np.testing.assert_array_equal(np.asarray(gx), np.where(clipped, 0.0, ct))


def test_lsq_gradient_element_by_element():
  """d out_i / d s for every element (the Jacobian), per-tensor int4 and fp8."""
  x = _x((8, 4))
  for spec in (S("int4"), S("fp8_e4m3")):
    s = lb.init_scale(x, spec, method="amax") * 0.7
    jac = jax.jit(jax.jacrev(lambda s, spec=spec: lb.fake_quant(x, spec, scale=s)))(s)
    _, d, _ = _ref_lsq(np.asarray(x), float(s.reshape(())), spec)
    np.testing.assert_allclose(np.asarray(jac).reshape(x.shape), d, rtol=1e-6,
                               atol=1e-6)


def test_lsq_mxfp4_scale_rounds_to_power_of_two():
  spec = S("mxfp4", axis=0)  # blocks of 32 along K; e8m0 scales, floor
  x = _x((64, 4))
  s0 = np.asarray(lb.init_scale(x, spec)) * np.float32(1.3)
  ct = np.asarray(_x((64, 4), seed=2))
  fwd, grad = _fq_scale_fns(spec)
  gx, gs = grad(x, jnp.asarray(s0), jnp.asarray(ct))
  s_eff = _expand(2.0 ** np.floor(np.log2(s0)), x.shape)
  ref_y, d, clipped = _ref_lsq(np.asarray(x), s_eff, spec)
  np.testing.assert_array_equal(np.asarray(fwd(x, jnp.asarray(s0))), ref_y)
  np.testing.assert_allclose(np.asarray(gs), _block_sum(ct * d, (2, 4)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(gx), np.where(clipped, 0.0, ct))


def test_lsq_nvfp4_total_scale_splits_into_tensor_and_e4m3():
  spec = S("nvfp4", axis=0)  # blocks of 16 along K
  x = _x((32, 4))
  s0 = np.asarray(lb.init_scale(x, spec, method="amax"), np.float32) * np.float32(0.8)
  ct = np.asarray(_x((32, 4), seed=3))
  fwd, grad = _fq_scale_fns(spec)
  gx, gs = grad(x, jnp.asarray(s0), jnp.asarray(ct))
  t = np.float32(s0.max() / np.float32(448))
  blk = np.clip(s0 / t, 2.0 ** -6, 448).astype(ml_dtypes.float8_e4m3fn).astype(
      np.float32)
  mult = _expand((np.float32(1) / t) / blk, x.shape)
  ref_y, d, clipped = _ref_lsq(np.asarray(x), _expand(t * blk, x.shape), spec,
                               v=np.asarray(x) * mult)
  np.testing.assert_allclose(np.asarray(fwd(x, jnp.asarray(s0))), ref_y, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gs), _block_sum(ct * d, (2, 4)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(gx), np.where(clipped, 0.0, ct))
  q = lb.quantize(x, spec, scale=s0)
  assert float(q.tensor_scale) == t


def test_lsq_plus_asymmetric_scale_and_zero_point():
  spec = S("uint8", axis=0)
  x = _x() + 0.5
  s0 = np.asarray(lb.init_scale(x, spec, method="amax")) * np.float32(0.7)
  z0 = np.full(s0.shape, 60.3, np.float32)
  ct = np.asarray(_x(seed=4))
  f = lambda x, s, z: jnp.sum(ct * lb.fake_quant(x, spec, scale=s, zero_point=z))  # noqa
  gx, gs, gz = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, s0, z0)
  s_eff = _expand(s0, x.shape)
  ref_y, d, clipped = _ref_lsq(np.asarray(x), s_eff, spec, zp=60.0)
  assert clipped.any()
  y = lb.fake_quant(x, spec, scale=s0, zero_point=z0)
  np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gs), _block_sum(ct * d, s0.shape), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(gz),
                             _block_sum(np.where(clipped, -ct * s_eff, 0.0), s0.shape),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gx), np.where(clipped, 0.0, ct))
  # Without zero_point it comes from the data (round(-min / s)) and is constant.
  q = lb.quantize(x, spec, scale=s0)
  lo = np.minimum(np.asarray(x).min(axis=0), 0)
  np.testing.assert_array_equal(np.asarray(q.zero_point).reshape(-1),
                                np.clip(np.round(-lo / s0.reshape(-1)), 0, 255))


@pytest.mark.parametrize("spec", [
    S("int4", axis=0, group_size=4),
    pytest.param(S("fp8_e4m3"), marks=pytest.mark.slow),
    pytest.param(S("int8", axis=0, scale_dtype="bfloat16"), marks=pytest.mark.slow),
    S("mxfp4", axis=0, scale_rounding="nearest"),
    S("nvfp4", axis=0), S("uint4", axis=0)],
                         ids=lambda s: f"{s.format.name}-{s.scale_dtype}")
def test_quantize_with_scale_round_trips_fake_quant(spec):
  x = _x((64, 8))
  s = lb.init_scale(x, spec) * 1.1
  q = lb.quantize(x, spec, scale=s)
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q)),
                                np.asarray(_fq_scale_fns(spec)[0](x, s)))
  assert q.scale.shape == lb.scale_shape(x.shape, spec)


@pytest.mark.parametrize("spec", [S("int8"),
                                  pytest.param(S("fp8_e4m3", axis=0),
                                               marks=pytest.mark.slow), S("uint8")],
                         ids=lambda s: s.format.name)
def test_pact_forward_and_gradients(spec):
  x = _x() * 2
  grid = lb.scale_shape(x.shape, spec)
  alpha = jnp.full(grid, 1.5, jnp.float32)
  ct = np.asarray(_x(seed=5))
  f = lambda x, a: jnp.sum(ct * lb.fake_quant(x, spec, clip=a))  # noqa: E731
  gx, ga = jax.jit(jax.grad(f, argnums=(0, 1)))(x, alpha)
  kw = {} if spec.symmetric else {"amin": 0.0}
  ref, y = jax.jit(lambda x, a: (lb.fake_quant(x, spec, amax=a, **kw),
                                 lb.fake_quant(x, spec, clip=a)))(x, alpha)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
  xn = np.asarray(x)
  if spec.symmetric:
    clipped = np.abs(xn) >= 1.5
    d = np.where(clipped, np.sign(xn), 0.0)
  else:
    clipped = (xn < 0) | (xn >= 1.5)
    d = np.where(xn >= 1.5, 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(ga), _block_sum(ct * d, grid), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(gx), np.where(clipped, 0.0, ct))
  q = lb.quantize(x, spec, clip=alpha)
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q)), np.asarray(ref))


def test_pact_scalar_alpha_on_blocks_sums_over_all():
  x = _x((64, 4)) * 3
  spec = S("mxfp4", axis=0)
  fq = lambda a: lb.fake_quant(x, spec, clip=a)  # noqa: E731
  g, y = jax.jit(lambda a: (jax.grad(lambda a: jnp.sum(fq(a)))(a), fq(a)))(
      jnp.float32(1.0))
  xn = np.asarray(x)
  assert float(g) == pytest.approx(float(np.sum(np.where(np.abs(xn) >= 1, np.sign(xn),
                                                         0))))
  # Clipped to alpha even with power-of-two scales.
  assert np.abs(np.asarray(y)).max() <= 1.0


def test_init_scale_formulas():
  x = _x((16, 8))
  xn = np.asarray(x)
  s = lb.init_scale(x, "int4", axis=0, group_size=4)
  ref = 2 * np.abs(xn).reshape(4, 4, 8).mean(axis=1) / np.sqrt(7)
  np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-6)
  s = lb.init_scale(x, "fp8_e4m3", axis=0, method="amax")
  np.testing.assert_allclose(np.asarray(s), np.abs(xn).max(0, keepdims=True) / 448,
                             rtol=1e-7)
  assert lb.init_scale(jnp.zeros((4, 4)), "int8").tolist() == [[1.0]]


def test_scale_shape_and_errors():
  spec = S("int4", axis=0, group_size=4)
  assert lb.scale_shape((16, 8), spec) == (4, 8)
  assert lb.scale_shape((16, 8), S("int8")) == (1, 1)
  assert lb.scale_shape((16, 8), S("int8", axis=1)) == (16, 1)
  assert lb.scale_shape((16, 8), S("int8", tile=(4, 4))) == (4, 2)
  x = _x()
  with pytest.raises(ValueError, match=r"scale has shape \(3,\).*\(4, 8\)"):
    lb.fake_quant(x, spec, scale=jnp.ones(3))
  with pytest.raises(ValueError, match="scale.*amax"):
    lb.fake_quant(x, spec, scale=jnp.ones((4, 8)), amax=1.0)
  with pytest.raises(ValueError, match="clip"):
    lb.quantize(x, spec, clip=1.0, amax=1.0)
  with pytest.raises(ValueError, match="asymmetric"):
    lb.fake_quant(x, spec, scale=jnp.ones((4, 8)), zero_point=jnp.ones((4, 8)))
  # Broadcastable shapes are accepted and their gradient keeps their shape.
  g = jax.grad(lambda s: jnp.sum(lb.fake_quant(x, spec, scale=s)))(jnp.ones((8,)) * .2)
  assert g.shape == (8,)


def test_lsq_steps_reduce_regression_loss():
  """A few LSQ steps on a too-large weight scale fit a toy linear map."""
  kx, kw = jax.random.split(jax.random.key(7))
  xs = jax.random.normal(kx, (64, 16))
  w = jax.random.normal(kw, (16, 4))
  ys = xs @ w
  spec = S("int4", axis=0)

  def loss(s):
    return jnp.mean((xs @ lb.fake_quant(w, spec, scale=s) - ys) ** 2)

  @jax.jit
  def step(s):
    l, g = jax.value_and_grad(loss)(s)
    # LSQ's gradient scale 1 / sqrt(n * Qp) belongs to the recipe.
    return s - g / np.sqrt(16 * 7), l

  s = lb.init_scale(w, spec) * 3.0
  losses = []
  for _ in range(20):
    s, l = step(s)
    losses.append(float(l))
  assert losses[-1] < 0.2 * losses[0]


def test_stochastic_rounding_with_learned_scale():
  x = _x()
  spec = S("int8", rounding="stochastic")
  s = lb.init_scale(x, spec)
  a = lb.fake_quant(x, spec, scale=s, key=jax.random.key(0))
  b = lb.fake_quant(x, spec, scale=s, key=jax.random.key(1))
  q = lb.quantize(x, spec, scale=s, key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q)), np.asarray(a))
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="stochastic"):
    lb.fake_quant(x, spec, scale=s)
