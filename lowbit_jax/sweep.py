"""Sweeps as data: expand a product of axes into points, run each point once,
write one JSON line per point, then tables and plots.

A rerun skips every point already in the results file (matched by its id, a
hash of the point's canonical JSON and of the settings every point shares, so
a rerun with other settings runs its points again instead of reusing rows
measured under the old ones), so an interrupted sweep resumes where it
stopped and finished work is never lost: each line is flushed as it is written.
Non-finite metrics (a NaN perplexity) stay in the table as they are but are
never on a Pareto front. The results file is only ever appended to (several
processes may share it); ``load_results`` reads the last row of each id.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import time
from typing import Callable, Iterable, Optional, Sequence


def expand(axes: dict, exclude: Sequence[dict] = (), *,
           log: Optional[Callable[[str], None]] = None) -> list[dict]:
  """The product of ``axes`` (name -> list of values), minus excluded points.

  Args:
    axes: ordered mapping from axis name to the values it takes.
    exclude: partial points; a point matching every key of one is dropped.

  Returns:
    Points as dicts, in product order.

  Raises:
    ValueError: no axes, an axis that is not a non-empty list, an exclusion
      naming a key that is no axis (it would exclude nothing), or no point
      left (a sweep of zero points would rewrite its table empty).

  An exclusion whose value is not among its axis's values matches no point:
  ``log`` (default: stderr) says so, naming the value and the axis's values
  (a typo, or an axis narrowed on the command line, where it is expected).
  """
  if not axes:
    raise ValueError("a sweep needs at least one axis")
  for k, v in axes.items():
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
      raise ValueError(f"axis {k!r} must be a list of values, got {v!r}")
  axes = {k: list(v) for k, v in axes.items()}   # (an iterator is read once)
  for k, v in axes.items():
    if not v:
      raise ValueError(f"axis {k!r} has no values: give it at least one")
  names = list(axes)
  for ex in exclude:
    unknown = sorted(set(ex) - set(names))
    if unknown:
      raise ValueError(f"exclude entry {dict(ex)!r} names {unknown}, which "
                       f"{'is no axis' if len(unknown) == 1 else 'are no axes'} "
                       f"(the axes: {names}): it would exclude nothing")
  for ex in exclude:
    absent = {k: v for k, v in ex.items() if v not in axes[k]}
    if absent:
      (log or log_stderr)(
          f"sweep: exclude entry {dict(ex)!r} matches no point: "
          + ", ".join(f"{k}={v!r} is not among axis {k!r}'s values {axes[k]!r}"
                      for k, v in absent.items()))
  pts = [dict(zip(names, vals)) for vals in itertools.product(*(list(axes[n])
                                                                for n in names))]
  pts = [p for p in pts
         if not any(all(p.get(k) == v for k, v in ex.items()) for ex in exclude)]
  if not pts:
    raise ValueError("every point of the sweep is excluded: nothing would run")
  return pts


def point_id(point: dict, settings: Optional[dict] = None) -> str:
  """Stable id of a point: sha1 of its canonical JSON, 12 hex digits.

  ``settings`` (what every point of the sweep shares, e.g. the evaluation
  size) is part of the id when given and not empty.
  """
  key = dict(point, _settings=settings) if settings else point
  return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def load_results(path: str) -> list[dict]:
  """Rows of a results file, one per point id (the last written: a rerun's
  row supersedes the old one), in the order the ids first appear; a missing
  file gives []. A torn or garbled line from a killed run is ignored.

  Raises:
    ValueError: a row without an ``id`` (not a sweep's results file).
  """
  if not os.path.exists(path):
    return []
  rows = {}
  # (Rows are ASCII JSON: undecodable bytes can only be a torn line's.)
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(row, dict) or "id" not in row:
        raise ValueError(f"{path} line {n} is not a sweep row (no 'id'): the "
                         "file was not written by lowbit_jax.sweep; give the "
                         "sweep another results path (out_dir)")
      rows[row["id"]] = row
  return list(rows.values())


def _end_with_newline(path: str) -> None:
  """A killed run can leave a torn last line: end it, so the next row appended
  starts a line of its own (the fragment stays an unreadable line, skipped)."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b"\n":
      f.write(b"\n")


def run(points: Sequence[dict], fn: Callable[[dict], dict], results_path: str, *,
        resume: bool = True, log: Callable[[str], None] = None,
        settings: Optional[dict] = None) -> list[dict]:
  """Runs ``fn`` on every point not yet in ``results_path``.

  Args:
    points: the points (dicts of JSON-able values).
    fn: point -> metrics dict (JSON-able).
    results_path: JSON-lines file; one row per point: the point's fields, its
      ``id``, ``metrics``, ``seconds`` (wall clock) and ``cpu_seconds`` (this
      process's CPU time, all threads: on a shared machine it moves less with
      the load than the wall clock does).
    resume: skip points already present (by id); False runs every point
      again, its new rows superseding the old ones of the same ids (rows of
      other points stay). Rows are only ever appended, never rewritten, so
      several processes may append to one results file: ``load_results``
      reads the last row of each id.
    log: progress printer (default: stderr).
    settings: what every point shares (JSON-able; e.g. a config's fixed
      keyword arguments): part of each id and stored in each row, so rows
      measured under other settings are not reused.

  Returns:
    All rows for ``points`` (old and new), in point order; a point given
    twice runs once.
  """
  log = log or log_stderr
  os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
  settings = dict(settings) if settings else None
  pid = lambda p: point_id(p, settings)  # noqa: E731
  unique = list({pid(p): p for p in points}.values())
  if len(unique) < len(points):
    log(f"sweep: {len(points) - len(unique)} repeated points dropped")
  points = unique
  done = {r["id"]: r for r in load_results(results_path)} if resume else {}
  todo = [p for p in points if pid(p) not in done]
  log(f"sweep: {len(points)} points, {len(points) - len(todo)} already done, "
      f"{len(todo)} to run -> {results_path}")
  t_start = time.time()
  # Rows are always appended, so an interrupted run (resume=False included)
  # never loses the rows already there; a rerun point's new row supersedes
  # its old one (last row wins). The file is never rewritten: another
  # process may be appending to it (a compaction here lost its rows).
  _end_with_newline(results_path)
  with open(results_path, "a") as f:
    for i, p in enumerate(todo):
      t0, c0 = time.time(), time.process_time()
      metrics = _check_metrics(fn(p), p)
      row = dict(p, id=pid(p), metrics=metrics, seconds=round(time.time() - t0, 3),
                 cpu_seconds=round(time.process_time() - c0, 3))
      if settings:
        row["settings"] = settings
      f.write(json.dumps(row, sort_keys=True) + "\n")
      f.flush()
      done[row["id"]] = row
      el = time.time() - t_start
      eta = el / (i + 1) * (len(todo) - i - 1)
      log(f"[{i + 1}/{len(todo)}] {_label(p)}: " +
          ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()
                    if not isinstance(v, (dict, list))) +
          f"  ({row['seconds']:.1f}s, eta {eta:.0f}s)")
  return [done[pid(p)] for p in points]


