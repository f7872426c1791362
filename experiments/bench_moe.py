r"""MoE forward time: experts as a grouped matmul (``ragged``) vs dense compute.

Times the forward pass of one MoE feed-forward layer (``MoEMLP``) and of the
whole decoder (``Llama``) with ``moe_impl="ragged"`` (tokens sorted by
expert, ``jax.lax.ragged_dot``) and ``moe_impl="dense"`` (every expert on
every token, masked combine), on the same parameters and tokens, and checks
that the two agree. Each jitted function is compiled and warmed up once, then
timed ``--iters`` times with ``block_until_ready``; the median is reported.
Float32 on CPU (XLA's CPU dot is fastest in float32), bf16 elsewhere.

CPU run (repository root; what ``benchmarks/moe_cpu.md`` reports)::

  python -m experiments.bench_moe --config=small --n_experts=8 --top_k=2 \
      --batch=4 --seq=128 --out_dir=benchmarks

GPU run::

  python -m experiments.bench_moe --config=base --n_experts=8 --top_k=2 \
      --batch=16 --seq=512 --out_dir=benchmarks

Writes ``moe_<device>.json`` and ``moe_<device>.md`` (or ``--tag``) to
``--out_dir``, with the device, jax version and command.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import experiments
from absl import app
from absl import flags

_CONFIG = flags.DEFINE_enum("config", "small", ["smoke", "small", "base"],
                            "LlamaConfig variant")
_EXPERTS = flags.DEFINE_integer("n_experts", 8, "experts per MoE layer", lower_bound=1)
_TOP_K = flags.DEFINE_integer("top_k", 2, "experts per token", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 4, "sequences per batch", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq", 128, "tokens per sequence", lower_bound=1)
_ITERS = flags.DEFINE_integer("iters", 10, "timed calls per measurement", lower_bound=1)
_TAG = flags.DEFINE_string("tag", "", "output file stem (default moe_<device>)")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")
flags.register_multi_flags_validator(
    ["top_k", "n_experts"], lambda f: f["top_k"] <= f["n_experts"],
    message="--top_k must be at most --n_experts")


def _median_seconds(jax, fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  ts = []
  for _ in range(_ITERS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models.llama import Llama, LlamaConfig, MoEMLP  # pylint: disable=g-import-not-at-top

  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  cfg = getattr(LlamaConfig, _CONFIG.value)(n_experts=_EXPERTS.value,
                                            top_k=_TOP_K.value, dtype=dtype,
                                            max_len=max(_SEQ.value, 16))
  tokens = jax.random.randint(jax.random.key(0), (_BATCH.value, _SEQ.value), 0,
                              cfg.vocab)
  x = jax.random.normal(jax.random.key(1), (_BATCH.value, _SEQ.value, cfg.d_model),
                        cfg.compute_dtype)
  rows = []
  results = {}
  for what, cls, inp in (("moe_layer", MoEMLP, x), ("model", Llama, tokens)):
    params = jax.jit(cls(cfg).init)(jax.random.key(2), inp)
    outs = {}
    for impl in ("ragged", "dense"):
      fn = jax.jit(cls(cfg.replace(moe_impl=impl)).apply)
      outs[impl] = np.asarray(fn(params, inp), np.float32)
      results[f"{what}/{impl}"] = _median_seconds(jax, fn, params, inp)
    scale = float(np.max(np.abs(outs["dense"])))
    err = float(np.max(np.abs(outs["ragged"] - outs["dense"])))
    sec_r, sec_d = results[f"{what}/ragged"], results[f"{what}/dense"]
    results[f"{what}/max_abs_diff"] = err
    rows.append(f"| {what} | {sec_d * 1e3:.2f} | {sec_r * 1e3:.2f} | "
                f"{sec_d / sec_r:.2f}x | {err:.2e} (max abs y {scale:.2f}) |")
  device = jax.devices()[0].device_kind
  meta = {"device": device, "backend": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(),
          "command": "python -m experiments.bench_moe " + " ".join(sys.argv[1:]),
          "config": {"variant": _CONFIG.value, "d_model": cfg.d_model,
                     "d_ff": cfg.d_ff, "n_layers": cfg.n_layers,
                     "n_experts": cfg.n_experts, "top_k": cfg.top_k,
                     "dtype": dtype, "batch": _BATCH.value, "seq": _SEQ.value,
                     "iters": _ITERS.value},
          "seconds": results}
  tag = _TAG.value or "moe_" + jax.default_backend()
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, tag + ".json"), "w") as f:
    json.dump(meta, f, indent=2)
  md = [f"# MoE forward: dense vs ragged experts ({device}, jax {jax.__version__})",
        "",
        f"`{meta['command']}`",
        "",
        f"{_CONFIG.value} config, {cfg.n_experts} experts, top-{cfg.top_k}, {dtype}, "
        f"batch {_BATCH.value} x {_SEQ.value} tokens; median of {_ITERS.value} "
        "jitted calls.",
        "",
        "| forward | dense ms | ragged ms | speed-up | max abs diff |",
        "|---|---|---|---|---|", *rows, "", ""]
  with open(os.path.join(_OUT_DIR.value, tag + ".md"), "w") as f:
    f.write("\n".join(md))
  print("\n".join(md))


if __name__ == "__main__":
  experiments.run(main)
