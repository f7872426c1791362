"""Orbax checkpoints of quantized params: bit-exact, packed on disk, any mesh."""
import json

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
  # A sharding that does not fit a leaf is the caller's error, named as such
  # (not reported as a damaged checkpoint).
  with pytest.raises(ValueError, match=r"the sharding given for 'layers/0/b' "
                     r"\(shape \(64,\)\) does not fit"):
    checkpoint.restore(tmp_path / "q", sharding=NamedSharding(
        jax.make_mesh((8,), ("x",)), P(None, "x")))


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


def test_custom_formats_restore_from_their_fields_and_a_redefined_name_is_refused(
    tmp_path, monkeypatch):
  from lowbit_jax.formats import _registry  # pylint: disable=g-import-not-at-top
  fmts = lb.formats
  lut = fmts.LookupFormat((-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0), name="ck_lut")
  blk = fmts.BlockFormat(fmts.get("e3m2"), "e8m0", 16, name="ck_mx6")
  monkeypatch.setitem(_registry._REGISTRY, "ck_lut", lut)
  monkeypatch.setitem(_registry._REGISTRY, "ck_mx6", blk)
  x = jax.random.normal(jax.random.key(3), (32, 64))
  tree = {"lut": lb.quantize(x, lb.QuantSpec("ck_lut", axis=-1, group_size=16)),
          "blk": lb.quantize(x, lb.QuantSpec("ck_mx6", axis=-1))}
  checkpoint.save(tmp_path / "c", tree)
  # Not registered in the restoring process: the stored fields rebuild them.
  monkeypatch.delitem(_registry._REGISTRY, "ck_lut")
  monkeypatch.delitem(_registry._REGISTRY, "ck_mx6")
  back = checkpoint.restore(tmp_path / "c")
  _assert_same(back, tree)
  for k in tree:
    np.testing.assert_array_equal(np.asarray(back[k].dequantize()),
                                  np.asarray(tree[k].dequantize()))
  # The name means another format here: its codes would decode to other values.
  other = fmts.LookupFormat((-3.0, -2.0, -1.0, 0.0, 0.25, 0.5, 0.75, 1.0),
                            name="ck_lut")
  monkeypatch.setitem(_registry._REGISTRY, "ck_lut", other)
  with pytest.raises(checkpoint.FormatMismatchError,
                     match=r"leaf 'lut': .*'ck_lut'.* differs from the format "
                     r"registered as 'ck_lut'"):
    checkpoint.restore(tmp_path / "c")
  # Version 2 stored the name alone: restored where registered, else told so.
  monkeypatch.setitem(_registry._REGISTRY, "ck_lut", lut)
  meta_path = tmp_path / "c" / "lowbit_jax.json"
  meta = json.loads(meta_path.read_text())
  meta["version"] = 2
  for m in meta["leaves"]:
    m["spec"]["format"] = {"format": m["spec"]["format"]["format"]}
  meta["sha256"] = checkpoint._meta_digest(meta)  # pylint: disable=protected-access
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(checkpoint.FormatMismatchError,
                     match="'ck_mx6', which is not registered in this process"):
    checkpoint.restore(tmp_path / "c")
  monkeypatch.setitem(_registry._REGISTRY, "ck_mx6", blk)
  _assert_same(checkpoint.restore(tmp_path / "c"), tree)


def test_keys_empty_arrays_and_empty_trees_round_trip(tmp_path):
  keys = jax.random.split(jax.random.key(1, impl="rbg"), 3)
  tree = {"key": jax.random.key(0), "keys": keys,
          "empty": jnp.zeros((0, 4), jnp.bfloat16), "w": jnp.arange(3.0),
          "nothing": {"a": {}, "b": [], "c": None}}
  checkpoint.save(tmp_path / "t", tree)
  back = checkpoint.restore(tmp_path / "t")
  assert jax.random.key_impl(back["keys"]) == jax.random.key_impl(keys)
  for k in ("key", "keys"):
    assert back[k].dtype == tree[k].dtype
    np.testing.assert_array_equal(jax.random.key_data(back[k]),
                                  jax.random.key_data(tree[k]))
  np.testing.assert_array_equal(jax.random.normal(back["keys"][1], (4,)),
                                jax.random.normal(keys[1], (4,)))
  assert back["empty"].shape == (0, 4) and back["empty"].dtype == jnp.bfloat16
  assert back["nothing"] == {"a": {}, "b": [], "c": None}
  for i, t in enumerate([{}, None, {"e": jnp.zeros((0,), jnp.int8)}]):
    checkpoint.save(tmp_path / f"e{i}", t)
    r = checkpoint.restore(tmp_path / f"e{i}")
    assert jax.tree.structure(r) == jax.tree.structure(t)
    assert [x.shape for x in jax.tree.leaves(r)] == [x.shape for x in jax.tree.leaves(t)]


