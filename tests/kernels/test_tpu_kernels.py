"""CPU tests of the Mosaic TPU low-bit matmul kernels.

The kernels run in Pallas' TPU interpreter (``interpret=True`` ->
``pltpu.InterpretParams()``), which emulates TPU semantics on CPU: blocked
operands, VMEM scratch left NaN-filled until written, sequential K steps. Every
kernel is checked against ``tpu_matmul.reference``, and the reference against an
independent float64 numpy decode of the raw codes.

Tolerances. Integer codes are exact in bfloat16 and their products with
bfloat16 activations are exact in float32, so kernel and reference differ only
by float32 rounding of sums. (1) With "dyadic" inputs (activations k / 8,
power-of-two scales) every partial sum is a float32-representable number, so
kernel, reference and float64 decode must agree bit for bit. (2) With random
normal activations and arbitrary scales, both sides are within the classic
summation bound ``(K + 2) * 2**-24 * sum_k |x_k| |w_k|`` of the exact value, so
they differ by at most twice that; the test asserts this elementwise bound.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.kernels import tpu_matmul
from lowbit_jax.core import QuantSpec
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem

# (kind, weight group size): every kernel and group size the brief asks for.
CASES = [
    ("w8a16", None), ("w8a16", 128), ("w8a16", 32),
    ("w4a16", None), ("w4a16", 32), ("w4a16", 64), ("w4a16", 128),
    ("w8a8", None),
]
_U = 2.0**-24  # float32 unit roundoff.


def _rng(*key) -> np.random.Generator:
  """A generator seeded from the test case, so failures reproduce."""
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _problem(m, n, k, kind, g=None, out="float32", x_block=None,
             backend="tpu"):
  if kind == "w8a8":
    return MatmulProblem(m, n, k, "int8", "int8", g, "int8", x_block, out,
                         backend)
  return MatmulProblem(m, n, k, "bfloat16", "int8" if kind == "w8a16" else
                       "int4", g, None, None, out, backend)


def _scale_shape(block, rows, cols):
  if block is None:
    return (rows, 1)
  if isinstance(block, int):
    return (rows, cols // block)
  return (rows // block[0], cols // block[1])


def _operands(rng, p: MatmulProblem, dyadic: bool,
              scale_dtype=jnp.float32) -> MatmulOperands:
  """Fresh random operands; ``dyadic`` makes every partial sum exact."""
  m, n, k = p.m, p.n, p.k
  if p.w_format == "int4":
    codes = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
  else:
    codes = jnp.asarray(rng.integers(-128, 128, (n, k)), jnp.int8)

  def scales(shape, lo_exp, hi_exp):
    if dyadic:
      s = 2.0 ** rng.integers(lo_exp, hi_exp + 1, shape)
    else:
      s = rng.uniform(0.5, 2.0, shape) * 2.0**lo_exp
    return jnp.asarray(s, scale_dtype)

  w_scale = scales(_scale_shape(p.w_block, n, k), -8, -4)
  x_scale = None
  if p.x_format == "int8":
    x = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    x_scale = scales(_scale_shape(p.x_block, m, k), -6, -2)
  elif dyadic:
    x = jnp.asarray(rng.integers(-8, 9, (m, k)) / 8.0, jnp.bfloat16)
  else:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  return MatmulOperands(x, codes, w_scale, x_scale)


def _decode_f64(ops: MatmulOperands, p: MatmulProblem):
  """Independent float64 numpy decode: returns (x, w) as [M, K], [N, K]."""
  codes = np.asarray(ops.w_codes)
  if p.w_format == "int4":
    nib = np.empty((p.n, p.k), np.int64)
    nib[:, 0::2] = codes & 0x0F
    nib[:, 1::2] = codes >> 4
    w = np.where(nib > 7, nib - 16, nib).astype(np.float64)
  else:
    w = codes.astype(np.float64)

  def expand(s, block, rows, cols):
    s = np.asarray(s.astype(jnp.float32), np.float64)
    if block is None:
      return np.broadcast_to(s, (rows, cols))
    if isinstance(block, int):
      return np.kron(s, np.ones((1, block)))
    return np.kron(s, np.ones(block))

  w = w * expand(ops.w_scale, p.w_block, p.n, p.k)
  x = np.asarray(ops.x.astype(jnp.float32), np.float64)
  if p.x_format == "int8":
    x = x * expand(ops.x_scale, p.x_block, p.m, p.k)
  return x, w


def _blocks_for(kind, m):
  """Small explicit blocks for M=128 (several M, N and K steps), else default."""
  if m < 128:
    return {}
  return dict(block_m=64, block_n=128, block_k=256)


@pytest.mark.parametrize("m", [1, 8, 128])
@pytest.mark.parametrize("kind,g", CASES)
def test_kernel_exact_on_dyadic_inputs(kind, g, m):
  rng = _rng((kind, g, m))
  p = _problem(m, 256, 512, kind, g)
  ops = _operands(rng, p, dyadic=True)
  got = tpu_matmul.matmul(ops, p, interpret=True, **_blocks_for(kind, m))
  ref = tpu_matmul.reference(ops, p)
  assert got.shape == (m, 256) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  x, w = _decode_f64(ops, p)
  np.testing.assert_array_equal(np.asarray(ref, np.float64), x @ w.T)


@pytest.mark.parametrize("kind,g", CASES)
def test_kernel_matches_reference_random(kind, g):
  rng = _rng((kind, g, "random"))
  m, n, k = 8, 512, 512
  scale_dtype = jnp.bfloat16 if g == 64 else jnp.float32
  p = _problem(m, n, k, kind, g)
  ops = _operands(rng, p, dyadic=False, scale_dtype=scale_dtype)
  got = np.asarray(tpu_matmul.matmul(ops, p, interpret=True, block_k=256),
                   np.float64)
  ref = np.asarray(tpu_matmul.reference(ops, p), np.float64)
  x, w = _decode_f64(ops, p)
  bound = 2 * (k + 2) * _U * (np.abs(x) @ np.abs(w).T)
  assert np.all(np.abs(got - ref) <= bound), np.max(np.abs(got - ref) / bound)
  # The bound is tight enough to see a 2**-7 relative change (one bfloat16
  # ulp) of one channel's scales.
  mutated = ops.__class__(ops.x, ops.w_codes,
                          ops.w_scale.at[0].multiply(1 + 2.0**-7),
                          ops.x_scale)
  ref_mutated = np.asarray(tpu_matmul.reference(mutated, p), np.float64)
  assert not np.all(np.abs(got - ref_mutated) <= bound)

  # bfloat16 output: the same float32 value rounded once, so within 1 ulp.
  p16 = _problem(m, n, k, kind, g, out="bfloat16")
  got16 = tpu_matmul.matmul(ops, p16, interpret=True)
  assert got16.dtype == jnp.bfloat16
  ref16 = np.asarray(tpu_matmul.reference(ops, p16), np.float64)
  got16 = np.asarray(got16, np.float64)
  assert np.all(np.abs(got16 - ref16) <= 2.0**-8 * np.abs(ref16) + bound)


@pytest.mark.parametrize("m,block_m", [(1, None), (40, 16), (129, None),
                                       (200, 64)])
@pytest.mark.parametrize("kind,g", [("w8a16", 128), ("w4a16", 32),
                                    ("w8a8", None)])
def test_m_not_a_multiple_of_the_block_is_padded(kind, g, m, block_m):
  if kind == "w8a8" and block_m == 16:
    block_m = 32  # int8 activations tile by 32 rows.
  rng = _rng((kind, g, m, "pad"))
  p = _problem(m, 256, 256, kind, g, out="bfloat16")
  ops = _operands(rng, p, dyadic=True)
  bm = block_m or tpu_matmul.default_blocks(p)[0]
  assert m % bm  # The case under test: a partial last M block.
  got = tpu_matmul.matmul(ops, p, interpret=True, block_m=block_m)
  assert got.shape == (m, 256) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(tpu_matmul.reference(ops, p),
                                           np.float32))


def test_matmul_under_jit_with_bf16_scales():
  rng = np.random.default_rng(7)
  p = _problem(16, 256, 512, "w4a16", 128, out="bfloat16")
  ops = _operands(rng, p, dyadic=True, scale_dtype=jnp.bfloat16)
  f = jax.jit(lambda o: tpu_matmul.matmul(o, p, interpret=True))
  np.testing.assert_array_equal(np.asarray(f(ops), np.float32),
                                np.asarray(tpu_matmul.reference(ops, p),
                                           np.float32))


@pytest.mark.parametrize("kind,g,x_block", [
    ("w8a16", None, None), ("w8a16", 128, None), ("w4a16", None, None),
    ("w4a16", 32, None), ("w4a16", 64, None), ("w4a16", 128, None),
    ("w4a16", (64, 128), None), ("w8a8", None, None), ("w8a8", 128, 128),
])
def test_reference_against_float64_numpy_decode(kind, g, x_block):
  rng = _rng((kind, str(g), x_block))
  m, n, k = 16, 256, 512
  p = _problem(m, n, k, kind, g, x_block=x_block, backend="cpu")
  ops = _operands(rng, p, dyadic=False)
  ref = np.asarray(tpu_matmul.reference(ops, p), np.float64)
  x, w = _decode_f64(ops, p)
  exact = x @ w.T
  # Rounding of the dequantized operands (2 u) plus float32 summation (K u).
  bound = (k + 4) * _U * (np.abs(x) @ np.abs(w).T)
  assert np.all(np.abs(ref - exact) <= bound)


def test_reference_int4_nibble_convention():
  # Byte 0x8F: low nibble 0xF (k = 0) is -1, high nibble 0x8 (k = 1) is -8.
  # Byte 0x71: low nibble 0x1 (k = 2) is 1, high nibble 0x7 (k = 3) is 7.
  p = MatmulProblem(1, 1, 4, "bfloat16", "int4", None, backend="cpu",
                    out_dtype="float32")
  ops = MatmulOperands(
      x=jnp.asarray([[1.0, 10.0, 100.0, 1000.0]], jnp.bfloat16),
      w_codes=jnp.asarray([[0x8F, 0x71]], jnp.uint8),
      w_scale=jnp.asarray([[0.5]], jnp.float32))
  y = tpu_matmul.reference(ops, p)
  assert float(y[0, 0]) == 0.5 * (-1 - 80 + 100 + 7000)


@pytest.mark.parametrize("problem,reason", [
    (_problem(1, 256, 512, "w8a16", None, backend="gpu"), "backend"),
    (_problem(1, 256, 512, "w8a16", None, backend="cpu"), "backend"),
    (MatmulProblem(1, 256, 512, "bfloat16", "fp8_e4m3", backend="tpu"),
     "not handled"),
    (MatmulProblem(1, 256, 512, "float32", "int8", backend="tpu"),
     "bfloat16 activations"),
    (_problem(1, 200, 512, "w8a16", None), "N=200"),
    (_problem(1, 256, 384, "w4a16", None), "K=384"),
    (_problem(1, 256, 320, "w8a16", None), "K=320"),
    (_problem(1, 256, 512, "w4a16", 16), "power of two >= 32"),
    (_problem(1, 256, 512, "w4a16", 96), "power of two >= 32"),
    (_problem(1, 256, 768, "w8a16", 512), "does not divide K"),
    (_problem(1, 256, 512, "w4a16", (128, 128)), "2-D"),
    (_problem(1, 256, 512, "w8a8", 128), "per-channel"),
    (_problem(1, 256, 512, "w8a8", None, x_block=128), "per-token"),
    (_problem(1, 256, 512, "w8a16", None, out="int32"), "out_dtype"),
    (_problem(1, 256, 2 ** 17, "w8a8", None), "int32 accumulator"),
])
def test_supports_says_no_with_a_reason(problem, reason):
  assert not tpu_matmul.supports(problem)
  assert reason in tpu_matmul.unsupported_reason(problem)
  # The problem is refused before the operands are looked at.
  dummy = MatmulOperands(jnp.zeros((1, 1), jnp.bfloat16),
                         jnp.zeros((1, 1), jnp.int8), jnp.ones((1, 1)))
  with pytest.raises(ValueError, match="does not support"):
    tpu_matmul.matmul(dummy, problem, interpret=True)


@pytest.mark.parametrize("problem", [
    _problem(1, 256, 512, kind, g) for kind, g in CASES] + [
    _problem(4096, 28672, 8192, "w4a16", 128),
    _problem(3, 128, 256, "w4a16", 256),
    _problem(5, 384, 1152, "w8a16", 64),
])
def test_supports_says_yes(problem):
  assert tpu_matmul.supports(problem)
  assert tpu_matmul.unsupported_reason(problem) is None


@pytest.mark.parametrize("problem,blocks", [
    (_problem(1, 8192, 8192, "w4a16", 128), (16, 512, 1024)),
    (_problem(1, 384, 1152, "w8a16", None), (16, 128, 128)),
    (_problem(300, 1024, 4096, "w8a8", None), (128, 512, 1024)),
    (_problem(4096, 1024, 4096, "w8a8", None), (256, 512, 1024)),
    (_problem(520, 1024, 4096, "w8a16", 32), (128, 512, 1024)),
    (_problem(9, 256, 768, "w4a16", 64), (16, 256, 256)),
    (_problem(4096, 28672, 8192, "w4a16", 32), (256, 256, 1024)),
    (_problem(4096, 28672, 8192, "w4a16", None), (256, 512, 1024)),
])
def test_default_blocks(problem, blocks):
  assert tpu_matmul.default_blocks(problem) == blocks


def test_bad_operands_and_blocks_raise():
  rng = np.random.default_rng(1)
  p = _problem(8, 256, 512, "w4a16", 64)
  ops = _operands(rng, p, dyadic=True)
  with pytest.raises(ValueError, match="w_codes has shape"):
    tpu_matmul.matmul(ops.__class__(ops.x, ops.w_codes[:, :128], ops.w_scale),
                      p, interpret=True)
  with pytest.raises(ValueError, match="w_scale has shape"):
    tpu_matmul.matmul(ops.__class__(ops.x, ops.w_codes, ops.w_scale[:, :4]),
                      p, interpret=True)
  with pytest.raises(TypeError, match="x has dtype"):
    tpu_matmul.matmul(ops.__class__(ops.x.astype(jnp.float32), ops.w_codes,
                                    ops.w_scale), p, interpret=True)
  with pytest.raises(TypeError, match="w_codes has dtype"):
    tpu_matmul.matmul(ops.__class__(ops.x, ops.w_codes.astype(jnp.int8),
                                    ops.w_scale), p, interpret=True)
  with pytest.raises(ValueError, match="block_m=8"):
    tpu_matmul.matmul(ops, p, interpret=True, block_m=8)
  with pytest.raises(ValueError, match="block_n=192"):
    tpu_matmul.matmul(ops, p, interpret=True, block_n=192)
  with pytest.raises(ValueError, match="block_k=128 must be a multiple of 256"):
    tpu_matmul.matmul(ops, p, interpret=True, block_k=128)
  p8 = _problem(8, 256, 512, "w8a8", None)
  ops8 = _operands(rng, p8, dyadic=True)
  with pytest.raises(ValueError, match="x_scale is missing"):
    tpu_matmul.matmul(ops8.__class__(ops8.x, ops8.w_codes, ops8.w_scale), p8,
                      interpret=True)
  with pytest.raises(ValueError, match="block_m=16 must be a positive multiple "
                     "of 32"):
    tpu_matmul.matmul(ops8, p8, interpret=True, block_m=16)


@pytest.mark.parametrize("kind,g", CASES)
def test_kernels_lower_to_mosaic_tpu(kind, g):
  """Pallas -> Mosaic lowering (block-shape checks, op lowering) for TPU.

  This runs on CPU and stops before the Mosaic compiler in libtpu, which is
  what a real TPU would run next.
  """
  p = _problem(16, 256, 512, kind, g, out="bfloat16")
  ops = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                     _operands(np.random.default_rng(0), p, dyadic=True))
  lowered = jax.jit(lambda o: tpu_matmul.matmul(o, p)).trace(ops).lower(
      lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()


def test_grad_through_the_dispatched_kernel(monkeypatch):
  # Real mode with a stored weight is differentiable in the float activation
  # (a frozen quantized base under LoRA); where a Pallas kernel served the
  # matmul, jax.grad failed inside Pallas' JVP rule with a bare AssertionError.
  from lowbit_jax.core import ops
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
  qw = ops.prepare_weight(jnp.asarray(rng.standard_normal((256, 128)) * 0.05,
                                      jnp.float32), QuantSpec("int8"))
  dn = (((1,), (1,)), ((), ()))

  def loss(a, use_kernel):
    y = ops.dot_general(a, qw, dn, mode="real", use_kernel=use_kernel)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  want = jax.grad(loss)(x, "never")
  kp, mm = ops.kernel_problem, tpu_matmul.matmul
  monkeypatch.setattr(ops, "kernel_problem",
                      lambda *a, **kw: kp(*a, **{**kw, "backend": "tpu"}))
  monkeypatch.setattr(tpu_matmul, "matmul",
                      lambda o, p, **kw: mm(o, p, **{**kw, "interpret": True}))
  got = jax.grad(loss)(x, "always")
  assert got.dtype == jnp.bfloat16
  # (bf16 activations: the kernel's and XLA's forward round differently)
  err = np.linalg.norm(np.asarray(got, np.float32) - np.asarray(want, np.float32))
  assert err < 1e-2 * np.linalg.norm(np.asarray(want, np.float32))
