"""QuantRule, QuantConfig, QWeight, plans and leaf-by-leaf quantize_params."""
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import _rules
from lowbit_jax._rules import QuantConfig, QuantRule, QWeight, Site

_fq = jax.jit(lb.fake_quant, static_argnums=1)


def test_rule_converts_format_names_and_freezes():
  r = QuantRule("layers_.*/up", weight="int4", activation="int8", ops="dot_general")
  assert isinstance(r.weight, lb.QuantSpec) and r.weight.format.name == "int4"
  assert r.activation.format.name == "int8"
  assert r.ops == ("dot_general",)
  assert r.weight.axis is None  # filled per op, with its contraction axis
  hash(r)  # static data
  with pytest.raises(dataclasses_frozen_error()):
    r.path = "x"


def dataclasses_frozen_error():
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.FrozenInstanceError


def test_unknown_format_names_the_fix():
  with pytest.raises(ValueError, match=r"QuantRule\('.\*'\): weight='int3x'.*"
                     r"unknown format 'int3x'.*formats.names"):
    QuantRule(".*", weight="int3x")
  with pytest.raises(ValueError, match="activation='fp9'"):
    QuantRule(".*", activation="fp9")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(path="layers_(0"), "not a valid regular expression"),
    (dict(path=".*", weight="int8", ops=("matmul",)), "ops must be a non-empty subset"),
    (dict(path=".*", weight="int8", static=True), "static=True .* needs an activation"),
])
def test_bad_rules_raise(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    QuantRule(**kwargs)


def test_rules_must_be_quantrules():
  with pytest.raises(TypeError, match="QuantRule"):
    QuantConfig([("x", "int8")])


def test_first_full_match_wins_and_unused_rules():
  rules = [QuantRule("head"), QuantRule(".*/up", weight="int4"),
           QuantRule(".*", weight="int8"), QuantRule("layer_9/.*", weight="int2")]
  cfg = QuantConfig(rules)
  # Candidates: the layer path, then the parameter path.
  assert cfg.match(_rules.candidates("head/kernel"), ["dot_general"]).is_float
  assert cfg.match(_rules.candidates("l0/up/kernel"), ["dot_general"]) is rules[1]
  assert cfg.match(_rules.candidates("l0/down/kernel"), ["dot_general"]) is rules[2]
  # "up" as a substring does not match: the match is full.
  assert cfg.match(_rules.candidates("l0/upx/kernel"), ["dot_general"]) is rules[2]
  assert cfg.unused_rules() == [rules[3]]
  assert "UNUSED" in cfg.report()
  cfg.check()  # not strict
  strict = QuantConfig(rules, strict=True)
  with pytest.raises(ValueError, match="matched no layer.*'layer_9/.\\*'"):
    strict.check()


def test_ops_filter():
  cfg = QuantConfig([QuantRule(".*", weight="int4", ops=("conv",)),
                     QuantRule(".*", weight="int8")])
  assert cfg.match(("c", "c/kernel"), ["conv"]).weight.format.name == "int4"
  assert cfg.match(("d", "d/kernel"), ["dot_general"]).weight.format.name == "int8"


def test_static_activation_defaults_to_per_tensor():
  r = QuantRule(".*", activation="int8", static=True)
  assert r.static_activation.axis == "tensor"
  r2 = QuantRule(".*", activation=lb.QuantSpec("int8", axis=(0, 1)), static=True)
  assert r2.static_activation.axis == (0, 1)


def test_qweight_is_a_qarray_pytree():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  plan = _rules.plan_weight(lb.QuantSpec("int4", group_size=16), w.shape, "dot_general",
                            contracting=(0,))
  assert plan.transpose and plan.spec.axis == 0
  q = _rules.quantize_weight(w, plan)
  assert isinstance(q, QWeight) and isinstance(q, lb.QArray)
  assert q.shape == (32, 64) and q.logical_shape == (64, 32) and q.pack_axis == 1
  assert q[...] is q
  np.testing.assert_array_equal(
      q.logical(), _fq(w, lb.QuantSpec("int4", axis=0, group_size=16)))
  leaves, tdef = jax.tree.flatten(q)
  q2 = jax.tree.unflatten(tdef, leaves)
  assert isinstance(q2, QWeight) and q2.transposed
  assert "transposed=True" in repr(q)


def test_plan_weight_explicit_axis_is_mapped_to_storage():
  w = jax.random.normal(jax.random.key(1), (32, 48))
  # axis=0 in the layer's layout (groups along K) is axis 1 of the K-major copy.
  spec = lb.QuantSpec("int8", axis=0, group_size=8)
  q = _rules.quantize_weight(w, _rules.plan_weight(spec, w.shape, "dot_general",
                                                   contracting=(0,)))
  np.testing.assert_array_equal(q.logical(), _fq(w, spec))
  tile = lb.QuantSpec("int8", tile=(8, 16))
  q = _rules.quantize_weight(w, _rules.plan_weight(tile, w.shape, "dot_general",
                                                   contracting=(0,)))
  np.testing.assert_array_equal(q.logical(), _fq(w, tile))


@pytest.mark.parametrize("eq,ls,rs", [
    ("btd,dk->btk", (2, 3, 8), (8, 5)),
    ("btef,efd->bted", (2, 3, 4, 6), (4, 6, 5)),   # jnp.einsum swaps these
    ("bthk,hkd->btd", (2, 3, 2, 4), (2, 4, 6)),
    ("...d,dk->...k", (2, 3, 8), (8, 5)),
    ("btd,dk", (2, 3, 8), (8, 5)),
    ("bxd,dk->bk", (2, 3, 8), (8, 5)),             # x summed out of lhs
])
def test_einsum_lowering_matches_jnp(eq, ls, rs):
  x = jax.random.normal(jax.random.key(2), ls)
  w = jax.random.normal(jax.random.key(3), rs)
  site = Site("w", "einsum", QuantRule(".*"), "fake")
  got = jax.jit(lambda x, w: _rules.site_einsum(site, eq, x, w))(x, w)
  np.testing.assert_allclose(got, jnp.einsum(eq, x, w), rtol=1e-5, atol=1e-5)


def test_einsum_specs_meet_their_operands():
  # ops.einsum hands jnp.einsum's operands to dot_general in jnp's order, which
  # swaps weight and activation for "btef,efd->bted"; the site lowering keeps
  # the weight spec on the weight.
  x = jax.random.normal(jax.random.key(4), (2, 3, 4, 64))
  w = jax.random.normal(jax.random.key(5), (4, 64, 16))
  site = Site("w", "einsum", QuantRule(".*", weight="int4"), "fake")
  got = jax.jit(lambda x, w: _rules.site_einsum(site, "btef,efd->bted", x, w))(x, w)
  want = jax.jit(lambda x, w: jnp.einsum("btef,efd->bted", x,
                                         lb.fake_quant(w, "int4", axis=1)))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_repeated_label_is_rejected():
  with pytest.raises(ValueError, match="repeats a label"):
    _rules.einsum_dims("bii,ik->bk", (2, 3, 3), (3, 4))
  with pytest.raises(ValueError, match="inside the second operand"):
    _rules.einsum_dims("bd,dk->b", (2, 3), (3, 4))


def test_weight_on_lhs_equals_weight_on_rhs():
  x = jax.random.normal(jax.random.key(6), (5, 32))
  w = jax.random.normal(jax.random.key(7), (32, 12))
  site = Site("w", "dot_general", QuantRule(".*", weight="int4", activation="int8"),
              "fake")
  a = jax.jit(lambda x, w: _rules.site_dot_general(
      site, x, w, (((1,), (0,)), ((), ()))))(x, w)
  b = jax.jit(lambda x, w: _rules.site_dot_general(
      site, w, x, (((0,), (1,)), ((), ())), weight_side="lhs"))(x, w)
  np.testing.assert_allclose(a, b.T, rtol=1e-5, atol=1e-5)


def test_static_asymmetric_activation():
  x = jax.random.normal(jax.random.key(8), (6, 32)) + 1.0
  w = jax.random.normal(jax.random.key(9), (32, 8))
  rule = QuantRule(".*", weight="int8", activation="uint8", static=True)
  rng = {"amax": jnp.float32(4.0), "amin": jnp.float32(-1.0)}
  spec = rule.static_activation
  want = jax.jit(lambda x, w: lb.fake_quant(x, spec, amax=4.0, amin=-1.0)
                 @ lb.fake_quant(w, "int8", axis=0))(x, w)
  for mode in ("fake", "real"):
    site = Site("w", "dot_general", rule, mode)
    got = jax.jit(lambda x, w, r, s=site: _rules.site_dot_general(
        s, x, w, (((1,), (0,)), ((), ())), stats=r))(x, w, rng)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no calibration statistics"):
    _rules.site_dot_general(Site("w", "dot_general", rule, "fake"), x, w,
                            (((1,), (0,)), ((), ())))


def _live_bytes(exclude: set) -> int:
  return sum(a.nbytes for a in jax.live_arrays() if id(a) not in exclude)


def test_quantize_params_leaf_by_leaf_peak_memory():
  gc.collect()
  baseline = {id(a) for a in jax.live_arrays()}
  keys = jax.random.split(jax.random.key(0), 8)
  params = {f"l{i}": {"w": jax.random.normal(keys[i], (256, 256)),
                      "b": jnp.zeros((256,))} for i in range(8)}
  fp_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  plan = {f"l{i}/w": _rules.plan_weight(lb.QuantSpec("int8"), (256, 256),
                                        "dot_general", contracting=(0,))
          for i in range(8)}
  peaks = []

  def on_step(path, q):
    del path, q
    peaks.append(_live_bytes(baseline))

  ref = {"l0": {"w": np.asarray(params["l0"]["w"])}}
  out = _rules.quantize_params(params, plan, donate=True, on_step=on_step)
  assert len(peaks) == 8
  assert max(peaks) <= 1.2 * fp_bytes, (max(peaks), fp_bytes)
  assert all(params[f"l{i}"]["w"].is_deleted() for i in range(8))
  q_bytes = sum(out[f"l{i}"]["w"].nbytes for i in range(8))
  assert q_bytes < 0.3 * 8 * 256 * 256 * 4
  np.testing.assert_array_equal(out["l0"]["w"].logical(),
                                _fq(ref["l0"]["w"], lb.QuantSpec("int8", axis=0)))
  del out
  with pytest.raises(ValueError, match="not leaves of params"):
    _rules.quantize_params({"a": jnp.ones(3)}, {"b": plan["l0/w"]})


def test_donate_keeps_an_array_held_at_two_paths_until_both_are_quantized():
  # One array at two paths: it was deleted after the first and the second
  # failed ("Array has been deleted"), losing the float weights and the result.
  w = jax.random.normal(jax.random.key(0), (64, 64))
  p = _rules.plan_weight(lb.QuantSpec("int8"), (64, 64), "dot_general", contracting=(0,))
  out = _rules.quantize_params({"a": w, "b": w}, {"a": p, "b": p}, donate=True)
  np.testing.assert_array_equal(out["a"].logical(), out["b"].logical())
  assert w.is_deleted()
  v = jax.random.normal(jax.random.key(1), (64, 64))
  _rules.quantize_params({"a": v, "c": v}, {"a": p}, donate=True)
  assert not v.is_deleted()   # an unplanned path still holds it
  from flax import nnx   # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_nnx   # pylint: disable=g-import-not-at-top

  class Two(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
      self.b = nnx.Linear(64, 64, rngs=nnx.Rngs(1))
      self.b.kernel = nnx.Param(self.a.kernel.get_value())   # same array

  m = quantize_nnx(Two(), [lb.QuantRule(".*", weight="int8")], mode="real", donate=True)
  assert isinstance(m.b.kernel.get_value(), lb.QArray)
