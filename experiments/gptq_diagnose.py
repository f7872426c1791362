r"""Why GPTQ can lose to RTN at W3 on the decoder: calibration size, damping,
act_order, symmetric vs asymmetric grids, float32 vs bf16 inputs.

For each variant, the trained decoder's kernels are quantized by
``apply_ptq`` (GPTQ or RTN; every Dense, the head included) and measured
three ways: held-out perplexity (``train_lm.evaluate``), and, per layer, the
output error GPTQ minimises, ``trace(E^T H E)`` with ``E = w - w_q``, relative
to RTN's, on the variant's own calibration Hessian ("calib") and on a
Hessian of held-out tokens ("held-out"). A GPTQ whose calib ratio is far
below 1 but whose held-out ratio is not has fit its calibration tokens.

  python -m experiments.gptq_diagnose --workdir results/qat_small/float \
      --out_dir results/gptq_diagnose_small

Writes ``results.jsonl`` and ``table.md`` (device, jax version, command) to
``--out_dir``; every finished variant is kept, a rerun skips it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import experiments
from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "results/qat_small/float",
                               "a trained decoder run (see pipelines.llama_point)")
_VARIANT = flags.DEFINE_string("variant", "small", "configs/train_lm.py variant")
_SEQ = flags.DEFINE_integer("seq_len", 128, "tokens per calibration / eval sequence")
_EVAL_TOKENS = flags.DEFINE_integer("max_eval_tokens", 16384, "held-out tokens scored")
_HELDOUT_SEQS = flags.DEFINE_integer("heldout_seqs", 64,
                                     "sequences of the held-out Hessians")
_BITS = flags.DEFINE_integer("bits", 3, "weight bits (int, groups of --group)")
_GROUP = flags.DEFINE_integer("group", 128, "group size along K (0: per channel)")
_ONLY = flags.DEFINE_list("variants", None, "subset of the variant names")
_OUT = flags.DEFINE_string("out_dir", "results/gptq_diagnose_small", "output folder")

# name -> (method, n_calib sequences, percdamp, act_order, symmetric, dtype)
VARIANTS = {
    "rtn": ("rtn", 8, 0.01, False, True, "float32"),
    "gptq_n8": ("gptq", 8, 0.01, False, True, "float32"),
    "gptq_n32": ("gptq", 32, 0.01, False, True, "float32"),
    "gptq_n128": ("gptq", 128, 0.01, False, True, "float32"),
    "gptq_n8_damp0.1": ("gptq", 8, 0.1, False, True, "float32"),
    "gptq_n128_damp0.1": ("gptq", 128, 0.1, False, True, "float32"),
    "gptq_n8_act_order": ("gptq", 8, 0.01, True, True, "float32"),
    "gptq_n128_act_order": ("gptq", 128, 0.01, True, True, "float32"),
    "rtn_asym": ("rtn", 8, 0.01, False, False, "float32"),
    "gptq_n128_asym": ("gptq", 128, 0.01, False, False, "float32"),
    "rtn_bf16": ("rtn", 8, 0.01, False, True, "bfloat16"),
    "gptq_n8_bf16": ("gptq", 8, 0.01, False, True, "bfloat16"),
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax import QuantSpec, pipelines  # pylint: disable=g-import-not-at-top
  from lowbit_jax import train_lm  # pylint: disable=g-import-not-at-top
  from lowbit_jax.algorithms import hessian_error  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import apply_ptq, capture_dense_stats  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top

  _, model32, params, data = pipelines._llama(_WORKDIR.value, _VARIANT.value)  # pylint: disable=protected-access
  seq = _SEQ.value
  toks = np.asarray(data.train_tokens).astype(np.int32)

  def batches(start_seq, n):   # the sweep calibrates on the first n sequences
    x = toks[start_seq * seq: (start_seq + n) * seq].reshape(n, seq)
    return [(jnp.asarray(x[i:i + 8]),) for i in range(0, n, 8)]

  # Held-out Hessians: sequences far from the calibration ones.
  far = toks.size // seq // 2
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "results.jsonl")
  # A row is reused only under the settings it was measured with (a W3 row
  # must not fill a W8 table).
  settings = {"workdir": os.path.abspath(_WORKDIR.value), "variant": _VARIANT.value,
              "bits": _BITS.value, "group": _GROUP.value, "seq_len": seq,
              "max_eval_tokens": _EVAL_TOKENS.value,
              "heldout_seqs": _HELDOUT_SEQS.value}
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r.get("settings") == settings:
          done[r["variant"]] = r
  names = _ONLY.value or list(VARIANTS)
  grams = {}

  def layer_grams(model, key, bs):
    if key not in grams:
      cap = capture_dense_stats(model, params, bs, max_samples=0)
      grams[key] = {p: s.gram for p, s in cap.stats.items()}
    return grams[key]

  rtn_q = {}
  for name in names:
    if name in done:
      continue
    method, n_calib, damp, act_order, sym, dtype = VARIANTS[name]
    model = model32 if dtype == "float32" else Llama(model32.config.replace(dtype=dtype))
    spec = QuantSpec(f"int{_BITS.value}", group_size=_GROUP.value or None,
                     symmetric=sym, pad=True)
    t0 = time.time()
    calib = batches(0, n_calib)
    kw = {} if method == "rtn" else dict(percdamp=damp, act_order=act_order)
    qp, _ = apply_ptq(model, params, calib, method, spec, **kw)
    # RTN with the same grid and dtype, for the error ratios.
    rkey = (sym, dtype)
    if rkey not in rtn_q:
      rtn_q[rkey] = qp if method == "rtn" else apply_ptq(
          model, params, calib, "rtn", spec)[0]
    h_cal = layer_grams(model, (dtype, n_calib), calib)
    h_out = layer_grams(model, (dtype, "heldout"), batches(far, _HELDOUT_SEQS.value))
    ratios = {"calib": [], "heldout": []}
    layer_paths = sorted(h_cal)
    for p in layer_paths:
      node_w = params
      node_q, node_r = qp, rtn_q[rkey]
      for part in p.split("/"):
        node_w, node_q, node_r = node_w[part], node_q[part], node_r[part]
      w, wq, wr = node_w["kernel"], node_q["kernel"], node_r["kernel"]
      for which, h in (("calib", h_cal[p]), ("heldout", h_out[p])):
        e_r = float(hessian_error(h, w, wr))
        ratios[which].append(float(hessian_error(h, w, wq)) / max(e_r, 1e-30))
    res = train_lm.evaluate(lambda p, t, m=model: m.apply({"params": p}, t), qp, data,
                            seq_len=seq, batch=8, max_tokens=_EVAL_TOKENS.value)
    row = {"variant": name, "method": method, "n_calib_tokens": n_calib * seq,
           "percdamp": damp, "act_order": act_order, "symmetric": sym,
           "dtype": dtype, "perplexity": float(res["perplexity"]),
           "layer_error_vs_rtn_calib": float(np.mean(ratios["calib"])),
           "layer_error_vs_rtn_heldout": float(np.mean(ratios["heldout"])),
           "layers_worse_than_rtn_heldout": int(sum(r > 1 for r in ratios["heldout"])),
           "n_layers": len(ratios["heldout"]),
           "layers_worse_heldout": [p for p, r in zip(layer_paths, ratios["heldout"])
                                    if r > 1],
           "seconds": round(time.time() - t0, 1), "settings": settings}
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
    done[name] = row
  _write_table([done[n] for n in names if n in done])


def _write_table(rows) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  cmd = "python -m experiments.gptq_diagnose " + " ".join(sys.argv[1:])
  lines = [f"# GPTQ vs RTN at W{_BITS.value} g{_GROUP.value or 'channel'}: diagnosis",
           "", f"Command: `{cmd}`. Device: {dev.platform} ({dev.device_kind}), jax "
           f"{jax.__version__}, Python {platform.python_version()}, "
           f"{time.strftime('%Y-%m-%d')}. Model: `{_WORKDIR.value}`. Layer errors: "
           "mean over layers of trace(E^T H E) relative to RTN on the same grid "
           f"and dtype; held-out H from {_HELDOUT_SEQS.value} sequences of "
           f"{_SEQ.value} tokens far from the calibration ones.", "",
           "| variant | calib tokens | percdamp | act_order | grid | dtype | "
           "perplexity | layer error vs RTN (calib) | (held-out) | layers worse "
           "held-out |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['n_calib_tokens']} | {r['percdamp']} | "
        f"{r['act_order']} | {'sym' if r['symmetric'] else 'asym'} | {r['dtype']} | "
        f"{r['perplexity']:.3f} | {r['layer_error_vs_rtn_calib']:.3f} | "
        f"{r['layer_error_vs_rtn_heldout']:.3f} | "
        f"{r['layers_worse_than_rtn_heldout']}/{r['n_layers']} |")
  with open(os.path.join(_OUT.value, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  experiments.run(main)