def test_numpy_64_bit_arrays_are_refused_not_narrowed(tmp_path):
  for a in (np.array([2**40 + 1]), np.array([1.0000000001]),
            np.array([2**63], np.uint64)):
    with pytest.raises(ValueError, match=r"leaf 'p/a' is a numpy \w+64 array.*"
                       r"x\.astype\(np\.\w+32\)"):
      checkpoint.save(tmp_path / "n", {"p": {"a": a}})
    assert not (tmp_path / "n").exists()
  checkpoint.save(tmp_path / "n", {"p": {"a": np.array([1.5], np.float32)}})
  assert checkpoint.restore(tmp_path / "n")["p"]["a"].dtype == jnp.float32


def test_64_bit_checkpoints_need_x64_to_restore(tmp_path):
  # Without x64 they would come back narrowed (2**40 + 3 as 3) or be called
  # damaged; either is wrong: the error says to enable x64.
  jax.config.update("jax_enable_x64", True)
  try:
    tree = {"step": jnp.asarray(2**40 + 3, jnp.int64),
            "f": jnp.asarray([1 + 1e-12], jnp.float64)}
    checkpoint.save(tmp_path / "x", tree)
    assert int(checkpoint.restore(tmp_path / "x")["step"]) == 2**40 + 3
  finally:
    jax.config.update("jax_enable_x64", False)
  for verify in (True, False):
    with pytest.raises(ValueError, match=r"64-bit arrays \(f \(float64\), step "
                       r"\(int64\)\).*jax_enable_x64"):
      checkpoint.restore(tmp_path / "x", verify=verify)


