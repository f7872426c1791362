"""One PTQ point: quantize a model with a scheme and method, print its metrics.

  python -m experiments.ptq --config configs/ptq.py
  python -m experiments.ptq --config configs/ptq.py --config.scheme=nvfp4 \
      --config.target=weights+acts --config.method=gptq
  python -m experiments.ptq --config configs/ptq.py:smoke
  python -m experiments.ptq --config configs/ptq.py:llama   # the decoder LM
      # (trained in point_kwargs.workdir first when it holds no finished run)

With ``save_dir`` set (MiniLM, ``--config.method=rtn``), the weights are also
real-quantized (packed QArrays) and saved with orbax; ``experiments/evaluate.py`` evaluates such a checkpoint. An
existing ``save_dir`` is an error (checked before anything runs) unless
``--config.force=True``.
"""
import ml_collections


def get_config(arg: str = "default"):
  c = ml_collections.ConfigDict()
  c.model = "minilm"
  c.scheme = "int4_g128"
  c.target = "weights"
  c.method = "gptq"
  c.point_kwargs = ml_collections.ConfigDict({"n_calib": 32, "n_eval": 0})
  c.save_dir = ""
  c.force = False  # replace an existing save_dir
  if arg == "smoke":
    c.method = "rtn"
    c.point_kwargs.n_calib = 8
    c.point_kwargs.n_eval = 16
  elif arg == "llama":   # the decoder LM's point arguments (pipelines.llama_point)
    c.model = "llama"
    c.point_kwargs = ml_collections.ConfigDict({   # every keyword of llama_point
        "workdir": "results/train_lm_small", "variant": "small", "seq_len": 128,
        "batch": 8, "max_eval_tokens": 32768, "n_calib": 8, "train_steps": 0,
        "omniquant_steps": 200, "kv": "none", "qk": "none", "r3": False,
        "kv_window": 32})
  elif arg != "default":
    raise ValueError(f"unknown variant {arg!r}: default, smoke or llama")
  return c
