r"""Does a per-channel quantizer's second read of ``x`` come from L2 if it is
done one column band at a time? (GPU only; issue 12.)

A per-channel (or per-tensor) scale needs the range of a whole axis before any
element can be quantized, so XLA's program reads ``x`` twice: an amax
reduction, then the kernel that scales, rounds and writes. On a bf16
``[8192, 8192]`` tensor (128 MB, more than the 50 MB L2) both reads come from
DRAM, which caps int8 quantize at 60% of the ``x * 2`` roofline
(``benchmarks/primitives_h200.md``). Cut into column bands that fit in L2, the
second read of each band could come from the L2 if the band's quantize runs
right after its amax. This times, for int8 per channel (scales along axis 0),
plain jnp (not the library's bit-exact path; the question is the memory
traffic):

* ``two_pass``: the amax of the whole tensor, then the quantize;
* ``bands_<B>_parts``: ``B`` bands, each band's amax then its quantize,
  ordered by ``optimization_barrier`` (each amax waits for the previous
  band's codes); the codes left as ``B`` arrays (the L2 effect alone);
* ``bands_<B>_dus``: the same, each band's codes written into one
  ``[K, N]`` buffer (``dynamic_update_slice`` in place, after a zero fill:
  what a real implementation without its own kernel would pay);
* ``amax``, ``quantize_given_amax`` and ``x * 2`` for scale.

Device time per call with CUPTI (every kernel of a call). Writes a JSON and
prints a table::

  PYTHONPATH=. python3 -m experiments.probe_l2_bands --result_json=/tmp/l2_bands.json
"""
from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

_SHAPE = flags.DEFINE_string("tensor", "8192x8192", "K x N of the bf16 tensor")
_BANDS = flags.DEFINE_list("band_counts", ["2", "4", "8"], "band counts to time")
_ITERS = flags.DEFINE_integer("calls", 20, "calls timed per program")
_OUT = flags.DEFINE_string("result_json", "", "JSON file to write")


def programs(k: int, n: int, bands):
  """``{name: fn(x)}`` of the programs in the module docstring."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  def amax(x):
    return jnp.max(jnp.abs(x), axis=0, keepdims=True).astype(jnp.float32)

  def quant(x, a):
    s = jnp.where(a > 0, a / 127.0, 1.0)
    return jnp.clip(jnp.round(x.astype(jnp.float32) / s), -127, 127).astype(jnp.int8)

  def two_pass(x):
    a = amax(x)
    return quant(x, a), a

  def banded(nb: int, assemble: bool):
    w = n // nb

    def fn(x):
      out = jnp.zeros((k, n), jnp.int8) if assemble else None
      parts, scales = [], []
      dep = x
      for b in range(nb):
        xb = lax.slice_in_dim(dep, b * w, (b + 1) * w, axis=1)
        a = amax(xb)
        q = quant(xb, a)
        scales.append(a)
        if assemble:
          out = lax.dynamic_update_slice(out, q, (0, b * w))
          out, dep = lax.optimization_barrier((out, dep))
        else:
          parts.append(q)
          q, dep = lax.optimization_barrier((q, dep))
          parts[-1] = q
      return (out if assemble else parts), jnp.concatenate(scales, axis=1)
    return fn

  progs = {"x * 2": lambda x: x * 2, "amax": amax,
           "quantize_given_amax": lambda x, a: quant(x, a),
           "two_pass": two_pass}
  for nb in bands:
    progs[f"bands_{nb}_parts"] = banded(nb, False)
    progs[f"bands_{nb}_dus"] = banded(nb, True)
  return {name: jax.jit(f) for name, f in progs.items()}


def fusions(fn, *args) -> int:
  """The fusions (kernels, but for library calls) of ``fn``'s compiled entry."""
  text = fn.lower(*args).compile().as_text()
  return text.split("\nENTRY")[-1].count(" fusion(")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    sys.exit("probe_l2_bands times GPU programs: run it on a GPU")
  from experiments import _cupti  # pylint: disable=g-import-not-at-top
  k, n = (int(v) for v in _SHAPE.value.lower().split("x"))
  bands = [int(b) for b in _BANDS.value]
  for b in bands:
    if n % b:
      raise app.UsageError(f"--band_counts: {b} does not divide N = {n}")
  x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32).astype(jnp.bfloat16)
  a = jnp.max(jnp.abs(x), axis=0, keepdims=True).astype(jnp.float32)
  rows = []
  dev = jax.devices()[0].device_kind
  for name, fn in programs(k, n, bands).items():
    args = (x, a) if name == "quantize_given_amax" else (x,)
    jax.block_until_ready(fn(*args))
    us = 1e3 * _cupti.median_ms(fn, *args, iters=_ITERS.value)
    rows.append(dict(program=name, us=round(us, 2), fusions=fusions(fn, *args)))
    print(f"{name:24s} {us:9.2f} us", flush=True)
  res = dict(device=dev, jax=jax.__version__, shape=[k, n], iters=_ITERS.value,
             command="python3 -m experiments.probe_l2_bands " + " ".join(sys.argv[1:]),
             rows=rows)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)