def _jsonable(v, where: str):
  """``v`` as plain JSON values: numpy and JAX scalars and arrays become
  numbers and lists; anything else JSON cannot hold raises naming ``where``."""
  if isinstance(v, dict):
    out = {}
    for k, x in v.items():
      if not isinstance(k, str):
        raise TypeError(f"{where}: key {k!r} is not a string (JSON object keys "
                        "are strings)")
      out[k] = _jsonable(x, f"{where}[{k!r}]")
    return out
  if isinstance(v, (list, tuple)):
    return [_jsonable(x, f"{where}[{i}]") for i, x in enumerate(v)]
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if hasattr(v, "__array__") and hasattr(v, "dtype") and hasattr(v, "shape"):
    import numpy as np  # pylint: disable=g-import-not-at-top
    a = np.asarray(v)
    if a.dtype.kind in "biuf":
      return a.item() if a.ndim == 0 else a.tolist()
  raise TypeError(f"{where} is a {type(v).__name__}, which a results row cannot "
                  "hold: return numbers, strings, lists and dicts of them")


def _check_metrics(metrics, point: dict) -> dict:
  """The point function's metrics as JSON values, checked before they are
  written (a None was written, then every later run crashed reading it)."""
  if not isinstance(metrics, dict):
    raise TypeError(f"the point function returned {type(metrics).__name__} for "
                    f"{point!r}; it must return a dict of metrics (nothing was "
                    "written for this point)")
  return _jsonable(metrics, f"metrics of {point!r}")


