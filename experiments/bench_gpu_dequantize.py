r"""Times the Mosaic GPU dequantizer against XLA's path (issue 12).

For every format of ``experiments/_primitive_formats.FORMATS`` (scales shared
along axis 0 of a ``[K, N]`` tensor, as ``bench_primitives`` times them), in
one process:

* XLA: ``core._quantize.dequantize_jnp`` under ``jax.jit`` (the jnp path
  ``lowbit_jax.dequantize`` runs where the kernel is off);
* kernel: ``gpu_dequantize.dequantize`` with each tiling of
  ``gpu_dequantize.candidate_configs`` (up to ``--sweep`` of them, the
  heuristic's first);

and the per-row kinds (``int8_row``, ``fp8_e4m3_row``, ``fp8_e5m2_row``: the
same tensor quantized with one scale per row, ``axis=1``, the layout of the
real-mode matmul's weights from ``ops.prepare_weight``); checks on the
device that every kernel tiling's output equals XLA's bit for
bit (NaN for NaN; one bool comes back), and measures the bandwidth ceiling
``x * 2`` in the same run. The input is normal noise whose blocks of 16 rows
are scaled by 2**-8 .. 2**8, so neighbouring blocks get different scales.
Device time per call from CUPTI (median of ``--iters`` calls); on CPU
(``--smoke``) the interpreter's wall clock, for checking the script only.

Roofline: the QArray's bytes (codes, scales, zero points) read plus the
float array written, over the ``x * 2`` bandwidth; the issue's target is
70%. ``--write_configs`` writes ``gpu_dequantize_configs.json`` (copy it to
``lowbit_jax/kernels/``): per format the fastest exact tiling, and the formats
whose fastest exact tiling beat XLA by at least ``_quantize_table.MARGIN``
(2%; ``enabled``, what
``gpu_dequantize.ENABLED`` reads). ``--merge_configs`` keeps the entries of an
earlier table for the formats this run did not time. ``--configs_from`` rebuilds
the table from the JSON of an earlier run (e.g. one whose call was cut before
its end, which writes the JSON after every format but the table only at the
end), merged as ``--merge_configs`` says, without timing anything.

Run on the GPU machine (repository root; about 3 minutes)::

  PYTHONPATH=. python3 experiments/bench_gpu_dequantize.py --out_dir=$OUT \
      --write_configs
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Optional

from absl import app
from absl import flags

from experiments import _cupti
from experiments._primitive_formats import FORMATS
from experiments._quantize_table import MARGIN

# Per-row scales of the last axis (K-major weights): id -> element format.
ROW_FORMATS = {"int8_row": "int8", "fp8_e4m3_row": "fp8_e4m3",
               "fp8_e5m2_row": "fp8_e5m2"}
KNOWN = list(FORMATS) + list(ROW_FORMATS)

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_gpu_dequantize",
                               "where results go")
_SHAPE = flags.DEFINE_string("shape", "8192x8192", "K x N of the tensor")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "the tensor's dtype (what "
                             "dequantize returns)")
_FORMATS = flags.DEFINE_list("formats", [], "format ids of _primitive_formats "
                             "and ROW_FORMATS (default: all)")
_SWEEP = flags.DEFINE_integer("sweep", 3, "tilings timed per format (the "
                              "heuristic's first)")
_ITERS = flags.DEFINE_integer("iters", 30, "timed calls per measurement")
_BUDGET = flags.DEFINE_float("time_budget_s", 240.0, "start no new format after "
                             "this many seconds")
_MAX_FIRST = flags.DEFINE_float("max_first_call_s", 20.0, "on a GPU, a tiling "
                                 "whose first call (Mosaic's compile and one "
                                 "call) took longer is timed but never chosen: "
                                 "every user would pay it once per shape")
_TAG = flags.DEFINE_string("tag", "", "file stem suffix (default: from the device)")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU dry run in the interpreter "
                           "(256x256, 2 calls)")
_WRITE_CONFIGS = flags.DEFINE_bool("write_configs", False, "also write "
                                   "<out_dir>/gpu_dequantize_configs.json")
_MERGE_CONFIGS = flags.DEFINE_string("merge_configs", "", "with --write_configs: "
                                     "an earlier table whose formats this run did "
                                     "not time are kept")
_CONFIGS_FROM = flags.DEFINE_string(
    "configs_from", "", "write <out_dir>/gpu_dequantize_configs.json from this "
    "earlier run's JSON (merged into --merge_configs) and time nothing")

T0 = time.time()


def _log(msg: str):
  print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def _shape():
  if _SMOKE.value:
    return 256, 256
  try:
    k, n = (int(v) for v in _SHAPE.value.lower().split("x"))
  except ValueError as e:
    raise app.UsageError(f"--shape must be KxN, e.g. 8192x8192, got "
                         f"{_SHAPE.value!r}") from e
  return k, n


def _input(k: int, n: int, dtype):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
  e = jnp.arange(k // 16, dtype=jnp.int32) % 17 - 8
  return (x * jnp.exp2(jnp.repeat(e, 16)).astype(jnp.float32)[:, None]).astype(
      dtype)


def _same_bits(a, b):
  """Device-side: every element equal (NaN matching NaN)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.all((a32 == b32) | (jnp.isnan(a32) & jnp.isnan(b32))) & (
      a.dtype == b.dtype)


