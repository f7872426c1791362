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
from lowbit_jax.core import as_spec, fake_quant
from lowbit_jax.flax import apply_ptq, quantize_linen
from lowbit_jax.flax._capture import capture_dense_stats, conv_matrix, conv_patches


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


def _normal(*shape, rng=None):
  """Host random numbers (compiling jax.random for each shape costs seconds)."""
  return jnp.asarray((rng or _RNG).standard_normal(shape), jnp.float32)


def _init(m, x, rng=None):
  """Random params of ``m`` (cheaper than compiling ``m.init``'s initializers)."""
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)["params"]
  return jax.tree.map(
      lambda l: _normal(*l.shape, rng=rng) / np.sqrt(np.prod(l.shape[:-1])), shapes)


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
  assert "no conv, Dense or norm produces this input" in fold["reason"]
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
  assert "no conv, Dense or norm produces this input" in reasons["c1"]
  # c2 reads relu(dw(.)): its scaling folds into the depthwise conv's outputs.
  (c2,) = [f for f in rep["folds"] if f["layers"] == ["c2"]]
  assert c2["status"] == "folded" and c2["producer"] == "dw"
  # dw itself is not quantized: its kernel is the original up to the fold's
  # per-output-channel scaling (AWQ's search may pick alpha = 0, s = 1).
  ratio = np.asarray(qp["dw"]["kernel"]) / np.asarray(params["dw"]["kernel"])
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1, :1, :1], ratio.shape),
                             rtol=1e-6)
  assert "dw" not in rep["layers"]
  assert not np.array_equal(qp["c1"]["kernel"], params["c1"]["kernel"])


def test_conv_group_size_must_divide_cin(setup):
  m, params, x = setup
  with pytest.raises(ValueError, match="does not divide its 8 input channels"):
    apply_ptq(m, params, [x], "rtn", QuantSpec("int4", group_size=16))


# ---------------------------------------------------------------------------
# Transposed convs, and AWQ / SmoothQuant scalings folded into convs


class _UpNet(nn.Module):
  """BatchNorm -> ReLU -> two transposed convs -> GELU -> conv.

  Every conv is a [48, 16] matmul (3*2*8, 3*1*16, 3*1*16): GPTQ compiles once.
  """

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
    h = nn.ConvTranspose(16, (3, 2), strides=(2, 2), padding="CIRCULAR",
                         transpose_kernel=True, name="up")(h)
    h = nn.ConvTranspose(16, (3, 1), strides=(2, 1), name="up2")(nn.relu(h))
    return nn.Conv(16, (3, 1), name="c3")(nn.gelu(h))


_UP_SEED = 1


@pytest.fixture(scope="module")
def up_setup():
  m = _UpNet()
  rng = np.random.default_rng(_UP_SEED)   # the same numbers whichever tests run
  x = _normal(1, 2, 4, 4, 8, rng=rng)   # two batch dims: ConvTranspose flattens them
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)
  params = _init(m, x, rng)
  # Outlier channels: bn's scale spreads up's input channels over 30x, up's
  # kernel (transpose_kernel: [*window, features, cin]) up2's over 30x.
  params["bn"]["scale"] = jnp.asarray(np.logspace(-0.5, 1, 8), jnp.float32)
  params["bn"]["bias"] = params["bn"]["bias"] * 0.1
  params["up"]["kernel"] = params["up"]["kernel"] * jnp.asarray(
      np.logspace(-0.5, 1, 16), jnp.float32)[:, None]
  stats = {"batch_stats": {"bn": {
      "mean": jnp.zeros(shapes["batch_stats"]["bn"]["mean"].shape),
      "var": jnp.ones(shapes["batch_stats"]["bn"]["var"].shape)}}}
  return m, params, x, stats


@pytest.fixture(scope="module")
def up_cap(up_setup):
  m, params, x, stats = up_setup
  return capture_dense_stats(m, params, [x], other_variables=stats)


def test_capture_conv_transpose(up_cap):
  """A transposed conv is the matmul of its input-dilated conv's patches.

  (The capture checks rows @ conv_matrix(kernel) + bias against the layer's
  own output on every batch; quantize_linen's lowering of it is checked
  against the float layer in the real-mode test below.)
  """
  cap = up_cap
  assert cap.convs == ("up", "up2", "c3")
  assert cap.conv_axes["up"] == (3, 2) and cap.conv_axes["up2"] == (2, 3)
  assert cap.producers == {"up": ("norm", "bn"), "up2": ("conv", "up"),
                           "c3": ("conv", "up2")}
  for p in cap.convs:
    assert cap.stats[p].gram.shape == (48, 48)
  # Output positions: stride x input (CIRCULAR and SAME): up 8x8, up2 16x8.
  assert float(cap.stats["up"].count) == 2 * 8 * 8
  assert float(cap.stats["up2"].count) == 2 * 16 * 8


