"""apply_ptq(..., "omniquant") on a pre-norm model of two blocks: LWC + LET learned
block by block, lower block error than RTN, real mode equal to the result."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.algorithms import OmniQuantOptions
from lowbit_jax.flax import apply_ptq, quantize_linen


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, scale):
    h = nn.LayerNorm(name="ln")(x)
    h = nn.Dense(64, name="fc1")(h)
    return x + scale * nn.Dense(x.shape[-1], name="fc2")(jax.nn.gelu(h))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = _Block(name=f"blocks_{i}")(x, 0.5)
    return nn.Dense(8, name="head")(x)


def net_and_params():
  """``(model, params, x, held)``: the model, heavy-tailed weights, an input
  batch with outlier channels and a held-out batch like it."""
  rng = np.random.default_rng(0)
  gain = np.exp(rng.normal(0, 1.0, 32)).astype(np.float32)   # outlier channels
  x = jnp.asarray(rng.standard_normal((12, 8, 32)).astype(np.float32) * gain)
  m = _Net()
  # Heavy-tailed weights and non-zero biases, as trained layers have (drawn
  # in numpy on the model's parameter shapes: nothing to compile).
  shapes = jax.eval_shape(m.init, jax.random.key(1), x)["params"]
  params = jax.tree.map(
      lambda a: jnp.asarray((rng.standard_t(3.0, a.shape) / np.sqrt(a.shape[0])
                             if len(a.shape) == 2 else 1.0 + 0.1 * rng.standard_normal(
                                 a.shape)).astype(np.float32)), shapes)
  held = jnp.asarray(rng.standard_normal((12, 8, 32)).astype(np.float32) * gain)
  return m, params, x, held


@pytest.fixture(scope="module")
def setup():
  return net_and_params()[:3]


W_SPEC = QuantSpec("int4", group_size=16)


def test_omniquant_lwc_let_lowers_block_error_and_repacks_exactly(setup):
  m, params, x = setup
  # LET on for weight-only too (by default it runs with activation
  # quantization only, as the paper); activation quantization would only add
  # compile time here.
  opts = OmniQuantOptions(steps=20, batch_size=6, lwc_lr=0.05, let=True,
                          blocks=r"blocks_\d+")
  qp, rep = apply_ptq(m, params, [x], "omniquant", W_SPEC, omniquant=opts)
  assert rep["method"] == "omniquant" and rep["omniquant"]["let"]
  assert list(rep["blocks"]) == ["blocks_0", "blocks_1"]
  for b in rep["blocks"].values():   # the error it optimises, vs RTN's
    assert b["loss"] < b["loss_rtn"], rep["blocks"]
    assert b["let_groups"] == 1
  # LET: the LayerNorm -> fc1 group, with a shift (both sides have biases);
  # fc2 reads a GELU, which nothing folds into.
  learned = [f for f in rep["folds"] if f["status"] == "learned"]
  assert [f["producer"] for f in learned] == ["blocks_0/ln", "blocks_1/ln"]
  assert all(f["shift"] for f in learned)
  assert not np.allclose(qp["blocks_0"]["ln"]["scale"], params["blocks_0"]["ln"]["scale"])
  assert rep["layers"]["head"]["transform"] == "none"   # outside the blocks: RTN
  assert rep["layers"]["blocks_0/fc1"]["fold"] == "let"
  # Real mode with the learned steps stores exactly the returned kernels.
  q = quantize_linen([QuantRule(".*", weight=W_SPEC)], mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  for path in ("blocks_0/fc1", "blocks_0/fc2", "blocks_1/fc1", "blocks_1/fc2", "head"):
    a, b = qv["params"], qp
    for part in path.split("/"):
      a, b = a[part], b[part]
    np.testing.assert_array_equal(a["kernel"].logical(), b["kernel"])


def test_omniquant_errors(setup):
  m, params, x = setup
  with pytest.raises(ValueError, match="no module path matched"):
    apply_ptq(m, params, [x], "omniquant", W_SPEC,
              omniquant=OmniQuantOptions(blocks="nothing_\\d+", steps=1))
  with pytest.raises(ValueError, match="apply to method='omniquant'"):
    apply_ptq(m, params, [x], "awq", W_SPEC, omniquant=OmniQuantOptions())
  with pytest.raises(TypeError, match="OmniQuantOptions"):
    apply_ptq(m, params, [x], "omniquant", W_SPEC, omniquant={"steps": 3})
  with pytest.raises(ValueError, match="give weight_spec"):
    apply_ptq(m, params, [x], "omniquant", None)
  with pytest.raises(ValueError, match="awq_clip applies to method='awq'"):
    apply_ptq(m, params, [x], "gptq", W_SPEC, awq_clip=False)


def test_a_block_that_ends_above_rtn_is_rounded_to_nearest(setup, monkeypatch):
  # OmniQuant trains from LET's start, not from RTN, and can end above RTN's
  # block loss: that block is then rounded to nearest, and the report says so.
  from lowbit_jax.algorithms import rtn  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import _omniquant  # pylint: disable=g-import-not-at-top
  m, params, x = setup
  orig = _omniquant.omniquant_block

  def worse(*a, **k):
    res = orig(*a, **k)
    return res._replace(loss=res.loss_rtn * 2)
  monkeypatch.setattr(_omniquant, "omniquant_block", worse)
  opts = OmniQuantOptions(steps=2, batch_size=6, let=True, blocks=r"blocks_\d+")
  qp, rep = apply_ptq(m, params, [x], "omniquant", W_SPEC, omniquant=opts)
  assert all(b["rtn_fallback"] for b in rep["blocks"].values())
  lets = [f for f in rep["folds"] if f["producer"] in ("blocks_0/ln", "blocks_1/ln")]
  assert lets and all(f["status"] == "discarded" for f in lets)
  entry = rep["layers"]["blocks_0/fc1"]
  assert entry["transform"] == "rtn_fallback" and "above RTN" in entry["reason"]
  np.testing.assert_array_equal(qp["blocks_0"]["fc1"]["kernel"],
                                rtn(params["blocks_0"]["fc1"]["kernel"], W_SPEC))
  np.testing.assert_array_equal(qp["blocks_0"]["ln"]["scale"],
                                params["blocks_0"]["ln"]["scale"])   # no LET fold
  q = quantize_linen([QuantRule(".*", weight=W_SPEC)], mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  np.testing.assert_array_equal(qv["params"]["blocks_0"]["fc1"]["kernel"].logical(),
                                qp["blocks_0"]["fc1"]["kernel"])
