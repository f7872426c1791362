r"""Times the one-pass Mosaic GPU quantizer against XLA's path (issue 12).

For every format the kernel takes (``gpu_quantize.supported_kinds()``; scales
along axis 0 of a bf16 ``[K, N]`` tensor), times ``quantize`` and
``fake_quant``'s forward value in one process:

* XLA: ``lowbit_jax.quantize`` / ``fake_quant`` with the kernel dispatch off
  (``gpu_quantize.forced(())``), the jnp path;
* kernel: ``gpu_quantize.quantize`` / ``fake_quant_forward`` with each tiling
  of ``gpu_quantize.candidate_configs`` (up to 4 within the kernel's shared
  memory and shape limits, the heuristic's first; ``--nosweep``: that one
  only), and any ``--configs``;
* fwd+bwd (GPU only, every format): ``fake_quant``'s value and
  straight-through gradient through ``jax.vjp``, dispatch off and dispatch
  forced to the kernel with the first fake_quant tiling (which then also
  writes the clip mask where the gradient needs one);

checks on the device that the kernel's codes, scales (and NVFP4's tensor
scale) or values equal XLA's bit for bit on the same input (blocks of 16 rows
scaled by 2**-8 .. 2**8, so every block has its own scale; one bool comes
back), and measures the bandwidth ceiling ``x * 2`` in the same run. Device
time per call from CUPTI (``jax.experimental.mosaic.gpu.profiler.measure``,
median of ``--iters`` calls; every kernel of a call counted); on CPU
(``--smoke``) the wall clock of the interpreter, for checking the script only.

Where the time goes: an earlier version spent 11-43 s per item
(benchmarks/gpu_quantize_h200.md's run). It compiled each kernel twice (once
to check it, once more to time it), compared the outputs on the host (two
copies of up to 128 MB each), and the Python lowering alone of a kernel with
blocks of 128 unrolled rows takes seconds (3-8 s on a CPU here). Here each
variant compiles once, in ``--workers`` threads that run ahead of the timing
loop, the comparison runs on the device, the input is built once, and each
row records ``compile_s``, ``wait_s`` (how long the timing loop waited for
that compile) and ``first_call_s``, so a run shows where its time went.

Roofline: the bytes that must move (input read + codes and scales written for
quantize; input read + values written for fake_quant; x and the cotangent
read, value and gradient written for fwd+bwd, or only x read and the value
written where the gradient is the cotangent itself:
``_primitive_formats.fwd_bwd_bytes``) over the ``x * 2``
bandwidth; the issue's target is 70% of it. The markdown ends with the
formats where the kernel's fastest exact tiling was at least
``_quantize_table.MARGIN`` faster than XLA, per dispatcher operation
(quantize, fake_quant, and fake_quant_grad from the fwd+bwd rows): the value
for ``gpu_quantize.ENABLED``. ``--write_configs`` also writes
``gpu_quantize_configs.json``: per format and operation the fastest exact
tiling and the formats to enable, the data ``gpu_quantize.default_config``
and ``ENABLED`` read once it is copied to ``lowbit_jax/kernels/``. With
``--merge_configs=lowbit_jax/kernels/gpu_quantize_configs.json`` a run over a
few ``--formats`` replaces only those formats and operations in the shipped
table, so partial runs accumulate.

Run on the GPU machine (repository root; under 4 minutes)::

  PYTHONPATH=. python3 experiments/bench_gpu_quantize.py --out_dir=$OUT \
      --write_configs --time_budget_s=195 --hard_limit_s=225

Writes ``gpu_quantize_<tag>.json`` and ``.md`` to ``--out_dir`` after every
item; no item starts after ``--time_budget_s``; a watchdog writes what there is
and exits at ``--hard_limit_s``. ``--smoke`` runs the main formats in the
Mosaic GPU interpreter on a 256x256 tensor on the CPU.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback

from absl import app
from absl import flags

from experiments import _cupti
from experiments._primitive_formats import fake_quant_fwd_bwd, fwd_bwd_passes
from experiments._quantize_table import (MARGIN, cfg_str, config_table,
                                         enabled_from, merge_tables,
                                         recount_fwd_bwd,
                                         table_from_results, timed_kinds)

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_gpu_quantize", "where results go")
_SHAPE = flags.DEFINE_string("shape", "8192x8192", "K x N of the bf16 tensor")
_FORMATS = flags.DEFINE_list("formats", [], "kinds to time (default: all of "
                             "gpu_quantize.supported_kinds() that bench by default)")
_CONFIGS = flags.DEFINE_list("configs", [], "extra tilings, each "
                             "tile_n:tile_k:k_per_cta:stages[:one_pass[:warpgroups"
                             "[:strips]]] (e.g. 256:64:256:3, or 128:64:1024:11:8:4:4 "
                             "for one pass over K = 8192 in clusters of 8 CTAs of 4 "
                             "warpgroups, 4 column strips each)")
_ITERS = flags.DEFINE_integer("iters", 30, "timed calls per measurement")
_BUDGET = flags.DEFINE_float("time_budget_s", 100.0, "start no new item after this")
_HARD = flags.DEFINE_float("hard_limit_s", 115.0, "write what there is and exit")
_TAG = flags.DEFINE_string("tag", "", "file stem suffix (default: from the device)")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU dry run in the interpreter (256x256, "
                           "2 calls)")
_SWEEP = flags.DEFINE_bool("sweep", True, "time gpu_quantize.candidate_configs "
                           "(up to 4 tilings per format and op), not the heuristic's only")
_UNROLL = flags.DEFINE_bool("unroll", True, "time each candidate tiling as "
                            "candidate_configs gives it (the heuristic's rows are in a "
                            "loop; the sweep includes an unrolled one); --nounroll: "
                            "every tiling with its rows in a loop, which compiles in a "
                            "fraction of the time (the unrolled MXFP4 kernels took "
                            "139-281 s to compile on the H200 machine)")
_WORKERS = flags.DEFINE_integer("workers", 6, "compile threads (compiles run ahead "
                                "of the timing)")
_WRITE_CONFIGS = flags.DEFINE_bool("write_configs", False, "also write "
                                   "<out_dir>/gpu_quantize_configs.json (on the "
                                   "H200; another device's file is named for it, "
                                   "gpu_quantize.table_filename; copy it to "
                                   "lowbit_jax/kernels/ for the dispatcher)")
_REPORT = flags.DEFINE_string(
    "report", "", "no timing: rewrite this result JSON's markdown (and, with "
    "--recount_fwd_bwd, the JSON) from its rows")
_RECOUNT = flags.DEFINE_bool(
    "recount_fwd_bwd", False, "with --report: recount the fwd+bwd rows' "
    "roofline with _primitive_formats.fwd_bwd_bytes (runs before session 40 "
    "counted the cotangent and gradient always: 120-190% for formats whose "
    "gradient is the cotangent itself)")
_FROM_RESULTS = flags.DEFINE_list(
    "from_results", [], "no timing: write the tiling table of these result "
    "JSONs (gpu_quantize_<tag>.json of one device, oldest first, each merged "
    "over the ones before it and the first over --merge_configs where given) "
    "to <out_dir>/<gpu_quantize.table_filename(device)>")
_MERGE_CONFIGS = flags.DEFINE_string(
    "merge_configs", "", "with --write_configs: a table of earlier runs (e.g. "
    "lowbit_jax/kernels/gpu_quantize_configs.json) whose formats this run did not "
    "time are kept; the formats it timed are replaced")

# The main formats (ids of gpu_quantize.kind_of): timed first, swept first,
# and the only ones with a fwd+bwd row; the rest of supported_kinds() follow.
KINDS = ("mxfp8_e4m3", "int8_pc", "int4_g128", "fp8_e4m3_pc", "int4_pc", "mxfp4",
         "nvfp4", "int8_pt", "fp4_e2m1_g32", "int8_g128", "mxint8", "mxfp6_e2m3",
         "int8_tok", "fp8_e4m3_tok")

T0 = time.time()


class Run:
  """Results, timer and writers."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.gpu = jax.default_backend() == "gpu"
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    tag = _TAG.value or ("smoke" if _SMOKE.value else
                         "h200" if "h200" in kind.lower() else
                         "h100" if "h100" in kind.lower() else jax.default_backend())
    self.stem = os.path.join(_OUT_DIR.value, f"gpu_quantize_{tag}")
    self.iters = 2 if _SMOKE.value else _ITERS.value
    self.res = dict(command=" ".join(["python3"] + sys.argv), device=kind,
                    backend=jax.default_backend(), jax=jax.__version__,
                    host=platform.node(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                    timer=("CUPTI device time per call (median)" if self.gpu else
                           "wall clock per call (median; interpreter)"),
                    iters=self.iters, ceiling=None, rows=[], errors=[],
                    skipped=[])
    self.lock = threading.Lock()

  def log(self, msg: str):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)

  def time_us(self, f, *args) -> float:
    """Compiles ``f`` and times it (``time_us_compiled``)."""
    jf = self.jax.jit(f).lower(*args).compile()
    self.jax.block_until_ready(jf(*args))
    return self.time_us_compiled(jf, *args)

  def time_us_compiled(self, jf, *args) -> float:
    """Device us per call of the compiled ``jf`` (already run once)."""
    jax = self.jax
    if self.gpu:
      return _cupti.median_ms(jf, *args, iters=self.iters) * 1e3
    ts = []
    for _ in range(self.iters):
      t = time.perf_counter()
      jax.block_until_ready(jf(*args))
      ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6

  def failed(self, row: dict, item: str, err: Exception):
    """Marks ``row`` (and the run's error list) with what ``item`` raised."""
    traceback.print_exc()
    row["error"] = f"{type(err).__name__}: {err}"[:400]
    self.res["errors"].append(dict(item=item, error=row["error"]))

  def record(self, row: dict, t0: float):
    """Adds a finished row (its wall seconds since ``t0``) and rewrites the files."""
    row["item_s"] = round(time.time() - t0, 1)
    self.res["rows"].append(row)
    print(json.dumps(row), flush=True)
    self.write()

  def write(self):
    with self.lock:
      os.makedirs(_OUT_DIR.value, exist_ok=True)
      with open(self.stem + ".json", "w") as f:
        json.dump(self.res, f, indent=1)
      with open(self.stem + ".md", "w") as f:
        f.write(markdown(self.res))


