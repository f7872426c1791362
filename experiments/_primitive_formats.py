"""The formats bench_primitives and gpu_fusion_survey time or compile (no flags)."""

# id -> (format, QuantSpec keywords besides axis=0). The six first.
FORMATS = {
    "int8": ("int8", {}),
    "int4_g128": ("int4", dict(group_size=128)),
    "fp8_e4m3": ("fp8_e4m3", {}),
    "mxfp8_e4m3": ("mxfp8_e4m3", {}),
    "mxfp4": ("mxfp4", {}),
    "nvfp4": ("nvfp4", {}),
    "int8_g128": ("int8", dict(group_size=128)),
    "int4": ("int4", {}),
    "int3": ("int3", {}),
    "int3_g128": ("int3", dict(group_size=128)),
    "int2": ("int2", {}),
    "int2_g128": ("int2", dict(group_size=128)),
    "uint8": ("uint8", {}),
    "fp8_e5m2": ("fp8_e5m2", {}),
    "fp6_e2m3": ("fp6_e2m3", {}),
    "fp4_e2m1_g32": ("fp4_e2m1", dict(group_size=32)),
    "nf4": ("nf4", {}),
    "mxfp6_e2m3": ("mxfp6_e2m3", {}),
    "mxint8": ("mxint8", {}),
    "binary": ("binary", {}),
    "ternary": ("ternary", {}),
}
# Matmul weights: id -> (format, QuantSpec keywords; the axis is K).
MM_FORMATS = {"int4_g128": ("int4", dict(group_size=128)), "int8": ("int8", {}),
              "fp8_e4m3": ("fp8_e4m3", {})}


def fwd_bwd_bytes(f, x, ct) -> int:
  """The bytes ``f(x, ct) -> (fake-quant value, gradient)`` must move: ``x``
  read and the value written, and, unless the gradient is the cotangent
  itself (a straight-through estimator that never clips: jit hands the
  cotangent back without a kernel), the cotangent read and the gradient
  written. Counting those four always put such formats at 130-190% of the
  roofline (``benchmarks/primitives_h200.md`` before session 40)."""
  import jax  # pylint: disable=g-import-not-at-top
  jp = jax.make_jaxpr(f)(x, ct).jaxpr
  nbytes = x.size * x.dtype.itemsize
  passthrough = jp.outvars[1] is jp.invars[1]
  return (2 if passthrough else 4) * nbytes
