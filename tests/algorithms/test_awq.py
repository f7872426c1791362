"""AWQ (Lin et al. 2024): scale search against RTN on outlier activations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.algorithms import awq_scales, awq_search, output_error, rtn
from lowbit_jax.core import QuantSpec


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
