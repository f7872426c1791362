"""PTQ sweep on all-MiniLM-L6-v2 (the README's main job).

Formats x targets (weight-only, weights + activations) with round-to-nearest,
on a real pretrained sentence encoder, on CPU. Run:

  python -m experiments.sweep --config configs/sweep_minilm.py

Variants (``--config configs/sweep_minilm.py:VARIANT``): ``default`` (the 8
schemes of the README), ``methods`` (RTN vs GPTQ/AWQ/SmoothQuant/rotation at
int4 / int3), ``smoke`` (2 points on a few sentences, seconds). Any field can be
overridden, e.g. ``--config.point_kwargs.n_eval=64`` or
``--config.axes.scheme='("int8", "nvfp4")'`` (axes are tuples so that the
command line can replace them).
"""
import ml_collections


def get_config(arg: str = "default"):
  c = ml_collections.ConfigDict()
  c.model = "minilm"
  c.axes = ml_collections.ConfigDict()
  c.axes.method = ("rtn",)
  c.axes.scheme = ("fp32", "int8", "int4_g128", "fp8_e4m3", "mxfp8", "mxfp6", "mxfp4",
                   "nvfp4")
  c.axes.target = ("weights", "weights+acts")
  c.exclude = [{"scheme": "fp32", "target": "weights+acts"}]
  c.point_kwargs = ml_collections.ConfigDict({"n_calib": 32, "n_eval": 0})
  c.out_dir = "results/sweep_minilm"
  c.metrics = ("bits_per_weight", "mean_cos", "worst_cos", "spearman",
               "mean_weight_sqnr_db", "mean_act_sqnr_db")
  c.plot = ml_collections.ConfigDict({"x": "bits_per_weight", "y": "mean_cos",
                                      "maximize": True})
  if arg == "default":
    pass
  elif arg == "methods":
    c.axes.method = ("rtn", "gptq", "awq", "smoothquant", "rotation")
    c.axes.scheme = ("int4_g128", "int4", "int2_g64")
    c.axes.target = ("weights",)
    c.exclude = []
    c.out_dir = "results/sweep_minilm_methods"
  elif arg == "smoke":
    c.axes.scheme = ("int8", "mxfp4")
    c.axes.target = ("weights",)
    c.exclude = []
    c.point_kwargs.n_eval = 16
    c.point_kwargs.n_calib = 8
    c.out_dir = "/tmp/lowbit_jax_sweep_smoke"
  else:
    raise ValueError(f"unknown variant {arg!r}: default, methods or smoke")
  return c
