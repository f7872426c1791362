"""The sweep runner: expansion, resume without redoing work, tables, plots."""
import json
import os

import numpy as np
import pytest

from lowbit_jax import schemes, sweep


def test_expand_product_and_exclude():
  pts = sweep.expand({"a": [1, 2], "b": ["x", "y", "z"]}, exclude=[{"a": 2, "b": "y"}])
  assert len(pts) == 5
  assert {"a": 2, "b": "y"} not in pts
  assert pts[0] == {"a": 1, "b": "x"}


def test_expand_rejects_scalar_axis():
  with pytest.raises(ValueError, match="must be a list"):
    sweep.expand({"a": "abc"})
  # An empty axis or an all-excluded product ran zero points and rewrote the
  # table empty; an exclusion naming no axis excluded nothing, silently.
  with pytest.raises(ValueError, match="axis 'b' has no values"):
    sweep.expand({"a": [1], "b": []})
  with pytest.raises(ValueError, match="every point of the sweep is excluded"):
    sweep.expand({"a": [1]}, exclude=[{"a": 1}])
  with pytest.raises(ValueError, match=r"names \['schme'\], which is no axis"):
    sweep.expand({"scheme": ["fp32", "int8"]}, exclude=[{"schme": "fp32"}])
  assert sweep.expand({"bits": (b for b in (4, 8))}) == [{"bits": 4}, {"bits": 8}]


def test_run_skips_finished_points(tmp_path):
  path = str(tmp_path / "r.jsonl")
  calls = []

  def fn(p):
    calls.append(p)
    return {"v": p["a"] * 10.0}

  pts = sweep.expand({"a": [1, 2, 3]})
  rows = sweep.run(pts[:2], fn, path, log=lambda s: None)
  assert [r["metrics"]["v"] for r in rows] == [10.0, 20.0]
  rows = sweep.run(pts, fn, path, log=lambda s: None)
  assert len(calls) == 3  # the first two were not rerun
  assert [r["metrics"]["v"] for r in rows] == [10.0, 20.0, 30.0]
  with open(path) as f:
    assert len(f.readlines()) == 3


def test_torn_line_is_ignored_and_point_rerun(tmp_path):
  path = str(tmp_path / "r.jsonl")
  p = {"a": 1}
  with open(path, "w") as f:
    f.write(json.dumps(dict(p, id=sweep.point_id(p), metrics={"v": 1.0})) + "\n")
    f.write('{"a": 2, "id": "')  # killed mid-write
  rows = sweep.load_results(path)
  assert len(rows) == 1
  # The next run's rows start lines of their own (they were glued onto the
  # fragment, unreadable, and their points ran again on every resume).
  fn = lambda p: {"v": p["a"] * 1.0}  # noqa: E731
  sweep.run([{"a": 1}, {"a": 2}], fn, path, log=lambda s: None)
  assert sorted(r["a"] for r in sweep.load_results(path)) == [1, 2]
  calls = []
  sweep.run([{"a": 1}, {"a": 2}], lambda p: calls.append(p) or {}, path,
            log=lambda s: None)
  assert not calls


def test_settings_are_part_of_a_points_identity_and_repeats_run_once(tmp_path):
  path = str(tmp_path / "r.jsonl")
  calls = []

  def fn(p):
    calls.append(p)
    return {"v": 1.0}

  pts = [{"a": 1}, {"a": 2}, {"a": 1}]
  rows = sweep.run(pts, fn, path, log=lambda s: None, settings={"n_eval": 16})
  assert len(calls) == 2 and [r["a"] for r in rows] == [1, 2]
  assert rows[0]["settings"] == {"n_eval": 16}
  sweep.run(pts, fn, path, log=lambda s: None, settings={"n_eval": 16})
  assert len(calls) == 2   # same settings: resumed
  sweep.run(pts, fn, path, log=lambda s: None, settings={"n_eval": 64})
  assert len(calls) == 4   # other settings: measured again, not reused


def test_rerun_without_resume_keeps_rows_until_replaced(tmp_path):
  # resume=False must not empty the file before its points have run again.
  path = str(tmp_path / "r.jsonl")
  fn = lambda p: {"v": p["a"] * 1.0}  # noqa: E731
  sweep.run([{"a": 1}, {"a": 2}, {"a": 3}], fn, path, log=lambda s: None)

  def killed(p):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sweep.run([{"a": 1}], killed, path, resume=False, log=lambda s: None)
  assert sorted(r["a"] for r in sweep.load_results(path)) == [1, 2, 3]
  sweep.run([{"a": 1}], lambda p: {"v": 9.0}, path, resume=False, log=lambda s: None)
  rows = sweep.load_results(path)
  assert sorted(r["a"] for r in rows) == [1, 2, 3]   # one row per point
  assert {r["a"]: r["metrics"]["v"] for r in rows} == {1: 9.0, 2: 2.0, 3: 3.0}


def test_pareto_front():
  rows = [{"metrics": {"bits": b, "q": q}} for b, q in
          [(4, 0.9), (8, 0.99), (6, 0.8), (2, 0.5), (32, 1.0)]]
  front = sweep.pareto_front(rows, "bits", "q")
  assert [r["metrics"]["bits"] for r in front] == [2, 4, 8, 32]
  # A point whose metric is NaN (it failed numerically) is never on the front.
  rows.append({"metrics": {"bits": 1, "q": float("nan")}})
  front = sweep.pareto_front(rows, "bits", "q")
  assert [r["metrics"]["bits"] for r in front] == [2, 4, 8, 32]
  assert [r["metrics"]["bits"] for r in sweep.pareto_front(
      rows, "bits", "q", maximize_y=False)] == [2]


