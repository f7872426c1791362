r"""Held-out perplexity of the decoder with a quantized KV cache (teacher forced).

Every held-out window is decoded token by token through the cache
(``lowbit_jax.models.decode.make_teacher_forced`` with a one-token prompt), so
each position attends to its past as the cache stores it: float, int8, fp8,
int4/int2 per token, KIVI (keys per channel in groups of 32 tokens, values per
token, a float window of the 32 newest tokens), optionally Hadamard-rotated
(q, k and v; or SpinQuant's R3, queries and keys only: the ``*_r3`` rows).
The ``no_cache`` row is the model's ordinary full forward pass.

The model is a trained run's workdir (``experiments/train_lm.py`` or the float
part of ``experiments/qat_study.py``); with no run there, ``small`` is trained
first (``--train_steps``, about 10 minutes on 2 CPU cores for 800 steps):

  python -m experiments.kv_cache_ppl --workdir results/train_lm_small \
      --out docs/results_kvcache.md

Writes the markdown table (device, jax version, command) to ``--out`` and the
numbers as JSON next to it (``.json``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time

import experiments
from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "results/train_lm_small",
                               "a trained decoder run (trained here if empty)")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 800,
                                    "steps when the model has to be trained first")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "tokens per scored window")
_BATCH = flags.DEFINE_integer("batch", 16, "windows per call")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 16384, "held-out tokens scored")
_SCHEMES = flags.DEFINE_list("schemes", None, "subset of the scheme names to run")
_OUT = flags.DEFINE_string("out", "docs/results_kvcache.md", "markdown written here")
_NOTES = flags.DEFINE_string("notes", "", "a paragraph added to the markdown")
_REPORT_FROM = flags.DEFINE_string(
    "report_from", "", "rebuild the markdown from this JSON (written by an earlier "
    "run) instead of computing; --notes applies")


def _schemes() -> dict:
  """``{name: (cache rules or None, residual, rotate, description)}``."""
  from lowbit_jax import QuantRule, QuantSpec  # pylint: disable=g-import-not-at-top
  from lowbit_jax.algorithms import r3_rules  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models import kv_cache  # pylint: disable=g-import-not-at-top

  def r3(rules):   # SpinQuant's R3 on the cached keys (and the queries)
    return list(r3_rules(rules, qk=None))

  def per_token(fmt, **kw):
    return [QuantRule(r".*/attn/cache/(key|value)", ops=("kv_cache",),
                      activation=QuantSpec(fmt, axis=-1, **kw))]
  return {
      "no_cache": (None, None, False, "full forward pass, no cache"),
      "float": (None, None, False, "float cache (the model's compute dtype)"),
      "int8": (per_token("int8"), 32, False, "int8 per token, 32-token window"),
      "fp8_e4m3": (per_token("fp8_e4m3"), 32, False,
                   "fp8 e4m3 per token, 32-token window"),
      "int4": (per_token("int4"), 32, False, "int4 per token, 32-token window"),
      "int4_hadamard": (per_token("int4"), 32, True,
                        "int4 per token, Hadamard-rotated q/k/v, 32-token window"),
      "int4_r3": (r3(per_token("int4")), 32, False,
                  "int4 per token, keys Hadamard-rotated with the queries (SpinQuant "
                  "R3), 32-token window"),
      "int4_no_window": (per_token("int4"), 1, False,
                         "int4 per token, no float window (each token quantized "
                         "after its step)"),
      "int4_no_window_r3": (r3(per_token("int4")), 1, False,
                            "int4 per token, no float window, keys R3-rotated"),
      "kivi4": (kv_cache.kivi_rules(4, 32), 32, False,
                "KIVI 4-bit: keys per channel (groups of 32 tokens), values per "
                "token, asymmetric, 32-token window"),
      "kivi2": (kv_cache.kivi_rules(2, 32), 32, False, "KIVI 2-bit, as above"),
      "int2": (per_token("int2", symmetric=False), 32, False,
               "int2 asymmetric per token (keys too), 32-token window"),
      "int2_r3": (r3(per_token("int2", symmetric=False)), 32, False,
                  "int2 asymmetric per token, keys R3-rotated, 32-token window"),
  }


def _load(workdir: str):
  """(model, params, run config) of a trained run, training it first if needed."""
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  from lowbit_jax.train import loop  # pylint: disable=g-import-not-at-top
  from lowbit_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(workdir, "final_eval.json")):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import train_lm as train_cfg  # pylint: disable=g-import-not-at-top
    c = train_cfg.get_config("small")
    c.steps = _TRAIN_STEPS.value
    loop.train(c, workdir)
  cfg = ConfigDict(state_lib.read_run_config(workdir))
  model = Llama(loop.model_config(cfg))
  cfg.init_from = workdir
  params = loop._init_from(cfg, model, loop.make_mesh(1))  # pylint: disable=protected-access
  params = jax.device_get(params)
  return model, params, cfg


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _REPORT_FROM.value:
    with open(_REPORT_FROM.value) as f:
      saved = json.load(f)
    _render(saved["rows"], saved["meta"])
    return
  from lowbit_jax.models import decode  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models import kv_cache  # pylint: disable=g-import-not-at-top
  from lowbit_jax.train import loop  # pylint: disable=g-import-not-at-top

  # Checked before any model is trained or loaded.
  schemes = _schemes()
  unknown = sorted(set(_SCHEMES.value or ()) - set(schemes))
  if unknown:
    raise app.UsageError(f"--schemes: unknown {unknown}; one of {sorted(schemes)}")
  names = _SCHEMES.value or list(schemes)
  if _MAX_TOKENS.value < 0:
    raise app.UsageError(f"--max_tokens must be >= 0 (0: the whole held-out split), "
                         f"got {_MAX_TOKENS.value}")
  if _SEQ_LEN.value < 2 or _BATCH.value < 1:
    raise app.UsageError(f"--seq_len must be >= 2 and --batch >= 1, got "
                         f"{_SEQ_LEN.value} and {_BATCH.value}")
  if os.path.isdir(_OUT.value):
    raise app.UsageError(f"--out={_OUT.value} is a folder; give the markdown file")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  # A window no longer than a scheme's float window never reaches its
  # quantized cache: that scheme would report the float perplexity.
  short = [n for n in names if schemes[n][0] is not None
           and _SEQ_LEN.value <= (schemes[n][1] or 0)]
  if short:
    raise app.UsageError(f"--seq_len={_SEQ_LEN.value} is within the float window of "
                         f"{short}: their quantized cache would never be read; use "
                         "a longer --seq_len")
  model, params, run_cfg = _load(_WORKDIR.value)
  if _SEQ_LEN.value > model.config.max_len:
    raise app.UsageError(f"--seq_len={_SEQ_LEN.value} goes past the model's max_len="
                         f"{model.config.max_len}")
  data = loop.load_data(model.config.vocab, run_cfg.get("cache_dir", "") or None)
  seq, b = _SEQ_LEN.value, _BATCH.value
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cdt = jnp.dtype(model.config.compute_dtype)
  rows = []
  for name in names:
    rules, residual, rotate, desc = schemes[name]
    t0 = time.time()
    if name == "no_cache":
      apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
      bits = None
    else:
      fn = decode.make_teacher_forced(model, seq, b, prompt_len=1, cache_rules=rules,
                                      residual=residual, rotate=rotate)
      apply = lambda p, x, fn=fn: fn({"params": p}, x)  # noqa: E731
      cache = kv_cache.init_cache(model.config, b, rules=rules, residual=residual,
                                  max_len=seq, rotate=rotate)
      # The reference is a float32 cache whatever the model computes in.
      fl = kv_cache.init_cache(model.config, b, max_len=seq, dtype=jnp.float32)
      tensors = [t for l in cache.layers for t in (l.key, l.value)]
      stores = sum(t.store.nbytes if hasattr(t.store, "spec") else
                   t.store.size * t.store.dtype.itemsize for t in tensors)
      # Per element each store holds: a quantized store has the slots of whole
      # residual windows only (floor(seq / residual) of them).
      n_elem = sum(math.prod(t.store.shape) for t in tensors)
      bits = {"cache_bytes": cache.nbytes, "float32_cache_bytes": fl.nbytes,
              "store_bits_per_element": round(8 * stores / n_elem, 3)}
      if name == "float":
        desc = f"{cdt.name} cache (the model's compute dtype)"
    res = loop.evaluate(apply, params, data, seq_len=seq, batch=b,
                        max_tokens=_MAX_TOKENS.value)
    row = {"scheme": name, "description": desc, "residual": residual,
           "perplexity": res["perplexity"], "bits_per_byte": res["bits_per_byte"],
           "num_tokens": res["num_tokens"], "seconds": round(time.time() - t0, 1)}
    if bits:
      row.update(bits)
    print(json.dumps(row), flush=True)
    rows.append(row)
  _write(rows, model, run_cfg)


def _write(rows, model, run_cfg) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  cmd = "python -m experiments.kv_cache_ppl " + " ".join(sys.argv[1:])
  meta = {"device": f"{dev.platform}: {dev.device_kind} x {jax.device_count()}",
          "jax": jax.__version__, "python": platform.python_version(),
          "command": cmd, "workdir": _WORKDIR.value,
          "model": dataclasses.asdict(model.config),
          "train_steps": run_cfg.get("steps"), "seq_len": _SEQ_LEN.value,
          "batch": _BATCH.value, "max_tokens": _MAX_TOKENS.value,
          "reference_cache_dtype": "float32",
          "date": time.strftime("%Y-%m-%d")}
  out = _OUT.value
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  _render(rows, meta)


def _render(rows, meta) -> None:
  """Writes the markdown table of ``rows`` to ``--out``."""
  m = meta["model"]
  base = next((r["perplexity"] for r in rows if r["scheme"] == "float"), None)
  ref = meta.get("reference_cache_dtype")
  fixed = []
  if ref is None:
    # Runs before the float32 reference: the ratios are against a cache in
    # the model's dtype, and the float row's store is in that dtype too.
    ref = m.get("dtype", "float32")
    fixed = [r for r in rows if r["scheme"] == "float" and ref != "float32"]
    rows = [dict(r, description=f"{ref} cache (the model's compute dtype)",
                 store_bits_per_element=16.0) if r in fixed else r for r in rows]
  lines = [
      "# Quantized KV cache: perplexity of the decoder (teacher forced)", "",
      f"Command: `{meta['command']}`. Device: {meta['device']}, jax {meta['jax']}, "
      f"Python {meta['python']}, run on {meta['date']}.", "",
      f"Model: `{meta['workdir']}` (LlamaConfig d_model={m['d_model']}, "
      f"{m['n_layers']} layers, {m['n_kv_heads']} KV heads of "
      f"{m['d_model'] // m['n_heads']}; trained {meta['train_steps']} steps). "
      f"Held-out stream: the first {meta['max_tokens']} tokens in windows of "
      f"{meta['seq_len']}; every window is decoded one token at a time through the "
      "cache, so every position attends to its past as the cache stores it. "
      "`store bits` are the bits per cached element of the stores (codes, scales, "
      "zero points); `cache bytes` also count the float window, for a cache of "
      f"{meta['batch']} rows x {meta['seq_len']} slots.", ""]
  if _NOTES.value:
    lines += [_NOTES.value, ""]
  if fixed:
    lines += [f"This run predates the float32 reference: its cache-bytes ratios are "
              f"against a {ref} cache (the model's dtype), and its float row is "
              f"relabelled from the JSON's \"float32 cache, 32 bits\" to the {ref} "
              "cache it measured.", ""]
  lines += [
      f"| scheme | description | store bits | cache bytes (vs {ref}) | perplexity "
      "| vs float cache | bits/byte |",
      "|---|---|---|---|---|---|---|"]
  for r in rows:
    sb = r.get("store_bits_per_element", "")
    cb = (f"{r['cache_bytes']:,} ({r['cache_bytes'] / r['float32_cache_bytes']:.3f})"
          if "cache_bytes" in r else "")
    rel = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else ""
    lines.append(f"| {r['scheme']} | {r['description']} | {sb} | {cb} | "
                 f"{r['perplexity']:.3f} | {rel} | {r['bits_per_byte']:.4f} |")
  with open(_OUT.value, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  experiments.run(main)
