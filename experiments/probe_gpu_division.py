"""Which float32 division the GPU quantizer must emit to give XLA's bits.

The kernel divides in two contexts (``gpu_quantize.DIVISION``): a block's
scale from its amax (``scale``) and an element by its scale (``data``); each
can be ``div.full.f32`` (approximate, within 2 ulp) or ``div.rn.f32`` (IEEE).
XLA's GPU path must be matched bit for bit, and what XLA emits is a property
of its version and fusion emitter, not of the source: a deviceless compile
with jax 0.10.2 shows ``div.full.f32``, while on the H200 with jax 0.11.2
uint8 per channel (``x / s + zp``) differed from XLA exactly at float32 ties
``k + 0.5`` (session 29: 107 of 1M codes, each where the IEEE quotient gives
the tie). This probe quantizes a bf16 tensor with per-column ranges through
XLA's path and through the kernel under every combination, and prints the
mismatching codes and scales of each::

  PYTHONPATH=. python3 experiments/probe_gpu_division.py \\
      --kinds=uint8_pc,binary_pc,int8_pc,int4_g128,fp4_e2m1_g32,nvfp4

Two tensors (``--data``): ``columns``, normal values with every column its
own range (2**-30 .. 2**30), and ``blocks``, the quantizer bench's tensor
(normal values times 2**e, e in -8 .. 8, per 16-row block), whose small
blocks put many quotients near a binary code's threshold (2**-24 from 0)
that the first one almost never reaches: session 29's bench found binary
per channel inexact on it while this probe, on ``columns`` only, found it
exact.

On CPU it runs the interpreter (256x256), where every division is exact:
a dry run of the script only.
"""
from __future__ import annotations

import time

from absl import app
from absl import flags

_KINDS = flags.DEFINE_list("kinds", ["uint8_pc", "binary_pc", "int8_pc",
                                     "int4_g128"], "gpu_quantize kinds")
_SHAPE = flags.DEFINE_string("shape", "8192x8192", "K x N (GPU; 256x256 on CPU)")
_DATA = flags.DEFINE_list("data", ["columns", "blocks"], "tensors to probe: "
                          "columns (a range per column), blocks (the quantizer "
                          "bench's 2**e per 16-row block)")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lj  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_quantize as gq  # pylint: disable=g-import-not-at-top
  gpu = jax.default_backend() == "gpu"
  k, n = (int(v) for v in _SHAPE.value.split("x")) if gpu else (256, 256)
  tensors = {}
  for name in _DATA.value:
    if name == "columns":
      rng = np.random.default_rng(2)
      x = rng.standard_normal((k, n)).astype(np.float32)
      x *= np.exp2(rng.integers(-30, 31, (1, n)))  # every column its own range
      tensors[name] = jnp.asarray(x).astype(jnp.bfloat16)
    elif name == "blocks":  # as experiments/bench_gpu_quantize.py draws it
      x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
      e = jax.random.randint(jax.random.key(1), (k // 16, 1, n), -8, 9)
      x = (x.reshape(k // 16, 16, n) * jnp.exp2(e.astype(jnp.float32))).reshape(k, n)
      tensors[name] = x.astype(jnp.bfloat16)
    else:
      raise app.UsageError(f"--data: unknown tensor {name!r} (columns, blocks)")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {k}x{n}", flush=True)
  t0 = time.time()
  saved = dict(gq.DIVISION)
  try:
    for (data, x), kind in ((d, kk) for d in tensors.items() for kk in _KINDS.value):
      spec = gq.spec_for(kind)
      with gq.forced(()):
        want = jax.jit(lambda a, spec=spec: lj.quantize(a, spec))(x)
      wc = np.asarray(want.codes).view(np.uint8)
      ws = np.asarray(want.scale).view(np.uint8)
      out = []
      for sc, da in (("full", "full"), ("full", "rn"), ("rn", "rn"), ("rn", "full")):
        gq.DIVISION.update(scale=sc, data=da)
        gq._build.cache_clear()  # pylint: disable=protected-access
        got = jax.jit(lambda a, spec=spec: gq.quantize(a, spec, interpret=not gpu))(x)
        gc = np.asarray(got.codes).view(np.uint8)
        gs = np.asarray(got.scale).view(np.uint8)
        out.append(f"scale={sc} data={da}: codes {int((gc != wc).sum())}, "
                   f"scales {int((gs != ws).sum())}")
      print(f"{kind} ({data}): " + " | ".join(out)
            + f"  [{time.time() - t0:.0f} s]", flush=True)
  finally:
    gq.DIVISION.update(saved)
    gq._build.cache_clear()  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