def markdown(res: dict) -> str:
  lines = [f"# Dequantize: Mosaic GPU kernel against XLA ({res['device']})", "",
           f"Command: `{res['command']}`  ",
           f"jax {res['jax']}, {res['timer']}, {res['iters']} calls, started "
           f"{res['started']}. Tensor {res['shape'][0]}x{res['shape'][1]} "
           f"{res['dtype']}, scales along axis 0.", ""]
  c = res.get("ceiling")
  if c:
    lines += [f"Bandwidth ceiling (`x * 2`, same run): {c['us']} us, "
              f"{c['GBps']} GB/s. % = (QArray bytes read + output written) / "
              "that bandwidth / time.", ""]
  lines += ["| format | kernel id | XLA us (%) | kernel us (%) | tiling | exact | "
            "XLA / kernel | other tilings (us, first call s) |",
            "|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if "error" in r and "xla_us" not in r:
      lines.append(f"| {r['format']} | {r.get('kind', '')} | error: "
                   f"{r['error'][:120]} | | | | | |")
      continue
    best = r.get("best")
    others = ", ".join(f"{t['tiling']}: {t.get('us', 'err')}"
                       f" ({t.get('first_call_s', '?')} s)" for t in r["tilings"]
                       if best is None or t["tiling"] != best["tiling"])
    if best is None:
      lines.append(f"| {r['format']} | {r['kind']} | {r['xla_us']} "
                   f"({r['xla_pct']}%) | no exact tiling (or none compiled "
                   f"within --max_first_call_s) | | | | {others} |")
      continue
    lines.append(
        f"| {r['format']} | {r['kind']} | {r['xla_us']} ({r['xla_pct']}%) | "
        f"{best['us']} ({best['pct']}%) | {best['tiling']} "
        f"({best.get('first_call_s', '?')} s first call) | yes | "
        f"{r['xla_us'] / best['us']:.2f}x | {others} |")
  en = res.get("enabled")
  if en is not None:
    lines += ["", f"Enabled (exact and at least {MARGIN:.0%} faster than XLA): "
              f"{', '.join(en) or 'none'}."]
  if res["errors"]:
    lines += ["", "Errors:", ""] + [f"- {e['item']}: {e['error']}"
                                    for e in res["errors"]]
  return "\n".join(lines) + "\n"


def _load_merge(shape: list, dtype: str) -> Optional[dict]:
  """The ``--merge_configs`` table (None without the flag); refuses one
  measured on another shape or dtype."""
  if not _MERGE_CONFIGS.value:
    return None
  with open(_MERGE_CONFIGS.value) as f:
    old = json.load(f)
  if old.get("shape") not in (None, list(shape)) or old.get("dtype") not in (None, dtype):
    raise app.UsageError(
        f"--merge_configs: {_MERGE_CONFIGS.value} was measured on "
        f"{old.get('shape')} {old.get('dtype')}, this run on {list(shape)} "
        f"{dtype}; tilings for different shapes do not merge (drop "
        "--merge_configs or rerun with its --shape/--dtype)")
  return old


def _write_configs(res: dict, old: Optional[dict], out_dir: Optional[str]) -> list:
  """The formats enabled after merging ``res``'s rows into the table ``old``
  (None: a new table); writes ``<out_dir>/gpu_dequantize_configs.json`` unless
  ``out_dir`` is None. Per format timed, the fastest exact tiling replaces the
  old entry, and the format is enabled where it beat XLA by ``MARGIN``; the
  old table's ``notes`` (why a format was taken off by hand) are kept."""
  entries = dict(old.get("entries", {})) if old is not None else {}
  enabled = set(old.get("enabled", ())) if old is not None else set()
  for r in res["rows"]:
    if "kind" not in r:
      continue
    enabled.discard(r["kind"])
    entries.pop(r["kind"], None)
    best = r.get("best")
    if best is None:
      continue
    entries[r["kind"]] = dict(best["config"], us=best["us"], xla_us=r["xla_us"])
    if best["us"] < (1.0 - MARGIN) * r["xla_us"]:
      enabled.add(r["kind"])
  if out_dir is not None:
    table = dict(source=res["command"], device=res["device"], jax=res["jax"],
                 shape=res["shape"], dtype=res["dtype"], enabled=sorted(enabled),
                 entries=entries)
    if old is not None and old.get("notes"):  # hand notes on kept entries
      table["notes"] = old["notes"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_dequantize_configs.json"), "w") as f:
      json.dump(table, f, indent=1, sort_keys=True)
  return sorted(enabled)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import _quantize as core_q  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_dequantize as gd  # pylint: disable=g-import-not-at-top

  if _CONFIGS_FROM.value:
    with open(_CONFIGS_FROM.value) as f:
      res = json.load(f)
    old = _load_merge(res["shape"], res["dtype"])
    enabled = _write_configs(res, old, _OUT_DIR.value)
    _log(f"wrote {os.path.join(_OUT_DIR.value, 'gpu_dequantize_configs.json')} "
         f"from {_CONFIGS_FROM.value}: enabled {enabled}")
    return
  gpu = jax.default_backend() == "gpu"
  if not gpu and not _SMOKE.value:
    raise app.UsageError("timing needs a GPU; pass --smoke for a CPU dry run")
  ids = _FORMATS.value or KNOWN
  unknown = [f for f in ids if f not in KNOWN]
  if unknown:
    raise app.UsageError(f"unknown --formats {unknown}; known: {KNOWN}")
  k, n = _shape()
  dtype = jnp.dtype(_DTYPE.value)
  old = _load_merge([k, n], dtype.name)  # checked before any timing
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  tag = _TAG.value or ("smoke" if _SMOKE.value else
                       "h200" if "h200" in kind.lower() else jax.default_backend())
  stem = os.path.join(_OUT_DIR.value, f"gpu_dequantize_{tag}")
  iters = 2 if _SMOKE.value else _ITERS.value
  res = dict(command=" ".join(["python3"] + sys.argv), device=kind,
             jax=jax.__version__, host=platform.node(),
             started=time.strftime("%Y-%m-%d %H:%M:%S"),
             timer=("CUPTI device time per call (median)" if gpu else
                    "wall clock per call (median; interpreter)"),
             iters=iters, shape=[k, n], dtype=dtype.name, ceiling=None, rows=[],
             errors=[])
  interp = None if gpu else True

  def write():
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    with open(stem + ".json", "w") as f:
      json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(markdown(res))

  def time_us(jf, *args):
    jax.block_until_ready(jf(*args))
    if gpu:
      return _cupti.median_ms(jf, *args, iters=iters) * 1e3
    ts = []
    for _ in range(iters):
      t = time.perf_counter()
      jax.block_until_ready(jf(*args))
      ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6

  x = _input(k, n, dtype)
  out_bytes = k * n * dtype.itemsize
  us = time_us(jax.jit(lambda a: a * 2), x)
  bw = 2 * out_bytes / us / 1e3  # GB/s
  res["ceiling"] = dict(us=round(us, 2), GBps=round(bw, 1))
  same = jax.jit(_same_bits)
  for fid in ids:
    if time.time() - T0 > _BUDGET.value:
      res["errors"].append(dict(item=fid, error="skipped: time budget"))
      continue
    fmt, kw, axis = ((ROW_FORMATS[fid], {}, 1) if fid in ROW_FORMATS
                     else FORMATS[fid] + (0,))
    row = dict(format=fid, tilings=[])
    t_item = time.time()
    try:
      spec = lb.QuantSpec(fmt, axis=axis, **kw)
      q = jax.block_until_ready(jax.jit(lambda v, spec=spec: lb.quantize(v, spec))(x))
      plan, why = gd.plan_of(q)
      if plan is None:
        raise ValueError(f"the kernel does not take it: {why}")
      row["kind"] = plan.kind
      nbytes = q.nbytes + out_bytes
      pct = lambda t, nbytes=nbytes: round(100 * nbytes / 1e3 / t / bw, 1)  # noqa: E731
      xla = jax.jit(core_q.dequantize_jnp)
      ref = xla(q)
      row["xla_us"] = round(time_us(xla, q), 2)
      row["xla_pct"] = pct(row["xla_us"])
      for cfg in gd.candidate_configs(plan, k, n, limit=_SWEEP.value):
        t = dict(tiling=f"{cfg.tile_n}:{cfg.tile_k}:{cfg.k_per_cta}:{cfg.stages}"
                 f":{cfg.rows}" + (":lut" if cfg.lut else ""),
                 config=dataclasses.asdict(cfg))
        try:
          kf = jax.jit(lambda qq, cfg=cfg: gd.dequantize(qq, config=cfg,
                                                         interpret=interp))
          t0 = time.time()
          got = jax.block_until_ready(kf(q))
          t["first_call_s"] = round(time.time() - t0, 1)  # compile + one call
          t["exact"] = bool(same(got, ref))
          t["us"] = round(time_us(kf, q), 2)
          t["pct"] = pct(t["us"])
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()
          t["error"] = f"{type(e).__name__}: {e}"[:300]
        row["tilings"].append(t)
      good = [t for t in row["tilings"] if t.get("exact") and "us" in t
              and (not gpu or t["first_call_s"] <= _MAX_FIRST.value)]
      row["best"] = min(good, key=lambda t: t["us"]) if good else None
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      row["error"] = f"{type(e).__name__}: {e}"[:300]
      res["errors"].append(dict(item=fid, error=row["error"]))
    row["item_s"] = round(time.time() - t_item, 1)
    res["rows"].append(row)
    _log(json.dumps({kk: v for kk, v in row.items() if kk != "tilings"}))
    write()
  res["enabled"] = _write_configs(res, old, _OUT_DIR.value if _WRITE_CONFIGS.value
                                  else None)
  write()
  _log(f"done: {stem}.md")


if __name__ == "__main__":
  app.run(main)
