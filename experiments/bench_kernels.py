r"""Device-timed benchmark, tuner and correctness check of the low-bit GPU kernels.

One process measures everything issue 13 asks for and writes
``<out_dir>/<tag>.json`` and ``<tag>.md`` (default ``kernels_h200``), plus, in the
tuning modes, the dispatch table ``<out_dir>/gpu_tuned_configs.json`` (copy it to
``lowbit_jax/kernels/`` to make the dispatcher use it; measured on a device
other than the H200, ``gpu_tuned_configs.<device>.json``, whose rows the
dispatcher uses on that device: ``gpu_weight_only.table_for_device``;
``--mode=report`` refuses runs of different devices):

* the stream bandwidth (1 GiB f32 read + write) and the bf16 GEMM rate (8192^3),
  both measured in the same run, which give every row's roofline;
* per weight format (``--kernels``), weight shape (``--shapes``, K x N) and batch
  (``--batches``): XLA bf16 (``x @ w``, weight [K, N]); XLA's best plain-jnp path
  for the quantized weight (``gpu_weight_only.xla_fused_matmul``:
  ``(x @ w.astype(bf16)) * scale``, the convert fused into the dot); our
  dequantize-then-dot reference (``xla_dequant_matmul``, at ``--ref_batches``);
  the Mosaic GPU kernel (the table's or the default tiling, for E2M1 weights
  also with the other ``fast_decode``; in the tuning phases every candidate
  tiling; the fastest correct one kept); what the dispatcher would run (the kernel where the table says it wins,
  else the fused path); roofline and % of roofline;
* the issue's targets marked met / missed;
* the decode matmuls of one Llama-3-8B block (q, k, v, o: 4096x4096, 4096x1024 x2,
  4096x4096; gate, up: 4096x14336; down: 14336x4096) at M = 1 and 16, summed;
* tokamax 0.0.17's Mosaic GPU quantized ``ragged_dot`` (one group, qwix-quantized
  int4 g128 / int8 per-channel weight; its heuristic tiling and 16-row tiles;
  M = 1, 16, 4096 on 8192x8192 and 8192x28672), run in a child process whose
  path starts with the wheels of ``--peer_wheels`` (default ``.whl``), skipped
  with the reason when they are absent or fail to import;
* W8A8 kernels at M = 4096 (``--w8a8``): XLA bf16, XLA's own path, the kernel
  and (per-channel and block fp8) the public ``ops.dot_general`` path that
  quantizes a bf16 activation first; in the tuning modes every tiling of
  ``w8a8_candidates`` too, the table's ``"w8a8"`` section taking the fastest
  correct one per case where it beat the heuristic's by ``--win_margin``
  (``gpu_w8a8.tuned_config`` reads it).

Timing: device time per call from CUPTI (``jax.experimental.mosaic.gpu.profiler``,
median of ``--iters`` calls, every kernel of a call counted). Weights are jit
arguments; when one weight set fits in L2 several distinct sets are used
round-robin inside one call (time divided by their number). Each kernel output is
compared with the fused XLA path's (relative error; a candidate over 2e-2 is never
chosen). Functions are compiled ahead, ``--compile_threads`` at a time, one chunk
(weight shape) at a time, and timed afterwards with nothing else running.

Time: work runs in priority order, every row first with the table's (or the
default) tiling: decode M = 1, 4, 16 on the default shapes; the 8B block's other
shapes at M = 1, 16; tokamax; M = 64, 256; M = 512, 4096; W8A8; then the other
candidate tilings (decode on 8192x8192 and 8192x28672 first). No new
measurement starts after ``--time_budget_s`` (default 240 s); a watchdog writes
the files and exits at ``--hard_limit_s`` (default 285 s). What was skipped is
listed in the report. The table only gets entries for rows that were measured
(the rest keep XLA's path).

Estimate (not measured here: no GPU): an XLA weight-only dot took ~3 s per
measurement in ../shared/bench/xla_weight_only.py (40 in ~2 min, serial, GPU
autotuning included), a Mosaic kernel ~1 s in the H100 sweep (32 tilings + 8 XLA
in ~45 s); tracing + lowering one kernel costs 0.8-1.5 s of Python on this 2-core
CPU (GIL-bound, not parallel). Compiles of one shape run 8 at a time, so take
~1 s per XLA job and ~0.6 s per kernel job: the decode phase (15 bf16, 90 fused,
30 reference, 90 kernel jobs) ~150 s, the 8B shapes ~30 s, tokamax ~20 s; the
rest of the 240 s goes to M = 64 / 256. Everything (all phases, tuning) needs
about 3x that: run ``--phases=base --batches=64,256,512,4096 --tokamax=false``
(and ``--phases=tune``) in later calls, each writing its own JSON, and merge
them with ``--mode=report``.

Run on the GPU machine (repository root; the wheels of ../shared/wheels copied
to ``.whl/`` and carried)::

  PYTHONPATH=. python3 experiments/bench_kernels.py --mode=all --out_dir=$OUT

Crash isolation (``--isolate``, on for GPU runs): XLA's compiler can abort the
process on a failed CHECK instead of raising (jax 0.11.2 did, in GemmFusion, on
per-channel int4 ``xla_fused_matmul`` before its barrier fix), which would lose
the whole call. So the process is a parent that runs the measurements in a
child (the parent never touches the GPU); the child writes its results after
every weight shape and the jobs in flight to ``<tag>.inflight``. When the child
dies, the parent records what was in flight (``<tag>.crashes.json``) and starts
a new child that resumes after the rows written, on the same clock: a job that
was alone in flight is skipped from then on (its row falls back as for any
failure, e.g. the fused path to its arithmetic decode) and listed in the report
with XLA's message; several (threaded compiles) are compiled one at a time
first, so a second abort names the culprit. A restart costs a few seconds of
start-up plus the crashed shape's work. ``experiments/xla_gemm_fusion_check.py``
compiles every XLA program of the default lists for an H200 target on a
machine without a GPU, one process each, to find such aborts beforehand.

``--mode=tune`` = ``all``; its phases end with ``refine``: each row's fastest
tiling so far with every combination of the options sessions 35 and 43
built without a GPU (``refine_candidates``: ``cluster_reduce``, ``lut_regs``,
``scale_words``, ``acc_scale``), so ``--phases=base,refine`` tries them on the table's own
tilings; ``--mode=bench`` times only the table's tiling (no candidates, no
table written); ``--mode=report --inputs=a.json,...`` rebuilds the
markdown from result JSON on any machine; ``--smoke`` runs every step on tiny
shapes on the CPU (kernels in the Mosaic GPU interpreter, wall-clock timing).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import zlib

from absl import app
from absl import flags

_MODE = flags.DEFINE_enum("mode", "all", ["all", "tune", "bench", "report"],
                          "all/tune: time candidate tilings, write the table; "
                          "bench: only the table's tiling; report: rebuild md")
_SMOKE = flags.DEFINE_bool("smoke", False,
                           "tiny shapes on CPU (interpreter, wall clock)")
_INPUTS = flags.DEFINE_list(
    "inputs", [], "result JSON files for --mode=report; where two hold the same "
    "row, the first one's times win (its tilings are pooled). PATH@k1+k2 takes "
    "only those kernels' weight-only rows from PATH (e.g. a run's public-path "
    "times for formats whose path has not changed since)")
_SHAPES = flags.DEFINE_list(
    "shapes", ["8192x8192", "8192x28672", "28672x8192", "4096x14336",
               "14336x4096"], "K x N of the weight (x[M, K] @ W[K, N])")
_BATCHES = flags.DEFINE_list("batches", ["1", "4", "16", "64", "256", "512",
                                         "4096"], "M values")
_REF_BATCHES = flags.DEFINE_list(
    "ref_batches", ["1"],
    "M values at which the dequantize-then-dot reference is timed")
_KERNELS = flags.DEFINE_list(
    "kernels", ["int4_g128", "int4_pc", "int8_pc", "fp4_g32", "mxfp4", "nvfp4"],
    "weight cases (int4_g32, int4_g64, int8_g128, fp4_pc also exist)")
_W8A8 = flags.DEFINE_list(
    "w8a8", ["fp8_channel", "int8_channel", "fp8_block", "mxfp8"],
    "W8A8 cases timed at M=4096 on 8192x8192 (empty: none)")
_TOKAMAX = flags.DEFINE_bool("tokamax", True, "time tokamax's ragged_dot")
_TOKAMAX_ONLY = flags.DEFINE_bool(
    "tokamax_only", False, "internal: the child process that times tokamax")
_PHASES = flags.DEFINE_list(
    "phases", [], "run only these of base, tokamax, w8a8, tune, refine, "
    "fallback (default: all but fallback; tune and refine need base rows of "
    "the same run; refine times the fastest tiling so far with session 35's "
    "options, refine_candidates; fallback times only the public dot's own "
    "path, ops.dot_general with use_kernel='never', at every batch, for "
    "merging with --mode=report into earlier runs, whose rows predate it)")
_PEER_WHEELS = flags.DEFINE_string(
    "peer_wheels", ".whl", "folder of the qwix/tokamax wheels (and their deps)")
_BLOCK8B = flags.DEFINE_bool("block8b", True, "time the Llama-3-8B block shapes")
_ITERS = flags.DEFINE_integer("iters", 20, "timed calls per measurement")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")
_TAG = flags.DEFINE_string("tag", "kernels_h200", "output file stem")
_BUDGET = flags.DEFINE_float("time_budget_s", 240.0,
                             "start no new measurement after this")
_HARD = flags.DEFINE_float("hard_limit_s", 285.0,
                           "write what exists and exit(3) at this time")
_THREADS = flags.DEFINE_integer("compile_threads", 8,
                                "parallel ahead-of-time compiles (0: serial)")
_ISOLATE = flags.DEFINE_enum(
    "isolate", "auto", ["auto", "true", "false"],
    "measure in a child process; when XLA aborts it (a failed CHECK kills the "
    "process), restart it, resuming after the work written so far and skipping "
    "the program that crashed (auto: on GPU runs, off with --smoke)")
_ABORT_ON = flags.DEFINE_string(
    "abort_on", "", "testing: abort the process (as XLA's failed CHECK does) "
    "when compiling a job whose name contains this")
_CHILD = flags.DEFINE_bool("child", False, "internal: the measuring child")
_T0 = flags.DEFINE_float("t0", 0.0, "internal: the parent's start (epoch s)")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 6,
                                     "child restarts after crashes")
_W_ORDER = flags.DEFINE_enum(
    "w_order", "natural", ["natural", "wgmma", "wgmma_e2m1", "wgmma_int4",
                           "kernel"],
    "order of the 4-bit weight codes the kernel reads (QArray.code_order; "
    "wgmma_e2m1 applies to the E2M1 cases and wgmma_int4 to the int4 ones, "
    "the others then take wgmma; kernel: each case its own, as "
    "ops.set_code_order(params, 'kernel') picks); "
    "reordered rows are named <case>@<order> and the table keeps them apart; their "
    "XLA fused path reorders the codes back first (the dispatcher's fallback "
    "for such weights), the dequantize reference reads natural codes")
_MARGIN = flags.DEFINE_float(
    "win_margin", 0.97, "the table takes the kernel where kernel_us <= margin x "
    "the fused XLA path's time")

# Weight-only cases: (format, group).
WO_CASES = {
    "int4_g128": ("int4", 128), "int4_g64": ("int4", 64),
    "int4_g32": ("int4", 32), "int4_pc": ("int4", None),
    "int8_pc": ("int8", None), "int8_g128": ("int8", 128),
    "fp4_g32": ("fp4_e2m1", 32), "fp4_pc": ("fp4_e2m1", None),
    "mxfp4": ("mxfp4", 32), "nvfp4": ("nvfp4", 16),
}
FOUR_BIT = ("int4", "fp4_e2m1", "mxfp4", "nvfp4")


def case_format(label: str) -> tuple:
  """(format, group) of a row's case, ``int4_g128`` or ``int4_g128@wgmma``."""
  return WO_CASES[label.split("@")[0]]
