r"""Evaluates a real-quantized checkpoint (see configs/evaluate.py).

  python -m experiments.evaluate --config configs/evaluate.py --config.checkpoint=DIR

DIR is either a MiniLM checkpoint written by experiments/ptq.py, or the
``quantized`` directory a QAT run of experiments/train_qat.py exported (held-out
perplexity of the packed Llama model).
"""
import json
import os

import experiments
from absl import app
from absl import logging

from lowbit_jax import pipelines

_CONFIG = experiments.define_config("configs/evaluate.py",
                                          "evaluation config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  c = _CONFIG.value
  if not c.checkpoint:
    raise app.UsageError("set --config.checkpoint=DIR (written by experiments/ptq.py "
                         "with --config.save_dir, or <workdir>/quantized of "
                         "experiments/train_qat.py)")
  from lowbit_jax.train import qat  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(c.checkpoint, qat.META_FILE)):
    m = qat.evaluate_exported(c.checkpoint, max_tokens=c.max_eval_tokens,
                              batch=c.eval_batch, use_kernel=c.use_kernel)
  else:
    m = pipelines.minilm_evaluate_checkpoint(c.checkpoint, n_calib=c.n_calib,
                                             n_eval=c.n_eval, use_kernel=c.use_kernel)
  print(json.dumps(m, indent=1, sort_keys=True))


if __name__ == "__main__":
  experiments.run(main)
