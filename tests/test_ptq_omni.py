"""OmniQuant (LWC + LET, layer-wise) through ptq_params on every front end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax._fold import apply_scaling, find_scaling_folds
from lowbit_jax._ptq import _get_path
from lowbit_jax._ptq_scaling import _put
from lowbit_jax._rules import QuantRule, QWeight
from lowbit_jax.algorithms import OmniQuantOptions
from lowbit_jax.flax import quantize_linen, quantize_nnx
from tests import _toy_models as toy
from tests.test_ptq_scaling import (  # noqa: F401  (setup: the toy model fixture)
    _leaves, check_function_real_equals_fake, setup)

SPEC = lb.QuantSpec("int4", group_size=16)
# W4A8: with activations quantized LET runs by default (the paper's recipe).
# up reads norm2 (an exact fold: LET + LWC); down reads gelu(up) (LWC alone).
RULES = [QuantRule(".*/(up|down)", weight=SPEC, activation="int8")]
OPTS = OmniQuantOptions(steps=200)


@pytest.fixture(scope="module")
def heavy(setup):  # noqa: F811
  """The toy model's params with heavy-tailed kernels (Student t, 3 degrees of
  freedom) and three outlier channels (x20) in each norm2 gain."""
  rng = np.random.default_rng(0)

  def f(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan = int(np.prod(x.shape[:-1])) if x.ndim > 2 else x.shape[0]
      return jnp.asarray(rng.standard_t(3.0, x.shape).astype(np.float32)
                         * np.float32(0.5 / np.sqrt(fan)))
    if "norm2" in name:
      g = np.ones(x.shape, np.float32)
      g[rng.choice(x.shape[0], 3, replace=False)] = 20.0
      return jnp.asarray(np.asarray(x) * g)
    return x
  return jax.tree_util.tree_map_with_path(f, setup[1]["params"])


@pytest.fixture(scope="module")
def fn_omni(setup, heavy):  # noqa: F811
  return lb.ptq_params(toy.toy_apply, heavy, setup[2], RULES, method="omniquant",
                       omniquant=OPTS)


def test_lwc_and_let_lower_every_sites_error_vs_rtn(fn_omni):
  layers = fn_omni.report["layers"]
  print("error / RTN's, objective / RTN's:", {
      p: (round(e["error_vs_rtn"], 3), round(e["objective"] / e["objective_rtn"], 3))
      for p, e in layers.items()})
  assert sorted(layers) == sorted(f"layers_{i}/{n}/kernel" for i in range(toy.LAYERS)
                                  for n in ("up", "down"))
  for p, e in layers.items():
    # The weight error on the captured inputs, and the objective trained (with
    # the int8 activations), both strictly below round-to-nearest's.
    assert e["error"] < e["rtn_error"], (p, e)
    assert e["objective"] < e["objective_rtn"], (p, e)
    assert 0.5 < e["clip_mean"] < 1.0, (p, e)   # learned clipping, started at 0.98
  assert np.mean([e["error_vs_rtn"] for e in layers.values()]) < 0.6
  assert fn_omni.report["objective"] == "layer-wise"


def test_site_without_a_fold_gets_lwc_and_is_reported(fn_omni):
  layers = fn_omni.report["layers"]
  for i in range(toy.LAYERS):
    up, down = layers[f"layers_{i}/up/kernel"], layers[f"layers_{i}/down/kernel"]
    assert up["let"] and up["fold"] == f"layers_{i}/norm2/scale"
    assert not down["let"] and down["fold"] is None
    assert "integer_pow" in down["reason"], down   # gelu(up): no exact fold
    assert down["error"] < down["rtn_error"]
  folds = {f["producer"]: f for f in fn_omni.report["folds"]}
  assert folds["layers_0/norm2/scale"]["status"] == "folded"
  assert folds["layers_0/norm2/scale"]["loss"] < folds["layers_0/norm2/scale"][
      "loss_start"]
  assert folds["final_norm/scale"]["status"] == "skipped"


def test_let_fold_leaves_the_float_model_unchanged(setup, heavy, fn_omni):  # noqa: F811
  t = setup[2][0]
  plan = find_scaling_folds(toy.toy_apply, heavy, t)
  folds = {f["producer"]: f for f in fn_omni.report["folds"]}
  tree = heavy
  for i in range(toy.LAYERS):
    prod = f"layers_{i}/norm2/scale"
    s = folds[prod]["scales"]
    assert s.shape == (toy.D,) and np.all(s > 0) and not np.allclose(s, 1.0)
    # The result holds the folded gain; its float kernels times s are the
    # readers the fold made.
    np.testing.assert_allclose(fn_omni.params[f"layers_{i}"]["norm2"]["scale"],
                               heavy[f"layers_{i}"]["norm2"]["scale"] / s, rtol=1e-6)
    tree = apply_scaling(tree, plan.folds[prod], s, _get_path, _put)
  f = jax.jit(toy.toy_apply)
  with jax.default_matmul_precision("float32"):
    np.testing.assert_allclose(f(tree, t), f(heavy, t), rtol=1e-5, atol=1e-5)


def test_let_with_lwc_beats_lwc_alone_on_outlier_channels(setup, heavy, fn_omni):  # noqa: F811
  rules = [QuantRule(".*/up", weight=SPEC, activation="int8")]
  lwc = lb.ptq_params(toy.toy_apply, heavy, setup[2], rules, method="omniquant",
                      omniquant=OPTS.replace(let=False))
  for i in range(toy.LAYERS):
    p = f"layers_{i}/up/kernel"
    alone, both = lwc.report["layers"][p], fn_omni.report["layers"][p]
    print(p, "objective / RTN's: LWC", alone["objective"] / alone["objective_rtn"],
          "LET+LWC", both["objective"] / both["objective_rtn"])
    assert not alone["let"] and "let=False" in alone["reason"]
    assert alone["objective"] < alone["objective_rtn"]
    # Migrating the outlier channels' range into the weights, learned with the
    # clipping, beats clipping alone.
    assert both["objective"] < 0.6 * alone["objective"], (both, alone)
    assert both["error"] < alone["error"]


def test_function_real_mode_equals_fake_mode(fn_omni):
  t = toy.tokens(7)
  check_function_real_equals_fake(
      fn_omni, RULES, t, lb.quantize_function(toy.toy_apply, RULES)(fn_omni.params, t))


def test_nnx_matches_the_function_and_real_equals_fake(setup, heavy, fn_omni):  # noqa: F811
  m = toy.nnx_from_linen(heavy)
  res = lb.ptq_params(m, None, setup[2], RULES, method="omniquant", omniquant=OPTS)
  for p, e in res.report["layers"].items():
    ref = fn_omni.report["layers"][p]
    np.testing.assert_allclose(e["error"], ref["error"], rtol=2e-2)
    assert e["let"] == ref["let"]
  np.testing.assert_allclose(m.layers_1.norm2.scale.get_value(),
                             fn_omni.params["layers_1"]["norm2"]["scale"], rtol=1e-3)
  t = toy.tokens(7)
  fake = nnx.jit(lambda m, t: m(t))(quantize_nnx(m, RULES, mode="fake"), t)
  q = quantize_nnx(m, RULES, mode="real", **lb.real_mode_kwargs(res, "nnx"))
  assert isinstance(q.layers_1.up.kernel.get_value(), QWeight)
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(q, t), fake, rtol=1e-5,
                             atol=1e-5)


def test_linen_real_equals_fake(setup, heavy):  # noqa: F811
  model, _, batches = setup
  res = lb.ptq_params(model, {"params": heavy}, batches, RULES, method="omniquant",
                      omniquant=OPTS)
  assert all(e["error"] < e["rtn_error"] for e in res.report["layers"].values())
  t = toy.tokens(7)
  ql = quantize_linen(RULES, mode="real")
  rv = ql.quantize_params(model, {**res.params, **lb.real_mode_kwargs(res, "linen")}, t)
  stored, rp = _leaves(rv["params"]), _leaves(res.params["params"])
  for p in res.report["layers"]:
    np.testing.assert_array_equal(stored[p].logical(), rp[p])
  fake = jax.jit(quantize_linen(RULES, mode="fake")(model.apply))(res.params, t)
  np.testing.assert_allclose(jax.jit(ql(model.apply))(rv, t), fake, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
def test_attention_fold_and_a_reader_that_is_also_a_producer(setup, heavy):  # noqa: F811
  """conv -> v (LET), v -> o through p @ v (LET): v's columns are divided by
  the second fold after its logits were learned, so its LWC runs again."""
  rules = [QuantRule(".*/(v|o)", weight=SPEC)]
  res = lb.ptq_params(toy.toy_apply, heavy, setup[2], rules, method="omniquant",
                      omniquant=OPTS.replace(let=True))
  layers = res.report["layers"]
  for i in range(toy.LAYERS):
    v, o = layers[f"layers_{i}/v/kernel"], layers[f"layers_{i}/o/kernel"]
    assert v["fold"] == f"layers_{i}/conv/kernel" and v["lwc_retrained"]
    assert o["fold"] == f"layers_{i}/v/kernel" and not o["lwc_retrained"]
    assert v["error"] < v["rtn_error"] and o["error"] < o["rtn_error"], (v, o)
  t = toy.tokens(7)
  qr = lb.quantize_function(toy.toy_apply, rules, mode="real")
  rp = qr.quantize_params(res.params, t, **lb.real_mode_kwargs(res, "function"))
  np.testing.assert_allclose(qr(rp, t), jax.jit(toy.toy_apply)(res.params, t),
                             rtol=1e-5, atol=1e-5)


def test_falls_back_to_rtn_where_training_does_not_beat_it(setup):  # noqa: F811
  """No steps, LET started at SmoothQuant's alpha = 1 (all activation range
  moved into the weights) and MXFP4's power-of-two steps (a strength of 0.98
  keeps RTN's step): neither the group nor the site beats round to nearest,
  so the fold is skipped and the site rounded to nearest, real == fake."""
  _, v, batches = setup
  rules = [QuantRule(".*/up", weight="mxfp4")]
  res = lb.ptq_params(toy.toy_apply, v["params"], batches, rules, method="omniquant",
                      omniquant=OPTS.replace(let=True, steps=0, let_alpha=1.0))
  folds = {f["producer"]: f for f in res.report["folds"]}
  for i in range(toy.LAYERS):
    f = folds[f"layers_{i}/norm2/scale"]
    assert f["status"] == "skipped" and f["loss"] > f["loss_rtn"], f
    e = res.report["layers"][f"layers_{i}/up/kernel"]
    assert e["rtn_fallback"] and not e["let"] and "round to nearest" in e["reason"]
    assert e["clip_mean"] == 1.0 and e["error_vs_rtn"] == pytest.approx(1.0)
  np.testing.assert_array_equal(res.params["layers_0"]["norm2"]["scale"],
                                v["params"]["layers_0"]["norm2"]["scale"])
  t = toy.tokens(7)
  qr = lb.quantize_function(toy.toy_apply, rules, mode="real")
  rp = qr.quantize_params(res.params, t, **lb.real_mode_kwargs(res, "function"))
  np.testing.assert_allclose(qr(rp, t), jax.jit(toy.toy_apply)(res.params, t),
                             rtol=1e-5, atol=1e-5)


def test_clear_errors(setup, heavy):  # noqa: F811
  batches = setup[2]
  with pytest.raises(ValueError, match="apply to method='omniquant'"):
    lb.ptq_params(toy.toy_apply, heavy, batches, RULES, method="awq",
                  omniquant=OPTS)
  with pytest.raises(TypeError, match="OmniQuantOptions"):
    lb.ptq_params(toy.toy_apply, heavy, batches, RULES, method="omniquant",
                  omniquant={"steps": 3})
  with pytest.raises(ValueError, match="capture= is for gptq/rtn"):
    lb.ptq_params(toy.toy_apply, heavy, batches, RULES, method="omniquant",
                  capture=lb.capture_hessians(toy.toy_apply, heavy, batches, RULES))
  with pytest.raises(ValueError, match="raise max_samples"):
    lb.ptq_params(toy.toy_apply, heavy, batches, RULES, method="omniquant",
                  max_samples=0)


@pytest.mark.slow
def test_layer_wise_against_the_linen_block_wise_omniquant():
  """The same model, options and weights as tests/flax/test_ptq_omniquant.py:
  ``apply_ptq``'s block-wise OmniQuant and ``ptq_params``'s layer-wise one on
  the blocks' Dense layers (the head float), by the model output's MSE
  against the float model on the calibration batch and a held-out one."""
  from lowbit_jax.flax import apply_ptq
  from tests.flax.test_ptq_omniquant import net_and_params
  m, params, x, held = net_and_params()
  layers = r"blocks_\d+/fc\d"
  rules = [QuantRule(layers, weight=SPEC)]
  opts = OmniQuantOptions(steps=200, let=True, blocks=r"blocks_\d+")
  block, _ = apply_ptq(m, params, [x], "omniquant", SPEC, omniquant=opts, layers=layers)
  layer = lb.ptq_params(m, {"params": params}, [x], rules, method="omniquant",
                        omniquant=opts).params["params"]
  rtn = lb.ptq_params(m, {"params": params}, [x], rules, method="rtn").params["params"]
  f = jax.jit(lambda p, x: m.apply({"params": p}, x))
  mse = {name: [float(jnp.mean((f(p, b) - f(params, b)) ** 2)) for b in (x, held)]
         for name, p in (("rtn", rtn), ("block-wise", block), ("layer-wise", layer))}
  print("model output MSE (calibration, held-out):", mse)
  for i in range(2):
    assert mse["layer-wise"][i] < 0.6 * mse["rtn"][i], mse
    assert mse["block-wise"][i] < 0.6 * mse["rtn"][i], mse


def test_a_bf16_kernels_objective_is_that_of_the_kernel_returned():
  # The trained step rounds in float32; the bf16 kernel returned is rounded
  # again (an asymmetric grid's points need not be bf16 values). Weight-only,
  # every row retained: the objective is the Hessian error of that kernel
  # (it was the float32 kernel's, 0.7% off, and could read above RTN's).
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.standard_t(3.0, (64, 32)) * 0.1, jnp.bfloat16)
  xs = [jnp.asarray(rng.standard_normal((96, 64)), jnp.bfloat16) for _ in range(2)]
  spec = lb.QuantSpec("int4", group_size=16, symmetric=False)
  res = lb.ptq_params(lambda p, x: x @ p["w"], {"w": w}, xs, [QuantRule("w", weight=spec)],
                      method="omniquant", omniquant=OmniQuantOptions(steps=30))
  e = res.report["layers"]["w"]
  assert res.params["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(e["objective"], e["error"], rtol=1e-4)
  assert e["objective"] <= e["objective_rtn"] or e["rtn_fallback"]
