r"""Whether the backend keeps float32 subnormals, and what that does to a block.

An all-subnormal block (``tests/core/test_fused.py``'s column 21) quantizes
differently by backend in the frozen reference (``tests/core/_reference.py``):
its scale ``amax / fmt.max`` is subnormal, which XLA's CPU backend flushes to
zero (codes 0) and the GPU keeps (codes up to ``fmt.max``). The library holds
float scales at the smallest normal (codes 0 on every backend for elements
below half of it). This script writes, for the running backend: whether
``x * 2`` of a subnormal ``x`` stays nonzero, the int8 per-channel codes and
scale of one all-subnormal column from the library and from the reference,
the library's int8 codes of a column of subnormals in (-2**-126, 2**-126)
(on CPU all 0; where subnormals are kept, +-1 beyond 2**-127), and an
all-subnormal MXFP8 block's E8M0 scale code and values (docs/formats.md,
"Tiny and huge ranges"). Run on the GPU and on CPU::

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
  # Subnormal inputs the GPU keeps: an int8 column of (0.5, 1) * 2**-126
  # (codes +-1 against the scale held at 2**-126 where subnormals are kept),
  # and an all-subnormal MXFP8 block (E8M0 scale 2**-127).
  x3 = np.zeros((256, 4), np.float32)
  x3[:, 3] = np.float32(2.0 ** -126) * np.linspace(-0.99, 0.99, 256, dtype=np.float32)
  x3[:, 0] = 1.0
  c3 = np.asarray(jax.jit(lambda v: lb.quantize(v, spec).codes)(x3))[::32, 3]
  mx = np.float32(2.0 ** -126) * np.linspace(-0.99, 0.99, 32, dtype=np.float32)
  mx_spec = lb.QuantSpec("mxfp8_e4m3", axis=-1)
  mq = jax.jit(lambda v: lb.quantize(v, mx_spec))(mx[None])
  mx_vals = np.asarray(jax.jit(lambda v: lb.fake_quant(v, mx_spec))(mx[None]))[0]
  res = dict(
      device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
      jax=jax.__version__, command=" ".join([sys.executable] + sys.argv),
      subnormal_times_2=tiny, keeps_subnormals=tiny != 0.0,
      lib_codes_col2=np.asarray(got.codes)[::32, 2].tolist(),
      ref_codes_col2=np.asarray(want.codes)[::32, 2].tolist(),
      lib_scale_col2=float(np.asarray(got.scale, np.float32).ravel()[2]),
      ref_scale_col2=float(np.asarray(want.scale, np.float32).ravel()[2]),
      lib_int8_codes_subnormal_col3=c3.astype(int).tolist(),
      mxfp8_subnormal_block_scale_code=int(np.asarray(mq.scale).ravel()[0]),
      mxfp8_subnormal_block_nonzero=int(np.count_nonzero(mx_vals)),
      mxfp8_subnormal_block_values_over_2pow_126=(
          mx_vals[::8].astype(np.float64) * 2.0 ** 126).tolist())
  text = json.dumps(res, indent=1)
  print(text)
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUT_DIR.value, "subnormal_blocks.json"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
