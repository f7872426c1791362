"""PTQ results carry their scales: real mode reproduces the fake-quantized kernels."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.flax import apply_ptq, quantize_linen


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(128, name="a")(nn.RMSNorm(name="norm")(x))
    return nn.Dense(64, name="b")(jax.nn.gelu(h))


@pytest.fixture(scope="module")
def setup():
  m = _MLP()
  x = jax.random.normal(jax.random.key(0), (64, 96)) * jnp.linspace(0.1, 4, 96)
  return m, m.init(jax.random.key(1), x)["params"], x


@pytest.mark.parametrize("method,fmt", [("gptq", "int4"), ("smoothquant", "int4"),
                                        ("awq", "int4"), ("gptq", "nvfp4"),
                                        ("awq", "nvfp4")])
def test_real_mode_equals_ptq_result(setup, method, fmt):
  m, params, x = setup
  # NVFP4: its block scales are stored under the tensor scale GPTQ rounded
  # with (quant_scales' weight_tensor_scale), not one rebuilt from them.
  spec = QuantSpec("int4", group_size=32) if fmt == "int4" else QuantSpec("nvfp4")
  qp, rep = apply_ptq(m, params, [x], method, spec)
  for layer in ("a", "b"):
    assert ("weight_tensor_scale" in rep["quant_scales"][layer]) == (fmt == "nvfp4")
  if method == "awq":   # the clip search ran and its ranges are what is stored
    assert all(0.5 <= rep["layers"][p]["clip_mean_ratio"] <= 1.0 for p in ("a", "b"))
    assert rep["layers"]["b"]["clip_error_vs_rtn"] <= 1.02
  assert set(rep["quant_scales"]) == {"a", "b"}
  q = quantize_linen([QuantRule(".*", weight=spec)], mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  for layer in ("a", "b"):   # the stored codes give back the PTQ kernel exactly
    np.testing.assert_array_equal(qv["params"][layer]["kernel"].logical(),
                                  qp[layer]["kernel"])
  np.testing.assert_array_equal(q(m.apply)(qv, x), m.apply({"params": qp}, x))
  if method == "gptq":   # re-deriving the scales from the kernel changes codes
    qv2 = q.quantize_params(m, {"params": qp}, x)
    assert np.any(np.asarray(qv2["params"]["a"]["kernel"].logical())
                  != np.asarray(qp["a"]["kernel"]))


def test_quant_rules_as_weight_spec(setup):
  """QuantRules (e.g. from assignment_to_rules) select and spec the kernels."""
  m, params, x = setup
  qp, rep = apply_ptq(m, params, [x], "rtn", [QuantRule("a", weight="int4"),
                                              QuantRule(".*")])
  assert rep["layers"]["a"]["spec"] == "int4_axis0"
  assert rep["layers"]["b"]["spec"] is None
  np.testing.assert_array_equal(qp["b"]["kernel"], params["b"]["kernel"])
  assert len(np.unique(np.asarray(qp["a"]["kernel"])[:, 0])) <= 16


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_asymmetric_gptq_is_stored_exactly_by_every_driver_path(method):
  # Every apply_ptq path that rounds with GPTQ hands real mode its asymmetric
  # ranges as (scale, zero point) pairs; re-derived ranges changed up to a
  # fifth of the codes.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(48, use_bias=False, name="a")(nn.LayerNorm(name="ln")(x))
      return nn.Dense(40, use_bias=False, name="b")(jax.nn.relu(h))

  m = M()
  v = m.init(jax.random.key(0), x)
  spec = QuantSpec("int4", symmetric=False, group_size=16)
  kw = {} if method == "gptq" else {"quantizer": "gptq"}
  qp, rep = apply_ptq(m, v["params"], [x], method, spec, **kw)
  q = quantize_linen([QuantRule(".*/kernel", weight=spec)], mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  for layer in "ab":
    np.testing.assert_array_equal(np.asarray(qv["params"][layer]["kernel"].logical()),
                                  np.asarray(qp[layer]["kernel"]))
