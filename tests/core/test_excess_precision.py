"""The library's results under XLA-on-GPU's excess precision, checked on CPU.

XLA on a GPU drops a narrowing float convert that is converted straight back
(tests/_excess_precision.py emulates that rule on any backend). A quantizer
or matmul fed a bf16 value made in the same program then saw the float32
value it was narrowed from: the session 55 audit found int8 codes one step
off in about 5% of elements. Each test runs a function under the emulation
with the library's re-rounding on (``_cast._KEEP_NARROW_ROUNDING``; "auto"
turns it on for every backend but CPU, whose XLA keeps the pairs) and
compares with XLA's CPU result bit for bit; each first checks that the
emulation dropped a pair, and that without the re-rounding the result would
differ (so the comparison is not vacuous).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.core import _cast, ops
from lowbit_jax.core import _quantize
from tests._excess_precision import Counter, as_gpu_xla


def _bits(a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.itemsize == 1:
    return a.view(np.uint8)
  return a.astype(np.float32).view(np.uint32) if jnp.issubdtype(a.dtype, jnp.floating) \
      else a


def _same_as_cpu(fn, *args, monkeypatch, must_differ=True):
  """fn under the GPU rule equals fn on CPU; without the re-rounding the GPU
  rule would have changed it (``must_differ``). The flag is read while
  tracing, so jax's trace caches are cleared after each change of it."""
  want = jax.tree.map(_bits, jax.jit(fn)(*args))
  monkeypatch.setattr(_cast, "_KEEP_NARROW_ROUNDING", False)
  jax.clear_caches()
  c = Counter()
  before = jax.tree.map(_bits, as_gpu_xla(fn, c)(*args))
  assert c.dropped > 0, "the emulation dropped no convert pair: nothing is checked"
  if must_differ:
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(want))), "the GPU rule changed nothing"
  monkeypatch.setattr(_cast, "_KEEP_NARROW_ROUNDING", True)
  jax.clear_caches()
  got = jax.tree.map(_bits, as_gpu_xla(fn)(*args))
  jax.clear_caches()  # nothing traced with the flag forced outlives the test
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


def _x(shape=(256, 256), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fmt,kw", [
    ("int8", {}), ("int4", dict(group_size=64)), ("int4", dict(symmetric=False)),
    ("fp8_e4m3", {}), ("nvfp4", {}), ("mxfp4", {})])
def test_quantize_of_a_value_narrowed_in_the_program(fmt, kw, dtype, monkeypatch):
  spec = lb.QuantSpec(fmt, axis=0, **kw)

  def fn(a):
    v = a.astype(dtype)  # a bf16 layer's cast of float32 weights
    q = lb.quantize(v, spec)
    return q.codes, lb.fake_quant(v, spec)
  _same_as_cpu(fn, _x(), monkeypatch=monkeypatch)


def test_learned_scale_and_clip_of_a_narrowed_value(monkeypatch):
  spec = lb.QuantSpec("int8", axis=0)
  x = _x()
  scale = jnp.max(jnp.abs(x), axis=0, keepdims=True) / 127.0
  clip = jnp.full((1, 256), 1.5, jnp.float32)

  def fn(a, s, c):
    v = a.astype(jnp.bfloat16)
    return lb.fake_quant(v, spec, scale=s), lb.fake_quant(v, spec, clip=c)
  _same_as_cpu(fn, x, scale, clip, monkeypatch=monkeypatch)


def test_dequantize_as_widening_a_bf16_qarray(monkeypatch):
  q = lb.quantize(_x().astype(jnp.bfloat16), lb.QuantSpec("int4", axis=0, group_size=128))
  _same_as_cpu(lambda qq: _quantize.dequantize_as(qq, jnp.float32) * 1.0, q,
               monkeypatch=monkeypatch)


@pytest.mark.parametrize("mode", ["fake", "real"])
def test_float32_activations_against_a_bf16_weight(mode, monkeypatch):
  # The weight's quantized values are bf16; the op widens them to the
  # activations' float32 (fake mode: the fake-quant output; real mode: the
  # dequantized weight).
  x, w = _x((64, 256), 1), _x((256, 128), 2).astype(jnp.bfloat16)
  spec = lb.QuantSpec("int4", axis=0, group_size=64)

  def dot(a, b):
    return ops.dot_general(a, b, (((1,), (0,)), ((), ())), rhs_spec=spec, mode=mode,
                           use_kernel="never")

  def einsum(a, b):
    return ops.einsum("mk,kn->mn", a, b, rhs_spec=spec, mode=mode)
  _same_as_cpu(dot, x, w, monkeypatch=monkeypatch)
  _same_as_cpu(einsum, x, w, monkeypatch=monkeypatch)


def test_ragged_dot_and_conv_widen_bf16_weights(monkeypatch):
  x = _x((32, 128), 3)
  w = _x((4, 128, 64), 4).astype(jnp.bfloat16)
  gsz = jnp.asarray([8, 8, 8, 8], jnp.int32)
  spec = lb.QuantSpec("int4", axis=1, group_size=64)
  _same_as_cpu(lambda a, b: ops.ragged_dot(a, b, gsz, rhs_spec=spec, mode="fake"),
               x, w, monkeypatch=monkeypatch)
  img = _x((2, 16, 16, 32), 5)
  k = _x((3, 3, 32, 16), 6).astype(jnp.bfloat16)
  _same_as_cpu(
      lambda a, b: ops.conv_general_dilated(
          a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          rhs_spec=lb.QuantSpec("int8", axis=3), mode="fake"),
      img, k, monkeypatch=monkeypatch)


def test_zero_point_correction_sums_the_rounded_activations(monkeypatch):
  # The codes-in-dot order with an asymmetric per-channel weight: the GEMM
  # reads the bf16 activation, so the zero point's correction must sum the
  # same bf16 values (x.((c - z)s) = (x.c)s - (sum x) z s). As on a GPU,
  # the dot runs in bf16 (_compute_dtype).
  monkeypatch.setattr(ops, "_compute_dtype", lambda dt: jnp.bfloat16)
  x = _x((16, 256), 7) * 3.0
  w = lb.quantize(_x((256, 128), 8).astype(jnp.bfloat16) + 0.7,
                  lb.QuantSpec("uint8", axis=0, symmetric=False))

  def fn(a, ww):
    return ops.dot_general(a.astype(jnp.bfloat16), ww, (((1,), (0,)), ((), ())),
                           mode="real", use_kernel="never")
  _same_as_cpu(fn, x, w, monkeypatch=monkeypatch)
