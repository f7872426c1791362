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
  c.metrics = list(c.metrics) + ["worst_coss"]  # a typo is named, nothing reruns
  logs = []
  pipelines.run_sweep_config(c, log=logs.append)
  assert any("'worst_coss'" in m and "which no point returned" in m for m in logs)
  with open(out["paths"]["results"]) as f:
    rows = [json.loads(l) for l in f]
  assert len(rows) == 2
  assert all(r["cpu_seconds"] > 0 and r["seconds"] > 0 for r in rows)


def test_rtn_weights_ahead_equal_the_rule_inside_the_model():
  # The sweep quantizes RTN weights once, ahead of the model; the numbers must
  # be the ones a weight rule gives inside it.
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import lowbit_jax as lb
  from lowbit_jax.flax import quantize_linen

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(48)(jax.nn.gelu(nn.Dense(96)(x)))

  x = jax.random.normal(jax.random.key(1), (4, 80))
  params = Mlp().init(jax.random.key(0), x)["params"]
  for spec in (lb.QuantSpec("int4", group_size=32, pad=True),
               lb.QuantSpec("nvfp4", pad=True)):
    inside = jax.jit(quantize_linen([lb.QuantRule(".*", weight=spec)], mode="fake")(
        Mlp().apply))({"params": params}, x)
    ahead = jax.jit(Mlp().apply)({"params": pipelines.rtn_weights(params, spec)}, x)
    np.testing.assert_array_equal(np.asarray(inside), np.asarray(ahead))


def test_length_groups_cover_every_sentence_once():
  sents = ["a b"] * 5 + ["word " * 40] + ["x y z " * 3] * 4
  groups = pipelines._length_groups(sents)
  assert 1 <= len(groups) <= 2
  assert sorted(i for g in groups for i in g) == list(range(len(sents)))
  assert groups[-1] == [5]  # the long sentence runs apart from the short ones


def test_bad_point_arguments():
  with pytest.raises(ValueError, match="method must be one of"):
    pipelines.minilm_point("int8", "weights", "gptqq")
  with pytest.raises(KeyError, match="unknown scheme"):
    pipelines.minilm_point("int5", "weights")
  c = _config("sweep_minilm", "smoke")
  c.axes.scheme = ["int8", "mxfp44"]
  with pytest.raises(KeyError, match="mxfp44"):
    pipelines.run_sweep_config(c, log=lambda s: None)
  # Point arguments the point function cannot take, or sizes it refuses, are
  # refused before the model trains (that took up to 50 minutes first).
  c = _config("sweep_llama", "smoke")
  c.point_kwargs.batch = 0
  with pytest.raises(ValueError, match="batch must be >= 1"):
    pipelines.run_sweep_config(c, log=lambda s: pytest.fail(f"ran: {s}"))
  c = _config("sweep_llama", "smoke")
  c.point_kwargs.max_eval_token = 10
  with pytest.raises(ValueError, match="unexpected keyword argument 'max_eval_token'"):
    pipelines.run_sweep_config(c, log=lambda s: pytest.fail(f"ran: {s}"))
  # A KV-cache format typo is refused before any point (and any training) runs.
  c = _config("sweep_llama_methods", "smoke")
  c.axes.kv = ["none", "int4x"]
  said = []

  def no_point_runs(s):
    said.append(s)
    if not s.startswith("sweep: exclude entry"):
      pytest.fail(f"ran: {s}")
  with pytest.raises(ValueError, match="kv must be 'none' or a registered format"):
    pipelines.run_sweep_config(c, log=no_point_runs)
  # (the config's exclusions of kv='int4' now match nothing, and are named)
  assert any("kv='int4' is not among axis 'kv'" in s for s in said)
  # MiniLM refuses QuaRot, SpinQuant and OmniQuant (post-LN) and sizes its
  # 230 sentences cannot give before any point runs: a sweep ran every
  # earlier point first, and n_eval=5000 was cut to 222 silently.
  c = _config("sweep_minilm", "smoke")
  c.axes.method = ["rtn", "quarot"]
  with pytest.raises(ValueError, match="'quarot' does not apply to MiniLM: MiniLM "
                     "is post-LN"):
    pipelines.run_sweep_config(c, log=no_point_runs)
  for n_eval, match in ((5000, r"n_eval must be 0 .* or an int in \[3, 198\]"),
                        (2, "the rank correlation needs 3")):
    with pytest.raises(ValueError, match=match):
      pipelines.minilm_point("int8", "weights", n_eval=n_eval)
  with pytest.raises(ValueError, match=r"n_calib must be an int in \[1, 222\]"):
    pipelines.minilm_point("int8", "weights", n_calib=225)
  # A llama sweep over workdirs skipped the model fingerprint: rows of an
  # older model were reused.
  c = _config("sweep_llama", "smoke")
  c.axes.workdir = [c.point_kwargs.workdir, "/tmp/b"]
  del c.point_kwargs["workdir"]
  with pytest.raises(ValueError, match="config.axes has 'workdir'"):
    pipelines.run_sweep_config(c, log=no_point_runs)
  # Points that differ in another axis get labels that differ.
  row = {"scheme": "int8", "target": "weights", "n_calib": 8}
  assert pipelines._label(row, ["scheme", "target", "n_calib"]) == "int8/W/n_calib=8"


