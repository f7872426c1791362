"""The same rules give the same quantized numbers on Linen, NNX and a function."""
import jax
import numpy as np
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax._function import quantize_function
from lowbit_jax._rules import QuantRule
from lowbit_jax.flax import quantize_linen, quantize_nnx
from tests import _toy_models as toy

RULE_SETS = {
    "w8a8_head_fp": [QuantRule("head"),
                     QuantRule(".*", weight="int8", activation="int8")],
    "w4g16_a_fp8": [QuantRule(".*/conv", weight="int8"),
                    QuantRule(".*", weight=lb.QuantSpec("int4", group_size=16),
                              activation="fp8_e4m3", ops=("dot_general", "einsum"))],
}


@pytest.fixture(scope="module")
def setup():
  model, v = toy.init_linen()
  return model, v, toy.tokens()


def _three(model, v, t, rules, mode, stats=None):
  """Outputs of the Linen, NNX and function paths (params quantized per path)."""
  ql = quantize_linen(rules, mode=mode)
  qf = quantize_function(toy.toy_apply, rules, mode=mode)
  lv, fp = v, v["params"]
  if mode == "real":
    lv = ql.quantize_params(model, v, t)
    fp = qf.quantize_params(v["params"], t)
  if stats is not None:
    lv = {**lv, "quant_stats": stats["linen"]}
  a = jax.jit(ql(model.apply))(lv, t)
  b = qf(fp, t, quant_stats=None if stats is None else stats["function"])
  nm = toy.nnx_from_linen(v["params"])
  if stats is not None:
    nm = stats["nnx"]
  qn = quantize_nnx(nm, rules, mode=mode)
  c = nnx.jit(lambda m, t: m(t))(qn, t)
  return a, b, c


@pytest.mark.parametrize("name", sorted(RULE_SETS))
def test_fake_and_real_identical_across_paths(setup, name):
  model, v, t = setup
  rules = RULE_SETS[name]
  a, b, c = _three(model, v, t, rules, "fake")
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  assert not np.allclose(a, jax.jit(model.apply)(v, t), atol=1e-3)
  ra, rb, rc = _three(model, v, t, rules, "real")
  np.testing.assert_array_equal(ra, rb)
  np.testing.assert_array_equal(ra, rc)
  # Real quantization equals fake quantization to float rounding.
  np.testing.assert_allclose(ra, a, rtol=1e-5, atol=2e-5)


def test_static_calibrated_identical_across_paths(setup):
  model, v, _ = setup
  rules = [QuantRule(".*/(q|k|v|up|down)", weight="int8", activation="int8",
                     static=True)]
  batches = [toy.tokens(s) for s in range(2)]
  cal_l = quantize_linen(rules, mode="calibrate")
  cal_f = quantize_function(toy.toy_apply, rules, mode="calibrate")
  nm = quantize_nnx(toy.nnx_from_linen(v["params"]), rules, mode="calibrate")
  step_l = jax.jit(lambda v, t: cal_l(model.apply)(v, t, mutable=["quant_stats"]))
  sl, sf = {}, None
  for t in batches:
    _, upd = step_l({**v, "quant_stats": sl}, t)
    sl = upd["quant_stats"]
    _, sf = cal_f(v["params"], t, quant_stats=sf)
    nnx.jit(lambda m, t: m(t))(nm, t)
  for key, st in sf.items():
    layer = key.split("/")[:-1]
    np.testing.assert_array_equal(sl[layer[0]][layer[1]]["act"]["max"], st["max"])
  np.testing.assert_array_equal(
      sf["layers_1/down/kernel"]["max"],
      nm.layers_1.down.dot_general.stats.get_value()["max"])
  a, b, c = _three(model, v, batches[0], rules, "fake",
                   stats={"linen": sl, "function": sf, "nnx": nm})
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
