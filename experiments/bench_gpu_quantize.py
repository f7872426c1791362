r"""Times the one-pass Mosaic GPU quantizer against XLA's path (issue 12).

For each format the kernel takes (``lowbit_jax.kernels.gpu_quantize``: MXFP8,
MXFP4, NVFP4, fp4 g32, int4/int8 g128, MXINT8, MXFP6, scales along axis 0 of a
bf16 ``[K, N]`` tensor), times ``quantize`` and ``fake_quant``'s forward value
two ways in one process:

* XLA: ``lowbit_jax.quantize`` / ``fake_quant`` with the kernel dispatch off
  (``gpu_quantize.forced(())``), the jnp path;
* kernel: ``gpu_quantize.quantize`` / ``fake_quant_forward`` (default tiling,
  and any ``--configs``);
* fwd+bwd (GPU only): ``fake_quant``'s value and straight-through gradient
  through ``jax.vjp``, dispatch off and dispatch forced to the kernel (which
  then also writes the clip mask where the gradient needs one);

checks that the kernel's codes, scales (and NVFP4's tensor scale) or values
equal XLA's bit for bit on the same input (blocks of 16 rows scaled by 2**-8
.. 2**8, so every block has its own scale), and measures the bandwidth
ceiling ``x * 2`` in the same run. Device time per call from CUPTI
(``jax.experimental.mosaic.gpu.profiler.measure``, median of ``--iters``
calls; every kernel of a call counted); on CPU (``--smoke``) the wall clock of
the interpreter, for checking the script only.

Roofline: the bytes that must move (input read + codes and scales written for
quantize; input read + values written for fake_quant; x and the cotangent
read, value and gradient written for fwd+bwd) over the ``x * 2``
bandwidth; the issue's target is 70% of it. The markdown ends with the
formats where the kernel won both operations and was exact: the value for
``gpu_quantize.ENABLED``.

Run on the GPU machine (repository root; one call, about a minute)::

  PYTHONPATH=. python3 experiments/bench_gpu_quantize.py --out_dir=$OUT

Writes ``gpu_quantize_<tag>.json`` and ``.md`` to ``--out_dir`` after every
item; no item starts after ``--time_budget_s``; a watchdog writes what there is
and exits at ``--hard_limit_s``. ``--smoke`` runs every item in the Mosaic GPU
interpreter on a 256x256 tensor on the CPU.
"""
from __future__ import annotations

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

_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/bench_gpu_quantize", "where results go")
_SHAPE = flags.DEFINE_string("shape", "8192x8192", "K x N of the bf16 tensor")
_FORMATS = flags.DEFINE_list("formats", [], "kinds to time (default: all of "
                             "gpu_quantize.supported_kinds() that bench by default)")
_CONFIGS = flags.DEFINE_list("configs", [], "extra tilings, each "
                             "tile_n:tile_k:k_per_cta:stages (e.g. 256:64:256:3)")
_ITERS = flags.DEFINE_integer("iters", 30, "timed calls per measurement")
_BUDGET = flags.DEFINE_float("time_budget_s", 100.0, "start no new item after this")
_HARD = flags.DEFINE_float("hard_limit_s", 115.0, "write what there is and exit")
_TAG = flags.DEFINE_string("tag", "", "file stem suffix (default: from the device)")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU dry run in the interpreter (256x256, "
                           "2 calls)")

