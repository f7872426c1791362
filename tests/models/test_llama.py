"""Tests of the Llama-style decoder LM."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.flax import RaggedDense
from lowbit_jax.models.llama import Llama, LlamaConfig, apply_rope, num_params

_VARIANTS = {
    "gqa": LlamaConfig.smoke(),
    "mqa": LlamaConfig.smoke(n_kv_heads=1),
    "moe": LlamaConfig.smoke(n_experts=4, top_k=2),
    "tied": LlamaConfig.smoke(tie_embeddings=True),
}


def _init(cfg, t=8, seed=0):
  model = Llama(cfg)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, t), jnp.int32)))
  return model, init(jax.random.key(seed))["params"]


def _apply(cfg, params, tokens, **kwargs):
  return jax.jit(lambda p, x: Llama(cfg).apply({"params": p}, x, **kwargs))(
      params, tokens)


@pytest.mark.parametrize("name", sorted(_VARIANTS))
def test_shapes_and_causality(name):
  cfg = _VARIANTS[name]
  model, params = _init(cfg)
  b, t = 2, 12
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab)
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  logits = apply(tokens)
  assert logits.shape == (b, t, cfg.vocab) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  # Changing the token at position p changes no logit before p, and does
  # change the logits at p.
  for p in (0, 5, t - 1):
    changed = tokens.at[:, p].set((tokens[:, p] + 1) % cfg.vocab)
    other = apply(changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :p]),
                                  np.asarray(other[:, :p]))
    assert not np.allclose(np.asarray(logits[:, p]), np.asarray(other[:, p]))


def test_parameter_paths_and_shapes():
  cfg = LlamaConfig.smoke()
  _, params = _init(cfg)
  flat = {"/".join(k.key for k in path): v.shape
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  d, hd = cfg.d_model, cfg.head_dim
  assert flat["embed/embedding"] == (cfg.vocab, d)
  assert flat["layers_0/attn/q_proj/kernel"] == (d, cfg.n_heads * hd)
  assert flat["layers_0/attn/k_proj/kernel"] == (d, cfg.n_kv_heads * hd)
  assert flat["layers_0/attn/v_proj/kernel"] == (d, cfg.n_kv_heads * hd)
  assert flat["layers_0/attn/o_proj/kernel"] == (cfg.n_heads * hd, d)
  assert flat["layers_1/mlp/gate_proj/kernel"] == (d, cfg.d_ff)
  assert flat["layers_1/mlp/up_proj/kernel"] == (d, cfg.d_ff)
  assert flat["layers_1/mlp/down_proj/kernel"] == (cfg.d_ff, d)
  assert flat["layers_0/attn_norm/scale"] == (d,)
  assert flat["final_norm/scale"] == (d,)
  assert flat["lm_head/kernel"] == (d, cfg.vocab)
  assert num_params(params) == sum(int(np.prod(s)) for s in flat.values())

  moe = LlamaConfig.smoke(n_experts=4)
  _, params = _init(moe)
  mlp = params["layers_0"]["mlp"]
  assert mlp["router"]["kernel"].shape == (d, 4)
  assert mlp["gate_proj"]["kernel"].shape == (4, d, moe.d_ff)
  assert mlp["down_proj"]["kernel"].shape == (4, moe.d_ff, d)


@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_every_weight_matmul_goes_through_dense_or_einsum(name):
  """An interceptor on Dense/Einsum/RaggedDense sees every kernel parameter."""
  cfg = _VARIANTS[name]
  model, params = _init(cfg)
  seen = set()

  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, (nn.Dense, nn.DenseGeneral, nn.Einsum,
                                    RaggedDense))
        and context.method_name == "__call__"):
      seen.add("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
  kernels = {"/".join(k.key for k in path[:-1])
             for path, _ in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == "kernel"}
  assert kernels == seen
  assert len(kernels) == cfg.n_layers * (7 + (cfg.n_experts > 0)) + 1


def test_gqa_equals_mha_with_repeated_kv_heads():
  """GQA is MHA whose key/value heads are shared by groups of query heads."""
  gqa = LlamaConfig.smoke()  # 4 heads, 2 kv heads
  mha = gqa.replace(n_kv_heads=4)
  _, p_gqa = _init(gqa)
  hd = gqa.head_dim
  groups = gqa.n_heads // gqa.n_kv_heads
  p_mha = jax.tree.map(lambda x: x, p_gqa)
  for i in range(gqa.n_layers):
    for name in ("k_proj", "v_proj"):
      k = p_gqa[f"layers_{i}"]["attn"][name]["kernel"]
      k = k.reshape(gqa.d_model, gqa.n_kv_heads, 1, hd)
      k = jnp.broadcast_to(k, (gqa.d_model, gqa.n_kv_heads, groups, hd))
      p_mha[f"layers_{i}"]["attn"][name]["kernel"] = k.reshape(gqa.d_model, -1)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, gqa.vocab)
  out_gqa = _apply(gqa, p_gqa, tokens)
  out_mha = _apply(mha, p_mha, tokens)
  np.testing.assert_allclose(out_gqa, out_mha, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  key_q, key_k = jax.random.split(jax.random.key(3))
  q = jax.random.normal(key_q, (1, 1, 16))
  k = jax.random.normal(key_k, (1, 1, 16))

  @jax.jit
  def score(m, n):
    return jnp.sum(apply_rope(q, m, 10000.0) * apply_rope(k, n, 10000.0))

  for m, n, shift in [(3, 1, 7), (0, 0, 100), (10, 25, 1000), (5, 9, 3)]:
    np.testing.assert_allclose(
        score(jnp.array([m]), jnp.array([n])),
        score(jnp.array([m + shift]), jnp.array([n + shift])),
        rtol=1e-4, atol=1e-4)
  # Position 0 is the identity; a rotation preserves norms per pair.
  np.testing.assert_allclose(apply_rope(q, jnp.array([0]), 10000.0), q, atol=1e-7)
  x = jax.random.normal(jax.random.key(4), (2, 6, 3, 8))
  y = apply_rope(x, jnp.arange(6), 500.0)
  pair_norm = lambda a: a[..., :4] ** 2 + a[..., 4:] ** 2
  np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)
  # The first pair turns by exactly `position` radians (frequency 1).
  e = jnp.zeros((1, 1, 8)).at[..., 0].set(1.0)
  r = apply_rope(e, jnp.array([2]), 500.0)
  np.testing.assert_allclose([r[0, 0, 0], r[0, 0, 4]], [np.cos(2.0), np.sin(2.0)],
                             rtol=1e-6)


def test_moe_routes_to_top_k_and_sows_balance_loss():
  cfg = LlamaConfig.smoke(n_experts=4, top_k=1)
  model, params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, cfg.vocab)
  logits, extra = _apply(cfg, params, tokens, mutable=["losses"])
  aux = jax.tree.leaves(extra["losses"])
  assert len(aux) == cfg.n_layers
  # Switch loss: E * sum_e f_e * P_e >= 1 (equality iff perfectly balanced).
  assert all(float(a) >= 1.0 - 1e-5 for a in aux)
  # With one expert there is no routing: the MoE layer equals a dense MLP.
  one = LlamaConfig.smoke(n_experts=1, top_k=1)
  dense = LlamaConfig.smoke()
  _, p_one = _init(one)
  p_dense = jax.tree.map(lambda x: x, p_one)
  for i in range(one.n_layers):
    mlp = p_one[f"layers_{i}"]["mlp"]
    p_dense[f"layers_{i}"]["mlp"] = {
        n: {"kernel": mlp[n]["kernel"][0]}
        for n in ("gate_proj", "up_proj", "down_proj")}
  np.testing.assert_allclose(_apply(one, p_one, tokens),
                             _apply(dense, p_dense, tokens),
                             rtol=1e-5, atol=1e-5)
  assert logits.shape == (2, 16, cfg.vocab)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = LlamaConfig.smoke(dtype="bfloat16")
  model, params = _init(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  out = _apply(cfg, params, tokens)
  ref = _apply(cfg.replace(dtype="float32"), params, tokens)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.25)


def test_presets_sizes():
  def count(cfg):
    shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 4), jnp.int32)))
    return num_params(shapes["params"])
  assert count(LlamaConfig.smoke()) < 500_000
  assert 2_000_000 <= count(LlamaConfig.small()) <= 10_000_000
  assert 50_000_000 <= count(LlamaConfig.base()) <= 100_000_000


@pytest.mark.parametrize("changes, match", [
    (dict(d_model=65), "multiple of n_heads"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(d_model=12, n_heads=4, n_kv_heads=2), "even"),
    (dict(n_experts=2, top_k=3), "top_k"),
    (dict(dtype="int8"), "dtype"),
    (dict(vocab=0), "positive int"),
    (dict(n_experts=2.5), "n_experts must be an int"),
    (dict(n_experts=4, top_k=2.0), "top_k must be an int"),
    (dict(n_experts=True), "n_experts must be an int"),
    (dict(rope_theta="1e4"), "rope_theta must be a number"),
])
def test_config_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    LlamaConfig.smoke(**changes)


def test_bad_tokens_raise():
  model, params = _init(LlamaConfig.smoke(max_len=16))
  with pytest.raises(ValueError, match="max_len"):
    model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.float32))
