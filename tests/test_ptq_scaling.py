"""AWQ, SmoothQuant and the per-layer rotation through ptq_params on every front end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax._fold import apply_scaling, find_scaling_folds
from lowbit_jax._ptq import _get_path
from lowbit_jax._ptq_scaling import _put, as_function
from lowbit_jax._rules import QuantRule, QWeight, is_qarray, path_str
from lowbit_jax.flax import quantize_nnx
from tests import _toy_models as toy

SPEC = lb.QuantSpec("int4", group_size=16)
# Every weight site of the toy model but the conv (whose window rows make its
# own compiles) and the float head.
RULES = [QuantRule(".*/(q|k|v|o|up|down)", weight=SPEC)]
FOLDED = ("q", "k", "v", "o", "up")   # conv -> q/k/v, v -> o, norm2 -> up


@pytest.fixture(scope="module")
def setup():
  model, v = toy.init_linen()
  return model, v, [toy.tokens(s) for s in range(2)]


@pytest.fixture(scope="module")
def nnx_model(setup):
  return toy.nnx_from_linen(setup[1]["params"])


@pytest.fixture(scope="module")
def fn_awq(setup):
  _, v, batches = setup
  return lb.ptq_params(toy.toy_apply, v["params"], batches, RULES, method="awq")


def _leaves(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)
  return {path_str(k): leaf for k, leaf in flat}


def _random_folds(fn, params, plan, seed=0):
  cur = params
  for i, f in enumerate(plan.folds.values()):
    s = jnp.exp(jax.random.uniform(jax.random.key(seed + i), (f.size,),
                                   minval=-1.0, maxval=1.0))
    cur = apply_scaling(cur, f, s, _get_path, _put)
  return cur


def test_folds_found_from_the_jaxpr_on_every_front_end(setup, nnx_model):
  model, v, batches = setup
  nm = nnx_model
  t = batches[0]
  plan = find_scaling_folds(toy.toy_apply, v["params"], t)
  for i in range(toy.LAYERS):
    f = plan.folds
    assert [p for p, _ in f[f"layers_{i}/norm1/scale"].readers] == [
        f"layers_{i}/conv/kernel"]
    assert [p for p, _ in f[f"layers_{i}/conv/kernel"].divide] == [
        f"layers_{i}/conv/kernel", f"layers_{i}/conv/bias"]
    assert sorted(p for p, _ in f[f"layers_{i}/conv/kernel"].readers) == [
        f"layers_{i}/{n}/kernel" for n in ("k", "q", "v")]
    # The classic AWQ fold for o: through p @ v with the heads kept.
    assert [p for p, _ in f[f"layers_{i}/v/kernel"].readers] == [f"layers_{i}/o/kernel"]
    assert f[f"layers_{i}/v/kernel"].size == toy.HEADS * toy.HEAD_DIM
    assert [p for p, _ in f[f"layers_{i}/norm2/scale"].readers] == [
        f"layers_{i}/up/kernel"]
    # down reads gelu(up): no exact fold, and the reason names the primitive.
    assert "integer_pow" in plan.skipped[f"layers_{i}/down/kernel"]
    # q and k are read by q.k (contracted against a non-parameter): no fold.
    assert f"layers_{i}/q/kernel" not in f and f"layers_{i}/o/kernel" not in f
  # Any positive scaling on every fold leaves the float model unchanged.
  new = _random_folds(toy.toy_apply, v["params"], plan)
  f = jax.jit(toy.toy_apply)
  np.testing.assert_allclose(f(new, t), f(v["params"], t),
                             rtol=1e-5, atol=1e-5)
  # Linen and NNX models give the same plan through their own functions.
  for model_, params in ((model, v), (nm, None)):
    front = "linen" if params is not None else "nnx"
    fn, tree = as_function(model_, params, front)
    other = find_scaling_folds(fn, tree, t)
    assert {k: [p for p, _ in f.readers] for k, f in other.folds.items()} == {
        k: [p for p, _ in f.readers] for k, f in plan.folds.items()}
    assert set(other.skipped) == set(plan.skipped)


def _smoke_llama():
  from lowbit_jax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  toks = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab)
  return cfg, model, toks, jax.jit(model.init)(jax.random.key(0), toks)["params"]


@pytest.mark.slow
def test_folds_on_the_smoke_llama_as_a_function():
  cfg, model, toks, params = _smoke_llama()
  fn = lambda p, t: model.apply({"params": p}, t)
  plan = find_scaling_folds(fn, params, toks)
  f = plan.folds
  for i in range(cfg.n_layers):
    a = f"layers_{i}/attn/"
    assert sorted(p for p, _ in f[f"layers_{i}/attn_norm/scale"].readers) == [
        a + n + "/kernel" for n in ("k_proj", "q_proj", "v_proj")]
    # GQA: o_proj's rows repeat each value head's scaling over its query group.
    assert [p for p, _ in f[a + "v_proj/kernel"].readers] == [a + "o_proj/kernel"]
    assert f[a + "v_proj/kernel"].size == cfg.n_kv_heads * cfg.d_model // cfg.n_heads
    m = f"layers_{i}/mlp/"
    assert sorted(p for p, _ in f[f"layers_{i}/mlp_norm/scale"].readers) == [
        m + "gate_proj/kernel", m + "up_proj/kernel"]
    # down(silu(gate) * up): the fold into up_proj.
    assert [p for p, _ in f[m + "up_proj/kernel"].readers] == [m + "down_proj/kernel"]
  assert "logistic" in f"{plan.skipped}" or not plan.skipped
  new = _random_folds(fn, params, plan, seed=5)
  f = jax.jit(fn)
  np.testing.assert_allclose(f(new, toks), f(params, toks), rtol=2e-5, atol=2e-5)


def test_awq_on_a_function_lowers_the_folded_layers_error(fn_awq):
  layers = fn_awq.report["layers"]
  assert sorted(layers) == sorted(f"layers_{i}/{n}/kernel" for i in range(2)
                                  for n in FOLDED + ("down",))
  for p, e in layers.items():
    name = p.split("/")[1]
    if name == "down":
      assert e["fold"] is None and "integer_pow" in e["reason"], e
      continue
    assert e["fold"] is not None, (p, e)
    # AWQ's search includes s = 1 (RTN) and every row is in its sample, so
    # its output error is never above RTN's; the clip search lowers it more.
    assert e["error"] <= e["rtn_error"] * (1 + 1e-4), (p, e)
  assert np.mean([e["error_vs_rtn"] for e in layers.values()
                  if e["fold"] is not None]) < 0.85
  folds = {f["producer"]: f for f in fn_awq.report["folds"]}
  assert folds["layers_0/v/kernel"]["status"] == "folded"
  assert folds["final_norm/scale"]["status"] == "skipped"   # the head is float
  assert folds["layers_0/v/kernel"]["scales"].shape == (toy.HEADS * toy.HEAD_DIM,)


def check_function_real_equals_fake(res, rules, t, want):
  """Real mode of the toy function stores ``res``'s weights exactly (every
  reported layer a QWeight whose values equal the fake-quantized kernel) and
  its output equals ``want``."""
  qr = lb.quantize_function(toy.toy_apply, rules, mode="real")
  rp = qr.quantize_params(res.params, t, **lb.real_mode_kwargs(res, "function"))
  stored, gp = _leaves(rp), _leaves(res.params)
  for p in res.report["layers"]:
    assert isinstance(stored[p], QWeight)
    np.testing.assert_array_equal(stored[p].logical(), gp[p])
  np.testing.assert_allclose(qr(rp, t), want, rtol=1e-5, atol=1e-5)


def test_function_real_mode_equals_fake_mode_after_awq(setup, fn_awq):
  t = toy.tokens(7)
  check_function_real_equals_fake(fn_awq, RULES, t,
                                  jax.jit(toy.toy_apply)(fn_awq.params, t))


def test_nnx_awq_matches_the_function_and_real_equals_fake(setup, nnx_model, fn_awq):
  batches = setup[2]
  m = nnx.clone(nnx_model)
  res = lb.ptq_params(m, None, batches, RULES, method="awq")
  for p, e in res.report["layers"].items():
    np.testing.assert_allclose(e["error"], fn_awq.report["layers"][p]["error"],
                               rtol=1e-3, atol=1e-7)
  # The model's own Params were updated in place: kernels and folded producers.
  np.testing.assert_allclose(m.layers_0.norm2.scale.get_value(),
                             fn_awq.params["layers_0"]["norm2"]["scale"], rtol=1e-5)
  np.testing.assert_allclose(m.layers_0.v.bias.get_value(),
                             fn_awq.params["layers_0"]["v"]["bias"], rtol=1e-5)
  t = toy.tokens(7)
  fake = nnx.jit(lambda m, t: m(t))(m, t)
  q = quantize_nnx(m, RULES, mode="real", **lb.real_mode_kwargs(res, "nnx"))
  assert isinstance(q.layers_1.o.kernel.get_value(), QWeight)
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(q, t), fake, rtol=1e-5,
                             atol=1e-5)


def test_smoothquant_w8a8_on_linen_folds_and_real_equals_fake(setup):
  from lowbit_jax.flax import quantize_linen
  model, v, batches = setup
  rules = [QuantRule(".*/up", weight="int8",
                     activation=lb.QuantSpec("int8", axis=-1))]
  res = lb.ptq_params(model, v, batches, rules, method="smoothquant")
  up = res.report["layers"]["layers_0/up/kernel"]
  assert up["fold"] == "layers_0/norm2/scale"
  folds = {f["producer"]: f for f in res.report["folds"]}
  s = folds["layers_0/norm2/scale"]["scales"]
  np.testing.assert_allclose(res.params["params"]["layers_0"]["norm2"]["scale"],
                             v["params"]["layers_0"]["norm2"]["scale"] / s, rtol=1e-5)
  t = toy.tokens(7)
  ql = quantize_linen(rules, mode="real")
  rv = ql.quantize_params(model, {**res.params, **lb.real_mode_kwargs(res, "linen")}, t)
  fake = jax.jit(quantize_linen(rules, mode="fake")(model.apply))(res.params, t)
  np.testing.assert_allclose(jax.jit(ql(model.apply))(rv, t), fake, rtol=1e-5,
                             atol=1e-5)


def test_rotation_folds_only_into_a_linear_producer_and_real_equals_fake(setup):
  _, v, batches = setup
  rules = [QuantRule(".*/(q|o|up)", weight=SPEC)]
  res = lb.ptq_params(toy.toy_apply, v["params"], batches, rules, method="rotation")
  layers = res.report["layers"]
  for i in range(toy.LAYERS):
    # conv (kernel and bias) -> q/k/v: the conv's output columns take R.
    assert layers[f"layers_{i}/q/kernel"]["fold"] == f"layers_{i}/conv/kernel"
    assert "does not fold into a norm's elementwise gain" in layers[
        f"layers_{i}/up/kernel"]["reason"]
    assert "p @ v" in layers[f"layers_{i}/o/kernel"]["reason"]
  r = next(f["rotation"] for f in res.report["folds"] if f["status"] == "folded")
  np.testing.assert_allclose(r @ r.T, np.eye(r.shape[0]), atol=1e-5)
  # The float model is unchanged (checked inside), and real mode stores the
  # returned codes of the rotated kernels.
  t = toy.tokens(7)
  qr = lb.quantize_function(toy.toy_apply, rules, mode="real")
  rp = qr.quantize_params(res.params, t, **lb.real_mode_kwargs(res, "function"))
  fake = lb.quantize_function(toy.toy_apply, rules)(res.params, t)
  np.testing.assert_allclose(qr(rp, t), fake, rtol=1e-5, atol=1e-5)


def test_clear_errors(setup):
  _, v, batches = setup
  with pytest.raises(ValueError, match="capture= is for gptq/rtn"):
    cap = lb.capture_hessians(toy.toy_apply, v["params"], batches, RULES)
    lb.ptq_params(toy.toy_apply, v["params"], batches, RULES, method="awq",
                  capture=cap)
  # A fold that moves the float output (here: any rounding, fold_rtol=0) is an
  # error naming the producer and its readers.
  with pytest.raises(ValueError, match=r"\['layers_0/up/kernel'\] into "
                     r"'layers_0/norm2/scale' changes the float model"):
    lb.ptq_params(toy.toy_apply, v["params"], batches,
                  [QuantRule(".*/up", weight="int8")], method="smoothquant",
                  fold_rtol=0.0)
  with pytest.raises(ValueError, match="raise max_samples"):
    lb.ptq_params(toy.toy_apply, v["params"], batches,
                  [QuantRule(".*/up", weight=SPEC)], method="awq", max_samples=0)


@pytest.mark.slow
def test_linen_awq_matches_apply_ptq():
  """Where apply_ptq folds too (an nn.RMSNorm into gate/up), the same result."""
  from lowbit_jax.flax import apply_ptq
  cfg, model, toks, params = _smoke_llama()
  layers = ".*/mlp/(gate_proj|up_proj)"
  qp, rep = apply_ptq(model, params, [toks], "awq", SPEC, layers=layers)
  assert {f["status"] for f in rep["folds"]} == {"folded"}
  res = lb.ptq_params(model, {"params": params}, [toks],
                      [QuantRule(layers, weight=SPEC)], method="awq")
  for i in range(cfg.n_layers):
    li = f"layers_{i}"
    np.testing.assert_allclose(res.params["params"][li]["mlp_norm"]["scale"],
                               qp[li]["mlp_norm"]["scale"], rtol=1e-5)
    for n in ("gate_proj", "up_proj"):
      np.testing.assert_allclose(res.params["params"][li]["mlp"][n]["kernel"],
                                 qp[li]["mlp"][n]["kernel"], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(
          res.weight_scales[f"{li}/mlp/{n}/kernel"],
          rep["quant_scales"][li]["mlp"][n]["weight_scale"], rtol=1e-5)


@pytest.mark.slow
def test_awq_on_the_smoke_llama_as_a_function():
  _, model, toks, params = _smoke_llama()
  fn = lambda p, t: model.apply({"params": p}, t)
  rules = [QuantRule("lm_head"), QuantRule(".*", weight=SPEC)]
  res = lb.ptq_params(fn, params, [toks], rules, method="awq")
  layers = res.report["layers"]
  assert len(layers) == 14
  for p, e in layers.items():
    assert e["fold"] is not None, (p, e)   # every linear of the decoder folds
    assert e["error"] <= e["rtn_error"] * (1 + 1e-4), (p, e)
  qr = lb.quantize_function(fn, rules, mode="real")
  rp = qr.quantize_params(res.params, toks, **lb.real_mode_kwargs(res, "function"))
  np.testing.assert_allclose(qr(rp, toks), fn(res.params, toks), rtol=1e-5, atol=1e-5)


def test_folds_into_a_bf16_model_pass_within_its_rounding():
  # The fold check widens fold_rtol to 8 bf16 epsilons, as the rotation check
  # does: at 1e-3 every AWQ / SmoothQuant fold of a bf16 model was refused as
  # a use the fold analysis had missed.
  d, f, v = 64, 128, 20

  def rms(x, g):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)
            ).astype(x.dtype) * g

  def fn(p, t):
    x = p["embed"][t]
    h = rms(x, p["n1"])
    x = x + (h @ p["a"]["kernel"]) @ p["o"]["kernel"]
    h = rms(x, p["n2"])
    return x + jax.nn.gelu(h @ p["up"]["kernel"]) @ p["down"]["kernel"]

  ks = iter(jax.random.split(jax.random.key(0), 8))
  r = lambda *s: jax.random.normal(next(ks), s)  # noqa: E731
  p = {"embed": r(v, d), "n1": 1 + 0.3 * r(d), "n2": 1 + 0.3 * r(d),
       "a": {"kernel": r(d, d) / 8}, "o": {"kernel": r(d, d) / 8},
       "up": {"kernel": r(d, f) / 8}, "down": {"kernel": r(f, d) / 11}}
  p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
  t = jax.random.randint(next(ks), (4, 16), 0, v)
  rules = [lb.QuantRule("(a|o|up|down)", weight=lb.QuantSpec("int4", group_size=16))]
  for method in ("awq", "smoothquant"):
    res = lb.ptq_params(fn, p, [t], rules, method=method)
    assert any(f["status"] == "folded" for f in res.report["folds"]), method


def test_asymmetric_awq_with_its_clip_search_stores_exactly():
  # AWQ's own format (uint4 groups): the clipped kernel's rounded blocks need
  # not reach the ranges they were rounded with, so the result carries each
  # weight's (scale, zero point) pair (real mode re-derived other codes:
  # 396 of 4096 differed), through ptq_params and apply_ptq alike.
  import dataclasses

  import flax.linen as nn

  from lowbit_jax.flax import apply_ptq, quantize_linen

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(64, name="up")(nn.RMSNorm(name="norm")(x))

  x = jax.random.normal(jax.random.key(0), (64, 64)) * jnp.where(
      jnp.arange(64) % 9 == 0, 10.0, 1.0)
  m = MLP()
  v = m.init(jax.random.key(1), x)
  spec = lb.QuantSpec("uint4", group_size=16)
  rules = [QuantRule(".*", weight=spec)]
  ql = quantize_linen(rules, mode="real")
  res = lb.ptq_params(m, v, [(x,)], rules, method="awq")
  assert isinstance(res.weight_scales["up/kernel"], tuple)
  k = res.params["params"]["up"]["kernel"]
  assert not np.array_equal(lb.fake_quant(k, spec.replace(axis=0)), k)  # can fail
  vr = ql.quantize_params(m, {**res.params, **lb.real_mode_kwargs(res, "linen")}, x)
  np.testing.assert_array_equal(vr["params"]["up"]["kernel"].logical(), k)
  fake = quantize_linen([dataclasses.replace(r, weight=None) for r in rules])(m.apply)
  np.testing.assert_allclose(ql(m.apply)(vr, x), fake(res.params, x), atol=1e-5)
  qp, rep = apply_ptq(m, v["params"], [(x,)], "awq", spec)
  vr = ql.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  np.testing.assert_array_equal(vr["params"]["up"]["kernel"].logical(), qp["up"]["kernel"])
