"""PTQ on extreme or broken input: exact real mode, clear errors, no hangs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax._rules import logical_value
from lowbit_jax.algorithms import mixed_precision as mp
from lowbit_jax.algorithms.gptq import gptq
from lowbit_jax.flax import apply_ptq


def _fn(p, x):
  return x @ p["w"]


def _wx(dtype=jnp.float32):
  rng = np.random.RandomState(0)
  return (jnp.asarray(rng.randn(16, 8), dtype), jnp.asarray(rng.randn(32, 16), dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_asymmetric_rtn_is_stored_exactly_in_real_mode(dtype):
  # Real mode took the ranges again from the rounded weight, whose block ends
  # moved: 30 of 128 entries stored differently (0.0078 apart in bfloat16).
  w, x = _wx(dtype)
  rules = [lb.QuantRule("w", weight=lb.QuantSpec("int4", group_size=8, symmetric=False))]
  res = lb.ptq_params(_fn, {"w": w}, [x], rules, method="rtn")
  assert list(res.weight_scales) == ["w"]
  real = lb.quantize_function(_fn, rules, mode="real").quantize_params(
      res.params, x, **lb.real_mode_kwargs(res, "function"))
  np.testing.assert_array_equal(np.asarray(logical_value(real["w"]), np.float32),
                                np.asarray(res.params["w"], np.float32))


def test_gptq_takes_a_constant_block_and_refuses_non_finite_weights():
  # A constant output column under an asymmetric spec was a zero-width static
  # range to core: NaN, reported as a Hessian that could not be factorized.
  w, x = _wx()
  w = w.at[:, 3].set(0.5)
  asym = lb.QuantSpec("int8", symmetric=False)
  rtn = lb.fake_quant(w, asym.replace(axis=0))
  np.testing.assert_array_equal(np.asarray(gptq(w, jnp.eye(16), asym).weight),
                                np.asarray(rtn))   # an identity Hessian: RTN
  res = lb.ptq_params(_fn, {"w": w}, [x], [lb.QuantRule("w", weight=asym)])
  np.testing.assert_array_equal(np.asarray(res.params["w"][:, 3]), 0.5)
  # A NaN or inf weight was blamed on group_size, or came back as NaN.
  for bad in (jnp.nan, jnp.inf):
    for method, spec in (("rtn", asym), ("gptq", lb.QuantSpec("int4", group_size=8))):
      with pytest.raises(ValueError, match="w: the weight holds 1 NaN or inf"):
        lb.ptq_params(_fn, {"w": w.at[0, 0].set(bad)}, [x],
                      [lb.QuantRule("w", weight=spec)], method=method)


def test_mixed_precision_on_large_weights_neither_overflows_nor_hangs():
  # Weights near 1e20 overflowed the float32 sensitivity to inf/NaN: the DP
  # crashed on None and greedy looped forever on a NaN gain.
  rng = np.random.RandomState(0)
  p = {"a": jnp.asarray(rng.randn(16, 16), jnp.float32),
       "b": jnp.asarray(rng.randn(16, 8) * 1e20, jnp.float32)}
  x = jnp.asarray(rng.randn(32, 16), jnp.float32)

  def fn(p, x):
    return (x @ p["a"]) @ p["b"]

  cap = lb.capture_hessians(fn, p, [x], [lb.QuantRule("a|b", weight="int8")])
  cands = {"int4": lb.QuantSpec("int4", group_size=8), "int8": "int8", "float": None}
  for method in ("dp", "greedy"):
    _, alloc = lb.mixed_precision_rules(fn, p, cap, cands, 10.0, method=method)
    assert np.isfinite(alloc.cost) and alloc.avg_bits <= 10.0
  # What the sensitivity computes in pieces equals the float64 trace.
  st = cap.stats["b"]
  got = mp.weight_sensitivity(p["b"] * 1e-20, st.hessian, {"int8": "int8"})["int8"]
  big = mp.weight_sensitivity(p["b"], st.hessian, {"int8": "int8"})["int8"]
  np.testing.assert_allclose(big, got * 1e40, rtol=1e-4)
  # NaN costs are refused, +inf forbids a candidate, and greedy always ends.
  sizes, bits = {"a": 10, "b": 10}, {"int4": 4.0, "int8": 8.0, "f": 16.0}
  with pytest.raises(ValueError, match=r"layer 'b': the cost of \['int8'\] is NaN"):
    mp.allocate_bits({"a": {"int4": 1.0, "f": 0.0},
                      "b": {"int4": 5.0, "int8": float("nan"), "f": 0.0}},
                     sizes, bits, 8.0, method="greedy")
  inf = float("inf")
  with pytest.raises(ValueError, match="no assignment of finite cost fits"):
    mp.allocate_bits({"a": {"int4": 1.0, "f": 0.0}, "b": {"int4": inf, "int8": inf, "f": 0.0}},
                     sizes, bits, 8.0, method="greedy")
  alloc = mp.allocate_bits({"a": {"int4": 1.0, "f": 0.0},
                            "b": {"int4": inf, "int8": 2.0, "f": 0.0}},
                           sizes, bits, 8.0, method="greedy")
  assert alloc.assignment == {"a": "int4", "b": "int8"}


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16, use_bias=False, name="a")(nn.LayerNorm(name="ln")(x))
    return nn.Dense(8, use_bias=False, name="b")(jax.nn.relu(h))


def test_apply_ptq_refuses_calibration_data_that_is_not_finite():
  # capture_dense_stats took them: every layer fell back to RTN silently and
  # the fold's reason blamed a residual connection.
  _, x = _wx()
  params = _Block().init(jax.random.key(0), x)["params"]
  for bad in (jnp.nan, jnp.inf):
    with pytest.raises(ValueError, match=r"calibration inputs of \['a', 'b'\] are "
                       "not finite"):
      apply_ptq(_Block(), params, [x.at[3, 5].set(bad)], "awq",
                lb.QuantSpec("int4", group_size=8))
