r"""Times the weight-only kernel on 4-bit codes in natural and in "wgmma" order.

``lowbit_jax.core._qarray.wgmma_byte_order`` stores the codes so that a
thread's 32-bit shared-memory word is already its WGMMA fragment; the kernel then skips Mosaic
GPU's relayout (two warp shuffles and two byte permutes per word of eight
codes). This probe measures what that is worth at decode: for each 4-bit
case, weight shape and batch, the table's tiling (``tuned_config``) on natural
codes and on permuted codes, and optionally other tilings on permuted codes
(``--tilings``), interleaved over ``--rounds`` (the fastest round's median
kept), with the stream bandwidth and XLA bf16 measured in the same run. The
two orders must give the same bits; a difference is reported and the row is
marked.

Run on the GPU machine (repository root)::

  PYTHONPATH=. python3 experiments/probe_wgmma_order.py --out_dir=$OUT

Writes ``<out_dir>/<tag>.md`` and ``.json``; ``--report=<tag>.json`` rebuilds
the markdown from the JSON on any machine.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from absl import app
from absl import flags

_CASES = flags.DEFINE_list("cases", ["int4_pc", "int4_g128", "fp4_g32", "mxfp4",
                                     "nvfp4"], "weight cases")
_SHAPES = flags.DEFINE_list("shapes", ["8192x28672", "8192x8192", "28672x8192"],
                            "K x N weight shapes")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "M values")
_TILINGS = flags.DEFINE_list(
    "tilings", [], "extra tilings timed on permuted codes, each "
    "tile_n:tile_k:tile_m:stages:split_k (tile_m 0: the table's)")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved rounds")
_ITERS = flags.DEFINE_integer("iters", 20, "timed calls per measurement")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")
_TAG = flags.DEFINE_string("tag", "wgmma_order_h200", "output file stem")
_BUDGET = flags.DEFINE_float("time_budget_s", 200.0, "no new row after this")
_REPORT = flags.DEFINE_string("report", "", "rebuild <stem>.md from this JSON "
                              "(no GPU) and exit")

CASES = {"int4_pc": ("int4", None), "int4_g128": ("int4", 128),
         "int4_g32": ("int4", 32), "fp4_g32": ("fp4_e2m1", 32),
         "mxfp4": ("mxfp4", 32), "nvfp4": ("nvfp4", 16)}
L2_BYTES = 50 * 2 ** 20


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  from tests.kernels._gpu_operands import make_wo  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._qarray import wgmma_byte_order  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem  # pylint: disable=g-import-not-at-top

  t0 = time.time()

  def wo_weight(key, fmt, group, n, k):
    ops, _ = make_wo(key, fmt, group, 1, n, k, out_dtype="bfloat16",
                     scale_range=(0.001, 0.02))
    return ops.w_codes, ops.w_scale, ops.w_tensor_scale

  def measure(fn, args, compiled=None):
    compiled = compiled or jax.jit(fn).lower(*args).compile()
    out, ts = profiler.measure(compiled, iterations=_ITERS.value)(*args)
    ts = ts if isinstance(ts, list) else [ts]
    return float(np.median(ts)) * 1e3, out   # ms -> us

  big = jax.random.normal(jax.random.key(1), (1 << 28,), jnp.float32)
  us, _ = measure(lambda a: a * 1.0001, (big,))
  bw = 2 * big.nbytes / us / 1e6   # TB/s
  del big
  res = dict(meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                       command="PYTHONPATH=. python3 experiments/probe_wgmma_order.py "
                       + " ".join(f"--{k}={','.join(v) if isinstance(v, list) else v}"
                                  for k, v in [("cases", _CASES.value),
                                               ("shapes", _SHAPES.value),
                                               ("batches", _BATCHES.value),
                                               ("tilings", _TILINGS.value),
                                               ("rounds", _ROUNDS.value)]),
                       stream_TBps=bw, iters=_ITERS.value, rounds=_ROUNDS.value),
             rows=[], skipped=[])
  print(f"stream {bw:.2f} TB/s", flush=True)

  for shape in _SHAPES.value:
    k, n = (int(v) for v in shape.split("x"))
    kx = jax.random.key(k * 7 + n)
    for case in _CASES.value:
      fmt, group = CASES[case]
      w0 = wo_weight(jax.random.fold_in(kx, 1), fmt, group, n, k)
      wbytes = int(w0[0].nbytes + w0[1].nbytes)
      reps = max(1, min(8, math.ceil(3 * L2_BYTES / wbytes)))
      ws = [w0] + [wo_weight(jax.random.fold_in(kx, 2 + i), fmt, group, n, k)
                   for i in range(reps - 1)]
      wp = [(wgmma_byte_order(c), s, t) for c, s, t in ws]
      for m in (int(v) for v in _BATCHES.value):
        if time.time() - t0 > _BUDGET.value:
          res["skipped"].append(f"{case} {shape} M={m}")
          continue
        x = jax.random.normal(jax.random.fold_in(kx, 100 + m), (m, k),
                              jnp.float32).astype(jnp.bfloat16)
        prob = MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                             w_block=group)
        cfg = wo.tuned_config(prob)
        if not wo._shape_ok(prob, cfg):  # pylint: disable=protected-access
          cfg = wo._decode_config(prob)  # pylint: disable=protected-access
        probs = {"natural": prob,
                 "wgmma": dataclasses.replace(prob, w_order="wgmma")}
        variants = {"natural": (cfg, "natural", ws), "wgmma": (cfg, "wgmma", wp)}
        for spec in _TILINGS.value:
          tn, tk, tm, st, sk = (int(v) for v in spec.split(":"))
          c2 = dataclasses.replace(cfg, tile_n=tn, tile_k=tk,
                                   tile_m=tm or cfg.tile_m, stages=st, split_k=sk)
          if wo._shape_ok(prob, c2) and wo._tiles_ok(prob, c2) and wo._smem_ok(prob, c2):  # pylint: disable=protected-access
            variants[f"wgmma {spec}"] = (c2, "wgmma", wp)
        fns = {}
        for name, (c, order, wset) in variants.items():
          fns[name] = (lambda xx, wset_, c=c, order=order: [
              wo.matmul(MatmulOperands(x=xx, w_codes=a, w_scale=s_,
                                       w_tensor_scale=t_), probs[order],
                        config=c) for a, s_, t_ in wset_], wset)
        times = {name: [] for name in fns}
        outs = {}
        err = None
        try:
          compiled = {name: jax.jit(fn).lower(x, wset).compile()
                      for name, (fn, wset) in fns.items()}
          for _ in range(_ROUNDS.value):
            for name, (fn, wset) in fns.items():
              t, out = measure(fn, (x, wset), compiled[name])
              times[name].append(t / reps)
              outs.setdefault(name, np.asarray(out[0], np.float32))
        except Exception as e:  # pylint: disable=broad-except
          err = f"{type(e).__name__}: {str(e)[:400]}"
        bf = [jax.random.normal(jax.random.fold_in(kx, 200 + i), (k, n),
                                jnp.float32).astype(jnp.bfloat16)
              for i in range(max(1, min(8, math.ceil(3 * L2_BYTES / (k * n * 2)))))]
        bt, _ = measure(lambda xx, bb: [xx @ b_ for b_ in bb], (x, bf))
        bt /= len(bf)
        del bf
        roof = (wbytes + m * k * 2 + m * n * 2) / (bw * 1e6)
        row = dict(case=case, shape=shape, m=m, config=list(dataclasses.astuple(cfg)),
                   bf16_us=bt, roofline_us=roof, error=err,
                   us={name: min(v) if v else None for name, v in times.items()},
                   same_bits={name: bool(np.array_equal(o, outs["natural"]))
                              for name, o in outs.items() if "natural" in outs})
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
      del ws, wp

  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, _TAG.value + ".json"), "w") as f:
    json.dump(res, f, indent=1)
  write_md(res, os.path.join(_OUT_DIR.value, _TAG.value + ".md"))


def write_md(res: dict, path: str):
  """The markdown table of a run's JSON (``--report`` rebuilds it)."""
  meta = res["meta"]
  md = [f"# 4-bit codes in natural vs wgmma order ({meta['device']})", "",
        f"jax {meta['jax']}; CUPTI device time per call, median of "
        f"{meta['iters']} calls, the fastest of {meta['rounds']} interleaved "
        f"rounds; stream bandwidth {meta['stream_TBps']:.2f} TB/s measured in "
        "the same run; roofline = (weight + activation + output bytes) / that "
        "bandwidth. natural and wgmma: the tuned table's tiling for the case "
        "(the same for both); other tilings: wgmma order with "
        "tile_n:tile_k:tile_m:stages:split_k changed. Same bits: the wgmma "
        "kernel's output equals the natural one's bit for bit.", "",
        f"Command: `{meta['command']}`", "",
        "| case | K x N | M | XLA bf16 | natural | wgmma | natural / wgmma | "
        "% roofline (natural -> wgmma) | vs bf16 (wgmma) | same bits | other tilings |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    u = r["us"]
    nat, wg = u.get("natural"), u.get("wgmma")
    if nat is None or wg is None:
      md.append(f"| {r['case']} | {r['shape']} | {r['m']} | | | | | | | | {r['error']} |")
      continue
    others = ", ".join(f"{k[6:]}: {v:.1f}" for k, v in u.items()
                       if k.startswith("wgmma ") and v is not None)
    same = r["same_bits"].get("wgmma")
    md.append(f"| {r['case']} | {r['shape']} | {r['m']} | {r['bf16_us']:.1f} | "
              f"{nat:.1f} | {wg:.1f} | {nat / wg:.2f}x | "
              f"{100 * r['roofline_us'] / nat:.0f}% -> {100 * r['roofline_us'] / wg:.0f}% | "
              f"{r['bf16_us'] / wg:.2f}x | {'yes' if same else 'NO'} | {others} |")
  if res["skipped"]:
    md += ["", "Skipped (time budget): " + "; ".join(res["skipped"])]
  with open(path, "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md))


def report_main(argv):
  del argv
  with open(_REPORT.value) as f:
    res = json.load(f)
  write_md(res, os.path.splitext(_REPORT.value)[0] + ".md")


if __name__ == "__main__":
  app.run(lambda argv: report_main(argv) if _REPORT.value else main(argv))