def test_mean_sqnr_is_nan_when_a_layer_is():
  from lowbit_jax import pipelines  # pylint: disable=g-import-not-at-top
  assert np.isnan(pipelines._mean([float("nan"), 40.0]))  # pylint: disable=protected-access
  assert pipelines._mean([float("inf"), 40.0]) == 40.0  # pylint: disable=protected-access
  assert pipelines._mean([float("inf")]) == float("inf")  # pylint: disable=protected-access
  # A layer with nothing of its signal left (-inf dB) was dropped as lossless.
  assert pipelines._mean([-float("inf"), 40.0]) == -float("inf")  # pylint: disable=protected-access


def test_exclusions_that_match_nothing_are_named():
  said = []
  pts = sweep.expand({"scheme": ["fp32", "int8"], "target": ["weights", "weights+acts"]},
                     exclude=[{"scheme": "fp32", "target": "weights+act"}],
                     log=said.append)
  assert len(pts) == 4 and len(said) == 1
  assert "target='weights+act' is not among axis 'target'" in said[0]
  said.clear()
  sweep.expand({"r3": [False, True]}, exclude=[{"r3": "True"}], log=said.append)
  assert "r3='True' is not among" in said[0]


def test_rows_are_appended_only_and_checked_before_they_are_written(tmp_path):
  path = str(tmp_path / "r.jsonl")
  quiet = lambda s: None  # noqa: E731
  # Another process appending to the same file while a rerun (resume=False)
  # ran: the rerun's compaction replaced the file and the other's rows went
  # to the deleted copy.
  other = open(path, "a")   # pylint: disable=consider-using-with
  try:
    sweep.run([{"a": 0}], lambda p: {"v": 1.0}, path, log=quiet)
    sweep.run([{"a": 0}], lambda p: {"v": 9.0}, path, resume=False, log=quiet)
    other.write(json.dumps({"a": 1, "id": "x1", "metrics": {"v": 2.0}}) + "\n")
    other.flush()
  finally:
    other.close()
  rows = sweep.load_results(path)
  assert {r["id"]: r["metrics"]["v"] for r in rows} == {sweep.point_id({"a": 0}): 9.0,
                                                        "x1": 2.0}
  # Metrics that are not a dict, or hold what JSON cannot, were written (None:
  # every later run crashed reading it) or lost the point's work unnamed.
  with pytest.raises(TypeError, match="returned NoneType.*must return a dict"):
    sweep.run([{"a": 2}], lambda p: None, path, log=quiet)
  with pytest.raises(TypeError, match=r"\['bad'\] is a object"):
    sweep.run([{"a": 2}], lambda p: {"bad": object()}, path, log=quiet)
  assert len(sweep.load_results(path)) == 2
  row, = sweep.run([{"a": 3}], lambda p: {"v": np.float32(0.5), "l": np.arange(2)},
                   path, log=quiet)
  assert row["metrics"] == {"v": 0.5, "l": [0, 1]}
  # A foreign results file is named; garbage bytes of a torn line are skipped.
  with open(path, "ab") as f:
    f.write(b"\xff\xfe torn")
  assert len(sweep.load_results(path)) == 3
  with open(tmp_path / "foreign.jsonl", "w") as f:
    f.write('{"loss": 1.0}\n')
  with pytest.raises(ValueError, match="line 1 is not a sweep row"):
    sweep.run([{"a": 0}], lambda p: {"v": 1.0}, str(tmp_path / "foreign.jsonl"),
              log=quiet)


def test_table_and_plots(tmp_path):
  rows = [{"scheme": "int8", "target": "weights", "metrics": {"bits": 8.1, "q": 0.99}},
          {"scheme": "mxfp4", "target": "weights", "metrics": {"bits": 4.25, "q": 0.9}}]
  md = sweep.markdown_table(rows, ["scheme", "target"], ["bits", "q"])
  assert md.splitlines()[0] == "| scheme | target | bits | q |"
  assert "| mxfp4 | weights | 4.25 | 0.9 |" in md
  # A cosine of 0.99996 printed as 1 read as lossless; a '|' split a cell.
  near = [{"scheme": "a|b", "metrics": {"q": 0.99996}}, {"scheme": "c", "metrics": {"q": 1.0}}]
  md = sweep.markdown_table(near, ["scheme"], ["q"])
  assert "| a\\|b | 0.99996 |" in md and "| c | 1 |" in md
  p = sweep.plot_tradeoff(rows, "bits", "q", "scheme", "target", str(tmp_path / "a.png"))
  h = sweep.plot_heatmap(np.array([[1.0, np.inf], [3.0, 4.0]]), ["a", "b"], ["l0", "l1"],
                         str(tmp_path / "h.png"))
  assert os.path.getsize(p) > 1000 and os.path.getsize(h) > 1000


def test_scheme_bits():
  assert schemes.weight_bits(schemes.get("int4_g128")) == pytest.approx(4 + 32 / 128)
  assert schemes.weight_bits(schemes.get("mxfp4")) == pytest.approx(4 + 8 / 32)
  with pytest.raises(KeyError, match="known"):
    schemes.get("int5")
