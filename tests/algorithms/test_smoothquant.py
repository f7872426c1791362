"""SmoothQuant (Xiao et al. 2023): exact in float, much better W8A8 with outliers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.algorithms import (smooth_inputs, smooth_weights, smoothquant_scales)
from lowbit_jax.core import QuantSpec, fake_quant


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
  # Exact-arithmetic checks need full float32 matmuls (GPUs default to TF32).
  with jax.default_matmul_precision("float32"):
    yield


K, N = 256, 128
A_SPEC = QuantSpec("int8", axis="tensor")   # per-tensor activations
W_SPEC = QuantSpec("int8", axis=0)          # per-output-channel weights


@pytest.fixture(scope="module")
def data():
  x = jax.random.normal(jax.random.key(0), (512, K))
  x = x.at[:, jnp.array([5, 40, 99, 180])].multiply(60.0)
  w = 0.05 * jax.random.normal(jax.random.key(1), (K, N))
  return x, w


def _w8a8(x, w):
  return fake_quant(x, A_SPEC) @ fake_quant(w, W_SPEC)


def test_smoothing_cuts_w8a8_error(data):
  x, w = data
  ref = x @ w
  s = smoothquant_scales(jnp.max(jnp.abs(x), axis=0), w)
  e_plain = float(jnp.sum((_w8a8(x, w) - ref) ** 2))
  e_smooth = float(jnp.sum((_w8a8(smooth_inputs(x, s), smooth_weights(w, s)[0]) - ref)
                           ** 2))
  assert e_smooth < 0.2 * e_plain, (e_smooth, e_plain)


def test_exact_in_float_and_formula(data):
  x, w = data
  w2 = 0.1 * jax.random.normal(jax.random.key(2), (K, 64))
  amax = jnp.max(jnp.abs(x), axis=0)
  s = smoothquant_scales(amax, [w, w2], alpha=0.7)
  ws = smooth_weights([w, w2], s)
  for a, b in zip(ws, (w, w2)):
    np.testing.assert_allclose(np.asarray(smooth_inputs(x, s) @ a), np.asarray(x @ b),
                               rtol=1e-5, atol=1e-5)
  wmax = np.maximum(np.abs(np.asarray(w)).max(1), np.abs(np.asarray(w2)).max(1))
  want = np.asarray(amax) ** 0.7 / wmax ** 0.3
  np.testing.assert_allclose(np.asarray(s), want, rtol=1e-5)
  # alpha = 1 moves the whole range: every smoothed channel's max becomes |w|max.
  s1 = smoothquant_scales(amax, w, alpha=1.0)
  np.testing.assert_allclose(np.asarray(jnp.max(jnp.abs(smooth_inputs(x, s1)), 0)),
                             np.ones(K), rtol=1e-5)


def test_clamps_as_the_papers_code():
  # smooth.py of mit-han-lab/smoothquant: max|w| clamped at 1e-5, then s; the
  # activation maxima are not clamped (a zero channel got s = 6e-3 here).
  amax = np.array([0.0, 1e-9, 2.0, 3.0], np.float32)
  w = np.array([[0.5, -0.2], [0.3, 0.1], [0.0, 0.0], [1e-7, 0.0]], np.float32)
  wmax = np.maximum(np.abs(w).max(1), 1e-5)
  want = np.maximum(amax.astype(np.float64) ** 0.5 / wmax ** 0.5, 1e-5)
  np.testing.assert_allclose(np.asarray(smoothquant_scales(amax, w)), want, rtol=1e-6)
  assert float(smoothquant_scales(amax, w)[0]) == np.float32(1e-5)


def test_bad_arguments(data):
  x, w = data
  with pytest.raises(ValueError, match="alpha"):
    smoothquant_scales(jnp.ones(K), w, alpha=1.5)
  with pytest.raises(ValueError, match="act_absmax"):
    smoothquant_scales(jnp.ones(K + 1), w)
  with pytest.raises(ValueError, match="2-d"):
    smoothquant_scales(jnp.ones(K), w[None])