def test_llama_workdir_with_a_final_eval_but_no_checkpoint_says_so(tmp_path):
  # What concurrent trainers left behind on the GPU machine: the sweep must
  # name the workdir and the fix, not fail on `None.params`.
  (tmp_path / "final_eval.json").write_text(json.dumps({"step": 60}))
  pipelines._llama.cache_clear()
  with pytest.raises(FileNotFoundError, match="no checkpoint.*Delete"):
    pipelines._llama(str(tmp_path), "smoke")
  assert (tmp_path / ".train.lock").exists()


def test_llama_methods_attention_rows_and_arguments(tmp_path):
  from lowbit_jax import sweep
  c = _config("sweep_llama_methods", "smoke")
  pts = sweep.expand({k: list(v) for k, v in c.axes.items()},
                     [dict(e) for e in c.exclude])
  attn = [p for p in pts if p["kv"] != "none" or p["qk"] != "none"]
  # fp32/rtn and W4A4 under rtn, quarot, spinquant; kv or qk; without and with R3.
  assert len(attn) == 16 and not any(p["kv"] != "none" and p["qk"] != "none"
                                     for p in attn)
  assert {(p["scheme"], p["method"]) for p in attn} == {
      ("fp32", "rtn"), ("int4", "rtn"), ("int4", "quarot"), ("int4", "spinquant")}
  assert not any(p["r3"] for p in pts if p not in attn)
  labels = {pipelines._label(p) for p in attn}
  assert "int4/W+A/spinquant/kv:int4/R3" in labels and len(labels) == 16
  kw = {"workdir": str(tmp_path)}   # arguments are checked before any model loads
  with pytest.raises(ValueError, match="kv must be 'none' or a registered format"):
    pipelines.llama_point("int4", "weights+acts", "quarot", kv="int44", **kw)
  with pytest.raises(ValueError, match="r3=True rotates"):
    pipelines.llama_point("int4", "weights+acts", "quarot", r3=True, **kw)
  rules = pipelines._attn_rules("int4", "fp8_e4m3")
  assert rules[0].matches("layers_1/attn/cache/value") and rules[0].ops == ("kv_cache",)
  assert rules[1].matches("layers_0/attn/qk") and not rules[1].matches("layers_0/attn/pv")


def test_llama_workdir_trained_with_another_config_is_refused(tmp_path):
  # A workdir trained for 2 steps must not be measured as the 6-step model.
  cfg = _config("train_lm", "smoke")
  cfg.steps = 2
  (tmp_path / "config.json").write_text(cfg.to_json())
  (tmp_path / "final_eval.json").write_text(json.dumps({"step": 2}))
  pipelines._llama.cache_clear()
  with pytest.raises(ValueError, match=r"trained with another config: steps=2 "
                     r"\(asked: 6\).*another directory, or delete"):
    pipelines._llama(str(tmp_path), "smoke", 6)
  with pytest.raises(ValueError, match="model.*asked"):
    pipelines._llama(str(tmp_path), "small", 2)


