"""QArray and quantize under sharded jit and shard_map (8 fake CPU devices).

tests/conftest.py sets --xla_force_host_platform_device_count=8 before jax is
imported. Sharded quantization must equal single-device quantization bit for
bit: the scales of a block never depend on how the tensor is split (NVFP4's
per-tensor scale is a global max under jit).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit_jax as lb

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8,
                                reason="needs 8 (fake CPU) devices from conftest.py")


def _mesh(shape=(8,), names=("d",)):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _equal_trees(a, b):
  la, lb_ = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb_)
  for u, v in zip(la, lb_):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(u).reshape(-1).view(np.uint8),
                                  np.asarray(v).reshape(-1).view(np.uint8))


SPECS = [lb.QuantSpec("int4", axis=-1, group_size=128), lb.QuantSpec("mxfp4", axis=-1),
         lb.QuantSpec("nvfp4", axis=-1), lb.QuantSpec("uint4", axis=-1),
         lb.QuantSpec("fp8_e4m3"), lb.QuantSpec("nf4", axis=-1),
         lb.QuantSpec("int8", axis=0)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.format.name for s in SPECS])
def test_sharded_jit_equals_single_device(spec):
  x = jax.random.normal(jax.random.key(0), (64, 256)) * 2
  fn = jax.jit(lambda v: (lb.quantize(v, spec), lb.fake_quant(v, spec)))
  ref_q, ref_y = fn(x)
  mesh = _mesh((4, 2), ("a", "b"))
  for pspec in (P("a", None), P(None, "b"), P("a", "b")):
    xs = jax.device_put(x, NamedSharding(mesh, pspec))
    q, y = fn(xs)
    _equal_trees(q, ref_q)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_y))
    assert len(q.codes.sharding.device_set) > 1 or q.codes.size < 8


def test_sharded_jit_gradient():
  x = jax.random.normal(jax.random.key(1), (64, 256))
  spec = lb.QuantSpec("int8", axis=-1, clip_ratio=0.8)
  g_fn = jax.jit(jax.grad(lambda v: jnp.sum(lb.fake_quant(v, spec) ** 2)))
  ref = g_fn(x)
  xs = jax.device_put(x, NamedSharding(_mesh(), P("d", None)))
  np.testing.assert_array_equal(np.asarray(g_fn(xs)), np.asarray(ref))


SM_SPECS = [lb.QuantSpec("int4", axis=-1, group_size=32),
            lb.QuantSpec("mxfp4", axis=-1), lb.QuantSpec("uint4", axis=-1),
            lb.QuantSpec("fp8_e4m3", axis=-1), lb.QuantSpec("nf4", axis=-1)]


@pytest.mark.parametrize("spec", SM_SPECS, ids=[s.format.name for s in SM_SPECS])
def test_shard_map_rows_equals_global(spec):
  x = jax.random.normal(jax.random.key(2), (64, 256))
  ref = jax.jit(lambda v: lb.quantize(v, spec))(x)
  mesh = _mesh()
  sm = jax.shard_map(lambda v: lb.quantize(v, spec), mesh=mesh, in_specs=P("d"),
                     out_specs=P("d"))
  q = jax.jit(sm)(jax.device_put(x, NamedSharding(mesh, P("d"))))
  assert isinstance(q, lb.QArray) and q.shape == (8, 256)  # the per-shard view
  _equal_trees(q, ref)
  # A sharded QArray goes back into shard_map and dequantizes per shard.
  deq = jax.jit(jax.shard_map(lb.dequantize, mesh=mesh, in_specs=P("d"),
                              out_specs=P("d")))(q)
  np.testing.assert_array_equal(np.asarray(deq), np.asarray(lb.dequantize(ref)))


def test_shard_map_nvfp4_with_a_global_tensor_amax():
  # Inside shard_map each shard sees only its rows, so NVFP4's tensor scale
  # would be per shard; a pmax'ed tensor_amax makes it the global one.
  x = jax.random.normal(jax.random.key(6), (64, 256)) * jnp.linspace(
      0.1, 10.0, 64)[:, None]
  spec = lb.QuantSpec("nvfp4", axis=-1)
  ref = jax.jit(lambda v: lb.quantize(v, spec))(x)
  mesh = _mesh()

  def local(v):
    ta = jax.lax.pmax(jnp.max(jnp.abs(v)), "d")
    return lb.fake_quant(v, spec, tensor_amax=ta)

  sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
  y = sm(jax.device_put(x, NamedSharding(mesh, P("d"))))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(lb.dequantize(ref)))
  # Without it the shards disagree with the global result.
  per_shard = jax.jit(jax.shard_map(lambda v: lb.fake_quant(v, spec), mesh=mesh,
                                    in_specs=P("d"), out_specs=P("d")))
  assert not np.array_equal(np.asarray(per_shard(x)),
                            np.asarray(lb.dequantize(ref)))


def test_shard_map_along_the_quantized_axis():
  # K split over 8 devices, groups of 32 along K: each shard holds whole groups.
  x = jax.random.normal(jax.random.key(3), (16, 256))
  spec = lb.QuantSpec("int4", axis=-1, group_size=32)
  ref = jax.jit(lambda v: lb.quantize(v, spec))(x)
  mesh = _mesh()
  sm = jax.shard_map(lambda v: lb.quantize(v, spec), mesh=mesh, in_specs=P(None, "d"),
                     out_specs=P(None, "d"))
  q = jax.jit(sm)(jax.device_put(x, NamedSharding(mesh, P(None, "d"))))
  _equal_trees(q, ref)


def test_quantized_matmul_under_sharded_jit():
  x = jax.random.normal(jax.random.key(4), (32, 256))
  w = jax.random.normal(jax.random.key(5), (256, 64))
  dn = (((1,), (0,)), ((), ()))
  fn = jax.jit(lambda a, b: lb.ops.dot_general(a, b, dn, lhs_spec="int8",
                                               rhs_spec="mxfp4", mode="real"))
  ref = fn(x, w)
  mesh = _mesh((4, 2), ("a", "b"))
  y = fn(jax.device_put(x, NamedSharding(mesh, P("a", None))),
         jax.device_put(w, NamedSharding(mesh, P(None, "b"))))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
