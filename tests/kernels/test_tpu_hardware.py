"""The TPU kernels compiled by Mosaic and run on a real TPU (skipped elsewhere).

Never run so far: no TPU was available when these kernels were written (see
BUILD.md). The checks mirror the CPU interpret-mode tests in
``test_tpu_kernels.py`` at larger, model-like shapes:

* dyadic inputs (activations k / 8, power-of-two scales): every product and
  partial sum is exact in float32 on the MXU, so the kernel must equal the
  reference bit for bit (guaranteed for weight-only; for W8A8 at K = 4096 it
  needs the int32 sums below 2**24, which random codes exceed with negligible
  probability: their typical size is about 2**18.5);
* random inputs: elementwise bound ``4 (K + 2) 2**-24 sum_k |x_k| |w_k|``. The
  CPU tests use twice the float32 summation bound; here the reference's
  HIGHEST-precision matmul is a multi-pass bfloat16 emulation of float32 on the
  MXU, so the bound is doubled again.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.kernels import tpu_matmul
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem

pytestmark = pytest.mark.tpu

CASES = [
    ("w8a16", None), ("w8a16", 128),
    ("w4a16", None), ("w4a16", 32), ("w4a16", 64), ("w4a16", 128),
    ("w8a8", None),
]
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (512, 2048, 4096),
          (100, 1024, 2048)]


def _problem(m, n, k, kind, g, out="float32"):
  if kind == "w8a8":
    return MatmulProblem(m, n, k, "int8", "int8", None, "int8", None, out,
                         "tpu")
  return MatmulProblem(m, n, k, "bfloat16", "int8" if kind == "w8a16" else
                       "int4", g, None, None, out, "tpu")


def _operands(p: MatmulProblem, dyadic: bool, seed) -> MatmulOperands:
  rng = np.random.default_rng(zlib.crc32(repr(seed).encode()))
  m, n, k = p.m, p.n, p.k
  if p.w_format == "int4":
    codes = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
  else:
    codes = jnp.asarray(rng.integers(-128, 128, (n, k)), jnp.int8)

  def scales(shape, lo_exp, hi_exp):
    if dyadic:
      return jnp.asarray(2.0 ** rng.integers(lo_exp, hi_exp + 1, shape),
                         jnp.float32)
    return jnp.asarray(rng.uniform(0.5, 2.0, shape) * 2.0**lo_exp, jnp.float32)

  groups = 1 if p.w_block is None else k // p.w_block
  # Two exponents only: with |x| <= 1, |code| <= 128 and K <= 4096 every
  # weight-only partial sum then needs at most 23 significant bits.
  w_scale = scales((n, groups), -7, -6)
  x_scale = None
  if p.x_format == "int8":
    x = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    x_scale = scales((m, 1), -8, -4)
  elif dyadic:
    x = jnp.asarray(rng.integers(-8, 9, (m, k)) / 8.0, jnp.bfloat16)
  else:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  return MatmulOperands(x, codes, w_scale, x_scale)


def _abs_product(ops: MatmulOperands, p: MatmulProblem) -> np.ndarray:
  """``|x| @ |w|.T`` in float64, from a numpy decode of the raw codes."""
  codes = np.asarray(ops.w_codes)
  if p.w_format == "int4":
    nib = np.empty((p.n, p.k), np.int64)
    nib[:, 0::2] = codes & 0x0F
    nib[:, 1::2] = codes >> 4
    w = np.where(nib > 7, nib - 16, nib).astype(np.float64)
  else:
    w = codes.astype(np.float64)
  s = np.asarray(ops.w_scale, np.float64)
  w = w * (s if p.w_block is None else np.repeat(s, p.w_block, axis=1))
  x = np.asarray(ops.x.astype(jnp.float32), np.float64)
  if p.x_format == "int8":
    x = x * np.asarray(ops.x_scale, np.float64)
  return np.abs(x) @ np.abs(w).T


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("kind,g", CASES)
def test_compiled_kernel_exact_on_dyadic_inputs(kind, g, m, n, k):
  p = _problem(m, n, k, kind, g)
  assert tpu_matmul.supports(p)
  ops = _operands(p, dyadic=True, seed=(kind, g, m, n, k))
  got = jax.jit(lambda o: tpu_matmul.matmul(o, p))(ops)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(tpu_matmul.reference(ops, p)))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("kind,g", CASES)
def test_compiled_kernel_matches_reference_random(kind, g, m, n, k):
  p = _problem(m, n, k, kind, g)
  ops = _operands(p, dyadic=False, seed=(kind, g, m, n, k, "random"))
  got = np.asarray(tpu_matmul.matmul(ops, p), np.float64)
  ref = np.asarray(tpu_matmul.reference(ops, p), np.float64)
  bound = 4 * (k + 2) * 2.0**-24 * _abs_product(ops, p)
  assert np.all(np.abs(got - ref) <= bound), np.max(np.abs(got - ref) / bound)