def markdown(res: dict) -> str:
  c = res.get("ceiling") or {}
  lines = [f"# One-pass Mosaic GPU quantizer: {res['device']}", "",
           f"Command: `{res['command']}`  ",
           f"jax {res['jax']}, {res['timer']}, {res['iters']} calls, started "
           f"{res['started']}, host {res['host']}.", ""]
  if c:
    lines += [f"bf16 [{c['k']}, {c['n']}], scales along axis 0. Bandwidth ceiling "
              f"(`x * 2`, same run): {c['us']:.2f} us, {c['gbps']:.1f} GB/s. Each "
              "time: us per call (% of roofline = bytes that must move over that "
              "bandwidth). exact: the kernel's outputs equal XLA's bit for bit "
              "(checked on the device).", ""]
  lines += ["Tiling: tile_n:tile_k:k_per_cta:stages[:rev][:loop][:lut][:opCwWsS][:amax] "
            "(`gpu_quantize.Config`; rev: the grid walked in reverse; loop: rows in "
            "a loop, not unrolled; lut: NF4's codes by the binned table; opCwWsS: "
            "one pass, C CTAs a cluster of W warpgroups each, walking S column strips; "
            "amax: the range from the module's own amax kernel, walked the other way); "
            "default = `heuristic_config`. fwd+bwd: `fake_quant`'s value and "
            "straight-through gradient, the dispatch forced off (XLA) and to the "
            "kernel.", "",
            "| format | op | XLA | kernel: tiling | kernel | speedup | exact |",
            "|---|---|---|---|---|---|---|"]
  xla = {(r["kind"], r["op"]): r for r in res["rows"] if r["tiling"] == "xla"}

  def cell(t, roof):
    if t is None:
      return "-"
    return f"{t:.1f}" + (f" ({100 * roof / t:.0f}%)" if roof else "")
  for r in res["rows"]:
    if r["tiling"] == "xla":
      continue
    xr = xla.get((r["kind"], r["op"]), {})
    roof, xu = xr.get("roof_us"), xr.get("us")
    sp = f"{xu / r['us']:.2f}x" if xu and r.get("us") else "-"
    til = r["tiling"] + (f" ({r['tiling_used']})" if r["tiling"] == "default"
                         and r.get("tiling_used") else "")
    lines.append(f"| {r['kind']} | {r['op']} | {cell(xu, roof)} | {til} "
                 f"| {cell(r.get('us'), roof)} | {sp} | {r.get('exact')} |")
  wins = enabled_from(res)
  lines += ["", "Formats where the kernel's fastest exact tiling was at least "
            f"{100 * MARGIN:.0f}% faster than XLA, per dispatcher operation "
            "(fake_quant_grad: the fwd+bwd rows), i.e. the value for "
            "`gpu_quantize.ENABLED` this run supports:", ""]
  lines += [f"- {op}: `{wins[op]}`" for op in wins]
  if res.get("skipped"):
    lines += ["", f"Not reached within --time_budget_s: {len(res['skipped'])} jobs "
              f"(kind op tiling): {', '.join(res['skipped'])}."]
  if res["errors"]:
    lines += ["", "Errors:", ""] + [f"- {e['item']}: {e['error']}" for e in res["errors"]]
  if res.get("notes"):
    lines += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
  return "\n".join(lines) + "\n"


