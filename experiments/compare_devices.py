r"""Which weight-only kernels are bound by memory bandwidth: one run on two GPUs.

Two GPUs with the same SMs and clocks but different memory (the H100 SXM and
the H200: 132 SMs each, the H200's HBM3e 1.4x the H100's stream bandwidth) take
the same time for work bound on chip (instruction issue, latency) and differ
by the bandwidth ratio for work bound by DRAM. For every row that two
``experiments/bench_kernels.py`` runs share (case, K, N, M), this prints the
fastest correct tiling's time on each device, the time ratio and where it
falls between 1 (on-chip bound) and the measured stream-bandwidth ratio
(bandwidth bound), as a markdown table::

  PYTHONPATH=. python3 experiments/compare_devices.py \
      --fast=benchmarks/kernels_h200_runs/run_wg1.json \
      --slow=benchmarks/kernels_h100_runs/run_wg1.json

Only measured times are used (tilings whose relative error passed the
benchmark's check); the two runs may have picked different tilings, which the
table shows.
"""
from __future__ import annotations

import json
import math
import sys

from absl import app
from absl import flags

from experiments.bench_kernels import MAX_REL_ERR  # a tiling's error check

_FAST = flags.DEFINE_string("fast", None, "run JSON of the device with more "
                            "memory bandwidth")
_SLOW = flags.DEFINE_string("slow", None, "run JSON of the other device")
_OUT = flags.DEFINE_string("out", "", "also write the markdown here")


def best_rows(res: dict) -> dict:
  """``{(case, k, n, m): (us, config)}``: each row's fastest correct tiling."""
  out = {}
  for r in res["wo"]:
    good = [(v["us"], v["config"]) for v in r["variants"].values()
            if v.get("us") is not None and v.get("rel_err") is not None
            and v["rel_err"] < MAX_REL_ERR]
    if good:
      out[(r["kernel"], r["k"], r["n"], r["m"])] = min(good, key=lambda g: g[0])
  return out


def compare(fast: dict, slow: dict) -> str:
  """The markdown table of ``fast`` vs ``slow`` (two bench_kernels results)."""
  for res, name in ((fast, "--fast"), (slow, "--slow")):
    if not (res.get("ceilings") or {}).get("stream_TBps"):
      raise ValueError(f"{name}: the run has no measured stream bandwidth "
                       "(ceilings.stream_TBps); rerun bench_kernels without --smoke")
  bw_f, bw_s = fast["ceilings"]["stream_TBps"], slow["ceilings"]["stream_TBps"]
  if bw_f <= bw_s:
    raise ValueError(f"--fast ({fast['meta']['device']}, {bw_f:.2f} TB/s) must "
                     f"have more bandwidth than --slow ({slow['meta']['device']}, "
                     f"{bw_s:.2f} TB/s); swap them")
  bw = bw_f / bw_s
  a, b = best_rows(fast), best_rows(slow)
  keys = sorted(set(a) & set(b))
  if not keys:
    raise ValueError("the two runs share no (case, K, N, M) row")
  dev_f, dev_s = fast["meta"]["device"], slow["meta"]["device"]
  def run_of(meta):
    return ", ".join(f"{k} {meta[k]}" for k in ("jax", "date", "started")
                     if meta.get(k))
  lines = [
      f"Runs: {dev_f}: {run_of(fast['meta']) or 'jax version not recorded'}; "
      f"{dev_s}: {run_of(slow['meta']) or 'jax version not recorded'}.", "",
      f"{dev_f} ({bw_f:.2f} TB/s) vs {dev_s} ({bw_s:.2f} TB/s): stream "
      f"bandwidth ratio {bw:.2f}. Bandwidth-bound share = log(time ratio) / "
      f"log(bandwidth ratio): 0 = the same time on both (bound on chip), "
      f"1 = slower by the whole bandwidth ratio.", "",
      f"| case | K x N | M | {dev_f} us | {dev_s} us | time ratio | "
      "bandwidth-bound share | tilings (fast / slow) |",
      "|---|---|---|---|---|---|---|---|"]
  for key in keys:
    (uf, cf), (us_, cs) = a[key], b[key]
    r = us_ / uf
    share = math.log(r) / math.log(bw) if r > 0 else float("nan")
    case, k, n, m = key
    same = "same" if cf == cs else f"{tuple(cf)} / {tuple(cs)}"
    lines.append(f"| {case} | {k}x{n} | {m} | {uf:.1f} | {us_:.1f} | {r:.2f} | "
                 f"{share:.2f} | {same} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if not _FAST.value or not _SLOW.value:
    sys.exit("pass --fast=<run JSON> and --slow=<run JSON>")
  with open(_FAST.value) as f:
    fast = json.load(f)
  with open(_SLOW.value) as f:
    slow = json.load(f)
  md = compare(fast, slow)
  print(md)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(f"Command: `PYTHONPATH=. python3 experiments/compare_devices.py "
              f"--fast={_FAST.value} --slow={_SLOW.value} --out={_OUT.value}`\n\n")
      f.write(md)


if __name__ == "__main__":
  app.run(main)
