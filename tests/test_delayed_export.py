"""Delayed scaling: real mode stores each weight with its amax history's range.

Fake mode quantizes a delayed-scaling weight with the range its history gives
(not its current amax), so an exported (real-mode) model must too, or it is
not the model that was trained and evaluated. Each front end reads the
``weight_history`` beside the weight (Linen: ``"quant_state"``; functions:
``quantize_params(..., quant_state=)``; NNX: the layer's ``QuantHistory``).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax import QuantRule
from lowbit_jax.flax import QuantHistory, quantize_linen, quantize_nnx, update_histories

RULES = [QuantRule(".*", weight="fp8_e4m3", activation="fp8_e4m3", scaling="delayed",
                   amax_history_len=4)]
X = jax.random.normal(jax.random.key(0), (24, 16))


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="fc2")(nn.relu(nn.Dense(32, name="fc1")(x)))


def _same_model(a, b):
  # The same products summed by a dot whose weight layout differs (real mode
  # stores it K-major): equal up to float32 summation order, which XLA's CPU
  # dot makes layout-dependent on some hosts (a few ulp on an AMD EPYC).
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))


def _shrink(params):
  # A training step moves the weights after their history was recorded.
  return jax.tree.map(lambda a: a * 0.9, params)


def _linen_step(model, rules, x):
  """``(fake quantizer, variables)`` after one history update and a weight step."""
  params = model.init(jax.random.key(2), x)["params"]
  qf = quantize_linen(rules, mode="fake")
  st = qf.init_quant_vars(model, {"params": params}, x)["quant_state"]
  st = jax.grad(lambda s: jnp.sum(qf(model.apply)({"params": params, "quant_state": s},
                                                  x)))(st)
  return qf, {"params": _shrink(params), "quant_state": st}


def test_linen_export_equals_fake_after_a_step():
  model = _MLP()
  qf, v = _linen_step(model, RULES, X)
  qr = quantize_linen(RULES, mode="real")
  y_real = qr(model.apply)(qr.quantize_params(model, v, X), X)
  _same_model(y_real, qf(model.apply)(v, X))


def test_function_export_equals_fake_after_a_step():
  def fn(p, x):
    return jax.nn.relu(x @ p["a"]["w"]) @ p["b"]["w"]
  params = {"a": {"w": jax.random.normal(jax.random.key(1), (16, 32))},
            "b": {"w": jax.random.normal(jax.random.key(2), (32, 8))}}
  qf = lb.quantize_function(fn, RULES)
  st = qf.init_quant_vars(params, X)["quant_state"]
  st = jax.grad(lambda s: jnp.sum(qf(params, X, quant_state=s)))(st)
  p2 = _shrink(params)
  qr = lb.quantize_function(fn, RULES, mode="real")
  rp = qr.quantize_params(p2, X, quant_state=st)
  _same_model(qr(rp, X, quant_state=st), qf(p2, X, quant_state=st))
  # Without the histories the weights take their own amax: another model.
  rp_own = qr.quantize_params(p2, X)
  with pytest.raises(AssertionError):
    _same_model(qr(rp_own, X, quant_state=st), qf(p2, X, quant_state=st))


def test_nnx_export_equals_fake_after_a_step():
  m = quantize_nnx(nnx.Linear(16, 8, use_bias=False, rngs=nnx.Rngs(2)), RULES)
  diff = nnx.DiffState(0, nnx.Any(nnx.Param, QuantHistory))
  grads = nnx.grad(lambda m: jnp.sum(m(X)), argnums=diff)(m)
  update_histories(m, grads)
  m.kernel.set_value(m.kernel.get_value() * 0.9)
  y_fake = m(X)
  qm = quantize_nnx(m, RULES, mode="real")
  _same_model(qm(X), y_fake)


def test_a_shared_delayed_layer_warns_that_its_histories_sum():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(16, name="shared")
      return d(jax.nn.relu(d(x)))
  model = Twice()
  params = model.init(jax.random.key(1), X)["params"]
  qf = quantize_linen(RULES, mode="fake")
  with pytest.warns(UserWarning, match=r"\['shared/kernel'\].*sum"):
    st = qf.init_quant_vars(model, {"params": params}, X)["quant_state"]
  with pytest.warns(UserWarning, match=r"\['shared/kernel'\].*sum"):
    qf(model.apply)({"params": params, "quant_state": st}, X)
  # Differentiated, the very case the warning is about (the calls' inputs
  # then live in different traces).
  with pytest.warns(UserWarning, match=r"\['shared/kernel'\].*sum"):
    jax.grad(lambda p: qf(model.apply)({"params": p, "quant_state": st}, X).sum())(
        params)


class _Tied(nn.Module):
  @nn.compact
  def __call__(self, t):
    e = nn.Embed(32, 16, name="embed")
    return e.attend(nn.Dense(16, name="fc")(e(t)))


@pytest.mark.parametrize("weight", ["fp8_e4m3", lb.QuantSpec("nvfp4", axis=0)])
def test_a_weight_real_mode_keeps_in_float_takes_its_history_range(weight):
  # A tied table (the lookup also reads it) stays float in real mode and is
  # quantized per call: with its history's range, as fake mode was (its
  # current amax gave other codes: a trained tied model exported wrong).
  rules = [QuantRule(".*", weight=weight, activation="fp8_e4m3", scaling="delayed",
                     amax_history_len=4)]
  model = _Tied()
  t = jax.random.randint(jax.random.key(1), (4, 8), 0, 32)
  qf, v = _linen_step(model, rules, t)
  qr = quantize_linen(rules, mode="real")
  stored = qr.quantize_params(model, v, t)
  assert not isinstance(stored["params"]["embed"]["embedding"], lb.QArray)
  _same_model(qr(model.apply)(stored, t), qf(model.apply)(v, t))
