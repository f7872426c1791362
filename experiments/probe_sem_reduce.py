"""Where split-K's reduction goes: XLA's kernel, a cluster, or the last slice.

For each weight-only decode case (format, code order, ``K x N``, M) this times
the dispatcher's tiling (``gpu_weight_only.tuned_config``) as it is, and the
same tiling with ``Config.sem_reduce`` (the last K slice adds the others'
partials after a semaphore) and with ``Config.cluster_reduce`` where it
applies, against XLA bf16, in two ways:

- CUPTI device time per call, kernel by kernel (``profiler.measure(...,
  aggregate=False)``): the weight-only kernel, XLA's split-K reduction
  after it, and whatever else the call launches. A memset (the semaphores'
  zeroing, where XLA emits one) is not a kernel and is not counted here.
- Wall time per matmul of a chain of ``--chain`` dependent matmuls in one
  jitted program (square shapes only: each output is the next input), host
  timed over whole programs (median of ``--chain_reps``): everything the GPU
  does between the matmuls counts, launch gaps and memsets included, and the
  host's ~70 us per program spreads over the chain.

Run on the GPU machine (repository root)::

  PYTHONPATH=. python3 -m experiments.probe_sem_reduce --tag=sem_probe --out_dir=$OUT

Writes ``<tag>.md`` and ``<tag>.json`` (device, jax version, the command).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

from experiments import bench_kernels as bk

# --iters, --out_dir, --tag and --time_budget_s are bench_kernels' flags.
_CASES = flags.DEFINE_list(
    "probe_cases",
    ["int4_pc@wgmma_int4:8192x8192:1", "int4_g128@wgmma_int4:8192x8192:1",
     "mxfp4@wgmma_e2m1:8192x8192:1", "nvfp4@wgmma_e2m1:8192x8192:1",
     "int8_pc:8192x8192:1", "int4_g128@wgmma_int4:8192x28672:1",
     "mxfp4@wgmma_e2m1:8192x28672:1", "int4_pc@wgmma_int4:4096x4096:1",
     "int4_g128@wgmma_int4:8192x8192:16", "mxfp4@wgmma_e2m1:8192x8192:16"],
    "case@order:KxN:M, case as in experiments/bench_kernels.py (int4_pc, "
    "int4_g128, int8_pc, fp4_g32, mxfp4, nvfp4)")
_CHAIN = flags.DEFINE_integer("chain", 32, "dependent matmuls per program")
_CHAIN_REPS = flags.DEFINE_integer("chain_reps", 15, "programs timed")
_ITERS, _OUT, _TAG, _BUDGET = bk._ITERS, bk._OUT_DIR, bk._TAG, bk._BUDGET  # pylint: disable=protected-access


def _parse(case: str):
  label, kn, m = case.split(":")
  name, _, order = label.partition("@")
  k, n = (int(v) for v in kn.split("x"))
  return name, order or "natural", k, n, int(m)


def _variants(wo, prob, cfg):
  """The table's tiling, then the same tiling with each of the three
  reductions it is not already using (where K is split)."""
  out = [("table", cfg)]
  if cfg.split_k < 2 or cfg.ws:
    return out
  plain = dataclasses.replace(cfg, cluster_reduce=False, sem_reduce=False)
  for name, c in (("xla_reduce", plain),
                  ("sem_reduce", dataclasses.replace(plain, sem_reduce=True)),
                  ("cluster_reduce",
                   dataclasses.replace(plain, cluster_reduce=True))):
    if c != cfg and wo._shape_ok(prob, c):  # pylint: disable=protected-access
      out.append((name, c))
  return out


def _kernels(fn, args, iters):
  """Median per call of each kernel (by name and position) and of the sum."""
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  fn(*args).block_until_ready()
  _, per = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
  names = [k for k, _ in per[0]]
  med = [statistics.median(call[i][1] for call in per) * 1e3
         for i in range(len(names))]
  total = statistics.median(sum(t for _, t in call) for call in per) * 1e3
  return total, list(zip(names, med))


def _chain_us(jax, step, x, chain, reps):
  def prog(x):
    for _ in range(chain):
      x = step(x)
    return x
  f = jax.jit(prog)
  f(x).block_until_ready()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    f(x).block_until_ready()
    ts.append((time.perf_counter() - t) * 1e6 / chain)
  return statistics.median(ts)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._qarray import to_code_order  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  command = "python3 -m experiments.probe_sem_reduce " + " ".join(
      a for a in sys.argv[1:])
  res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             command=command, iters=_ITERS.value, chain=_CHAIN.value,
             started=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[], errors=[])
  for case in _CASES.value:
    if time.time() - t0 > _BUDGET.value:
      res["errors"].append(f"{case}: not run (time budget)")
      continue
    name, order, k, n, m = _parse(case)
    fmt, group = bk.WO_CASES[name]
    try:
      codes, scale, ts = bk.wo_weight(jax.random.key(0), fmt, group, n, k)
      if order != "natural":
        codes = to_code_order(codes, order)
      prob = MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                           w_block=group, w_order=order)
      x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(
          jnp.bfloat16)
      w_bf16 = jax.random.normal(jax.random.key(2), (k, n), jnp.float32).astype(
          jnp.bfloat16)
      bf16_us, _ = _kernels(jax.jit(lambda a, w: a @ w), (x, w_bf16),
                            _ITERS.value)
      bf16_chain = None
      if k == n:
        bf16_chain = _chain_us(jax, lambda a: a @ w_bf16, x, _CHAIN.value,
                               _CHAIN_REPS.value)
      cfg = wo.tuned_config(prob)
      ref = None
      for vname, c in _variants(wo, prob, cfg):
        def mm(a, c=c):
          ops = MatmulOperands(x=a, w_codes=codes, w_scale=scale,
                               w_tensor_scale=ts)
          return wo.matmul(ops, prob, config=c)
        total, per = _kernels(jax.jit(mm), (x,), _ITERS.value)
        out = jax.jit(mm)(x)
        if ref is None:
          ref = out
        err = bk.rel_err(out, ref)
        chain = None
        if k == n:
          chain = _chain_us(jax, mm, x, _CHAIN.value, _CHAIN_REPS.value)
        res["rows"].append(dict(
            case=case, variant=vname, config=list(dataclasses.astuple(c)),
            cupti_us=total, kernels=per, chain_us=chain, bf16_us=bf16_us,
            bf16_chain_us=bf16_chain, rel_err_vs_table=err))
        print(case, vname, f"{total:.2f} us", f"chain {chain}", per, flush=True)
    except Exception as e:  # pylint: disable=broad-except
      res["errors"].append(f"{case}: {type(e).__name__}: {e}"[:2000])
      print("ERROR", case, e, flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, _TAG.value + ".json"), "w") as f:
    json.dump(res, f, indent=1)
  lines = [f"# Split-K reduction variants: {res['device']}", "",
           f"Command: `{command}`  ",
           f"jax {res['jax']}, started {res['started']}. CUPTI: median device "
           f"time per call over {res['iters']} calls, every kernel counted "
           f"(memsets are not kernels). Chain: host wall time per matmul of "
           f"{res['chain']} dependent matmuls in one program (square shapes), "
           "everything between them included.", "",
           "| case | variant | CUPTI us | kernels (us each) | chain us/matmul | "
           "XLA bf16 CUPTI / chain | bf16 / variant (CUPTI) | rel. err vs table |",
           "|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    ks = "; ".join(f"{nm[:40]} {t:.2f}" for nm, t in r["kernels"])
    ch = "-" if r["chain_us"] is None else f"{r['chain_us']:.2f}"
    bch = "-" if r["bf16_chain_us"] is None else f"{r['bf16_chain_us']:.2f}"
    lines.append(f"| {r['case']} | {r['variant']} | {r['cupti_us']:.2f} | {ks} | "
                 f"{ch} | {r['bf16_us']:.2f} / {bch} | "
                 f"{r['bf16_us'] / r['cupti_us']:.2f}x | {r['rel_err_vs_table']:.1e} |")
  if res["errors"]:
    lines += ["", "Errors:", ""] + [f"- {e}" for e in res["errors"]]
  with open(os.path.join(_OUT.value, _TAG.value + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
