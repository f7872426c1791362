r"""Times quantize / dequantize / fake_quant (and its gradient) against the roofline.

For every format (int8/4/3/2 per channel and in groups of 128, uint8, fp8
e4m3/e5m2, fp6, fp4, NF4, MXFP8/6/4, MXINT8, NVFP4, binary, ternary) on one
bf16 ``[K, N]`` tensor with scales along axis 0 (as for a weight ``w[K, N]``),
and ``x * 2`` of the same tensor as the bandwidth ceiling in the same run:

* ``quantize(x)``, ``dequantize(q)``, ``fake_quant(x)``, and ``fwd+bwd``: the
  fake-quant value and its straight-through gradient for a given cotangent
  (``jax.vjp``), as one call.
* % of roofline: the bytes that must move (input read + output written: bf16
  in, packed codes + scales out, and back; fwd+bwd reads x and the cotangent
  and writes the value and the gradient, or where the gradient is the
  cotangent itself, as for formats that never clip, only reads x and writes
  the value: ``_primitive_formats.fwd_bwd_bytes``) over the ``x * 2``
  bandwidth, divided by the measured time.
* The jnp reference: the unfused implementation frozen in
  ``tests/core/_reference.py`` (what the library was before the fused
  rewrite; the tests check the library against it bit for bit), timed in the
  same run on the same tensor (skipped when ``tests/`` is not importable, e.g.
  outside a checkout).
* qwix's figure where qwix computes the same thing (symmetric integers, per
  channel or in groups; ``import qwix`` must work, else the column is empty:
  e.g. ``pip install --no-deps --target /tmp/qwix_site qwix==0.1.8`` and
  ``PYTHONPATH=/tmp/qwix_site:.``).
  qwix's integer scale is ``absmax / (qmax + 0.5)`` where ours is
  ``absmax / qmax``: the same work, not the same numbers.
* The real-mode matmul path that no kernel takes (``ops.dot_general(x,
  QArray w, mode="real", use_kernel="never")``) at several M, next to XLA's
  bf16 dot and qwix's ``dot_general`` on its own quantized weight.

Time per call: on GPU the device time from CUPTI
(``jax.experimental.mosaic.gpu.profiler.measure``, every kernel of a call
counted; median of ``--iters`` calls); elsewhere the wall-clock median of
``--iters`` calls after a warm-up call, and a primitive's timings (ours, the
reference, qwix; a matmul row's orders, XLA's bf16 dot and qwix) are taken
interleaved in ``--rounds`` rounds, the smallest round median kept, so that a
shared machine's load falls on all of them alike. Each item runs in its own try/except
(the error goes into the JSON), the JSON and markdown are rewritten after
every item, no item starts after ``--time_budget_s`` and a watchdog writes
what there is and exits at ``--hard_limit_s``.

Run (repository root)::

  PYTHONPATH=. python3 -m experiments.bench_primitives --smoke --out_dir=/tmp/smoke
                                   # every item on 256x256 in about a minute (CPU)
  PYTHONPATH=. python3 -m experiments.bench_primitives            # CPU or GPU

One GPU call (qwix 0.1.8 from ``../shared/wheels`` copied into a git-ignored
``.peer/`` named in the call's carry; without it the qwix columns stay empty.
Timing the jnp reference as well, the default, about doubles the run:
``--noreference`` leaves it out)::

  python3 -m pip install -q --no-deps --no-index --target /tmp/site .peer/qwix-*.whl
  PYTHONPATH=/tmp/site:. python3 -m experiments.bench_primitives \
      --time_budget_s=480 --hard_limit_s=540 \
      --baseline=benchmarks/primitives_h200.json --out_dir=$OUT

Writes ``primitives_<tag>.json`` and ``primitives_<tag>.md`` to ``--out_dir``
(tag: ``h200`` / ``h100`` / ``gpu`` / ``cpu`` from the device, or ``--tag``).
``--baseline=old.json`` adds an earlier run's times (e.g. the same command on
an older commit) and the speedups; ``--report=run.json`` rebuilds the
markdown from a JSON without timing anything.
"""
from __future__ import annotations

import contextlib

import json
import math
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
from experiments._primitive_formats import (FORMATS, fake_quant_fwd_bwd, matmul_formats,
                                            fwd_bwd_bytes, fwd_bwd_passes)

_SHAPE = flags.DEFINE_string("shape", "", "K x N of the tensor (default: 8192x8192 "
                             "on GPU/TPU, 2048x2048 on CPU)")
_FORMATS = flags.DEFINE_list("formats", [], "format ids to time (default: all)")
_SECTIONS = flags.DEFINE_list("sections", ["prims", "matmul", "qat"],
                               "what to run: prims, matmul, qat (the QAT step)")
_MM_KN = flags.DEFINE_string("matmul_kn", "", "K x N of the matmul weight "
                             "(default: 8192x8192 on GPU/TPU, 2048x2048 on CPU)")
_MM_FMT = flags.DEFINE_list("matmul_formats", [], "matmul weight ids (default: "
                            "int4_g128,int4,int8,fp8_e4m3; also int4_g32, "
                            "int4_g64, int8_g32, fp4_e2m1 and the prims table's "
                            "ids)")
