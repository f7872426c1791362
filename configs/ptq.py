"""One PTQ point: quantize a model with a scheme and method, print its metrics.

  python -m experiments.ptq --config configs/ptq.py
  python -m experiments.ptq --config configs/ptq.py --config.scheme=nvfp4 \
      --config.target=weights+acts --config.method=gptq
  python -m experiments.ptq --config configs/ptq.py:smoke

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
  elif arg != "default":
    raise ValueError(f"unknown variant {arg!r}: default or smoke")
  return c
