"""AWQ, SmoothQuant, QuaRot and SpinQuant on MoE experts: shared scales folded
into the norm, per-expert scales folded between each expert's up and down
projections, the residual rotation (random or learned) folded into every
expert (online Hadamard at down)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.flax import apply_ptq, quantize_linen
from lowbit_jax.models.llama import Llama, LlamaConfig

_CFG = LlamaConfig.smoke(vocab=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         d_ff=32, max_len=32, n_experts=4, top_k=2)
_SPEC = QuantSpec("int3", group_size=16)
_EXPERTS = r"layers_0/mlp/(gate|up|down)_proj"


@pytest.fixture(scope="module")
def moe_lm():
  model = Llama(_CFG)
  toks = jax.random.randint(jax.random.key(1), (4, 32), 0, _CFG.vocab)
  params = jax.jit(model.init)(jax.random.key(0), toks[:1])["params"]
  # Outlier channels, as trained LLMs have: in the norm's output (read by the
  # router and every expert's gate/up) and in the experts' hidden units.
  p = jax.tree.map(lambda a: a, params)
  mlp = p["layers_0"]
  mlp["mlp_norm"]["scale"] = mlp["mlp_norm"]["scale"].at[jnp.array([3, 11])].mul(12.0)
  up = mlp["mlp"]["up_proj"]["kernel"]
  mlp["mlp"]["up_proj"]["kernel"] = up.at[:, :, jnp.array([2, 7, 20])].mul(10.0)
  return model, p, toks


def _err(model, params, qparams, toks):
  apply = jax.jit(model.apply)
  ref = apply({"params": params}, toks)
  return float(jnp.mean(jnp.square(apply({"params": qparams}, toks) - ref)))


def test_smoothquant_fold_leaves_float_moe_unchanged(moe_lm):
  model, params, toks = moe_lm
  new, rep = apply_ptq(model, params, [(toks,)], "smoothquant", None)
  ref = jax.jit(model.apply)({"params": params}, toks)
  out = jax.jit(model.apply)({"params": new}, toks)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  folded = {tuple(f["layers"]): f for f in rep["folds"] if f["status"] == "folded"}
  shared = next(f for k, f in folded.items() if "layers_0/mlp/gate_proj" in k)
  assert shared["producer"] == "layers_0/mlp_norm"
  assert "layers_0/mlp/up_proj" in shared["layers"]
  down = folded[("layers_0/mlp/down_proj",)]
  assert down["producer"] == "layers_0/mlp/up_proj" and down["per_expert"]
  # The kernels really changed (scales are not all one).
  w0 = params["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert float(jnp.max(jnp.abs(new["layers_0"]["mlp"]["down_proj"]["kernel"] - w0))) > 0
  assert not any(f["status"] == "skipped" and "mlp/" in f["layers"][0]
                 and "proj" in f["layers"][0] for f in rep["folds"])


@pytest.mark.slow
def test_awq_on_experts_beats_rtn(moe_lm):
  model, params, toks = moe_lm
  rules = [(_EXPERTS, _SPEC)]
  rtn_p, _ = apply_ptq(model, params, [(toks,)], "rtn", rules)
  awq_p, rep = apply_ptq(model, params, [(toks,)], "awq", rules, awq_clip=False)
  assert rep["layers"]["layers_0/mlp/down_proj"]["transform"] == "awq"
  assert rep["layers"]["layers_0/mlp/gate_proj"]["transform"] == "awq"
  err_rtn, err_awq = _err(model, params, rtn_p, toks), _err(model, params, awq_p, toks)
  assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


@pytest.mark.slow
def test_quarot_rotates_every_expert_and_leaves_float_moe_unchanged(moe_lm):
  model, params, toks = moe_lm
  new, rep = apply_ptq(model, params, [(toks,)], "quarot", None,
                       online=r".*/down_proj/kernel")
  rot = rep["rotation"]
  for name in ("gate_proj", "up_proj", "router"):
    assert f"layers_0/mlp/{name}/kernel" in rot.stream.readers
  assert "layers_0/mlp/down_proj/kernel" in rot.stream.writers
  assert rot.online == (("layers_0/mlp/down_proj/kernel", 1),)   # per expert, along F
  ref = jax.jit(model.apply)({"params": params}, toks)
  out = jax.jit(quantize_linen(rot.rules())(model.apply))({"params": new}, toks)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_quarot_on_experts_beats_rtn_at_w4a4(moe_lm):
  model, params, toks = moe_lm
  spec = QuantSpec("int4")
  rules = [QuantRule(".*", weight=spec, activation=QuantSpec("int4", axis=-1))]
  rtn_out = jax.jit(quantize_linen(rules)(model.apply))({"params": params}, toks)
  new, rep = apply_ptq(model, params, [(toks,)], "quarot", spec, "int4",
                       online=r".*/down_proj/kernel")
  act = [QuantRule(".*", activation=QuantSpec("int4", axis=-1))]
  rot_out = jax.jit(quantize_linen(rep["rotation"].rules(act))(model.apply))(
      {"params": new}, toks)
  ref = jax.jit(model.apply)({"params": params}, toks)
  err_rtn = float(jnp.mean(jnp.square(rtn_out - ref)))
  err_rot = float(jnp.mean(jnp.square(rot_out - ref)))
  assert err_rot < 0.8 * err_rtn, (err_rot, err_rtn)


@pytest.mark.slow
def test_spinquant_folds_learned_rotation_into_router_and_every_expert(moe_lm):
  # The learned R1 (last iterate, moved off the randomized Hadamard start) is
  # folded like QuaRot's: R1^T diag(g) W for the router and each expert's
  # gate/up, the float model unchanged, and the folded model's quantized loss
  # is the loss the learning measured (the traced fold equals the host fold).
  from lowbit_jax.algorithms import random_hadamard, spinquant_model
  from lowbit_jax.algorithms.spinquant import SpinQuantConfig, next_token_loss
  model, params, toks = moe_lm
  fn = lambda p, t: model.apply({"params": p}, t)
  rules = [QuantRule(".*", weight=QuantSpec("int4"),
                     activation=QuantSpec("int4", axis=-1))]
  new, rot, hist = spinquant_model(
      fn, params, [(toks,)], rules, online=r".*/down_proj/kernel",
      config=SpinQuantConfig(steps=3, select_every=0),
      quantize=lambda f, r: quantize_linen(r)(f))
  r1 = np.asarray(rot.rotation, np.float64)
  np.testing.assert_allclose(r1.T @ r1, np.eye(r1.shape[0]), atol=1e-5)
  start = np.asarray(random_hadamard(jax.random.key(0), r1.shape[0]))
  assert np.abs(r1 - start).max() > 1e-3    # learned, not the start
  mlp, new_mlp = params["layers_0"]["mlp"], new["layers_0"]["mlp"]
  g = np.asarray(params["layers_0"]["mlp_norm"]["scale"], np.float64)[:, None]
  want = r1.T @ (g * np.asarray(mlp["router"]["kernel"], np.float64))
  np.testing.assert_allclose(np.asarray(new_mlp["router"]["kernel"]), want, atol=1e-5)
  for name in ("gate_proj", "up_proj"):
    w = np.asarray(mlp[name]["kernel"], np.float64)
    for e in range(_CFG.n_experts):
      np.testing.assert_allclose(np.asarray(new_mlp[name]["kernel"][e]),
                                 r1.T @ (g * w[e]), atol=1e-5)
  ref = jax.jit(fn)(params, toks)
  out = jax.jit(quantize_linen(rot.rules())(fn))(new, toks)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
  qloss = next_token_loss(jax.jit(quantize_linen(rot.rules(rules))(fn))(new, toks), toks)
  np.testing.assert_allclose(float(qloss), hist["calib_after"], rtol=1e-4)


@pytest.mark.slow
def test_rotation_method_on_experts_skips_or_simulates_per_expert(moe_lm):
  model, params, toks = moe_lm
  down = params["layers_0"]["mlp"]["down_proj"]["kernel"]
  # Outlier input rows of each down expert: a rotation along K spreads them.
  params = jax.tree.map(lambda a: a, params)
  params["layers_0"]["mlp"]["down_proj"]["kernel"] = down.at[:, jnp.array([1, 9])].mul(
      8.0)
  down = params["layers_0"]["mlp"]["down_proj"]["kernel"]
  rules = [(r"layers_0/mlp/down_proj", _SPEC)]
  _, rep = apply_ptq(model, params, [(toks,)], "rotation", rules)
  f = next(f for f in rep["folds"] if f["layers"] == ["layers_0/mlp/down_proj"])
  assert f["status"] == "skipped" and "elementwise product" in f["reason"]
  assert rep["layers"]["layers_0/mlp/down_proj"]["transform"] == "none"
  # simulate: R Q(R^T w_e) per expert. Unquantized it is the identity (R
  # orthogonal): the float model is unchanged.
  same, _ = apply_ptq(model, params, [(toks,)], "rotation", None, unfoldable="simulate")
  np.testing.assert_allclose(np.asarray(same["layers_0"]["mlp"]["down_proj"]["kernel"]),
                             np.asarray(down), atol=1e-5)
  sim, rep = apply_ptq(model, params, [(toks,)], "rotation", rules,
                       unfoldable="simulate")
  rtn_p, _ = apply_ptq(model, params, [(toks,)], "rtn", rules)
  f = next(f for f in rep["folds"] if f["layers"] == ["layers_0/mlp/down_proj"])
  assert f["status"] == "simulated"
  entry = rep["layers"]["layers_0/mlp/down_proj"]
  assert entry["transform"] == "rotation" and entry["fold"] == "simulated"
  # Off the spec's grid: no scales for real mode to store.
  assert "down_proj" not in rep["quant_scales"].get("layers_0", {}).get("mlp", {})
  w_sim = sim["layers_0"]["mlp"]["down_proj"]["kernel"]
  w_rtn = rtn_p["layers_0"]["mlp"]["down_proj"]["kernel"]
  for e in range(_CFG.n_experts):   # every expert's kernel error drops
    err_sim = float(jnp.sum(jnp.square(w_sim[e] - down[e])))
    err_rtn = float(jnp.sum(jnp.square(w_rtn[e] - down[e])))
    assert err_sim < 0.8 * err_rtn, (e, err_sim, err_rtn)
