"""The Nsight Compute helpers of experiments/ (CPU: they read text)."""
import gzip

import pytest

from experiments import ncu_probe
from experiments import ncu_sass_mix

_HEAD = ("Address            Source                                                       "
         "Warp S Warp S # Samp Instru Thread\n")


def _line(addr: int, src: str, stall: int, executed: int) -> str:
  return f"0x{addr:012x}           {src:60s} {stall:<6d} 0      {stall:<6d} {executed:<6d} 1\n"


def _listing() -> str:
  text = "=== case wo:mxfp4@wgmma:64x64:1 config=Config(...)\n"
  text += "=== case wo:int4_g128:64x64:1 config=Config(...)\n"
  text += "Kernel Name        body_single_mosaic_gpu_kernel\n" + _HEAD
  text += _line(0, "PRMT R1, R2, R3, 0x80808080", 3, 100)
  text += _line(16, "@P0 PRMT R4, R5, R6, 0x26242220", 1, 50)
  text += _line(32, "HMUL2.BF16_V2 R7, R8.H0_H0, R7", 0, 50)
  text += "Kernel Name        body_single_mosaic_gpu_kernel\n" + _HEAD
  text += _line(0, "HADD2.BF16_V2 R1, R2, R3", 2, 40)
  return text


def test_sass_mix_sums_each_kernel_by_opcode():
  cases, kernels = ncu_sass_mix.parse(_listing())
  assert cases == ["wo:mxfp4@wgmma:64x64:1", "wo:int4_g128:64x64:1"]
  tot, stalls, ops = ncu_sass_mix.mix(kernels[0])
  assert (tot, stalls) == (200, 4)
  assert ops[0] == ("PRMT", 150, 4)  # the predicated line counts as its opcode
  assert ops[1] == ("HMUL2.BF16_V2", 50, 0)
  assert ncu_sass_mix.mix(kernels[1])[:2] == (40, 2)
  text = ncu_sass_mix.report(_listing(), elements=100)
  assert "wo:mxfp4@wgmma:64x64:1: 200 executed, 2.00 per element" in text
  assert " 1.500/el" in text


def test_sass_mix_reads_gzip_and_refuses_a_file_without_sass(tmp_path):
  good = tmp_path / "s.txt.gz"
  with gzip.open(good, "wt") as f:
    f.write(_listing())
  bad = tmp_path / "b.txt"
  bad.write_text("==PROF== nothing profiled\n")
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(["prog", f"--sass={bad}"])
  with pytest.raises(Exception, match="no SASS listing"):
    ncu_sass_mix.main([])
  flags.FLAGS(["prog", f"--sass={good}"])
  ncu_sass_mix.main([])  # prints the report


def test_ncu_probe_takes_the_code_order_and_a_whole_config():
  op, name, k, n, rest = ncu_probe._parse(  # pylint: disable=protected-access
      "wo:mxfp4@wgmma:8192x28672:1:64,256,8,4,4,0,1,1,0,1")
  assert (op, name, k, n) == ("wo", "mxfp4@wgmma", 8192, 28672)
  assert rest == [1, [64, 256, 8, 4, 4, 0, 1, 1, 0, 1]]
  with pytest.raises(Exception, match="is not"):
    ncu_probe._parse("wo:mxfp4:8192x28672")  # pylint: disable=protected-access


def test_ncu_probe_rejoins_config_fields_that_the_list_flag_split():
  # absl splits --cases at every comma, a case's Config fields included.
  pieces = "wo:int4_pc:4096x1024:1:64,256,8,4,4,wo:mxfp4:64x64:1,q:int8_pc:64x64".split(",")
  assert ncu_probe.case_list(pieces) == [
      "wo:int4_pc:4096x1024:1:64,256,8,4,4", "wo:mxfp4:64x64:1", "q:int8_pc:64x64"]
