r"""Device-timed benchmark (and correctness check) of the Mosaic GPU low-bit kernels.

Every kernel is timed next to XLA bf16, XLA's own low-bit path (dequantize-then-dot,
or the scaled fp8/int8 dot for W8A8) and the bandwidth / compute roofline. Times
are device times per call from CUPTI (``jax.experimental.mosaic.gpu.profiler.measure``):
every GPU kernel of one call is counted (a split-K sum or a bitcast copy too), the
median over ``--iters`` calls is reported. Weights are jit arguments; when one
weight set fits in L2, ``R`` distinct weight sets are used round-robin inside one
call (time divided by ``R``) so that no call reads its weight from cache.

Run on the GPU machine (repository root)::

  PYTHONPATH=. python experiments/bench_kernels.py --mode=bench \
      --out_dir=benchmarks

``--mode=check`` only runs the correctness checks (fresh random inputs, output
compared with ``reference`` in float64); ``--mode=sweep`` times tiling variants.
Writes ``kernels_h100.json`` and ``kernels_h100.md`` to ``--out_dir``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
import types

from absl import app
from absl import flags

_MODE = flags.DEFINE_enum(
    "mode", "bench", ["check", "sweep", "bench", "all", "report"],
    "what to run; 'report' rebuilds the JSON/markdown from --inputs (no GPU)")
_INPUTS = flags.DEFINE_list("inputs", [], "result JSON files for --mode=report")
_NOTES = flags.DEFINE_string("notes_file", "",
                             "markdown appended to the report (--mode=report)")
_SHAPES = flags.DEFINE_list(
    "shapes", ["8192x8192", "8192x28672", "28672x8192", "4096x14336",
               "14336x4096"], "K x N of the weight (x[M, K] @ W[K, N])")
_BATCHES = flags.DEFINE_list("batches", ["1", "4", "16", "64", "512", "4096"],
                             "M values")
_KERNELS = flags.DEFINE_list(
    "kernels", ["int4_g128", "int4_pc", "int8_pc", "int8_g128", "fp4_g32",
                "mxfp4", "nvfp4", "fp8_channel", "int8_channel", "fp8_block",
                "mxfp8"], "kernel cases to time")
_ITERS = flags.DEFINE_integer("iters", 30, "timed calls per measurement")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")
_BUDGET = flags.DEFINE_float("time_budget_s", 480.0,
                             "stop starting new measurements after this")
_TAG = flags.DEFINE_string("tag", "kernels_h100", "output file stem")
_WRITE_MD = flags.DEFINE_bool("write_md", True, "also write the markdown table")

# Weight-only kernel cases: format, group.
WO_CASES = {
    "int4_g128": ("int4", 128), "int4_g32": ("int4", 32),
    "int4_g64": ("int4", 64), "int4_pc": ("int4", None),
    "int8_pc": ("int8", None), "int8_g128": ("int8", 128),
    "fp4_g32": ("fp4_e2m1", 32), "mxfp4": ("mxfp4", 32), "nvfp4": ("nvfp4", 16),
}
W8_CASES = {"fp8_channel": "fp8_channel", "int8_channel": "int8_channel",
            "fp8_block": "fp8_block", "int8_block": "int8_block",
            "mxfp8": "mxfp8"}


def _import_kernels():
  """Imports the kernel modules, bypassing package __init__ files if broken."""
  try:
    wo = importlib.import_module("lowbit_jax.kernels.gpu_weight_only")
    w8 = importlib.import_module("lowbit_jax.kernels.gpu_w8a8")
    api = importlib.import_module("lowbit_jax.kernels._api")
    return wo, w8, api
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    print("package import failed; loading kernel modules by path", flush=True)
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  for name in ("lowbit_jax", "lowbit_jax.kernels"):
    for k in list(sys.modules):
      if k == name or k.startswith(name + "."):
        del sys.modules[k]
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(root, *name.split("."))]
    sys.modules[name] = mod
  mods = []
  for name in ("_api", "_gpu_common", "gpu_weight_only", "gpu_w8a8"):
    full = f"lowbit_jax.kernels.{name}"
    spec = importlib.util.spec_from_file_location(
        full, os.path.join(root, "lowbit_jax", "kernels", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    mods.append(mod)
  return mods[2], mods[3], mods[0]


class Runner:
  """Holds results, the time budget and the measuring helpers."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.t0 = time.time()
    self.results = []
    self.checks = []
    self.log_lines = []
    self.bw = None

  def over_budget(self) -> bool:
    return time.time() - self.t0 > _BUDGET.value

  def log(self, msg: str):
    print(msg, flush=True)
    self.log_lines.append(msg)

  def measure(self, f, *args, reps: int = 1):
    """Median device microseconds of one call of ``f`` divided by ``reps``."""
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
    jf = self.jax.jit(f)
    out = jf(*args)
    self.jax.block_until_ready(out)
    _, ts = profiler.measure(jf, iterations=_ITERS.value)(*args)
    return statistics.median(ts) * 1e3 / reps

  def breakdown(self, f, *args):
    """Per-kernel device times (us) of one call."""
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
    jf = self.jax.jit(f)
    _, ts = profiler.measure(jf, aggregate=False)(*args)
    return [(name[:60], round(t * 1e3, 2)) for name, t in (ts or [])]


