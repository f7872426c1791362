"""RTN's reported scales at the ends of the float32 range (issue 11).

``rtn_scale`` must give the scale RTN used exactly, for every E8M0 exponent:
a floor-rounded power-of-two scale an ulp low drops a binade, and one flushed
to 0 is re-derived as 2**-127.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.algorithms import rtn, rtn_scale


def _kernel(amax):
  """[64, 4] with amax ``amax`` per column, normal numbers or zeros only."""
  w = np.float32(amax) * np.linspace(-1, 1, 64, dtype=np.float32)[:, None]
  w = np.repeat(w, 4, axis=1) * np.float32([1.0, 0.75, 0.5, 0.3])
  return np.where(np.abs(w) < 2.0 ** -126, 0, w).astype(np.float32)


@pytest.mark.parametrize("name,amax", [
    ("mxfp8_e4m3", 2.0 ** -118),  # scale 2**-126: exp2 gave 0 on CPU
    ("mxfp8_e4m3", 2.0 ** -120),  # scale 2**-127 (a float32 subnormal)
    ("mxfp8_e4m3", 2.0 ** 21),    # scale 2**13: exp2 gave one ulp below
    ("mxfp8_e4m3", 2.0 ** 126),
])
def test_rtn_scale_is_the_exact_power_of_two(name, amax):
  spec = lb.QuantSpec(name, axis=0)
  w = jnp.asarray(_kernel(amax))
  s = np.asarray(rtn_scale(w, spec))
  code = np.asarray(lb.quantize(w, spec).scale).astype(np.int64)
  np.testing.assert_array_equal(s.astype(np.float64), np.ldexp(1.0, code - 127))
  want = np.asarray(rtn(w, spec))
  np.testing.assert_array_equal(np.asarray(lb.fake_quant(w, spec, scale=jnp.asarray(s))),
                                want)
  assert np.count_nonzero(want) > 100


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_rtn_scale_of_mean_magnitude_formats_stores_rtn_exactly(fmt):
  # rtn_scale returned amax / element max for binary and ternary, whose scale
  # is a mean magnitude: re-quantizing rtn(w) with it was off by up to 3.1,
  # and ptq_params(method="rtn") refused them with a groups message.
  w = jax.random.normal(jax.random.key(0), (32, 16))
  spec = lb.QuantSpec(fmt, axis=0)
  s = rtn_scale(w, spec)
  want = rtn(w, spec)
  np.testing.assert_array_equal(lb.dequantize(lb.quantize(want, spec, scale=s)), want)
  res = lb.ptq_params(lambda p, x: x @ p["w"], {"w": w},
                      [(jax.random.normal(jax.random.key(1), (8, 32)),)],
                      [lb.QuantRule(".*", weight=fmt)], method="rtn")
  np.testing.assert_array_equal(res.params["w"], want)


def test_a_spec_counts_the_bits_its_padded_and_packed_quantize_stores():
  # bits_per_element counted n / block scales and unpadded codes: mxfp4 with
  # pad=True on a [40, 24] kernel claimed 4.40 bits and stored 6.80, so a
  # mixed-precision allocation went over its budget.
  for spec, shape in ((lb.QuantSpec("mxfp4", axis=0, pad=True), (40, 24)),
                      (lb.QuantSpec("int4", axis=0, group_size=16, pad=True), (40, 24)),
                      (lb.QuantSpec("int4", axis=0), (7, 5)),
                      (lb.QuantSpec("int3", axis=0), (9, 5)),
                      (lb.QuantSpec("nvfp4", axis=0, pad=True), (40, 24))):
    q = lb.quantize(jnp.ones(shape), spec)
    assert spec.bits_per_element(shape) == pytest.approx(q.bits_per_element), spec
