"""apply_ptq on nn.Conv: im2col statistics, GPTQ/RTN on the reshaped kernel, skips."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.flax import apply_ptq, quantize_linen
from lowbit_jax.flax._capture import capture_dense_stats, conv_patches


class _CNN(nn.Module):
  depthwise: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(32, (3, 3), strides=(2, 1), name="c1")(x))
    if self.depthwise:
      h = nn.Conv(32, (3, 3), feature_group_count=32, name="dw")(h)
    h = nn.relu(nn.Conv(32, (3, 2), padding="CIRCULAR", kernel_dilation=(1, 2),
                        name="c2")(h))
    return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))


@pytest.fixture(scope="module")
def setup():
  m = _CNN()
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 8)) * jnp.linspace(0.2, 3, 8)
  return m, m.init(jax.random.key(1), x)["params"], x


@pytest.mark.parametrize("padding,strides,lhs_dil,rhs_dil", [
    ("SAME", (2, 1), (1, 1), (1, 2)), (((1, 2), (0, 1)), (1, 2), (2, 1), (1, 1))])
def test_patches_times_reshaped_kernel_is_the_conv(padding, strides, lhs_dil, rhs_dil):
  """conv_patches reorders features to kernel.reshape(-1, cout)'s (window, cin)."""
  x = jax.random.normal(jax.random.key(2), (2, 7, 6, 3))
  w = jax.random.normal(jax.random.key(3), (3, 2, 3, 5))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  y = jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, dn,
                                   precision=jax.lax.Precision.HIGHEST)
  p = conv_patches(x, w.shape, strides, padding, lhs_dil, rhs_dil, dn)
  np.testing.assert_allclose(p @ w.reshape(-1, 5), y, rtol=1e-5, atol=1e-5)


def test_capture_conv_stats(setup):
  m, params, x = setup
  cap = capture_dense_stats(m, params, [x])
  assert cap.convs == ("c1", "c2") and cap.skipped == {}
  assert cap.stats["c1"].gram.shape == (72, 72)    # 3*3*8
  assert cap.stats["c2"].gram.shape == (192, 192)  # 3*2*32
  assert float(cap.stats["c1"].count) == 16 * 4 * 8   # output positions
  # Zero padding rows: the SAME-padded corners have zero features.
  assert float(jnp.min(cap.stats["c1"].absmax)) > 0


@pytest.mark.parametrize("spec", [QuantSpec("int4", group_size=8), "int4"])
def test_gptq_conv_real_equals_fake_and_beats_rtn(setup, spec):
  m, params, x = setup
  qp, rep = apply_ptq(m, params, [x], "gptq", spec)
  qr, rep_r = apply_ptq(m, params, [x], "rtn", spec)
  assert set(rep["quant_scales"]) == {"c1", "c2", "head"}
  cap = capture_dense_stats(m, params, [x])
  for p in ("c1", "c2"):
    assert qp[p]["kernel"].shape == params[p]["kernel"].shape
    assert rep["layers"][p]["conv"]
    # GPTQ's layer-wise objective on the patches: below RTN's.
    w = params[p]["kernel"].reshape(-1, params[p]["kernel"].shape[-1])
    g = cap.stats[p].gram

    def err(wq):
      d = wq.reshape(w.shape) - w
      return float(jnp.trace(d.T @ g @ d))
    assert err(qp[p]["kernel"]) < err(qr[p]["kernel"]), p
  q = quantize_linen([QuantRule(".*", weight=spec)], mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  for p in ("c1", "c2", "head"):
    np.testing.assert_array_equal(qv["params"][p]["kernel"].logical(),
                                  qp[p]["kernel"])
  np.testing.assert_allclose(q(m.apply)(qv, x), m.apply({"params": qp}, x),
                             rtol=1e-5, atol=1e-5)


def test_transforms_and_grouped_convs_are_reported_skipped():
  m = _CNN(depthwise=True)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 8))
  params = m.init(jax.random.key(1), x)["params"]
  qp, rep = apply_ptq(m, params, [x], "smoothquant", "int8")
  reasons = {f["layers"][0]: f["reason"] for f in rep["folds"]
             if f["status"] == "skipped"}
  assert "feature_group_count=32" in reasons["dw"]
  assert "smoothquant is not applied to convs" in reasons["c1"]
  np.testing.assert_array_equal(qp["dw"]["kernel"], params["dw"]["kernel"])
  assert "dw" not in rep["layers"]
  assert not np.array_equal(qp["c1"]["kernel"], params["c1"]["kernel"])


def test_conv_group_size_must_divide_cin(setup):
  m, params, x = setup
  with pytest.raises(ValueError, match="does not divide its 8 input channels"):
    apply_ptq(m, params, [x], "rtn", QuantSpec("int4", group_size=16))