# ----------------------------------------------------------------------------
# Random operands.
# ----------------------------------------------------------------------------

def wo_operands(api, key, fmt, group, m, n, k):
  """Random weight-only operands in the _api storage layout (never zeros)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k1, k2, k3, k4 = jax.random.split(key, 4)
  x = jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16)
  if fmt == "int8":
    codes = jax.random.randint(k2, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
  else:
    codes = jax.random.randint(k2, (n, k // 2), 0, 256, jnp.int32).astype(
        jnp.uint8)
  ng = 1 if group is None else k // group
  if fmt == "mxfp4":
    scale = jax.random.randint(k3, (n, ng), 120, 132, jnp.int32).astype(jnp.uint8)
  elif fmt == "nvfp4":
    scale = jax.random.uniform(k3, (n, ng), jnp.float32, 0.05, 2.0).astype(
        jnp.float8_e4m3fn)
  else:
    scale = jax.random.uniform(k3, (n, ng), jnp.float32, 0.001, 0.02).astype(
        jnp.bfloat16)
  ts = None
  if fmt == "nvfp4":
    ts = jax.random.uniform(k4, (), jnp.float32, 0.5, 2.0)
  prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                           w_block=group)
  return api.MatmulOperands(x=x, w_codes=codes, w_scale=scale,
                            w_tensor_scale=ts), prob


def w8_operands(api, key, case, m, n, k, exact_mx=False):
  """Random W8A8 operands (codes, scales) for one case."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k1, k2, k3, k4 = jax.random.split(key, 4)
  if case.startswith("int8"):
    x = jax.random.randint(k1, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
    w = jax.random.randint(k2, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
    fmt = "int8"
  elif exact_mx:
    # Small integers: every 32-element block dot is exact in any accumulator.
    x = jax.random.randint(k1, (m, k), -8, 9, jnp.int32).astype(
        jnp.float8_e4m3fn)
    w = jax.random.randint(k2, (n, k), -8, 9, jnp.int32).astype(
        jnp.float8_e4m3fn)
    fmt = "fp8_e4m3"
  else:
    x = (jax.random.normal(k1, (m, k), jnp.float32) * 3).astype(
        jnp.float8_e4m3fn)
    w = (jax.random.normal(k2, (n, k), jnp.float32) * 3).astype(
        jnp.float8_e4m3fn)
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
  else:
    sx = jax.random.randint(k3, (m, k // 32), 117, 137, jnp.int32).astype(
        jnp.uint8)
    sw = jax.random.randint(k4, (n, k // 32), 117, 137, jnp.int32).astype(
        jnp.uint8)
    prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype="fp8_e4m3",
                             w_format="mxfp8_e4m3", x_format="mxfp8_e4m3",
                             w_block=32, x_block=32,
                             out_dtype="float32" if exact_mx else "bfloat16")
  return api.MatmulOperands(x=x, w_codes=w, w_scale=sw, x_scale=sx), prob


def rel_err(out, ref):
  import numpy as np  # pylint: disable=g-import-not-at-top
  o = np.asarray(out, np.float64)
  r = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(o)):
    return float("inf")
  return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def run_poisoned(jax, f, ops, out_shape, out_dtype):
  """Runs ``f`` right after freeing a NaN buffer of the output's size."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  poison = jnp.full(out_shape, jnp.nan, out_dtype)
  poison.block_until_ready()
  poison.delete()
  out = f(ops)
  return jax.block_until_ready(out)


# ----------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------

def do_checks(r: Runner, wo, w8, api):
  jax = r.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  key = jax.random.key(int(time.time()))
  wo_shapes = [(1, 512, 2048), (5, 1024, 4096), (16, 8192, 8192),
               (64, 1024, 2048), (1, 4096, 14336)]
  for name, (fmt, group) in WO_CASES.items():
    if name not in _KERNELS.value:
      continue
    for (m, n, k) in wo_shapes:
      if r.over_budget():
        return
      key, sub = jax.random.split(key)
      ops, prob = wo_operands(api, sub, fmt, group, m, n, k)
      try:
        f = jax.jit(lambda o, p=prob: wo.matmul(o, p))
        out = run_poisoned(jax, f, ops, (m, n), jnp.bfloat16)
        ref = jax.jit(lambda o, p=prob: wo.reference(o, p))(ops)
        err = rel_err(out, ref)
        ok = err < 1e-2
      except Exception as e:  # pylint: disable=broad-except
        err, ok = repr(e)[:300], False
        traceback.print_exc()
      r.checks.append(dict(kernel=name, m=m, n=n, k=k, rel_err=err, ok=ok))
      r.log(f"CHECK wo {name:10s} M={m:<5d} N={n:<6d} K={k:<6d} "
            f"rel_err={err} {'OK' if ok else 'FAIL'}")
  # The single-warpgroup variant, on the shapes that exposed a register race.
  for name in ("int4_pc", "int8_pc", "int4_g128"):
    if name not in _KERNELS.value or r.over_budget():
      continue
    fmt, group = WO_CASES[name]
    key, sub = jax.random.split(key)
    ops, prob = wo_operands(api, sub, fmt, group, 16, 8192, 8192)
    cfg = wo.Config(64, 256, 16, 4, 2, False)
    try:
      f = jax.jit(lambda o, p=prob, c=cfg: wo.matmul(o, p, config=c))
      out = run_poisoned(jax, f, ops, (16, 8192), jnp.bfloat16)
      ref = jax.jit(lambda o, p=prob: wo.reference(o, p))(ops)
      err = rel_err(out, ref)
      ok = err < 1e-2
    except Exception as e:  # pylint: disable=broad-except
      err, ok = repr(e)[:300], False
    r.checks.append(dict(kernel=name + "_single_wg", m=16, n=8192, k=8192,
                         rel_err=err, ok=ok))
    r.log(f"CHECK wo {name}_single_wg M=16 N=8192 K=8192 rel_err={err} "
          f"{'OK' if ok else 'FAIL'}")
  w8_shapes = [(256, 512, 1024), (512, 1024, 2048)]
  for case in W8_CASES:
    if case not in _KERNELS.value:
      continue
    for (m, n, k) in w8_shapes:
      for exact in ((False, True) if case == "mxfp8" else (False,)):
        if r.over_budget():
          return
        key, sub = jax.random.split(key)
        ops, prob = w8_operands(api, sub, case, m, n, k, exact_mx=exact)
        try:
          f = jax.jit(lambda o, p=prob: w8.matmul(o, p))
          out = run_poisoned(jax, f, ops, (m, n), jnp.dtype(prob.out_dtype))
          ref = jax.jit(lambda o, p=prob: w8.reference(o, p))(ops)
          if exact:
            nbad = int(np.sum(np.asarray(out) != np.asarray(ref)))
            err, ok = f"{nbad} elements differ", nbad == 0
          else:
            err = rel_err(out, ref)
            ok = err < 1e-2
        except Exception as e:  # pylint: disable=broad-except
          err, ok = repr(e)[:300], False
          traceback.print_exc()
        label = case + ("_exact" if exact else "")
        r.checks.append(dict(kernel=label, m=m, n=n, k=k, rel_err=err, ok=ok))
        r.log(f"CHECK w8 {label:14s} M={m:<5d} N={n:<6d} K={k:<6d} "
              f"rel_err={err} {'OK' if ok else 'FAIL'}")


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------

L2_BYTES = 50 * 2 ** 20


def _reps(nbytes: int) -> int:
  return max(1, min(8, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


def stream_bw(r: Runner) -> float:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  big = r.jax.random.normal(r.jax.random.key(1), (1 << 28,), jnp.float32)
  us = r.measure(lambda a: a * 1.0001, big)
  bw = 2 * big.nbytes / us / 1e6
  r.log(f"stream 1 GiB f32 read+write: {us:.1f} us = {bw:.2f} TB/s")
  del big
  return bw


def time_weight_only(r: Runner, wo, api, name, m, k, n, configs=None):
  """Times one weight-only case; returns the result dict (or None)."""
  jax = r.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  fmt, group = WO_CASES[name]
  keys = jax.random.split(jax.random.key(m * 7 + n * 13 + k), 9)
  ops0, prob = wo_operands(api, keys[0], fmt, group, m, n, k)
  wbytes = ops0.w_codes.nbytes + ops0.w_scale.nbytes
  reps = _reps(wbytes)
  ops = [ops0] + [wo_operands(api, keys[i + 1], fmt, group, m, n, k)[0]
                  for i in range(reps - 1)]
  x = ops0.x
  res = dict(kernel=name, m=m, k=k, n=n, reps=reps, weight_bytes=wbytes)
  nbytes = wbytes + x.nbytes + m * n * 2
  res["roofline_us"] = nbytes / (r.bw * 1e6)
  # XLA bf16 (weights [K, N] as an unquantized model stores them).
  wb = [jax.random.normal(keys[i], (k, n), jnp.float32).astype(jnp.bfloat16)
        for i in range(_reps(k * n * 2))]
  res["xla_bf16_us"] = r.measure(lambda x, ws: [x @ w for w in ws], x, wb,
                                 reps=len(wb))
  del wb
  res["xla_lowbit_us"] = r.measure(
      lambda os_: [wo.xla_dequant_matmul(o, prob) for o in os_], ops, reps=reps)
  cfgs = configs or [None]
  best = None
  for cfg in cfgs:
    if r.over_budget():
      break
    try:
      us = r.measure(
          lambda os_, c=cfg: [wo.matmul(o, prob, config=c) for o in os_], ops,
          reps=reps)
    except Exception as e:  # pylint: disable=broad-except
      r.log(f"  config {cfg} failed: {repr(e)[:400]}")
      continue
    tag = "default" if cfg is None else str(cfg)
    res.setdefault("variants", {})[tag] = us
    if best is None or us < best[0]:
      best = (us, tag, cfg)
  if best is None:
    return None
  res["kernel_us"], res["config"], best_cfg = best
  if best_cfg is None:
    res["config"] = str(wo._decode_config(prob))  # pylint: disable=protected-access
  try:
    res["breakdown"] = r.breakdown(
        lambda o: wo.matmul(o, prob, config=best_cfg), ops0)
  except Exception:  # pylint: disable=broad-except
    pass
  r.results.append(res)
  r.log(f"WO {name:10s} M={m:<5d} K={k:<6d} N={n:<6d} bf16={res['xla_bf16_us']:8.1f}"
        f" xla_lowbit={res['xla_lowbit_us']:8.1f} kernel={res['kernel_us']:8.1f}"
        f" roof={res['roofline_us']:7.1f}  ({res['config']})")
  return res


def time_w8a8(r: Runner, w8, api, case, m, k, n):
  jax = r.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  key = jax.random.key(m + n + k)
  ops, prob = w8_operands(api, key, case, m, n, k)
  res = dict(kernel=case, m=m, k=k, n=n)
  flops = 2 * m * n * k
  nbytes = ops.x.nbytes + ops.w_codes.nbytes + m * n * 2
  res["roofline_us"] = max(flops / 1979e12 * 1e6, nbytes / (r.bw * 1e6))
  k1, k2 = jax.random.split(key)
  xb = jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16)
  wb = jax.random.normal(k2, (k, n), jnp.float32).astype(jnp.bfloat16)
  res["xla_bf16_us"] = r.measure(lambda a, b: a @ b, xb, wb)
  del xb, wb
  res["xla_lowbit_us"] = r.measure(lambda o: w8.xla_matmul(o, prob), ops)
  try:
    res["kernel_us"] = r.measure(lambda o: w8.matmul(o, prob), ops)
  except Exception as e:  # pylint: disable=broad-except
    r.log(f"  {case} M={m} failed: {repr(e)[:400]}")
    traceback.print_exc()
    return None
  try:
    res["breakdown"] = r.breakdown(lambda o: w8.matmul(o, prob), ops)
  except Exception:  # pylint: disable=broad-except
    pass
  for key_ in ("xla_bf16_us", "xla_lowbit_us", "kernel_us"):
    res[key_.replace("_us", "_tflops")] = flops / res[key_] / 1e6
  r.results.append(res)
  r.log(f"W8 {case:12s} M={m:<5d} K={k:<6d} N={n:<6d} bf16={res['xla_bf16_us']:8.1f}"
        f" xla_lowbit={res['xla_lowbit_us']:8.1f} kernel={res['kernel_us']:8.1f}"
        f" ({res['kernel_tflops']:.0f} TFLOP/s)")
  return res


def do_sweep(r: Runner, wo, w8, api):
  """Times tiling variants of the int4 g128 decode kernel on the key shapes."""
  C = wo.Config
  for (k, n) in ((8192, 8192), (8192, 28672)):
    for m in (1, 16):
      if r.over_budget():
        return
      tm = 8 if m <= 8 else 16
      cfgs = [C(64, 512, tm, 4, 1, True), C(64, 512, tm, 6, 1, True),
              C(64, 256, tm, 6, 1, True), C(64, 512, tm, 4, 2, True),
              C(128, 512, tm, 4, 1, True), C(64, 256, tm, 4, 2, False)]
      time_weight_only(r, wo, api, "int4_g128", m, k, n, configs=cfgs)


def do_bench(r: Runner, wo, w8, api):
  shapes = [tuple(int(v) for v in s.split("x")) for s in _SHAPES.value]
  batches = [int(b) for b in _BATCHES.value]
  for name in _KERNELS.value:
    for (k, n) in shapes:
      for m in batches:
        if r.over_budget():
          r.log("time budget reached")
          return
        try:
          if name in WO_CASES:
            if m > 64:
              continue
            time_weight_only(r, wo, api, name, m, k, n)
          elif name in W8_CASES:
            if m < 512:
              continue
            time_w8a8(r, w8, api, name, m, k, n)
        except Exception as e:  # pylint: disable=broad-except
          r.log(f"ERROR {name} M={m} K={k} N={n}: {repr(e)[:500]}")
          traceback.print_exc()


def write_outputs(r: Runner, command: str, sources=None):
  """Writes ``<tag>.json`` and ``<tag>.md``.

  Args:
    r: the runner holding results and checks.
    command: the command that produced them (one run).
    sources: for --mode=report, the metadata of each merged input file.
  """
  jax = r.jax
  out_dir = _OUT_DIR.value
  os.makedirs(out_dir, exist_ok=True)
  if sources:
    device = sources[0]["device"]
    jax_version = sources[0]["jax"]
    iters = sources[0]["iters"]
    commands = [m["command"] for m in sources]
  else:
    device = jax.devices()[0].device_kind
    jax_version = jax.__version__
    iters = _ITERS.value
    commands = [command]
  meta = dict(device=device, jax=jax_version, commands=commands,
              stream_TBps=r.bw, iters=iters)
  if sources:
    meta["report_command"] = command
  with open(os.path.join(out_dir, _TAG.value + ".json"), "w") as f:
    json.dump(dict(meta=meta, checks=r.checks, results=r.results), f, indent=1,
              default=str)
  lines = [f"# Low-bit kernels on {device}", "",
           f"jax {jax_version}; device time per call from CUPTI "
           f"(median of {iters} calls, every kernel of a call counted); "
           f"stream bandwidth measured in the same run: {r.bw:.2f} TB/s "
           "(roofline = bytes that must move / that bandwidth).", "",
           "Commands (run on the GPU machine, repository root):", ""]
  lines += [f"- `{c}`" for c in commands]
  if sources:
    lines += ["", f"Tables rebuilt from those runs' JSON with `{command}`."]
  lines.append("")
  lines += _target_lines(r)
  wo_rows = [x for x in r.results if x["kernel"] in WO_CASES]
  if wo_rows:
    lines += ["## Weight-only (bf16 activations)", "",
              "| kernel | M | K | N | XLA bf16 us | XLA low-bit us | kernel us | "
              "roofline us | vs bf16 | vs XLA low-bit | % roofline | config |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in wo_rows:
      lines.append(
          f"| {x['kernel']} | {x['m']} | {x['k']} | {x['n']} | "
          f"{x['xla_bf16_us']:.1f} | {x['xla_lowbit_us']:.1f} | "
          f"{x['kernel_us']:.1f} | {x['roofline_us']:.1f} | "
          f"{x['xla_bf16_us'] / x['kernel_us']:.2f}x | "
          f"{x['xla_lowbit_us'] / x['kernel_us']:.2f}x | "
          f"{100 * x['roofline_us'] / x['kernel_us']:.0f}% | {x['config']} |")
    lines.append("")
  swept = [x for x in wo_rows if len(x.get("variants", {})) > 1]
  if swept:
    lines += ["## Tiling sweep (kernel us per variant; Config(tile_n, tile_k, "
              "tile_m, stages, split_k[, ws]))", ""]
    for x in swept:
      lines.append(f"- {x['kernel']} M={x['m']} K={x['k']} N={x['n']}: " +
                   "; ".join(f"{v:.1f} {c.replace('Config', '')}"
                             for c, v in x["variants"].items()))
      if x.get("breakdown"):
        lines.append("  - kernels of one call of the best variant (us): " +
                     ", ".join(f"{n} {t}" for n, t in x["breakdown"]))
    lines.append("")
  w8_rows = [x for x in r.results if x["kernel"] in W8_CASES]
  if w8_rows:
    lines += ["## W8A8", "",
              "| kernel | M | K | N | XLA bf16 us (TFLOP/s) | XLA low-bit us "
              "(TFLOP/s) | kernel us (TFLOP/s) | vs bf16 | vs XLA low-bit |",
              "|---|---|---|---|---|---|---|---|---|"]
    for x in w8_rows:
      lines.append(
          f"| {x['kernel']} | {x['m']} | {x['k']} | {x['n']} | "
          f"{x['xla_bf16_us']:.1f} ({x['xla_bf16_tflops']:.0f}) | "
          f"{x['xla_lowbit_us']:.1f} ({x['xla_lowbit_tflops']:.0f}) | "
          f"{x['kernel_us']:.1f} ({x['kernel_tflops']:.0f}) | "
          f"{x['xla_bf16_us'] / x['kernel_us']:.2f}x | "
          f"{x['xla_lowbit_us'] / x['kernel_us']:.2f}x |")
    lines.append("")
  if r.checks:
    lines += ["## Correctness (fresh random inputs vs `reference`)", "",
              "| kernel | M | N | K | rel. error / mismatches | ok |",
              "|---|---|---|---|---|---|"]
    for c in r.checks:
      lines.append(f"| {c['kernel']} | {c['m']} | {c['n']} | {c['k']} | "
                   f"{c['rel_err']} | {c['ok']} |")
    lines.append("")
  if sources and _NOTES.value:
    with open(_NOTES.value) as f:
      lines += [f.read()]
  if _WRITE_MD.value:
    with open(os.path.join(out_dir, _TAG.value + ".md"), "w") as f:
      f.write("\n".join(lines))


def _find(results, kernel, m, k, n):
  for x in results:
    if (x["kernel"], x["m"], x["k"], x["n"]) == (kernel, m, k, n):
      return x
  return None


def _target_lines(r: Runner):
  """The issue's H100 targets next to what was measured (only measured rows)."""
  rows = []
  res = r.results

  def add(target, measured, ok):
    rows.append(f"| {target} | {measured} | {'met' if ok else 'MISSED'} |")

  for name in ("int4_g128", "mxfp4", "nvfp4"):
    a1 = _find(res, name, 1, 8192, 8192)
    a16 = _find(res, name, 16, 8192, 8192)
    b1 = _find(res, name, 1, 8192, 28672)
    b16 = _find(res, name, 16, 8192, 28672)
    for x in (a1, a16):
      if x:
        v = x["xla_bf16_us"] / x["kernel_us"]
        add(f"{name} M={x['m']} 8192x8192: >= 2.5x XLA bf16",
            f"{v:.2f}x ({x['kernel_us']:.1f} vs {x['xla_bf16_us']:.1f} us)",
            v >= 2.5)
        v = x["xla_lowbit_us"] / x["kernel_us"]
        add(f"{name} M={x['m']} 8192x8192: >= 5x XLA's own low-bit path",
            f"{v:.1f}x ({x['xla_lowbit_us']:.1f} us)", v >= 5)
    for x in (b1, b16):
      if x:
        v = x["roofline_us"] / x["kernel_us"]
        add(f"{name} M={x['m']} 8192x28672: >= 70% of bandwidth roofline",
            f"{100 * v:.0f}% ({x['kernel_us']:.1f} vs {x['roofline_us']:.1f} us)",
            v >= 0.7)
    for lo, hi in ((a1, a16), (b1, b16)):
      if lo and hi:
        v = hi["kernel_us"] / lo["kernel_us"]
        add(f"{name} {lo['k']}x{lo['n']}: batch 16 <= 1.2x batch 1",
            f"{v:.2f}x", v <= 1.2)
  for name, tgt in (("fp8_channel", 1.6), ("int8_channel", 1.6),
                    ("fp8_block", 1.4), ("int8_block", 1.4), ("mxfp8", 1.2)):
    for x in res:
      if x["kernel"] == name:
        v = x["xla_bf16_us"] / x["kernel_us"]
        add(f"{name} M={x['m']} {x['k']}x{x['n']}: >= {tgt}x XLA bf16",
            f"{v:.2f}x ({x['kernel_tflops']:.0f} TFLOP/s; XLA's own path "
            f"{x['xla_lowbit_tflops']:.0f})", v >= tgt)
  if not rows:
    return []
  return ["## Targets (issue 6) vs measured", "",
          "| target | measured | |", "|---|---|---|"] + rows + [""]


def report(r: Runner):
  """Merges result JSON files (--inputs) into one report."""
  sources = []
  for path in _INPUTS.value:
    with open(path) as f:
      d = json.load(f)
    sources.append(d["meta"])
    r.checks += d.get("checks", [])
    r.results += d.get("results", [])
  r.bw = statistics.median(m["stream_TBps"] for m in sources)
  return sources


def main(argv):
  del argv
  command = "PYTHONPATH=. python " + " ".join(sys.argv)
  if _MODE.value == "report":
    r = Runner()
    write_outputs(r, command, sources=report(r))
    return
  r = Runner()
  jax = r.jax
  r.log(f"jax {jax.__version__} device {jax.devices()[0].device_kind}")
  wo, w8, api = _import_kernels()
  r.bw = stream_bw(r)
  try:
    if _MODE.value in ("check", "all"):
      do_checks(r, wo, w8, api)
    if _MODE.value in ("sweep", "all"):
      do_sweep(r, wo, w8, api)
    if _MODE.value in ("bench", "all"):
      do_bench(r, wo, w8, api)
  finally:
    write_outputs(r, command)
    r.log(f"total {time.time() - r.t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