DECODE_M = (1, 4, 16)
BLOCK_8B = (("q", 4096, 4096), ("k", 4096, 1024), ("v", 4096, 1024),
            ("o", 4096, 4096), ("gate", 4096, 14336), ("up", 4096, 14336),
            ("down", 14336, 4096))
L2_BYTES = 50 * 2 ** 20
MAX_REL_ERR = 2e-2


# ----------------------------------------------------------------------------
# State, timing, compiling.
# ----------------------------------------------------------------------------

class Bench:
  """Results, the clock, and the compile/measure machinery."""

  def __init__(self, command: str):
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.t0 = _T0.value or time.time()
    self.command = command
    self.smoke = _SMOKE.value
    self.res = dict(
        meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                  platform=jax.default_backend(), command=command,
                  iters=_ITERS.value, smoke=self.smoke, mode=_MODE.value,
                  timing=("wall clock (CPU smoke run: not a performance figure)"
                          if self.smoke else "CUPTI device time per call")),
        ceilings={}, wo=[], tokamax=[], w8a8=[], skipped=[], errors=[],
        table=None)
    self.rows = {}      # (case, m, k, n) -> weight-only result row
    self.ref_out = {}   # (case, m, k, n) -> the fused XLA path's output
    self.bf16 = {}      # (k, n, m) -> XLA bf16 us
    self.lock = threading.Lock()
    self.written = False
    self.inflight = set()
    self.inflight_path = None   # set in a supervised child
    self.crashed, self.suspects = {}, set()
    self.done_chunks = set()

  def set_inflight(self, name: str, on: bool):
    """Records the jobs compiling / running now (read by the parent after an
    abort)."""
    if self.inflight_path is None:
      return
    with self.lock:
      (self.inflight.add if on else self.inflight.discard)(name)
      tmp = self.inflight_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(sorted(self.inflight), f)
      os.replace(tmp, self.inflight_path)

  def elapsed(self) -> float:
    return time.time() - self.t0

  def over_budget(self) -> bool:
    return self.elapsed() > _BUDGET.value

  def log(self, msg: str):
    print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

  def error(self, what: str, e: BaseException):
    text = f"{type(e).__name__}: {str(e)[:600]}"
    self.res["errors"].append(dict(what=what, error=text))
    self.log(f"ERROR {what}: {text}")

  def compile(self, fn, args):
    """jit + lower + compile ``fn`` for ``args`` (thread-safe)."""
    return self.jax.jit(fn).lower(*args).compile()

  def measure(self, compiled, args, reps: int = 1):
    """(median microseconds per call / reps, first output)."""
    jax = self.jax
    if self.smoke:
      out = jax.block_until_ready(compiled(*args))
      ts = []
      for _ in range(min(2, max(1, _ITERS.value))):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append((time.perf_counter() - t) * 1e3)
    else:
      from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
      out, ts = profiler.measure(compiled, iterations=_ITERS.value)(*args)
      if ts is None:
        raise RuntimeError("CUPTI saw no kernel launch")
      if not isinstance(ts, list):
        ts = [ts]
    return statistics.median(ts) * 1e3 / reps, out

  def run_jobs(self, jobs):
    """Compiles ``jobs`` (ahead, in threads) then times them one by one.

    Args:
      jobs: list of dicts with ``fn``, ``args``, ``reps``, ``name`` and
        ``done(us, out)`` (called with the time and the first output).
    """
    def comp(j):
      self.set_inflight("compile " + j["name"], True)
      if _ABORT_ON.value and _ABORT_ON.value in j["name"]:
        print(f"F0000 00:00:00.000000 0 bench_kernels.py] Check failed: "
              f"--abort_on {j['name']}", file=sys.stderr, flush=True)
        os.abort()
      try:
        return self.compile(j["fn"], j["args"]), None
      except Exception as e:  # pylint: disable=broad-except
        return None, e
      finally:
        self.set_inflight("compile " + j["name"], False)

    live = []
    for j in jobs:
      why = (self.crashed.get("compile " + j["name"])
             or self.crashed.get("run " + j["name"]))
      if why is None:
        live.append(j)
        continue
      self.log(f"SKIP {j['name']}: it aborted the process before ({why})")
      if j.get("failed"):
        j["failed"](RuntimeError(f"aborted the process: {why}"))
    jobs = live
    # Jobs in flight at an earlier abort compile alone (so a second abort names
    # the culprit), before the others compile in threads.
    first = [j for j in jobs if "compile " + j["name"] in self.suspects]
    rest = [j for j in jobs if "compile " + j["name"] not in self.suspects]
    compiled = {id(j): comp(j) for j in first}
    if _THREADS.value > 0 and len(rest) > 1 and not self.smoke:
      with concurrent.futures.ThreadPoolExecutor(_THREADS.value) as pool:
        compiled.update(zip(map(id, rest), pool.map(comp, rest)))
    else:
      compiled.update((id(j), comp(j)) for j in rest)
    for j in jobs:
      c, e = compiled[id(j)]
      if self.over_budget():
        self.res["skipped"].append(j["name"] + " (time budget)")
        continue
      if c is None and _THREADS.value > 0 and not self.smoke:
        c, e = comp(j)  # a threaded compile failure is retried alone
      if c is None:
        self.error(f"compile {j['name']}", e)
        if j.get("failed"):
          j["failed"](e)
        continue
      self.set_inflight("run " + j["name"], True)
      try:
        us, out = self.measure(c, j["args"], j.get("reps", 1))
      except Exception as e2:  # pylint: disable=broad-except
        self.set_inflight("run " + j["name"], False)
        self.error(f"run {j['name']}", e2)
        if self.smoke:  # the interpreter keeps state an exception leaves behind
          from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc  # pylint: disable=g-import-not-at-top
          ipc.reset_gpu_interpret_mode_state()
        if j.get("failed"):
          j["failed"](e2)
        continue
      self.set_inflight("run " + j["name"], False)
      j["done"](us, out)
      del out


