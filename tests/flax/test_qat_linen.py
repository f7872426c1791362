"""QAT and low-bit training through quantize_linen: learned scales, grad specs,
delayed scaling, stochastic rounding, metrics, real-mode conversion, ActEinsum."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_jax as lb
from lowbit_jax import checkpoint
from lowbit_jax._rules import QuantRule, QWeight
from lowbit_jax.core import init_scale, ops
from lowbit_jax.flax import ActEinsum, quantize_linen

DN = (((1,), (0,)), ((), ()))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="up")(x))
    return nn.Dense(4, name="down")(h)


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, use_bias=False, name="lin")(x)


class Attn(nn.Module):
  @nn.compact
  def __call__(self, q, k):
    return ActEinsum("bqd,bkd->bqk", name="qk")(q, k)


def _data(seed=0, n=16, d=12):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, d)), jax.random.normal(ky, (n, 4))


QAT = [QuantRule(".*", weight="int4", activation="int8", learn_weight="lsq",
                 learn_activation="pact")]


def test_lsq_pact_created_on_init_initialised_and_trained():
  x, y = _data()
  model = MLP()
  q = quantize_linen(QAT)
  v = jax.jit(q(model.init))(jax.random.key(0), x)
  sc = v["quant_scales"]
  assert set(sc["up"]) == {"weight_scale", "act_clip"}
  w = v["params"]["up"]["kernel"]
  want = init_scale(w, lb.QuantSpec("int4", axis=0), method="lsq")
  np.testing.assert_allclose(sc["up"]["weight_scale"], want, rtol=1e-6)
  np.testing.assert_allclose(sc["up"]["act_clip"], jnp.max(jnp.abs(x)), rtol=1e-6)
  # The PACT clip of "down" starts at the amax of its input, relu(up(x)).
  h = np.maximum(np.asarray(x @ w + v["params"]["up"]["bias"]), 0)
  assert 0.5 * h.max() < float(sc["down"]["act_clip"]) <= h.max() * 1.0001

  def loss(p, s):
    out = q(model.apply)({"params": p, "quant_scales": s}, x)
    return jnp.mean((out - y) ** 2)

  g = jax.grad(loss, argnums=1)(v["params"], sc)
  for leaf in jax.tree.leaves(g):
    assert float(jnp.abs(leaf).sum()) > 0
  tx = optax.adam(1e-2)
  state = (v["params"], sc)
  opt = tx.init(state)

  @jax.jit
  def step(state, opt):
    l, g = jax.value_and_grad(lambda s: loss(*s))(state)
    upd, opt = tx.update(g, opt, state)
    return optax.apply_updates(state, upd), opt, l

  losses = []
  for _ in range(8):
    state, opt, l = step(state, opt)
    losses.append(float(l))
  assert losses[-1] < 0.8 * losses[0], losses
  assert not np.allclose(state[1]["up"]["weight_scale"], sc["up"]["weight_scale"])


def test_init_quant_vars_from_float_checkpoint_amax_init():
  x, _ = _data()
  model = MLP()
  v = model.init(jax.random.key(1), x)
  rules = [QuantRule(".*", weight="int4", activation="int8", learn_weight="lsq",
                     learn_activation="lsq", scale_init="amax")]
  q = quantize_linen(rules)
  qv = q.init_quant_vars(model, v, x)
  assert set(qv) == {"quant_scales", "quant_state"} and qv["quant_state"] == {}
  w = v["params"]["up"]["kernel"]
  np.testing.assert_allclose(qv["quant_scales"]["up"]["weight_scale"],
                             jnp.max(jnp.abs(w), axis=0, keepdims=True) / 7, rtol=1e-6)
  np.testing.assert_allclose(qv["quant_scales"]["up"]["act_scale"],
                             jnp.max(jnp.abs(x)) / 127, rtol=1e-6)
  # With amax-initialised scales, QAT starts from the PTQ model's numbers.
  ptq = quantize_linen([QuantRule(".*", weight="int4",
                                  activation=lb.QuantSpec("int8", axis="tensor"))])
  np.testing.assert_allclose(q(model.apply)({**v, **qv}, x), ptq(model.apply)(v, x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="init_quant_vars"):
    q(model.apply)(v, x)
  # A PACT clip starts at the calibrated range when quant_stats are present.
  static = [QuantRule("up", activation="int8", static=True)]
  _, cal = quantize_linen(static, mode="calibrate")(model.apply)(
      v, 0.5 * x, mutable=["quant_stats"])
  pact = quantize_linen([QuantRule("up", activation="int8", learn_activation="pact")])
  pv = pact.init_quant_vars(model, {**v, **cal}, x)
  np.testing.assert_allclose(pv["quant_scales"]["up"]["act_clip"],
                             0.5 * jnp.max(jnp.abs(x)), rtol=1e-6)


def test_grad_rule_changes_backward_only_and_matches_core_ops():
  x, _ = _data()
  model = OneDense()
  v = model.init(jax.random.key(2), x)
  w = v["params"]["lin"]["kernel"]
  base = dict(weight="fp8_e4m3", activation="fp8_e4m3")
  q0 = quantize_linen([QuantRule(".*", **base)])
  q1 = quantize_linen([QuantRule(".*", **base, grad="fp4_e2m1")])
  ct = jax.random.normal(jax.random.key(3), (16, 8)) * 3

  @jax.jit
  def vjp_all(x, w):
    outs = [jax.vjp(f, x, w) for f in (apply(q0), apply(q1), ref)]
    return [(o, p(ct)) for o, p in outs]

  def apply(q):
    return lambda x, w: q(model.apply)({"params": {"lin": {"kernel": w}}}, x)
  ref = lambda x, w: ops.dot_general(x, w, DN, lhs_spec="fp8_e4m3",  # noqa: E731
                                     rhs_spec="fp8_e4m3", grad_spec="fp4_e2m1")
  (y0, g0), (y1, g1), (yr, gr) = vjp_all(x, w)
  np.testing.assert_array_equal(y0, y1)
  assert not np.allclose(g0[0], g1[0]) and not np.allclose(g0[1], g1[1])
  np.testing.assert_array_equal(y1, yr)
  np.testing.assert_allclose(g1[0], gr[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g1[1], gr[1], rtol=1e-6, atol=1e-6)


def test_delayed_scaling_histories_overwrite_with_gradient():
  x, _ = _data()
  model = OneDense()
  rules = [QuantRule(".*", weight="fp8_e4m3", activation="fp8_e4m3",
                     grad="fp8_e5m2", scaling="delayed", amax_history_len=4)]
  q = quantize_linen(rules)
  v = q(model.init)(jax.random.key(4), x)
  st = v["quant_state"]["lin"]
  assert set(st) == {"act_history", "weight_history", "grad_history"}
  for h in st.values():
    np.testing.assert_array_equal(h, np.zeros(4, np.float32))
  w = v["params"]["lin"]["kernel"]
  ct = jax.random.normal(jax.random.key(5), (16, 8))

  def loss(p, s):
    return jnp.sum(q(model.apply)({"params": p, "quant_state": s}, x) * ct)

  _, new = jax.grad(loss, argnums=(0, 1))(v["params"], v["quant_state"])
  h = new["lin"]
  np.testing.assert_allclose(h["act_history"], [jnp.max(jnp.abs(x)), 0, 0, 0])
  np.testing.assert_allclose(h["weight_history"], [jnp.max(jnp.abs(w)), 0, 0, 0])
  np.testing.assert_allclose(h["grad_history"], [jnp.max(jnp.abs(ct)), 0, 0, 0])
  # A second step with the written-back histories rolls them.
  _, new2 = jax.grad(loss, argnums=(0, 1))(v["params"], new)
  np.testing.assert_allclose(new2["lin"]["act_history"][:2], [jnp.max(jnp.abs(x))] * 2)


def test_stochastic_grad_rounding_takes_quant_rng_and_errors_without():
  x, _ = _data()
  model = OneDense()
  v = model.init(jax.random.key(6), x)
  rules = [QuantRule(".*", weight="int8", activation="int8",
                     grad=lb.QuantSpec("int4", rounding="stochastic"))]
  q = quantize_linen(rules)

  def grads(key):
    def loss(p):
      kw = {} if key is None else {"rngs": {"quant": key}}
      return jnp.sum(jnp.sin(q(model.apply)({"params": p}, x, **kw)))
    return jax.grad(loss)(v["params"])["lin"]["kernel"]

  with pytest.raises(ValueError, match="rngs=\\{'quant': key\\}"):
    grads(None)
  g1, g1b = grads(jax.random.key(1)), grads(jax.random.key(1))
  g2 = grads(jax.random.key(2))
  np.testing.assert_array_equal(g1, g1b)
  assert not np.allclose(g1, g2)
  y_a = q(model.apply)(v, x, rngs={"quant": jax.random.key(1)})
  y_b = q(model.apply)(v, x, rngs={"quant": jax.random.key(2)})
  np.testing.assert_array_equal(y_a, y_b)  # nearest rounding forward


def test_real_conversion_after_qat_equals_fake_and_checkpoints(tmp_path):
  x, y = _data()
  model = MLP()
  q = quantize_linen(QAT)
  v = q(model.init)(jax.random.key(7), x)
  tx = optax.sgd(0.05)
  state = {"params": v["params"], "quant_scales": v["quant_scales"]}
  opt = tx.init(state)
  @jax.jit
  def step(state, opt):
    g = jax.grad(lambda s: jnp.mean((q(model.apply)(s, x) - y) ** 2))(state)
    upd, opt = tx.update(g, opt, state)
    return optax.apply_updates(state, upd), opt

  for _ in range(3):
    state, opt = step(state, opt)
  fake = q(model.apply)(state, x)
  qr = quantize_linen(QAT, mode="real")
  rv = qr.quantize_params(model, state, x)
  k = rv["params"]["up"]["kernel"]
  assert isinstance(k, QWeight) and k.transposed
  assert "weight_scale" not in rv["quant_scales"]["up"]
  np.testing.assert_array_equal(k.scale, state["quant_scales"]["up"]["weight_scale"].T)
  real = qr(model.apply)(rv, x)
  np.testing.assert_allclose(real, fake, rtol=1e-5, atol=1e-5)
  checkpoint.save(str(tmp_path / "ck"), rv)
  back = checkpoint.restore(str(tmp_path / "ck"))
  np.testing.assert_array_equal(qr(model.apply)(back, x), real)


def test_clipped_fractions_are_sown():
  x, _ = _data()
  model = OneDense()
  v = model.init(jax.random.key(8), x)
  rules = [QuantRule(".*", weight=lb.QuantSpec("int8", clip_ratio=0.5),
                     activation="int8", learn_activation="pact")]
  q = quantize_linen(rules)
  qv = q.init_quant_vars(model, v, x)
  clip = 0.3 * jnp.max(jnp.abs(x))
  qv["quant_scales"]["lin"]["act_clip"] = clip
  _, m = q(model.apply)({**v, **qv}, x, mutable=["quant_metrics"])
  m = m["quant_metrics"]["lin"]
  np.testing.assert_allclose(m["act_clipped"][0], jnp.mean(jnp.abs(x) > clip))
  w = v["params"]["lin"]["kernel"]
  want = jnp.mean(jnp.abs(w) > 0.5 * jnp.max(jnp.abs(w), axis=0))
  np.testing.assert_allclose(m["weight_clipped"][0], want)
  assert 0 < float(want) < 1


def test_act_einsum_is_reached_only_by_act_matmul_rules():
  kq, kk = jax.random.split(jax.random.key(9))
  qa, ka = jax.random.normal(kq, (2, 5, 8)), jax.random.normal(kk, (2, 6, 8))
  model = Attn()
  v = model.init(jax.random.key(0), qa, ka)
  assert v == {} or not jax.tree.leaves(v)
  fp = model.apply(v, qa, ka)
  np.testing.assert_array_equal(fp, jnp.einsum("bqd,bkd->bqk", qa, ka))
  catch_all = quantize_linen([QuantRule(".*", weight="int4", activation="int4")])
  np.testing.assert_array_equal(catch_all(model.apply)(v, qa, ka), fp)
  assert catch_all.unused_rules()
  rule = QuantRule(".*/?qk", activation="int4", grad="fp8_e5m2", ops=("act_matmul",))
  q = quantize_linen([rule])
  spec = lb.QuantSpec("int4")
  ct = jnp.ones((2, 5, 6)) * 0.37
  ref = lambda a, b: ops.einsum("bqd,bkd->bqk", a, b, lhs_spec=spec,  # noqa: E731
                                rhs_spec=spec, grad_spec="fp8_e5m2")

  @jax.jit
  def vjps(a, b):
    out, pull = jax.vjp(lambda a, b: q(model.apply)(v, a, b), a, b)
    _, rpull = jax.vjp(ref, a, b)
    return out, pull(ct), rpull(ct)

  out, g, rg = vjps(qa, ka)
  assert list(q.config.sites) == ["qk"]
  want = jnp.einsum("bqd,bkd->bqk", lb.fake_quant(qa, spec.replace(axis=2)),
                    lb.fake_quant(ka, spec.replace(axis=2)))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(g, rg):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="static"):
    quantize_linen([QuantRule("qk", activation="int8", static=True,
                              ops=("act_matmul",))])(model.apply)(v, qa, ka)


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4_mxfp4", "w4a4_nvfp4"])
def test_bf16_decoder_real_mode_equals_fake_mode_under_jit(scheme):
  """A bf16 decoder converted to real mode (packed weights) gives the fake-quant
  forward pass's logits bit for bit (as the jitted evaluation runs them): the
  weights are quantized as the bf16 layers see them and the dequantized
  operands round to bf16 as fake mode's do."""
  from lowbit_jax.models.llama import Llama, LlamaConfig
  from lowbit_jax.train import qat
  cfg = LlamaConfig(vocab=128, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                    d_ff=128, max_len=32, dtype="bfloat16")
  model = Llama(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 128)
  v = model.init(jax.random.key(0), tokens)
  rules = qat.make_rules(dict(rules=scheme, learn_weight="none",
                              learn_activation="none"))
  fake = jax.jit(quantize_linen(rules, mode="fake")(model.apply))(v, tokens)
  qr = quantize_linen(rules, mode="real")
  real = jax.jit(qr(model.apply))(qr.quantize_params(model, v, tokens), tokens)
  assert fake.dtype == real.dtype
  np.testing.assert_array_equal(np.asarray(real, np.float32), np.asarray(fake, np.float32))
