"""SpinQuant's R3: an online Hadamard on queries and keys (rules, cache, model)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.algorithms import R3_PATHS, r3_rules
from lowbit_jax.flax import ActEinsum, apply_ptq, quantize_linen
from lowbit_jax.models import decode
from lowbit_jax.models import kv_cache as kv
from lowbit_jax.models.llama import Llama, LlamaConfig

_CFG = LlamaConfig.smoke(vocab=96, d_model=64, n_heads=4, n_kv_heads=2, d_ff=64,
                         max_len=32)
_T = 12
_K4 = [QuantRule(r".*/attn/cache/key", ops=("kv_cache",),
                 activation=QuantSpec("int4", axis=-1))]
_QK8 = [QuantRule(r".*/attn/qk", ops=("act_matmul",),
                  activation=QuantSpec("int8", axis=-1))]


@pytest.fixture(scope="module")
def model_vars():
  model = Llama(_CFG)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  toks = jax.random.randint(jax.random.key(1), (2, _T), 0, _CFG.vocab)
  return model, v, toks


def test_r3_rules_rotate_only_what_both_regexes_match():
  rules = r3_rules(_QK8 + _K4 + [QuantRule(".*", weight="int4")])
  qk = next(r for r in rules if r.input_rotation and r.activation is not None
            and "act_matmul" in r.ops)
  assert qk.matches("layers_0/attn/qk") and not qk.matches("layers_0/attn/pv")
  key = next(r for r in rules if r.input_rotation and "kv_cache" in r.ops)
  assert key.matches("layers_1/attn/cache/key")
  assert not key.matches("layers_1/attn/cache/value")
  assert kv.cache_rotations(2, rules) == ((True, False), (True, False))
  assert kv.cache_specs(2, rules)[0][0] == QuantSpec("int4", axis=-1)
  # Rules that are not attention or cache rules come through unchanged, last.
  assert rules[-1] == QuantRule(".*", weight="int4")


def test_float_model_unchanged_by_r3_cache_and_qk(model_vars):
  model, v, toks = model_vars
  full = jax.jit(model.apply)(v, toks)
  rules = r3_rules([])      # rotation only: float cache of rotated keys
  got = decode.make_teacher_forced(model, _T, 2, prompt_len=3, cache_rules=rules)(
      v, toks)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5, rtol=1e-5)
  # A q.k rule whose int8 grid is fine enough to be near-exact: rotating both
  # operands changes only the rounding, not the product.
  fine = [QuantRule(r".*/attn/qk", ops=("act_matmul",),
                    activation=QuantSpec("int8", axis=-1))]
  q = quantize_linen(r3_rules(fine, cache_key=None))
  out = jax.jit(q(model.apply))(v, toks)
  assert float(jnp.max(jnp.abs(out - full))) < 0.05


def test_r3_lowers_qk_quantization_error_with_outlier_channels():
  class QK(nn.Module):
    @nn.compact
    def __call__(self, q, k):
      return ActEinsum("bqd,bkd->bqk", name="qk")(q, k)

  d = 32
  kq, kk = jax.random.split(jax.random.key(3))
  q = jax.random.normal(kq, (2, 16, d))
  k = jax.random.normal(kk, (2, 16, d))
  # Two outlier channels, as keys after RoPE have (SpinQuant, Fig. 1).
  k = k.at[..., 3].mul(30.0).at[..., 17].mul(20.0)
  q = q.at[..., 5].mul(15.0)
  ref = jnp.einsum("bqd,bkd->bqk", q, k)
  rule = [QuantRule(r"qk", ops=("act_matmul",), activation=QuantSpec("int4", axis=-1))]
  m = QK()
  plain = quantize_linen(rule)(m.apply)({}, q, k)
  rot = quantize_linen(r3_rules(rule, qk="qk", cache_key=None))(m.apply)({}, q, k)
  err_plain = float(jnp.linalg.norm(plain - ref))
  err_rot = float(jnp.linalg.norm(rot - ref))
  assert err_rot < 0.6 * err_plain, (err_rot, err_plain)


@pytest.mark.slow
def test_cached_keys_are_not_rotated_twice(model_vars):
  # With the cache rotating keys, the q.k rule's own rotation must not undo
  # it: R3 on both gives what R3 on the cache alone with the plain q.k rule gives.
  model, v, toks = model_vars
  cache_rules = r3_rules(_K4, qk=None)
  plain = decode.make_teacher_forced(model, _T, 2, prompt_len=3,
                                     cache_rules=cache_rules,
                                     apply_fn=quantize_linen(_QK8)(model.apply))(v, toks)
  both = decode.make_teacher_forced(
      model, _T, 2, prompt_len=3, cache_rules=cache_rules,
      apply_fn=quantize_linen(r3_rules(_QK8))(model.apply))(v, toks)
  np.testing.assert_array_equal(np.asarray(both), np.asarray(plain))


def test_r3_value_rotation_needs_power_of_two_head_dim():
  cfg = _CFG.replace(d_model=48, n_heads=4)     # head_dim 12
  rule = [QuantRule(r".*/attn/cache/value", ops=("kv_cache",),
                    input_rotation="hadamard")]
  with pytest.raises(ValueError, match="power of two"):
    kv.init_cache(cfg, 1, rules=rule)
  kv.init_cache(cfg, 1, rules=r3_rules([], qk=None))   # keys: order 12 exists


def test_apply_ptq_r3_is_for_rotations(model_vars):
  model, v, toks = model_vars
  with pytest.raises(ValueError, match="r3= applies to method='quarot'"):
    apply_ptq(model, v["params"], [(toks,)], "rtn", "int4", r3=True)


@pytest.mark.slow
def test_apply_ptq_r3_option(model_vars):
  model, v, toks = model_vars
  _, rep = apply_ptq(model, v["params"], [(toks,)], "quarot", "int4", r3=True)
  assert rep["rotation"].r3 == R3_PATHS
  rules = rep["rotation"].rules(_QK8)
  assert any(r.input_rotation and "act_matmul" in r.ops and r.activation is not None
             for r in rules)
  assert kv.cache_rotations(_CFG.n_layers, rep["rotation"].rules(_K4))[0] == (True,
                                                                              False)
