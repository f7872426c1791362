"""QAT and low-bit training through quantize_function: quant_scales, quant_state,
rng and quant_metrics keywords, init_quant_vars and real-mode conversion."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_jax as lb
from lowbit_jax import checkpoint
from lowbit_jax._rules import QuantRule, QWeight
from lowbit_jax.core import init_scale, ops

DN = (((1,), (0,)), ((), ()))
QAT = [QuantRule(".*", weight="int4", activation="int8", learn_weight="lsq",
                 learn_activation="pact")]


def mlp(params, x):
  h = jax.nn.relu(x @ params["up"]["w"] + params["up"]["b"])
  return h @ params["down"]["w"]


def _setup(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"up": {"w": jax.random.normal(k[0], (12, 32)) * 0.3,
                   "b": jnp.zeros((32,))},
            "down": {"w": jax.random.normal(k[1], (32, 4)) * 0.2}}
  return params, jax.random.normal(k[2], (16, 12)), jax.random.normal(k[3], (16, 4))


def test_init_quant_vars_train_and_convert_to_real(tmp_path):
  params, x, y = _setup()
  qf = lb.quantize_function(mlp, QAT)
  qv = qf.init_quant_vars(params, x)
  sc = qv["quant_scales"]
  assert set(sc) == {"up/w", "down/w"} and qv["quant_state"] == {}
  np.testing.assert_allclose(sc["up/w"]["weight_scale"],
                             init_scale(params["up"]["w"], lb.QuantSpec("int4", axis=0)),
                             rtol=1e-6)
  np.testing.assert_allclose(sc["up/w"]["act_clip"], jnp.max(jnp.abs(x)), rtol=1e-6)
  with pytest.raises(ValueError, match="init_quant_vars"):
    qf(params, x)

  def loss(state):
    p, s = state
    return jnp.mean((qf(p, x, quant_scales=s) - y) ** 2)

  g = jax.grad(loss)((params, sc))[1]
  for leaf in jax.tree.leaves(g):
    assert float(jnp.abs(leaf).sum()) > 0
  tx = optax.adam(1e-2)
  state = (params, sc)
  opt = tx.init(state)
  @jax.jit
  def step(state, opt):
    l, g = jax.value_and_grad(loss)(state)
    upd, opt = tx.update(g, opt, state)
    return optax.apply_updates(state, upd), opt, l

  losses = []
  for _ in range(8):
    state, opt, l = step(state, opt)
    losses.append(float(l))
  assert losses[-1] < 0.8 * losses[0], losses
  p, s = state
  fake, metrics = qf(p, x, quant_scales=s, quant_metrics=True)
  assert set(metrics["up/w"]) == {"weight_clipped", "act_clipped"}
  assert 0 <= float(metrics["up/w"]["act_clipped"]) < 0.5

  qr = lb.quantize_function(mlp, QAT, mode="real")
  rp = qr.quantize_params(p, x, quant_scales=s)
  k = rp["up"]["w"]
  assert isinstance(k, QWeight)
  np.testing.assert_array_equal(k.scale, s["up/w"]["weight_scale"].T)
  real = qr(rp, x, quant_scales=s)
  np.testing.assert_allclose(real, fake, rtol=1e-5, atol=1e-5)
  checkpoint.save(str(tmp_path / "ck"), {"params": rp, "quant_scales": s})
  back = checkpoint.restore(str(tmp_path / "ck"))
  np.testing.assert_array_equal(qr(back["params"], x,
                                   quant_scales=back["quant_scales"]), real)


def test_grad_rule_backward_only_delayed_histories_and_stochastic_keys():
  params, x, _ = _setup(1)
  w = params["up"]["w"]
  f = lambda p, x: x @ p["up"]["w"]  # noqa: E731
  ct = jax.random.normal(jax.random.key(5), (16, 32))
  base = dict(weight="fp8_e4m3", activation="fp8_e4m3")
  q0 = lb.quantize_function(f, [QuantRule(".*", **base)])
  q1 = lb.quantize_function(f, [QuantRule(".*", **base, grad="fp4_e2m1")])

  @jax.jit
  def vjps(w, x):
    fns = [lambda w, x: q0({"up": {"w": w}}, x), lambda w, x: q1({"up": {"w": w}}, x),
           lambda w, x: ops.dot_general(x, w, DN, lhs_spec="fp8_e4m3",
                                        rhs_spec="fp8_e4m3", grad_spec="fp4_e2m1")]
    outs = [jax.vjp(f, w, x) for f in fns]
    return [o for o, _ in outs], [p(ct) for _, p in outs]

  (y0, y1, _), (g0, g1, gr) = vjps(w, x)
  np.testing.assert_array_equal(y0, y1)
  for a, b, c in zip(g1, gr, g0):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not np.allclose(a, c)

  qd = lb.quantize_function(f, [QuantRule(".*", **base, grad="fp8_e5m2",
                                          scaling="delayed", amax_history_len=2)])
  st = qd.init_quant_vars(params, x)["quant_state"]
  assert set(st["up/w"]) == {"act_history", "weight_history", "grad_history"}
  new = jax.jit(jax.grad(lambda s: jnp.sum(qd(params, x, quant_state=s) * ct)))(st)
  np.testing.assert_allclose(new["up/w"]["act_history"], [jnp.max(jnp.abs(x)), 0])
  np.testing.assert_allclose(new["up/w"]["weight_history"], [jnp.max(jnp.abs(w)), 0])
  np.testing.assert_allclose(new["up/w"]["grad_history"], [jnp.max(jnp.abs(ct)), 0])

  qs = lb.quantize_function(mlp, [QuantRule(".*", weight="int8", grad=lb.QuantSpec(
      "int4", rounding="stochastic"))])
  def gw(rng):
    return jax.grad(lambda p: jnp.sum(jnp.sin(qs(p, x, rng=rng))))(params)
  with pytest.raises(ValueError, match="rng=key"):
    gw(None)
  gw = jax.jit(gw)
  g1, g1b, g2 = gw(jax.random.key(1)), gw(jax.random.key(1)), gw(jax.random.key(2))
  np.testing.assert_array_equal(g1["up"]["w"], g1b["up"]["w"])
  assert not np.allclose(g1["up"]["w"], g2["up"]["w"])
