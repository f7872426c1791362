"""Random operands for the GPU kernel tests (CPU reference tests and GPU runs)."""
import jax
import jax.numpy as jnp

from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem


def make_wo(key, fmt, group, m, n, k, *, out_dtype="float32",
            scale_range=(0.01, 0.1)):
  """Weight-only operands: bf16 x, K-major codes, per-format scales."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
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
    scale = jax.random.uniform(k3, (n, ng), jnp.float32, *scale_range).astype(
        jnp.bfloat16)
  prob = MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                       w_block=group, out_dtype=out_dtype)
  return MatmulOperands(x=x, w_codes=codes, w_scale=scale,
                        w_tensor_scale=ts), prob


def make_w8(key, case, m, n, k, *, out_dtype="float32", exact=False,
            e8m0_range=(110, 140)):
  """W8A8 operands for ``case`` in {fp8,int8}_{channel,block} or "mxfp8".

  ``exact`` draws small integers for fp8, so every 32-element block sum is
  exact in float32.
  """
  k1, k2, k3, k4 = jax.random.split(key, 4)
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
                         x_format=fmt, out_dtype=out_dtype)
  elif case.endswith("block"):
    sx = jax.random.uniform(k3, (m, k // 128), jnp.float32, 0.01, 0.1)
    sw = jax.random.uniform(k4, (n // 128, k // 128), jnp.float32, 0.01, 0.1)
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype=fmt, w_format=fmt,
                         x_format=fmt, w_block=(128, 128), x_block=128,
                         out_dtype=out_dtype)
  else:
    sx = jax.random.randint(k3, (m, k // 32), *e8m0_range).astype(jnp.uint8)
    sw = jax.random.randint(k4, (n, k // 32), *e8m0_range).astype(jnp.uint8)
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype="fp8_e4m3",
                         w_format="mxfp8_e4m3", x_format="mxfp8_e4m3",
                         w_block=32, x_block=32, out_dtype=out_dtype)
  return MatmulOperands(x=x, w_codes=w, w_scale=sw, x_scale=sx), prob