_MM_M = flags.DEFINE_list("matmul_m", [], "M values (default: 1,16,256,4096 on "
                          "GPU/TPU, 1,16,256,2048 on CPU)")
_ITERS = flags.DEFINE_integer("iters", 0, "timed calls per measurement (default: "
                              "30 on GPU/TPU, 5 on CPU)")
_ROUNDS = flags.DEFINE_integer("rounds", 0, "interleaved rounds of a primitive's "
                               "timings (ours, the reference, qwix: each takes "
                               "--iters calls a round, the cell is the smallest "
                               "round median; default: 3 on CPU, whose load moves "
                               "between one timing and the next, 1 on GPU/TPU)")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")
_TAG = flags.DEFINE_string("tag", "", "output file stem suffix (default: device)")
_BUDGET = flags.DEFINE_float("time_budget_s", 330.0,
                             "start no new item after this many seconds")
_HARD = flags.DEFINE_float("hard_limit_s", 0.0, "write what there is and exit at "
                           "this many seconds (default: budget + 30)")
_BASELINE = flags.DEFINE_string("baseline", "", "JSON of an earlier run (e.g. of an "
                                "older commit): the markdown adds its times and the "
                                "speedup over it")
_REFERENCE = flags.DEFINE_bool("reference", True, "also time the unfused jnp "
                               "reference (tests/core/_reference.py) when importable")
_REPORT = flags.DEFINE_string("report", "", "rebuild the markdown from this JSON "
                              "(with --baseline) without timing anything")
_RECOUNT = flags.DEFINE_bool(
    "recount_fwd_bwd", False, "with --report: recount the fwd+bwd rows' bytes "
    "with _primitive_formats.fwd_bwd_bytes (the cotangent and gradient only "
    "where the gradient is not the cotangent itself; runs before session 40 "
    "counted them always) and their % of the roofline from the row's time")
_PATCH = flags.DEFINE_list("patch", [], "with --report: JSONs of later partial "
                           "runs whose primitive rows (format, op) replace the "
                           "report's; the report JSON is rewritten with a note "
                           "naming each patch's command and start")
_SMOKE = flags.DEFINE_bool("smoke", False, "a dry run of every item in seconds: "
                           "256x256 tensors, matmul M in {1, 16}, 2 calls each, "
                           "tag 'smoke' (checks the script end to end on CPU)")

T0 = time.time()
L2_BYTES = 50 * 2 ** 20  # H100/H200 L2: matmul weight sets rotate past it

class Jobs:
  """Timings to take together (``Bench.time_jobs``): calling it registers
  ``f(*args)`` and returns its index in the results."""

  def __init__(self):
    self.items = []

  def __call__(self, f, *args, reps: int = 1, stats: dict | None = None) -> int:
    self.items.append((f, args, reps, stats))
    return len(self.items) - 1