def log_stderr(msg: str) -> None:
  """The default progress printer of ``run`` (and the sweep front ends)."""
  print(msg, file=sys.stderr, flush=True)


def _label(p: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in p.items())


def _fmt(v) -> str:
  if isinstance(v, float):
    if math.isinf(v) or math.isnan(v):
      return str(v)
    out = f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if float(out) in (0.0, 1.0, -1.0) and float(out) != v:
      # (a cosine of 0.99996 printed as 1 reads as lossless)
      out = f"{v:.8g}"
    return out
  return str(v)


def _cell(v) -> str:
  return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], keys: Sequence[str],
                   metrics: Sequence[str]) -> str:
  """A markdown table: one row per result, ``keys`` then ``metrics`` columns."""
  head = "| " + " | ".join(list(keys) + list(metrics)) + " |"
  sep = "|" + "---|" * (len(keys) + len(metrics))
  lines = [head, sep]
  for r in rows:
    m = r.get("metrics", {})
    cells = [_cell(r.get(k, "")) for k in keys] + [_cell(_fmt(m.get(k, "")))
                                                   for k in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def pareto_front(rows: Sequence[dict], x: str, y: str, *,
                 maximize_y: bool = True) -> list[dict]:
  """Rows not dominated in (lower ``x``, better ``y``), sorted by x; rows
  whose ``x`` or ``y`` is missing or not finite are never on it."""
  def finite(r):
    return all(isinstance(r["metrics"].get(k), (int, float))
               and math.isfinite(r["metrics"][k]) for k in (x, y))
  pts = sorted((r for r in rows if finite(r)),
               key=lambda r: (r["metrics"][x],
                              -r["metrics"][y] if maximize_y else r["metrics"][y]))
  front, best = [], None
  for r in pts:
    v = r["metrics"][y]
    if best is None or (v > best if maximize_y else v < best):
      front.append(r)
      best = v
  return front


def plot_tradeoff(rows: Sequence[dict], x: str, y: str, label_key: str,
                  group_key: Optional[str], path: str, *, title: str = "",
                  maximize_y: bool = True) -> str:
  """Scatter of metric ``y`` vs ``x`` (bits per weight), Pareto front drawn."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  groups = sorted({r.get(group_key, "") for r in rows}) if group_key else [""]
  markers = "os^Dvx"
  for gi, g in enumerate(groups):
    sel = [r for r in rows if (not group_key or r.get(group_key, "") == g)
           and x in r["metrics"] and y in r["metrics"]]
    ax.scatter([r["metrics"][x] for r in sel], [r["metrics"][y] for r in sel],
               marker=markers[gi % len(markers)], label=str(g) if g else None)
    for r in sel:
      ax.annotate(str(r.get(label_key, "")), (r["metrics"][x], r["metrics"][y]),
                  fontsize=7, xytext=(3, 3), textcoords="offset points")
  front = pareto_front(rows, x, y, maximize_y=maximize_y)
  ax.plot([r["metrics"][x] for r in front], [r["metrics"][y] for r in front], "k--",
          lw=0.8, label="Pareto front")
  xs = [r["metrics"][x] for r in rows if x in r["metrics"]]
  if xs and min(xs) > 0 and max(xs) / min(xs) > 4:
    ax.set_xscale("log", base=2)  # bits per weight: 2, 4, 8 ... 32 evenly spaced
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str],
                 col_labels: Sequence[str], path: str, *, title: str = "",
                 cbar_label: str = "SQNR (dB)") -> str:
  """A heatmap (e.g. per-layer SQNR: rows = schemes, columns = layers)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  m = np.asarray(matrix, np.float64)
  fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(col_labels) + 2),
                                  max(3, 0.35 * len(row_labels) + 1.5)))
  finite = m[np.isfinite(m)]
  vmax = float(finite.max()) if finite.size else 1.0
  vmin = float(finite.min()) if finite.size else 0.0
  # +inf (a lossless layer) takes the top colour, -inf the bottom; NaN (no
  # number) is masked and drawn grey, never as a value.
  shown = np.ma.masked_invalid(np.clip(m, vmin, vmax))
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
  im = ax.imshow(shown, aspect="auto", cmap=cmap)
  ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
  ax.set_xticks(range(len(col_labels)), col_labels, rotation=90, fontsize=6)
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label=cbar_label)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
