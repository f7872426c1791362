"""``experiments/compare_devices.py``: the bandwidth-bound share of each row
from two runs of ``bench_kernels`` (synthetic runs, no GPU)."""
import pytest

from experiments import compare_devices


def _run(device, tbps, rows):
  return dict(meta=dict(device=device), ceilings=dict(stream_TBps=tbps),
              wo=[dict(kernel=c, k=k, n=n, m=m, variants={
                  str(cfg): dict(us=us, rel_err=err, config=cfg)
                  for cfg, us, err in variants})
                  for c, k, n, m, variants in rows])


def test_share_is_zero_on_chip_and_one_at_the_bandwidth_ratio():
  cfg = [64, 256, 8, 4, 2]
  fast = _run("H200", 4.2, [("int4_pc", 8192, 8192, 1, [(cfg, 10.0, 1e-3)]),
                            ("mxfp4", 8192, 8192, 1, [(cfg, 20.0, 1e-3)]),
                            ("nvfp4", 8192, 8192, 1, [(cfg, 5.0, 1e-3)])])
  slow = _run("H100", 3.0, [
      ("int4_pc", 8192, 8192, 1, [(cfg, 14.0, 1e-3)]),
      # The faster tiling was wrong: never counted.
      ("mxfp4", 8192, 8192, 1, [(cfg, 20.0, 1e-3), ([1], 1.0, 0.5)])])
  md = compare_devices.compare(fast, slow)
  assert "| int4_pc | 8192x8192 | 1 | 10.0 | 14.0 | 1.40 | 1.00 | same |" in md
  assert "| mxfp4 | 8192x8192 | 1 | 20.0 | 20.0 | 1.00 | 0.00 | same |" in md
  assert "nvfp4" not in md            # in one run only


def test_refuses_swapped_or_unmeasured_runs():
  a = _run("H200", 4.2, [("int4_pc", 1, 1, 1, [([1], 1.0, 0.0)])])
  b = _run("H100", 3.0, [("int4_pc", 1, 1, 1, [([1], 1.0, 0.0)])])
  with pytest.raises(ValueError, match="swap them"):
    compare_devices.compare(b, a)
  b["ceilings"] = {}
  with pytest.raises(ValueError, match="no measured stream bandwidth"):
    compare_devices.compare(a, b)
  c = _run("H100", 3.0, [("int8_pc", 1, 1, 1, [([1], 1.0, 0.0)])])
  with pytest.raises(ValueError, match="share no"):
    compare_devices.compare(a, c)
