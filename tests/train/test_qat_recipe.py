"""QAT recipes as data: schemes -> rules, LSQ's gradient scale, the optimizer groups."""
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowbit_jax import train
from lowbit_jax.train import qat

_ROOT = pathlib.Path(__file__).parents[2]


def _config(arg):
  spec = importlib.util.spec_from_file_location("_qat_cfg",
                                                _ROOT / "configs" / "train_qat.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_schemes_become_rules():
  assert train.make_rules({"rules": "none"}) == []
  assert train.recipe_from_config({"quant": {"rules": "none"}}) is None
  assert train.recipe_from_config({}) is None
  (rule,) = train.make_rules({"rules": "w4a8"})
  assert rule.weight.format.name == "int4" and rule.activation.format.name == "int8"
  assert (rule.learn_weight, rule.learn_activation) == ("lsq", "lsq")
  assert rule.grad is None and rule.scaling == "current"
  exclude, rule = train.make_rules({"rules": "fp8_delayed", "exclude": "lm_head",
                                    "amax_history_len": 8})
  assert exclude.path == "lm_head" and exclude.is_float
  assert rule.grad.format.name == "fp8_e5m2" and rule.scaling == "delayed"
  assert rule.amax_history_len == 8
  (rule,) = train.make_rules({"rules": "w4a8", "group_size": 32, "grad": "fp8_e5m2",
                              "learn_activation": "pact", "grad_stochastic": True})
  assert rule.weight.group_size == 32 and rule.learn_activation == "pact"
  assert rule.grad.rounding == "stochastic"
  (rule,) = train.make_rules({"rules": "mxfp4", "activation": "none"})
  assert rule.activation is None and rule.weight.format.name == "mxfp4"
  for name in qat.SCHEMES:
    train.make_rules({"rules": name})   # every scheme builds valid rules
  with pytest.raises(ValueError, match="not a scheme"):
    train.make_rules({"rules": "w3a3"})
  with pytest.raises(ValueError, match="learn_weight must be one of"):
    train.make_rules({"rules": "w4a8", "learn_weight": "lsq+"})
  with pytest.raises(ValueError, match="block format"):
    train.make_rules({"rules": "mxfp4", "group_size": 16})
  with pytest.raises(ValueError, match="one range per tensor"):   # rule checks
    train.make_rules({"rules": "mxfp4", "learn_activation": "lsq"})


def test_config_variants():
  for variant in ("smoke", "small", "base"):
    c = _config(variant)
    assert c.quant.start_step < c.steps
    recipe = train.recipe_from_config(c)
    assert recipe.start_step == c.quant.start_step
    assert [r.path for r in recipe.rules] == ["lm_head", ".*"]
  assert _config("smoke").optim.state_format == "float32"


def test_lsq_gradient_scale_switch():
  """The rules apply g = 1/sqrt(N Qp); quant.lsq_grad_scale=False leaves eq. 3."""
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (64, 32))
  x = jax.random.normal(jax.random.key(1), (8, 64))
  grads = {}
  for on in (True, False):
    rule = train.make_rules({"rules": "w4a8", "group_size": 16,
                             "lsq_grad_scale": on, "exclude": ""})[0]
    qfn = lb.quantize_function(lambda p, a: a @ p["w"], [rule])
    scales = qfn.init_quant_vars({"w": w}, x)["quant_scales"]
    grads[on] = jax.grad(lambda s: jnp.sum(
        qfn({"w": w}, x, quant_scales=s) ** 2))(scales)
  on, off = (jax.tree.leaves(grads[k]) for k in (True, False))
  # Leaves in path order: act_scale (N = 64 input features, Qp = 127 for
  # int8), then weight_scale (N = 16 elements per scale, Qp = 7 for int4).
  np.testing.assert_allclose(off[0], on[0] * math.sqrt(64 * 127), rtol=1e-5)
  np.testing.assert_allclose(off[1], on[1] * math.sqrt(16 * 7), rtol=1e-5)


def test_scales_train_with_their_own_learning_rate():
  recipe = train.recipe_from_config({"quant": {"rules": "w4a8",
                                               "scale_lr_mult": 10.0}})
  schedule = optax.constant_schedule(1e-3)
  tx = recipe.optimizer(optax.sgd(schedule), schedule, b1=0.9, b2=0.95, eps=1e-8,
                        clip_norm=0.0)
  tree = recipe.trainable({"w": jnp.ones(3)}, {"s": jnp.ones(2)})
  grads = recipe.trainable({"w": jnp.ones(3)}, {"s": jnp.ones(2)})
  updates, state = tx.update(grads, tx.init(tree), tree)
  np.testing.assert_allclose(updates["params"]["w"], -1e-3)
  np.testing.assert_allclose(updates["quant_scales"]["s"], -1e-2, rtol=1e-5)  # Adam
  # The float warm-up keeps the scales' optimizer state untouched.
  kept = recipe.keep_scale_state(state, tx.init(tree))
  # (the clip, or identity at clip_norm=0, then Adam)
  assert int(kept.inner_states["scales"].inner_state[1][0].count) == 0
  frozen = train.recipe_from_config({"quant": {"rules": "w4a8",
                                               "freeze_scales": True}})
  tx = frozen.optimizer(optax.sgd(schedule), schedule, b1=0.9, b2=0.95, eps=1e-8,
                        clip_norm=1.0)
  updates, _ = tx.update(grads, tx.init(tree), tree)
  np.testing.assert_array_equal(updates["quant_scales"]["s"], 0.0)
  with pytest.raises(ValueError, match="start_step"):
    train.recipe_from_config({"quant": {"rules": "w4a8", "start_step": -1}})


def test_scale_learning_rate_follows_the_training_step():
  # The scales' Adam starts counting at start_step (its state is held through
  # the float warm-up): its first update takes schedule(start_step), not
  # schedule(0) (a warm-up schedule's 0 froze the scales on that step).
  recipe = train.recipe_from_config({"quant": {"rules": "w4a8", "start_step": 3}})
  schedule = optax.linear_schedule(0.0, 1e-2, 5)
  tx = recipe.optimizer(optax.sgd(schedule), schedule, b1=0.9, b2=0.95, eps=1e-12,
                        clip_norm=0.0)
  tree = recipe.trainable({"w": jnp.ones(3)}, {"s": jnp.ones(2)})
  state = tx.init(tree)
  for step in (3, 4):
    updates, state = tx.update(tree, state, tree)
    np.testing.assert_allclose(updates["quant_scales"]["s"], -schedule(step),
                               rtol=1e-5)


def test_scale_stats():
  stats = train.scale_stats({"a": {"weight_scale": jnp.array([[1.0, 3.0]])},
                             "b": {"act_scale": jnp.float32(2.0)}})
  np.testing.assert_allclose(stats["a/weight_scale"], [2.0, 1.0, 3.0])
  np.testing.assert_allclose(stats["b/act_scale"], [2.0, 2.0, 2.0])
