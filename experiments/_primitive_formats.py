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
MM_FORMATS = {"int4_g128": ("int4", dict(group_size=128)), "int4": ("int4", {}),
              "int8": ("int8", {}), "fp8_e4m3": ("fp8_e4m3", {})}
# More matmul weights on request (bench_primitives --matmul_formats, which also
# takes any id of FORMATS): the group sizes the non-kernel orders' thresholds
# depend on.
MM_MORE = {"int4_g32": ("int4", dict(group_size=32)),
           "int4_g64": ("int4", dict(group_size=64)),
           "int8_g32": ("int8", dict(group_size=32)),
           "fp4_e2m1": ("fp4_e2m1", {})}


def matmul_formats(ids):
  """id -> (format, keywords) for the matmul table: MM_FORMATS for no ids,
  else each id from MM_FORMATS, MM_MORE or FORMATS (ValueError naming the
  ids there are for an unknown one)."""
  if not ids:
    return dict(MM_FORMATS)
  known = {**FORMATS, **MM_MORE, **MM_FORMATS}
  bad = [i for i in ids if i not in known]
  if bad:
    raise ValueError(f"unknown matmul format id(s) {bad}: use ids of "
                     f"{sorted(known)}")
  return {i: known[i] for i in ids}



def fake_quant_fwd_bwd(fake_quant, spec):
  """``(x, ct) -> (fake_quant(x, spec), its gradient for the cotangent ct)``:
  the fwd+bwd the benches time (``fake_quant``: the library's, or the frozen
  reference's)."""
  import jax  # pylint: disable=g-import-not-at-top

  def f(v, ct):
    y, vjp = jax.vjp(lambda u: fake_quant(u, spec), v)
    return y, vjp(ct)[0]
  return f


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


def fwd_bwd_passes(spec) -> int:
  """How many times ``lowbit_jax.fake_quant``'s fwd+bwd must move a tensor
  of the input's size (4, or 2 where the gradient is the cotangent itself):
  ``fwd_bwd_bytes`` traced on a small tensor, as that does not depend on the
  shape."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  small = jnp.ones((256, 256), jnp.bfloat16)
  return fwd_bwd_bytes(fake_quant_fwd_bwd(lb.fake_quant, spec), small,
                       small) // small.nbytes