def test_gptq_mixed_precision_conv_transpose_real_equals_fake(up_setup, up_cap):
  """Bit allocation on the transposed convs' patch Hessians, GPTQ under its rules."""
  m, params, x, stats = up_setup
  cands = {"int3": QuantSpec("int3", group_size=8),
           "int4": QuantSpec("int4", group_size=8)}
  costs = {p: weight_sensitivity(conv_matrix(params[p]["kernel"],
                                             *up_cap.conv_axes[p]),
                                 up_cap.stats[p].gram, cands) for p in ("up", "up2")}
  alloc = allocate_bits(costs, {"up": 768, "up2": 768}, {"int3": 3.5, "int4": 4.5},
                        budget=4.0)
  assert sorted(alloc.assignment.values()) == ["int3", "int4"]
  rules = assignment_to_rules(alloc.assignment, cands)
  qp, rep = apply_ptq(m, params, [x], "gptq", rules, other_variables=stats)
  np.testing.assert_array_equal(qp["c3"]["kernel"], params["c3"]["kernel"])
  for p, cand in alloc.assignment.items():
    assert rep["layers"][p]["spec"].startswith(cand) and rep["layers"][p]["conv"]
    axes = up_cap.conv_axes[p]
    w2 = conv_matrix(params[p]["kernel"], *axes)
    g = up_cap.stats[p].gram
    err = lambda wq: float(jnp.trace((wq - w2).T @ g @ (wq - w2)))  # noqa: E731
    gptq_err = err(conv_matrix(qp[p]["kernel"], *axes))
    assert gptq_err < err(rtn(w2, kernel_spec(as_spec(cands[cand])))), p
  q = quantize_linen(rules, mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"],
                             **stats}, x)
  for p in ("up", "up2"):   # the stored codes give back the PTQ kernels
    np.testing.assert_array_equal(qv["params"][p]["kernel"].logical(),
                                  qp[p]["kernel"])
  real = jax.jit(lambda v: q(m.apply)(v, x))(qv)
  fake = jax.jit(lambda p: m.apply({"params": p, **stats}, x))(qp)
  np.testing.assert_allclose(real, fake, rtol=1e-4, atol=1e-4)


def test_smoothquant_folds_into_norm_and_convs_exactly(up_setup, up_cap):
  """A scaling of a conv's input folds into a BatchNorm or a (transposed) conv.

  The float model is unchanged, and the smoothed transposed conv has a lower
  W8A8 (per-row int8 activations) output error than the plain one.
  """
  m, params, x, stats = up_setup
  qp, rep = apply_ptq(m, params, [x], "smoothquant", None, other_variables=stats)
  folds = {f["layers"][0]: f for f in rep["folds"]}
  assert (folds["up"]["status"], folds["up"]["producer"]) == ("folded", "bn")
  assert (folds["up2"]["status"], folds["up2"]["producer"]) == ("folded", "up")
  assert folds["c3"]["status"] == "skipped" and "GELU" in folds["c3"]["reason"]
  for p in ("bn", "up", "up2"):   # transformed, not merely copied
    assert not np.allclose(qp[p]["bias"] if p != "up2" else qp[p]["kernel"],
                           params[p]["bias"] if p != "up2" else params[p]["kernel"])
  fwd = jax.jit(lambda p: m.apply({"params": p, **stats}, x))   # one compile
  with jax.default_matmul_precision("float32"):
    ref, out = fwd(params), fwd(qp)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4 * float(jnp.max(ref)))

  # SmoothQuant's objective: W8A8 error of up2 on its original patches.
  wspec, aspec = kernel_spec(QuantSpec("int8")), QuantSpec("int8", axis=-1)

  @jax.jit
  def w8a8_error(xs, w2, y):
    return jnp.sum((fake_quant(xs, aspec) @ rtn(w2, wspec) - y) ** 2)

  s, _ = _scaled_up2(params, qp)
  xs = up_cap.stats["up2"].sample
  y = xs @ conv_matrix(params["up2"]["kernel"])
  plain = w8a8_error(xs, conv_matrix(params["up2"]["kernel"]), y)
  smooth = w8a8_error(xs / jnp.tile(s, 3), conv_matrix(qp["up2"]["kernel"]), y)
  assert float(smooth) < 0.8 * float(plain)


def _scaled_up2(params, qp):
  """(up2's s[cin], its float-equivalent kernel Q(s w) / s) after a fold into up."""
  s = params["up"]["bias"] / qp["up"]["bias"]   # up's outputs were divided by s
  return s, qp["up2"]["kernel"] / s[:, None]


def test_awq_on_a_transposed_conv_lowers_its_error(up_setup, up_cap):
  m, params, x, stats = up_setup
  spec = QuantSpec("int3", group_size=8)
  qp, rep = apply_ptq(m, params, [x], "awq", spec, layers="up2", awq_clip=False,
                      other_variables=stats)
  (fold,) = [f for f in rep["folds"] if f["layers"] == ["up2"]]
  assert fold["status"] == "folded" and fold["alpha"] > 0
  _, w_eff = _scaled_up2(params, qp)
  w2 = conv_matrix(params["up2"]["kernel"])
  g = up_cap.stats["up2"].gram
  err = lambda wq: float(jnp.trace((wq - w2).T @ g @ (wq - w2)))  # noqa: E731
  assert err(conv_matrix(w_eff)) < 0.9 * err(rtn(w2, kernel_spec(spec)))
  # Real mode stores the scaled kernel's codes.
  q = quantize_linen([QuantRule("up2", weight=spec)], mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"],
                             **stats}, x)
  np.testing.assert_array_equal(qv["params"]["up2"]["kernel"].logical(),
                                qp["up2"]["kernel"])
