r"""Device time of one QAT / low-bit training step of the decoder LM, vs bf16 and qwix.

  # GPU (one device call; qwix from the carried wheels, see BUILD.md):
  PYTHONPATH=/tmp/site:. python3 -m experiments.bench_qat --out $OUT/bench_qat.json \
      --md benchmarks/qat_step_h200.md
  # CPU check of every variant (tiny model, wall clock):
  python3 -m experiments.bench_qat --smoke --out /tmp/bench_qat.json

Every "ours" variant is the training step users run: ``lowbit_jax.train``'s
``train_step`` (value_and_grad of the LM loss through ``quantize_linen`` fake
quantization, learned-scale gradients, overwrite-with-gradient amax histories,
AdamW with clipping, the recipe's ``optax.multi_transform``), jitted once as
the training loop jits it (``train.split_constant_metrics``: metrics known at
trace time come back from the host, since session 45),
params float32, compute bf16 (``LlamaConfig.base``: 56M parameters, batch
``--batch`` x ``--seq`` tokens). qwix's QAT (``qwix.QtProvider``) runs the same
model under an equivalent step (value_and_grad + the same optimizer). Time per
call on the GPU from CUPTI (``jax.experimental.mosaic.gpu.profiler.measure``,
median of ``--iters`` calls; every kernel of a call counted); wall clock on
the CPU. Each variant is in its own try/except and the JSON is rewritten after
each one.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time
import traceback

import experiments
from absl import app, flags

_OUT = flags.DEFINE_string("out", "/tmp/bench_qat.json", "JSON output.")
_MD = flags.DEFINE_string("md", "", "Markdown table output ('' = none).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model (CPU check).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per variant.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence.")
_ONLY = flags.DEFINE_string("only", "", "Comma-separated variant names to run.")
_QWIX = flags.DEFINE_bool("qwix", True, "Also time qwix's QAT where importable.")
_PLAIN = flags.DEFINE_bool("plain_jit", False, "Time train_step under a plain "
                           "jax.jit, its metrics known at trace time copied into "
                           "outputs on the device (the step before session 45).")

from experiments._qat_step import BASELINE, DENSE_RE, OURS, TARGET, make_step  # pylint: disable=g-bad-import-order


def _timer():
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == "gpu":
    try:
      from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
      return profiler
    except ImportError:
      return None
  return None


def measure(fn, args, iters: int, rebuild=None) -> dict:
  """Median time per call of the jitted ``fn(*args)`` (CUPTI on GPU);
  ``rebuild`` maps its output to the step's ``(state, metrics)``."""
  import jax  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  if rebuild is not None:
    out = rebuild(out)
  compile_s = time.perf_counter() - t
  prof = _timer()
  if prof is not None:
    _, ts = prof.measure(fn, iterations=iters)(*args)
    ts = ts if isinstance(ts, (list, tuple)) else [ts]
    times, method = [float(v) * 1e3 for v in ts], "cupti"
  else:
    times = []
    for _ in range(iters):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append((time.perf_counter() - t) * 1e6)
    method = "wallclock"
  if isinstance(out, tuple) and isinstance(out[1], dict):
    loss = out[1]["loss"]  # lowbit_jax.train.train_step: (state, metrics)
  elif isinstance(out, tuple) and len(out) == 3:
    loss = out[2]  # the qwix step: (params, opt_state, loss)
  else:
    loss = None
  return dict(us=statistics.median(times), us_min=min(times), method=method,
              iters=len(times), compile_s=round(compile_s, 2),
              loss=None if loss is None else float(loss))


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from lowbit_jax.models.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top
  from lowbit_jax.train import loop, state as state_lib  # pylint: disable=g-import-not-at-top

  if _SMOKE.value:
    if _BATCH.present or _SEQ.present:
      raise app.UsageError("--smoke fixes batch 2 and seq 32; drop --batch / --seq")
    cfg = LlamaConfig.smoke(dtype="bfloat16")
    batch_size, seq = 2, 32
  else:
    cfg = LlamaConfig.base()
    batch_size, seq = _BATCH.value, _SEQ.value
  model = Llama(cfg)
  rng = np.random.default_rng(0)
  batch = jnp.asarray(rng.integers(0, cfg.vocab, (batch_size, seq + 1)), jnp.int32)
  dev = jax.devices()[0]
  res = {"meta": dict(device=f"{dev.platform}: {getattr(dev, 'device_kind', '?')}",
                      jax=jax.__version__, model=str(cfg),
                      params=None, tokens_per_step=batch_size * seq,
                      command="python3 -m experiments.bench_qat " + " ".join(sys.argv[1:]),
                      step="lowbit_jax.train.train_step: value_and_grad of the LM "
                           "loss + AdamW (clip 1.0, wd 0.1) [+ learned scales' "
                           "optimizer]; params f32, compute bf16; "
                           + ("a plain jax.jit" if _PLAIN.value else
                              "jitted as split_constant_metrics splits it"),
                      quantized_layers="q/k/v/o, gate/up/down (lm_head and "
                                       "attention einsums in bf16)"),
         "rows": []}
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save():
    out.write_text(json.dumps(res, indent=1))

  only = set(filter(None, _ONLY.value.split(",")))
  unknown = sorted(only - set(OURS) - {BASELINE})
  if unknown:
    raise app.UsageError(f"--only names {unknown}, which are not variants; the "
                         f"variants are {sorted(OURS)}")

  params = state_lib.init_params(model, jax.random.key(0))
  res["meta"]["params"] = int(sum(p.size for p in jax.tree.leaves(params)))
  res["meta"]["model"] = "LlamaConfig.smoke" if _SMOKE.value else "LlamaConfig.base"
  base_us = base_loss = None

  def ours(scheme, overrides):
    step, state = make_step(model, params, batch, scheme, overrides)
    recipe = step.keywords["recipe"]
    if _PLAIN.value:
      st = measure(jax.jit(step), (state, batch), _ITERS.value)
    else:
      # As the training loop jits it (train.ShardedStep): the metrics known
      # at trace time come back from the host, not as device copies.
      traced, rebuild = loop.split_constant_metrics(step)
      st = measure(jax.jit(traced), (state, batch), _ITERS.value,
                   rebuild=lambda out: (out[0], rebuild(out[1])))
    st["rules"] = None if recipe is None else [repr(r) for r in recipe.rules]
    return st

  variants = [(BASELINE, "none", {})] + [
      (k, s, o) for k, (s, o) in OURS.items()]
  for name, scheme, overrides in variants:
    if only and name not in only and scheme != "none":
      continue
    row = {"name": name, "lib": "lowbit_jax"}
    try:
      row.update(ours(scheme, overrides))
      if scheme == "none":
        base_us, base_loss = row["us"], row["loss"]
      elif row["loss"] == base_loss:
        # The first step's loss is bit-identical to bf16's: the quantization
        # did nothing (e.g. a compiler elided it), so the time says nothing.
        row["error"] = "quantization had no effect: loss equals the bf16 step's"
      elif base_us:
        row["ratio"] = row["us"] / base_us
        if name in TARGET:
          row["target"] = TARGET[name]
          row["met"] = row["ratio"] <= TARGET[name]
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = "".join(traceback.format_exception_only(type(e), e))[-800:]
    print(json.dumps({k: v for k, v in row.items() if k != "rules"}), flush=True)
    res["rows"].append(row)
    save()

  if _QWIX.value and not _SMOKE.value:
    _qwix_rows(res, model, params, batch, base_us, base_loss, save)
  if _MD.value:
    _markdown(res, _MD.value)
  save()


