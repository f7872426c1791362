"""Trains the Llama-style LM on the stdlib corpus (see configs/train_lm.py).

  python -m experiments.train_lm --config configs/train_lm.py:smoke --workdir /tmp/lm
"""
from __future__ import annotations

import json

import experiments
from absl import app, flags

from lowbit_jax.train import loop

_CONFIG = experiments.define_config("configs/train_lm.py",
                                    "Experiment config (file:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if it "
                               "holds checkpoints.", required=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  loop.quiet_orbax_logs()
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  experiments.run(main)
