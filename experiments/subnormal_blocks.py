r"""Whether the backend keeps float32 subnormals, and what that does to a block.

An all-subnormal block (``tests/core/test_fused.py``'s column 21) quantizes
differently by backend in the frozen reference (``tests/core/_reference.py``):
its scale ``amax / fmt.max`` is subnormal, which XLA's CPU backend flushes to
zero (codes 0) and the GPU keeps (codes up to ``fmt.max``). The library holds
float scales at the smallest normal (codes 0 on every backend). This script
writes, for the running backend: whether ``x * 2`` of a subnormal ``x`` stays
nonzero, and the int8 per-channel codes and scale of one all-subnormal column
from the library and from the reference. Run on the GPU and on CPU::

  PYTHONPATH=. python3 -m experiments.subnormal_blocks --out_dir=/tmp/subn
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import lowbit_jax as lb
from tests.core import _reference as ref

_OUT_DIR = flags.DEFINE_string("out_dir", "", "folder for subnormal_blocks.json "
                               "(default: print only)")


def main(argv):
  del argv
  x = np.zeros((256, 4), np.float32)
  x[:, 1] = np.random.default_rng(0).standard_normal(256)
  x[:, 2] = np.float32(1e-39) * np.arange(-128, 128, dtype=np.float32) / 32  # subnormal
  xb = jnp.asarray(x, jnp.bfloat16)
  spec = lb.QuantSpec("int8", axis=0)
  got = jax.jit(lambda v: lb.quantize(v, spec))(xb)
  want = jax.jit(lambda v: ref.quantize(v, spec))(xb)
  tiny = float(jax.jit(lambda v: v * 2)(jnp.float32(1e-39)))
  res = dict(
      device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
      jax=jax.__version__, command=" ".join([sys.executable] + sys.argv),
      subnormal_times_2=tiny, keeps_subnormals=tiny != 0.0,
      lib_codes_col2=np.asarray(got.codes)[::32, 2].tolist(),
      ref_codes_col2=np.asarray(want.codes)[::32, 2].tolist(),
      lib_scale_col2=float(np.asarray(got.scale, np.float32).ravel()[2]),
      ref_scale_col2=float(np.asarray(want.scale, np.float32).ravel()[2]))
  text = json.dumps(res, indent=1)
  print(text)
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUT_DIR.value, "subnormal_blocks.json"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
