r"""A/B timing of code variants of the primitives inside one process.

Separate benchmark runs on a shared CPU machine move by 0.5-2x between runs
(``benchmarks/primitives_cpu.md`` says why), which hides a 1.3x change. This
script builds every variant of each primitive in one process and times them
interleaved: variant a, variant b, ..., then again, ``--rounds`` times; each
cell is the smallest of the rounds' medians (``--iters`` calls each). Load
from other jobs then falls on all variants alike.

A variant sets module attributes before its programs are traced (the
library's own jits are cleared first, so every variant is traced anew)::

  PYTHONPATH=. python3 -m experiments.bench_variants \
      --variants='recomputed:lowbit_jax.core._quantize._PER_BLOCK_MIN_ELEMENTS=1<<62;materialized:lowbit_jax.core._quantize._PER_BLOCK_MIN_ELEMENTS=1<<22' \
      --out=benchmarks/cpu_per_block.md

``--variants`` is ``name:module.attr=value[,module.attr=value];name:...``
(``value`` a Python expression). The programs: ``quantize``, ``fake_quant``
and ``dequantize`` (the jnp path, ``core._quantize.dequantize_jnp``) of a bf16
``--shape`` tensor with scales along axis 0, for ``--formats`` (ids of
``experiments/_primitive_formats.FORMATS``). Every variant's results are
checked bit for bit against the first's. Writes a markdown table with the
command, the device and the jax version.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
import time

from absl import app
from absl import flags

from experiments._primitive_formats import FORMATS



class _Flags:
  """The command-line flags, defined only when this file runs as a script
  (importing it, as the tests do, defines no absl flag that could clash with
  another experiment's)."""

  def __init__(self):
    self.variants = flags.DEFINE_string("variants", "", "name:module.attr=expr[,...];...")
    self.formats = flags.DEFINE_list("formats", [], "format ids (default: all)")
    self.ops = flags.DEFINE_list("ops", ["quantize", "fake_quant", "dequantize"],
                                 "programs")
    self.shape = flags.DEFINE_string("shape", "2048x2048", "K x N of the bf16 tensor")
    self.iters = flags.DEFINE_integer("iters", 7, "calls per timing", lower_bound=1)
    self.rounds = flags.DEFINE_integer("rounds", 5, "interleaved rounds (min of medians)",
                                       lower_bound=1)
    self.out = flags.DEFINE_string("out", "", "markdown file (default: print)")


_F = None


def parse_variants(text: str):
  """``name:mod.attr=expr,...;...`` -> [(name, [(module, attr, value)])]."""
  out = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    if ":" not in part:
      raise app.UsageError(f"variant {part!r} has no name: write name:module.attr=value")
    name, sets = part.split(":", 1)
    items = []
    for s in filter(None, (v.strip() for v in sets.split(","))):
      if "=" not in s:
        raise app.UsageError(f"{s!r} in variant {name!r} is not module.attr=value")
      lhs, expr = s.split("=", 1)
      mod, _, attr = lhs.strip().rpartition(".")
      module = importlib.import_module(mod)
      if not hasattr(module, attr):
        raise app.UsageError(f"{mod} has no attribute {attr!r} (variant {name!r})")
      items.append((module, attr, eval(expr, {}))) # pylint: disable=eval-used
    out.append((name.strip(), items))
  if len(out) < 2:
    raise app.UsageError("--variants needs at least two variants to compare")
  return out


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top

  variants = parse_variants(_F.variants.value)
  ids = _F.formats.value or list(FORMATS)
  bad = [f for f in ids if f not in FORMATS]
  if bad:
    raise app.UsageError(f"unknown format ids {bad}; known: {sorted(FORMATS)}")
  try:
    k, n = (int(v) for v in _F.shape.value.lower().split("x"))
  except ValueError:
    k = n = 0
  if k < 1 or n < 1:
    raise app.UsageError(f"--shape must be KxN with K, N >= 1, got {_F.shape.value!r}")
  x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32).astype(jnp.bfloat16)

  def with_variant(items, fn):
    old = [(m, a, getattr(m, a)) for m, a, _ in items]
    for m, a, v in items:
      setattr(m, a, v)
    jax.clear_caches()
    try:
      return fn()
    finally:
      for m, a, v in old:
        setattr(m, a, v)
      jax.clear_caches()

  def program(op, spec):
    if op == "quantize":
      return jax.jit(lambda v: lb.quantize(v, spec)), x
    if op == "fake_quant":
      return jax.jit(lambda v: lb.fake_quant(v, spec)), x
    if op == "dequantize":
      return jax.jit(_quantize.dequantize_jnp), jax.jit(lambda v: lb.quantize(v, spec))(x)
    raise app.UsageError(f"unknown op {op!r}")

  def timed(fn, arg):
    ts = []
    for _ in range(_F.iters.value):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(arg))
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6

  rows = []
  for fid in ids:
    fmt, kw = FORMATS[fid]
    spec = lb.QuantSpec(fmt, axis=0, **kw)
    for op in _F.ops.value:
      built = []
      for name, items in variants:
        def build(op=op, spec=spec):
          f, arg = program(op, spec)
          c = f.lower(arg).compile()
          return c, arg, jax.tree.leaves(c(arg))
        built.append((name,) + with_variant(items, build))
      ref = [np.asarray(a) for a in built[0][3]]
      same = all(
          all(np.array_equal(np.atleast_1d(r).view(np.uint8),
                             np.atleast_1d(np.asarray(o)).view(np.uint8))
              for r, o in zip(ref, b[3])) for b in built[1:])
      best = {b[0]: float("inf") for b in built}
      for _ in range(_F.rounds.value):
        for name, c, arg, _ in built:
          best[name] = min(best[name], timed(c, arg))
      rows.append((fid, op, best, same))
      print(fid, op, " ".join(f"{k_}={v:.0f}" for k_, v in best.items()),
            "same bits" if same else "BITS DIFFER", flush=True)

  names = [v[0] for v in variants]
  lines = [
      "# Variants of the primitives, timed in one process",
      "",
      "Command: `python3 -m experiments.bench_variants " + " ".join(
          f"'{a}'" if ";" in a or "<" in a else a for a in sys.argv[1:]) + "`  ",
      f"jax {jax.__version__}, device {jax.devices()[0].device_kind} "
      f"({jax.default_backend()}), host {platform.node() or '?'} "
      f"({os.cpu_count()} CPUs); bf16 [{k}, {n}], scales along axis 0. Each cell: "
      f"the smallest of {_F.rounds.value} interleaved rounds' medians of "
      f"{_F.iters.value} calls, us; the last column divides the first variant's "
      "time by the last's (> 1: the last is faster).",
      "",
      "Variants: " + "; ".join(
          f"`{name}`: " + ", ".join(f"{m.__name__}.{a} = {v!r}" for m, a, v in items)
          for name, items in variants),
      "",
      "| format | op | " + " | ".join(names) + f" | {names[0]} / {names[-1]} | bits |",
      "|---|---|" + "---|" * (len(names) + 2),
  ]
  for fid, op, best, same in rows:
    lines.append(f"| {fid} | {op} | " + " | ".join(f"{best[nm]:.0f}" for nm in names)
                 + f" | {best[names[0]] / best[names[-1]]:.2f}x | "
                 + ("same" if same else "**differ**") + " |")
  text = "\n".join(lines) + "\n"
  if _F.out.value:
    with open(_F.out.value, "w") as fh:
      fh.write(text)
    print("wrote", _F.out.value)
  else:
    print(text)


if __name__ == "__main__":
  _F = _Flags()
  app.run(main)