def _qwix_rows(res, model, params, batch, base_us, base_loss, save):
  """qwix.QtProvider QAT of the same layers, same loss and AdamW."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    res["meta"]["qwix"] = f"not importable: {e}"
    return
  res["meta"]["qwix"] = getattr(qwix, "__version__", "?")
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, 0.9, 0.95, 1e-8,
                                                               0.1))
  opt_state = tx.init(params)

  def make_step(apply):
    def loss_fn(p, b):
      logits = apply({"params": p}, b[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean()

    def step(p, o, b):
      loss, g = jax.value_and_grad(loss_fn)(p, b)
      upd, o = tx.update(g, o, p)
      return optax.apply_updates(p, upd), o, loss
    return jax.jit(step)

  plan = [("qwix int8 W+A", jnp.int8, jnp.int8, None),
          ("qwix fp8 W+A", jnp.float8_e4m3fn, jnp.float8_e4m3fn, None),
          ("qwix MXFP4 W (weight-only)", "mxfp4", None, 32)]
  for name, wq, aq, tile in plan:
    row = {"name": name, "lib": "qwix"}
    try:
      rule = qwix.QtRule(module_path=DENSE_RE, weight_qtype=wq, act_qtype=aq,
                         tile_size=tile)
      qm = qwix.quantize_model(model, qwix.QtProvider([rule]))
      st = measure(make_step(qm.apply), (params, opt_state, batch), _ITERS.value)
      row.update(st)
      if base_us:
        row["ratio"] = row["us"] / base_us
      if row["loss"] == base_loss:
        row["no_effect"] = True  # the same loss as bf16: nothing was quantized
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = "".join(traceback.format_exception_only(type(e), e))[-800:]
    print(json.dumps(row), flush=True)
    res["rows"].append(row)
    save()


def _markdown(res, path):
  m = res["meta"]
  lines = ["# One training step of the decoder LM: QAT and low-bit training vs bf16",
           "", f"Device: {m['device']}; jax {m['jax']}; qwix {m.get('qwix', '-')}. "
           f"Model: {m.get('model', 'LlamaConfig.base')} ({m['params']:,} parameters), "
           f"{m['tokens_per_step']} tokens per step. Step: {m['step']}. Quantized: "
           f"{m['quantized_layers']}. Device time per step (median).", "",
           f"Command: `{m['command']}`", "",
           "| variant | us / step | vs bf16 | target | met |",
           "|---|---|---|---|---|"]
  for r in res["rows"]:
    if "error" in r:
      lines.append(f"| {r['name']} | error: {r['error'].splitlines()[-1][:120]} "
                   "| | | |")
      continue
    ratio = f"{r['ratio']:.3f}x" if "ratio" in r else "1.000x"
    if r.get("no_effect"):
      ratio += " (loss = bf16's: not quantized)"
    tgt = f"<= {r['target']}x" if "target" in r else ""
    met = ("yes" if r.get("met") else "no") if "met" in r else ""
    lines.append(f"| {r['name']} | {r['us']:.0f} | {ratio} | {tgt} | {met} |")
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  experiments.run(main)
