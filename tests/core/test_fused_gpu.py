"""The fused primitives on a real GPU or TPU (skipped elsewhere).

On the CPU the native float8 path runs only when tests force it
(``_cast._NATIVE_ON_CPU``), through XLA's CPU convert. Here the backend's own
convert is checked: quantize takes FP8 codes straight from XLA's convert of
the clamped, unrounded values (``_quantize._grid(for_codes=True)``), so the
accelerator's float32 -> float8 conversion must round to nearest even in one
step, as the emulation (``tests/core/_reference.py``) does; and
``dequantize(quantize(x))`` must equal ``fake_quant(x)`` (ReducePrecision) bit
for bit.

Run on the GPU machine: ``python3 -m pytest -q tests/core/test_fused_gpu.py``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.core import _cast
from lowbit_jax.formats import get as get_format
from tests.core import _reference as ref

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                reason="needs a GPU or TPU backend")


def _dense(fmt) -> np.ndarray:
  """float32 patterns at, around and between every grid point, binade edges,
  and random patterns, both signs, clamped to the format's range."""
  grid = np.asarray(fmt.values(), np.float32)
  grid = np.unique(np.abs(grid[np.isfinite(grid)]))
  mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
  u = np.concatenate([grid, mids]).view(np.uint32).astype(np.int64)
  near = (u[:, None] + np.arange(-3, 4)[None, :]).ravel()
  edges = (np.arange(0, 255, dtype=np.int64)[:, None] << 23) + np.array([0, 1, 0x7FFFFF])
  rand = np.random.default_rng(0).integers(0, 0x7F800000, 1 << 18)
  mags = np.concatenate([near, edges.ravel(), rand]).clip(0, 0x7F7FFFFF).astype(np.uint32)
  y = np.concatenate([mags, mags | np.uint32(0x80000000)]).view(np.float32)
  return np.clip(y, -np.float32(fmt.max), np.float32(fmt.max))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_native_convert_rounds_like_the_emulation(name):
  fmt = get_format(name)
  if _cast._native_dtype(fmt) is None:
    pytest.skip(f"no native {name} convert on this backend")
  y = _dense(fmt)
  got = jax.jit(lambda v: _cast.encode_grid(v, fmt))(y)
  want = jax.jit(lambda v: ref.encode(ref._cast_float(v, fmt, True, None), fmt))(y)
  got, want = np.asarray(got), np.asarray(want)
  bad = np.flatnonzero(got != want)
  assert bad.size == 0, (f"{name}: {bad.size} of {y.size} codes differ, e.g. "
                         f"{y[bad[:4]]!r}: {got[bad[:4]]} vs {want[bad[:4]]}")


@pytest.mark.parametrize("fmt,kw", [("fp8_e4m3", dict(axis=0)), ("fp8_e5m2", dict(axis=1)),
                                    ("mxfp8_e4m3", dict(axis=0)), ("mxfp4", dict(axis=0)),
                                    ("nvfp4", dict(axis=0)), ("fp6_e2m3", dict(axis=0)),
                                    ("nf4", dict(axis=0)), ("int4", dict(axis=0, group_size=128))])
def test_dequantize_of_quantize_is_fake_quant(fmt, kw):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((512, 256)).astype(np.float32)
  x *= np.exp2(rng.integers(-20, 21, size=(1, 256))).astype(np.float32)
  x = jnp.asarray(x, jnp.bfloat16)
  spec = lb.QuantSpec(fmt, **kw)
  dq = jax.jit(lambda v: lb.dequantize(lb.quantize(v, spec)))(x)
  fq = jax.jit(lambda v: lb.fake_quant(v, spec))(x)
  np.testing.assert_array_equal(np.asarray(dq, np.float32), np.asarray(fq, np.float32))


def test_narrow_rounding_survives_the_backends_convert_elision():
  # XLA on a GPU drops a narrowing convert that is converted straight back
  # (excess precision): x.astype(bf16).astype(f32) is x there. The library's
  # roundings that must hold use _cast.round_to_dtype; checked here on the
  # accelerator against numpy's rounding.
  rng = np.random.default_rng(4)
  x = (rng.standard_normal((256, 256)) * np.exp2(rng.integers(-8, 8, (256, 1)))
       ).astype(np.float32)
  for dt in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn):
    got = np.asarray(jax.jit(lambda v, dt=dt: _cast.round_to_dtype(v * 1.0, dt) * 1.0)(x))
    np.testing.assert_array_equal(got, x.astype(dt).astype(np.float32))


def test_dequantize_as_holds_the_qarrays_values_when_widening():
  # A bf16 QArray read as float32 on the jnp path (the kernel off): bf16
  # values, as on CPU, inside one program with the dequantize.
  from lowbit_jax.kernels import gpu_dequantize as gd  # pylint: disable=import-outside-toplevel
  from lowbit_jax.core import _quantize  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((512, 256)), jnp.bfloat16)
  for spec in (lb.QuantSpec("int4", axis=0, group_size=128), lb.QuantSpec("nvfp4", axis=0)):
    q = lb.quantize(x, spec)
    want = np.asarray(lb.dequantize(q)).astype(np.float32)  # bf16, widened here
    with gd.forced(()):
      got = np.asarray(jax.jit(lambda qq: _quantize.dequantize_as(qq, jnp.float32) * 1.0)(q))
    np.testing.assert_array_equal(got, want)
