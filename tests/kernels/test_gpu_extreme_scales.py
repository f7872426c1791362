"""Kernel jnp paths at tiny scales (issue 11).

NVFP4 with a tensor amax of 2**-120..2**-126 holds its float32 tensor scale at
2**-126, and the E4M3 block scale times that is a float32 subnormal, flushed
to 0 by XLA on CPU, though the weights are normal numbers; an MXFP4 block
with E8M0 code 0 has the subnormal scale 2**-127. The decoded weight and the
reference must be core ``dequantize``'s numbers bit for bit (core also
flushes weights whose exact value is subnormal, on CPU); the XLA fused path
and the interpreted kernel, which apply NVFP4's tensor scale to the f32
output, must give the exact (float64) product, not zeros. (Activations are
at least 1 in magnitude: a product of a weight near 2**-126 and an
activation below 1 is subnormal, flushed inside any f32 dot on CPU.)
"""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.core import ops as core_ops
from lowbit_jax.kernels import _gpu_common as common
from lowbit_jax.kernels import gpu_weight_only as wo
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem
from tests.kernels._gpu_operands import np_weight, rel_err

M, N, K = 8, 64, 256


def _weight(fmt, amax, seed=0):
  """A quantized K-major weight with amax ``amax``: magnitudes spread over
  up to 2**-8 of it, none below 2**-126 (normal numbers only)."""
  rng = np.random.default_rng(seed)
  span = min(8.0, np.log2(amax) + 126)
  w = np.sign(rng.standard_normal((K, N))) * amax * 2.0 ** -rng.uniform(0, span, (K, N))
  w[0, 0] = amax
  w = w.astype(np.float32)
  q = core_ops.prepare_weight(jnp.asarray(w), lb.QuantSpec(fmt))
  group = {"nvfp4": 16, "mxfp4": 32}[fmt]
  # |x| in [1, 2): a product of x and a normal weight is normal.
  x = jnp.asarray(np.sign(rng.standard_normal((M, K))) * rng.uniform(1, 2, (M, K)),
                  jnp.bfloat16)
  ops = MatmulOperands(x=x, w_codes=q.codes, w_scale=q.scale,
                       w_tensor_scale=q.tensor_scale)
  prob = MatmulProblem(m=M, n=N, k=K, x_dtype="bfloat16", w_format=fmt,
                       w_block=group, out_dtype="float32")
  return q, ops, prob


def _want(q, ops):
  w = lb.dequantize(q)
  return jnp.dot(ops.x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)


def _exact(ops, prob):
  """float64 ``x @ w.T`` with the weights' exact values (no flush)."""
  w = np_weight(prob.w_format, ops.w_codes, ops.w_scale, prob.w_block, N, K,
                ops.w_tensor_scale)
  return np.asarray(ops.x, np.float64) @ w.T


@pytest.mark.parametrize("fmt,amax", [("nvfp4", 2.0 ** -120), ("nvfp4", 2.0 ** -126),
                                      pytest.param("mxfp4", 1.5 * 2.0 ** -125,  # code 0
                                                   marks=pytest.mark.slow)])
def test_jnp_paths_match_core_dequantize(fmt, amax):
  q, ops, prob = _weight(fmt, amax)
  if fmt == "nvfp4":
    assert float(q.tensor_scale) == 2.0 ** -126
  else:
    assert int(np.asarray(q.scale).min()) == 0
  w_core = np.asarray(lb.dequantize(q))
  if amax >= 2.0 ** -123:  # nearer 2**-126 most results are subnormal (0 on CPU)
    assert np.count_nonzero(w_core) > w_core.size // 2
  np.testing.assert_array_equal(np.asarray(common.dequantize_weight(ops, prob)), w_core)
  want = np.asarray(_want(q, ops))
  np.testing.assert_allclose(np.asarray(wo.reference(ops, prob)), want, rtol=1e-5,
                             atol=0)
  if fmt == "mxfp4":
    return  # the fused path's subnormal E8M0 scale: flushed on CPU (documented)
  exact = _exact(ops, prob)  # the fused path scales the dot's output
  normal = np.abs(exact) > 2.0 ** -125  # outputs that are not subnormal
  assert normal.mean() > 0.7
  for decode in ("native", "arith"):
    got = jax.jit(lambda o, d=decode: wo.xla_fused_matmul(o, prob, decode=d))(ops)
    assert rel_err(np.asarray(got)[normal], exact[normal]) < 1e-5, decode


def test_e8m0_factors_are_exact_for_every_code():
  codes = jnp.arange(256, dtype=jnp.uint8)
  f1, f2 = (np.asarray(f, np.float64) for f in common.e8m0_factors(codes))
  assert np.all(np.abs(f1[:255]) >= 2.0 ** -126) and np.all(f2 >= 2.0 ** -126)
  np.testing.assert_array_equal(f1[:255] * f2[:255], np.ldexp(1.0, np.arange(255) - 127))
  assert np.isnan(f1[255])


@pytest.mark.slow
def test_interpreted_kernel_applies_the_tiny_tensor_scale_to_the_accumulator():
  """The kernel multiplies its f32 accumulator by the tensor scale (never the
  block scales by it), so it needs no refusal in ``supports``."""
  q, ops, prob = _weight("nvfp4", 2.0 ** -120)
  cfg = wo.Config(tile_n=64, tile_k=256, tile_m=8, stages=2, split_k=1, ws=False)
  out = wo.matmul(ops, prob, config=cfg, interpret=common.interpret_params(True))
  assert rel_err(out, _exact(ops, prob)) < 1e-5
