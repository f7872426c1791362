"""Trains the Llama-style LM on the stdlib corpus (see configs/train_lm.py).

  python -m experiments.train_lm --config configs/train_lm.py:smoke --workdir /tmp/lm
"""
from __future__ import annotations

import json
import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from lowbit_jax import train_lm

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_lm.py",
                                          "Experiment config (file:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; resumes if it "
                               "holds checkpoints.", required=True)


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  result = train_lm.train(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
