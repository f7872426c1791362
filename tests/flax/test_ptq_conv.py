"""apply_ptq on nn.Conv: im2col statistics, GPTQ/RTN on the reshaped kernel, skips."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.algorithms.mixed_precision import (allocate_bits, assignment_to_rules,
                                                   weight_sensitivity)
from lowbit_jax.algorithms.rtn import kernel_spec, rtn
from lowbit_jax.flax import apply_ptq, quantize_linen
from lowbit_jax.flax._capture import capture_dense_stats, conv_patches


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    # Both convs are [48, 16] matmuls (3*2*8 and 3*1*16): GPTQ compiles once.
    h = nn.relu(nn.Conv(16, (3, 2), strides=(2, 1), name="c1")(x))
    h = nn.Conv(16, (3, 3), feature_group_count=16, name="dw")(h)   # skipped
    h = nn.relu(nn.Conv(16, (3, 1), padding="CIRCULAR", kernel_dilation=(2, 1),
                        name="c2")(h))
    return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))


_RNG = np.random.default_rng(0)


def _normal(*shape):
  """Host random numbers (compiling jax.random for each shape costs seconds)."""
  return jnp.asarray(_RNG.standard_normal(shape), jnp.float32)


def _init(m, x):
  """Random params of ``m`` (cheaper than compiling ``m.init``'s initializers)."""
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)["params"]
  return jax.tree.map(lambda l: _normal(*l.shape) / np.sqrt(np.prod(l.shape[:-1])),
                      shapes)


@pytest.fixture(scope="module")
def setup():
  m = _CNN()
  x = _normal(8, 8, 8, 8) * np.linspace(0.2, 3, 8, dtype=np.float32)
  return m, _init(m, x), x


@pytest.fixture(scope="module")
def cap(setup):
  m, params, x = setup
  return capture_dense_stats(m, params, [x])


def _layer_error(params, cap, p, wq):
  """GPTQ's objective on the patches: trace((Wq - W)^T (X^T X) (Wq - W))."""
  w = params[p]["kernel"].reshape(-1, params[p]["kernel"].shape[-1])
  d = wq.reshape(w.shape) - w
  return float(jnp.trace(d.T @ cap.stats[p].gram @ d))


@pytest.mark.parametrize("padding,strides,lhs_dil,rhs_dil", [
    ("SAME", (2, 1), (1, 1), (1, 2)), (((1, 2), (0, 1)), (1, 2), (2, 1), (1, 1))])
def test_patches_times_reshaped_kernel_is_the_conv(padding, strides, lhs_dil, rhs_dil):
  """conv_patches reorders features to kernel.reshape(-1, cout)'s (window, cin)."""
  x = _normal(2, 7, 6, 3)
  w = _normal(3, 2, 3, 5)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  y = jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, dn,
                                   precision=jax.lax.Precision.HIGHEST)
  p = conv_patches(x, w.shape, strides, padding, lhs_dil, rhs_dil, dn)
  np.testing.assert_allclose(p @ w.reshape(-1, 5), y, rtol=1e-5, atol=1e-5)


def test_capture_conv_stats(cap):
  assert cap.convs == ("c1", "c2") and set(cap.skipped) == {"dw"}
  assert "feature_group_count=16" in cap.skipped["dw"]
  assert cap.stats["c1"].gram.shape == (48, 48)   # 3*2*8
  assert cap.stats["c2"].gram.shape == (48, 48)   # 3*1*16
  assert float(cap.stats["c1"].count) == 8 * 4 * 8   # output positions
  # Zero padding rows: the SAME-padded corners have zero features.
  assert float(jnp.min(cap.stats["c1"].absmax)) > 0


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", group_size=8),
    pytest.param(QuantSpec("int4"), marks=pytest.mark.slow)])