class Bench:
  """Results, the clock, the timer and the writers."""

  def __init__(self, command: str):
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.backend = jax.default_backend()
    dev = jax.devices()[0]
    self.device = getattr(dev, "device_kind", str(dev))
    self.gpu = self.backend == "gpu"
    self.iters = _ITERS.value or (2 if _SMOKE.value else
                                  5 if self.backend == "cpu" else 30)
    self.rounds = _ROUNDS.value or (3 if self.backend == "cpu" else 1)
    tag = _TAG.value or ("smoke" if _SMOKE.value else "")
    if not tag:
      kind = self.device.lower()
      tag = ("h200" if "h200" in kind else "h100" if "h100" in kind else
             "cpu" if self.backend == "cpu" else self.backend)
    self.stem = os.path.join(_OUT_DIR.value, f"primitives_{tag}")
    self.res = dict(command=command, backend=self.backend, device=self.device,
                    host=platform.node(), cpu_count=os.cpu_count(),
                    jax=jax.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                    timer=("CUPTI device time per call (median)" if self.gpu else
                           "wall-clock per call (median, block_until_ready)"),
                    iters=self.iters, rounds=self.rounds, prims=[], matmul=[],
                    errors=[], notes=[],
                    loadavg_start=_loadavg())
    self.lock = threading.Lock()

  def over_budget(self) -> bool:
    return time.time() - T0 > _BUDGET.value

  def time_us(self, f, *args, reps: int = 1, stats: dict | None = None) -> float:
    """Median microseconds of one call of jit(f)(*args), divided by reps.

    ``stats`` (a dict) receives what the compiled program launches: ``kernels``
    (top-level ops of the optimized HLO that run on the device: fusions,
    copies, transposes, custom calls...), ``transposes`` (transpose ops
    anywhere in it), and on GPU ``top_kernels``: the costliest kernels of one
    call by CUPTI device time (name, us).
    """
    jf = self._compiled(f, args, stats)
    if self.gpu:
      try:
        from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
        us = _cupti.median_ms(jf, *args, iters=self.iters)
        if stats is not None:
          _, kt = profiler.measure(jf, aggregate=False)(*args)
          agg = {}
          for name, t in kt or []:
            agg[str(name)[:80]] = agg.get(str(name)[:80], 0.0) + float(t) * 1e3 / reps
          stats["top_kernels"] = sorted(([k, round(v, 1)] for k, v in agg.items()),
                                        key=lambda kv: -kv[1])[:4]
        return us * 1e3 / reps
      except Exception as e:  # pylint: disable=broad-except
        self.note(f"CUPTI timing failed ({type(e).__name__}: {e}); wall clock used")
    return self._wall_us(jf, args, reps)

  def _compiled(self, f, args, stats: dict | None):
    """jit(f) compiled for args, its HLO counts into ``stats``, called once."""
    jf = self.jax.jit(f).lower(*args).compile()
    if stats is not None:
      stats.update(hlo_stats(jf.as_text()))
    self.jax.block_until_ready(jf(*args))
    return jf

  def _wall_us(self, jf, args, reps: int) -> float:
    """Wall-clock median of ``self.iters`` calls, us, divided by reps."""
    ts = []
    for _ in range(self.iters):
      t = time.perf_counter()
      self.jax.block_until_ready(jf(*args))
      ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6 / reps

  def time_jobs(self, jobs: "Jobs") -> list:
    """Median microseconds per call of each job (``Jobs``), the jobs timed
    interleaved: ``self.rounds`` rounds of ``self.iters`` calls of each in
    turn, the smallest round median kept. On a shared CPU, load from other
    processes then falls on ours and the peers alike (timed one after the
    other, a busy second made the reference look 2x faster than the same
    computation of ours). With one round (GPU: CUPTI device time) each job is
    ``time_us``."""
    if self.rounds <= 1 or self.gpu:
      return [self.time_us(f, *args, reps=reps, stats=st)
              for f, args, reps, st in jobs.items]
    compiled = [(self._compiled(f, args, st), args, reps)
                for f, args, reps, st in jobs.items]
    best = [float("inf")] * len(compiled)
    for _ in range(self.rounds):
      for i, (jf, args, reps) in enumerate(compiled):
        best[i] = min(best[i], self._wall_us(jf, args, reps))
    return best

  def note(self, msg: str):
    print(msg, flush=True)
    if msg not in self.res["notes"]:
      self.res["notes"].append(msg)

  def item(self, section: str, name: str, fn):
    """Runs fn() -> dict, records it (or its error), rewrites the outputs."""
    if self.over_budget():
      self.res["errors"].append(dict(item=name, error="skipped: time budget"))
      return None
    t = time.time()
    try:
      row = fn()
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      row = None
      self.res["errors"].append(dict(item=name, error=f"{type(e).__name__}: {e}"[:500]))
    if row is not None:
      row["item_s"] = round(time.time() - t, 1)
      self.res[section].append(row)
      print(json.dumps(row), flush=True)
    self.write()
    return row

  def write(self):
    with self.lock:
      os.makedirs(_OUT_DIR.value, exist_ok=True)
      self.res["elapsed_s"] = round(time.time() - T0, 1)
      self.res["loadavg_end"] = _loadavg()
      with open(self.stem + ".json", "w") as f:
        json.dump(self.res, f, indent=1)
      with open(self.stem + ".md", "w") as f:
        f.write(markdown(self.res))


def _loadavg():
  """The host's 1-minute load average (how busy a shared machine was), or None."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


_NO_KERNEL = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def hlo_stats(text: str) -> dict:
  """What an optimized HLO module launches (``compiled.as_text()``).

  ``kernels``: top-level ops of the entry computation that do work on the
  device (fusions, copies, transposes, reduces, custom calls; not parameters,
  constants, tuples or bitcasts); ``transposes``: transpose ops anywhere in
  the module (inside fusions too).
  """
  import re  # pylint: disable=g-import-not-at-top
  i = text.find("\nENTRY")
  entry = text[i:] if i >= 0 else text
  n = 0
  for line in entry.split("\n")[1:]:
    m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .+? ([a-z][\w\-]*)\(", line)
    if m and m.group(1) not in _NO_KERNEL:
      n += 1
  return dict(kernels=n, transposes=len(re.findall(r"\btranspose\(", text)))


def _shape(flag: str, backend: str, gpu_default: str, cpu_default: str) -> tuple:
  if _SMOKE.value and not flag:
    return 256, 256
  s = flag or (cpu_default if backend == "cpu" else gpu_default)
  k, n = (int(v) for v in s.lower().split("x"))
  return k, n


def _import_qwix():
  try:
    import qwix  # pylint: disable=g-import-not-at-top
    return qwix
  except Exception:  # pylint: disable=broad-except
    return None


def _import_reference():
  """The frozen unfused jnp implementation (tests/core/_reference.py), or None."""
  try:
    from tests.core import _reference  # pylint: disable=g-import-not-at-top
    return _reference
  except Exception:  # pylint: disable=broad-except
    return None


def _ref_time(timer, ref, spec, op: str, x, g):
  """The reference implementation doing the same job as ours, through
  ``timer`` (``Bench.time_us``, or a ``Jobs`` to time it with ours)."""
  import jax  # pylint: disable=g-import-not-at-top
  if op == "quantize":
    return timer(lambda v: ref.quantize(v, spec), x)
  if op == "dequantize":
    q = jax.jit(lambda v: ref.quantize(v, spec))(x)
    return timer(ref.dequantize, q)
  if op == "fake_quant":
    return timer(lambda v: ref.fake_quant(v, spec), x)
  return timer(fake_quant_fwd_bwd(ref.fake_quant, spec), x, g)


def _qwix_cfg(fmt: str, kw: dict):
  """qwix.quantize keywords for the same job on x[K, N] (scales along K), or None."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  qt = {"int8": jnp.int8, "int4": jnp.int4, "int3": "int3", "int2": "int2"}.get(fmt)
  if qt is None:
    return None
  g = kw.get("group_size")
  # qwix names the axes that get their own scales (ours: the axis that shares).
  return dict(qtype=qt, channelwise_axes=(1,), tiled_axes={0: g} if g else {})


