"""Issue 11: bad and edge-case inputs give the right numbers or a clear error."""
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
