"""Orbax checkpoints of quantized params: bit-exact, packed on disk, any mesh."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit_jax as lb
from lowbit_jax import checkpoint
from lowbit_jax._function import quantize_function
from lowbit_jax._rules import QuantRule, QWeight

_jq = jax.jit(lb.quantize, static_argnums=1)


def _q(x, fmt, **kw):
  return _jq(x, lb.QuantSpec(fmt, **kw))


def _assert_same(a, b):
  la, ta = jax.tree.flatten(a)
  lb_, tb = jax.tree.flatten(b)
  assert ta == tb  # same structure and static QArray fields (spec, shape, ...)
  for x, y in zip(la, lb_):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def _mlp(p, x):
  for layer in p["layers"]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x


def _params(d=256, n=3, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.key(0), n)
  return {"layers": [{"w": jax.random.normal(k, (d, d), dtype),
                      "b": jnp.zeros((d,), dtype)} for k in keys]}


def test_round_trip_is_bit_exact_for_many_formats(tmp_path):
  x = jax.random.normal(jax.random.key(1), (64, 64))
  params = {
      "int4_t": QWeight(**{f: getattr(q, f) for f in ("codes", "scale", "zero_point",
                                                       "tensor_scale", "spec", "shape",
                                                       "dtype", "pack_axis")},
                        transposed=True)
      for q in [_q(x, "int4", axis=1, group_size=16)]}
  params.update({
      "mxfp4": _q(x, "mxfp4", axis=-1),
      "nvfp4": _q(x, "nvfp4", axis=-1),
      "uint4": _q(x, "uint4", axis=0, group_size=16),
      "fp8": _q(x, "fp8_e4m3", axis=0),
      "fp6": _q(x, "fp6_e3m2", axis=-1, group_size=32),
      "nf4": _q(x, "nf4", axis=-1),
      "custom": _q(x, lb.formats.FloatFormat(3, 2), axis=0, scale_dtype="e8m0"),
      "tuple_and_list": (jnp.arange(3, dtype=jnp.int32), [x.astype(jnp.bfloat16)]),
      "nested": {"0": {"b": jnp.float32(2.0).reshape(1)}},
  })
  checkpoint.save(tmp_path / "ck", params)
  _assert_same(checkpoint.restore(tmp_path / "ck"), params)
  with pytest.raises(FileExistsError, match="force=True"):
    checkpoint.save(tmp_path / "ck", params)
  checkpoint.save(tmp_path / "ck", {"a": jnp.ones(2)}, force=True)
  _assert_same(checkpoint.restore(tmp_path / "ck"), {"a": jnp.ones(2)})


def test_disk_size_reflects_packing(tmp_path):
  params = _params(d=512, n=4)
  x = jnp.ones((2, 512), jnp.bfloat16)
  qf = quantize_function(_mlp, [QuantRule(".*/w", weight=lb.QuantSpec(
      "int4", group_size=64, scale_dtype="bfloat16"))], mode="real")
  qp = qf.quantize_params(params, x)
  checkpoint.save(tmp_path / "bf16", params)
  checkpoint.save(tmp_path / "int4", qp)
  bf16 = checkpoint.disk_bytes(tmp_path / "bf16")
  int4 = checkpoint.disk_bytes(tmp_path / "int4")
  w_bf16 = 4 * 512 * 512 * 2
  w_int4 = sum(l["w"].nbytes for l in qp["layers"])
  assert w_int4 == w_bf16 // 4 + 4 * 512 * 8 * 2   # codes + bf16 scale per 64
  assert int4 < 0.4 * bf16, (int4, bf16)
  assert int4 < 1.1 * w_int4 + 64 * 1024, (int4, w_int4)
  restored = checkpoint.restore(tmp_path / "int4")
  _assert_same(restored, qp)
  np.testing.assert_array_equal(qf(restored, x), qf(qp, x))


def test_restore_onto_a_new_mesh(tmp_path):
  params = _params(d=64, n=2, dtype=jnp.float32)
  qf = quantize_function(_mlp, [QuantRule(".*/w", weight="int8")], mode="real")
  x = jax.random.normal(jax.random.key(2), (8, 64))
  mesh4 = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
  qp = jax.device_put(qf.quantize_params(params, x), NamedSharding(mesh4, P()))
  checkpoint.save(tmp_path / "q", qp)
  mesh8 = jax.make_mesh((8,), ("model",))

  def shard(path, shape, dtype):
    del dtype
    if path.endswith("/codes"):
      return NamedSharding(mesh8, P("model", None))
    return NamedSharding(mesh8, P())
  r = checkpoint.restore(tmp_path / "q", sharding=shard)
  codes = r["layers"][0]["w"].codes
  assert codes.sharding == NamedSharding(mesh8, P("model", None))
  assert len(codes.addressable_shards) == 8
  _assert_same(r, qp)
  # Sharded codes change the summation order only.
  np.testing.assert_allclose(jax.jit(qf)(r, x), qf(qp, x), rtol=1e-5, atol=1e-5)
  r2 = checkpoint.restore(tmp_path / "q", sharding=NamedSharding(mesh8, P()))
  assert r2["layers"][1]["b"].sharding.mesh == mesh8


def test_restore_into_a_target_structure(tmp_path):
  params = flax.core.freeze({"a": {"w": _q(jnp.ones((4, 8)), "int8", axis=0)},
                             "b": jnp.arange(4.0)})
  with pytest.raises(TypeError, match="FrozenDict"):
    checkpoint.save(tmp_path / "x", params)
  checkpoint.save(tmp_path / "x", flax.core.unfreeze(params))
  r = checkpoint.restore(tmp_path / "x", target=params)
  assert isinstance(r, flax.core.FrozenDict)
  _assert_same(flax.core.unfreeze(r), flax.core.unfreeze(params))
  with pytest.raises(ValueError, match="does not have the saved paths"):
    checkpoint.restore(tmp_path / "x", target={"b": jnp.zeros(4)})
  with pytest.raises(ValueError, match="not a lowbit_jax checkpoint"):
    checkpoint.restore(tmp_path)