def _prims_data(b: Bench):
  """The tensor, the cotangent and the bandwidth ceiling (measured once)."""
  if getattr(b, "prims_data", None) is not None:
    return b.prims_data
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k, n = _shape(_SHAPE.value, b.backend, "8192x8192", "2048x2048")
  b.res["prims_shape"] = [k, n]
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (k, n), jnp.float32).astype(jnp.bfloat16)
  g = jax.random.normal(kg, (k, n), jnp.float32).astype(jnp.bfloat16)
  xbytes = 2 * k * n

  def ceiling():
    us = b.time_us(lambda v: v * 2, x)
    b.res["bandwidth_GBps"] = 2 * xbytes / us / 1e3
    return dict(name="x * 2", us=round(us, 2), bytes=2 * xbytes,
                GBps=round(2 * xbytes / us / 1e3, 1))

  b.item("prims", "x*2", ceiling)
  b.prims_data = (x, g, xbytes)
  return b.prims_data


def sec_prims(b: Bench, qwix, ids, ref=None):
  """quantize / dequantize / fake_quant / fwd+bwd of the formats ``ids``."""
  import jax  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  x, g, xbytes = _prims_data(b)
  bw = b.res.get("bandwidth_GBps")
  for fid in ids:
    fmt, kw = FORMATS[fid]
    spec = lb.QuantSpec(fmt, axis=0, **kw)
    qw_cfg = _qwix_cfg(fmt, kw) if qwix is not None else None

    def one(op, spec=spec, qw_cfg=qw_cfg):
      # The QArray's size from its shapes alone (no compile).
      qbytes = jax.eval_shape(lambda v: lb.quantize(v, spec), x).nbytes
      if op == "quantize":
        f, args, nbytes = (lambda v: lb.quantize(v, spec)), (x,), xbytes + qbytes
      elif op == "dequantize":
        q = jax.jit(lambda v: lb.quantize(v, spec))(x)
        f, args, nbytes = lb.dequantize, (q,), qbytes + xbytes
      elif op == "fake_quant":
        f, args, nbytes = (lambda v: lb.fake_quant(v, spec)), (x,), 2 * xbytes
      else:
        f = fake_quant_fwd_bwd(lb.fake_quant, spec)
        args, nbytes = (x, g), fwd_bwd_bytes(f, x, g)
      st = {}
      jobs = Jobs()
      jobs(f, *args, stats=st)
      i_ref = None if ref is None else _ref_time(jobs, ref, spec, op, x, g)
      i_qw = None if qw_cfg is None else _qwix_time(jobs, qwix, qw_cfg, op, x, g)
      t = b.time_jobs(jobs)
      us = t[0]
      row = dict(format=fid, op=op, us=round(us, 2), bytes=nbytes,
                 roofline_pct=round(100 * nbytes / bw / 1e3 / us, 1) if bw else None,
                 **st)
      if i_ref is not None:
        row["ref_us"] = round(t[i_ref], 2)
      if i_qw is not None:
        row["qwix_us"] = round(t[i_qw], 2)
      return row

    for op in ("quantize", "dequantize", "fake_quant", "fwd+bwd"):
      b.item("prims", f"{fid} {op}", lambda op=op, one=one: one(op))


def _qwix_time(timer, qwix, cfg: dict, op: str, x, g):
  """qwix doing the same job: quantize, dequantize, qdq with a straight-through
  gradient (x + stop_gradient(qdq - x): absmax scales clip nothing)."""
  import jax  # pylint: disable=g-import-not-at-top

  def fq(v):
    return v + jax.lax.stop_gradient(qwix.dequantize(qwix.quantize(v, **cfg)) - v)

  if op == "quantize":
    return timer(lambda v: qwix.quantize(v, **cfg), x)
  if op == "dequantize":
    q = jax.jit(lambda v: qwix.quantize(v, **cfg))(x)
    return timer(qwix.dequantize, q)
  if op == "fake_quant":
    return timer(fq, x)

  def fb(v, ct):
    y, vjp = jax.vjp(fq, v)
    return y, vjp(ct)[0]
  return timer(fb, x, g)


def _reference_order(ops, m, both, ct, grouped=False):
  """Which order ``ops.dot_general``'s reference dot runs at M rows
  (``grouped``: the group-batched dot takes the weight at this M)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  if both and m <= ops._CODES_IN_DOT_MAX_ROWS:
    return "codes"
  if grouped:
    return "groups"
  return "materialize" if ct != jnp.float32 and m >= ops._MATERIALIZE_MIN_ROWS else "fused"


def _groups_apply(ops, x, q, dn, ct, m) -> bool:
  """Whether ``ops._group_scaled_dot`` takes ``q`` at ``m`` rows (under the
  module's thresholds as they are when called)."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  return jax.eval_shape(
      lambda a, w: ops._group_scaled_dot(a, w, dn, ct, m, None), x, q) is not None


