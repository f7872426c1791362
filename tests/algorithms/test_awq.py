"""AWQ (Lin et al. 2024): scale search against RTN on outlier activations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.algorithms import (awq_clip_search, awq_scales, awq_search,
                                   clip_ratios, output_error, rtn, rtn_scale)
from lowbit_jax.core import QuantSpec, dequantize, fake_quant, quantize


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
  # Exact-arithmetic checks need full float32 matmuls (GPUs default to TF32).
  with jax.default_matmul_precision("float32"):
    yield


K, N = 256, 96
OUTLIERS = jnp.array([3, 50, 130, 201])


def _inputs(key, m=512):
  x = jax.random.normal(key, (m, K))
  return x.at[:, OUTLIERS].multiply(40.0)


@pytest.fixture(scope="module")
def data():
  w = 0.05 * jax.random.normal(jax.random.key(2), (K, N))
  return _inputs(jax.random.key(0)), _inputs(jax.random.key(1)), w


@pytest.mark.parametrize("spec", [QuantSpec("int4", group_size=128),
                                  QuantSpec("int3", group_size=128)],
                         ids=["int4_g128", "int3_g128"])
def test_awq_beats_rtn_on_outlier_channels(data, spec):
  x, x_test, w = data
  res = awq_search(x, w, spec)
  w_eff = res.weights[0] / res.scales[:, None]
  e_rtn = float(output_error(x, w, rtn(w, spec)))
  e_awq = float(output_error(x, w, w_eff))
  # alpha = 0 is plain RTN, so the search never does worse on its sample...
  np.testing.assert_allclose(float(res.errors[0]), e_rtn, rtol=1e-4)
  assert e_awq <= e_rtn * (1 + 1e-5)
  assert float(res.alpha) > 0
  # ...and here it does much better on held-out data too.
  e_rtn_t = float(output_error(x_test, w, rtn(w, spec)))
  e_awq_t = float(output_error(x_test, w, w_eff))
  assert e_awq_t < 0.7 * e_rtn_t, (e_awq_t, e_rtn_t)
  # The salient (outlier) channels get the largest scales.
  top = set(np.argsort(-np.asarray(res.scales))[:4].tolist())
  assert top == set(np.asarray(OUTLIERS).tolist())


def test_scaling_is_exact_in_float(data):
  x, _, w = data
  s = awq_scales(jnp.mean(jnp.abs(x), axis=0), 0.5)
  np.testing.assert_allclose(np.asarray((x / s) @ (w * s[:, None])), np.asarray(x @ w),
                             rtol=1e-4, atol=1e-4)
  # Normalized so that max * min == 1.
  np.testing.assert_allclose(float(jnp.max(s) * jnp.min(s)), 1.0, rtol=1e-5)


def test_shared_input_kernels_and_act_spec(data):
  x, _, w = data
  w2 = 0.05 * jax.random.normal(jax.random.key(3), (K, 32))
  spec = QuantSpec("int4", group_size=128)
  res = awq_search(x, [w, w2], spec, n_grid=5, act_spec="int8")
  assert res.scales.shape == (K,) and res.errors.shape == (5,)
  assert [q.shape for q in res.weights] == [w.shape, w2.shape]
  # Per-kernel specs, one kept in float.
  res2 = awq_search(x, [w, w2], [spec, None], n_grid=5)
  np.testing.assert_allclose(np.asarray(res2.weights[1]),
                             np.asarray(w2 * res2.scales[:, None]), rtol=1e-6)


def test_bad_arguments(data):
  x, _, w = data
  with pytest.raises(ValueError, match="features"):
    awq_search(x[:, :10], w, "int4")
  with pytest.raises(ValueError, match="n_grid"):
    awq_search(x, w, "int4", n_grid=0)
  with pytest.raises(ValueError, match="same number of input"):
    awq_search(x, [w, w[:10]], "int4")
  with pytest.raises(ValueError, match="specs"):
    awq_search(x, [w, w], ["int4"])


# -- clip search (AWQ's auto_clip) -------------------------------------------


@pytest.fixture(scope="module")
def heavy():
  """Student-t (3 dof) weights: a few large entries widen each channel's range."""
  rng = np.random.default_rng(7)
  w = jnp.asarray(0.02 * rng.standard_t(3.0, (128, 64)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((1024, 128)), jnp.float32)
  return x[:512], x[512:], w


@pytest.mark.parametrize("spec", [
    QuantSpec("int3"),
    pytest.param(QuantSpec("mxfp4"), marks=pytest.mark.slow)],
    ids=["int3_channel", "mxfp4"])
def test_clip_search_lowers_output_error_and_repacks_exactly(heavy, spec):
  x, x_test, w = heavy
  res = awq_clip_search(x, w, spec)
  assert res.ratios.shape == res.scale.shape == (1 if spec.format.name == "int3" else 4,
                                                64)
  assert float(jnp.min(res.ratios)) >= 0.5 and float(jnp.max(res.ratios)) <= 1.0
  # Per channel, never worse than RTN on its own sample (each channel's whole
  # error is searched); with groups only up to the cross terms between groups
  # (MX blocks of 32). Clearly better on held-out inputs where clipping pays
  # (integer grid; MX's power-of-two steps clip in coarse jumps).
  per_channel = spec.format.name == "int3"
  assert float(res.error) <= float(res.rtn_error) * (1 + 1e-5 if per_channel else 1.02)
  e_rtn = float(output_error(x_test, w, rtn(w, spec)))
  e_clip = float(output_error(x_test, w, res.weight))
  if per_channel:
    assert e_clip < 0.8 * e_rtn, (e_clip, e_rtn)
  else:
    assert e_clip <= 1.02 * e_rtn, (e_clip, e_rtn)
  # Real mode stores exactly what the search returns.
  sp = spec.replace(axis=0)
  np.testing.assert_array_equal(dequantize(quantize(res.weight, sp, scale=res.scale)),
                                res.weight)
  np.testing.assert_array_equal(res.weight, rtn(res.clipped, spec))


def test_clip_grid_and_bad_arguments(heavy):
  x, _, w = heavy
  np.testing.assert_allclose(clip_ratios(20, 0.5), 1.0 - np.arange(10) / 20)
  with pytest.raises(ValueError, match="max_shrink"):
    awq_clip_search(x, w, "int4", max_shrink=1.0)
  with pytest.raises(ValueError, match="n_grid"):
    awq_clip_search(x, w, "int4", n_grid=0)
  with pytest.raises(ValueError, match="blocks along the input axis"):
    awq_clip_search(x, w, QuantSpec("int4", axis=1))
  with pytest.raises(ValueError, match="features"):
    awq_clip_search(x[:, :10], w, "int4")


@pytest.mark.slow
@pytest.mark.parametrize("spec", [QuantSpec("mxfp4", pad=True),
                                  QuantSpec("int4", group_size=32, symmetric=False,
                                            pad=True)],
                         ids=["mxfp4", "uint4_g32"])
def test_rtn_scale_reproduces_rtn(heavy, spec):
  """The scale a PTQ result reports gives back RTN's values (MX: the OCP E8M0
  rule, which amax / 6 rounded down to a power of two is not)."""
  w = heavy[2][:100]
  s = rtn_scale(w, spec)
  q = fake_quant(w, spec.replace(axis=0), scale=s)
  np.testing.assert_array_equal(q, rtn(w, spec))
  np.testing.assert_array_equal(dequantize(quantize(q, spec.replace(axis=0), scale=s)), q)
