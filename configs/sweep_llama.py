"""PTQ sweep on the Llama-style decoder trained on the stdlib corpus.

Trains the model first if ``point_kwargs.workdir`` holds no finished run
(``small``: ~15 min on 2 CPU cores; ``smoke``: seconds). Run:

  python -m experiments.sweep --config configs/sweep_llama.py

Variants: ``default`` (small model, 8 schemes x 2 targets), ``smoke``.
"""
import ml_collections


def get_config(arg: str = "default"):
  c = ml_collections.ConfigDict()
  c.model = "llama"
  c.axes = ml_collections.ConfigDict()
  c.axes.method = ("rtn",)
  c.axes.scheme = ("fp32", "int8", "int4_g128", "fp8_e4m3", "mxfp8", "mxfp6", "mxfp4",
                   "nvfp4")
  c.axes.target = ("weights", "weights+acts")
  c.exclude = [{"scheme": "fp32", "target": "weights+acts"}]
  c.point_kwargs = ml_collections.ConfigDict({
      "workdir": "results/train_lm_small", "variant": "small", "seq_len": 128,
      "batch": 8, "max_eval_tokens": 32768})
  c.out_dir = "results/sweep_llama"
  c.metrics = ("bits_per_weight", "perplexity", "bits_per_byte", "mean_weight_sqnr_db")
  c.plot = ml_collections.ConfigDict({"x": "bits_per_weight", "y": "perplexity",
                                      "maximize": False})
  if arg == "default":
    pass
  elif arg == "smoke":
    c.axes.scheme = ("fp32", "int8", "mxfp4")
    c.axes.target = ("weights",)
    c.exclude = []
    c.point_kwargs.workdir = "/tmp/lowbit_jax_lm_smoke"
    c.point_kwargs.variant = "smoke"
    c.point_kwargs.seq_len = 64
    c.point_kwargs.max_eval_tokens = 4096
    c.out_dir = "/tmp/lowbit_jax_sweep_llama_smoke"
  else:
    raise ValueError(f"unknown variant {arg!r}: default or smoke")
  return c