@contextlib.contextmanager
def _order_forced(ops, name):
  """Forces the reference dot's order (module thresholds) for one timing."""
  # pylint: disable=protected-access
  old = (ops._CODES_IN_DOT_MAX_ROWS, ops._MATERIALIZE_MIN_ROWS,
         ops._GROUP_DOT_ROWS_PER_GROUP)
  ops._CODES_IN_DOT_MAX_ROWS = -1 if name != "codes" else 1 << 62
  ops._MATERIALIZE_MIN_ROWS = 0 if name == "materialize" else 1 << 62
  ops._GROUP_DOT_ROWS_PER_GROUP = 0 if name == "groups" else 1 << 62
  try:
    yield
  finally:
    (ops._CODES_IN_DOT_MAX_ROWS, ops._MATERIALIZE_MIN_ROWS,
     ops._GROUP_DOT_ROWS_PER_GROUP) = old


def sec_matmul(b: Bench, qwix):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  k, n = _shape(_MM_KN.value, b.backend, "8192x8192", "2048x2048")
  ms = [int(m) for m in (_MM_M.value or (["1", "16"] if _SMOKE.value else
                                          ["1", "16", "256", "2048"] if b.backend == "cpu"
                                          else ["1", "16", "256", "4096"]))]
  b.res["matmul_kn"] = [k, n]
  w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(jnp.bfloat16)
  dn_nt = (((1,), (1,)), ((), ()))  # x[M, K] . W[N, K] (our K-major QArray)
  dn_kn = (((1,), (0,)), ((), ()))  # x[M, K] . W[K, N]
  for fid, (fmt, kw) in matmul_formats(_MM_FMT.value).items():
    spec = lb.QuantSpec(fmt, **kw)
    prep = jax.jit(lambda v, spec=spec: lb.ops.prepare_weight(v, spec, 0))
    qbytes = jax.eval_shape(prep, w).nbytes
    # Enough distinct weight sets that a call does not read its weight from L2.
    reps = 1 if not b.gpu else max(1, min(8, math.ceil(2 * L2_BYTES / qbytes)))
    ws = [w + i for i in range(reps)]
    qws = [prep(v) for v in ws]
    qcfg = _qwix_cfg(fmt, kw) if qwix is not None else None
    qprep = None if qcfg is None else jax.jit(lambda v, c=qcfg: qwix.quantize(v, **c))
    qq = [qprep(v) for v in ws] if qprep is not None else None
    for m in ms:
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)

      def run(m=m, x=x, qws=qws, ws=ws, qq=qq, fid=fid, reps=reps):
        st = {}

        def ours_in(name=None):
          def f(x_, ws_):
            # The order is the module thresholds' at trace time.
            with (_order_forced(lb.ops, name) if name else contextlib.nullcontext()):
              return [lb.ops.dot_general(x_, q, dn_nt, mode="real", use_kernel="never")
                      for q in ws_]
          return f

        jobs = Jobs()
        jobs(ours_in(), x, qws, reps=reps, stats=st)
        jobs(lambda x_, ws_: [x_ @ v for v in ws_], x, ws, reps=reps)
        # Every order of the reference dot this weight allows: codes into the
        # dot with the scales on its output, a dot batched over the weight's
        # scale groups (ops._group_scaled_dot), dequantize fused into the
        # dot, dequantize materialized before the dot
        # (ops._MATERIALIZE_MIN_ROWS).
        ct = lb.ops._compute_dtype(jnp.bfloat16)  # pylint: disable=protected-access
        both = lb.ops._scale_after_dot(qws[0], dn_nt, ct) is not None  # pylint: disable=protected-access
        grouped = _groups_apply(lb.ops, x, qws[0], dn_nt, ct, m)
        with _order_forced(lb.ops, "groups"):
          can_group = _groups_apply(lb.ops, x, qws[0], dn_nt, ct, m)
        cur = _reference_order(lb.ops, m, both, ct, grouped)
        others = {}
        names = (("codes",) if both else ()) + (("groups",) if can_group else ()) + (
            "fused", "materialize")
        for name in names:
          if name == cur or (name == "materialize" and ct == jnp.float32):
            continue
          others[name] = jobs(ours_in(name), x, qws, reps=reps)
        i_qw = None
        if qq is not None:
          i_qw = jobs(lambda x_, ws_: [qwix.dot_general(x_, q, dn_kn) for q in ws_],
                      x, qq, reps=reps)
        t = b.time_jobs(jobs)
        ours, bf16 = t[0], t[1]
        orders = {cur: ours, **{name: round(t[i], 2) for name, i in others.items()}}
        row = dict(weight=fid, m=m, k=k, n=n, ours_us=round(ours, 2),
                   xla_bf16_us=round(bf16, 2), vs_bf16=round(bf16 / ours, 3),
                   kernels_per_weight=round(st["kernels"] / reps, 1),
                   top_kernels=st.get("top_kernels"), order=cur,
                   orders_us=orders, best_order=min(orders, key=orders.get))
        if i_qw is not None:
          row.update(qwix_us=round(t[i_qw], 2), vs_qwix=round(t[i_qw] / ours, 3))
        return row

      b.item("matmul", f"mm {fid} M={m}", run)


