"""Quantization-aware / low-bit training of the LM (see configs/train_qat.py).

  python -m experiments.train_qat --config configs/train_qat.py:smoke --workdir /tmp/qat

The same main as ``experiments.train_lm`` (one loop, ``lowbit_jax.train``),
with ``configs/train_qat.py`` (the ``quant`` and ``optim`` fields) as the
config when ``--config`` is not given.
"""
from __future__ import annotations

import sys


def _run() -> None:
  # Before train_lm defines its flags: config_flags reads the --config.*
  # overrides from sys.argv against the config file when the flag is defined.
  if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    sys.argv.insert(1, "--config=configs/train_qat.py")
  import experiments  # pylint: disable=g-import-not-at-top
  from experiments import train_lm  # pylint: disable=g-import-not-at-top
  experiments.run(train_lm.main)


if __name__ == "__main__":
  _run()
