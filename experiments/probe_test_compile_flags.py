r"""What the CPU test suite's XLA flags (tests/conftest.py) cost and change.

For each set of XLA flags, in a fresh process each (XLA reads its flags once):

* ``compile_ms``: the mean compile time (``jax.jit(f).lower(x).compile()``)
  of 30 small programs, ``sum(tanh(a) @ a.T, axis=0)`` on 30 shapes, and
  ``lower_ms``, jax's lowering of each before it;
* ``fma``: whether XLA's CPU code contracts ``a * b + c`` into one fused
  multiply-add (the float32 results of 4096 random triples equal the
  once-rounded float64 ones) or rounds the product first (equal numpy's
  ``a * b + c``).

Prints a table (and a JSON with --result_json)::

  PYTHONPATH=. python3 -m experiments.probe_test_compile_flags

The flag sets: XLA's defaults, the suite's level-0 compile, and the older
fusion emitters the suite does not use.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

FLAG_SETS = {
    "defaults": "",
    "suite (level 0)": ("--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true"),
    "level 0 + old emitters": ("--xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true "
                               "--xla_cpu_use_fusion_emitters=false"),
}

_RESULT_JSON = flags.DEFINE_string("result_json", None, "also write the rows here")

_CHILD = r"""
import json, time
import numpy as np
import jax, jax.numpy as jnp
xs = [jnp.ones((i + 3, 7)) for i in range(30)]
jax.block_until_ready(xs)
lower = comp = 0.0
for x in xs:
  t0 = time.perf_counter()
  lowered = jax.jit(lambda a: jnp.sum(jnp.tanh(a) @ a.T, axis=0)).lower(x)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  lower += t1 - t0
  comp += t2 - t1
rng = np.random.default_rng(0)
a, b, c = (rng.standard_normal(4096).astype(np.float32) for _ in range(3))
got = np.asarray(jax.jit(lambda a, b, c: a * b + c)(a, b, c))
fused = (a.astype(np.float64) * b + c).astype(np.float32)
if np.array_equal(got, fused):
  fma = "contracted"
elif np.array_equal(got, a * b + c):
  fma = "product rounded"
else:
  fma = "neither"
print(json.dumps({"lower_ms": 1e3 * lower / len(xs),
                  "compile_ms": 1e3 * comp / len(xs), "fma": fma}))
"""


def main(argv):
  del argv
  rows = []
  for name, xla_flags in FLAG_SETS.items():
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True,
                         capture_output=True, text=True).stdout
    rows.append({"flags": name, "xla_flags": xla_flags,
                 **json.loads(out.strip().splitlines()[-1])})
  print(f"{'flags':<24} {'lower ms':>9} {'compile ms':>11}  a*b+c")
  for r in rows:
    print(f"{r['flags']:<24} {r['lower_ms']:9.1f} {r['compile_ms']:11.1f}  {r['fma']}")
  if _RESULT_JSON.value:
    with open(_RESULT_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