# The QAT step variants of experiments/bench_qat.py this table reports: fake
# quantization of every projection of the decoder LM (base config, bf16
# compute), as a ratio to the unquantized step.
QAT_VARIANTS = ("int8 W+A (STE)", "fp8 W+A", "MXFP4 W+A", "NVFP4 W+A",
                "MXFP4 W (weight-only)")


def sec_qat(b: Bench, hard: float):
  """The decoder LM's QAT training step per format vs the bf16 step.

  Runs experiments/bench_qat.py in a child process (a fresh GPU allocator; its
  own CUPTI timing) for the variants of ``QAT_VARIANTS`` and copies its rows.
  """
  import shlex  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  left = hard - (time.time() - T0) - 5
  if b.over_budget() or left < 30:
    b.res["errors"].append(dict(item="qat step", error="skipped: time budget"))
    return
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "qat.json")
    cmd = [sys.executable, "-m", "experiments.bench_qat", "--only",
           ",".join(QAT_VARIANTS), "--iters", "5", "--noqwix", "--out", out]
    if _SMOKE.value or not b.gpu:
      cmd.append("--smoke")
    t = time.time()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left,
                            check=False)
      err = None if proc.returncode == 0 else proc.stderr[-800:]
    except subprocess.TimeoutExpired:
      err = f"bench_qat did not finish in {left:.0f} s"
    rows = []
    if os.path.exists(out):
      with open(out) as f:
        data = json.load(f)
      rows = data.get("rows", data) if isinstance(data, dict) else data
    shown = ["python3"] + [("..." if c == out else c) for c in cmd[1:]]
    b.res["qat"] = dict(command=shlex.join(shown),
                        rows=rows, seconds=round(time.time() - t, 1),
                        model="LlamaConfig." + ("smoke" if "--smoke" in cmd else "base"))
    if err:
      b.res["errors"].append(dict(item="qat step", error=err))
  b.write()


