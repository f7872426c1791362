"""PTQ methods on the decoder LM: RTN, GPTQ, AWQ, SmoothQuant, QuaRot, SpinQuant, OmniQuant
(issue 14).

Trains the model first if ``point_kwargs.workdir`` holds no finished run (the
``small`` model of ``configs/train_lm.py``, as docs/results_llama.md). Run:

  python -m experiments.sweep --config configs/sweep_llama_methods.py

Rows: W4A16 g128 (``int4_g128``, weights), W3A16 g128 (``int3_g128``,
weights), W8A8 (``int8``), W4A8 (``w4a8``: int4 g128 weights, int8 per-token
activations), W4A4 (``int4`` per channel / per token, ``mxfp4``, ``nvfp4``),
each under every method. SmoothQuant only runs with activations (it migrates
activation range into the weights). QuaRot folds one randomized Hadamard into
the residual stream and runs an online Hadamard at the down projections
(``lowbit_jax.pipelines.LLAMA_ONLINE``); its kernels are rounded by RTN.
SpinQuant starts there (plus a Hadamard per head between value and output
projections, ``LLAMA_HEADS``), learns both rotations with Cayley SGD on the
calibration batch (``SpinQuantConfig()``: 100 steps) and rounds by RTN.
AWQ runs its scale search and then its clip search (``awq``; ``awq_noclip``:
the scale search alone). OmniQuant (``omniquant``) learns weight clipping
(LWC) block by block, and with activations also the equivalent transforms
(LET) after each RMSNorm and between up and down projections, 200 AdamW
steps per block (``point_kwargs.omniquant_steps``).

Attention rows (``kv``, ``qk``, ``r3`` axes; ``lowbit_jax.pipelines.llama_point``):
float weights (``fp32``/``rtn``) and W4A4 (``int4``) under RTN, QuaRot and
SpinQuant, each with an int4 KV cache (per token, 32-token float window,
perplexity teacher forced through the cache) or int4 ``q.k`` operands, without
and with SpinQuant's R3 (a Hadamard on queries and keys; the cache stores
rotated keys). All other rows have ``kv="none"``, ``qk="none"``, ``r3=False``.

Variants: ``default`` (the small model: ~50 min of training plus ~30 min of
sweep on a busy 2-core VM); ``base`` (the 56M-parameter ``base`` model of
``configs/train_lm.py``, trained for 400 steps in the same run on one GPU,
about a minute on an H200, then swept; sequences of 512, 65536 held-out
tokens); ``smoke`` (the same rows on the smoke model of
``configs/train_lm.py:smoke``, 2 layers of width 64 trained for 60 steps;
about 20 min on a busy 2-core VM).
"""
import ml_collections

_WEIGHT_ONLY = ("int4_g128", "int3_g128")
_WITH_ACTS = ("int8", "w4a8", "int4", "mxfp4", "nvfp4")
_METHODS = ("rtn", "gptq", "awq", "awq_noclip", "smoothquant", "quarot", "spinquant",
            "omniquant")
# Attention rows: these (scheme, method) pairs, with an int4 KV cache or int4
# q.k, each without and with R3.
_ATTN_POINTS = (("fp32", "rtn"), ("int4", "rtn"), ("int4", "quarot"),
                ("int4", "spinquant"))


def _attention_excludes() -> list:
  """Partial points that keep the kv/qk/r3 axes to ``_ATTN_POINTS``."""
  schemes = {s for s, _ in _ATTN_POINTS}
  out = [{"kv": "int4", "qk": "int4"}, {"r3": True, "kv": "none", "qk": "none"}]
  for axis in ("kv", "qk"):
    out += [{axis: "int4", "scheme": s} for s in ("fp32",) + _WEIGHT_ONLY + _WITH_ACTS
            if s not in schemes]
    out += [{axis: "int4", "scheme": s, "method": m} for s in schemes
            for m in _METHODS if (s, m) not in _ATTN_POINTS]
  return out


def get_config(arg: str = "default"):
  c = ml_collections.ConfigDict()
  c.model = "llama"
  c.axes = ml_collections.ConfigDict()
  c.axes.method = _METHODS
  c.axes.scheme = ("fp32",) + _WEIGHT_ONLY + _WITH_ACTS
  c.axes.target = ("weights", "weights+acts")
  c.axes.kv = ("none", "int4")
  c.axes.qk = ("none", "int4")
  c.axes.r3 = (False, True)
  c.exclude = ([{"scheme": "fp32", "method": m} for m in c.axes.method[1:]]
               + [{"scheme": "fp32", "target": "weights+acts"}]
               + [{"scheme": s, "target": "weights+acts"} for s in _WEIGHT_ONLY]
               + [{"scheme": s, "target": "weights"} for s in _WITH_ACTS]
               + [{"method": "smoothquant", "target": "weights"}]
               + _attention_excludes())
  c.point_kwargs = ml_collections.ConfigDict({
      "workdir": "results/train_lm_small", "variant": "small", "seq_len": 128,
      "batch": 8, "max_eval_tokens": 16384, "n_calib": 8})
  c.out_dir = "results/sweep_llama_methods"
  c.metrics = ("bits_per_weight", "perplexity", "bits_per_byte", "mean_weight_sqnr_db",
               "awq_clip_error_vs_rtn", "block_mse_rtn", "block_mse", "seconds")
  c.plot = ml_collections.ConfigDict({"x": "bits_per_weight", "y": "perplexity",
                                      "maximize": False})
  if arg == "default":
    pass
  elif arg == "base":    # on one GPU: trains base (400 steps) first, then sweeps
    c.point_kwargs.workdir = "/tmp/lowbit_jax_lm_base"
    c.point_kwargs.variant = "base"
    c.point_kwargs.seq_len = 512
    c.point_kwargs.batch = 16
    c.point_kwargs.max_eval_tokens = 65536
    c.point_kwargs.train_steps = 400
    c.out_dir = "results/sweep_llama_methods_base"
  elif arg == "smoke":   # every row, on the smoke model (2 layers, d=64)
    c.point_kwargs.workdir = "/tmp/lowbit_jax_lm_smoke"
    c.point_kwargs.variant = "smoke"
    c.point_kwargs.seq_len = 64
    c.point_kwargs.max_eval_tokens = 2048
    c.out_dir = "/tmp/lowbit_jax_sweep_llama_methods_smoke"
  else:
    raise ValueError(f"unknown variant {arg!r}: default, base or smoke")
  return c
