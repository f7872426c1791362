"""Randomized Hadamard rotations (QuaRot, Ashkboos et al. 2024)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.algorithms import (hadamard_matrix, output_error, random_hadamard,
                                   random_orthogonal, rotate_inputs, rotate_weights, rtn,
                                   walsh_hadamard_transform)
from lowbit_jax.core import QuantSpec, fake_quant


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
  # Exact-arithmetic checks need full float32 matmuls (GPUs default to TF32).
  with jax.default_matmul_precision("float32"):
    yield


K, N = 256, 128


def _eye_err(r):
  r = np.asarray(r, np.float64)
  return float(np.max(np.abs(r @ r.T - np.eye(r.shape[0]))))


def test_hadamard_matrix_and_fast_transform():
  for n in (1, 2, 8, 64):
    h = hadamard_matrix(n)
    assert _eye_err(h) < 1e-6
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)
    np.testing.assert_array_equal(h, h.T)
  x = jax.random.normal(jax.random.key(0), (3, 5, 128))
  np.testing.assert_allclose(np.asarray(walsh_hadamard_transform(x)),
                             np.asarray(x @ hadamard_matrix(128)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    hadamard_matrix(12)
  with pytest.raises(ValueError, match="power of two"):
    walsh_hadamard_transform(jnp.ones((3, 12)))


@pytest.mark.parametrize("n,block", [(256, None), (384, None), (7, None), (96, 32),
                                     (384, 64)])
def test_random_hadamard_is_orthogonal(n, block):
  r = random_hadamard(jax.random.key(1), n, block_size=block)
  assert r.shape == (n, n)
  assert _eye_err(r) < 1e-5
  if block is not None:   # block diagonal: nothing outside the blocks
    mask = np.kron(np.eye(n // block), np.ones((block, block)))
    assert float(np.max(np.abs(np.asarray(r) * (1 - mask)))) == 0.0
  if n & (n - 1) == 0:   # a signed Hadamard: all entries +-1/sqrt(n)
    np.testing.assert_allclose(np.abs(np.asarray(r)), 1 / np.sqrt(n), rtol=1e-6)
  assert _eye_err(random_orthogonal(jax.random.key(2), 10)) < 1e-5


@pytest.fixture(scope="module")
def data():
  x = jax.random.normal(jax.random.key(3), (512, K))
  x = x.at[:, jnp.array([2, 70, 140, 250])].multiply(50.0)
  w = 0.05 * jax.random.normal(jax.random.key(4), (K, N))
  return x, w, random_hadamard(jax.random.key(5), K)


def test_rotation_is_exact_in_float(data):
  x, w, r = data
  np.testing.assert_allclose(np.asarray(rotate_inputs(x, r) @ rotate_weights(w, r)[0]),
                             np.asarray(x @ w), rtol=1e-4, atol=1e-4)


def test_rotation_lowers_int4_error_on_outliers(data):
  x, w, r = data
  ref = x @ w
  a4, w4 = QuantSpec("int4", axis=-1), QuantSpec("int4", group_size=128)

  def w4a4(xx, ww):
    return fake_quant(xx, a4) @ rtn(ww, w4)

  e_plain = float(jnp.sum((w4a4(x, w) - ref) ** 2))
  e_rot = float(jnp.sum((w4a4(rotate_inputs(x, r), rotate_weights(w, r)[0]) - ref) ** 2))
  assert e_rot < 0.7 * e_plain, (e_rot, e_plain)
  # Weight-only int4 with outlier weight rows.
  wo = w.at[jnp.array([9, 99]), :].multiply(20.0)
  wr = rotate_weights(wo, r)[0]
  e_plain = float(output_error(x, wo, rtn(wo, w4)))
  e_rot = float(output_error(rotate_inputs(x, r), wr, rtn(wr, w4)))
  assert e_rot < 0.3 * e_plain, (e_rot, e_plain)


def test_bad_arguments(data):
  _, w, r = data
  with pytest.raises(ValueError, match="block_size"):
    random_hadamard(jax.random.key(0), 96, block_size=40)
  with pytest.raises(ValueError, match="rotation shape"):
    rotate_weights(w, r[:10, :10])