def markdown(res: dict) -> str:
  """The results as markdown tables."""
  out = [f"# Primitives: {res['device']} ({res['backend']})", "",
         f"Command: `{res['command']}`  ", f"jax {res['jax']}, {res['timer']}, "
         f"{res['iters']} calls"
         + (f" a round, {res['rounds']} interleaved rounds (ours, the reference, "
            "qwix; the smallest round median)" if res.get("rounds", 1) > 1 else "")
         + f", started {res['started']}, host {res['host']} "
         f"({res['cpu_count']} CPUs)."
         + (f" Host load average (1 min): {res['loadavg_start']} at the start, "
            f"{res.get('loadavg_end')} at the end (a load above the CPU count "
            "means other jobs shared the machine and the times are inflated)."
            if res.get("loadavg_start") is not None else ""), ""]
  prims = res.get("prims", [])
  ceil = next((r for r in prims if r.get("name") == "x * 2"), None)
  if ceil:
    k, n = res.get("prims_shape", ["?", "?"])
    out += [f"bf16 [{k}, {n}] tensor, scales along axis 0. Bandwidth ceiling "
            f"(`x * 2`, same run): {ceil['us']} us, {ceil['GBps']} GB/s. Each cell: "
            "our time in us (% of roofline: bytes that must move over that "
            "bandwidth), then `Nk`: the N device ops (kernels) the compiled "
            "program launches; then, where timed in the same run, `ref`: the "
            "unfused jnp reference (tests/core/_reference.py) and `qwix`: qwix "
            f"{res.get('qwix', '')} where it does the same job; `(Nx)` is "
            "their time over ours (> 1: ours is faster).", ""]
  ops = ("quantize", "dequantize", "fake_quant", "fwd+bwd")
  rows = {}
  for r in prims:
    if "format" in r:
      rows.setdefault(r["format"], {})[r["op"]] = r
  if rows:
    out += ["| format | " + " | ".join(ops) + " |", "|---" * (len(ops) + 1) + "|"]
    for fid, d in rows.items():
      cells = []
      for op in ops:
        r = d.get(op)
        if r is None:
          cells.append("")
          continue
        c = f"{r['us']:.0f} ({r['roofline_pct']:.0f}%)" if r.get("roofline_pct") \
            else f"{r['us']:.0f}"
        if r.get("kernels") is not None:
          c += f" {r['kernels']}k"
        for key, label in (("ref_us", "ref"), ("qwix_us", "qwix")):
          if r.get(key):
            c += f" / {label} {r[key]:.0f} ({r[key] / r['us']:.1f}x)"
        cells.append(c)
      out.append(f"| {fid} | " + " | ".join(cells) + " |")
    out.append("")
  mm = res.get("matmul", [])
  if mm:
    k, n = res.get("matmul_kn", ["?", "?"])
    out += [f"Real-mode matmul without a kernel, x[M, {k}] bf16 @ W[{k}, {n}] "
            "(`ops.dot_general(x, QArray, mode='real', use_kernel='never')`), us per "
            "call; ratios > 1 mean ours is faster.", "",
            "| weight | M | ours | XLA bf16 | bf16 / ours | qwix | qwix / ours | "
            "codes in dot | group dot | fused | materialized |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in mm:
      od = r.get("orders_us") or {}
      if not od and r.get("other_order_us") is not None:  # runs before the three orders
        od = {"codes" if r.get("order") != "codes in the dot" else "fused": r["other_order_us"]}
      cells = [f"{od[o]:.0f}" if o in od else ""
               for o in ("codes", "groups", "fused", "materialize")]
      out.append(f"| {r['weight']} | {r['m']} | {r['ours_us']:.0f} | "
                 f"{r['xla_bf16_us']:.0f} | {r['vs_bf16']:.2f} | "
                 f"{r.get('qwix_us', '')} | {r.get('vs_qwix', '')} | "
                 + " | ".join(cells) + " |")
    out += ["", "Ours runs the order in the JSON's `order`; the last four columns "
            "time every order the weight allows: per-channel codes (8-bit, or "
            "int4 as XLA's 4-bit dtype; E2M1 only where `ops._NATIVE_4BIT_DTYPES` "
            "lists it, which since session 45 it does not) into the "
            "16-bit dot with the scales on its output (`ops._CODES_IN_DOT_MAX_ROWS`), "
            "group-scaled codes into a dot batched over the groups, their "
            "scaled partials summed (`ops._group_scaled_dot`; runs before "
            "session 44 lack it), "
            "the dequantize fused into the dot, and the dequantize written out "
            "before the dot (`ops._MATERIALIZE_MIN_ROWS`). On CPU the reference dot "
            "runs in float32 and dequantizes first."]
    out.append("")
  qat = res.get("qat")
  if qat and qat.get("rows"):
    out += [f"QAT training step of the decoder LM ({qat['model']}, params float32, "
            "compute bf16, AdamW; every projection fake-quantized), device time per "
            f"step and its ratio to the unquantized step; `{qat['command']}`.", "",
            "| variant | us / step | vs bf16 |", "|---|---|---|"]
    for r in qat["rows"]:
      if r.get("lib", "lowbit_jax") != "lowbit_jax":
        continue
      ratio = r.get("ratio")
      us = f"{r['us']:.0f}" if r.get("us") else "-"
      out.append(f"| {r['name']} | {us} | "
                 + (f"{ratio:.3f}x |" if ratio else ("1.000x |" if r["name"].startswith(
                     "bf16") else f"{r.get('error', '')[:80]} |")))
    out.append("")
  base = res.get("baseline")
  if base:
    old = {(r["format"], r["op"]): r["us"] for r in base.get("prims", []) if "format" in r}
    cmd = base.get("command")
    how = (f"its command `{cmd}`" if cmd and cmd != res.get("command")
           else "same command")
    out += [f"Against the baseline run ({base.get('label', '')}: {how}, "
            f"jax {base.get('jax')}, started {base.get('started')}): baseline us -> "
            "this run's us (speedup).", "",
            "| format | " + " | ".join(ops) + " |", "|---" * (len(ops) + 1) + "|"]
    for fid, d in rows.items():
      cells = []
      for op in ops:
        r, o = d.get(op), old.get((fid, op))
        cells.append(f"{o:.0f} -> {r['us']:.0f} ({o / r['us']:.1f}x)" if r and o else "")
      out.append(f"| {fid} | " + " | ".join(cells) + " |")
    bmm = {(r["weight"], r["m"]): r["ours_us"] for r in base.get("matmul", [])}
    if mm and bmm:
      out += ["", "| matmul weight | M | baseline ours | this run ours |",
              "|---|---|---|---|"]
      for r in mm:
        o = bmm.get((r["weight"], r["m"]))
        if o:
          out.append(f"| {r['weight']} | {r['m']} | {o:.0f} | {r['ours_us']:.0f} |")
    out.append("")
  if res.get("errors"):
    out += ["Errors and skipped items:", ""]
    out += [f"- {e['item']}: {e['error']}" for e in res["errors"]]
    out.append("")
  if res.get("backend") == "cpu":
    out += ["On CPU the `x * 2` ceiling is not a memory bound: XLA's CPU "
            "elementwise bf16 arithmetic goes through float32 and this shared "
            "2-core machine's load moves it by 2-4x between runs, so the % column "
            "is only indicative here; compare the times.", ""]
  if res.get("notes"):
    out += ["Notes:", ""] + [f"- {s}" for s in res["notes"]] + [""]
  return "\n".join(out)


def _load_baseline(path: str):
  with open(path) as f:
    base = json.load(f)
  base["label"] = os.path.basename(path)
  return {k: base.get(k) for k in ("prims", "matmul", "jax", "started", "label",
                                   "command")}


def patch_rows(res: dict, path: str):
  """Replaces ``res``'s primitive rows (same format and op) and matmul rows
  (same weight and M) by those of the run in ``path``, new ones appended, and
  notes which rows came from it. Both runs must have timed the same tensor
  (and, for matmul rows, the same weight shape) on the same kind of device."""
  with open(path) as f:
    new = json.load(f)
  keys = [("device", None), ("prims_shape", "prims"), ("matmul_kn", "matmul")]
  for key, section in keys:
    if section is not None and not new.get(section):
      continue  # a run without that section says nothing about its shape
    if new.get(key) != res.get(key):
      raise ValueError(f"--patch {path}: its {key} {new.get(key)!r} differs from "
                       f"the report's {res.get(key)!r}; rows of different runs "
                       "only merge for the same device and tensor")
  taken = []
  for section, fields in (("prims", ("format", "op")), ("matmul", ("weight", "m"))):
    rows = res.setdefault(section, [])
    where = {tuple(r.get(f) for f in fields): i for i, r in enumerate(rows)}
    for r in new.get(section, []):
      if fields[0] not in r or ("us" not in r and "ours_us" not in r):
        continue  # the ceiling row and failed items stay the report's
      key = tuple(r[f] for f in fields)
      if key in where:
        rows[where[key]] = r
      else:
        rows.append(r)
      taken.append(" ".join(str(v) for v in key) + (" (matmul)" if section == "matmul" else ""))
  res.setdefault("notes", []).append(
      f"rows from a later run ({new.get('started')}, `{new.get('command')}`): "
      + ", ".join(taken))


def recount_fwd_bwd(res: dict) -> list:
  """The fwd+bwd rows' bytes (``fwd_bwd_passes`` times the run's tensor) and
  % of the roofline, from each row's own time and the run's bandwidth;
  notes it. Returns the formats whose count changed."""
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  k, n = res["prims_shape"]
  xbytes = k * n * 2  # the bf16 tensor the run timed
  bw = res.get("bandwidth_GBps")
  changed = []
  for r in res.get("prims", []):
    if r.get("op") != "fwd+bwd" or r.get("format") not in FORMATS:
      continue
    fmt, kw = FORMATS[r["format"]]
    nbytes = fwd_bwd_passes(lb.QuantSpec(fmt, axis=0, **kw)) * xbytes
    if nbytes != r.get("bytes"):
      changed.append(r["format"])
    r["bytes"] = nbytes
    if bw and r.get("us"):
      r["roofline_pct"] = round(100 * nbytes / bw / 1e3 / r["us"], 1)
  res.setdefault("notes", []).append(
      "fwd+bwd bytes recounted (`--recount_fwd_bwd`): x read and the value "
      "written, plus the cotangent read and the gradient written only where the "
      "gradient is not the cotangent itself; changed for "
      + (", ".join(changed) or "none"))
  return changed


def main(argv):
  del argv
  if _REPORT.value:
    with open(_REPORT.value) as f:
      res = json.load(f)
    if _PATCH.value or _RECOUNT.value:
      for path in _PATCH.value:
        try:
          patch_rows(res, path)
        except ValueError as e:
          raise app.UsageError(str(e)) from None
      if _RECOUNT.value:
        recount_fwd_bwd(res)
      tmp = _REPORT.value + ".tmp"  # the report is replaced only once written
      with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
      os.replace(tmp, _REPORT.value)
    if _BASELINE.value:
      res["baseline"] = _load_baseline(_BASELINE.value)
    with open(os.path.splitext(_REPORT.value)[0] + ".md", "w") as f:
      f.write(markdown(res))
    return
  command = "python3 -m experiments.bench_primitives " + " ".join(sys.argv[1:])
  b = Bench(command.strip())
  hard = _HARD.value or _BUDGET.value + 30

  def watchdog():
    time.sleep(max(1.0, hard - (time.time() - T0)))
    b.note(f"hard limit {hard:.0f} s reached: results so far written")
    b.write()
    os._exit(3)  # pylint: disable=protected-access

  threading.Thread(target=watchdog, daemon=True).start()
  if _BASELINE.value:
    b.res["baseline"] = _load_baseline(_BASELINE.value)
  qwix = _import_qwix()
  if qwix is None:
    b.note("qwix is not importable here: no qwix column")
  else:
    b.res["qwix"] = getattr(qwix, "__version__", "?")
  # The six formats, then the matmul table, then the other formats:
  # what a time budget cuts off is the least needed.
  ids = _FORMATS.value or list(FORMATS)
  for fid in ids:
    if fid not in FORMATS:
      raise app.UsageError(f"--formats: unknown format id {fid!r}; known: "
                           f"{', '.join(FORMATS)}")
  try:
    matmul_formats(_MM_FMT.value)
  except ValueError as e:
    raise app.UsageError(f"--matmul_formats: {e}") from None
  ref = _import_reference() if _REFERENCE.value else None
  if ref is None:
    b.note("the jnp reference (tests/core/_reference.py) is not timed here")
  if "prims" in _SECTIONS.value:
    sec_prims(b, qwix, ids[:6], ref)
  if "matmul" in _SECTIONS.value:
    sec_matmul(b, qwix)
  if "prims" in _SECTIONS.value:
    sec_prims(b, qwix, ids[6:], ref)
  if "qat" in _SECTIONS.value:
    sec_qat(b, hard)
  b.write()
  print(markdown(b.res))


if __name__ == "__main__":
  app.run(main)
