r"""Prints what ``cast`` makes of NaN, +-inf and overflow in every element format.

  python -m experiments.special_values > /tmp/special_values.md

The table in docs/formats.md ("NaN and inf") is this command's output.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app

import experiments
from lowbit_jax.core._cast import cast

FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz", "fp8_e3m4",
           "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8", "int4", "uint8", "nf4",
           "binary", "ternary")
INPUTS = (("NaN", np.nan), ("-NaN", -np.nan), ("+inf", np.inf), ("-inf", -np.inf),
          ("1e30", 1e30))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  x = jnp.array([v for _, v in INPUTS], jnp.float32)
  print(f"jax {jax.__version__}, {jax.default_backend()}; "
        "`python -m experiments.special_values`\n")
  print("| format | saturate | " + " | ".join(n for n, _ in INPUTS) + " |")
  print("|---|---|" + "---|" * len(INPUTS))
  for f in FORMATS:
    for sat in (False, True):
      y = np.asarray(cast(x, f, saturate=sat)).tolist()
      print(f"| {f} | {sat} | " + " | ".join(f"{v:g}" for v in y) + " |")


if __name__ == "__main__":
  experiments.run(main)
