"""QAT, low-bit training and quantized optimizer states on the decoder LM.

  python -m experiments.qat_study --config configs/qat_study.py:smoke --workdir /tmp/qs

``configs/qat_study.py`` documents the parts and their fields. Every run goes
through ``lowbit_jax.train.train`` (the same loop, rules and recipes a user
runs with ``experiments/train_qat.py``); this main only sets up the runs and
tabulates what they logged.
"""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import platform
import shlex
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import experiments
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from lowbit_jax import _io, optim
from lowbit_jax.train import loop
from lowbit_jax.train import state as state_lib

_CONFIG = experiments.define_config("configs/qat_study.py",
                                          "Study config (file:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (shared by the "
                               "parts; runs that finished are not redone).",
                               required=True)
PARTS = ("float", "qat", "scratch", "optim", "report")


def _qat_base(variant: str) -> ConfigDict:
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "train_qat.py"
  spec = importlib.util.spec_from_file_location("_train_qat_config_qs", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _run_config(c: ConfigDict, *, steps: int, quant: dict | None = None,
                **fields: Any) -> ConfigDict:
  """A train config: the study's ``train`` fields, a quant section, overrides."""
  rc = _qat_base(c.variant)
  for k, v in c.train.items():
    rc[k] = v.copy_and_resolve_references() if isinstance(v, ConfigDict) else v
  rc.steps = steps
  rc.quant.rules = "none"
  rc.quant.start_step = 0
  for k, v in (quant or {}).items():
    rc.quant[k] = v
  for k, v in fields.items():
    if isinstance(v, dict):
      for kk, vv in v.items():
        rc[k][kk] = vv
    else:
      rc[k] = v
  return rc


def _curve(workdir: pathlib.Path) -> list:
  """(step, train loss) pairs from a run's log."""
  out = []
  for line in (workdir / "log.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if rec.get("event") == "train":
      out.append((rec["step"], rec["loss"]))
  return out


def _tokens_per_s(workdir: pathlib.Path) -> float | None:
  vals = [json.loads(l).get("tokens_per_s") for l in
          (workdir / "log.jsonl").read_text().splitlines()]
  vals = [v for v in vals if v]
  return float(np.median(vals[1:] if len(vals) > 1 else vals)) if vals else None


def _train(rc: ConfigDict, workdir: pathlib.Path) -> dict:
  """Runs (or reuses, when its final eval exists) one training run.

  Raises:
    ValueError: ``workdir`` holds a run made with other settings (its
      ``config.json``): reusing it would report its numbers under this
      study's settings, and redoing it would delete it.
  """
  done = workdir / "final_eval.json"
  mismatch = state_lib.run_config_mismatch(workdir, rc, ignore=state_lib.RUN_ONLY_FIELDS)
  if mismatch:
    why = (" (it was trained from another float model: the float run has been "
           "redone since)" if "init_from_run=" in mismatch else "")
    raise ValueError(
        f"{workdir} holds a run made with other settings: {mismatch}{why}. The "
        "study reuses a run only when it was made with the settings asked for: "
        f"use another --workdir, or delete {workdir} to redo that run.")
  if done.exists():
    logging.info("reusing %s", workdir)
    final = state_lib.read_json(done)
    return {"final_eval": {k: v for k, v in final.items() if k != "real"},
            "final_eval_real": final.get("real"), "reused": True}
  if workdir.exists():
    shutil.rmtree(workdir)  # an unfinished run: start it again from scratch
  t = time.perf_counter()
  res = loop.train(rc, workdir)
  res["wall_s"] = time.perf_counter() - t
  return res


def _summary(res: dict, workdir: pathlib.Path) -> dict:
  fe = res.get("final_eval") or {}
  real = res.get("final_eval_real") or {}
  return {"loss": fe.get("loss"), "perplexity": fe.get("perplexity"),
          "real_perplexity": real.get("perplexity"),
          "curve": _curve(workdir), "tokens_per_s": _tokens_per_s(workdir),
          "wall_s": res.get("wall_s")}


def _save_partial(root: pathlib.Path, part: str, out: dict) -> None:
  """Writes a part's results so far: a killed part still reports what ran.

  Entries of an earlier run of the part that this run did not redo are kept,
  so one part can be split over several processes or device calls (e.g.
  ``--config.state_formats=float32`` then ``=int8,4bit``).
  """
  path = root / f"{part}.json"
  old = state_lib.read_json(path).get(part, {}) if path.exists() else {}
  _io.write_atomic(path, json.dumps({part: {**old, **out}}, indent=1))


def part_float(c, root: pathlib.Path) -> dict:
  wd = root / "float"
  res = _train(_run_config(c, steps=c.float_steps), wd)
  return {"float": _summary(res, wd)}


def _block_activation(scheme: str) -> bool:
  """Whether the scheme quantizes activations in a block format."""
  from lowbit_jax import formats  # pylint: disable=g-import-not-at-top
  from lowbit_jax.train import qat  # pylint: disable=g-import-not-at-top
  act = qat.SCHEMES[scheme].activation
  return act is not None and isinstance(formats.get(act), formats.BlockFormat)


def part_qat(c, root: pathlib.Path) -> dict:
  fdir = root / "float"
  if not (fdir / "final_eval.json").exists():
    raise ValueError(f"part 'qat' starts from the float model in {fdir}: run part "
                     "'float' first (--config.parts=float,qat)")
  out = {}
  # The float model trained on for the same steps: what QAT would reach
  # without quantization (QAT also trains the weights further).
  # Each run records the float run it starts from: one retrained since is
  # noticed (_train refuses the stale run).
  float_run = state_lib.run_fingerprint(fdir)
  rc = _run_config(c, steps=c.qat_steps, init_from=str(fdir),
                   init_from_run=float_run, lr=c.qat_lr,
                   warmup_steps=c.qat_warmup, save_quantized=False)
  wd = root / "qat_float_continued"
  out["float_continued"] = _summary(_train(rc, wd), wd)
  _save_partial(root, "qat", out)
  methods = [m for m in c.qat_methods.split(",") if m]
  for scheme in [s for s in c.qat_schemes.split(",") if s]:
    for method in methods:
      if method not in ("rtn", "ste", "lsq"):
        raise ValueError(f"qat_methods holds {method!r}; use rtn, ste, lsq")
      learn_w = "lsq" if method == "lsq" else "none"
      # Block formats (MX, NVFP4) take their activation scales from each
      # block's data: only their weights' step sizes are learned.
      learn_a = (c.act_learn if method == "lsq" and not _block_activation(scheme)
                 else "none")
      steps = 1 if method == "rtn" else c.qat_steps
      lr = 0.0 if method == "rtn" else c.qat_lr
      rc = _run_config(
          c, steps=steps, init_from=str(fdir),
          init_from_run=float_run, lr=lr,
          warmup_steps=0 if method == "rtn" else c.qat_warmup,
          quant=dict(rules=scheme, learn_weight=learn_w, learn_activation=learn_a,
                     scale_lr_mult=c.scale_lr_mult, scale_init=c.scale_init,
                     group_size=c.qat_group_size.get(scheme, 0)))
      wd = root / f"qat_{scheme}_{method}"
      res = _train(rc, wd)
      out[f"{scheme}/{method}"] = _summary(res, wd)
      _save_partial(root, "qat", out)
  return {"qat": out}


def part_scratch(c, root: pathlib.Path) -> dict:
  out = {}
  for scheme in [s for s in c.scratch_schemes.split(",") if s]:
    wd = root / f"scratch_{scheme}"
    rc = _run_config(c, steps=c.scratch_steps or c.float_steps, quant=dict(rules=scheme),
                     save_quantized=False)
    out[scheme] = _summary(_train(rc, wd), wd)
    out[scheme]["steps"] = c.scratch_steps or c.float_steps
    _save_partial(root, "scratch", out)
  return {"scratch": out}


def part_optim(c, root: pathlib.Path) -> dict:
  from lowbit_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  out = {}
  cfg = loop.model_config(c.train)
  model = Llama(cfg)
  tokens = np.zeros((1, 8), np.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
  for fmt in [s for s in c.state_formats.split(",") if s]:
    wd = root / f"optim_{fmt}"
    rc = _run_config(c, steps=c.scratch_steps or c.float_steps,
                     optim={"state_format": fmt})
    summary = _summary(_train(rc, wd), wd)
    tx = loop.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                    mask=jax.tree.map(lambda p: p.ndim >= 2, params),
                    state_format=fmt)
    summary["state_bytes"] = int(optim.state_nbytes(jax.eval_shape(tx.init, params)))
    out[fmt] = summary
    _save_partial(root, "optim", out)
  return {"optim": out}


def _fmt(v, nd=2):
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a" if v is None else str(v)
  return f"{v:.{nd}f}"


def part_report(c, root: pathlib.Path) -> dict:
  res = {}
  for p in ("float", "qat", "scratch", "optim"):
    f = root / f"{p}.json"
    if f.exists():
      res.update(state_lib.read_json(f))
  meta = state_lib.read_json(root / "meta.json") if (root / "meta.json").exists() \
      else {}
  lines = [f"# QAT, low-bit training and quantized optimizer states ({c.variant})", "",
           f"Device: {meta.get('device', '?')}; jax {meta.get('jax', '?')}; "
           f"decoder LM `{c.variant}` config on the stdlib corpus "
           f"(Python {meta.get('python', '?')}'s sources, so corpora differ between "
           "machines).", "",
           "Commands:", "", "```"]
  lines += meta.get("commands", []) + ["```", ""]
  fl = res.get("float")
  if fl:
    n_float = fl["curve"][-1][0] if fl.get("curve") else c.float_steps
    lines += [f"Float model: {n_float} steps, held-out perplexity "
              f"{_fmt(fl['perplexity'])} (loss {_fmt(fl['loss'], 4)}).", ""]
  qat = res.get("qat")
  if qat and fl:
    lines += ["## QAT from the float model", "",
              f"{c.qat_steps} QAT steps (lr {c.qat_lr}, learned scales at "
              f"{c.scale_lr_mult}x), held-out perplexity in fake-quant mode and "
              "after real-mode conversion (packed weights holding the learned "
              "scales). *Gap recovered* = (RTN - QAT) / (RTN - float). `ste`: "
              "straight-through estimator, fixed amax scales; `lsq`: LSQ weight "
              f"step sizes and {c.act_learn.upper()} activation ranges (block "
              "formats: weights only; their activation scales follow each "
              "block). The float model trained on for the same steps without "
              "quantization reaches perplexity "
              f"{_fmt((qat.get('float_continued') or {}).get('perplexity'))}.", "",
              "| scheme | float | RTN | QAT ste | QAT lsq | real-mode lsq | "
              "gap recovered ste | gap recovered lsq |",
              "|---|---|---|---|---|---|---|---|"]
    for scheme in [s for s in c.qat_schemes.split(",") if s]:
      g = lambda m: (qat.get(f"{scheme}/{m}") or {})  # noqa: E731
      rtn, ste, lsq = (g(m).get("perplexity") for m in ("rtn", "ste", "lsq"))

      def rec(v):
        if None in (v, rtn) or rtn == fl["perplexity"]:
          return "n/a"
        return f"{(rtn - v) / (rtn - fl['perplexity']):.0%}"
      lines.append(f"| {scheme} | {_fmt(fl['perplexity'])} | {_fmt(rtn)} | "
                   f"{_fmt(ste)} | {_fmt(lsq)} | {_fmt(g('lsq').get('real_perplexity'))}"
                   f" | {rec(ste)} | {rec(lsq)} |")
    lines.append("")
  sc = res.get("scratch")
  if sc:
    base = (sc.get("none") or {}).get("loss")
    # The steps the runs were trained for (older JSON lacks it: the curve's last step).
    steps = {r.get("steps") or (r.get("curve") or [[c.scratch_steps or c.float_steps]])[-1][0]
             for r in sc.values()}
    lines += ["## Training from scratch, every matmul in its format", "",
              f"{'/'.join(str(s) for s in sorted(steps))} steps from the same "
              "initialisation and batches. "
              "`none` is the unquantized run (the model's compute dtype); the "
              "others quantize weights and activations in the forward pass and the "
              "output gradient in the backward pass (see lowbit_jax.train.qat."
              "SCHEMES).", "",
              "| scheme | final held-out loss | vs unquantized | perplexity | "
              "tokens/s |", "|---|---|---|---|---|"]
    for scheme, r in sc.items():
      rel = (f"{(r['loss'] - base) / base:+.2%}" if base and r.get("loss") is not None
             else "n/a")
      lines.append(f"| {scheme} | {_fmt(r['loss'], 4)} | {rel} | "
                   f"{_fmt(r['perplexity'])} | {_fmt(r.get('tokens_per_s'), 0)} |")
    lines.append("")
    if c.plot:
      _plot(sc, c.plot)
      rel_plot = pathlib.Path(c.plot)
      rep = pathlib.Path(c.report) if c.report else None
      if rep is not None:
        try:
          rel_plot = rel_plot.resolve().relative_to(rep.resolve().parent)
        except ValueError:
          pass
      lines += [f"![training loss curves]({rel_plot})", ""]
  op = res.get("optim")
  if op:
    f32 = (op.get("float32") or {}).get("state_bytes")
    lines += ["## AdamW with quantized moments", "",
              "Float training with `lowbit_jax.optim.adamw(state_format=...)`; state "
              "bytes are the QArrays' true `nbytes` (plus float leaves: small "
              "tensors stay float32).", "",
              "| state format | final held-out loss | perplexity | state bytes | "
              "vs float32 |", "|---|---|---|---|---|"]
    for fmt, r in op.items():
      ratio = f"{r['state_bytes'] / f32:.3f}x" if f32 else "n/a"
      lines.append(f"| {fmt} | {_fmt(r['loss'], 4)} | {_fmt(r['perplexity'])} | "
                   f"{r['state_bytes']:,} | {ratio} |")
    lines.append("")
  text = "\n".join(lines)
  if c.report:
    pathlib.Path(c.report).parent.mkdir(parents=True, exist_ok=True)
    _io.write_atomic(pathlib.Path(c.report), text)
  _io.write_atomic(root / "report.md", text)
  print(text)
  return {}


def _plot(scratch: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for scheme, r in scratch.items():
    if r.get("curve"):
      s, l = zip(*r["curve"])
      ax.plot(s, l, label=scheme if scheme != "none" else "unquantized")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.set_ylim(top=min(ax.get_ylim()[1], 8))
  ax.legend()
  ax.grid(alpha=0.3)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = _CONFIG.value
  parts = [p for p in c.parts.split(",") if p]
  bad = [p for p in parts if p not in PARTS]
  if bad:
    raise app.UsageError(f"unknown part(s) {bad}; choose from {PARTS}")
  root = pathlib.Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  loop.quiet_orbax_logs()
  meta_f = root / "meta.json"
  meta = state_lib.read_json(meta_f) if meta_f.exists() else {"commands": []}
  dev = jax.devices()[0]
  if any(p != "report" for p in parts):  # a report-only run keeps the producer's device
    meta.update(device=f"{dev.platform}: {getattr(dev, 'device_kind', '?')} x "
                f"{jax.device_count()}", jax=jax.__version__,
                python=platform.python_version())
  cmd = c.command or "python -m experiments.qat_study " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  if cmd not in meta["commands"]:
    meta["commands"].append(cmd)
  _io.write_atomic(meta_f, json.dumps(meta, indent=1))
  fns = {"float": part_float, "qat": part_qat, "scratch": part_scratch,
         "optim": part_optim, "report": part_report}
  for p in PARTS:
    if p in parts:
      out = fns[p](c, root)
      if out:
        # Merged with the entries earlier runs of the part wrote (a part
        # split over several runs keeps them all).
        _save_partial(root, p, out[p])


if __name__ == "__main__":
  experiments.run(main)