def _reps(nbytes: int, smoke: bool) -> int:
  if smoke:
    return 1
  return max(1, min(8, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


def rel_err(out, ref) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  o = np.asarray(out, np.float64)
  r = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(o)):
    return float("inf")
  return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


# ----------------------------------------------------------------------------
# Operands.
# ----------------------------------------------------------------------------

def wo_weight(key, fmt, group, n, k):
  """Random weight-only codes/scales in the kernels' [N, K] layout (never zero)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k2, k3, k4 = jax.random.split(key, 3)
  if fmt == "int8":
    codes = jax.random.randint(k2, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
  else:
    codes = jax.random.randint(k2, (n, k // 2), 0, 256, jnp.int32).astype(
        jnp.uint8)
  ng = 1 if group is None else k // group
  ts = None
  if fmt == "mxfp4":
    scale = jax.random.randint(k3, (n, ng), 120, 132, jnp.int32).astype(
        jnp.uint8)
  elif fmt == "nvfp4":
    scale = jax.random.uniform(k3, (n, ng), jnp.float32, 0.05, 2.0).astype(
        jnp.float8_e4m3fn)
    ts = jax.random.uniform(k4, (), jnp.float32, 0.5, 2.0)
  else:
    scale = jax.random.uniform(k3, (n, ng), jnp.float32, 0.001, 0.02).astype(
        jnp.bfloat16)
  return (codes, scale, ts)


_DN_NT = (((1,), (1,)), ((), ()))  # x[M, K] . W[N, K]


def public_weights(fmt, group, n, k, weights, order):
  """``weights`` (codes, scales, tensor scale) as the QArrays a user's
  ``ops.prepare_weight`` makes of a bf16 [K, N] weight: the same codes (in
  ``order``), the scales in the spec's own dtype (float32 for int / fp4)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops as lops  # pylint: disable=g-import-not-at-top
  kw = {} if group is None or fmt in ("mxfp4", "nvfp4") else dict(group_size=group)
  spec = lb.QuantSpec(fmt, **kw)
  tmpl = jax.eval_shape(lambda v: lops.prepare_weight(v, spec, 0),
                        jax.ShapeDtypeStruct((k, n), jnp.bfloat16))
  out = []
  for codes, scale, ts in weights:
    if codes.shape != tmpl.codes.shape or scale.shape != tmpl.scale.shape:
      raise ValueError(f"{fmt} g{group}: bench weights {codes.shape}/"
                       f"{scale.shape} are not prepare_weight's "
                       f"{tmpl.codes.shape}/{tmpl.scale.shape}")
    out.append(dataclasses.replace(
        tmpl, codes=codes, scale=scale.astype(tmpl.scale.dtype),
        zero_point=None, tensor_scale=ts, code_order=order))
  return out


def _nbytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------
# Candidate tilings.
# ----------------------------------------------------------------------------

_SMS = 132  # streaming multiprocessors of the H100 / H200 (SXM)


def candidates(wo, prob, tune: bool, few: bool = False, fast=None):
  """Tilings to time for one problem.

  Args:
    wo: the gpu_weight_only module.
    prob: the problem.
    tune: False: the table's (or the default) tiling, and for E2M1 weights the
      same with ``fast_decode`` flipped and with ``lut_decode`` flipped; True:
      also the other candidates.
    few: at most three.
    fast: ``fast_decode`` for the other candidates of E2M1 weights (None: the
      first ones' setting, False).

  Returns:
    Configs, the table's / default first (then its fast_decode and
    lut_decode twins).
  """
  out = []
  for base in (wo.tuned_config(prob), wo._decode_config(prob)):  # pylint: disable=protected-access
    if wo._shape_ok(prob, base):  # pylint: disable=protected-access
      out.append(base)
      break
  e2m1 = prob.w_format in ("fp4_e2m1", "mxfp4", "nvfp4")
  if out and e2m1:
    out.append(dataclasses.replace(out[0], fast_decode=not out[0].fast_decode))
    # The table-lookup E2M1 decode (Config.lut_decode, session 30: about 4
    # instructions a pair against fast_decode's 6.5 and the bit path's 13;
    # not yet timed on a GPU), with the first tiling's scale conversion.
    out.append(dataclasses.replace(out[0], lut_decode=not out[0].lut_decode))
  if tune and out:
    C = wo.Config
    m = prob.m
    tm = max(8, -(-m // 8) * 8) if m <= 128 else 128
    if m <= 16:
      # The last five trade pipeline depth for CTAs per SM: Nsight Compute on
      # the H200 (experiments/ncu_probe.py, 8192x28672, M = 1) found the
      # 4-stage tilings limited by shared memory to 2 CTAs per SM (int8, 83 KB
      # each; 1.9 warps per scheduler) and 4 (int4 g128, 53 KB), with issue
      # slots 53-63% busy.
      cands = [C(64, 256, tm, 4, 2), C(64, 512, tm, 3, 2), C(64, 256, tm, 4, 4),
               C(64, 256, tm, 4, 1), C(64, 256, tm, 3, 2), C(64, 256, tm, 2, 2),
               C(64, 128, tm, 4, 2), C(64, 128, tm, 6, 2), C(64, 128, tm, 4, 4)]
      # K split in eight: on 8192x28672 3584 CTAs, 6.8 waves of the 528
      # that four an SM make, where splits of 2 and 4 leave their last
      # waves 70% and 39% full (Nsight Compute on the split-2 grid,
      # benchmarks/kernels_h100_runs/ncu_sections_wgmma_s34a.txt.gz: "1
      # full waves and a partial wave of 369 thread blocks"). On an H100
      # (session 43, benchmarks/kernels_h100_runs/run_split8*_h100.md) it
      # won every M = 1 row of 8192x28672, by 1-6%, and none of the 8B
      # block's other shapes by more than noise.
      cands.append(C(64, 256, tm, 4, 8))
    elif m <= 64:
      cands = [C(64, 256, tm, 3, 1), C(64, 256, tm, 3, 2), C(128, 256, tm, 3, 1),
               C(64, 128, tm, 4, 1), C(64, 256, tm, 2, 1)]
    else:
      cands = [C(64, 128, 128, 3, 1), C(128, 128, 128, 3, 1),
               C(128, 64, 128, 4, 1)]
    # The warp-specialized variant (Config(ws=True)) is no longer a candidate:
    # it was slower on all 24 rows it was timed on (benchmarks/
    # kernels_h200_runs/run_tune2.md).
    f = bool(fast) if fast is not None else out[0].fast_decode
    cands = [dataclasses.replace(c, fast_decode=f and e2m1) for c in cands]
    # Each K step in two column chunks (Config.k_chunks: chunk c's MMA in
    # flight while chunk c + 1 is decoded), for the first tiling and the
    # first three candidates; not yet timed on a GPU.
    cands += [dataclasses.replace(c, k_chunks=2) for c in [out[0]] + cands[:3]]
    if e2m1:
      cands += [dataclasses.replace(c, lut_decode=True) for c in cands[:3]]
    # Two compute warpgroups, each half of the CTA's weight rows, one
    # activation tile loaded for both (Config.n_split; not yet timed on a
    # GPU). At decode, two warpgroups decoding per CTA; from M = 64 on, the
    # activation tile read once per 128-256 weight rows instead of 64.
    ns = functools.partial(C, ws=True, n_split=True, fast_decode=f and e2m1)
    if m <= 16:
      cands += [ns(128, 256, tm, 4, 2), ns(128, 256, tm, 4, 4),
                ns(128, 128, tm, 4, 2), ns(256, 256, tm, 3, 2)]
    elif m <= 64:
      cands += [ns(128, 256, tm, 3, 1), ns(128, 128, tm, 4, 1),
                ns(256, 128, tm, 3, 1)]
    else:
      # And the one-warpgroup 128-row tile with two stages (80 KB: two CTAs
      # an SM, one's decode beside the other's MMA).
      cands += [ns(128, 128, 128, 3, 1), ns(256, 128, 128, 3, 1),
                ns(256, 128, 128, 3, 1, k_chunks=2), ns(256, 128, 128, 2, 1),
                C(128, 128, 128, 2, 1)]
      if m >= 256:
        # 256 activation rows a CTA (WGMMA's widest N): at M = 256 the
        # weight is read once, not once per 128-row tile.
        cands += [ns(128, 128, 256, 2, 1), C(64, 128, 256, 2, 1)]
      if (prob.n // 128) * -(-m // 128) < _SMS:
        # Fewer split-tiling CTAs than SMs (14336x4096 at M = 256: 64 for
        # 132, 0.58-0.63x XLA bf16 in run_mid5): K split in two, or 64
        # activation rows a CTA (twice the CTAs); not yet timed on a GPU.
        cands += [ns(128, 128, 128, 3, 2), ns(128, 128, 64, 3, 1),
                  ns(128, 128, 64, 4, 1)]
    for c in cands:
      if c not in out and wo._shape_ok(prob, c):  # pylint: disable=protected-access
        out.append(c)
  out = _for_order(wo, prob, out)
  return out[:3] if few else out


def case_order(requested: str, fmt: str) -> str:
  """The code order ``--w_order=requested`` gives a case of format ``fmt``:
  a split order applies to its own formats
  (``gpu_weight_only.SPLIT_ORDER_FORMATS``), the other 4-bit cases then take
  ``wgmma``; ``kernel`` gives each 4-bit case its split order; 8-bit stays
  natural."""
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  if fmt not in FOUR_BIT:
    return "natural"
  own = wo.split_order_for(fmt) or "wgmma"
  if requested == "kernel":
    return own
  if requested in wo.SPLIT_ORDER_FORMATS and requested != own:
    return "wgmma"
  return requested


def _for_order(wo, prob, cands) -> list:
  """``cands`` as they apply to ``prob``'s code order: for "wgmma_e2m1" codes
  (decoded by rotations) the table decode's options go
  (``gpu_weight_only.e2m1_split_config``) and, but for NVFP4, whose scale
  conversion it picks, ``fast_decode`` too; duplicates dropped."""
  if prob.w_order != "wgmma_e2m1":
    return cands
  out = []
  for c in cands:
    c = wo.e2m1_split_config(c)
    if prob.w_format != "nvfp4":
      c = dataclasses.replace(c, fast_decode=False)
    if c not in out and wo._shape_ok(prob, c):  # pylint: disable=protected-access
      out.append(c)
  return out


def refine_candidates(wo, prob, best) -> list:
  """The "refine" phase's tilings: ``best`` (a row's fastest so far) with
  every combination of the options session 35 built without a GPU that
  apply to it: ``cluster_reduce`` where it splits K over 2, 4 or 8 CTAs of
  one warpgroup, ``lut_regs`` (with the table decode) for E2M1 weights,
  ``scale_words`` for MXFP4 / NVFP4, and session 43's ``acc_scale`` for
  int4 / int8 / fp4 in groups of 64 or 128. At most seven, each fitting the shape,
  instead of each option on every candidate of the tune phase; and each
  ``cluster_reduce`` tiling, ``best`` included, again with a stage fewer
  (where ``best`` has more than two), at most eleven in all.

  Why the twin: a cluster's CTAs are resident together or not at all, and
  its exchange buffer adds to each CTA's shared memory. Nsight Compute on an
  H100 (session 36, ``benchmarks/kernels_h200_notes.md``, "The three options
  timed") found int4 g128 on 8192x8192 at M = 1 (512 CTAs, four an SM by
  shared memory) allowed 124 active 4-CTA clusters of the 128 the grid
  needs, so 16 CTAs ran as a second wave (21.1 us against 18.6 with XLA's
  reduction). A stage fewer lets five CTAs share an SM there by shared
  memory (``gpu_weight_only.smem_bytes``: 40,960 bytes a CTA against 53,248,
  which Nsight read as 53.3 KB) and by registers (95 a thread); NVFP4's
  8192x28672 tiling goes from three to four (47,104 against 59,392 bytes).
  Whether the time follows is not yet measured."""
  opts = []
  if best.split_k in wo.CLUSTER_SPLITS and not best.ws:
    opts.append(dict(cluster_reduce=True))
  if prob.w_format in wo.E2M1_FORMATS:
    opts.append(dict(lut_decode=True, lut_regs=True))
  if prob.w_format in ("mxfp4", "nvfp4"):
    opts.append(dict(scale_words=True))
  acc = None if best.ws else wo.acc_scale_config(prob, best)
  if acc is not None:
    # Session 43: group scales on the accumulator (int4 / int8 / fp4 in
    # groups of 64 or 128), one K chunk a group; 1-3% slower on an H100
    # (benchmarks/kernels_h100_runs/run_acc_h100.md), not yet timed on the
    # H200.
    opts.append(dict(acc_scale=True, k_chunks=acc.k_chunks))
  out = []
  for r in range(1, len(opts) + 1):
    for combo in itertools.combinations(opts, r):
      c = dataclasses.replace(best, **{k: v for o in combo for k, v in o.items()})
      if c != best and c not in out and wo._shape_ok(prob, c):  # pylint: disable=protected-access
        out.append(c)
  if best.stages > 2:  # best itself too: a table row may already cluster
    for c in [c for c in [best] + out if c.cluster_reduce]:
      c = dataclasses.replace(c, stages=best.stages - 1)
      if c not in out and wo._shape_ok(prob, c):  # pylint: disable=protected-access
        out.append(c)
  return [c for c in _for_order(wo, prob, out) if c != best]


# ----------------------------------------------------------------------------
# Phases.
# ----------------------------------------------------------------------------

def measure_ceilings(b: Bench):
  jax = b.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = (1 << 20) if b.smoke else (1 << 28)
  big = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
  us, _ = b.measure(b.compile(lambda a: a * 1.0001, (big,)), (big,))
  bw = 2 * big.nbytes / us / 1e6
  del big
  s = 256 if b.smoke else 8192
  ka, kb = jax.random.split(jax.random.key(2))
  x = jax.random.normal(ka, (s, s), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kb, (s, s), jnp.float32).astype(jnp.bfloat16)
  us2, _ = b.measure(b.compile(lambda a, c: a @ c, (x, w)), (x, w))
  rate = 2 * s ** 3 / us2 / 1e6
  b.res["ceilings"] = dict(stream_TBps=bw, stream_us=us,
                           bf16_gemm_TFLOPs=rate, bf16_gemm_us=us2, gemm_n=s)
  b.log(f"stream {bw:.2f} TB/s; bf16 GEMM {s}^3 {rate:.0f} TFLOP/s")


def roofline_us(b: Bench, nbytes: float, flops: float) -> float:
  c = b.res["ceilings"]
  return max(nbytes / (c["stream_TBps"] * 1e6), flops / (c["bf16_gemm_TFLOPs"] * 1e6))


def run_shape(b: Bench, wo, api, k: int, n: int, ms, cases, stage: str):
  """Weight-only measurements of one K x N weight at the batches ``ms``.

  Args:
    b: the bench.
    wo, api: the kernel module and the kernel API module.
    k, n: the weight shape.
    ms: batch sizes.
    cases: weight cases (keys of ``WO_CASES``).
    stage: "base": the baselines and the table's (or the default) tiling;
      "tune": the other candidate tilings of rows measured in "base";
      "refine": the fastest tiling so far with session 35's options
      (``refine_candidates``).
  """
  jax = b.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  kx = jax.random.key(k * 31 + n)
  xs = {m: jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.float32
                             ).astype(jnp.bfloat16) for m in ms}
  # One batch of jobs for the whole shape (all cases): the compiles of a batch
  # run in parallel.
  jobs, tail, touched = [], [], []
  if any((k, n, m) not in b.bf16 for m in ms):
    # XLA bf16, weight [K, N] as an unquantized model stores it.
    rb = _reps(k * n * 2, b.smoke)
    wb = [jax.random.normal(jax.random.fold_in(kx, 100 + i), (k, n), jnp.float32
                            ).astype(jnp.bfloat16) for i in range(rb)]
    for m in [m for m in ms if (k, n, m) not in b.bf16]:
      def done_b(us, out, m=m):
        b.bf16[(k, n, m)] = us
      jobs.append(dict(name=f"bf16 {k}x{n} M={m}",
                       fn=lambda x, ws: [x @ w for w in ws],
                       args=(xs[m], wb), reps=rb, done=done_b))
  from lowbit_jax.core import ops as lops  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._qarray import to_code_order  # pylint: disable=g-import-not-at-top
  interp = False
  if b.smoke:
    from lowbit_jax.kernels import _gpu_common  # pylint: disable=g-import-not-at-top
    # Rows past M inside an 8-row tile are read from outside the activation
    # (zero-filled by the TMA unit on a GPU, NaN here, never stored).
    interp = _gpu_common.interpret_params(True, out_of_bounds_reads="uninitialized")
  for case in cases:
    if b.over_budget():
      b.res["skipped"].append(f"{stage}: {case} {k}x{n} M={ms} (time budget)")
      continue
    fmt, group = WO_CASES[case]
    order = case_order(_W_ORDER.value, fmt)
    seed = zlib.crc32(case.encode()) % 100000
    w0 = wo_weight(jax.random.fold_in(kx, seed), fmt, group, n, k)
    wbytes = _nbytes(w0[:2])
    r = _reps(wbytes, b.smoke)
    ws = [w0] + [wo_weight(jax.random.fold_in(kx, seed + 100001 * (i + 1)), fmt,
                           group, n, k) for i in range(r - 1)]
    mk = lambda x, w: api.MatmulOperands(x=x, w_codes=w[0], w_scale=w[1],
                                         w_tensor_scale=w[2])
    label = case if order == "natural" else f"{case}@{order}"
    # The kernel's weights: the same codes, in its order (XLA reads natural).
    wk = ws if order == "natural" else [
        (to_code_order(c, order), s, t) for c, s, t in ws]
    # The public path's QArrays, made when a row first times it.
    qs = functools.lru_cache(maxsize=1)(
        lambda fmt=fmt, group=group, wk=wk, order=order: public_weights(
            fmt, group, n, k, wk, order))
    for m in ms:
      prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                               w_block=group)
      prob_k = dataclasses.replace(prob, w_order=order)
      key = (label, m, k, n)
      # A tuning run without base rows measures them itself.
      do_base = stage != "fallback" and (
          stage == "base" or key not in b.rows or key not in b.ref_out)
      if do_base or (stage == "fallback" and key not in b.rows):
        flops = 2 * m * n * k
        b.rows[key] = dict(
            kernel=label, m=m, k=k, n=n, reps=r, weight_bytes=wbytes,
            roofline_us=roofline_us(b, wbytes + m * k * 2 + m * n * 2, flops),
            bf16_roofline_us=roofline_us(b, k * n * 2 + m * k * 2 + m * n * 2,
                                         flops),
            variants={})
      row = b.rows[key]
      touched.append(row)

      # What the public quantized dot runs where the table declines the kernel
      # (ops.dot_general with use_kernel="never", the weight as
      # ops.prepare_weight stores it): the table's decisions are made against
      # this path, the one the kernel replaces.
      if do_base or stage == "fallback":
        def done_f(us, out, row=row):
          row["fallback_us"] = us
        jobs.append(dict(
            name=f"fallback {label} {k}x{n} M={m}",
            fn=lambda x, qs_: [lops.dot_general(x, q, _DN_NT, mode="real",
                                                use_kernel="never")
                               for q in qs_],
            args=(xs[m], qs()), reps=r, done=done_f))
      if stage == "fallback":
        continue

      # XLA's path for the weight as stored: on reordered codes it reorders
      # them back first (what the dispatcher falls back to for them).
      def fused_fn(x, ws_, prob=prob_k, decode="native", mk=mk):
        return [wo.xla_fused_matmul(mk(x, w), prob, decode=decode) for w in ws_]

      def done_x(us, out, row=row, key=key):
        row["xla_fused_us"] = us
        b.ref_out[key] = out[0]

      def failed_x(e, row=row, prob=prob, m=m, done_x=done_x, ws=ws,
                   fused_fn=fused_fn, r=r):
        # A backend without the 4-bit dtypes: the arithmetic decode, later.
        row["xla_fused_note"] = f"native decode failed ({type(e).__name__}); arith"
        tail.append(dict(
            name=f"xla_fused(arith) {row['kernel']} {k}x{n} M={m}",
            fn=lambda x, ws_: fused_fn(x, ws_, prob_k, "arith"),
            args=(xs[m], wk), reps=r, done=done_x))
      if do_base:
        jobs.append(dict(name=f"xla_fused {label} {k}x{n} M={m}", fn=fused_fn,
                         args=(xs[m], wk), reps=r, done=done_x, failed=failed_x))
        if str(m) in _REF_BATCHES.value:
          def done_r(us, out, row=row):
            row["dequant_ref_us"] = us
          jobs.append(dict(
              name=f"dequant_ref {case} {k}x{n} M={m}",
              fn=lambda x, ws_, prob=prob, mk=mk: [
                  wo.xla_dequant_matmul(mk(x, w), prob) for w in ws_],
              args=(xs[m], ws), reps=r, done=done_r))
      best = min(((v["us"], v["config"]) for v in row["variants"].values()
                  if v["rel_err"] is not None and v["rel_err"] < MAX_REL_ERR),
                 default=None)
      fast = None if best is None or len(best[1]) < 7 else bool(best[1][6])
      if stage == "refine":
        cands = [] if best is None else refine_candidates(
            wo, prob_k, wo._config_from_json(best[1]))  # pylint: disable=protected-access
        if b.smoke:
          cands = cands[:3]
      else:
        cands = candidates(wo, prob_k, stage == "tune", few=b.smoke, fast=fast)
      if not cands:
        row["kernel_note"] = "no tiling fits this shape"
      n_base = 2 if fmt in ("fp4_e2m1", "mxfp4", "nvfp4") else 1
      if stage == "base":
        cands = cands[:n_base]
      elif not do_base and stage == "tune":
        cands = cands[n_base:]
      for cfg in cands:
        # One inner jit: the kernel is traced and lowered once per job, not
        # once per weight set.
        inner = jax.jit(lambda o, prob=prob_k, cfg=cfg: wo.matmul(
            o, prob, config=cfg, interpret=interp))

        def done_k(us, out, row=row, cfg=cfg, key=key):
          ref = b.ref_out.get(key)
          err = None if ref is None else rel_err(out[0], ref)
          row["variants"][str(dataclasses.astuple(cfg))] = dict(
              us=us, rel_err=err, config=list(dataclasses.astuple(cfg)))
        jobs.append(dict(
            name=f"kernel {label} {k}x{n} M={m} {dataclasses.astuple(cfg)}",
            fn=lambda x, ws_, inner=inner, mk=mk: [inner(mk(x, w)) for w in ws_],
            args=(xs[m], wk), reps=r, done=done_k))
  b.run_jobs(jobs)
  if tail:
    b.run_jobs(tail)
  for row in touched:
    row["bf16_us"] = b.bf16.get((k, n, row["m"]))
    finish_row(b, row)


def finish_row(b: Bench, row: dict):
  """Picks the best correct tiling and the dispatcher's choice; logs the row."""
  good = [(v["us"], c, v["config"]) for c, v in row["variants"].items()
          if v["rel_err"] is not None and v["rel_err"] < MAX_REL_ERR]
  bad = [(c, v["rel_err"]) for c, v in row["variants"].items()
         if v["rel_err"] is None or v["rel_err"] >= MAX_REL_ERR]
  row["bad_variants"] = bad
  # The path the kernel replaces: the public dot's own (``fallback_us``,
  # measured since session 44), else XLA's fused path (older runs).
  path = "fallback" if row.get("fallback_us") is not None else "xla_fused"
  xla = row.get(path + "_us")
  row.pop("kernel_us", None)
  if good:
    us, cfg, cfg_list = min(good)
    row["kernel_us"], row["config"], row["config_list"] = us, cfg, cfg_list
  use = bool(good) and xla is not None and row["kernel_us"] <= _MARGIN.value * xla
  row["table_use_kernel"] = use
  row["baseline"], row["baseline_us"] = path, xla
  row["dispatched_us"] = row["kernel_us"] if use else xla
  row["dispatched"] = "kernel" if use else path
  f = lambda v: "-" if v is None else f"{v:.1f}"
  b.log(f"WO {row['kernel']:9s} {row['k']}x{row['n']} M={row['m']:<5d} "
        f"bf16={f(row.get('bf16_us'))} fused={f(row.get('xla_fused_us'))} "
        f"fallback={f(row.get('fallback_us'))} "
        f"ref={f(row.get('dequant_ref_us'))} kernel={f(row.get('kernel_us'))} "
        f"roof={f(row['roofline_us'])} -> {row['dispatched']} "
        f"{row.get('config', '')} ({len(row['variants'])} tilings)")


def table_entries(wo, rows) -> dict:
  """The dispatch table from the measured rows (only M at a bucket's top)."""
  entries = {}
  for row in rows:
    # A row without a kernel timed (a --phases=fallback run's alone) decides
    # nothing: no entry, so the table a device's rows overlay keeps its own.
    if (row.get("baseline_us") is None or not row.get("variants")
        or wo.m_bucket(row["m"]) != row["m"]):
      continue
    cls = wo.shape_class(row["k"], row["n"])
    entries.setdefault(row["kernel"], {}).setdefault(cls, {})[str(row["m"])] = dict(
        use_kernel=row["table_use_kernel"], config=row.get("config_list"),
        shape=f"{row['k']}x{row['n']}", m=row["m"], kernel_us=row.get("kernel_us"),
        xla_us=row["baseline_us"], baseline=row["baseline"],
        bf16_us=row.get("bf16_us"))
  return entries


def import_peers(b: Bench):
  """Imports qwix and tokamax (installed, or put on sys.path by the parent)."""
  try:
    import xprof.cli.tools  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    stub = False
  except Exception:  # pylint: disable=broad-except
    # tokamax imports xprof at import time, for its own benchmarking helpers
    # only; nothing measured here uses it.
    stub = True
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
  import qwix  # pylint: disable=g-import-not-at-top
  import tokamax  # pylint: disable=g-import-not-at-top
  b.res["meta"]["peers"] = dict(qwix=qwix.__version__, tokamax=tokamax.__version__,
                                xprof_stub=stub)
  return qwix, tokamax


def run_tokamax_subprocess(b: Bench, out_dir: str):
  """Runs the tokamax rows in a child process and merges its results.

  The wheels (``--peer_wheels``) go to a temporary folder put first on the
  child's PYTHONPATH: they must shadow older installed copies (pydantic needs a
  newer typing_extensions than the image's), which cannot be done in a process
  that has imported them already. The child may use 20% of the GPU memory.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  wheels = sorted(glob.glob(os.path.join(_PEER_WHEELS.value, "*.whl")))
  if importlib.util.find_spec("tokamax") is None:
    if not wheels:
      b.res["tokamax_skipped"] = (f"tokamax is not installed and --peer_wheels="
                                  f"{_PEER_WHEELS.value} holds no wheels")
      b.log(f"tokamax skipped: {b.res['tokamax_skipped']}")
      return
    target = os.path.join(tempfile.gettempdir(), "bench_kernels_peers")
    try:
      if not os.path.isdir(os.path.join(target, "tokamax")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-index", "--target", target] + wheels, check=True,
                       timeout=120)
    except Exception as e:  # pylint: disable=broad-except
      b.res["tokamax_skipped"] = f"installing the wheels failed: {e}"
      b.log(f"tokamax skipped: {b.res['tokamax_skipped']}")
      return
    env["PYTHONPATH"] = os.pathsep.join(
        [target, os.getcwd()] + [p for p in [env.get("PYTHONPATH")] if p])
  env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.2"
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  child_out = os.path.join(out_dir, "tokamax_child")
  left = max(30.0, _BUDGET.value - b.elapsed())
  cmd = [sys.executable, os.path.abspath(__file__), "--tokamax_only",
         f"--out_dir={child_out}", f"--iters={_ITERS.value}",
         f"--time_budget_s={min(90.0, left)}",
         f"--hard_limit_s={min(90.0, left) + 30}"] + (
             ["--smoke"] if b.smoke else [])
  b.log("tokamax: " + " ".join(cmd))
  try:
    proc = subprocess.run(cmd, env=env, timeout=min(90.0, left) + 60,
                          capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-3000:]
    with open(os.path.join(out_dir, "tokamax_child.log"), "w") as f:
      f.write(proc.stdout + proc.stderr)
  except subprocess.TimeoutExpired:
    tail = "timed out"
  path = os.path.join(child_out, _TAG.value + ".json")
  if not os.path.exists(path):
    b.res["tokamax_skipped"] = f"the tokamax child wrote nothing: {tail[-600:]}"
    b.log(f"tokamax skipped: {b.res['tokamax_skipped']}")
    return
  with open(path) as f:
    d = json.load(f)
  b.res["tokamax"] += d.get("tokamax", [])
  b.res["errors"] += d.get("errors", [])
  b.res["skipped"] += d.get("skipped", [])
  if d.get("tokamax_skipped"):
    b.res["tokamax_skipped"] = d["tokamax_skipped"]
  if d["meta"].get("peers"):
    b.res["meta"]["peers"] = d["meta"]["peers"]


def run_tokamax(b: Bench):
  """tokamax.ragged_dot, one group, qwix-quantized [K, N] weight."""
  jax = b.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    qwix, tokamax = import_peers(b)
  except Exception as e:  # pylint: disable=broad-except
    b.res["tokamax_skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
    b.log(f"tokamax skipped: {b.res['tokamax_skipped']}")
    return
  shapes = [(512, 256)] if b.smoke else [(8192, 8192), (8192, 28672)]
  ms = (1, 16) if b.smoke else (1, 16, 4096)
  block_ms = (None,) if b.smoke else (None, 16)
  try:
    from tokamax._src.ops.ragged_dot import api as tk_api  # pylint: disable=g-import-not-at-top
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_common as tk_common  # pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    tk_api = tk_common = None
  for (k, n) in shapes:
    for case, qtype, tile in (("int4_g128", jnp.int4, 128),
                              ("int8_pc", jnp.int8, None)):
      if b.over_budget():
        b.res["skipped"].append(f"tokamax {case} {k}x{n} (time budget)")
        continue
      kk = jax.random.key(n + k + (tile or 0))
      w = (jax.random.normal(kk, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
      # Codes stored [1, N, K]: the kernel reads the rhs K-major, so the swap
      # inside the jitted call and the kernel's own transpose cancel.
      q = qwix.quantize(w.T[None], qtype, channelwise_axes=(0, 1),
                        tiled_axes={2: tile} if tile else {})
      packs = [(q.qvalue, jnp.swapaxes(q.scale, 1, 2))]
      r = _reps(_nbytes(packs[0]), b.smoke)
      for i in range(1, r):
        wi = (jax.random.normal(jax.random.fold_in(kk, i), (k, n), jnp.float32)
              * 0.02).astype(jnp.bfloat16)
        qi = qwix.quantize(wi.T[None], qtype, channelwise_axes=(0, 1),
                           tiled_axes={2: tile} if tile else {})
        packs.append((qi.qvalue, jnp.swapaxes(qi.scale, 1, 2)))
      deq = qwix.dequantize(q)[0].astype(jnp.float32)  # [N, K]
      jobs = []
      for m in ms:
        x = jax.random.normal(jax.random.fold_in(kk, 7 + m), (m, k), jnp.float32
                              ).astype(jnp.bfloat16)
        gs = jnp.array([m], jnp.int32)
        ref = jnp.dot(x.astype(jnp.float32), deq.T)
        for bm in block_ms:
          impl = "mosaic_gpu"
          if bm is not None:
            if tk_common is None or m > 64:
              continue
            cfg = tk_common.Config(block_m=bm, block_n=64,
                                   block_k=min(tile or 256, 256), num_stages=4,
                                   split_k=1, persistent=True,
                                   grid_minor_dim=tk_common.MatmulDimension.M,
                                   grid_tile_width=1)
            impl = (dataclasses.replace(tk_api.IMPLEMENTATIONS["mosaic_gpu"],
                                        config=cfg),)

          def fn(x, gs, packs, impl=impl):
            return [tokamax.ragged_dot(
                x, qwix.QArray(qvalue=jnp.swapaxes(c, 1, 2), scale=s,
                               qtype=qtype), gs, implementation=impl)
                    for c, s in packs]

          def done(us, out, m=m, bm=bm, ref=ref, case=case, k=k, n=n, r=r):
            row = dict(kernel=case, m=m, k=k, n=n, block_m=bm or "heuristic",
                       tokamax_us=us, rel_err=rel_err(out[0], ref), reps=r)
            b.res["tokamax"].append(row)
            b.log(f"tokamax {case} {k}x{n} M={m} block_m={row['block_m']}: "
                  f"{us:.1f} us (rel_err {row['rel_err']:.1e})")
          jobs.append(dict(name=f"tokamax {case} {k}x{n} M={m} bm={bm}", fn=fn,
                           args=(x, gs, packs), reps=r, done=done))
      b.run_jobs(jobs)


def w8a8_candidates(w8, prob, tune: bool) -> list:
  """W8A8 tilings to time: the table's / heuristic's first, and with
  ``tune`` the pipeline depths, snake widths, epilogue widths (and for the
  block mode the other warpgroup split) that fit its shared memory."""
  first = w8._default_config(prob)  # pylint: disable=protected-access
  out = [first]
  if tune:
    base = w8.heuristic_config(prob)
    r = functools.partial(dataclasses.replace, base)
    mode = w8.mode_of(prob)
    cands = [r(grid_tile_width=4), r(grid_tile_width=16), r(epi_n=128)]
    if mode == "mx":
      # And 2 or 4 32-deep blocks a pipeline step (Config.sub_blocks, session
      # 30, untimed): the step's barrier and TMA issue amortized over them.
      cands = [r(sub_blocks=4, stages=4), r(sub_blocks=2, stages=6),
               r(sub_blocks=4, stages=3)] + cands + [
                   r(stages=6), r(stages=12), r(stages=16)]
    else:
      cands += [r(stages=3), r(stages=5), r(stages=6)]
    if mode == "block":
      cands.append(r(wg_dim="n"))  # two 64 x 128 warpgroups side by side
    for c in [base] + cands:
      if c not in out and w8._shape_ok(prob, c):  # pylint: disable=protected-access
        out.append(c)
  return out


def run_w8a8(b: Bench, w8, api, tune: bool = False):
  """The W8A8 kernels at M=4096 on 8192x8192 (XLA bf16, XLA's own path, ours);
  with ``tune`` every tiling of ``w8a8_candidates`` (the row keeps each
  variant's time, its ``kernel_us`` the fastest correct one)."""
  jax = b.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  m, n, k = (256, 256, 512) if b.smoke else (4096, 8192, 8192)
  kk = jax.random.key(3)
  ka, kb = jax.random.split(kk)
  xb = jax.random.normal(ka, (m, k), jnp.float32).astype(jnp.bfloat16)
  wb = jax.random.normal(kb, (k, n), jnp.float32).astype(jnp.bfloat16)
  flops = 2 * m * n * k
  rows = {}
  jobs = []
  for case in _W8A8.value:
    ops, prob = w8_operands(api, jax.random.fold_in(kk, len(case)), case, m, n, k)
    row = dict(kernel=case, m=m, k=k, n=n, variants={},
               heuristic=dataclasses.asdict(w8.heuristic_config(prob)))
    rows[case] = row
    st = {}

    def d_b(us, out, row=row):
      row["bf16_us"] = us

    def d_x(us, out, row=row, st=st):
      row["xla_us"] = us
      st["ref"] = out

    def d_k(us, out, row=row, st=st, cfg=None):
      err = rel_err(out, st["ref"]) if "ref" in st else None
      row["variants"][str(dataclasses.astuple(cfg))] = dict(
          us=us, rel_err=err, config=dataclasses.asdict(cfg))
      if err is not None and err >= MAX_REL_ERR:
        return  # a wrong tiling never becomes the row's time
      if row.get("kernel_us") is None or us < row["kernel_us"]:
        row["kernel_us"], row["rel_err"] = us, err
        row["config"] = dataclasses.asdict(cfg)
    jobs += [dict(name=f"w8a8 bf16 {case}", fn=lambda a, c: a @ c, args=(xb, wb),
                  done=d_b),
             dict(name=f"w8a8 xla {case}", fn=lambda o, p=prob: w8.xla_matmul(o, p),
                  args=(ops,), done=d_x)]
    for cfg in w8a8_candidates(w8, prob, tune):
      jobs.append(dict(
          name=f"w8a8 kernel {case} {dataclasses.astuple(cfg)}",
          fn=lambda o, p=prob, c=cfg: w8.matmul(o, p, config=c,
                                                interpret=b.smoke),
          args=(ops,), done=functools.partial(d_k, cfg=cfg)))
    if case in ("fp8_channel", "int8_channel", "fp8_block"):
      # The public path a model runs: a bf16 activation quantized per token on
      # the fly (ops.dot_general's lhs_spec), the weight quantized ahead of time;
      # the difference to the kernel alone is the activation-quantization cost.
      # (Block scales: the activation in groups of 128 along K, the weight in
      # 128 x 128 tiles.)
      import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
      fmt = "fp8_e4m3" if case.startswith("fp8") else "int8"
      blk = case.endswith("block")
      w_spec = lb.QuantSpec(fmt, tile=(128, 128)) if blk else fmt
      x_spec = lb.QuantSpec(fmt, axis=-1, group_size=128) if blk else fmt
      qw = jax.jit(lambda v, f=w_spec: lb.ops.prepare_weight(v, f, 0))(wb)
      dn_nt = (((1,), (1,)), ((), ()))

      def d_p(us, out, row=row):
        row["public_us"] = us
      jobs.append(dict(name=f"w8a8 public {case}",
                       fn=lambda a, q, f=x_spec: lb.ops.dot_general(
                           a, q, dn_nt, lhs_spec=f, mode="real"),
                       args=(xb, qw), done=d_p))
  b.run_jobs(jobs)
  for case, row in rows.items():
    for key in ("bf16_us", "xla_us", "kernel_us", "public_us"):
      if row.get(key):
        row[key.replace("_us", "_tflops")] = flops / row[key] / 1e6
    b.res["w8a8"].append(row)
    b.log(f"W8A8 {case}: {row}")


def w8_operands(api, key, case, m, n, k):
  """Random W8A8 operands (codes, scales) for one case."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k1, k2, k3, k4 = jax.random.split(key, 4)
  if case.startswith("int8"):
    x = jax.random.randint(k1, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
    w = jax.random.randint(k2, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
    fmt = "int8"
  else:
    x = (jax.random.normal(k1, (m, k), jnp.float32) * 3).astype(jnp.float8_e4m3fn)
    w = (jax.random.normal(k2, (n, k), jnp.float32) * 3).astype(jnp.float8_e4m3fn)
    fmt = "fp8_e4m3"
  if case.endswith("channel"):
    sx = jax.random.uniform(k3, (m, 1), jnp.float32, 0.01, 0.1)
    sw = jax.random.uniform(k4, (n, 1), jnp.float32, 0.01, 0.1)
    prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype=fmt, w_format=fmt,
                             x_format=fmt)
  elif case.endswith("block"):
    sx = jax.random.uniform(k3, (m, k // 128), jnp.float32, 0.01, 0.1)
    sw = jax.random.uniform(k4, (n // 128, k // 128), jnp.float32, 0.01, 0.1)
    prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype=fmt, w_format=fmt,
                             x_format=fmt, w_block=(128, 128), x_block=128)
  elif case == "mxfp8":
    sx = jax.random.randint(k3, (m, k // 32), 117, 137, jnp.int32).astype(jnp.uint8)
    sw = jax.random.randint(k4, (n, k // 32), 117, 137, jnp.int32).astype(jnp.uint8)
    prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype="fp8_e4m3",
                             w_format="mxfp8_e4m3", x_format="mxfp8_e4m3",
                             w_block=32, x_block=32)
  else:
    raise ValueError(f"unknown W8A8 case {case!r}")
  return api.MatmulOperands(x=x, w_codes=w, w_scale=sw, x_scale=sx), prob


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------

def _f(v, fmt="{:.1f}"):
  return "-" if v is None else fmt.format(v)


def _find(rows, case, m, k, n):
  for x in rows:
    if (x["kernel"], x["m"], x["k"], x["n"]) == (case, m, k, n):
      return x
  return None


def target_rows(res) -> list[str]:
  """Issue 13's targets next to what was measured (measured rows only)."""
  rows = []
  wo = res["wo"]

  def add(target, measured, ok):
    rows.append(f"| {target} | {measured} | {'met' if ok else 'MISSED'} |")

  for case in sorted({x["kernel"] for x in wo}):
    fmt = case_format(case)[0]
    for m in DECODE_M:
      a = _find(wo, case, m, 8192, 8192)
      if a and a.get("kernel_us") and a.get("bf16_us") and fmt != "int8":
        v = a["bf16_us"] / a["kernel_us"]
        add(f"{case} M={m} 8192x8192: >= 2.5x XLA bf16",
            f"{v:.2f}x ({a['kernel_us']:.1f} vs {a['bf16_us']:.1f} us)", v >= 2.5)
      c = _find(wo, case, m, 8192, 28672)
      if c and c.get("kernel_us"):
        need = 0.8 if fmt in FOUR_BIT else 0.9
        v = c["roofline_us"] / c["kernel_us"]
        add(f"{case} M={m} 8192x28672: >= {need:.0%} of roofline",
            f"{v:.0%} ({c['kernel_us']:.1f} vs {c['roofline_us']:.1f} us)",
            v >= need)
    for (k, n) in sorted({(x["k"], x["n"]) for x in wo if x["kernel"] == case}):
      a = _find(wo, case, 64, k, n)
      if a and a.get("kernel_us") and a.get("bf16_us"):
        v = a["bf16_us"] / a["kernel_us"]
        add(f"{case} M=64 {k}x{n}: kernel >= 1.5x XLA bf16", f"{v:.2f}x", v >= 1.5)
      a = _find(wo, case, 256, k, n)
      if a and a.get("dispatched_us") and a.get("bf16_us"):
        v = a["bf16_us"] / a["dispatched_us"]
        add(f"{case} M=256 {k}x{n}: dispatched path >= 1.0x XLA bf16",
            f"{v:.2f}x ({a['dispatched']})", v >= 1.0)
  slow = [x for x in wo if x.get("dispatched_us") and x.get("baseline_us")
          and x["dispatched_us"] > 1.03 * x["baseline_us"]]
  n_rows = len([x for x in wo if x.get("dispatched_us")])
  if n_rows:
    add("dispatch never slower than the XLA path it replaces (all rows, 3% noise)",
        f"{n_rows - len(slow)} of {n_rows} rows", not slow)
  best_tk = {}
  for t in res["tokamax"]:
    key = (t["kernel"], t["m"], t["k"], t["n"])
    if key not in best_tk or t["tokamax_us"] < best_tk[key]["tokamax_us"]:
      best_tk[key] = t
  for key, t in sorted(best_tk.items()):
    ours = _find(wo, *key)
    if ours and ours.get("dispatched_us"):
      v = t["tokamax_us"] / ours["dispatched_us"]
      add(f"beat tokamax (its best tiling): {t['kernel']} {t['k']}x{t['n']} "
          f"M={t['m']}", f"{v:.2f}x ({ours['dispatched_us']:.1f} vs "
          f"{t['tokamax_us']:.1f} us)", v > 1.0)
  for x in res["w8a8"]:
    tgt = {"fp8_block": 1.6, "mxfp8": 1.0, "fp8_channel": 1.6,
           "int8_channel": 1.6}.get(x["kernel"])
    if tgt and x.get("kernel_us") and x.get("bf16_us"):
      v = x["bf16_us"] / x["kernel_us"]
      add(f"{x['kernel']} M={x['m']} {x['k']}x{x['n']}: >= {tgt}x XLA bf16",
          f"{v:.2f}x ({2 * x['m'] * x['k'] * x['n'] / x['kernel_us'] / 1e6:.0f} "
          "TFLOP/s)", v >= tgt)
  if not rows:
    return []
  return ["## Targets (issue 13) vs measured", "", "| target | measured | |",
          "|---|---|---|"] + rows + [""]


def block_rows(res) -> list[str]:
  """The Llama-3-8B block's decode matmuls at M = 1 and 16, summed."""
  wo = res["wo"]
  lines = []
  for m in (1, 16):
    hdr = False
    for case in sorted({x["kernel"] for x in wo}):
      sums = dict(bf16=0.0, fused=0.0, kernel=0.0, disp=0.0, roof=0.0)
      ok = True
      for _, k, n in BLOCK_8B:
        x = _find(wo, case, m, k, n)
        if not x or None in (x.get("bf16_us"), x.get("xla_fused_us"),
                             x.get("dispatched_us")):
          ok = False
          break
        sums["bf16"] += x["bf16_us"]
        sums["fused"] += x["xla_fused_us"]
        sums["kernel"] += x.get("kernel_us") or float("nan")
        sums["disp"] += x["dispatched_us"]
        sums["roof"] += x["roofline_us"]
      if not ok:
        continue
      if not hdr:
        lines += [f"### M = {m}", "",
                  "| weight | XLA bf16 us | XLA fused us | kernel us | dispatched us "
                  "| roofline us | dispatched vs bf16 | % roofline |",
                  "|---|---|---|---|---|---|---|---|"]
        hdr = True
      lines.append(
          f"| {case} | {sums['bf16']:.1f} | {sums['fused']:.1f} | "
          f"{sums['kernel']:.1f} | {sums['disp']:.1f} | {sums['roof']:.1f} | "
          f"{sums['bf16'] / sums['disp']:.2f}x | "
          f"{100 * sums['roof'] / sums['disp']:.0f}% |")
    if hdr:
      lines.append("")
  if not lines:
    return []
  return ["## Llama-3-8B block, decode matmuls summed",
          "", "q, o: 4096x4096; k, v: 4096x1024; gate, up: 4096x14336; down: "
          "14336x4096 (K x N). Dispatched = the kernel where the tuned table "
          "takes it, else the path it replaces (the public dot's own, or in "
          "rows measured before session 44 XLA's fused path).", ""] + lines


def write_outputs(res, out_dir: str, tag: str):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, tag + ".json"), "w") as f:
    json.dump(res, f, indent=1, default=str)
  meta, c = res["meta"], res["ceilings"]
  lines = [f"# Low-bit GPU kernels on {meta['device']}", "",
           f"jax {meta['jax']}; {meta['timing']}, median of {meta['iters']} calls "
           "(every kernel of a call counted); weights are jit arguments, several "
           "distinct weight sets per call where one fits in L2.", ""]
  if c:
    lines += [f"Measured in the same run: stream bandwidth {c['stream_TBps']:.2f} "
              f"TB/s (1 GiB f32 read + write), bf16 GEMM {c['gemm_n']}^3 "
              f"{c['bf16_gemm_TFLOPs']:.0f} TFLOP/s. Roofline = max(bytes that must "
              "move / bandwidth, FLOPs / that GEMM rate).", ""]
  lines += ["Commands (GPU machine, repository root):", ""]
  lines += [f"    {c}" for c in meta.get("commands", [meta["command"]])] + [""]
  if meta.get("report_command"):
    lines += [f"Rebuilt with `{meta['report_command']}`.", ""]
  if meta.get("elapsed_s"):
    lines += [f"Run time {meta['elapsed_s']:.0f} s.", ""]
  lines += target_rows(res)
  lines += ["## Weight-only (bf16 activations), us per call", "",
            "XLA fused = `(x @ w.astype(bf16)) * scale` (`xla_fused_matmul`, the "
            "convert fused into the dot; issue 13's baseline). Fallback = what the "
            "public `ops.dot_general` runs without a kernel (`use_kernel=\"never\"`, "
            "the weight as `ops.prepare_weight` stores it; '-' in runs before "
            "session 44). Dequant ref = "
            "our dequantize-then-dot (`xla_dequant_matmul`). Kernel = fastest "
            "correct tiling timed. Dispatched = what the tuned table picks: the "
            "kernel where it beat the fallback (else, in older rows, the fused "
            "path) by the margin.", "",
            "| weight | K x N | M | XLA bf16 | XLA fused | fallback | dequant ref | "
            "kernel | "
            "dispatched | roofline | % roofline (kernel) | kernel vs bf16 | kernel "
            "vs fused | kernel vs ref | config (tile_n, tile_k, tile_m, stages, "
            "split_k, ws, fast_decode[, k_chunks[, n_split[, lut_decode[, "
            "cluster_reduce[, scale_words[, lut_regs[, acc_scale]]]]]]]) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for x in sorted(res["wo"], key=lambda r: (r["kernel"], r["k"], r["n"], r["m"])):
    ku = x.get("kernel_us")
    ratio = lambda a: "-" if (a is None or ku is None) else f"{a / ku:.2f}x"
    pct = "-" if ku is None else f"{100 * x['roofline_us'] / ku:.0f}%"
    lines.append(
        f"| {x['kernel']} | {x['k']}x{x['n']} | {x['m']} | {_f(x.get('bf16_us'))} | "
        f"{_f(x.get('xla_fused_us'))} | {_f(x.get('fallback_us'))} | "
        f"{_f(x.get('dequant_ref_us'))} | {_f(ku)} | "
        f"{_f(x.get('dispatched_us'))} ({x.get('dispatched', '-')}) | "
        f"{_f(x['roofline_us'])} | "
        f"{pct} | "
        f"{ratio(x.get('bf16_us'))} | {ratio(x.get('xla_fused_us'))} | "
        f"{ratio(x.get('dequant_ref_us'))} | {x.get('config', '-')} |")
  lines.append("")
  lines += block_rows(res)
  lines += ["## tokamax 0.0.17 (Mosaic GPU quantized ragged_dot, one group)", ""]
  if res.get("tokamax_skipped"):
    lines += [f"Skipped: {res['tokamax_skipped']}", ""]
  elif res["tokamax"]:
    lines += ["| weight | K x N | M | block_m | tokamax us | ours (kernel) us | "
              "ours (dispatched) us | rel. err |", "|---|---|---|---|---|---|---|---|"]
    for t in res["tokamax"]:
      ours = _find(res["wo"], t["kernel"], t["m"], t["k"], t["n"]) or {}
      lines.append(f"| {t['kernel']} | {t['k']}x{t['n']} | {t['m']} | {t['block_m']} "
                   f"| {t['tokamax_us']:.1f} | {_f(ours.get('kernel_us'))} | "
                   f"{_f(ours.get('dispatched_us'))} | {t['rel_err']:.1e} |")
    lines.append("")
  if res["w8a8"]:
    lines += ["## W8A8, us (TFLOP/s)", "",
              "| case | M x K x N | XLA bf16 | XLA's own path | kernel | kernel vs "
              "bf16 | public path (bf16 x, per-token / per-group quantize + "
              "kernel) | rel. err vs XLA | tilings timed | kernel's tiling |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in res["w8a8"]:
      t = lambda k_: (f"{x[k_ + '_us']:.1f} "  # noqa: E731
                      f"({2 * x['m'] * x['k'] * x['n'] / x[k_ + '_us'] / 1e6:.0f})"
                      if x.get(k_ + "_us") else "-")
      v = (f"{x['bf16_us'] / x['kernel_us']:.2f}x"
           if x.get("kernel_us") and x.get("bf16_us") else "-")
      cfg = x.get("config")
      cfg = "-" if not cfg else ", ".join(
          f"{k_}={v_}" for k_, v_ in cfg.items()
          if x.get("heuristic", {}).get(k_) != v_) or "heuristic"
      lines.append(f"| {x['kernel']} | {x['m']}x{x['k']}x{x['n']} | {t('bf16')} | "
                   f"{t('xla')} | {t('kernel')} | {v} | {t('public')} | "
                   f"{_f(x.get('rel_err'), '{:.1e}')} | "
                   f"{len(x.get('variants') or {}) or '-'} | {cfg} |")
    lines.append("")
  bad = [x for x in res["wo"] if x.get("bad_variants")]
  if bad:
    lines += ["## Tilings rejected (rel. error vs the fused XLA path >= "
              f"{MAX_REL_ERR})", ""]
    lines += [f"- {x['kernel']} {x['k']}x{x['n']} M={x['m']}: {x['bad_variants']}"
              for x in bad] + [""]
  if res.get("table"):
    lines += ["## Tuned table", "", f"Written to `{res['table']}`; copy it to "
              f"`lowbit_jax/kernels/{os.path.basename(res['table'])}` to make "
              "the dispatcher use it on this device "
              "(`gpu_weight_only.table_for_device`).", ""]
  if res["skipped"]:
    lines += ["## Not measured (time budget)", ""] + [
        f"- {s}" for s in res["skipped"]] + [""]
  if res.get("crashed") or res.get("crash_suspects"):
    lines += ["## Aborted the process (skipped after a restart)", "",
              "XLA aborted the measuring process (a failed CHECK); the "
              "parent restarted it after the rows written, without these:", ""]
    lines += [f"- {c['job']}: `{c['reason']}`" for c in res.get("crashed", [])]
    lines += [f"- in flight at an abort, not isolated: {s}"
              for s in res.get("crash_suspects", [])] + [""]
  if res["errors"]:
    lines += ["## Errors", ""] + [f"- {e['what']}: `{e['error'][:300]}`"
                                  for e in res["errors"]] + [""]
  with open(os.path.join(out_dir, tag + ".md"), "w") as f:
    f.write("\n".join(lines))


def w8a8_entries(rows) -> dict:
  """The tuned table's ``"w8a8"`` section: per case, the fastest correct
  tiling timed over every run's rows, where it beat the heuristic's tiling
  (timed in the same run) by the win margin; cases without such a win keep
  the heuristic (no entry)."""
  best = {}
  for row in rows:
    variants = row.get("variants") or {}
    heur = next((v for v in variants.values()
                 if v.get("config") == row.get("heuristic")), None)
    for v in variants.values():
      if v.get("rel_err") is None or v["rel_err"] >= MAX_REL_ERR:
        continue
      if heur is None or v["us"] > _MARGIN.value * heur["us"]:
        continue
      case = row["kernel"]
      if case not in best or v["us"] < best[case]["kernel_us"]:
        best[case] = dict(config=v["config"], kernel_us=v["us"],
                          heuristic_us=heur["us"],
                          shape=f"{row['m']}x{row['k']}x{row['n']}")
  return best


def write_table(b: Bench, wo, path: str):
  meta = dict(device=b.res["meta"]["device"], jax=b.res["meta"]["jax"],
              command=b.command, margin=_MARGIN.value,
              stream_TBps=(b.res.get("ceilings") or {}).get("stream_TBps"),
              source=("experiments/bench_kernels.py --mode=tune: per case, shape "
                      "class and M bucket, the fastest correct tiling timed and "
                      "whether it beat the path it replaces by the margin (each "
                      "entry's baseline: the public dot without a kernel, "
                      "'fallback', or in rows timed before session 44 "
                      "xla_fused_matmul, 'xla_fused'; its time is xla_us)"))
  table = dict(meta=meta, entries=table_entries(wo, b.rows.values()))
  w8 = w8a8_entries(b.res.get("w8a8", []))
  if w8:
    table["w8a8"] = w8
  with open(path, "w") as f:
    json.dump(table, f, indent=1)
  b.res["table"] = path
  return table


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------

# ----------------------------------------------------------------------------
# Crash isolation: a parent process restarts the measuring child after an abort.
# ----------------------------------------------------------------------------

def crash_reason(rc: int, lines) -> str:
  """A one-line reason for a child that died: XLA's failed CHECK if printed.

  Args:
    rc: the child's exit status (negative: killed by that signal).
    lines: the last lines of its stderr.

  Returns:
    E.g. ``"signal 6: triton_tiling_propagation.cc:557] Check failed: ..."``.
  """
  how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
  for line in lines:
    if "Check failed" in line or re.match(r"F\d{4} ", line):
      # Drop glog's "F1203 17:15:09.266184     716 " prefix.
      return f"{how}: " + re.sub(r"^F\d{4} [\d:.]+\s+\d+\s+", "",
                                 line.strip())[:240]
  for line in reversed(lines):
    if line.strip():
      return f"{how}: {line.strip()[:200]}"
  return how


def update_crash_state(state: dict, inflight, reason: str) -> dict:
  """The crash record after one more abort of the child.

  A job alone in flight when the process died is the culprit: it goes to
  ``crashed`` (skipped from then on). Several jobs in flight (threaded
  compiles) all become ``suspects``, which the next child compiles one at a
  time first, so a repeated abort names one job. An abort with nothing in
  flight counts in ``outside``.

  Args:
    state: the previous record (``{}`` at first).
    inflight: names of the jobs in flight at the abort (``"compile <job>"`` /
      ``"run <job>"``).
    reason: what killed it (``crash_reason``).

  Returns:
    The new record: ``crashed`` (list of ``{"job", "reason"}``), ``suspects``
    (sorted names) and ``outside`` (count).
  """
  crashed = list(state.get("crashed", []))
  suspects = set(state.get("suspects", []))
  outside = state.get("outside", 0)
  inflight = sorted(set(inflight))
  if len(inflight) == 1:
    crashed.append(dict(job=inflight[0], reason=reason))
    suspects.discard(inflight[0])
  elif inflight:
    suspects.update(inflight)
  else:
    outside += 1
  return dict(crashed=crashed, suspects=sorted(suspects), outside=outside,
              last_reason=reason)


def _paths(out_dir: str, tag: str):
  base = os.path.join(out_dir, tag)
  return base + ".json", base + ".crashes.json", base + ".inflight"


def supervise(argv) -> int:
  """Runs the benchmark in a child process, restarting it after an abort.

  The child writes its results after every weight shape (and phase) and the
  jobs in flight to ``<tag>.inflight``; when it dies (XLA aborts the process on
  a failed CHECK), the crash is recorded (``update_crash_state``) in
  ``<tag>.crashes.json`` and a new child resumes after the work written, with
  the job that crashed skipped (and listed in the report), while the time
  budget lasts. The clock is the parent's: the budget and the hard limit hold
  for the whole call.

  Args:
    argv: the command line (``sys.argv``).

  Returns:
    The exit status: the last child's (0 done, 3 hard limit).
  """
  t0 = time.time()
  out_dir, tag = _OUT_DIR.value, _TAG.value
  res_path, state_path, inflight_path = _paths(out_dir, tag)
  os.makedirs(out_dir, exist_ok=True)
  for path in (res_path, state_path, inflight_path):
    if os.path.exists(path):
      os.remove(path)
  state, rc = {}, 0
  for attempt in range(_MAX_RESTARTS.value + 1):
    cmd = [sys.executable] + list(argv) + ["--child", f"--t0={t0}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    tail = []

    def pump(proc=proc, tail=tail):
      for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
        del tail[:-400]
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
      # The child's watchdog exits at the hard limit; 10 s more for a hung one.
      rc = proc.wait(timeout=max(5.0, _HARD.value + 10 - (time.time() - t0)))
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = proc.wait()
      tail.append("killed by the parent: past the hard limit")
    reader.join(timeout=5)
    if 0 <= rc <= 3:
      # 0: done; 3: the child's hard limit; 1, 2: a Python / usage error it
      # reported (a restart would repeat it). Aborts are signals (rc < 0).
      break
    inflight = []
    if os.path.exists(inflight_path):
      with open(inflight_path) as f:
        inflight = json.load(f)
      os.remove(inflight_path)
    reason = crash_reason(rc, tail[-60:])
    state = update_crash_state(state, inflight, reason)
    with open(state_path, "w") as f:
      json.dump(state, f, indent=1)
    print(f"[{time.time() - t0:6.1f}s] child died ({reason}); in flight: "
          f"{inflight or 'nothing'}", flush=True)
    if (time.time() - t0 > _BUDGET.value or state["outside"] > 1
        or attempt == _MAX_RESTARTS.value):
      break
    print(f"[{time.time() - t0:6.1f}s] restarting (attempt {attempt + 2})",
          flush=True)
  if state and os.path.exists(res_path):
    with open(res_path) as f:
      res = json.load(f)
    res["crashed"] = state["crashed"]
    res["crash_suspects"] = state["suspects"]
    if rc not in (0, 3):
      res["skipped"].append(f"everything after the last abort ({state.get('last_reason')})")
    write_outputs(res, out_dir, tag)
  return rc


def resume(b: Bench, path: str):
  """Loads the results a crashed child wrote, to continue after them."""
  with open(path) as f:
    d = json.load(f)
  b.res["ceilings"] = d.get("ceilings") or {}
  for key in ("tokamax", "w8a8", "errors", "skipped"):
    b.res[key] = d.get(key, [])
  if d.get("tokamax_skipped"):
    b.res["tokamax_skipped"] = d["tokamax_skipped"]
  for row in d.get("wo", []):
    b.rows[(row["kernel"], row["m"], row["k"], row["n"])] = row
  for k, n, m, us in d.get("bf16", []):
    b.bf16[(k, n, m)] = us
  b.done_chunks = set(d["meta"].get("done_chunks", []))
  b.res["meta"]["restarts"] = d["meta"].get("restarts", 0) + 1


def _import_kernels():
  import importlib  # pylint: disable=g-import-not-at-top
  wo = importlib.import_module("lowbit_jax.kernels.gpu_weight_only")
  w8 = importlib.import_module("lowbit_jax.kernels.gpu_w8a8")
  api = importlib.import_module("lowbit_jax.kernels._api")
  return wo, w8, api


def main(argv):
  del argv
  command = "PYTHONPATH=. python3 " + " ".join(
      a for a in sys.argv if a != "--child" and not a.startswith("--t0="))
  out_dir = _OUT_DIR.value
  if _SMOKE.value:
    # The interpreter runs multi-warpgroup kernels only with this flag (see
    # _gpu_common.check_interpreter_threads); jax reads it at backend start.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               "--xla_cpu_enable_concurrency_optimized_scheduler"
                               "=false").strip()
  if _MODE.value == "report":
    res, rows, cmds = None, {}, []
    runs, devices = [], {}
    only = {}
    for entry in _INPUTS.value:
      path, _, kernels = entry.partition("@")
      with open(path) as f:
        runs.append(json.load(f))
      if kernels:
        only[len(runs) - 1] = set(kernels.split("+"))
        have = {r["kernel"] for r in runs[-1].get("wo", [])}
        if not only[len(runs) - 1] <= have:
          raise SystemExit(f"--inputs {entry}: {path} has no weight-only rows of "
                           f"{sorted(only[len(runs) - 1] - have)} (it has {sorted(have)})")
      devices.setdefault(runs[-1]["meta"].get("device"), []).append(path)
    if len(devices) > 1:
      # Times from two GPU parts (an H100's against an H200's) cannot share
      # one table or one roofline: report each device's runs separately.
      raise SystemExit(
          "--mode=report: the inputs were measured on different devices ("
          + "; ".join(f"{dev}: {', '.join(ps)}" for dev, ps in devices.items())
          + "); pass one device's runs at a time")
    for i, d in enumerate(runs):
      cmds.append(d["meta"]["command"])
      if res is None:
        res = {**d, "wo": []}
      else:
        for key in ("tokamax", "w8a8", "skipped", "errors"):
          res[key] += d.get(key, [])
        if not res.get("ceilings"):
          res["ceilings"] = d.get("ceilings", {})
      for row in d.get("wo", []):
        if i in only and row["kernel"] not in only[i]:
          continue
        key = (row["kernel"], row["m"], row["k"], row["n"])
        if key not in rows:
          rows[key] = row
        else:  # the same row from two runs: keep every tiling timed
          rows[key]["variants"].update(row["variants"])
          for f_ in ("bf16_us", "xla_fused_us", "dequant_ref_us", "fallback_us"):
            if rows[key].get(f_) is None:
              rows[key][f_] = row.get(f_)
    rb = Bench(command)
    rb.res = res
    for row in rows.values():
      finish_row(rb, row)
    res["wo"] = list(rows.values())
    res["meta"]["report_command"] = command
    res["meta"]["commands"] = cmds
    wo, _, _ = _import_kernels()
    rb.rows = rows
    os.makedirs(out_dir, exist_ok=True)
    write_table(rb, wo, os.path.join(
        out_dir, wo.table_filename(res["meta"]["device"])))
    write_outputs(res, out_dir, _TAG.value)
    return
  isolate = (_ISOLATE.value == "true"
             or (_ISOLATE.value == "auto" and not _SMOKE.value))
  if isolate and not _CHILD.value and not _TOKAMAX_ONLY.value:
    # The parent never initializes the GPU (the child needs its memory).
    sys.exit(supervise(sys.argv))
  b = Bench(command)
  if _TOKAMAX_ONLY.value:
    os.makedirs(out_dir, exist_ok=True)
    try:
      run_tokamax(b)
    finally:
      write_outputs(b.res, out_dir, _TAG.value)
    return
  tune = _MODE.value in ("all", "tune")
  wo, w8, api = _import_kernels()
  res_path, state_path, inflight_path = _paths(out_dir, _TAG.value)
  if _CHILD.value:
    b.inflight_path = inflight_path
    if os.path.exists(state_path):
      with open(state_path) as f:
        state = json.load(f)
      b.crashed = {c["job"]: c["reason"] for c in state["crashed"]}
      b.suspects = set(state["suspects"])
      b.res["crashed"] = state["crashed"]
      if os.path.exists(res_path):
        resume(b, res_path)
        b.log(f"resumed after an abort: {sorted(b.done_chunks)} done; "
              f"skipping {sorted(b.crashed)}; alone first: {sorted(b.suspects)}")

  def flush():
    with b.lock:
      b.res["meta"]["elapsed_s"] = b.elapsed()
      b.res["wo"] = list(b.rows.values())
      b.res["bf16"] = [[k, n, m, us] for (k, n, m), us in b.bf16.items()]
      b.res["meta"]["done_chunks"] = sorted(b.done_chunks)
      if tune and b.rows:
        write_table(b, wo, os.path.join(
            out_dir, wo.table_filename(b.res["meta"]["device"])))
      write_outputs(b.res, out_dir, _TAG.value)

  def watchdog():
    time.sleep(max(1.0, _HARD.value - b.elapsed()))
    b.log("hard time limit: writing results and exiting")
    b.res["skipped"].append("everything after the hard limit "
                            f"({_HARD.value:.0f} s)")
    try:
      flush()
    finally:
      os._exit(3)  # pylint: disable=protected-access

  os.makedirs(out_dir, exist_ok=True)
  if not b.smoke:
    threading.Thread(target=watchdog, daemon=True).start()
  b.log(f"jax {b.jax.__version__} on {b.res['meta']['device']}")
  if b.smoke:
    shapes, batches, extra = [(2048, 256)], [1, 16], []
  else:
    shapes = [tuple(int(v) for v in s.split("x")) for s in _SHAPES.value]
    batches = [int(v) for v in _BATCHES.value]
    extra = sorted({(k, n) for _, k, n in BLOCK_8B if (k, n) not in shapes}
                   ) if _BLOCK8B.value else []
  cases = list(_KERNELS.value)
  for c in cases:
    if c not in WO_CASES:
      raise app.UsageError(f"unknown --kernels case {c!r}; one of {sorted(WO_CASES)}")
  decode = [m for m in batches if m <= 16]
  mid = [m for m in batches if 16 < m <= 256]
  big = [m for m in batches if m > 256]
  tune_m = [m for m in decode if m != 4]
  # Priority order (the time budget cuts the tail): every table row first
  # (decode, the 8B block, the peer, prefill, large M, W8A8) with the table's
  # or the default tiling, then the other candidate tilings (decode on the two
  # main shapes first).
  phases = [("base", shapes, decode)]
  if extra:
    phases.append(("base", extra, [1, 16]))
  phases.append(("tokamax", None, None))
  if mid:
    phases.append(("base", shapes, mid))
  if big:
    phases.append(("base", shapes, big))
  if _W8A8.value:
    phases.append(("w8a8", None, None))
  if tune:
    phases.append(("tune", shapes[:2], tune_m))
    phases.append(("tune", shapes[2:] + extra, tune_m))
    if mid:
      phases.append(("tune", shapes, mid))
    phases.append(("refine", shapes + extra, tune_m))
    if mid:
      phases.append(("refine", shapes, mid))
  only = set(_PHASES.value)
  if "fallback" in only:
    phases.append(("fallback", shapes, batches))
    if extra:
      phases.append(("fallback", extra, [1, 16]))
  if only:
    phases = [p for p in phases if p[0] in only]
  b.res["meta"]["phases"] = [(p, [f"{k}x{n}" for k, n in (sh or [])], ms)
                             for p, sh, ms in phases]
  try:
    if not b.res["ceilings"]:
      measure_ceilings(b)
    flush()
    for stage, what, ms in phases:
      if stage in b.done_chunks:
        continue
      if stage == "tokamax":
        if _TOKAMAX.value:
          run_tokamax_subprocess(b, out_dir)
      elif stage == "w8a8":
        if b.over_budget():
          b.res["skipped"].append("W8A8 (time budget)")
        else:
          run_w8a8(b, w8, api, tune)
      else:
        for (k, n) in what:
          chunk = f"{stage} {k}x{n} M={ms}"
          if chunk in b.done_chunks:
            continue
          if b.over_budget():
            b.res["skipped"].append(f"{chunk} (time budget)")
            continue
          try:
            run_shape(b, wo, api, k, n, ms, cases, stage)
          except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            b.error(chunk, e)
          b.done_chunks.add(chunk)
          flush()
      if stage in ("tokamax", "w8a8"):
        b.done_chunks.add(stage)
      flush()
  finally:
    flush()
    b.log(f"done in {b.elapsed():.0f} s; wrote {out_dir}/{_TAG.value}.md")
  # Last lines of the output: the target table.
  for line in target_rows(b.res):
    print(line)


if __name__ == "__main__":
  app.run(main)