def write_report():
  """``--report``: the markdown (and with ``--recount_fwd_bwd`` the JSON)
  rebuilt from a result JSON, no GPU needed."""
  with open(_REPORT.value) as f:
    res = json.load(f)
  if _RECOUNT.value:
    recount_fwd_bwd(res)
    tmp = _REPORT.value + ".tmp"  # replaced only once written
    with open(tmp, "w") as f:
      json.dump(res, f, indent=1)
    os.replace(tmp, _REPORT.value)
  with open(os.path.splitext(_REPORT.value)[0] + ".md", "w") as f:
    f.write(markdown(res))


def _bits_equal(pairs) -> bool:
  """Whether every (got, want) pair is equal bit for bit: shapes and dtypes
  on the host, the bits on the device (one jitted comparison, cached by
  shapes; one bool comes back)."""
  for a, b in pairs:
    if a.shape != b.shape or a.dtype != b.dtype:
      return False
  return bool(_eq_jit()(tuple(pairs)))


_EQ = []


def _eq_jit():
  if not _EQ:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def bits(a):
      u = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[a.dtype.itemsize]
      return a if a.dtype == u else jax.lax.bitcast_convert_type(a, u)

    @jax.jit
    def eq(ps):
      ok = jnp.asarray(True)
      for a, b in ps:
        ok = ok & jnp.array_equal(bits(a), bits(b))
      return ok
    _EQ.append(eq)
  return _EQ[0]


