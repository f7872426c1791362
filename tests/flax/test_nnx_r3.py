"""SpinQuant's R3 on NNX: ``NnxActEinsum(operands_rotated=)`` as Linen's ``ActEinsum``."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.algorithms import r3_rules
from lowbit_jax.core._hadamard import hadamard_transform
from lowbit_jax.flax import ActEinsum, quantize_linen, quantize_nnx
from lowbit_jax.flax._nnx import NnxActEinsum

_D, _HD = 24, 32
_RULES = r3_rules([QuantRule("qk", ops=("act_matmul",),
                             activation=QuantSpec("int4", axis=-1))],
                  qk="qk", cache_key=None)


def _weights():
  ks = jax.random.split(jax.random.key(0), 4)
  wq, wk, wv = (jax.random.normal(k, (_D, _HD)) / _D ** 0.5 for k in ks[:3])
  # Outlier channels in the keys and queries (SpinQuant, Fig. 1), so int4
  # q.k with and without the Hadamard differ clearly.
  wk = wk.at[:, 3].mul(30.0).at[:, 17].mul(20.0)
  wq = wq.at[:, 5].mul(15.0)
  wo = jax.random.normal(ks[3], (_HD, _D)) / _HD ** 0.5
  return {"wq": wq, "wk": wk, "wv": wv, "wo": wo}


def _attend(w, x, qk, pre_rotated: bool):
  q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
  if pre_rotated:   # as a decode step over a cache of rotated keys
    q, k = hadamard_transform(q, -1), hadamard_transform(k, -1)
  scores = qk(q, k) * _HD ** -0.5
  return jax.nn.softmax(scores, axis=-1) @ v @ w["wo"]


class _Linen(nn.Module):
  pre_rotated: bool = False

  @nn.compact
  def __call__(self, x, w):
    qk = ActEinsum("btd,bsd->bts", name="qk",
                   operands_rotated=self.pre_rotated)
    return _attend(w, x, qk, self.pre_rotated)


class _Nnx(nnx.Module):
  def __init__(self, w, operands_rotated=False):
    self.w = nnx.data(w)
    self.qk = NnxActEinsum("btd,bsd->bts", operands_rotated=operands_rotated)

  def __call__(self, x, pre_rotated=False, operands_rotated=None):
    qk = lambda a, b: self.qk(a, b, operands_rotated=operands_rotated)
    return _attend(self.w, x, qk, pre_rotated)


def test_nnx_r3_equals_linen_and_rotates_cached_keys_once():
  w = _weights()
  x = jax.random.normal(jax.random.key(1), (2, 8, _D))
  lin = lambda **kw: jax.jit(quantize_linen(_RULES)(_Linen(**kw).apply))({}, x, w)
  l_rule, l_pre = lin(), lin(pre_rotated=True)
  run = nnx.jit(lambda m, x, **kw: m(x, **kw), static_argnames=(
      "pre_rotated", "operands_rotated"))
  n_rule = run(quantize_nnx(_Nnx(w), _RULES), x)
  # The attribute, and the per-call override of a layer built unrotated.
  n_pre = run(quantize_nnx(_Nnx(w, operands_rotated=True), _RULES), x,
              pre_rotated=True)
  n_call = run(quantize_nnx(_Nnx(w), _RULES), x, pre_rotated=True,
               operands_rotated=True)
  np.testing.assert_allclose(np.asarray(n_rule), np.asarray(l_rule), atol=1e-5)
  np.testing.assert_allclose(np.asarray(n_pre), np.asarray(l_pre), atol=1e-5)
  np.testing.assert_allclose(np.asarray(n_call), np.asarray(l_pre), atol=1e-5)
  # Rotated once either way: by the rule inside the op, or by the caller.
  np.testing.assert_allclose(np.asarray(n_pre), np.asarray(n_rule), atol=1e-5)
  # Without the flag the rule rotates the rotated operands back (H @ H = I):
  # that is int4 q.k on the outlier channels, clearly further from float.
  ref = _Nnx(w)(x)
  twice = run(quantize_nnx(_Nnx(w), _RULES), x, pre_rotated=True)
  err_once = float(jnp.linalg.norm(n_pre - ref))
  err_twice = float(jnp.linalg.norm(twice - ref))
  assert err_once < 0.7 * err_twice, (err_once, err_twice)