def test_llama_sweep_rows_follow_the_model_in_the_workdir(tmp_path, monkeypatch):
  # Rows measured on a model since retrained in the same workdir are rerun.
  work = tmp_path / "work"
  work.mkdir()
  (work / "config.json").write_text("{}")
  (work / "final_eval.json").write_text(json.dumps({"loss": 6.1}))
  monkeypatch.setattr(pipelines, "_llama", lambda *a: None)
  calls = []
  monkeypatch.setitem(pipelines.POINTS, "llama",
                      lambda **kw: calls.append(kw) or {"ppl": 1.0})
  c = _config("sweep_llama", "smoke")
  c.out_dir = str(tmp_path / "out")
  c.point_kwargs.workdir = str(work)
  n = len(pipelines.run_sweep_config(c, log=lambda s: None)["rows"])
  assert len(calls) == n
  assert pipelines.run_sweep_config(c, log=lambda s: None)["rows"][0]["settings"][
      "model_fingerprint"] == pipelines.llama_fingerprint(str(work))
  assert len(calls) == n                      # same model: resumed
  (work / "final_eval.json").write_text(json.dumps({"loss": 5.2}))   # retrained
  pipelines.run_sweep_config(c, log=lambda s: None)
  assert len(calls) == 2 * n


def test_layer_heatmaps_give_every_method_its_columns(tmp_path, monkeypatch):
  # The rotations' and OmniQuant's rows were keyed by layer, the others by
  # kernel, and the columns came from the first row only: those rows drew
  # all grey.
  assert pipelines._folded_weight_sqnr(
      {"layers": {"layers_0/attn/q_proj": {"weight_sqnr_db": 20.0}, "x": {}}}) == {
          "layers_0/attn/q_proj/kernel": 20.0}
  from lowbit_jax import sweep
  work = tmp_path / "work"
  work.mkdir()
  (work / "config.json").write_text("{}")
  (work / "final_eval.json").write_text(json.dumps({"loss": 6.1}))
  monkeypatch.setattr(pipelines, "_llama", lambda *a: None)
  kernels = {"rtn": ["a/kernel"], "gptq": ["a/kernel", "b/kernel"]}
  monkeypatch.setitem(pipelines.POINTS, "llama", lambda **kw: {
      "ppl": 1.0, "layers": {"weight": {k: 10.0 for k in kernels.get(kw["method"], [])},
                             "activation": {}}})
  drawn = {}
  monkeypatch.setattr(sweep, "plot_heatmap",
                      lambda mat, rows, cols, path, title: drawn.setdefault(path, cols))
  c = _config("sweep_llama", "smoke")
  c.out_dir = str(tmp_path / "out")
  c.point_kwargs.workdir = str(work)
  c.axes = {"scheme": ["int4"], "target": ["weights"], "method": ["rtn", "gptq"]}
  pipelines.run_sweep_config(c, log=lambda s: None)
  assert list(drawn.values()) == [["a", "b"]]


def test_every_ptq_config_variant_fits_its_point_function():
  # configs/ptq.py let model=llama through with MiniLM's point arguments,
  # which llama_point cannot take: it now has a llama variant, and
  # experiments/ptq.py checks the fit before running.
  import inspect
  for variant in ("default", "smoke", "llama"):
    c = _config("ptq", variant)
    inspect.signature(pipelines.POINTS[c.model]).bind(
        c.scheme, c.target, c.method, **dict(c.point_kwargs))
  # The llama variant names every keyword, so each can be set by a flag.
  keywords = {n for n, p in inspect.signature(pipelines.llama_point).parameters.items()
              if p.kind == p.KEYWORD_ONLY}
  assert set(_config("ptq", "llama").point_kwargs) == keywords
