"""GPU tests of the Mosaic GPU low-bit kernels against their references.

Every check draws fresh random inputs (never zeros), frees a NaN buffer of the
output's size right before the kernel runs (so an unwritten element shows up as
NaN or a large error), and compares with the module's ``reference``. Needs a
Hopper GPU (sm_90); skipped elsewhere (tests/conftest.py skips ``gpu`` tests
without a GPU backend, and the fixture below skips non-Hopper GPUs).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.kernels import gpu_w8a8
from lowbit_jax.kernels import gpu_weight_only
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_hopper():
  dev = jax.devices()[0]
  if not str(getattr(dev, "compute_capability", "")).startswith("9."):
    pytest.skip("Mosaic GPU kernels here target Hopper (sm_90)")


def _key():
  return jax.random.key(time.time_ns() % (2 ** 31))


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "kernel left unwritten (NaN) or inf elements"
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _run_poisoned(fn, ops, shape, dtype):
  poison = jnp.full(shape, jnp.nan, dtype)
  poison.block_until_ready()
  poison.delete()
  return jax.block_until_ready(jax.jit(fn)(ops))


def _wo_ops(fmt, group, m, n, k):
  k1, k2, k3, k4 = jax.random.split(_key(), 4)
  x = jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16)
  if fmt == "int8":
    codes = jax.random.randint(k2, (n, k), -127, 128).astype(jnp.int8)
  else:
    codes = jax.random.randint(k2, (n, k // 2), 0, 256).astype(jnp.uint8)
  ng = 1 if group is None else k // group
  ts = None
  if fmt == "mxfp4":
    scale = jax.random.randint(k3, (n, ng), 118, 136).astype(jnp.uint8)
  elif fmt == "nvfp4":
    scale = jax.random.uniform(k3, (n, ng), jnp.float32, 0.02, 3.0).astype(
        jnp.float8_e4m3fn)
    ts = jax.random.uniform(k4, (), jnp.float32, 0.5, 2.0)
  else:
    scale = jax.random.uniform(k3, (n, ng), jnp.float32, 0.001, 0.02).astype(
        jnp.bfloat16)
  prob = MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                       w_block=group)
  return MatmulOperands(x=x, w_codes=codes, w_scale=scale,
                        w_tensor_scale=ts), prob


WO_CASES = [("int4", 128), ("int4", 32), ("int4", None), ("int8", None),
            ("int8", 128), ("fp4_e2m1", 32), ("mxfp4", 32), ("nvfp4", 16)]


@pytest.mark.parametrize("fmt,group", WO_CASES)
@pytest.mark.parametrize("m,n,k", [(1, 1024, 2048), (5, 2048, 4096),
                                   (16, 4096, 8192)])
def test_weight_only_kernel_matches_reference(fmt, group, m, n, k):
  ops, prob = _wo_ops(fmt, group, m, n, k)
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob), ops, (m, n),
                      jnp.bfloat16)
  ref = gpu_weight_only.reference(ops, prob)
  assert out.shape == (m, n) and out.dtype == jnp.bfloat16
  assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("ws", [False, True])
def test_weight_only_kernel_real_shape(ws):
  ops, prob = _wo_ops("int4", 128, 16, 8192, 8192)
  cfg = gpu_weight_only.Config(tile_n=64, tile_k=512 if ws else 256, tile_m=16,
                               stages=4, split_k=1 if ws else 2, ws=ws)
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob, config=cfg),
                      ops, (16, 8192), jnp.bfloat16)
  assert _rel(out, gpu_weight_only.reference(ops, prob)) < 1e-2


def _w8_ops(case, m, n, k, exact=False):
  k1, k2, k3, k4 = jax.random.split(_key(), 4)
  if case.startswith("int8"):
    fmt = "int8"
    x = jax.random.randint(k1, (m, k), -127, 128).astype(jnp.int8)
    w = jax.random.randint(k2, (n, k), -127, 128).astype(jnp.int8)
  elif exact:
    fmt = "fp8_e4m3"
    x = jax.random.randint(k1, (m, k), -8, 9).astype(jnp.float8_e4m3fn)
    w = jax.random.randint(k2, (n, k), -8, 9).astype(jnp.float8_e4m3fn)
  else:
    fmt = "fp8_e4m3"
    x = (jax.random.normal(k1, (m, k)) * 4).astype(jnp.float8_e4m3fn)
    w = (jax.random.normal(k2, (n, k)) * 4).astype(jnp.float8_e4m3fn)
  if case.endswith("channel"):
    sx = jax.random.uniform(k3, (m, 1), jnp.float32, 0.01, 0.1)
    sw = jax.random.uniform(k4, (n, 1), jnp.float32, 0.01, 0.1)
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype=fmt, w_format=fmt,
                         x_format=fmt)
  elif case.endswith("block"):
    sx = jax.random.uniform(k3, (m, k // 128), jnp.float32, 0.01, 0.1)
    sw = jax.random.uniform(k4, (n // 128, k // 128), jnp.float32, 0.01, 0.1)
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype=fmt, w_format=fmt,
                         x_format=fmt, w_block=(128, 128), x_block=128)
  else:
    sx = jax.random.randint(k3, (m, k // 32), 117, 137).astype(jnp.uint8)
    sw = jax.random.randint(k4, (n, k // 32), 117, 137).astype(jnp.uint8)
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype="fp8_e4m3",
                         w_format="mxfp8_e4m3", x_format="mxfp8_e4m3",
                         w_block=32, x_block=32,
                         out_dtype="float32" if exact else "bfloat16")
  return MatmulOperands(x=x, w_codes=w, w_scale=sw, x_scale=sx), prob


@pytest.mark.parametrize("case", ["fp8_channel", "int8_channel", "fp8_block",
                                  "int8_block", "mxfp8"])
@pytest.mark.parametrize("m,n,k", [(256, 512, 1024), (512, 1024, 2048)])
def test_w8a8_kernel_matches_reference(case, m, n, k):
  ops, prob = _w8_ops(case, m, n, k)
  out = _run_poisoned(lambda o: gpu_w8a8.matmul(o, prob), ops, (m, n),
                      jnp.bfloat16)
  assert _rel(out, gpu_w8a8.reference(ops, prob)) < 1e-2


def test_mxfp8_kernel_is_bit_exact_on_exact_block_sums():
  ops, prob = _w8_ops("mxfp8", 256, 512, 1024, exact=True)
  out = _run_poisoned(lambda o: gpu_w8a8.matmul(o, prob), ops, (256, 512),
                      jnp.float32)
  ref = gpu_w8a8.reference(ops, prob)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_supports_measured_cases_on_hopper():
  assert gpu_weight_only.supports(MatmulProblem(
      m=1, n=8192, k=8192, x_dtype="bfloat16", w_format="int4", w_block=128))
  assert gpu_w8a8.supports(MatmulProblem(
      m=4096, n=8192, k=8192, x_dtype="fp8_e4m3", w_format="fp8_e4m3",
      x_format="fp8_e4m3"))