# The formats timed by default (ids of gpu_quantize.kind_of) and their specs.
KINDS = {
    "mxfp8_e4m3": ("mxfp8_e4m3", {}),
    "int4_g128": ("int4", dict(group_size=128)),
    "mxfp4": ("mxfp4", {}),
    "nvfp4": ("nvfp4", {}),
    "fp4_e2m1_g32": ("fp4_e2m1", dict(group_size=32)),
    "int8_g128": ("int8", dict(group_size=128)),
    "mxint8": ("mxint8", {}),
    "mxfp6_e2m3": ("mxfp6_e2m3", {}),
}

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
                    iters=self.iters, ceiling=None, rows=[], errors=[])
    self.lock = threading.Lock()

  def time_us(self, f, *args) -> float:
    jax = self.jax
    jf = jax.jit(f).lower(*args).compile()
    jax.block_until_ready(jf(*args))
    if self.gpu:
      from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
      _, ts = profiler.measure(jf, iterations=self.iters)(*args)
      if ts is None:
        raise RuntimeError("CUPTI recorded no kernel launch")
      t = statistics.median(ts) if isinstance(ts, (list, tuple)) else float(ts)
      return t * 1e3
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
              "cell: us per call (% of roofline = bytes that must move over that "
              "bandwidth). exact: the kernel's output equals XLA's bit for bit.", ""]
  lines += ["Tiling: tile_n:tile_k:k_per_cta:stages (`gpu_quantize.Config`).", "",
            "| format | op | tiling | XLA | kernel | speedup | exact |",
            "|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    def cell(t):
      if t is None:
        return "-"
      pct = f" ({100 * r['roof_us'] / t:.0f}%)" if r.get("roof_us") else ""
      return f"{t:.1f}{pct}"
    sp = (f"{r['xla_us'] / r['kernel_us']:.2f}x" if r.get("xla_us") and r.get("kernel_us")
          else "-")
    til = r["tiling"] + (f" ({r['tiling_used']})" if r["tiling"] == "default"
                         and r.get("tiling_used") else "")
    lines.append(f"| {r['kind']} | {r['op']} | {til} | {cell(r.get('xla_us'))} "
                 f"| {cell(r.get('kernel_us'))} | {sp} | {r.get('exact')} |")
  wins = enabled_from(res)
  lines += ["", "Formats where the kernel (default tiling) was exact and faster than "
            "XLA for both quantize and fake_quant, i.e. the value for "
            f"`gpu_quantize.ENABLED`: `{sorted(wins)}`."]
  if res["errors"]:
    lines += ["", "Errors:", ""] + [f"- {e['item']}: {e['error']}" for e in res["errors"]]
  return "\n".join(lines) + "\n"


def enabled_from(res: dict) -> set:
  ok = {}
  for r in res["rows"]:
    if r["tiling"] != "default" or r["op"] == "fwd+bwd":
      continue
    win = bool(r.get("exact")) and r.get("kernel_us") and r.get("xla_us") and (
        r["kernel_us"] < r["xla_us"])
    ok.setdefault(r["kind"], []).append(bool(win))
  return {k for k, v in ok.items() if len(v) == 2 and all(v)}


def fwd_bwd(run, lj, gq, kind, spec, x, xbytes, bw):
  """``fake_quant``'s value and straight-through gradient (``jax.vjp``), as a
  QAT step runs it: XLA's path, then with the dispatch sent to the kernel
  (which writes the clip mask too where the gradient needs one). GPU only:
  elsewhere the dispatch never takes the kernel."""
  jax = run.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  g = jnp.ones_like(x)

  def f(a, ct, s=spec):
    y, vjp = jax.vjp(lambda b: lj.fake_quant(b, s), a)
    return y, vjp(ct)[0]

  # Bytes that must move: x and the cotangent read, value and gradient written.
  row = dict(kind=kind, op="fwd+bwd", tiling="default",
             roof_us=4 * xbytes / bw / 1e3 if bw else None)
  t = time.time()
  try:
    with gq.forced(()):
      fx = jax.jit(f)
      want = jax.block_until_ready(fx(x, g))
      row["xla_us"] = run.time_us(fx, x, g)
    with gq.forced((kind,)):
      fk = jax.jit(f)
      got = jax.block_until_ready(fk(x, g))
      row["kernel_us"] = run.time_us(fk, x, g)
    row["exact"] = bool(_same(got[0], want[0]) and _same(got[1], want[1]))
  except Exception as err:  # pylint: disable=broad-except
    run.failed(row, f"{kind} fwd+bwd", err)
  run.record(row, t)


def _same(a, b) -> bool:
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  if a.shape != b.shape or a.dtype != b.dtype:
    return False
  return a.view(np.uint8).tobytes() == b.view(np.uint8).tobytes()


def main(argv):
  del argv
  os.environ.setdefault("XLA_FLAGS", "")
  if _SMOKE.value:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

  def watchdog():
    time.sleep(max(_HARD.value - (time.time() - T0), 1))
    print("hard limit reached: writing and exiting", flush=True)
    try:
      run.res["errors"].append(dict(item="watchdog", error="hard limit reached"))
      run.write()
    finally:
      os._exit(0)

  run = Run()
  threading.Thread(target=watchdog, daemon=True).start()
  jax = run.jax
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lj  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_quantize as gq  # pylint: disable=g-import-not-at-top

  k, n = (256, 256) if _SMOKE.value else (int(v) for v in _SHAPE.value.split("x"))
  interp = not run.gpu
  kx = jax.random.key(0)
  x = jax.random.normal(kx, (k, n), jnp.float32)
  e = jax.random.randint(jax.random.key(1), (k // 16, 1, n), -8, 9)
  x = (x.reshape(k // 16, 16, n) * jnp.exp2(e.astype(jnp.float32))).reshape(k, n)
  x = jax.block_until_ready(x.astype(jnp.bfloat16))
  xbytes = k * n * 2

  try:
    us = run.time_us(lambda a: a * 2, x)
    run.res["ceiling"] = dict(k=k, n=n, us=us, gbps=2 * xbytes / us / 1e3)
  except Exception as err:  # pylint: disable=broad-except
    run.res["errors"].append(dict(item="ceiling", error=f"{type(err).__name__}: {err}"))
  run.write()
  bw = (run.res["ceiling"] or {}).get("gbps")

  configs = [("default", None)]
  for c in _CONFIGS.value:
    tn, tk, kpc, st = (int(v) for v in c.split(":"))
    configs.append((c, gq.Config(tile_n=tn, tile_k=tk, k_per_cta=kpc, stages=st)))

  # quantize and fake_quant of every format first (they decide ENABLED),
  # then fwd+bwd of every format.
  order = [(kind, ops) for ops in (("quantize", "fake_quant"), ("fwd+bwd",))
           for kind in (_FORMATS.value or list(KINDS))]
  for kind, ops in order:
    fmt, kw = KINDS[kind]
    spec = lj.QuantSpec(fmt, axis=0, **kw)
    for op in ops:
      if time.time() - T0 > _BUDGET.value:
        run.res["errors"].append(dict(item=f"{kind} {op}", error="skipped: time budget"))
        continue
      ref = None
      xla_us = None
      if op == "fwd+bwd":
        if run.gpu or _SMOKE.value:  # (smoke: the dispatch stays on XLA's path)
          fwd_bwd(run, lj, gq, kind, spec, x, xbytes, bw)
        continue
      try:
        with gq.forced(()):
          if op == "quantize":
            f_xla = jax.jit(lambda a, s=spec: lj.quantize(a, s))
          else:
            f_xla = jax.jit(lambda a, s=spec: lj.fake_quant(a, s))
          ref = jax.block_until_ready(f_xla(x))
          xla_us = run.time_us(f_xla, x) if run.gpu or _SMOKE.value else None
      except Exception as err:  # pylint: disable=broad-except
        traceback.print_exc()
        run.res["errors"].append(dict(item=f"{kind} {op} xla",
                                      error=f"{type(err).__name__}: {err}"[:400]))
      if op == "quantize" and ref is not None:
        out_bytes = ref.codes.size * ref.codes.dtype.itemsize + (
            ref.scale.size * ref.scale.dtype.itemsize)
      else:
        out_bytes = xbytes
      roof_us = (xbytes + out_bytes) / bw / 1e3 if bw else None
      for label, cfg in configs:
        if time.time() - T0 > _BUDGET.value:
          break
        row = dict(kind=kind, op=op, tiling=label, xla_us=xla_us, roof_us=roof_us)
        t = time.time()
        try:
          if op == "quantize":
            f_k = jax.jit(lambda a, s=spec, c=cfg: gq.quantize(a, s, config=c,
                                                               interpret=interp))
            got = jax.block_until_ready(f_k(x))
            exact = ref is not None and _same(got.codes, ref.codes) and _same(
                got.scale, ref.scale) and (
                    (got.tensor_scale is None and ref.tensor_scale is None)
                    or _same(got.tensor_scale, ref.tensor_scale))
          else:
            f_k = jax.jit(lambda a, s=spec, c=cfg: gq.fake_quant_forward(
                a, s, config=c, interpret=interp))
            got = jax.block_until_ready(f_k(x))
            exact = ref is not None and _same(got, ref)
          row["exact"] = bool(exact)
          used = cfg or gq.default_config(kind, k, n, x.dtype, op == "fake_quant")
          row["tiling_used"] = (f"{used.tile_n}:{used.tile_k}:{used.k_per_cta}:"
                                f"{used.stages}")
          row["kernel_us"] = run.time_us(f_k, x)
        except Exception as err:  # pylint: disable=broad-except
          run.failed(row, f"{kind} {op} {label}", err)
        run.record(row, t)
  run.res["enabled"] = sorted(enabled_from(run.res))
  run.write()
  print(f"wrote {run.stem}.md/.json in {time.time() - T0:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