def test_gptq_conv_real_equals_fake_and_beats_rtn(setup, cap, spec):
  m, params, x = setup
  qp, rep = apply_ptq(m, params, [x], "gptq", spec, layers="c.")
  assert set(rep["quant_scales"]) == {"c1", "c2"}
  for p in ("c1", "c2"):
    assert qp[p]["kernel"].shape == params[p]["kernel"].shape
    assert rep["layers"][p]["conv"]
    w = params[p]["kernel"]   # RTN, as apply_ptq(..., "rtn") rounds it
    w_rtn = rtn(w.reshape(-1, w.shape[-1]), kernel_spec(spec))
    assert (_layer_error(params, cap, p, qp[p]["kernel"])
            < _layer_error(params, cap, p, w_rtn)), p
  q = quantize_linen([QuantRule("c.", weight=spec)], mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  for p in ("c1", "c2"):   # the stored codes give back the PTQ kernels
    np.testing.assert_array_equal(qv["params"][p]["kernel"].logical(),
                                  qp[p]["kernel"])


def test_mixed_precision_on_conv_statistics(setup, cap):
  """Bit allocation reads a conv's patch Gram matrix; its rules drive apply_ptq."""
  m, params, x = setup
  cands = {"int2": QuantSpec("int2", group_size=8), "int8": "int8"}
  costs, sizes = {}, {}
  for p in ("c1", "c2"):
    w = params[p]["kernel"].reshape(-1, params[p]["kernel"].shape[-1])
    costs[p] = weight_sensitivity(w, cap.stats[p].gram, cands)
    sizes[p] = w.size
    assert costs[p]["int2"] > 100 * costs[p]["int8"] > 0
  alloc = allocate_bits(costs, sizes, {"int2": 2.5, "int8": 8.0}, budget=5.5)
  assert sorted(alloc.assignment.values()) == ["int2", "int8"]
  rules = assignment_to_rules(alloc.assignment, cands)
  qp, rep = apply_ptq(m, params, [x], "rtn", rules)
  for p, cand in alloc.assignment.items():
    assert rep["layers"][p]["spec"].startswith(cand)
    n_levels = len(np.unique(np.asarray(qp[p]["kernel"])[..., 0]))
    assert n_levels <= (4 * params[p]["kernel"][..., 0].size // 8 if cand == "int2"
                        else 256)
  np.testing.assert_array_equal(qp["head"]["kernel"], params["head"]["kernel"])
  # RTN's scales give the same codes in real mode.
  qv = quantize_linen(rules, mode="real").quantize_params(
      m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  for p in ("c1", "c2"):
    np.testing.assert_array_equal(qv["params"][p]["kernel"].logical(),
                                  qp[p]["kernel"])


def test_transforms_skip_convs_with_a_reason(setup):
  m, params, x = setup
  qp, rep = apply_ptq(m, params, [x], "smoothquant", "int8", layers="c1")
  (fold,) = rep["folds"]
  assert fold["layers"] == ["c1"] and fold["status"] == "skipped"
  assert "smoothquant is not applied to convs" in fold["reason"]
  assert rep["layers"]["c1"]["transform"] == "none"
  assert not np.array_equal(qp["c1"]["kernel"], params["c1"]["kernel"])
  np.testing.assert_array_equal(qp["c2"]["kernel"], params["c2"]["kernel"])


@pytest.mark.slow
def test_grouped_convs_are_reported_skipped(setup):
  m, params, x = setup
  qp, rep = apply_ptq(m, params, [x], "awq", "int4")
  reasons = {f["layers"][0]: f["reason"] for f in rep["folds"]
             if f["status"] == "skipped"}
  assert "feature_group_count=16" in reasons["dw"]
  assert "awq is not applied to convs" in reasons["c1"]
  np.testing.assert_array_equal(qp["dw"]["kernel"], params["dw"]["kernel"])
  assert "dw" not in rep["layers"]
  assert not np.array_equal(qp["c1"]["kernel"], params["c1"]["kernel"])


def test_conv_group_size_must_divide_cin(setup):
  m, params, x = setup
  with pytest.raises(ValueError, match="does not divide its 8 input channels"):
    apply_ptq(m, params, [x], "rtn", QuantSpec("int4", group_size=16))
