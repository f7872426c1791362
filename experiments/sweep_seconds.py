r"""Seconds per sweep point, side by side for several runs of the same sweep.

Each row of a sweep's ``results.jsonl`` records the wall-clock ``seconds`` of
its point; this prints one markdown table with a column per run (e.g. the
same sweep on two commits), the total, and each run's total over the first's. ``--field=cpu_seconds`` compares the
process's CPU time instead (recorded by ``lowbit_jax.sweep.run``), which a
busy shared machine disturbs less than the wall clock.

  python -m experiments.sweep_seconds \
      --runs=before:/tmp/old/results.jsonl,after:results/sweep_minilm/results.jsonl
"""
from absl import app
from absl import flags

from lowbit_jax import sweep

_RUNS = flags.DEFINE_list("runs", [], "label:path of a results.jsonl, one per run")
_FIELD = flags.DEFINE_enum("field", "seconds", ["seconds", "cpu_seconds"],
                           "wall clock, or the process's CPU time")


def table(runs: list, field: str = "seconds") -> str:
  """The markdown table for ``[(label, rows), ...]``; points in the first run's order.

  Args:
    runs: ``(label, rows of a results.jsonl)`` per run.
    field: ``"seconds"`` (wall clock) or ``"cpu_seconds"``.
  """
  keys = ("method", "scheme", "target")
  by_id = [{r["id"]: r for r in rows} for _, rows in runs]
  ids = list(by_id[0])
  for d in by_id[1:]:
    ids += [i for i in d if i not in ids]
  unit = "CPU s" if field == "cpu_seconds" else "s"
  head = "| point | " + " | ".join(f"{label} ({unit})" for label, _ in runs) + " |"
  out = [head, "|---" * (len(runs) + 1) + "|"]
  totals = [0.0] * len(runs)
  for i in ids:
    row = next(d[i] for d in by_id if i in d)
    cells = []
    for j, d in enumerate(by_id):
      if i in d and field in d[i]:
        totals[j] += d[i][field]
        cells.append(f"{d[i][field]:.1f}")
      else:
        cells.append("")
    name = " ".join(str(row.get(k, "")) for k in keys if k in row)
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  out.append("| **total** | " + " | ".join(f"**{t:.0f}**" for t in totals) + " |")
  if len(runs) > 1 and totals[0]:
    out.append("| total / first run | " + " | ".join(
        f"{t / totals[0]:.2f}" for t in totals) + " |")
  return "\n".join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _RUNS.value:
    raise app.UsageError("pass --runs=label:results.jsonl[,label:results.jsonl...]")
  runs = []
  for item in _RUNS.value:
    label, sep, path = item.partition(":")
    if not sep:
      raise app.UsageError(f"--runs entries are label:path, got {item!r}")
    rows = sweep.load_results(path)
    if not rows:
      raise app.UsageError(f"{path} has no results")
    runs.append((label, rows))
  print(table(runs, _FIELD.value))


if __name__ == "__main__":
  app.run(main)