def _leaves(out) -> list:
  """The arrays of a quantize result (codes, scale, tensor scale) or values."""
  if hasattr(out, "codes"):
    return [a for a in (out.codes, out.scale, out.tensor_scale) if a is not None]
  return list(out) if isinstance(out, tuple) else [out]


def plan(gq, k: int, n: int, dtype, formats: list, extra: list, sweep: bool,
         smoke: bool, unroll: bool = True) -> list:
  """The jobs in the order they run: (kind, op, label, config or None for
  XLA's path). First XLA and the heuristic tiling for quantize and fake_quant
  of every format (they decide ENABLED), then the tiling sweep of the main
  formats (``KINDS``), fwd+bwd of those, then the sweep of the rest. With
  ``unroll=False`` every kernel tiling has its rows in a loop."""
  main = [f for f in formats if f in KINDS]
  rest = [f for f in formats if f not in KINDS]
  first, sweep_main, fb, sweep_rest = [], [], [], []
  for kind in main + rest:
    for op in ("quantize", "fake_quant"):
      values = op == "fake_quant"
      cands = gq.candidate_configs(kind, k, n, dtype, values,
                                   limit=4 if sweep else 1)
      cands += [c for c in extra if c not in cands]
      if not unroll:
        cands = list(dict.fromkeys(dataclasses.replace(c, unroll=False) for c in cands))
      first.append((kind, op, "xla", None))
      if not cands:
        continue
      first.append((kind, op, "default", cands[0]))
      (sweep_main if kind in KINDS else sweep_rest).extend(
          (kind, op, cfg_str(c), c) for c in cands[1:])
      if values and not smoke:
        # fake_quant's forward under differentiation (the dispatcher's
        # fake_quant_grad), through lowbit_jax.fake_quant with the first
        # fake_quant tiling, and its straight-through gradient.
        fb.append((kind, "fwd+bwd", "xla", None))
        fb.append((kind, "fwd+bwd", "kernel", cands[0]))
  return first + sweep_main + fb + sweep_rest


