"""Issue 11: bad and edge-case inputs give the right numbers or a clear error."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.core import ops


# ---------------------------------------------------------------------------
# Integer activations keep the weight's float values


def _w():
  return jax.random.normal(jax.random.key(0), (8, 4))


def _ids():
  return (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 3) - 1


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_integer_lhs_promotes_like_jnp_dot(mode):
  w, a = _w(), _ids()
  want = jnp.dot(a, lb.fake_quant(w, lb.QuantSpec("int4", axis=0)))
  dn = (((1,), (0,)), ((), ()))
  got = ops.dot_general(a, w, dn, rhs_spec="int4", mode=mode)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  got = ops.einsum("bk,kn->bn", a, w, rhs_spec="int4", mode=mode)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_integer_lhs_conv_keeps_float_weight():
  x = jnp.ones((1, 5, 2), jnp.int32)
  w = jax.random.normal(jax.random.key(1), (3, 2, 4))
  got = ops.conv_general_dilated(x, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
                                 rhs_spec="int8")
  want = jax.lax.conv_general_dilated(
      x.astype(jnp.float32), ops.fake_quant(w, lb.QuantSpec("int8", axis=(0, 1))), (1,),
      "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_quantize_function_with_integer_activations(mode):
  from lowbit_jax._function import quantize_function
  from lowbit_jax._rules import QuantRule
  p, a = {"w": _w()}, _ids()
  f = lambda p, a: jnp.dot(a, p["w"])
  qf = quantize_function(f, [QuantRule(".*", weight="int4")], mode=mode)
  qp = qf.quantize_params(p, a) if mode == "real" else p
  want = jnp.dot(a, lb.fake_quant(p["w"], lb.QuantSpec("int4", axis=0)))
  np.testing.assert_allclose(qf(qp, a), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Spec fields of the wrong type


@pytest.mark.parametrize("kw, field", [
    (dict(symmetric="no"), "symmetric"), (dict(pad="no"), "pad"),
    (dict(group_size=True), "group_size"), (dict(group_size=32.0), "group_size"),
    (dict(axis=True), "axis"), (dict(axis=(0, 1.0)), "axis"),
    (dict(tile=(32, True)), "tile"), (dict(clip_ratio=True), "clip_ratio"),
    (dict(clip_ratio="0.9"), "clip_ratio"), (dict(scale_dtype=1), "scale_dtype"),
    (dict(calibration=3), "calibration"), (dict(format=8), "format")])
def test_spec_fields_of_the_wrong_type_are_refused(kw, field):
  kw = {"format": "int4", "axis": -1, **kw}
  if "tile" in kw:
    kw.pop("axis")
  with pytest.raises(TypeError, match=f"field {field}"):
    lb.QuantSpec(**kw)


def test_spec_takes_numpy_integers_and_bools():
  s = lb.QuantSpec("int4", axis=np.int64(-1), group_size=np.int32(32),
                   pad=np.bool_(True), symmetric=np.bool_(True))
  assert s == lb.QuantSpec("int4", axis=-1, group_size=32, pad=True)
  assert type(s.group_size) is int and type(s.axis) is int and s.pad is True
  t = lb.QuantSpec("int8", tile=(np.int64(4), 8))
  assert t.tile == (4, 8) and type(t.tile[0]) is int
  x = jax.random.normal(jax.random.key(0), (4, 64))
  np.testing.assert_array_equal(lb.fake_quant(x, s),
                                lb.fake_quant(x, lb.QuantSpec("int4", axis=-1,
                                                              group_size=32)))


# ---------------------------------------------------------------------------
# Static ranges of zero or below


@pytest.mark.parametrize("kw", [dict(amax=0.0), dict(amax=jnp.array([1.0, -1.0, 2.0, 1.0])[:, None]),
                                dict(amax=np.nan)])
def test_non_positive_static_amax_is_refused(kw):
  x = jax.random.normal(jax.random.key(0), (4, 8))
  spec = lb.QuantSpec("int8", axis=-1)
  for fn in (lb.fake_quant, lb.quantize):
    with pytest.raises(ValueError, match="amax must be positive and finite"):
      fn(x, spec, **kw)


def test_non_positive_tensor_amax_and_asymmetric_range_are_refused():
  x = jax.random.normal(jax.random.key(0), (4, 32))
  with pytest.raises(ValueError, match="tensor_amax must be positive"):
    lb.fake_quant(x, lb.QuantSpec("nvfp4", axis=-1), tensor_amax=0.0)
  with pytest.raises(ValueError, match=r"amax - amin must be positive"):
    lb.fake_quant(x, lb.QuantSpec("uint8", axis="tensor"), amax=0.0, amin=0.0)
  # A positive range still works, under jit too.
  y = jax.jit(lambda v, a: lb.fake_quant(v, lb.QuantSpec("int8", axis="tensor"),
                                         amax=a))(x, 2.0)
  assert np.all(np.isfinite(y))


def test_finalize_names_every_layer_that_saw_no_data():
  from lowbit_jax._function import quantize_function
  from lowbit_jax._rules import QuantConfig, QuantRule

  def f(p, x):
    return jnp.maximum(x @ p["a"], 0.0) @ p["b"]

  p = {"a": -jnp.ones((4, 8)), "b": jnp.ones((8, 2))}
  x = jnp.ones((2, 4))  # relu(x @ a) is all zeros: "b" sees only zeros
  rules = QuantConfig([QuantRule(".*", activation="int8", static=True)])
  cal = quantize_function(f, rules, mode="calibrate")
  _, stats = cal(p, x)
  with pytest.raises(ValueError, match=r"no usable calibrated range .*\['b'\]"):
    cal.finalize_stats(stats)
  qf = quantize_function(f, rules)
  with pytest.raises(ValueError, match="layer 'b'.*amax must be positive"):
    qf(p, x, quant_stats={"a": {"amax": jnp.float32(1.0)},
                          "b": {"amax": jnp.float32(0.0)}})


def test_traced_static_range_that_cannot_scale_gives_nan_not_wrong_numbers():
  # Inside jit the range is not known while tracing: the blocks it would get
  # wrong are NaN (a concrete range is refused, see above). Row 1 is all zeros:
  # a range of 0 (or below) is right for it and it stays exact.
  x = jax.random.normal(jax.random.key(0), (3, 64)).at[1].set(0.0)

  def outs(v, a, spec):
    return (lb.fake_quant(v, spec, amax=a),
            lb.dequantize(lb.quantize(v, spec, amax=a)))

  for fmt in ("int8", "mxfp4"):  # a float scale and an E8M0 scale
    f = jax.jit(functools.partial(outs, spec=lb.QuantSpec(fmt, axis=-1)))
    for bad in (0.0, -1.0, np.nan, np.inf):  # one compilation for all of them
      for out in f(x, jnp.array([2.0, bad, bad])[:, None]):
        out = np.asarray(out)
        assert np.isfinite(out[0]).all(), (fmt, bad)
        assert np.isnan(out[2]).all(), (fmt, bad)  # data, no usable range
        if bad <= 0:
          np.testing.assert_array_equal(out[1], 0.0)  # no data: 0 is right
  two_level = jax.jit(lambda v, a: lb.fake_quant(v, lb.QuantSpec("nvfp4", axis=-1),
                                                 tensor_amax=a))
  asym = jax.jit(lambda v, a: lb.fake_quant(v, lb.QuantSpec("uint8", axis="tensor"),
                                            amax=a, amin=a))
  for bad in (0.0, -1.0, np.nan):
    t = np.asarray(two_level(x, jnp.float32(bad)))
    assert np.isnan(t[[0, 2]]).all(), bad
    if bad == 0:  # an asymmetric range of width 0 (ranges always hold 0)
      assert np.isnan(np.asarray(asym(x, jnp.float32(bad)))[[0, 2]]).all(), bad


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_traced_bad_range_in_a_rule_is_nan_and_checkify_names_the_layer(mode):
  from jax.experimental import checkify
  from lowbit_jax._function import quantize_function
  from lowbit_jax._rules import QuantConfig, QuantRule

  def f(p, x):
    return jnp.maximum(x @ p["a"], 0.0) @ p["b"]

  p = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 2))}
  x = jnp.ones((2, 4))
  qf = quantize_function(f, QuantConfig([QuantRule(".*", activation="int8",
                                                   static=True)]), mode=mode)
  run = jax.jit(lambda p, x, st: qf(p, x, quant_stats=st))
  good = {"a": {"amax": jnp.float32(1.0)}, "b": {"amax": jnp.float32(4.0)}}
  bad = {"a": {"amax": jnp.float32(1.0)}, "b": {"amax": jnp.float32(0.0)}}
  assert np.isfinite(np.asarray(run(p, x, good))).all()
  assert np.isnan(np.asarray(run(p, x, bad))).all()  # never silently wrong
  err, _ = checkify.checkify(run)(p, x, good)
  err.throw()
  err, _ = checkify.checkify(run)(p, x, bad)
  with pytest.raises(checkify.JaxRuntimeError,
                     match=r"layer 'b' .*static range \(amax\) must be positive"):
    err.throw()


# ---------------------------------------------------------------------------
# The unused-rules report after config.reset()


def test_unused_rules_report_is_right_after_reset_on_a_jit_cache_hit():
  from lowbit_jax._function import quantize_function
  from lowbit_jax._rules import QuantRule
  p, x = {"w": _w()}, jnp.ones((2, 8))
  qf = quantize_function(lambda p, a: a @ p["w"], [
      QuantRule("w", weight="int8"), QuantRule("nothing", weight="int4")], strict=False)
  qf(p, x)
  assert [r.path for r in qf.unused_rules()] == ["nothing"]
  qf.config.reset()
  assert len(qf.unused_rules()) == 2
  qf(p, x)  # a jit cache hit: nothing is traced
  assert [r.path for r in qf.unused_rules()] == ["nothing"]
  assert "w" in qf.config.sites
  strict = quantize_function(lambda p, a: a @ p["w"], [QuantRule("w", weight="int8")],
                             strict=True)
  strict(p, x)
  strict.config.reset()
  strict(p, x)  # a cache hit: the rule that matched is not reported unused
  assert strict.unused_rules() == []


# ---------------------------------------------------------------------------
# Empty arrays and ill-shaped ranges


@pytest.mark.parametrize("fmt", ["int8", "uint8", "nvfp4"])  # format-independent paths
def test_empty_arrays(fmt):
  x = jnp.zeros((0, 128))
  spec = lb.QuantSpec(fmt, axis=-1)
  assert lb.fake_quant(x, spec).shape == (0, 128)
  for ax in (0, -1):
    with pytest.raises(ValueError, match=r"empty array of shape \(0, 128\)"):
      lb.quantize(x, lb.QuantSpec(fmt, axis=ax))
  dn = (((1,), (0,)), ((), ()))
  for mode in ("fake", "real"):
    y = ops.dot_general(x, jnp.ones((128, 4)), dn, lhs_spec=fmt, rhs_spec="int8",
                        mode=mode)
    assert y.shape == (0, 4)
    y = ops.einsum("bk,kn->bn", x, jnp.ones((128, 4)), lhs_spec=fmt, mode=mode)
    assert y.shape == (0, 4)


def test_amax_of_the_wrong_shape_names_amax_and_the_grid():
  x = jnp.ones((4, 8))
  with pytest.raises(ValueError, match=r"amax has shape \(3,\).*scale grid \(4, 1\)"):
    lb.fake_quant(x, lb.QuantSpec("int8", axis=-1), amax=jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"amin has shape \(2, 2\)"):
    lb.quantize(x, lb.QuantSpec("uint8", axis=-1), amax=jnp.ones((4, 1)),
                amin=-jnp.ones((2, 2)))
  # Shapes that broadcast to the grid are fine.
  lb.fake_quant(x, lb.QuantSpec("int8", axis=-1), amax=jnp.ones((4, 1)))
  lb.fake_quant(x, lb.QuantSpec("int8", axis=-1), amax=2.0)


def test_a_type_error_inside_a_rule_names_the_layer():
  from lowbit_jax._function import quantize_function
  from lowbit_jax._rules import QuantRule
  p, a = {"emb": {"w": _w()}}, _ids()
  qf = quantize_function(lambda p, a: jnp.dot(a, p["emb"]["w"]),
                         [QuantRule(".*", weight="int8", activation="int8")])
  with pytest.raises(TypeError, match=r"^emb/w: quantize\(\) takes a float array"):
    qf(p, a)


def test_cast_nan_behaviour_is_documented():
  from lowbit_jax.core._cast import cast
  x = jnp.array([np.nan], jnp.float32)
  # What the docstring and docs/formats.md say: no NaN code -> -0.0 unless saturate.
  assert np.signbit(np.asarray(cast(x, "fp4_e2m1")))[0]
  assert np.asarray(cast(x, "fp4_e2m1"))[0] == 0.0
  assert np.isnan(np.asarray(cast(x, "fp4_e2m1", saturate=True)))[0]
  assert "opposite sign" in cast.__doc__
  import pathlib
  doc = (pathlib.Path(__file__).parents[2] / "docs" / "formats.md").read_text()
  assert "## NaN and inf" in doc and "| fp4_e2m1 | False | -0 | 0 |" in doc


# ---------------------------------------------------------------------------
# Empty batches with quantized gradients; range keywords on QArray operands


def test_empty_batch_with_a_grad_spec_differentiates():
  # An empty batch has nothing to quantize, forward or backward: the
  # gradients are the (empty / zero) float ones.
  dn = (((1,), (0,)), ((), ()))
  x0, w = jnp.zeros((0, 16)), jnp.ones((16, 8))
  for f in (
      lambda x, w: ops.dot_general(x, w, dn, lhs_spec="int8", rhs_spec="int4",
                                   grad_spec="int8"),
      lambda x, w: ops.einsum("mk,kn->mn", x, w, lhs_spec="int8", rhs_spec="int4",
                              grad_spec="int8"),
      lambda x, w: ops.ragged_dot(x, jnp.ones((2, 16, 8)) * w[None],
                                  jnp.zeros((2,), jnp.int32), lhs_spec="int8",
                                  rhs_spec="int4", grad_spec="int8")):
    assert f(x0, w).shape == (0, 8)
    gx, gw = jax.grad(lambda x, w: jnp.sum(f(x, w)), (0, 1))(x0, w)
    assert gx.shape == (0, 16)
    np.testing.assert_array_equal(gw, np.zeros((16, 8)))


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_qarray_operands_refuse_range_keywords(mode):
  # A weight quantized ahead of time has fixed scales: a scale given for it
  # would be ignored, so both modes refuse it (real mode used to ignore it).
  dn = (((1,), (0,)), ((), ()))
  x = jax.random.normal(jax.random.key(0), (4, 16))
  wq = lb.quantize(jax.random.normal(jax.random.key(1), (16, 8)), "int8", axis=0)
  with pytest.raises(ValueError, match=r"rhs is a QArray .*got rhs_scale"):
    ops.dot_general(x, wq, dn, rhs_scale=jnp.full((1, 8), 100.0), mode=mode)
  xq = lb.quantize(x, "int8", axis=1)
  with pytest.raises(ValueError, match=r"lhs is a QArray .*got lhs_amax"):
    ops.dot_general(xq, wq, dn, lhs_amax=jnp.float32(3.0), mode=mode)


def test_a_none_history_entry_means_no_history():
  dn = (((1,), (0,)), ((), ()))
  x = jax.random.normal(jax.random.key(0), (4, 16))
  w = jax.random.normal(jax.random.key(1), (16, 8))
  h = jnp.zeros((4,), jnp.float32)
  got = ops.dot_general(x, w, dn, lhs_spec="int8", rhs_spec="int8",
                        amax_history={"lhs": h, "rhs": None})
  want = ops.dot_general(x, w, dn, lhs_spec="int8", rhs_spec="int8",
                         amax_history={"lhs": h})
  np.testing.assert_array_equal(got, want)
