"""Evaluate a real-quantized MiniLM checkpoint written by experiments/ptq.py.

  python -m experiments.ptq --config configs/ptq.py:smoke --config.save_dir=/tmp/q
  python -m experiments.evaluate --config configs/evaluate.py --config.checkpoint=/tmp/q
"""
import ml_collections


def get_config(arg: str = "default"):
  del arg
  c = ml_collections.ConfigDict()
  c.checkpoint = ""
  c.n_calib = 32  # the evaluation sentences are the ones after these
  c.n_eval = 0
  c.use_kernel = "auto"
  return c
