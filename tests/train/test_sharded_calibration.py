"""Calibration and PTQ on sharded data and models give the single-device results."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import calibration, train
from lowbit_jax.algorithms import gptq
from lowbit_jax.core import QuantSpec
from lowbit_jax.flax import apply_ptq, capture_dense_stats
from lowbit_jax.models.llama import Llama

from tests.train._helpers import batches, synthetic_data, tiny_config

_HI = jax.lax.Precision.HIGHEST


def _equal_trees(a, b):
  return all(np.array_equal(np.asarray(u), np.asarray(v))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", ["minmax", "absmax_ema", "percentile"])
def test_observers_on_a_data_sharded_batch_are_exact(name):
  mesh = train.make_mesh("data:4,fsdp:2")
  x = jax.random.normal(jax.random.key(0), (64, 32)) * 3
  xs = jax.device_put(x, train.batch_sharding(mesh))
  assert len(xs.sharding.device_set) == 8
  obs = calibration.get(name)
  for spec in (QuantSpec("int8", axis="tensor"), QuantSpec("int8", axis=0)):
    if name == "percentile" and spec.axis == 0:
      continue
    state = obs.init(x, spec)
    update = jax.jit(obs.update)
    one, sharded = update(update(state, x), 2 * x), update(update(state, xs), 2 * xs)
    assert _equal_trees(one, sharded)   # min/max and histogram counts: exact
    assert _equal_trees(obs.finalize(one, spec), obs.finalize(sharded, spec))


def test_gptq_on_an_fsdp_sharded_weight_with_a_data_sharded_hessian():
  mesh = train.make_mesh("fsdp:8")
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (256, 64)) * jnp.linspace(0.2, 3.0, 64)
  w = jax.random.normal(kw, (64, 32))
  gram = jax.jit(lambda a: jnp.matmul(a.T, a, precision=_HI))
  h = gram(x)
  h_sharded = gram(jax.device_put(x, train.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(h_sharded), np.asarray(h), rtol=1e-5,
                             atol=1e-3)
  layout = train.Layout(mesh)
  w_sharded = jax.device_put(w, layout.param_sharding("layers_0/mlp/up_proj/kernel",
                                                      w))
  assert w_sharded.sharding.spec == jax.sharding.PartitionSpec("fsdp")
  spec = QuantSpec("int4", group_size=16)
  ref = gptq(w, h, spec)
  # The same Hessian, the weight sharded: the very same quantized weight.
  out = gptq(w_sharded, jax.device_put(h, train.replicated(mesh)), spec)
  assert np.array_equal(np.asarray(out.weight), np.asarray(ref.weight))
  np.testing.assert_array_equal(np.asarray(out.amax), np.asarray(ref.amax))
  # The Hessian summed over the data shards differs in the last bits, which
  # may flip roundings (GPTQ propagates each one to the later rows); the
  # layer's output error is the same.
  out = gptq(w_sharded, h_sharded, spec)

  def err(wq):
    return float(jnp.sum(jnp.square(jnp.matmul(x, wq - w, precision=_HI))))
  np.testing.assert_allclose(err(out.weight), err(ref.weight), rtol=2e-2)


@pytest.mark.slow
def test_capture_gptq_and_awq_on_a_sharded_model():
  model = Llama(tiny_config())
  params = train.init_params(model, jax.random.key(0))
  tokens = jnp.asarray(batches(synthetic_data(), 1)[0][:, :-1])
  mesh = train.make_mesh("data:2,fsdp:2,tensor:2")
  sharded = jax.device_put(params, train.Layout(mesh).params(params))
  stokens = train.shard_batch(np.asarray(tokens), mesh)
  one = capture_dense_stats(model, params, [(tokens,)])
  many = capture_dense_stats(model, sharded, [(stokens,)])
  assert one.order == many.order and one.groups == many.groups
  for p in one.order:
    a, b = one.stats[p], many.stats[p]
    np.testing.assert_allclose(np.asarray(b.gram), np.asarray(a.gram), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(b.absmax), np.asarray(a.absmax),
                               rtol=1e-5)
    assert float(b.count) == float(a.count) == tokens.size
  for method in ("gptq", "awq"):
    ref, _ = apply_ptq(model, params, [(tokens,)], method, "int4")
    out, _ = apply_ptq(model, sharded, [(stokens,)], method, "int4")
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
