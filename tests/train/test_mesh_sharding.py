"""Mesh strings, sharding rules and block-aware layouts of quantized arrays."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lowbit_jax import train
from lowbit_jax._rules import plan_weight, quantize_weight
from lowbit_jax.core import QuantSpec, dequantize, quantize
from lowbit_jax.models.llama import Llama, LlamaConfig

from tests.train._helpers import tiny_config


def test_mesh_strings():
  assert train.parse_mesh("") == {"data": 8, "fsdp": 1, "tensor": 1}
  sizes = train.parse_mesh("tensor:2, data:4")
  assert list(sizes) == ["tensor", "data", "fsdp"] and sizes["tensor"] == 2
  mesh = train.make_mesh("data:2,fsdp:2,tensor:2")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert train.make_mesh("fsdp:4").size == 4
  assert train.mesh_string(train.make_mesh("fsdp:4")) == "fsdp:4"
  assert train.batch_size_multiple(mesh) == 4
  for bad, match in [("model:2", "axes from"), ("data:2,data:2", "twice"),
                     ("data:0", "positive integer"), ("data:x", "positive integer"),
                     ("data", "axis:size"), ("data:4,tensor:4", "needs 16 devices")]:
    with pytest.raises(ValueError, match=match):
      train.make_mesh(bad)
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    train.shard_batch(np.zeros((6, 5), np.int32), mesh)


def _partitions(layout, params):
  return {jax.tree_util.keystr(kp): s.spec for kp, s in
          jax.tree_util.tree_flatten_with_path(layout.params(params))[0]}


def test_llama_rules_megatron_and_fsdp():
  model = Llama(tiny_config(n_experts=2))
  params = jax.eval_shape(lambda k: train.init_params(model, k), jax.random.key(0))
  specs = _partitions(train.Layout(train.make_mesh("data:2,fsdp:2,tensor:2")), params)
  attn, mlp = "['layers_0']['attn']", "['layers_0']['mlp']"
  assert specs[f"{attn}['q_proj']['kernel']"] == P("fsdp", "tensor")   # column
  assert specs[f"{attn}['o_proj']['kernel']"] == P("tensor", "fsdp")   # row
  assert specs[f"{mlp}['gate_proj']['kernel']"] == P(None, "fsdp", "tensor")  # experts
  assert specs[f"{mlp}['down_proj']['kernel']"] == P(None, "tensor", "fsdp")
  assert specs["['embed']['embedding']"] == P("tensor", "fsdp")      # vocab-parallel
  assert specs["['lm_head']['kernel']"] == P("fsdp", "tensor")
  assert specs["['final_norm']['scale']"] == P()
  data_only = _partitions(train.Layout(train.make_mesh("data:8")), params)
  assert set(data_only.values()) == {P()}


def test_indivisible_layouts_name_parameter_shape_and_axis():
  model = Llama(tiny_config(d_ff=36))
  params = jax.eval_shape(lambda k: train.init_params(model, k), jax.random.key(0))
  layout = train.Layout(train.make_mesh("tensor:8"))
  with pytest.raises(ValueError, match=r"layers_0/mlp/down_proj/kernel.*\(36, 32\).*"
                     r"dim 0 \(size 36\).*'tensor' of size 8"):
    layout.params(params)
  lenient = train.Layout(train.make_mesh("tensor:8"), on_indivisible="replicate")
  specs = _partitions(lenient, params)
  assert specs["['layers_0']['mlp']['down_proj']['kernel']"] == P()
  assert specs["['layers_0']['mlp']['gate_proj']['kernel']"] == P()
  assert specs["['layers_0']['attn']['q_proj']['kernel']"] == P(None, "tensor")
  with pytest.raises(ValueError, match="names mesh axis 'expert'"):
    train.Layout(train.make_mesh("data:8"),
                 rules=[(".*", ("expert",))]).params(params)
  with pytest.raises(ValueError, match="not a valid regular expression"):
    train.Layout(train.make_mesh("data:8"), rules=[("(", ())])
  with pytest.raises(ValueError, match=r"the partition is the string 'fsdp'.*"
                     r"\('fsdp',\) shards the last dim"):
    train.Layout(train.make_mesh("fsdp:8"), rules=[(".*kernel", "fsdp")])
  with pytest.raises(ValueError, match="one of"):
    train.Layout(train.make_mesh("data:8"), on_block_split="ignore")


def _whole_blocks_per_device(q, block):
  """Each device's codes shard covers exactly its scale shard's blocks."""
  codes = {d: s.data.shape for s in q.codes.addressable_shards for d in [s.device]}
  scales = {d: s.data.shape for s in q.scale.addressable_shards for d in [s.device]}
  per_byte = 2 if q.spec.format.bits == 4 else 1
  for d in codes:
    assert codes[d][0] * per_byte == scales[d][0] * block, (codes[d], scales[d])
  return len({s.data.shape for s in q.codes.addressable_shards})


def test_quantized_moments_shard_in_whole_blocks():
  model = Llama(tiny_config(d_model=64, d_ff=128))
  mesh = train.make_mesh("fsdp:8")
  tx = train.make_optimizer(1e-2, 1, 4, state_format="4bit")
  init = lambda k: train.init_state(model, tx, k)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = train.state_shardings(abstract, train.Layout(mesh))
  mu, mu_sh = abstract.opt_state[1][0].mu, shardings.opt_state[1][0].mu
  gate_sh = mu_sh["layers_0"]["mlp"]["gate_proj"]["kernel"]   # 8192 elems, blocks 128
  assert gate_sh.codes.spec == P("fsdp") == gate_sh.scale.spec
  assert mu_sh["final_norm"]["scale"].spec == P()   # small: float32 moments
  # A real moment of that layout: every device holds 8 whole blocks.
  spec = mu["layers_0"]["mlp"]["gate_proj"]["kernel"].spec
  values = jax.random.normal(jax.random.key(1), (8192,))
  gate = jax.device_put(quantize(values, spec), gate_sh)
  assert gate.codes.addressable_shards[0].data.shape == (512,)   # 1024 codes / 2
  _whole_blocks_per_device(gate, 128)
  assert np.array_equal(np.asarray(dequantize(gate)),
                        np.asarray(dequantize(quantize(values, spec))))

  tx8 = train.make_optimizer(1e-2, 1, 4, state_format="int8")   # blocks of 2048
  abstract = jax.eval_shape(lambda k: train.init_state(model, tx8, k),
                            jax.random.key(0))
  with pytest.raises(ValueError, match=r"o_proj/kernel.*scale blocks of 2048.*"
                     r"'fsdp' of size 8.*on_block_split='replicate'"):
    train.state_shardings(abstract, train.Layout(mesh))
  lenient = train.state_shardings(abstract,
                                  train.Layout(mesh, on_block_split="replicate"))
  q = lenient.opt_state[1][0].mu["layers_0"]["attn"]["o_proj"]["kernel"]
  assert q.codes.spec == P() and q.scale.spec == P()
  two = train.state_shardings(abstract, train.Layout(train.make_mesh("fsdp:2")))
  q = two.opt_state[1][0].mu["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert q.codes.spec == P("fsdp") == q.scale.spec   # 4 blocks over 2 devices


def test_real_quantized_weights_shard_without_splitting_blocks():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  plan = plan_weight(QuantSpec("int4", group_size=16), (64, 32), "dot_general",
                     contracting=(0,))
  q = quantize_weight(w, plan)   # stored K-major: [32, 64], groups along K
  layout = train.Layout(train.make_mesh("data:2,fsdp:2,tensor:2"))
  sh = layout.param_sharding("layers_0/attn/q_proj/kernel", q)
  assert sh.codes.spec == P("tensor", "fsdp") and sh.scale.spec == P("tensor", "fsdp")
  placed = jax.device_put(q, sh)
  assert np.array_equal(np.asarray(dequantize(placed)), np.asarray(dequantize(q)))
  shard = placed.codes.addressable_shards[0].data.shape
  scale = placed.scale.addressable_shards[0].data.shape
  assert shard == (16, 16) and scale == (16, 2)   # 32 codes = 2 groups of 16
  eight = train.Layout(train.make_mesh("fsdp:8"))
  with pytest.raises(ValueError, match=r"q_proj/kernel.*splitting dim 1.*"
                     r"scale blocks of 16"):
    eight.param_sharding("layers_0/attn/q_proj/kernel", q)   # 8 elems per device
  rep = train.Layout(train.make_mesh("fsdp:8"), on_block_split="replicate")
  assert rep.param_sharding("layers_0/attn/q_proj/kernel", q).codes.spec == P()


@pytest.mark.parametrize("fmt", ["e5m3", "int8", "int3", "fp6_e2m3"])
def test_codes_of_any_width_split_along_their_pack_axis(fmt):
  # 9- to 16-bit codes are one uint16 each; packed narrower ones split in
  # whole packing units. 64 elements over fsdp:2: two groups of 16 a device.
  x = jax.random.normal(jax.random.key(0), (8, 64))
  q = quantize(x, QuantSpec(fmt, axis=1, group_size=16))
  layout = train.Layout(train.make_mesh("fsdp:2"), rules=[(".*", (None, "fsdp"))])
  sh = layout.param_sharding("w", q)
  assert sh.codes.spec == P(None, "fsdp") and sh.scale.spec == P(None, "fsdp")
  placed = jax.device_put(q, sh)
  assert placed.scale.addressable_shards[0].data.shape == (8, 2)
  np.testing.assert_array_equal(np.asarray(dequantize(placed)),
                                np.asarray(dequantize(q)))


def test_a_mesh_stands_for_its_default_layout_in_state_shardings():
  from lowbit_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  mesh = train.make_mesh("fsdp:2")
  st = state_lib.TrainState(step=jnp.zeros([], jnp.int32),
                            params={"mlp": {"up_proj": {"kernel": jnp.zeros((8, 4))}}},
                            opt_state=(), quant_scales={}, quant_state={}, rng=None)
  got = state_lib.state_shardings(st, mesh)
  want = state_lib.state_shardings(st, train.Layout(mesh))
  assert got.params == want.params
  with pytest.raises(TypeError, match="train.Layout or a jax Mesh"):
    state_lib.state_shardings(st, "fsdp:2")


def test_wgmma_ordered_codes_shard_in_whole_16_byte_runs():
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (64, 32))
  plan = plan_weight(QuantSpec("int4", group_size=16), (64, 32), "dot_general",
                     contracting=(0,))
  q = quantize_weight(w, plan)   # codes [32, 32 bytes]: two runs a row
  qw = ops.set_code_order(q, "wgmma")
  two = train.Layout(train.make_mesh("fsdp:2"))
  sh = two.param_sharding("layers_0/attn/q_proj/kernel", qw)
  assert sh.codes.spec == P(None, "fsdp")
  placed = jax.device_put(qw, sh)
  assert np.array_equal(np.asarray(dequantize(placed)), np.asarray(dequantize(q)))
  # Four devices would take 8 bytes each: whole groups of 16 in natural
  # order, but half a run of the reordered codes.
  four = train.Layout(train.make_mesh("fsdp:4"))
  assert four.param_sharding("layers_0/attn/q_proj/kernel", q).codes.spec == P(
      None, "fsdp")
  with pytest.raises(ValueError, match=r"16-byte run of 'wgmma'-ordered codes"):
    four.param_sharding("layers_0/attn/q_proj/kernel", qw)


def test_learned_scales_follow_their_weight():
  params = {"layers_0": {"mlp": {"gate_proj": {"kernel": jnp.zeros((32, 64))}}}}
  scales = {"layers_0": {"mlp": {"gate_proj": {
      "weight_scale": jnp.zeros((1, 64)), "act_scale": jnp.zeros(()),
      "grouped": jnp.zeros((4, 64))}}}}
  layout = train.Layout(train.make_mesh("fsdp:2,tensor:4"))
  sh = layout.scales(scales, params)["layers_0"]["mlp"]["gate_proj"]
  assert sh["weight_scale"].spec == P(None, "tensor")
  assert sh["act_scale"].spec == P()
  assert sh["grouped"].spec == P("fsdp", "tensor")   # 2 groups of 8 rows per device
  layout8 = train.Layout(train.make_mesh("fsdp:8"))
  sh8 = layout8.scales(scales, params)["layers_0"]["mlp"]["gate_proj"]
  assert sh8["grouped"].spec == P()   # 4 groups cannot go to 8 devices whole


def test_smoke_config_model_divides_on_the_documented_meshes():
  params = jax.eval_shape(lambda k: train.init_params(Llama(LlamaConfig.smoke()), k),
                          jax.random.key(0))
  for spec in ("data:8", "fsdp:8", "tensor:2,data:4", "data:2,fsdp:2,tensor:2"):
    train.Layout(train.make_mesh(spec)).params(params)