def test_sub_byte_dtypes_round_trip_bit_exact(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tree = {}
  for name in ("int4", "uint4", "int2", "uint2", "float4_e2m1fn"):
    dt = np.dtype(getattr(ml_dtypes, name))
    bits = 2 if name.endswith("2") else 4
    codes = rng.integers(0, 2**bits, (3, 5), dtype=np.uint8)
    if name.startswith("float"):
      tree[name] = jax.lax.bitcast_convert_type(jnp.asarray(codes).astype(jnp.uint4),
                                                dt)
    else:
      tree[name] = jnp.asarray(codes.astype(np.int64) - (2**(bits - 1) if
                                                         name.startswith("int")
                                                         else 0)).astype(dt)
  checkpoint.save(tmp_path / "s", tree)
  _assert_same(checkpoint.restore(tmp_path / "s"), tree)


def test_bad_trees_name_the_leaf_and_targets_must_match_shapes(tmp_path):
  import optax  # pylint: disable=g-import-not-at-top
  opt = optax.adam(1e-3).init({"w": jnp.ones((4, 4))})
  with pytest.raises(TypeError, match=r"leaf 'opt/0' is a ScaleByAdamState; .*"
                     "flax.serialization.to_state_dict"):
    checkpoint.save(tmp_path / "o", {"opt": opt})
  checkpoint.save(tmp_path / "o", {"opt": flax.serialization.to_state_dict(opt)})
  back = checkpoint.restore(tmp_path / "o", target={"opt": opt})
  assert jax.tree.structure(back["opt"]) == jax.tree.structure(opt)
  with pytest.raises(TypeError, match=r"leaf 'a/1' is a float; only arrays"):
    checkpoint.save(tmp_path / "f", {"a": [jnp.ones(1), 1.0]})
  with pytest.raises(ValueError, match="two leaves have the path 'a/b'"):
    checkpoint.save(tmp_path / "c", {"a/b": jnp.ones(1), "a": {"b": jnp.zeros(1)}})
  checkpoint.save(tmp_path / "s", {"w": jnp.ones((2, 2)), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"'w' \(saved \(2, 2\), target \(5,\)\)"):
    checkpoint.restore(tmp_path / "s", target={"w": jnp.zeros(5), "b": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"dtypes differ.*'b' \(saved float32, target "
                     r"bfloat16\)"):
    checkpoint.restore(tmp_path / "s", target={"w": jnp.zeros((2, 2)),
                                               "b": jnp.zeros(3, jnp.bfloat16)})


def test_restore_onto_an_nnx_state(tmp_path):
  # save() takes the state's pure dict; restore(target=) gives the state back
  # (its leaves sit under each Variable's "value").
  from flax import nnx  # pylint: disable=g-import-not-at-top
  m = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  m.kernel.set_value(_q(m.kernel.get_value(), "int4", axis=0, group_size=8))
  st = nnx.state(m)
  checkpoint.save(tmp_path / "c", nnx.to_pure_dict(st))
  back = checkpoint.restore(tmp_path / "c", target=st)
  assert type(back) is type(st)
  _assert_same(nnx.to_pure_dict(back), nnx.to_pure_dict(st))


def test_restore_onto_an_nnx_state_with_static_ranges(tmp_path):
  # A calibrated range is a Variable holding a dict: its leaves sit at
  # ".../stats/value/amax" in the state, ".../stats/amax" in the pure dict
  # (restore(target=) named them missing).
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import finalize_nnx, quantize_nnx  # pylint: disable=g-import-not-at-top
  rules = [QuantRule(".*", weight="int8", activation="int8", static=True)]
  m = quantize_nnx(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rules, mode="calibrate")
  x = jax.random.normal(jax.random.key(1), (4, 16))
  m(x)
  m = finalize_nnx(quantize_nnx(m, rules, mode="real"))
  graph, st = nnx.split(m)
  checkpoint.save(tmp_path / "c", nnx.to_pure_dict(st))
  back = checkpoint.restore(tmp_path / "c", target=st)
  np.testing.assert_array_equal(nnx.merge(graph, back)(x), m(x))


def test_restore_onto_an_nnx_state_with_a_module_named_value(tmp_path):
  # nnx.MultiHeadAttention's "value" projection: only each Variable's own
  # "value" segment maps onto the pure dict's path.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  m = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
  st = nnx.state(m)
  checkpoint.save(tmp_path / "c", nnx.to_pure_dict(st))
  back = checkpoint.restore(tmp_path / "c", target=st)
  _assert_same(nnx.to_pure_dict(back), nnx.to_pure_dict(st))


def test_stacked_qarrays_round_trip_and_mismatched_ones_are_refused_at_save(tmp_path):
  # Per-layer QArrays stacked for a lax.scan saved fine and restore called
  # the checkpoint damaged; a QArray whose codes a tree.map cast was written
  # and only refused at restore.
  w = jax.random.normal(jax.random.key(0), (3, 64, 16))
  spec = lb.QuantSpec("int4", axis=0, group_size=32)
  stacked = jax.vmap(lambda v: lb.quantize(v, spec))(w)
  checkpoint.save(str(tmp_path / "s"), {"layers": stacked})
  back = checkpoint.restore(str(tmp_path / "s"))["layers"]
  for f in ("codes", "scale"):
    np.testing.assert_array_equal(np.asarray(getattr(back, f)),
                                  np.asarray(getattr(stacked, f)))
  # A stochastically rounded QArray (its shapes are nearest rounding's).
  sto = lb.quantize(w[0], spec.replace(rounding="stochastic"), key=jax.random.key(1))
  checkpoint.save(str(tmp_path / "r"), {"q": sto})
  np.testing.assert_array_equal(np.asarray(lb.dequantize(
      checkpoint.restore(str(tmp_path / "r"))["q"])), np.asarray(lb.dequantize(sto)))
  cast = jax.tree.map(lambda a: a.astype(jnp.float32), lb.quantize(w[0], spec))
  with pytest.raises(ValueError, match="save: QArray 'q' holds codes as"):
    checkpoint.save(str(tmp_path / "c"), {"q": cast})
  assert not (tmp_path / "c").exists()


def test_a_custom_format_named_like_a_bare_float_restores_unregistered(
    tmp_path, monkeypatch):
  # Saved as "e2m4" with bias 3: restoring where nothing registers "e2m4" was
  # refused as differing from the on-demand e2m4 (bias 1), though the saved
  # fields define it.
  from lowbit_jax.formats import _registry  # pylint: disable=g-import-not-at-top
  f = lb.formats.FloatFormat(2, 4, bias=3, name="e2m4")
  monkeypatch.setitem(_registry._REGISTRY, "e2m4", f)
  x = jax.random.normal(jax.random.key(0), (8, 32))
  q = lb.quantize(x, lb.QuantSpec("e2m4", axis=-1))
  checkpoint.save(tmp_path / "c", {"q": q})
  monkeypatch.delitem(_registry._REGISTRY, "e2m4")
  back = checkpoint.restore(tmp_path / "c")["q"]
  assert back.spec.format == f
  np.testing.assert_array_equal(back.dequantize(), q.dequantize())
