"""QuantRule's QAT / low-bit training fields: validation, the specs sites use,
clipped fractions, and a convolution site with learned ranges and a grad spec."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import _rules
from lowbit_jax._rules import QuantRule, Site, SiteCall


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation="int8", learn_activation="pact", static=True), "drop static"),
    (dict(weight="int4", learn_activation="lsq"), "needs an activation spec"),
    (dict(activation="int8", learn_weight="lsq"), "needs a weight spec"),
    (dict(weight="int4", learn_weight="pact"), "learn_weight must be one of"),
    (dict(activation=lb.QuantSpec("int8", axis=-1), learn_activation="lsq"),
     "one range per tensor"),
    (dict(activation="mxfp8_e4m3", learn_activation="pact"), "one range per tensor"),
    (dict(weight="int4", scale_init="amax"), "learns none"),
    (dict(grad="mxfp8_e5m2"), "Leave conv out"),
    (dict(weight="fp8_e4m3", scaling="delayed", static=True, activation="int8"),
     "Use one"),
    (dict(weight="fp8_e4m3", scaling="delayed", learn_weight="lsq"), "Use one"),
    (dict(weight=lb.QuantSpec("int8", group_size=32), scaling="delayed"),
     "no per-tensor"),
    (dict(weight="mxfp4", scaling="delayed"), "no per-tensor"),
    (dict(scaling="delayed"), "needs something"),
    (dict(weight="int8", scaling="later"), "scaling must be"),
    (dict(weight="int8", scaling="delayed", amax_history_len=0), "positive int"),
    (dict(weight="int8", scaling="delayed", amax_reduce="mean"), "amax_reduce"),
    (dict(weight="int8", ops=("matmul",)), "ops must be"),
])
def test_rule_rejects_options_that_do_not_fit(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantRule(".*", **kwargs)


def test_rule_fields_and_the_specs_sites_use():
  r = QuantRule(".*", weight="fp8_e4m3", activation="fp8_e4m3", grad="fp8_e5m2",
                scaling="delayed")
  assert r.weight_spec.axis == r.activation_spec.axis == r.grad_spec.axis == "tensor"
  assert not r.is_float and QuantRule("x", grad="fp8_e5m2").grad is not None
  assert QuantRule("x", weight="nvfp4", scaling="delayed").weight_spec.group_size == 16
  assert QuantRule(".*", grad="mxfp8_e5m2", ops=("dot_general", "einsum"))
  r = QuantRule(".*", weight="int4", activation="int8", learn_activation="lsq")
  assert r.activation_spec.axis == "tensor" and r.weight_spec.axis is None
  assert "act_matmul" not in QuantRule(".*").ops  # default: weight ops only
  site = Site("a/kernel", "dot_general", r, "fake")
  assert site.scale_names() == ("act_scale",) and site.history_names() == {}
  act = Site("a/qk", "act_matmul", r, "fake")
  assert act.weight is None and act.scale_names() == ("lhs_scale", "rhs_scale")
  with pytest.raises(ValueError, match="PACT"):
    Site("a/qk", "act_matmul", QuantRule(".*", activation="int8",
                                         learn_activation="pact"), "fake")


def test_clipped_fraction_matches_hand_counts():
  x = jnp.linspace(-4.0, 4.0, 81).reshape(9, 9)
  spec = lb.QuantSpec("int8", axis="tensor")
  np.testing.assert_allclose(_rules.clipped_fraction(x, spec, clip=2.0),
                             np.mean(np.abs(np.asarray(x)) > 2.0))
  np.testing.assert_allclose(_rules.clipped_fraction(x, spec, scale=1.0 / 127),
                             np.mean(np.abs(np.asarray(x)) > 1.0))
  assert float(_rules.clipped_fraction(x, spec)) == 0.0  # dynamic, clip_ratio 1
  half = lb.QuantSpec("int8", axis=0, clip_ratio=0.5)
  want = np.mean(np.abs(x) > 0.5 * np.abs(np.asarray(x)).max(axis=0))
  np.testing.assert_allclose(_rules.clipped_fraction(x, half), want)
  uns = lb.QuantSpec("uint8", axis="tensor")
  np.testing.assert_allclose(_rules.clipped_fraction(x, uns, clip=2.0),
                             np.mean((np.asarray(x) < 0) | (np.asarray(x) > 2.0)))


def test_conv_site_with_learned_ranges_and_grad_matches_core():
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 8, 3))
  w = jax.random.normal(kw, (3, 3, 4)) * 0.5
  dn = ("NWC", "WIO", "NWC")
  rule = QuantRule(".*", weight="int4", activation="int8", grad="fp8_e5m2",
                   learn_weight="lsq", learn_activation="pact")
  site = Site("conv/kernel", "conv", rule, "fake")
  call = SiteCall(init=True)
  y0 = _rules.site_conv(site, x, w, (1,), "SAME", dimension_numbers=dn, call=call)
  scales = call.new_scales
  assert scales["weight_scale"].shape == (1, 1, 4) and scales["act_clip"].shape == ()

  def run(x, w, s):
    return _rules.site_conv(site, x, w, (1,), "SAME", dimension_numbers=dn,
                            call=SiteCall(scales=s))

  def ref(x, w, s):
    xq = lb.fake_quant(x, lb.QuantSpec("int8", axis="tensor"), clip=s["act_clip"])
    wq = lb.fake_quant(w, lb.QuantSpec("int4", axis=(0, 1)), scale=s["weight_scale"])
    return lb.ops.conv_general_dilated(xq, wq, (1,), "SAME", dimension_numbers=dn,
                                       grad_spec="fp8_e5m2")

  ct = jax.random.normal(kc, y0.shape)

  @jax.jit
  def vjp(x, w, s):
    (out, pull), (rout, rpull) = jax.vjp(run, x, w, s), jax.vjp(ref, x, w, s)
    return out, rout, pull(ct), rpull(ct)

  out, rout, g, rg = vjp(x, w, scales)
  np.testing.assert_allclose(out, y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, rout, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g[0], rg[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g[1], rg[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g[2]["act_clip"], rg[2]["act_clip"], rtol=1e-5)
  # LSQ's gradient scale 1 / sqrt(n * Qp): n = 3 * 3 weights per scale, Qp = 7.
  np.testing.assert_allclose(g[2]["weight_scale"],
                             rg[2]["weight_scale"] / np.sqrt(9 * 7), rtol=1e-5)
  with pytest.raises(ValueError, match="delayed"):
    _rules.site_conv(Site("c/kernel", "conv", QuantRule(
        ".*", weight="fp8_e4m3", scaling="delayed"), "fake"), x, w, (1,), "SAME",
        dimension_numbers=dn, call=SiteCall(init=True))
