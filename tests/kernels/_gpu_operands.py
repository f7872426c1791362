"""Operands and float64 decoders for the GPU kernel tests.

Random operands serve the CPU reference tests, the interpreter tests and the GPU
runs; the numpy decoders are independent of the library's (bit manipulation, no
shared helpers).
"""
import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem


# Every weight-only (format, group) the kernel implements.
WO_CASES = [("int4", None), ("int4", 32), ("int4", 64), ("int4", 128),
            ("int8", None), ("int8", 32), ("int8", 128),
            ("fp4_e2m1", None), ("fp4_e2m1", 32), ("fp4_e2m1", 128),
            ("mxfp4", 32), ("nvfp4", 16)]


def rel_err(out, want):
  """||out - want|| / ||want|| in float64; fails on NaN or inf in ``out``
  (an unwritten, NaN-poisoned element)."""
  a = np.asarray(out, np.float64)
  b = np.asarray(want, np.float64)
  assert np.all(np.isfinite(a)), "kernel left unwritten (NaN) or inf elements"
  return np.linalg.norm(a - b) / np.linalg.norm(b)


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


def abstract_wo(fmt, group, m, n, k):
  """``(MatmulOperands, MatmulProblem)`` of ShapeDtypeStructs for a weight-only
  problem (codes K-major, the scale dtype of each format), for lowering."""
  sds = jax.ShapeDtypeStruct
  four = fmt != "int8"
  sdt = {"mxfp4": jnp.uint8, "nvfp4": jnp.float8_e4m3fn}.get(fmt, jnp.bfloat16)
  ops = MatmulOperands(
      x=sds((m, k), jnp.bfloat16),
      w_codes=sds((n, k // 2), jnp.uint8) if four else sds((n, k), jnp.int8),
      w_scale=sds((n, 1 if group is None else k // group), sdt),
      w_tensor_scale=sds((), jnp.float32) if fmt == "nvfp4" else None)
  prob = MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                       w_block=group)
  return ops, prob


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


def np_unpack(codes):
  c = np.asarray(codes).astype(np.int64)
  out = np.empty(c.shape[:-1] + (2 * c.shape[-1],), np.int64)
  out[..., 0::2] = c & 0xF
  out[..., 1::2] = (c >> 4) & 0xF
  return out


def np_int4(nib):
  return np.where(nib >= 8, nib - 16, nib).astype(np.float64)


def np_e2m1(nib):
  sign = np.where(nib & 8, -1.0, 1.0)
  e = (nib >> 1) & 3
  m = nib & 1
  mag = np.where(e == 0, 0.5 * m, 2.0 ** (e - 1) * (1 + 0.5 * m))
  return sign * mag


def np_e8m0(codes):
  c = np.asarray(codes).astype(np.float64)
  return np.where(c == 255, np.nan, 2.0 ** (c - 127))


def np_e4m3(arr):
  b = np.asarray(arr).view(np.uint8).astype(np.int64)
  sign = np.where(b & 0x80, -1.0, 1.0)
  e = (b >> 3) & 0xF
  m = b & 7
  mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, 2.0 ** (e - 7) * (1 + m / 8.0))
  mag = np.where((e == 15) & (m == 7), np.nan, mag)
  return sign * mag


def np_weight_codes(fmt, codes):
  """float64 values of stored weight codes (int8, int4 or E2M1 nibbles)."""
  if fmt == "int8":
    return np.asarray(codes).astype(np.float64)
  nib = np_unpack(codes)
  return np_int4(nib) if fmt == "int4" else np_e2m1(nib)


def np_weight(fmt, codes, scale, group, n, k, tscale=None):
  vals = np_weight_codes(fmt, codes)
  if fmt == "mxfp4":
    s = np_e8m0(scale)
  elif fmt == "nvfp4":
    s = np_e4m3(scale) * float(tscale)
  else:
    s = np.asarray(scale).astype(np.float64)
  if group is None:
    s = np.broadcast_to(s.reshape(n, 1), (n, k))
  else:
    s = np.repeat(s.reshape(n, k // group), group, axis=1)
  return vals * s


def _bf16(a):
  """float64 values rounded to bfloat16 (exact products first go to float32)."""
  return np.asarray(a, np.float32).astype(jnp.bfloat16).astype(np.float64)


def np_weight_only(ops, prob, acc_scale=False):
  """float64 result of the weight-only kernel's arithmetic.

  Group scales multiply the decoded codes in bfloat16 (one rounding, as the
  kernel scales its bf16 weight tile); per-channel scales and NVFP4's tensor
  scale multiply the accumulator. Everything else is exact here. With
  ``acc_scale`` (``Config.acc_scale``) the group scales multiply each group's
  partial sum, in their own precision: nothing is rounded.
  """
  fmt, g, n, k = prob.w_format, prob.w_block, prob.n, prob.k
  vals = np_weight_codes(fmt, ops.w_codes)
  if fmt == "mxfp4":
    s = np_e8m0(ops.w_scale)
  elif fmt == "nvfp4":
    s = np_e4m3(ops.w_scale)
  elif acc_scale:
    s = np.asarray(ops.w_scale, np.float32).astype(np.float64)
  else:
    s = _bf16(np.asarray(ops.w_scale, np.float32))
  x = np.asarray(ops.x, np.float64)
  if g is None:
    y = (x @ vals.T) * s.reshape(1, n)
  elif acc_scale:
    y = x @ (vals * np.repeat(s.reshape(n, k // g), g, axis=1)).T
  else:
    y = x @ _bf16(vals * np.repeat(s.reshape(n, k // g), g, axis=1)).T
  if ops.w_tensor_scale is not None:
    y = y * float(ops.w_tensor_scale)
  return y


def np_w8a8(ops, prob):
  """float64 W8A8 result from the codes and scales (all three scale modes)."""
  m, n, k = prob.m, prob.n, prob.k
  if prob.w_format == "int8":
    xv = np.asarray(ops.x, np.float64)
    wv = np.asarray(ops.w_codes, np.float64)
  else:
    xv = np_e4m3(ops.x)
    wv = np_e4m3(ops.w_codes)
  if prob.w_format == "mxfp8_e4m3":
    return np.einsum("mbk,nbk,mb,nb->mn", xv.reshape(m, k // 32, 32),
                     wv.reshape(n, k // 32, 32), np_e8m0(ops.x_scale),
                     np_e8m0(ops.w_scale))
  sx = np.asarray(ops.x_scale, np.float64)
  sw = np.asarray(ops.w_scale, np.float64)
  if prob.w_block is None:
    return (xv * sx) @ (wv * sw).T
  xs = xv * np.repeat(sx, 128, axis=1)
  ws = wv * np.repeat(np.repeat(sw, 128, axis=0), 128, axis=1)
  return xs @ ws.T
