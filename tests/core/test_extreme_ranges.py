"""Every format over the whole float32 range: no NaN, no zeros, no disagreement.

Quantization commutes with power-of-two scaling: for ``x`` with amax near 1,
``quantize(x * 2**k)`` has the same codes as ``quantize(x)`` and scales (and
values) ``2**k`` times larger, exactly, as long as the scaled scale is a
representable number. The sweep checks the library at amax ``2**k`` for every
float32 exponent ``k`` against the frozen reference (tests/core/_reference.py)
at amax 1, scaled by ``2**k`` in float64: bit for bit where the exact scale is
representable (E8M0: every code, 2**-127 included; float32 scales: normal
numbers), and where it is not (a float32 scale would be subnormal and is held
at 2**-126), that the result is still finite, ``dequantize(quantize(x)) ==
fake_quant(x)``, and no large element is lost. At every amax,
``dequantize(quantize(x)) == fake_quant(x)``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from tests.core import _reference as ref

# (id, QuantSpec keywords)
SPECS = [
    ("int8", dict(format="int8", axis=-1)),
    ("int4_g32", dict(format="int4", axis=-1, group_size=32)),
    ("uint8", dict(format="uint8", axis=-1, symmetric=False)),
    ("uint4_g32", dict(format="uint4", axis=-1, group_size=32, symmetric=False)),
    ("fp8_e4m3", dict(format="fp8_e4m3", axis=-1)),
    ("fp8_e5m2_tensor", dict(format="fp8_e5m2", axis="tensor")),
    ("fp6_e3m2", dict(format="fp6_e3m2", axis=-1, group_size=32)),
    ("nf4", dict(format="nf4", axis=-1, group_size=32)),
    ("int8_bf16_scale", dict(format="int8", axis=-1, scale_dtype="bfloat16")),
    ("binary", dict(format="binary", axis=-1)),
    ("ternary", dict(format="ternary", axis=-1)),
    ("mxfp8", dict(format="mxfp8_e4m3", axis=-1)),
    ("mxfp6", dict(format="mxfp6_e3m2", axis=-1)),
    ("mxfp4", dict(format="mxfp4", axis=-1)),
    ("mxint8", dict(format="mxint8", axis=-1)),
    ("int8_e8m0_ceil", dict(format="int8", axis=-1, group_size=32, scale_dtype="e8m0",
                            scale_rounding="ceil")),
    ("nvfp4", dict(format="nvfp4", axis=-1)),
]
# Every float32 binade of the amax (the base tensor's amax is 1) where the
# input's elements (down to amax / 32) are normal numbers.
EXPONENTS = list(range(-121, 128))


def _base():
  rng = np.random.default_rng(0)
  mag = 2.0 ** rng.uniform(-5, 0, (4, 64))  # within 2**5 of the amax
  x = (np.sign(rng.standard_normal((4, 64))) * mag).astype(np.float32)
  x[:, ::32] = np.float32(1.0)  # every block's amax is 1
  x[1, 1] = np.float32(-1.0)
  x[2, 40:44] = 0.0
  return x


@functools.lru_cache(maxsize=None)
def _fns(key):
  spec = lb.QuantSpec(**dict(SPECS)[key])
  lib = jax.jit(jax.vmap(lambda x: (lb.quantize(x, spec), lb.fake_quant(x, spec),
                                    lb.dequantize(lb.quantize(x, spec)))))
  return spec, lib


def _exact_scale_ok(spec, ref_q, k):
  """Whether the exact scales at amax 2**k are representable as ``spec`` stores
  them: E8M0 codes 2**-127..2**127 (subnormal 2**-127 included), else normal
  float32 numbers (NVFP4: its float32 tensor scale)."""
  if spec.scale_dtype == "e8m0":
    e = np.asarray(ref_q.scale).astype(np.int64) - 127 + k
    return bool(np.all((e >= -127) & (e <= 127)))
  s = np.asarray(ref_q.tensor_scale if spec.tensor_scale else ref_q.scale, np.float64)
  s = s * 2.0 ** k
  return bool(np.all(s[s > 0] >= 2.0 ** -126))


# Run in CI: one spec per scale path (float32 scale, asymmetric, mean, E8M0,
# two-level); the sweep over all of them is marked slow.
FAST = ("int8", "uint8", "binary", "mxint8", "nvfp4")


@pytest.mark.parametrize("name", [
    s[0] if s[0] in FAST else pytest.param(s[0], marks=pytest.mark.slow)
    for s in SPECS])
def test_every_binade_matches_the_scaled_reference(name):
  spec, lib = _fns(name)
  base = _base()
  # The reference runs op by op (a jit of it compiles for seconds).
  ref_q = ref.quantize(jnp.asarray(base), spec)
  ref_fq = np.asarray(ref.dequantize(ref_q), np.float64)
  ref_codes = np.asarray(ref_q.codes)
  xs = np.stack([(base.astype(np.float64) * 2.0 ** k).astype(np.float32)
                 for k in EXPONENTS])
  assert np.all(np.isfinite(xs))
  qs, fqs, dqs = lib(jnp.asarray(xs))
  codes, fqs, dqs = np.asarray(qs.codes), np.asarray(fqs), np.asarray(dqs)
  i0 = EXPONENTS.index(0)
  if spec.element.name in ("binary", "ternary"):
    # Scales are means: the sum's order may differ between compilations, so
    # the library matches the reference to an ulp at amax 1, and its own
    # result at amax 1 exactly at every other amax.
    np.testing.assert_allclose(fqs[i0], ref_fq, rtol=2e-7)
    want0, codes0 = fqs[i0].astype(np.float64), codes[i0]
  else:
    np.testing.assert_array_equal(fqs[i0], ref_fq)
    want0, codes0 = ref_fq, ref_codes
  failures = []
  for i, k in enumerate(EXPONENTS):
    x, fq, dq = xs[i], fqs[i], dqs[i]
    if not np.all(np.isfinite(fq)):
      failures.append((k, "non-finite"))
    elif not np.array_equal(fq, dq):
      failures.append((k, "fake_quant != dequantize(quantize)"))
    elif _exact_scale_ok(spec, ref_q, k):
      if not np.array_equal(fq, (want0 * 2.0 ** k).astype(np.float32)):
        failures.append((k, "values differ from the scaled reference"))
      elif not np.array_equal(codes[i], codes0):
        failures.append((k, "codes differ from the reference"))
    else:
      # A float32 scale would be subnormal: it is held at 2**-126 instead (fewer
      # grid levels), so large elements (a quarter of the amax and up) keep
      # their value to within half of it, and none is flushed to zero.
      big = np.abs(x) >= 2.0 ** (k - 2)
      err = np.abs(fq.astype(np.float64) - x)
      if not (np.all(fq[big] != 0)
              and np.all(err[big] <= np.abs(x[big]) * 0.5 + 2.0 ** -126)):
        failures.append((k, "elements lost below the smallest normal scale"))
  assert not failures, f"{name}: {len(failures)} binades fail: {failures[:6]}"