def build(run, lj, gq, job, x, interp):
  """Compiles one job (in a worker thread): (the compiled callable, its
  arguments, seconds the compile took)."""
  t = time.time()
  fn, args = _compile(run, lj, gq, job, x, interp)
  return fn, args, time.time() - t


def _compile(run, lj, gq, job, x, interp):
  jax = run.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  kind, op, label, cfg = job
  spec = gq.spec_for(kind)
  if op == "fwd+bwd":
    g = jnp.ones_like(x)
    f = fake_quant_fwd_bwd(lj.fake_quant, spec)
    with gq.forced(() if label == "xla" else (kind,),
                   configs=None if cfg is None else {kind: cfg}):
      return jax.jit(f).lower(x, g).compile(), (x, g)
  if label == "xla":
    f = ((lambda a: lj.quantize(a, spec)) if op == "quantize"
         else (lambda a: lj.fake_quant(a, spec)))
    with gq.forced(()):
      return jax.jit(f).lower(x).compile(), (x,)
  if op == "quantize":
    f = lambda a: gq.quantize(a, spec, config=cfg, interpret=interp)
  else:
    f = lambda a: gq.fake_quant_forward(a, spec, config=cfg, interpret=interp)
  return jax.jit(f).lower(x).compile(), (x,)


def main(argv):
  del argv
  if _FROM_RESULTS.value:
    write_from_results()
    return
  if _REPORT.value:
    write_report()
    return
  os.environ.setdefault("XLA_FLAGS", "")
  if _SMOKE.value:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

  def watchdog():
    time.sleep(max(_HARD.value - (time.time() - T0), 1))
    print("hard limit reached: writing and exiting", flush=True)
    try:
      run.res["errors"].append(dict(item="watchdog", error="hard limit reached"))
      finish(run, gq)
    finally:
      os._exit(0)

  run = Run()
  jax = run.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lj  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_quantize as gq  # pylint: disable=g-import-not-at-top
  threading.Thread(target=watchdog, daemon=True).start()

  k, n = (256, 256) if _SMOKE.value else (int(v) for v in _SHAPE.value.split("x"))
  interp = not run.gpu
  kx = jax.random.key(0)
  x = jax.random.normal(kx, (k, n), jnp.float32)
  e = jax.random.randint(jax.random.key(1), (k // 16, 1, n), -8, 9)
  x = (x.reshape(k // 16, 16, n) * jnp.exp2(e.astype(jnp.float32))).reshape(k, n)
  x = jax.block_until_ready(x.astype(jnp.bfloat16))
  xbytes = k * n * 2
  run.res["shape"] = [k, n]

  try:
    us = run.time_us(lambda a: a * 2, x)
    run.res["ceiling"] = dict(k=k, n=n, us=us, gbps=2 * xbytes / us / 1e3)
  except Exception as err:  # pylint: disable=broad-except
    run.res["errors"].append(dict(item="ceiling", error=f"{type(err).__name__}: {err}"))
  run.write()
  bw = (run.res["ceiling"] or {}).get("gbps")

  extra = []
  for c in _CONFIGS.value:
    vals = [int(v) for v in c.split(":")]
    if len(vals) not in (4, 5, 6, 7):
      raise app.UsageError(f"--configs: {c!r} is not tile_n:tile_k:k_per_cta:stages"
                           "[:one_pass[:warpgroups[:strips]]]")
    extra.append(gq.Config(tile_n=vals[0], tile_k=vals[1], k_per_cta=vals[2],
                           stages=vals[3], one_pass=vals[4] if len(vals) > 4 else 0,
                           warpgroups=vals[5] if len(vals) > 5 else 1,
                           strips=vals[6] if len(vals) > 6 else 1))
  formats = _FORMATS.value or (list(KINDS) if _SMOKE.value else
                               list(KINDS) + [f for f in gq.supported_kinds()
                                              if f not in KINDS])
  jobs = plan(gq, k, n, x.dtype, formats, extra, _SWEEP.value, _SMOKE.value,
              _UNROLL.value)
  run.log(f"{len(jobs)} jobs")
  # Compiles run ahead in worker threads (each variant compiled once); the
  # main thread checks and times them in order, one at a time on the device.
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS.value)
  futs = [pool.submit(build, run, lj, gq, j, x, interp) for j in jobs]
  refs = {}   # (kind, op) -> XLA's outputs
  for job, fut in zip(jobs, futs):
    kind, op, label, cfg = job
    if time.time() - T0 > _BUDGET.value:
      run.res["skipped"].append(f"{kind} {op} {label}")
      continue
    t = time.time()
    row = dict(kind=kind, op=op, tiling=label)
    try:
      fn, args, row["compile_s"] = fut.result()
      row["wait_s"] = round(time.time() - t, 2)  # for the compile, after the last item
      t1 = time.time()
      out = jax.block_until_ready(fn(*args))
      row["first_call_s"] = round(time.time() - t1, 2)
      row["compile_s"] = round(row["compile_s"], 2)
      if label == "xla":
        refs[(kind, op)] = out
        if op == "quantize":
          moved = xbytes + sum(a.size * a.dtype.itemsize for a in _leaves(out)[:2])
        elif op == "fwd+bwd":
          with gq.forced(()):
            moved = fwd_bwd_passes(gq.spec_for(kind)) * xbytes
        else:
          moved = 2 * xbytes
        row["roof_us"] = moved / bw / 1e3 if bw else None
      else:
        ref = refs.get((kind, op))
        row["exact"] = ref is not None and _bits_equal(
            list(zip(_leaves(out), _leaves(ref))))
        if cfg is not None:
          row["tiling_used"] = cfg_str(cfg)
      if run.gpu or _SMOKE.value:
        row["us"] = run.time_us_compiled(fn, *args)
    except Exception as err:  # pylint: disable=broad-except
      run.failed(row, f"{kind} {op} {label}", err)
    run.record(row, t)
  pool.shutdown(wait=False, cancel_futures=True)
  finish(run, gq)
  print(f"wrote {run.stem}.md/.json in {time.time() - T0:.0f} s", flush=True)
  os._exit(0)  # (compiles of skipped jobs may still be running)


def finish(run, gq):
  """Final files: ENABLED in the results, and the tiling table."""
  run.res["enabled"] = enabled_from(run.res)
  run.write()
  if _WRITE_CONFIGS.value:
    table = config_table(run.res)
    if _MERGE_CONFIGS.value:
      with open(_MERGE_CONFIGS.value) as f:
        table = merge_tables(json.load(f), table, timed_kinds(run.res))
    write_table(gq, table)


def write_table(gq, table: dict) -> str:
  """Writes a tiling table to ``<out_dir>/<gq.table_filename(device)>``
  (through a temporary file, so an interrupted write leaves the last one
  whole) and returns the path."""
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  path = os.path.join(_OUT_DIR.value, gq.table_filename(table["device"]))
  with open(path + ".tmp", "w") as f:
    json.dump(table, f, indent=1)
  os.replace(path + ".tmp", path)
  return path


def write_from_results():
  """``--from_results``: the table of earlier runs, no GPU needed."""
  from lowbit_jax.kernels import gpu_quantize as gq  # pylint: disable=g-import-not-at-top
  results = []
  for p in _FROM_RESULTS.value:
    with open(p) as f:
      results.append(json.load(f))
  base = None
  if _MERGE_CONFIGS.value:
    with open(_MERGE_CONFIGS.value) as f:
      base = json.load(f)
  path = write_table(gq, table_from_results(results, base))
  print(f"wrote {path} from {len(results)} runs", flush=True)


if __name__ == "__main__":
  app.run(main)
