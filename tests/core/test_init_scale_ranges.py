"""init_scale at the ends of the float32 range (issue 11).

A learned scale initialised from a tiny or huge tensor starts where
``quantize`` would put its scale: clamped to the scale dtype's range
(docs/formats.md, "Tiny and huge ranges"), never 1 for a block that is not
all zeros, never 0, inf or a value that rounds to inf in the scale dtype.
"""
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb

_F32_MAX = float(np.finfo(np.float32).max)
_BF16_MAX = (2.0 - 2.0 ** -7) * 2.0 ** 127


def _row(amax):
  x = (np.float32(amax) * np.linspace(-1, 1, 32, dtype=np.float32))[None]
  return jnp.asarray(np.where(np.abs(x) < 2.0 ** -126, np.float32(0), x))


@pytest.mark.parametrize("fmt,kw,amax,scale", [
    ("int8", {}, 1.5 * 2.0 ** -126, 2.0 ** -126),          # was 1
    pytest.param("int8", dict(scale_dtype="float16"), 1e10, 65504.0,  # beyond float16
                 marks=pytest.mark.slow),
    pytest.param("int8", dict(scale_dtype="float16"), 1e-30, 2.0 ** -24,
                 marks=pytest.mark.slow),
    pytest.param("nf4", dict(scale_dtype="bfloat16", group_size=32), _F32_MAX,
                 _BF16_MAX, marks=pytest.mark.slow),  # rounded to inf
    ("mxfp8_e4m3", {}, 2.0 ** -120, 2.0 ** -127),          # was 1
    ("uint8", dict(symmetric=False), 1e-37, 2.0 ** -126),  # was 1
])
def test_amax_init_is_the_scale_quantize_uses(fmt, kw, amax, scale):
  spec = lb.QuantSpec(fmt, axis=-1, **kw)
  x = _row(amax)
  s = lb.init_scale(x, spec, "amax")
  assert float(s[0, 0]) == scale
  np.testing.assert_array_equal(np.asarray(lb.fake_quant(x, spec, scale=s)),
                                np.asarray(lb.fake_quant(x, spec)))


@pytest.mark.parametrize("fmt,amax,scale", [
    ("int8", 2.0 ** -125, 2.0 ** -126),       # the mean underflowed: was 1
    ("binary", _F32_MAX, _F32_MAX),           # 2 * mean overflowed: was inf
    ("nvfp4", 2.0 ** -125, 2.0 ** -126),      # tensor-scaled: float32's normal min
])
def test_lsq_init_is_clamped(fmt, amax, scale):
  s = lb.init_scale(_row(amax), lb.QuantSpec(fmt, axis=-1), "lsq")
  np.testing.assert_array_equal(np.asarray(s), np.float32(scale))


def test_zero_and_nonfinite_blocks_keep_their_meaning():
  x = np.zeros((3, 32), np.float32)
  x[1, 3] = np.inf
  x[2, 5] = 2e-38
  s = np.asarray(lb.init_scale(jnp.asarray(x), lb.QuantSpec("int8", axis=-1), "amax"))
  assert s[0, 0] == 1.0 and s[1, 0] == np.inf and s[2, 0] == np.float32(2.0 ** -126)
