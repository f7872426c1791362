"""The mains' user errors: one line on stderr, non-zero exit, before any work."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code_or_module, *args, module=False):
  cmd = [sys.executable] + (["-m", code_or_module] if module else ["-c", code_or_module])
  return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


_DEFINE = ("import experiments\n"
           "c = experiments.define_config('configs/ptq.py')\n"
           "from absl import flags\n"
           "import sys\n"
           "flags.FLAGS(sys.argv)\n"
           "print(c.value.point_kwargs.n_calib)\n")


def test_unknown_config_field_is_one_line_with_close_matches():
  r = _run(_DEFINE, "--config.point_kwargs.n_calb=3")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --config.point_kwargs.n_calb is not a field of the config; close "
      "matches: --config.point_kwargs.n_calib, --config.point_kwargs.n_eval, "
      "--config.point_kwargs"]
  r = _run(_DEFINE, "--config.modle=llama")
  assert r.returncode == 2 and "close matches: --config.model" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  r = _run(_DEFINE, "--config.point_kwargs.n_calib=3")
  assert r.returncode == 0 and r.stdout.strip() == "3"


@pytest.mark.slow  # imports the whole pipeline stack in a subprocess (~20 s on CI)
def test_ptq_checks_save_dir_before_computing(tmp_path):
  (tmp_path / "out").mkdir()
  r = _run("experiments.ptq", f"--config.save_dir={tmp_path / 'out'}",
           "--config.method=rtn", module=True)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "exists; pass --config.force=True" in lines[0], lines
  assert r.stdout == ""  # nothing was computed


def test_ncu_probe_names_the_case_syntax_for_a_bad_case():
  from absl import app  # pylint: disable=g-import-not-at-top
  from experiments import ncu_probe  # pylint: disable=g-import-not-at-top
  assert ncu_probe._parse("wo:int4_g128:8192x28672:16:64,256,16,4,2") == (  # pylint: disable=protected-access
      "wo", "int4_g128", 8192, 28672, [16, [64, 256, 16, 4, 2]])
  assert ncu_probe._parse("fq:mxfp4:4096x1024") == ("fq", "mxfp4", 4096, 1024, [])  # pylint: disable=protected-access
  for bad in ("x:mxfp4:8x8", "q:mxfp4:8x8:1", "wo:int4_pc:8192:1", "fq:mxfp4:8xz"):
    with pytest.raises(app.UsageError, match="q:<kind>:<K>x<N>"):
      ncu_probe._parse(bad)  # pylint: disable=protected-access
  r = _run("experiments.ncu_probe", "--cases=fq:mxfp4:8x8", module=True)
  assert r.returncode != 0 and "needs a Hopper GPU" in r.stderr


def test_bench_variants_parses_variants_and_refuses_bad_ones():
  from absl import app  # pylint: disable=g-import-not-at-top
  from experiments import bench_variants  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import _quantize  # pylint: disable=g-import-not-at-top
  got = bench_variants.parse_variants(
      "a:lowbit_jax.core._quantize._PER_BLOCK_MIN_ELEMENTS=1<<62;"
      " b:lowbit_jax.core._quantize._PER_BLOCK_MIN_ELEMENTS=0")
  assert [(n, [(m, a, v) for m, a, v in items]) for n, items in got] == [
      ("a", [(_quantize, "_PER_BLOCK_MIN_ELEMENTS", 1 << 62)]),
      ("b", [(_quantize, "_PER_BLOCK_MIN_ELEMENTS", 0)])]
  for bad, msg in [("a:lowbit_jax.core._quantize._NO_SUCH=1;b:x.y=2", "has no attribute"),
                   ("a:lowbit_jax.core._quantize._PER_BLOCK_MIN_ELEMENTS=1", "at least two"),
                   ("a:lowbit_jax.core._quantize._PER_BLOCK_MIN_ELEMENTS;b:q", "is not module"),
                   ("a;b", "has no name")]:
    with pytest.raises(app.UsageError, match=msg):
      bench_variants.parse_variants(bad)


def test_bench_gpu_dequantize_refuses_a_table_of_another_shape_before_timing(tmp_path):
  old = tmp_path / "old.json"
  old.write_text('{"shape": [8192, 8192], "dtype": "bfloat16", "enabled": [], '
                 '"entries": {}}')
  r = _run("experiments.bench_gpu_dequantize", "--smoke", "--formats=int4_g128",
           f"--out_dir={tmp_path / 'out'}", "--write_configs",
           f"--merge_configs={old}", module=True)
  assert r.returncode != 0, r.stderr
  assert "tilings for different shapes do not merge" in r.stderr
  assert not (tmp_path / "out").exists()  # nothing was timed or written


def test_bench_gpu_dequantize_rebuilds_the_table_from_a_cut_run(tmp_path):
  # --configs_from=<an earlier run's JSON> (a call cut before the table was
  # written): its rows merge into --merge_configs as a finished run's would,
  # nothing is timed (no GPU needed); another shape's table is refused.
  import json  # pylint: disable=g-import-not-at-top
  cfg = dict(tile_n=256, tile_k=64, k_per_cta=256, stages=2, rows=0)
  run = dict(command="bench", device="NVIDIA H200", jax="0.11.2",
             shape=[8192, 8192], dtype="bfloat16", rows=[
                 dict(format="int8_row", kind="int8_row", xla_us=81.0,
                      best=dict(config=cfg, us=73.0)),        # 1.11x: enabled
                 dict(format="nf4", kind="nf4_g64", xla_us=85.0,
                      best=dict(config=cfg, us=95.0)),        # slower: off
                 dict(format="mxfp4", error="skipped")])      # not timed
  old = dict(shape=[8192, 8192], dtype="bfloat16", enabled=["nf4_g64", "int4_pc"],
             notes=["int4_g32: off by hand"],
             entries={"nf4_g64": dict(cfg, us=80.0, xla_us=85.0),
                      "int4_pc": dict(cfg, us=59.0, xla_us=81.0)})
  (tmp_path / "run.json").write_text(json.dumps(run))
  (tmp_path / "old.json").write_text(json.dumps(old))
  r = _run("experiments.bench_gpu_dequantize", f"--configs_from={tmp_path / 'run.json'}",
           f"--merge_configs={tmp_path / 'old.json'}", f"--out_dir={tmp_path / 'out'}",
           module=True)
  assert r.returncode == 0, r.stderr
  got = json.loads((tmp_path / "out" / "gpu_dequantize_configs.json").read_text())
  assert got["enabled"] == ["int4_pc", "int8_row"]
  assert got["entries"]["nf4_g64"]["us"] == 95.0  # the new measurement
  assert got["entries"]["int4_pc"]["us"] == 59.0  # kept from the old table
  assert got["jax"] == "0.11.2" and got["shape"] == [8192, 8192]
  assert got["notes"] == ["int4_g32: off by hand"]  # kept from the old table
  old["shape"] = [4096, 4096]
  (tmp_path / "old.json").write_text(json.dumps(old))
  r = _run("experiments.bench_gpu_dequantize", f"--configs_from={tmp_path / 'run.json'}",
           f"--merge_configs={tmp_path / 'old.json'}", f"--out_dir={tmp_path / 'out2'}",
           module=True)
  assert r.returncode != 0 and "do not merge" in r.stderr


def test_bench_primitives_patch_replaces_rows_and_refuses_another_tensor(tmp_path):
  # --report=run.json --patch=later.json (two recorded H200 runs): the later
  # run's rows replace the same (format, op) rows, a note names the later run;
  # a run of another tensor is refused and the report left as it was.
  import json  # pylint: disable=g-import-not-at-top
  bench = os.path.join(ROOT, "benchmarks")
  with open(os.path.join(bench, "primitives_h200_s28.json")) as f:
    base = json.load(f)
  with open(os.path.join(bench, "primitives_h200_s28e.json")) as f:
    later = json.load(f)
  run, p = tmp_path / "run.json", tmp_path / "later.json"
  run.write_text(json.dumps(base))
  p.write_text(json.dumps(later))
  r = _run("experiments.bench_primitives", f"--report={run}", f"--patch={p}", module=True)
  assert r.returncode == 0, r.stderr
  got = json.loads(run.read_text())
  key = lambda x: (x.get("format"), x.get("op"))  # noqa: E731
  new = {key(x): x for x in later["prims"] if "format" in x}
  assert [key(x) for x in got["prims"]] == [key(x) for x in base["prims"]]
  for old, now in zip(base["prims"], got["prims"]):
    assert now == new.get(key(old), old)
  assert got["prims"][0] == base["prims"][0]  # the ceiling row stays the run's
  assert got["notes"][-1].startswith(f"rows from a later run ({later['started']}, ")
  assert "nvfp4 dequantize" in got["notes"][-1]
  assert "rows from a later run" in (tmp_path / "run.md").read_text()
  later["prims_shape"] = [4096, 4096]
  p.write_text(json.dumps(later))
  r = _run("experiments.bench_primitives", f"--report={run}", f"--patch={p}", module=True)
  assert r.returncode != 0 and "only merge for the same device and tensor" in r.stderr
  assert json.loads(run.read_text()) == got
  # A matmul-only run (--sections=matmul, two of the four M) replaces those
  # (weight, M) rows and leaves the others and every primitive row.
  with open(os.path.join(bench, "primitives_h200_s29c.json")) as f:
    mm = json.load(f)
  p.write_text(json.dumps(mm))
  r = _run("experiments.bench_primitives", f"--report={run}", f"--patch={p}", module=True)
  assert r.returncode == 0, r.stderr
  got2 = json.loads(run.read_text())
  assert got2["prims"] == got["prims"]
  mkey = lambda x: (x["weight"], x["m"])  # noqa: E731
  new_mm = {mkey(x): x for x in mm["matmul"]}
  assert {256, 4096} == {m for _, m in new_mm}
  assert [mkey(x) for x in got2["matmul"]] == [mkey(x) for x in got["matmul"]]
  for old, now in zip(got["matmul"], got2["matmul"]):
    assert now == new_mm.get(mkey(old), old)
  assert "int8 4096 (matmul)" in got2["notes"][-1]
  mm["matmul_kn"] = [4096, 4096]
  p.write_text(json.dumps(mm))
  r = _run("experiments.bench_primitives", f"--report={run}", f"--patch={p}", module=True)
  assert r.returncode != 0 and "matmul_kn" in r.stderr


def test_fwd_bwd_bytes_count_the_gradient_only_where_it_is_written():
  # The fwd+bwd roofline: x read and the value written, plus the cotangent
  # read and the gradient written only where the straight-through gradient
  # is not the cotangent itself (formats that clip: MX's E8M0 scales, NVFP4,
  # uint8's zero point); where it is, jit returns the cotangent unmoved.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from experiments._primitive_formats import (FORMATS, fake_quant_fwd_bwd,  # pylint: disable=g-import-not-at-top
                                              fwd_bwd_bytes, fwd_bwd_passes)
  x = jnp.ones((128, 512), jnp.bfloat16)
  got = {}
  for fid in ("int8", "int4_g128", "mxfp4", "nvfp4", "uint8"):
    fmt, kw = FORMATS[fid]
    spec = lb.QuantSpec(fmt, axis=0, **kw)
    got[fid] = fwd_bwd_bytes(fake_quant_fwd_bwd(lb.fake_quant, spec), x, x) // x.nbytes
    assert fwd_bwd_passes(spec) == got[fid]  # the same on the small tensor
  assert got == {"int8": 2, "int4_g128": 2, "mxfp4": 4, "nvfp4": 4, "uint8": 4}


def test_fusion_survey_checks_its_qat_flags_before_compiling():
  for flag, msg in (("--qat=NVFP5 W+A", "unknown QAT variant 'NVFP5 W+A'"),
                    ("--qat_tokens=16x", "give <sequences>x<tokens per sequence>"),
                    ("--matmul_formats=int5", "unknown matmul format id(s) ['int5']"),
                    ("--native_4bit=int4,fp4", "--native_4bit: unknown ['fp4']")):
    r = _run("experiments.gpu_fusion_survey", "--qat=NVFP4 W+A", flag,
             "--plugin_site=/nonexistent", module=True)
    assert r.returncode != 0 and msg in r.stderr, r.stderr
    assert r.stdout == ""  # nothing was compiled


def test_flag_values_are_checked_before_any_work():
  # A typo'd target was silently weights-only; a bad shape or zero iterations
  # gave a traceback or a table of inf.
  r = _run("experiments.spinquant", "--target=weights+act", module=True)
  assert r.returncode != 0 and "value should be one of <weights|weights+acts>" in r.stderr
  r = _run("experiments.spinquant", "--scheme=int5", "--workdir=/nonexistent",
           module=True)
  assert r.returncode != 0 and "'int5' is not a scheme" in r.stderr
  assert not os.path.exists("/nonexistent")
  r = _run("experiments.bench_variants", "--iters=0", module=True)
  assert r.returncode != 0 and "--iters" in r.stderr


def test_config_field_typo_is_one_line_with_an_explicit_config_too():
  # With --config given, the overrides apply while app.run parses the flags,
  # where the typo used to surface as ml_collections' chained traceback.
  for args in (["--config", "configs/evaluate.py", "--config.checkpont=/tmp/x"],
               ["--config.checkpont=/tmp/x"]):
    r = _run("experiments.evaluate", *args, module=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --config.checkpont is not a field of the config; close matches: "
        "--config.checkpoint"], r.stderr


@pytest.mark.slow  # quantizes every format in a subprocess (~8 s)
def test_format_report_keeps_a_documents_hand_written_sections(tmp_path):
  # docs/formats.md's own regeneration command used to drop its NaN/inf and
  # range sections.
  out = tmp_path / "formats.md"
  out.write_text("# old table\n\n| a |\n\n## Notes\n\nkeep me\n")
  r = _run("experiments.format_report", "--n", "1024", "--out", str(out), module=True)
  assert r.returncode == 0, r.stderr
  text = out.read_text()
  assert text.startswith("# Number formats") and "| a |" not in text
  assert text.endswith("\n## Notes\n\nkeep me\n")


def test_a_dotted_path_through_a_plain_value_is_one_line():
  for args in (["--config.model.bogus=1"],
               ["--config=configs/sweep_llama.py", "--config.model.bogus=1"]):
    r = _run("experiments.sweep", *args, module=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: one of ['--config.model.bogus'] goes through a config field that "
        "holds a value, not fields; check the dotted path"], r.stderr
