"""QAT and low-bit training through quantize_nnx: QuantScale Params, grad specs,
QuantHistory (overwrite-with-gradient), stochastic rounding keys, metrics,
real-mode conversion and NnxActEinsum (attention's activation matmuls)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax._rules import QuantRule, QWeight
from lowbit_jax.core import init_scale, ops
from lowbit_jax.flax import (NnxActEinsum, QuantHistory, QuantMetric, QuantScale,
                             init_quant_nnx, quantize_nnx, update_histories)

DN = (((1,), (0,)), ((), ()))
QAT = [QuantRule(".*", weight="int4", activation="int8", learn_weight="lsq",
                 learn_activation="pact")]


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(12, 32, rngs=rngs)
    self.down = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


def _data(seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (16, 12)), jax.random.normal(ky, (16, 4))


def _loss(m, x, y):
  return jnp.mean((m(x) - y) ** 2)


def test_quant_scales_are_params_initialised_and_trained():
  x, y = _data()
  qm = quantize_nnx(MLP(nnx.Rngs(0)), QAT)
  with pytest.raises(ValueError, match="init_quant_nnx"):
    qm(x)
  init_quant_nnx(qm, x)
  op = qm.up.dot_general
  assert isinstance(op.weight_scale, QuantScale) and isinstance(op.act_clip, QuantScale)
  np.testing.assert_allclose(op.weight_scale.get_value(),
                             init_scale(qm.up.kernel.get_value(),
                                        lb.QuantSpec("int4", axis=0)), rtol=1e-6)
  np.testing.assert_allclose(op.act_clip.get_value(), jnp.max(jnp.abs(x)), rtol=1e-6)
  assert len(jax.tree.leaves(nnx.state(qm, QuantScale))) == 4
  grads = nnx.grad(_loss)(qm, x, y)
  for leaf in jax.tree.leaves(nnx.state(grads, QuantScale)):
    assert float(jnp.abs(leaf).sum()) > 0
  opt = nnx.Optimizer(qm, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt, x, y):
    loss, g = nnx.value_and_grad(_loss)(m, x, y)
    opt.update(m, g)
    return loss

  losses = [float(step(qm, opt, x, y)) for _ in range(8)]
  assert losses[-1] < 0.8 * losses[0], losses


def test_grad_rule_changes_backward_only_and_matches_core_ops():
  x, _ = _data()
  lin = nnx.Linear(12, 8, use_bias=False, rngs=nnx.Rngs(1))
  w = lin.kernel.get_value()
  base = dict(weight="fp8_e4m3", activation="fp8_e4m3")
  m0 = quantize_nnx(lin, [QuantRule(".*", **base)])
  m1 = quantize_nnx(lin, [QuantRule(".*", **base, grad="fp4_e2m1")])
  ct = jax.random.normal(jax.random.key(3), (16, 8)) * 3

  def vjp(m):
    out, pull = jax.vjp(lambda x: m(x), x)
    def loss(m):
      return jnp.sum(m(x) * ct)
    return out, pull(ct)[0], nnx.grad(loss)(m)["kernel"].get_value()

  y0, gx0, gw0 = vjp(m0)
  y1, gx1, gw1 = vjp(m1)
  np.testing.assert_array_equal(y0, y1)
  assert not np.allclose(gx0, gx1) and not np.allclose(gw0, gw1)
  ref = lambda x, w: ops.dot_general(x, w, DN, lhs_spec="fp8_e4m3",  # noqa: E731
                                     rhs_spec="fp8_e4m3", grad_spec="fp4_e2m1")
  _, pull = jax.vjp(ref, x, w)
  gxr, gwr = pull(ct)
  np.testing.assert_allclose(gx1, gxr, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gw1, gwr, rtol=1e-6, atol=1e-6)


def test_delayed_histories_update_through_the_gradient():
  x, _ = _data()
  rules = [QuantRule(".*", weight="fp8_e4m3", activation="fp8_e4m3",
                     grad="fp8_e5m2", scaling="delayed", amax_history_len=3)]
  m = quantize_nnx(nnx.Linear(12, 8, use_bias=False, rngs=nnx.Rngs(2)), rules)
  op = m.dot_general
  assert all(isinstance(getattr(op, n), QuantHistory)
             for n in ("act_history", "weight_history", "grad_history"))
  ct = jax.random.normal(jax.random.key(4), (16, 8))

  def loss(m):
    return jnp.sum(m(x) * ct)

  diff = nnx.DiffState(0, nnx.Any(nnx.Param, QuantHistory))
  grads = nnx.grad(loss, argnums=diff)(m)
  rest = update_histories(m, grads)
  assert not jax.tree.leaves(nnx.state(rest, QuantHistory))
  w = m.kernel.get_value()
  np.testing.assert_allclose(op.act_history.get_value(), [jnp.max(jnp.abs(x)), 0, 0])
  np.testing.assert_allclose(op.weight_history.get_value(), [jnp.max(jnp.abs(w)), 0, 0])
  np.testing.assert_allclose(op.grad_history.get_value(), [jnp.max(jnp.abs(ct)), 0, 0])


def test_layers_stacked_by_nnx_vmap_get_a_history_and_metric_per_layer():
  # nnx.scan over layers built by nnx.vmap: delayed scaling and metrics=True
  # failed inside the scan (one history for the whole stack); stochastic
  # rounding would share one unsplit stream, and is refused with the way out.
  class Blk(nnx.Module):
    def __init__(self, rngs):
      self.d = nnx.Linear(16, 16, use_bias=False, rngs=rngs)

    def __call__(self, h):
      return jnp.tanh(self.d(h)) + h

  class Scanned(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(r):
        return Blk(r)
      self.layers = make(rngs)

    def __call__(self, h):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def f(blk, h):
        return blk(h)
      return f(self.layers, h)

  x = jax.random.normal(jax.random.key(0), (4, 16))
  rules = [QuantRule(".*", weight="fp8_e4m3", activation="fp8_e4m3",
                     scaling="delayed", amax_history_len=2)]
  m = quantize_nnx(Scanned(nnx.Rngs(0)), rules, metrics=True)
  op = m.layers.d.dot_general
  assert op.weight_history.get_value().shape == (3, 2)
  diff = nnx.DiffState(0, nnx.Any(nnx.Param, QuantHistory))
  update_histories(m, nnx.grad(lambda mm: jnp.sum(mm(x)), argnums=diff)(m))
  w = m.layers.d.kernel.get_value()
  np.testing.assert_allclose(op.weight_history.get_value()[:, 0],
                             jnp.max(jnp.abs(w), axis=(1, 2)), rtol=1e-6)
  assert op.weight_clipped.get_value().shape == (3,)
  with pytest.raises(ValueError, match="stochastic rounding on layers stacked"):
    quantize_nnx(Scanned(nnx.Rngs(0)), [QuantRule(".*", weight=lb.QuantSpec(
        "int4", rounding="stochastic"))], rngs=nnx.Rngs(quant=0))


def test_stochastic_rounding_keys_from_rngs_and_error_without():
  x, _ = _data()
  rules = [QuantRule(".*", weight="int8", grad=lb.QuantSpec("int4",
                                                           rounding="stochastic"))]
  lin = nnx.Linear(12, 8, use_bias=False, rngs=nnx.Rngs(3))

  def grad_w(m):
    return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)["kernel"].get_value()

  with pytest.raises(ValueError, match="PRNG key"):
    grad_w(quantize_nnx(lin, rules))
  m = quantize_nnx(lin, rules, rngs=nnx.Rngs(quant=0))
  g1, g2 = grad_w(m), grad_w(m)  # the stream advances: new noise each call
  assert not np.allclose(g1, g2)
  g_again = grad_w(quantize_nnx(lin, rules, rngs=jax.random.key(0)))
  np.testing.assert_array_equal(g_again, g1)


def test_real_conversion_after_qat_and_metrics():
  x, y = _data(1)
  qm = quantize_nnx(MLP(nnx.Rngs(4)), QAT, metrics=True)
  init_quant_nnx(qm, x)
  opt = nnx.Optimizer(qm, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    opt.update(m, nnx.grad(_loss)(m, x, y))

  for _ in range(3):
    step(qm, opt)
  clip = 0.4 * jnp.max(jnp.abs(x))
  qm.up.dot_general.act_clip.set_value(clip)
  fake = qm(x)
  metric = qm.up.dot_general.act_clipped
  assert isinstance(metric, QuantMetric)
  np.testing.assert_allclose(metric.get_value(), jnp.mean(jnp.abs(x) > clip))
  learned = qm.up.dot_general.weight_scale.get_value()
  real = quantize_nnx(qm, QAT, mode="real")
  k = real.up.kernel.get_value()
  assert isinstance(k, QWeight) and k.transposed
  np.testing.assert_array_equal(k.scale, learned.T)
  assert not hasattr(real.up.dot_general, "weight_scale")
  np.testing.assert_allclose(real(x), fake, rtol=1e-5, atol=1e-5)


class NnxAttn(nnx.Module):
  def __init__(self):
    self.qk = NnxActEinsum("bqd,bkd->bqk")

  def __call__(self, q, k):
    return self.qk(q, k)


def test_nnx_act_einsum_is_reached_only_by_act_matmul_rules():
  kq, kk = jax.random.split(jax.random.key(9))
  qa, ka = jax.random.normal(kq, (2, 5, 8)), jax.random.normal(kk, (2, 6, 8))
  fp = NnxAttn()(qa, ka)
  np.testing.assert_array_equal(fp, jnp.einsum("bqd,bkd->bqk", qa, ka))
  config = lb.QuantConfig([QuantRule(".*", weight="int4", activation="int4")])
  np.testing.assert_array_equal(quantize_nnx(NnxAttn(), config)(qa, ka), fp)
  assert config.unused_rules()
  rule = QuantRule(".*qk", activation="int4", grad="fp8_e5m2", ops=("act_matmul",))
  config = lb.QuantConfig([rule])
  qm = quantize_nnx(NnxAttn(), config)
  assert list(config.sites) == ["qk"]
  spec = lb.QuantSpec("int4")
  ct = jnp.ones((2, 5, 6)) * 0.37
  ref = lambda a, b: ops.einsum("bqd,bkd->bqk", a, b, lhs_spec=spec,  # noqa: E731
                                rhs_spec=spec, grad_spec="fp8_e5m2")
  out, pull = jax.vjp(lambda a, b: qm(a, b), qa, ka)
  _, rpull = jax.vjp(ref, qa, ka)
  want = jnp.einsum("bqd,bkd->bqk", lb.fake_quant(qa, spec.replace(axis=2)),
                    lb.fake_quant(ka, spec.replace(axis=2)))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(out - fp))) > 1e-3  # it did quantize
  for a, b in zip(pull(ct), rpull(ct)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Back to float when the rules no longer match it.
  np.testing.assert_array_equal(quantize_nnx(qm, [QuantRule("qk")])(qa, ka), fp)


def test_nnx_act_einsum_learns_activation_scales():
  kq, kk = jax.random.split(jax.random.key(3))
  qa, ka = jax.random.normal(kq, (2, 5, 8)), jax.random.normal(kk, (2, 6, 8))
  rule = QuantRule("qk", activation="int4", learn_activation="lsq", ops=("act_matmul",))
  qm = quantize_nnx(NnxAttn(), [rule])
  init_quant_nnx(qm, qa, ka)
  scales = jax.tree.leaves(nnx.state(qm, QuantScale))
  assert len(scales) == 2  # one per operand
  grads = nnx.grad(lambda m: jnp.sum(m(qa, ka) ** 2))(qm)
  g = jax.tree.leaves(nnx.state(grads, QuantScale))
  assert len(g) == 2 and all(float(jnp.abs(v).sum()) > 0 for v in g)
