"""End-to-end PTQ points on the real pretrained MiniLM (small eval sets)."""
import importlib.util
import json
import os

import pytest

from lowbit_jax import pipelines

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, variant):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + name, os.path.join(_ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def test_minilm_points_order_formats_sensibly():
  int8 = pipelines.minilm_point("int8", "weights", n_calib=8, n_eval=24)
  int4 = pipelines.minilm_point("int4_g128", "weights+acts", n_calib=8, n_eval=24)
  assert int8["mean_cos"] > 0.999 and int8["worst_cos"] > 0.995
  assert int4["mean_cos"] < int8["mean_cos"]
  assert int4["bits_per_weight"] == pytest.approx(4.25)
  assert 8.0 < int8["bits_per_weight"] < 8.2
  # every Dense kernel (36) and every Dense input has an SQNR entry
  assert len(int4["layers"]["weight"]) == 36
  assert len(int4["layers"]["activation"]) == 36


def test_real_quantized_checkpoint_equals_fake_quant(tmp_path):
  d = str(tmp_path / "q")
  info = pipelines.minilm_save_quantized("int4_g128", "weights", d)
  assert info["quantized_param_bytes"] < 0.6 * info["fp32_param_bytes"]
  real = pipelines.minilm_evaluate_checkpoint(d, n_calib=8, n_eval=24)
  fake = pipelines.minilm_point("int4_g128", "weights", n_calib=8, n_eval=24)
  assert real["mean_cos"] == pytest.approx(fake["mean_cos"], abs=1e-5)
  assert real["spearman"] == pytest.approx(fake["spearman"], abs=1e-4)


def test_sweep_config_smoke_runs_and_resumes(tmp_path):
  c = _config("sweep_minilm", "smoke")
  c.out_dir = str(tmp_path)
  out = pipelines.run_sweep_config(c, log=lambda s: None)
  assert len(out["rows"]) == 2
  assert os.path.exists(out["paths"]["tradeoff"])
  assert "| rtn | mxfp4 | weights |" in out["table"]
  logs = []
  pipelines.run_sweep_config(c, log=logs.append)
  assert "2 already done, 0 to run" in logs[0]
  with open(out["paths"]["results"]) as f:
    rows = [json.loads(l) for l in f]
  assert len(rows) == 2


def test_bad_point_arguments():
  with pytest.raises(ValueError, match="method must be one of"):
    pipelines.minilm_point("int8", "weights", "gptqq")
  with pytest.raises(KeyError, match="unknown scheme"):
    pipelines.minilm_point("int5", "weights")
  c = _config("sweep_minilm", "smoke")
  c.axes.scheme = ["int8", "mxfp44"]
  with pytest.raises(KeyError, match="mxfp44"):
    pipelines.run_sweep_config(c, log=lambda s: None)
