r"""The instruction mix of each kernel in an Nsight Compute SASS listing.

Reads what

    ncu --clock-control none --profile-from-start off -k regex:mosaic \
        --section SourceCounters --page source --print-source sass \
        python3 -m experiments.ncu_probe --cases=...

prints (plain or gzipped; ``benchmarks/kernels_h100_runs/ncu_sass_wgmma_s34a.txt.gz``
is one) and, per profiled kernel in launch order (the ``=== case`` lines
name them), sums the listing's executed-instruction column by opcode (the
predicate and modifiers after the first dot kept: ``HMUL2.BF16_V2``) and
its warp-stall samples. With ``--elements`` (the weight's elements, K * N)
each opcode is also given per element: the listing's count is per thread
(a per-thread count of one instruction a pair of codes reads 0.5 per
element). Run on the CPU:

    python3 experiments/ncu_sass_mix.py \
        --sass=benchmarks/kernels_h100_runs/ncu_sass_wgmma_s34a.txt.gz \
        --elements=234881024
"""
from __future__ import annotations

import collections
import gzip
import re

from absl import app
from absl import flags

_SASS = flags.DEFINE_string("sass", None, "ncu --print-source sass output (.txt or .gz)")
_ELEMENTS = flags.DEFINE_integer("elements", 0, "elements of the profiled weight "
                                 "(K * N), for the per-element column; 0: none")
_TOP = flags.DEFINE_integer("top", 20, "opcodes shown per kernel")

# address, source (60 columns), stall samples (all), (not issued), samples,
# instructions executed
_ROW = re.compile(r"^0x[0-9a-f]+\s+(.{60})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s")


def parse(text: str) -> tuple[list, list]:
  """(case names, per kernel a list of (opcode, executed, stall samples))."""
  cases = [ln.split(" config=")[0][len("=== case "):] for ln in text.splitlines()
           if ln.startswith("=== case ")]
  kernels = []
  for ln in text.splitlines():
    if ln.startswith("Kernel Name"):
      kernels.append([])
      continue
    m = _ROW.match(ln)
    if m and kernels:
      words = m.group(1).split()
      op = words[1] if words[0].startswith("@") else words[0]
      kernels[-1].append((op, int(m.group(5)), int(m.group(2))))
  return cases, kernels


def mix(rows: list) -> tuple[int, int, list]:
  """(executed, stall samples, [(opcode, executed, stalls)] most executed first)."""
  ex, st = collections.Counter(), collections.Counter()
  for op, e, s in rows:
    ex[op] += e
    st[op] += s
  return (sum(ex.values()), sum(st.values()),
          [(op, c, st[op]) for op, c in ex.most_common()])


def report(text: str, elements: int = 0, top: int = 20) -> str:
  cases, kernels = parse(text)
  out = []
  for i, rows in enumerate(kernels):
    tot, stalls, ops = mix(rows)
    name = cases[i] if i < len(cases) else f"kernel {i}"
    per = f", {tot / elements:.2f} per element" if elements else ""
    out.append(f"{name}: {tot} executed{per}, {len(rows)} SASS lines, "
               f"{stalls} stall samples")
    for op, c, s in ops[:top]:
      pe = f" {c / elements:6.3f}/el" if elements else ""
      out.append(f"  {op:34s} {c:12d} {100 * c / tot:5.1f}%{pe}  "
                 f"stalls {100 * s / max(stalls, 1):5.1f}%")
  return "\n".join(out)


def main(argv):
  del argv
  if not _SASS.value:
    raise app.UsageError("give --sass: a file of ncu --print-source sass output")
  opener = gzip.open if _SASS.value.endswith(".gz") else open
  with opener(_SASS.value, "rt") as f:
    text = f.read()
  if not parse(text)[1]:
    raise app.UsageError(f"{_SASS.value} holds no SASS listing (run ncu with "
                         "--page source --print-source sass)")
  print(report(text, _ELEMENTS.value, _TOP.value))


if __name__ == "__main__":
  app.run(main)
