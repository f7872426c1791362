r"""Runs a PTQ sweep from a config: one JSON line per point, a table, plots.

  python -m experiments.sweep --config configs/sweep_minilm.py
  python -m experiments.sweep --config configs/sweep_minilm.py:methods
  python -m experiments.sweep --config configs/sweep_llama.py

Rerunning skips finished points (results/<name>/results.jsonl).
"""
import experiments
from absl import app
from absl import logging

from lowbit_jax import pipelines

_CONFIG = experiments.define_config("configs/sweep_minilm.py",
                                          "sweep config (configs/sweep_*.py[:variant])")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  out = pipelines.run_sweep_config(_CONFIG.value)
  print(out["table"])
  for k, v in out["paths"].items():
    print(f"{k}: {v}")


if __name__ == "__main__":
  experiments.run(main)
