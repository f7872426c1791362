r"""What re-rounding a widened 16-bit input fixes and costs in the jnp quantizer.

  python3 -m experiments.bench_narrow_rounding --out /tmp/narrow_rounding.json

``_cast.astype_holding`` rounds a widened bf16 / float16 value again to its
dtype (XLA on a GPU drops the rounding of a value narrowed in the same
program; tests/core/test_excess_precision.py). ``_KEEP_NARROW_ROUNDING``
("auto") turns it on for every backend but CPU. This times ``fake_quant``
and ``quantize`` of a bf16 [rows, cols] tensor with it forced off and on,
the two variants compiled ahead of time and timed interleaved in one process
(host wall time per call, median of ``--reps``), and writes the ratios.

First, what it fixes: the share of code bytes ``quantize(x.astype(bf16))`` gets
wrong, against XLA's CPU result, when run under XLA-on-GPU's rule (the
convert pair dropped, tests/_excess_precision.py's emulation on this host)
with the re-rounding off and on, on a float32 normal [256, 256] input.
"""
from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "/tmp/narrow_rounding.json", "JSON output.")
_ROWS = flags.DEFINE_integer("rows", 2048, "Rows of the bf16 input.")
_COLS = flags.DEFINE_integer("cols", 4096, "Columns of the bf16 input.")
_REPS = flags.DEFINE_integer("reps", 15, "Timed calls per variant (interleaved).")


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import lowbit_jax as lb  # pylint: disable=import-outside-toplevel
  from lowbit_jax.core import _cast  # pylint: disable=import-outside-toplevel

  from tests._excess_precision import as_gpu_xla  # pylint: disable=import-outside-toplevel

  x32 = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)
  wrong = []
  for name, spec in {"int8_pc": lb.QuantSpec("int8", axis=0),
                     "int4_pc": lb.QuantSpec("int4", axis=0),
                     "int4_g64": lb.QuantSpec("int4", axis=0, group_size=64),
                     "fp8_e4m3_pc": lb.QuantSpec("fp8_e4m3", axis=0),
                     "nvfp4": lb.QuantSpec("nvfp4", axis=0)}.items():
    fn = lambda a, s=spec: lb.quantize(a.astype(jnp.bfloat16), s).codes
    want = np.asarray(jax.jit(fn)(x32)).view(np.uint8)
    row = {"format": name}
    for on in (False, True):
      _cast._KEEP_NARROW_ROUNDING = on  # pylint: disable=protected-access
      jax.clear_caches()
      got = np.asarray(as_gpu_xla(fn)(x32)).view(np.uint8)
      row["wrong_code_bytes_" + ("on" if on else "off")] = float(np.mean(got != want))
    wrong.append(row)
    print(f"{name:12s} code bytes wrong under the GPU rule: off {row['wrong_code_bytes_off']:.4f}"
          f"  on {row['wrong_code_bytes_on']:.4f}")
  _cast._KEEP_NARROW_ROUNDING = "auto"  # pylint: disable=protected-access
  jax.clear_caches()

  x = jnp.asarray(np.random.default_rng(0).standard_normal((_ROWS.value, _COLS.value)),
                  jnp.bfloat16)
  specs = {"int8_pc": lb.QuantSpec("int8", axis=0),
           "int4_g128": lb.QuantSpec("int4", axis=0, group_size=128),
           "fp8_e4m3_pc": lb.QuantSpec("fp8_e4m3", axis=0),
           "nvfp4": lb.QuantSpec("nvfp4", axis=0)}
  fns = {}
  for on in (False, True):
    _cast._KEEP_NARROW_ROUNDING = on  # pylint: disable=protected-access
    jax.clear_caches()  # the flag is read while tracing
    for name, spec in specs.items():
      for op in ("fake_quant", "quantize"):
        f = jax.jit((lambda a, s=spec: lb.fake_quant(a, s)) if op == "fake_quant"
                    else (lambda a, s=spec: lb.quantize(a, s).codes))
        # compiled ahead of time with the flag as set now (a cache clear
        # later cannot retrace it)
        f = f.lower(x).compile()
        jax.block_until_ready(f(x))
        fns[(on, name, op)] = f
  _cast._KEEP_NARROW_ROUNDING = "auto"  # pylint: disable=protected-access
  times = {k: [] for k in fns}
  for _ in range(_REPS.value):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(x))
      times[k].append(time.perf_counter() - t)
  rows = []
  for name in specs:
    for op in ("fake_quant", "quantize"):
      off = float(np.median(times[(False, name, op)])) * 1e3
      on = float(np.median(times[(True, name, op)])) * 1e3
      rows.append({"format": name, "op": op, "off_ms": off, "on_ms": on,
                   "ratio": on / off})
      print(f"{name:12s} {op:10s} off {off:7.2f} ms  on {on:7.2f} ms  x{on / off:.3f}")
  out = {"command": "python3 -m experiments.bench_narrow_rounding " + " ".join(
             f"--{k}={v}" for k, v in (("out", _OUT.value), ("rows", _ROWS.value),
                                       ("cols", _COLS.value), ("reps", _REPS.value))),
         "device": str(jax.devices()[0]), "jax": jax.__version__,
         "shape": [_ROWS.value, _COLS.value], "reps": _REPS.value,
         "wrong_code_bytes": wrong, "rows": rows}
  pathlib.Path(_OUT.value).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
