r"""Is fp8 fake quantization really rounded on this device? Ours vs qwix's, and per-kernel times.

  # GPU (qwix from the carried wheels, see BUILD.md):
  PYTHONPATH=/tmp/site:. python3 -m experiments.check_fp8_rounding --out $OUT/fp8_check.json

XLA on the GPU allows excess precision: a narrowing convert followed by a
widening one (``x.astype(float8).astype(bfloat16)``) may be elided, leaving
``x`` unrounded. This checks, on a random bf16 [4096, 4096] tensor, whether a
per-channel e4m3 fake quantization (``dequantize(quantize(x))``) still holds
float8 or ReducePrecision ops after compilation, and how many of its outputs differ from the
ml_dtypes e4m3 reference or equal the input, for lowbit_jax and (where
importable) qwix's ``quantize_api``/``dequantize``. It then times our fp8 and
int8 ``fake_quant`` on [8192, 8192] kernel by kernel (CUPTI), and three
implementations of the saturating fp8 rounding step on the same tensor: the
integer emulation, ``lax.reduce_precision`` (what ``_cast_float`` uses) and a
native convert whose codes are decoded arithmetically; ``x * 2`` is the
bandwidth ceiling. The ``reduce_precision`` rounding is also compared bit for
bit with the emulation on 2**23 random float32 patterns.
"""
from __future__ import annotations

import json
import pathlib

from absl import app, flags

_OUT = flags.DEFINE_string("out", "/tmp/fp8_check.json", "JSON output.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import _cast  # pylint: disable=g-import-not-at-top
  from lowbit_jax.formats import get as get_format  # pylint: disable=g-import-not-at-top

  on_gpu = jax.default_backend() == "gpu"
  if on_gpu:
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top

  def timed(f, *a, per_kernel=False):
    if not on_gpu:
      return None
    _, ts = profiler.measure(f, iterations=10, aggregate=not per_kernel)(*a)
    if per_kernel:
      return [(n[:90], round(v * 1e3, 1)) for n, v in ts[-1]]
    return float(np.median(ts)) * 1e3

  dev = jax.devices()[0]
  out = {"device": f"{dev.platform}: {getattr(dev, 'device_kind', '?')}",
         "jax": jax.__version__}
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.standard_normal((4096, 4096)), jnp.bfloat16)
  xv = np.asarray(xs, np.float32)

  def audit(f, scale, divide_in_bf16):
    hlo = jax.jit(f).lower(xs).compile().as_text()
    d = np.asarray(jax.jit(f)(xs), np.float32)
    s = np.asarray(scale, np.float32)
    y = xv / s  # lowbit_jax divides in float32, qwix in the input's bf16
    if divide_in_bf16:
      y = y.astype(ml_dtypes.bfloat16).astype(np.float32)
    want = (np.asarray(y.astype(ml_dtypes.float8_e4m3fn), np.float32) * s)
    want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
    return dict(compiled_rounds=("f8e4m3fn" in hlo or "reduce-precision" in hlo),
                frac_equal_to_input=float(np.mean(d == xv)),
                frac_off_the_e4m3_reference=float(np.mean(d != want)),
                distinct_values_in_column_0=int(len(np.unique(d[:, 0]))))

  spec = lb.QuantSpec("fp8_e4m3", axis=0)
  out["lowbit_jax"] = audit(lambda v: lb.fake_quant(v, spec), lb.quantize(xs, spec).scale,
                            False)
  try:
    from qwix._src.core import qarray as qa  # pylint: disable=g-import-not-at-top
    qfn = lambda v: qa.quantize_api(v, jnp.float8_e4m3fn, channelwise_axes=(1,))  # noqa: E731
    out["qwix"] = audit(lambda v: qa.dequantize(qfn(v)), qfn(xs).scale, True)
  except ImportError as e:
    out["qwix"] = f"not importable: {e}"

  x = jnp.asarray(rng.standard_normal((8192, 8192)), jnp.bfloat16)
  kernels = {}
  for name, ax in (("fp8_e4m3", 0), ("fp8_e4m3", 1), ("int8", 0), ("int8", 1)):
    sp = lb.QuantSpec(name, axis=ax)
    kernels[f"{name} axis={ax}"] = timed(jax.jit(lambda v, sp=sp: lb.fake_quant(v, sp)), x,
                                         per_kernel=True)
  out["fake_quant_kernels_us"] = kernels

  fmt = get_format("fp8_e4m3")
  s = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=0) / 448

  def native_decode(y):
    m = np.float32(fmt.max)
    c = lax.bitcast_convert_type(jnp.clip(y, -m, m).astype(jnp.float8_e4m3fn), jnp.uint8)
    u = c.astype(jnp.uint32)
    e, man = (u >> 3) & 15, u & 7
    normal = lax.bitcast_convert_type(((e + 120) << 23) | (man << 20), jnp.float32)
    v = jnp.where(e == 0, man.astype(jnp.float32) * np.float32(2.0 ** -9), normal)
    return jnp.where((u >> 7) != 0, -v, v)

  emulation = lambda y: _cast._cast_float(y, fmt, True, None)  # noqa: E731
  variants = {"reduce_precision": lambda y: _cast._cast_float_rp(y, fmt),
              "native convert + arithmetic decode": native_decode}
  orig = _cast._reduce_precision_ok
  _cast._reduce_precision_ok = lambda f: False
  try:
    variants["integer emulation"] = jax.jit(emulation)
    rounding = {}
    for k, r in variants.items():
      g = jax.jit(lambda v, s_, r=r: (r(v.astype(jnp.float32) / s_) * s_).astype(jnp.bfloat16))
      rounding[k] = timed(g, x, s)
    u = rng.integers(0, 0x7F800000, 1 << 22).astype(np.uint32)
    y = np.concatenate([u, u | np.uint32(0x80000000)]).view(np.float32)
    a = np.asarray(jax.jit(variants["reduce_precision"])(y)).view(np.uint32)
    b = np.asarray(jax.jit(emulation)(y)).view(np.uint32)
    out["reduce_precision_vs_emulation_mismatches"] = int(np.sum(a != b))
  finally:
    _cast._reduce_precision_ok = orig
  rounding["x * 2 (bandwidth ceiling)"] = timed(jax.jit(lambda v: v * 2), x)
  out["fp8_rounding_step_us"] = rounding
  pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(_OUT.value).write_text(json.dumps(out, indent=1))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
