"""Evaluate a real-quantized checkpoint: MiniLM (experiments/ptq.py) or a QAT LM.

  python -m experiments.ptq --config configs/ptq.py:smoke --config.save_dir=/tmp/q
  python -m experiments.evaluate --config configs/evaluate.py --config.checkpoint=/tmp/q

  python -m experiments.train_qat --config configs/train_qat.py:smoke --workdir /tmp/qat
  python -m experiments.evaluate --config configs/evaluate.py \
      --config.checkpoint=/tmp/qat/quantized
"""
import ml_collections


def get_config(arg: str = "default"):
  del arg
  c = ml_collections.ConfigDict()
  c.checkpoint = ""
  c.use_kernel = "auto"
  # MiniLM checkpoints.
  c.n_calib = 32  # the evaluation sentences are the ones after these
  c.n_eval = 0
  # QAT language-model checkpoints (held-out perplexity).
  c.max_eval_tokens = 0  # 0: the whole held-out split
  c.eval_batch = 8
  return c
