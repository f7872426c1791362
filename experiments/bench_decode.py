r"""Decode throughput of the Llama decoder with a bf16 vs a quantized KV cache.

For each cache scheme and batch size, one jitted function prefills a random
prompt batch and generates ``--new_tokens`` tokens greedily
(``lowbit_jax.models.decode.make_generate``: prefill, then a ``lax.scan`` of
decode steps). A second function prefills and generates one token; decode
throughput is ``batch * (new_tokens - 1) / (t_generate - t_prefill)``.
Parameters are random (throughput does not depend on training) and stored in
bf16, the compute dtype; ``bf16`` is the float cache (bf16 too).

Timing: on GPU, device time from CUPTI
(``jax.experimental.mosaic.gpu.profiler.measure``, the median over
``--iters`` calls; every kernel of a call counted, host gaps not) and the wall
clock; elsewhere the wall clock (``block_until_ready``, median of ``--iters``).

Run on a GPU (repository root)::

  python -m experiments.bench_decode --config=base --out_dir=benchmarks/decode

CPU smoke run (seconds)::

  python -m experiments.bench_decode --config=tiny --prompt_len=16 \
      --new_tokens=16 --residual=8 --kivi_group=8 --iters=2 \
      --out_dir=/tmp/bench_decode

Writes ``decode_<device>.json`` and ``decode_<device>.md`` (or ``--tag``) to
``--out_dir``. One batch size per command keeps a run short: ``--batches=1
--tag=decode_h200_b1``, then ``--batches=16 --tag=decode_h200_b16``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_enum("config", "base", ["base", "small", "tiny"],
                            "LlamaConfig variant, bf16 compute (tiny: "
                            "LlamaConfig.smoke)")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "batch sizes")
_SCHEMES = flags.DEFINE_list("schemes", ["bf16", "int8", "fp8_e4m3", "int4", "kivi4",
                                         "kivi2"], "cache schemes")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "prompt tokens (prefilled)")
_NEW = flags.DEFINE_integer("new_tokens", 256, "generated tokens (>= 2)")
_RESIDUAL = flags.DEFINE_integer("residual", 32, "float window of quantized caches")
_KIVI_GROUP = flags.DEFINE_integer("kivi_group", 32,
                                   "tokens per KIVI key group (divides --residual)")
_ITERS = flags.DEFINE_integer("iters", 5, "timed calls per measurement")
_TAG = flags.DEFINE_string("tag", "", "output file stem (default decode_<device>)")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/decode", "where results go")


def _schemes() -> dict:
  from lowbit_jax import QuantRule, QuantSpec  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models import kv_cache  # pylint: disable=g-import-not-at-top

  def per_token(fmt, **kw):
    return [QuantRule(r".*/attn/cache/(key|value)", ops=("kv_cache",),
                      activation=QuantSpec(fmt, axis=-1, **kw))]
  return {"bf16": None, "int8": per_token("int8"), "fp8_e4m3": per_token("fp8_e4m3"),
          "int4": per_token("int4"),
          "kivi4": kv_cache.kivi_rules(4, _KIVI_GROUP.value),
          "kivi2": kv_cache.kivi_rules(2, _KIVI_GROUP.value)}


class _Timer:
  """Median seconds per call: CUPTI device time on GPU, else the wall clock."""

  def __init__(self, jax):
    self.jax = jax
    self.gpu = jax.default_backend() == "gpu"

  def wall(self, fn, *args) -> float:
    self.jax.block_until_ready(fn(*args))  # compile + warm up
    ts = []
    for _ in range(_ITERS.value):
      t0 = time.perf_counter()
      self.jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

  def device(self, fn, *args):
    if not self.gpu:
      return None
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
    self.jax.block_until_ready(fn(*args))
    _, ts = profiler.measure(fn, iterations=_ITERS.value)(*args)
    ts = ts if isinstance(ts, (list, tuple)) else [ts]
    return statistics.median(ts) * 1e-3  # ms -> s


def _model(jax, jnp):
  from lowbit_jax.models.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top
  name = _CONFIG.value
  cfg = (LlamaConfig.smoke(dtype="bfloat16") if name == "tiny"
         else getattr(LlamaConfig, name)(dtype="bfloat16"))
  need = _PROMPT.value + _NEW.value
  if need > cfg.max_len:
    cfg = cfg.replace(max_len=need)
  model = Llama(cfg)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)
  return model, {"params": params}


def _rate(b: int, n: int, t_gen: float, t_pre: float):
  """Decode tokens/s, or None when the timings cannot resolve the decode steps."""
  return b * (n - 1) / (t_gen - t_pre) if t_gen > t_pre else None


def _step_ms(n: int, t_gen: float, t_pre: float):
  return 1e3 * (t_gen - t_pre) / (n - 1) if t_gen > t_pre else None


def _fmt(v, spec: str) -> str:
  return "n/a" if v is None else format(v, spec)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _NEW.value < 2:
    raise app.UsageError("--new_tokens must be >= 2 (one generated token is the "
                         "prefill's)")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models import decode, kv_cache  # pylint: disable=g-import-not-at-top

  model, variables = _model(jax, jnp)
  cfg = model.config
  timer = _Timer(jax)
  schemes = _schemes()
  p, n = _PROMPT.value, _NEW.value
  rows = []
  for b in [int(x) for x in _BATCHES.value]:
    tokens = jax.random.randint(jax.random.key(b), (b, p), 0, cfg.vocab)
    lengths = jnp.full((b,), p, jnp.int32)
    ref_out = None
    for name in _SCHEMES.value:
      if name not in schemes:
        raise app.UsageError(f"unknown scheme {name!r}; choose from {list(schemes)}")
      rules = schemes[name]
      residual = _RESIDUAL.value if rules else None
      kw = dict(prompt_len=p, batch=b, cache_rules=rules, residual=residual,
                max_len=p + n)
      gen = decode.make_generate(model, n, **kw)
      pre = decode.make_generate(model, 1, **kw)
      args = (variables, tokens, lengths, jax.random.key(0))
      out = np.asarray(gen(*args))
      if ref_out is None:
        ref_out = out
      t_gen, t_pre = timer.wall(gen, *args), timer.wall(pre, *args)
      d_gen, d_pre = timer.device(gen, *args), timer.device(pre, *args)
      cache = kv_cache.init_cache(cfg, b, rules=rules, residual=residual,
                                  max_len=p + n)
      row = {"scheme": name, "batch": b, "prompt_len": p, "new_tokens": n,
             "wall_generate_s": t_gen, "wall_prefill_s": t_pre,
             "wall_decode_tokens_per_s": _rate(b, n, t_gen, t_pre),
             "wall_ms_per_step": _step_ms(n, t_gen, t_pre),
             "cache_bytes": cache.nbytes,
             "greedy_agreement_with_first_scheme": float(np.mean(out == ref_out))}
      if d_gen is not None:
        row.update(device_generate_s=d_gen, device_prefill_s=d_pre,
                   device_decode_tokens_per_s=_rate(b, n, d_gen, d_pre),
                   device_ms_per_step=_step_ms(n, d_gen, d_pre))
      print(json.dumps(row), flush=True)
      rows.append(row)
  _write(rows, cfg)


def _write(rows, cfg) -> None:
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  tag = "".join(c if c.isalnum() else "_" for c in dev.device_kind.lower())
  cmd = "python -m experiments.bench_decode " + " ".join(sys.argv[1:])
  meta = {"device": f"{dev.platform}: {dev.device_kind} x {jax.device_count()}",
          "jax": jax.__version__, "python": platform.python_version(),
          "command": cmd, "config": _CONFIG.value, "model": dataclasses.asdict(cfg),
          "residual": _RESIDUAL.value, "kivi_group": _KIVI_GROUP.value,
          "iters": _ITERS.value,
          "date": time.strftime("%Y-%m-%d")}
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  base = os.path.join(_OUT_DIR.value, _TAG.value or f"decode_{tag}")
  with open(base + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  dev_cols = any("device_generate_s" in r for r in rows)
  head = ("| scheme | batch | cache MB | decode tok/s (wall) | ms/step (wall) |"
          + (" decode tok/s (device) | ms/step (device) |" if dev_cols else "")
          + " greedy agreement |")
  lines = [f"# Decode throughput, {_CONFIG.value} model, KV cache schemes", "",
           f"Command: `{cmd}`. Device: {meta['device']}, jax {meta['jax']}, "
           f"Python {meta['python']}, run on {meta['date']}.", "",
           f"Prompt {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} "
           f"generated (greedy, one jit: prefill + lax.scan); quantized caches keep "
           f"a float window of {_RESIDUAL.value} tokens. Decode rate = batch x "
           "(new tokens - 1) / (generate time - prefill time); medians of "
           f"{_ITERS.value} calls. Greedy agreement: fraction of generated tokens "
           "equal to the first scheme's (random weights give nearly tied logits, so "
           "only a sanity check). n/a: generate was not measurably slower than "
           "prefill (noise).",
           "", head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    line = (f"| {r['scheme']} | {r['batch']} | {r['cache_bytes'] / 2**20:.2f} | "
            f"{_fmt(r['wall_decode_tokens_per_s'], '.1f')} | "
            f"{_fmt(r['wall_ms_per_step'], '.3f')} |")
    if dev_cols:
      line += (f" {_fmt(r.get('device_decode_tokens_per_s'), '.1f')} | "
               f"{_fmt(r.get('device_ms_per_step'), '.3f')} |")
    line += f" {r['greedy_agreement_with_first_scheme']:.3f} |"
    lines.append(line)
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
  app.run(main)
