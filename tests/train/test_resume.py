"""Checkpoints restore onto another mesh and resume exactly; the QAT driver end to end."""
import dataclasses
import importlib.util
import json
import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest

from lowbit_jax import train
from lowbit_jax.models.llama import Llama

from tests.train import test_layouts
from tests.train._helpers import batches, synthetic_data, tiny_config

_ROOT = pathlib.Path(__file__).parents[2]


def _config(name: str, arg: str = "smoke"):
  spec = importlib.util.spec_from_file_location(f"_{name}", _ROOT / "configs" /
                                                f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_checkpoint_from_one_mesh_restores_onto_another(tmp_path):
  model, tx, _ = test_layouts._setup("float")  # pylint: disable=protected-access
  losses, state, mixed_step = test_layouts.run("float", "data:2,fsdp:2,tensor:2",
                                               steps=2)
  manager = train.checkpoint_manager(tmp_path / "ckpt")
  train.save_checkpoint(manager, state)
  manager.wait_until_finished()
  one = train.Layout(train.make_mesh("data:1"))
  restored = train.restore_checkpoint(manager, train.abstract_state(model, tx, one))
  manager.close()
  assert int(restored.step) == 2
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert restored.params["lm_head"]["kernel"].sharding.mesh.size == 1
  # The next step on the new mesh: the same loss from the checkpoint as from
  # the state moved there directly, and the mixed mesh's loss to tolerance.
  single = test_layouts.step_fn("float", "data:1")
  moved = jax.device_put(jax.device_get(state), single.shardings(restored))
  batch = batches(test_layouts._data(), 3)[2]  # pylint: disable=protected-access
  _, m_restored = single(restored, train.shard_batch(batch, one.mesh))
  _, m_moved = single(moved, train.shard_batch(batch, one.mesh))
  assert float(m_restored["loss"]) == float(m_moved["loss"])
  _, m_mixed = mixed_step(state, train.shard_batch(batch, mixed_step.layout.mesh))
  np.testing.assert_allclose(float(m_mixed["loss"]), float(m_restored["loss"]),
                             rtol=2e-5)


def _qat_config(**quant):
  c = _config("train_qat")
  c.model = ml_collections.ConfigDict(dataclasses.asdict(tiny_config()))
  c.seq_len, c.batch_size, c.steps, c.warmup_steps = 16, 8, 6, 1
  c.log_every, c.eval_every, c.ckpt_every = 1, 0, 2
  c.eval_tokens, c.eval_batch, c.final_eval_full = 256, 8, False
  c.quant.start_step = 2
  for k, v in quant.items():
    setattr(c.quant, k, v)
  return c


def _log(path):
  return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def _losses(path):
  return {r["step"]: r["loss"] for r in _log(path) if r["event"] == "train"}


@pytest.mark.slow
def test_qat_driver_resumes_exactly_and_exports(tmp_path):
  data = synthetic_data()
  config = _qat_config()
  config.mesh = "data:2,fsdp:2,tensor:2"
  full = train.train(config, tmp_path / "full", data=data)
  # Killed right after the float warm-up's checkpoint (step 2 = start_step):
  # the resumed run initialises the scales from the same batch again.
  train.train(config, tmp_path / "killed", data=data, stop_at=3)
  resumed = train.train(config, tmp_path / "killed", data=data)
  assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
  assert resumed["final_eval"] == full["final_eval"]
  assert resumed["final_eval_real"] == full["final_eval_real"]
  log = _log(tmp_path / "full")
  quant_steps = [r for r in log if r["event"] == "train" and "scale_stats" in r]
  assert [r["step"] for r in quant_steps] == [3, 4, 5, 6]
  stats = quant_steps[-1]["scale_stats"]
  assert "layers_0/mlp/up_proj/weight_scale" in stats
  mean, lo, hi = stats["layers_0/mlp/up_proj/weight_scale"]
  assert 0 < lo <= mean <= hi
  clipped = quant_steps[-1]["quant_metrics"]["layers_0"]["mlp"]["down_proj"]
  assert 0.0 <= clipped["act_clipped"] <= 1.0
  assert "lm_head" not in quant_steps[-1]["quant_metrics"]   # excluded: float
  # Real-mode conversion evaluates like fake mode, and evaluate reads the export.
  np.testing.assert_allclose(full["final_eval_real"]["loss"],
                             full["final_eval"]["loss"], rtol=1e-4)
  assert (full["final_eval_real"]["param_bytes"]
          < full["final_eval_real"]["float_param_bytes"])
  ev = train.qat.evaluate_exported(full["quantized_dir"], max_tokens=256, data=data)
  np.testing.assert_allclose(ev["loss"], full["final_eval_real"]["loss"], rtol=1e-5)
  # Resuming onto another mesh continues the same run (to float tolerance).
  other = _qat_config()
  other.mesh = "data:8"
  train.train(config, tmp_path / "moved", data=data, stop_at=4)
  train.train(other, tmp_path / "moved", data=data)
  moved = _losses(tmp_path / "moved")
  np.testing.assert_allclose([moved[s] for s in (5, 6)],
                             [_losses(tmp_path / "full")[s] for s in (5, 6)],
                             rtol=2e-5)


@pytest.mark.slow
def test_qat_from_a_float_checkpoint_with_quantized_moments(tmp_path):
  data = synthetic_data()
  float_config = _config("train_lm")
  float_config.model = ml_collections.ConfigDict(dataclasses.asdict(tiny_config()))
  float_config.seq_len, float_config.batch_size = 16, 8
  float_config.steps, float_config.warmup_steps = 8, 1
  float_config.eval_every, float_config.ckpt_every = 0, 8
  float_config.eval_tokens, float_config.eval_batch = 256, 8
  float_config.final_eval_full, float_config.log_every = False, 1
  train.train(float_config, tmp_path / "float", data=data)
  config = _qat_config(rules="fp8_delayed", start_step=0)
  config.init_from = str(tmp_path / "float")
  config.optim.state_format = "int8"
  config.mesh = "fsdp:2"
  result = train.train(config, tmp_path / "qat", data=data)
  first = _log(tmp_path / "qat")[1]
  assert first["event"] == "train" and first["step"] == 1
  float_first = _log(tmp_path / "float")[1]
  assert float_first["step"] == 1 and float_first["loss"] > np.log(256) - 0.2
  # The QAT run starts from the trained weights, not from a fresh init.
  assert first["loss"] < float_first["loss"] - 0.1
  assert result["final_eval_real"] is not None


def test_bad_configs_fail_before_training(tmp_path):
  config = _qat_config()
  config.mesh = "data:3"
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    train.train(config, tmp_path / "a", data=synthetic_data(n_train=100))
  config.mesh = "tensor:8"
  config.model.d_ff = 36
  with pytest.raises(ValueError, match=r"down_proj/kernel.*'tensor' of size 8"):
    train.train(config, tmp_path / "b", data=synthetic_data(n_train=100))
  config = _qat_config(rules="w5a5")
  with pytest.raises(ValueError, match="not a scheme"):
    train.train(config, tmp_path / "c", data=synthetic_data(n_train=100))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_optimizer_settings_are_refused():
  # optax takes them all: b1 or b2 = 1 divides by zero in the bias correction
  # (NaN updates), a negative lr ascends, a negative clip_norm turned
  # clipping off, and lr = nan trained NaN into the checkpoints.
  for lr in (float("nan"), float("inf"), -1e-2):
    with pytest.raises(ValueError, match="learning rate must be a finite number"):
      train.make_schedule(lr, 1, 10)
  for kw, name in ((dict(b1=1.0), "b1"), (dict(b2=1.0), "b2"), (dict(b1=-0.5), "b1"),
                   (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
                   (dict(eps=float("nan")), "eps")):
    for fmt in ("float32", "int8"):
      with pytest.raises(ValueError, match=f"AdamW's {name} must be in"):
        train.make_optimizer(1e-3, 1, 10, state_format=fmt, **kw)
  with pytest.raises(ValueError, match="clip_norm must be a finite number >= 0"):
    train.make_optimizer(1e-3, 1, 10, clip_norm=-1.0)
  train.make_optimizer(0.0, 0, 1, clip_norm=0.0)   # lr 0 (an RTN "step") is fine


def _float_config(**changes):
  c = _config("train_lm")
  c.model = ml_collections.ConfigDict(dataclasses.asdict(tiny_config()))
  c.seq_len, c.batch_size, c.steps, c.warmup_steps = 16, 8, 8, 1
  c.log_every, c.eval_every, c.ckpt_every, c.keep_checkpoints = 8, 0, 1, 1
  c.eval_tokens, c.eval_batch, c.final_eval_full = 256, 8, False
  for k, v in changes.items():
    setattr(c, k, v)
  return c


def test_a_non_finite_state_never_replaces_the_last_checkpoint(tmp_path):
  # The loss is checked every log_every steps; a checkpoint was saved every
  # ckpt_every steps regardless, and max_to_keep then deleted the last good one.
  data = synthetic_data(4000, 600)
  wd = tmp_path / "run"
  train.train(_float_config(), wd, data=data, stop_at=2)
  # Clipping switched off on resume: one optimizer state structure either way
  # (orbax refused the tree before).
  assert train.train(_float_config(clip_norm=0.0), wd, data=data, stop_at=3)["step"] == 3
  with pytest.raises(FloatingPointError, match=r"non-finite parameters after step "
                     r"(\d+); not saved, so the last checkpoint \(step \d+\) is kept") as e:
    train.train(_float_config(lr=1e6), wd, data=data)
  bad, kept = map(int, re.findall(r"step (\d+)", str(e.value)))
  assert 3 <= kept == bad - 1 < 8
  mgr = train.checkpoint_manager(wd / "checkpoints")
  try:
    assert mgr.latest_step() == kept
    model = Llama(tiny_config())
    tx, _ = train.run_optimizer(_float_config(), None)
    st = train.restore_checkpoint(mgr, train.abstract_state(model, tx,
                                                            train.make_mesh("data:1")))
    assert int(st.step) == kept
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(st.params))
  finally:
    mgr.close()
  # Checkpoints whose run config is gone are not resumed: orbax checks only
  # shapes, and another state format (int8 vs fp8_e4m3) restores as noise.
  (wd / "config.json").unlink()
  with pytest.raises(ValueError, match="not the config.json of the run"):
    train.train(_float_config(), wd, data=data)


def test_layer_regexes_that_match_nothing_and_placeholder_scales_are_loud():
  model = Llama(tiny_config())
  params = train.init_params(model, jax.random.key(0))
  for quant in ({"layers": "q_proj"}, {"exclude": "lm_heads"}):
    recipe = train.recipe_from_config({"quant": {"rules": "w4a8", **quant}})
    with pytest.raises(ValueError, match=r"matched no layer of the model.*"
                       r"'layers_0/attn/k_proj'"):
      recipe.placeholder_vars(model, params)
  # Placeholder learned scales are NaN until init_from_data: a quantized
  # step on them gave zero gradients and the scales never moved.
  recipe = train.recipe_from_config({"quant": {"rules": "w4a8", "layers": ".*q_proj"}})
  scales, _ = recipe.placeholder_vars(model, params)
  assert jax.tree.leaves(scales) and all(
      bool(np.isnan(np.asarray(s)).all()) for s in jax.tree.leaves(scales))
