"""``experiments/bench_kernels.py`` crash isolation: an XLA abort (a failed CHECK
kills the process) must not lose the call."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from experiments import bench_kernels as bk  # pylint: disable=g-import-not-at-top,wrong-import-position

_LOG = ("F1203 17:15:09.266184     716 triton_tiling_propagation.cc:557] Check "
        "failed: dst_dim_it != dst_dim_end ")


def test_crash_reason_keeps_xlas_check():
  why = bk.crash_reason(-6, ["W1203 cuda_timer.cc:88] Delay kernel timed out",
                             _LOG, "*** Check failure stack trace: ***"])
  assert why == ("signal 6: triton_tiling_propagation.cc:557] Check failed: "
                 "dst_dim_it != dst_dim_end")
  assert bk.crash_reason(-9, []) == "signal 9"


def test_crash_state_isolates_the_culprit():
  # Threaded compiles: all in flight become suspects, nothing is skipped yet.
  s = bk.update_crash_state({}, ["compile a", "compile b"], "signal 6: x")
  assert s["crashed"] == [] and s["suspects"] == ["compile a", "compile b"]
  # The next child compiles suspects alone: the one in flight is the culprit.
  s = bk.update_crash_state(s, ["compile b"], "signal 6: y")
  assert s["crashed"] == [dict(job="compile b", reason="signal 6: y")]
  assert s["suspects"] == ["compile a"] and s["outside"] == 0
  # An abort outside any job is counted (the parent stops after two).
  s = bk.update_crash_state(s, [], "signal 11")
  assert s["outside"] == 1 and len(s["crashed"]) == 1


@pytest.mark.slow
def test_aborting_child_is_restarted_and_the_job_skipped(tmp_path):
  # ~65 s on 2 cores: a smoke run whose child aborts compiling one XLA program.
  job = "xla_fused int8_pc 2048x256 M=16"
  r = subprocess.run(
      [sys.executable, "experiments/bench_kernels.py", "--smoke",
       "--isolate=true", "--kernels=int8_pc", "--tokamax=false", "--w8a8=",
       "--block8b=false", "--phases=base", f"--abort_on={job}",
       f"--out_dir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads((tmp_path / "kernels_h200.json").read_text())
  assert [c["job"] for c in res["crashed"]] == ["compile " + job]
  assert res["meta"]["restarts"] == 1
  rows = {(x["kernel"], x["m"]): x for x in res["wo"]}
  # The row of the crashed program is still measured (the other decode), and
  # the other batch's rows are all there.
  assert rows[("int8_pc", 16)]["xla_fused_note"].startswith("native decode failed")
  assert rows[("int8_pc", 1)]["xla_fused_us"] > 0
  assert "Aborted the process" in (tmp_path / "kernels_h200.md").read_text()
