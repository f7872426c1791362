"""GPTQ (Frantar et al. 2023) against RTN and its own invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.algorithms import (gptq, gram, hessian_error, kernel_spec, output_error,
                                   rtn)
from lowbit_jax.core import QuantSpec, dequantize, fake_quant, quantize


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
  # Exact-arithmetic checks need full float32 matmuls (GPUs default to TF32).
  with jax.default_matmul_precision("float32"):
    yield


K, N, M = 256, 64, 1024


@pytest.fixture(scope="module")
def layer():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  # Strongly correlated inputs: a random mixing of Gaussians plus a little noise.
  mix = jax.random.normal(k1, (K, K)) / np.sqrt(K)
  x = jax.random.normal(k2, (M, K)) @ mix + 0.3 * jax.random.normal(k3, (M, K))
  w = 0.05 * jax.random.normal(k4, (K, N))
  return x, w, gram(x)


@pytest.mark.parametrize("spec,act_order", [
    (QuantSpec("int4", group_size=128), False),
    (QuantSpec("int4", group_size=128), True),
    (QuantSpec("int3", group_size=128), False)],
    ids=["int4_g128", "int4_g128_act_order", "int3_g128"])
def test_gptq_beats_rtn_on_correlated_inputs(layer, spec, act_order):
  x, w, h = layer
  res = gptq(w, h, spec, act_order=act_order)
  e_gptq = float(output_error(x, w, res.weight))
  e_rtn = float(output_error(x, w, rtn(w, spec)))
  assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
  # The error through the Hessian is the same number without the inputs.
  np.testing.assert_allclose(float(hessian_error(h, w, res.weight)), e_gptq, rtol=1e-3)


@pytest.mark.parametrize("spec,act_order", [
    (QuantSpec("int4", group_size=128), False),
    (QuantSpec("int4", group_size=128), True),
    (QuantSpec("int3", group_size=128), False),
    (QuantSpec("int4"), False),
    (QuantSpec("uint4", group_size=64), False),
    (QuantSpec("nvfp4"), False)],
    ids=["int4_g128", "int4_g128_act_order", "int3_g128", "int4_channel",
         "uint4_g64", "nvfp4"])
def test_identity_hessian_is_exactly_rtn(layer, spec, act_order):
  _, w, _ = layer
  res = gptq(w, jnp.eye(K), spec, act_order=act_order)
  np.testing.assert_array_equal(np.asarray(res.weight), np.asarray(rtn(w, spec)))


@pytest.mark.parametrize("spec", [QuantSpec("int4", group_size=128),
                                  QuantSpec("uint4", group_size=64),
                                  QuantSpec("int4", tile=(64, 32))],
                         ids=["int4_g128", "uint4_g64_asym", "int4_tile"])
def test_result_stores_exactly_with_its_ranges(layer, spec):
  _, w, h = layer
  res = gptq(w, h, spec)
  q = quantize(res.weight, kernel_spec(spec), amax=res.amax, amin=res.amin)
  np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(res.weight))
  assert res.amax.shape == q.scale.shape
  assert (res.amin is None) == spec.symmetric
  # Every value lies on its group's grid: re-quantizing changes nothing.
  again = fake_quant(res.weight, kernel_spec(spec), amax=res.amax, amin=res.amin)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(res.weight))


def test_jit_and_dtype(layer):
  x, w, h = layer
  spec = QuantSpec("int4", group_size=128)
  eager = gptq(w, h, spec).weight
  jitted = jax.jit(lambda a, b: gptq(a, b, spec).weight)(w, h)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
  bf = gptq(w.astype(jnp.bfloat16), h, spec).weight
  assert bf.dtype == jnp.bfloat16 and bf.shape == w.shape
  del x


def test_dead_inputs_and_padding():
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (300, 200)).at[:, 7].set(0.0)   # input 7 is always 0
  w = jax.random.normal(k2, (200, 48))
  spec = QuantSpec("int4", group_size=128, pad=True)
  res = gptq(w, gram(x), spec)
  assert res.weight.shape == w.shape
  assert bool(jnp.all(jnp.isfinite(res.weight)))
  assert res.amax.shape == (2, 48)
  assert float(output_error(x, w, res.weight)) < float(output_error(x, w, rtn(w, spec)))


@pytest.mark.parametrize("spec,act_order", [
    (QuantSpec("int4", group_size=16), False), (QuantSpec("int4", group_size=16), True),
    (QuantSpec("int4", group_size=16, symmetric=False), False),
    (QuantSpec("int4", group_size=64), False)],   # groups longer than blocksize
    ids=["g16", "g16_act_order", "g16_asym", "g64_blocks"])
def test_a_dead_input_neither_widens_its_group_nor_sets_the_dampening(spec, act_order):
  # Input 5 is always 0 and its weights are 10x larger: they must not set the
  # scale of the live rows of its group (AutoGPTQ zeroes them first: the same
  # outputs), and the result must not depend on the Hessian's scale (the
  # dead input's unit diagonal once entered the dampening's mean).
  k1, k2 = jax.random.split(jax.random.key(4))
  x = jax.random.normal(k1, (128, 64)).at[:, 5].set(0.0)
  w = jax.random.normal(k2, (64, 32))
  w_big = w.at[5].multiply(10.0)
  h = gram(x)
  kw = dict(act_order=act_order, blocksize=32)
  got = gptq(w_big, h, spec, **kw)
  zeroed = gptq(w.at[5].set(0.0), h, spec, **kw)   # AutoGPTQ's treatment
  np.testing.assert_allclose(output_error(x, w_big, got.weight),
                             output_error(x, w, zeroed.weight), rtol=1e-5)
  np.testing.assert_array_equal(np.delete(got.weight, 5, 0), np.delete(zeroed.weight, 5, 0))
  small = gptq(w_big, h * 1e-4, spec, **kw)
  np.testing.assert_allclose(small.weight, got.weight, atol=1e-5)
  q = quantize(got.weight, kernel_spec(spec), amax=got.amax,   # it stores exactly
               **({} if spec.symmetric else {"amin": got.amin}))
  np.testing.assert_array_equal(dequantize(q), got.weight)


def test_a_non_finite_or_negative_hessian_is_refused(layer):
  _, w, h = layer
  with pytest.raises(ValueError, match="NaN or inf"):
    gptq(w, h.at[3, 5].set(jnp.nan), "int4")
  with pytest.raises(ValueError, match="NaN or inf"):
    gptq(w, h.at[3, 3].set(jnp.inf), "int4")
  with pytest.raises(ValueError, match="negative diagonal") as e:
    gptq(w, -h, "int4")   # (was taken as all-dead inputs: worse than RTN)
  # The advice names a function that resolves (algorithms.gptq is the
  # function, which hides its module).
  import functools   # pylint: disable=g-import-not-at-top
  import lowbit_jax   # pylint: disable=g-import-not-at-top
  named = str(e.value).rsplit("(", 1)[1].rstrip(")")
  assert named == "lowbit_jax.algorithms.gram"
  assert callable(functools.reduce(getattr, named.split(".")[1:], lowbit_jax))


def test_singular_hessian_is_damped():
  x = jax.random.normal(jax.random.key(2), (8, 128))     # rank 8 << 128
  w = jax.random.normal(jax.random.key(3), (128, 16))
  res = gptq(w, gram(x), "int4", percdamp=0.0)
  assert bool(jnp.all(jnp.isfinite(res.weight)))


def test_bad_arguments(layer):
  _, w, h = layer
  with pytest.raises(ValueError, match="hessian must be"):
    gptq(w, h[:10, :10], "int4")
  with pytest.raises(ValueError, match="rounds to nearest"):
    gptq(w, h, QuantSpec("int4", rounding="stochastic"))
  with pytest.raises(ValueError, match="rtn"):
    gptq(w, h, QuantSpec("binary"))
  with pytest.raises(ValueError, match="pad=True"):
    gptq(w, h, QuantSpec("int4", group_size=96))
  with pytest.raises(ValueError, match="2-d"):
    gptq(w[None], h, "int4")
