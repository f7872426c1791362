"""A Llama-style decoder-only language model in Flax Linen.

The architecture follows Touvron et al., 2023, "LLaMA: Open and Efficient
Foundation Language Models": pre-norm RMSNorm (Zhang & Sennrich, 2019), rotary
position embeddings (Su et al., 2021, "RoFormer"), SwiGLU feed-forward layers
(Shazeer, 2020, "GLU Variants Improve Transformer"), grouped-query attention
(Ainslie et al., 2023, "GQA") and, optionally, a top-k routed mixture-of-experts
feed-forward layer (Shazeer et al., 2017; load-balancing loss of Fedus et al.,
2021, "Switch Transformers"; top-k renormalised routing as in Jiang et al., 2024,
"Mixtral of Experts").

Every weight matmul goes through ``flax.linen.Dense`` (attention and dense FFN
projections, router, untied output head) or, for the expert weights (with a
leading expert axis), ``lowbit_jax.flax.RaggedDense`` (a grouped matmul,
``jax.lax.ragged_dot``, over the tokens routed to each expert; default) or
``flax.linen.Einsum`` (``moe_impl="dense"``), so a quantization interceptor on
those classes reaches all of them: ``quantize_linen`` quantizes expert
weights per expert (scales per expert and output channel, or groups along K),
in fake and real mode, and ``apply_ptq`` runs RTN/GPTQ per expert with a
Hessian built from only the tokens routed to it (AWQ/SmoothQuant scalings and
QuaRot's rotation fold into the experts too). The one exception is the *tied*
output head (``tie_embeddings=True``), which reuses the embedding table through
``nn.Embed.attend``. Parameter paths read as ``layers_0/attn/q_proj/kernel``,
``layers_0/mlp/gate_proj/kernel``, ``layers_0/mlp/router/kernel``,
``lm_head/kernel``.

Attention's own matmuls (q.k and p.v) run through ``lowbit_jax.flax.ActEinsum``
(plain ``jnp.einsum``, no parameters) at ``layers_0/attn/qk`` and
``layers_0/attn/pv``, where a rule listing ``"act_matmul"`` in its ``ops``
quantizes them, e.g. ``QuantRule(".*/attn/(qk|pv)", activation="fp8_e4m3",
grad="fp8_e5m2", ops=("act_matmul",))``.

Decoding: ``model.apply(variables, tokens, cache=cache)`` with a
``lowbit_jax.models.kv_cache.KVCache`` runs ``tokens`` as the next positions
after what the cache holds and returns ``(logits, new_cache)``; the cache may
be stored quantized by rules (see ``kv_cache``), and
``lowbit_jax.models.decode`` has the jitted prefill/generate loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowbit_jax.core._hadamard import hadamard_transform
from lowbit_jax.flax._linen import ActEinsum, RaggedDense
from lowbit_jax.models import kv_cache as kv_lib

MOE_IMPLS = ("ragged", "dense")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a ``Llama`` model (frozen, hashable).

  Attributes:
    vocab: vocabulary size.
    d_model: residual stream width.
    n_layers: number of decoder blocks.
    n_heads: number of query heads; ``d_model`` must be a multiple.
    n_kv_heads: number of key/value heads (grouped-query attention);
      ``n_heads`` must be a multiple. ``n_kv_heads == n_heads`` is multi-head
      attention, ``1`` is multi-query attention.
    d_ff: hidden width of the SwiGLU feed-forward layer (of each expert).
    max_len: longest sequence the model accepts.
    rope_theta: base of the rotary frequencies.
    norm_eps: RMSNorm epsilon.
    n_experts: experts per MoE feed-forward layer; 0 means a dense FFN.
    top_k: experts each token is routed to (MoE only).
    moe_impl: how the experts run (MoE only): ``"ragged"`` (tokens sorted by
      expert, one grouped matmul per projection, ``jax.lax.ragged_dot``) or
      ``"dense"`` (every expert on every token, masked combine; for checking).
      Both have the same parameters and equal outputs up to float rounding.
    tie_embeddings: reuse the embedding table as the output head.
    dtype: compute dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``);
      parameters are always float32, logits are returned in float32.
  """
  vocab: int = 8192
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 8
  n_kv_heads: int = 4
  d_ff: int = 704
  max_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  n_experts: int = 0
  top_k: int = 2
  moe_impl: str = "ragged"
  tie_embeddings: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                 "max_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got "
                         f"{value!r}.")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads="
                       f"{self.n_heads}.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads="
                       f"{self.n_kv_heads} (grouped-query attention).")
    if self.head_dim % 2:
      raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be "
                       "even for rotary embeddings.")
    for name in ("n_experts", "top_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"LlamaConfig.{name} must be an int, got {value!r}.")
    for name in ("rope_theta", "norm_eps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"LlamaConfig.{name} must be a number, got {value!r}.")
    if self.n_experts < 0:
      raise ValueError(f"n_experts must be >= 0 (0 = dense), got {self.n_experts}.")
    if self.n_experts and not 1 <= self.top_k <= self.n_experts:
      raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got "
                       f"{self.top_k}.")
    if self.moe_impl not in MOE_IMPLS:
      raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got "
                       f"{self.moe_impl!r}.")
    if self.rope_theta <= 0 or self.norm_eps <= 0:
      raise ValueError("rope_theta and norm_eps must be > 0, got "
                       f"{self.rope_theta}, {self.norm_eps}.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got "
                       f"{self.dtype!r}.")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self) -> Any:
    """The compute dtype as a jnp dtype."""
    return _DTYPES[self.dtype]

  def replace(self, **changes: Any) -> "LlamaConfig":
    """Returns a copy with ``changes`` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def smoke(cls, **changes: Any) -> "LlamaConfig":
    """A tiny model that trains in seconds on CPU (tests, smoke runs)."""
    return cls(**{**dict(vocab=512, d_model=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, d_ff=176, max_len=64), **changes})

  @classmethod
  def small(cls, **changes: Any) -> "LlamaConfig":
    """A real model of a few M parameters, trainable in ~10 min on 2 CPU cores."""
    return cls(**{**dict(vocab=8192, d_model=256, n_layers=4, n_heads=8,
                         n_kv_heads=4, d_ff=704, max_len=256), **changes})

  @classmethod
  def base(cls, **changes: Any) -> "LlamaConfig":
    """A ~60M-parameter model for one GPU."""
    return cls(**{**dict(vocab=8192, d_model=640, n_layers=10, n_heads=10,
                         n_kv_heads=5, d_ff=1728, max_len=1024,
                         dtype="bfloat16"), **changes})


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Returns rotary inverse frequencies ``theta ** (-2i / head_dim)``, 2i < head_dim."""
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates feature pairs ``(x[i], x[i + D/2])`` by ``position * freq_i``.

  Rotary position embedding (Su et al., 2021, "RoFormer"), "rotate half"
  layout. The dot product of a rotated query at position m and a rotated key
  at position n depends on positions only through ``m - n``.

  Args:
    x: ``[..., T, H, D]`` with ``D`` even.
    positions: ``[T]`` or ``[..., T]`` integer positions, broadcastable
      against ``x`` without its last two axes.
    theta: rotary base.

  Returns:
    The rotated array, same shape and dtype as ``x`` (computed in float32).
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"the last axis of x must be even for rotary embeddings, "
                     f"got {d}.")
  freqs = rope_frequencies(d, theta)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [..., T, D/2]
  cos = jnp.cos(angles)[..., None, :]  # [..., T, 1, D/2]
  sin = jnp.sin(angles)[..., None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  name=name)


def _hadamard(x: jax.Array) -> jax.Array:
  """``x @ H`` over the last axis (normalized Hadamard; Walsh-Hadamard for a
  power of two, where ``H @ H = I``)."""
  return hadamard_transform(x, -1)


class Attention(nn.Module):
  """Causal grouped-query self-attention with rotary positions."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: Optional[kv_lib.KVCache] = None,
               layer_cache: Optional[kv_lib.LayerCache] = None):
    """Attends causally over ``x [B, T, d_model]`` at ``positions``.

    Args:
      x: the normalised residual stream.
      positions: ``[T]`` or ``[B, T]`` rotary positions.
      cache: with ``layer_cache``, decode: ``x`` holds the tokens of slots
        ``cache.index ...``, which attend to the cached tokens and causally
        to each other (padding slots masked, see ``kv_cache``).
      layer_cache: this layer's keys and values.

    Returns:
      ``[B, T, d_model]``, or with a cache ``(that, updated layer_cache)``.
    """
    cfg = self.config
    b, t, _ = x.shape
    hd, h, kvh = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    dt = cfg.compute_dtype
    q = _dense(h * hd, "q_proj", dt)(x).reshape(b, t, h, hd)
    k = _dense(kvh * hd, "k_proj", dt)(x).reshape(b, t, kvh, hd)
    v = _dense(kvh * hd, "v_proj", dt)(x).reshape(b, t, kvh, hd)
    q = apply_rope(q, positions, cfg.rope_theta)
    k = apply_rope(k, positions, cfg.rope_theta)
    groups = h // kvh
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if cache is None:
      keys, values, mask = k, v, causal[None]
    else:
      if layer_cache.rotate_key:    # SpinQuant's R3: q.k unchanged
        q, k = _hadamard(q), _hadamard(k)
      if layer_cache.rotate_value:
        v = _hadamard(v)
      slots = cache.index + jnp.arange(t, dtype=jnp.int32)
      new_valid = slots[None] >= cache.pad[:, None]  # [B, T]: not padding
      k = jnp.where(new_valid[:, :, None, None], k, jnp.zeros_like(k))
      v = jnp.where(new_valid[:, :, None, None], v, jnp.zeros_like(v))
      # The new tokens are written into the cache first and attention reads
      # all slots (no concatenation of the cache and the new tokens): query i
      # (slot index + i) sees the slots up to its own that are not padding.
      keys, new_key = kv_lib.update(layer_cache.key, cache, k, dt)
      values, new_value = kv_lib.update(layer_cache.value, cache, v, dt)
      all_slots = jnp.arange(cache.slots, dtype=jnp.int32)[None, None]
      mask = ((all_slots <= slots[None, :, None])
              & (all_slots >= cache.pad[:, None, None]))
    q = q.reshape(b, t, kvh, groups, hd)
    scores = ActEinsum("bqkgd,bskd->bkgqs", preferred_element_type=jnp.float32,
                       operands_rotated=cache is not None and layer_cache.rotate_key,
                       name="qk")(q, keys)
    scores = scores * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = ActEinsum("bkgqs,bskd->bqkgd", name="pv")(probs, values)
    if cache is not None and layer_cache.rotate_value:
      out = _hadamard(out)
    out = out.reshape(b, t, h * hd)
    out = _dense(cfg.d_model, "o_proj", dt)(out)
    if cache is None:
      return out
    new_layer = dataclasses.replace(layer_cache, key=new_key, value=new_value)
    return out, new_layer


class MLP(nn.Module):
  """SwiGLU feed-forward layer: ``down(silu(gate(x)) * up(x))``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the feed-forward layer to ``x [..., d_model]``."""
    cfg = self.config
    dt = cfg.compute_dtype
    gate = _dense(cfg.d_ff, "gate_proj", dt)(x)
    up = _dense(cfg.d_ff, "up_proj", dt)(x)
    return _dense(cfg.d_model, "down_proj", dt)(nn.silu(gate) * up)


class MoEMLP(nn.Module):
  """Top-k routed mixture of SwiGLU experts.

  Each token's router probabilities (softmax over experts) are restricted to
  its top-k experts and renormalised. With ``moe_impl="ragged"`` (default)
  the ``B*T*top_k`` (token, expert) pairs are sorted by expert, each
  projection is one grouped matmul (``RaggedDense``, ``jax.lax.ragged_dot``,
  group sizes = tokens routed to each expert) and the outputs are scattered
  back to their tokens weighted by the routing probabilities: each expert
  runs only on its tokens. ``moe_impl="dense"`` runs every expert on every
  token (``nn.Einsum``) and combines with a mask: the same parameters and
  outputs (up to float summation order), ``n_experts / top_k`` times the
  FFN work. Expert kernels are ``[E, d_model, d_ff]`` (gate, up) and
  ``[E, d_ff, d_model]`` (down) either way.

  The Switch-Transformer load-balancing loss
  ``n_experts * sum_e fraction_e * mean_prob_e`` is sown into the ``"losses"``
  collection as ``moe_aux_loss`` (collected when that collection is mutable).
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the MoE layer to ``x [B, T, d_model]``."""
    cfg = self.config
    e = cfg.n_experts
    logits = nn.Dense(e, use_bias=False, dtype=jnp.float32,
                      param_dtype=jnp.float32, name="router")(x)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, E]
    top_p, top_i = jax.lax.top_k(probs, cfg.top_k)  # [B, T, K]
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    assign = jax.nn.one_hot(top_i, e, dtype=jnp.float32)  # [B, T, K, E]
    fraction = jnp.mean(jnp.sum(assign, axis=-2), axis=(0, 1)) / cfg.top_k
    aux = e * jnp.sum(fraction * jnp.mean(probs, axis=(0, 1)))
    self.sow("losses", "moe_aux_loss", aux)
    if cfg.moe_impl == "dense":
      return self._dense(x, top_p, assign)
    return self._ragged(x, top_p, top_i)

  def _ragged(self, x, top_p, top_i):
    cfg = self.config
    dt = cfg.compute_dtype
    e, d, f, k = cfg.n_experts, cfg.d_model, cfg.d_ff, cfg.top_k
    b, t, _ = x.shape
    flat = top_i.reshape(-1)                      # [B*T*K] expert of each pair
    order = jnp.argsort(flat, stable=True)        # pairs sorted by expert
    token = order // k                            # the token of each sorted pair
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = x.reshape(b * t, d)[token]               # [B*T*K, d]
    gate = RaggedDense(e, f, dtype=dt, name="gate_proj")(xs, group_sizes)
    up = RaggedDense(e, f, dtype=dt, name="up_proj")(xs, group_sizes)
    out = RaggedDense(e, d, dtype=dt, name="down_proj")(nn.silu(gate) * up,
                                                        group_sizes)
    weight = top_p.reshape(-1)[order].astype(out.dtype)
    y = jnp.zeros((b * t, d), out.dtype).at[token].add(out * weight[:, None])
    return y.reshape(b, t, d)

  def _dense(self, x, top_p, assign):
    cfg = self.config
    dt = cfg.compute_dtype
    e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
    combine = jnp.einsum("btk,btke->bte", top_p, assign)
    init = RaggedDense.kernel_init

    def einsum(shape, name):
      return nn.Einsum(shape, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                       kernel_init=init, name=name)

    gate = einsum((e, d, f), "gate_proj")(x, "btd,edf->btef")
    up = einsum((e, d, f), "up_proj")(x, "btd,edf->btef")
    hidden = nn.silu(gate) * up
    out = einsum((e, f, d), "down_proj")(hidden, "btef,efd->bted")
    return jnp.einsum("bted,bte->btd", out, combine.astype(out.dtype))


class Block(nn.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: Optional[kv_lib.KVCache] = None,
               layer_cache: Optional[kv_lib.LayerCache] = None):
    """Applies the block to the residual stream ``x [B, T, d_model]``.

    With ``cache`` and ``layer_cache`` (see ``Attention``), returns
    ``(x, updated layer_cache)``.
    """
    cfg = self.config
    dt = cfg.compute_dtype
    h = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=dt, name="attn_norm")(x)
    new_layer = None
    if cache is None:
      x = x + Attention(cfg, name="attn")(h, positions)
    else:
      a, new_layer = Attention(cfg, name="attn")(h, positions, cache, layer_cache)
      x = x + a
    h = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=dt, name="mlp_norm")(x)
    mlp = MoEMLP(cfg, name="mlp") if cfg.n_experts else MLP(cfg, name="mlp")
    x = x + mlp(h)
    return x if cache is None else (x, new_layer)


class Llama(nn.Module):
  """Llama-style decoder LM: ``__call__(tokens [B, T] int32) -> logits [B, T, V]``.

  Attributes:
    config: the model's ``LlamaConfig``.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *,
               cache: Optional[kv_lib.KVCache] = None):
    """Returns float32 next-token logits ``[B, T, vocab]`` for ``tokens [B, T]``.

    Args:
      tokens: token ids.
      cache: decode with a ``KVCache``: ``tokens`` fill slots ``cache.index``
        to ``cache.index + T - 1``, row ``b`` at rotary positions ``slot -
        pad[b]``. Slots must fit in ``cache.max_len``; a call past the end
        (which jit cannot reject) returns NaN logits.

    Returns:
      The logits, or with a cache ``(logits, cache with the tokens appended)``.

    Raises:
      ValueError: if ``tokens`` is not 2-D integer, longer than ``max_len``
        (or than the cache), or the cache was built for another model.
    """
    cfg = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be a [batch, time] integer array, got "
                       f"{tokens.dtype}{list(tokens.shape)}.")
    if tokens.shape[1] > cfg.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len="
                       f"{cfg.max_len}; raise LlamaConfig.max_len.")
    dt = cfg.compute_dtype
    # Unit-variance rows feed the residual stream; a tied table is scaled so
    # that it also gives unit-variance logits from the normalised output.
    std = cfg.d_model ** -0.5 if cfg.tie_embeddings else 1.0
    embed = nn.Embed(cfg.vocab, cfg.d_model, dtype=dt, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(std), name="embed")
    x = embed(tokens)
    t = tokens.shape[1]
    if cache is None:
      positions = jnp.arange(t, dtype=jnp.int32)
      for i in range(cfg.n_layers):
        x = Block(cfg, name=f"layers_{i}")(x, positions)
    else:
      _check_cache(cfg, cache, tokens)
      positions = (cache.index + jnp.arange(t, dtype=jnp.int32))[None] \
          - cache.pad[:, None]
      layers = []
      for i in range(cfg.n_layers):
        x, lc = Block(cfg, name=f"layers_{i}")(x, positions, cache, cache.layers[i])
        layers.append(lc)
      cache = cache.replace(layers=tuple(layers), index=cache.index + t)
    x = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=dt, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(cfg.vocab, "lm_head", dt)(x)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    # Writing past the last slot would clamp (dynamic_update_slice): make it
    # visible instead of silently wrong.
    logits = jnp.where(cache.index <= cache.max_len, logits, jnp.nan)
    return logits, cache


def _check_cache(cfg: LlamaConfig, cache: kv_lib.KVCache, tokens: jax.Array) -> None:
  if not isinstance(cache, kv_lib.KVCache):
    raise TypeError(f"cache must be a KVCache (lowbit_jax.models.kv_cache."
                    f"init_cache), got {type(cache).__name__}")
  lc = cache.layers[0].key if cache.layers else None
  shape = (lc.store.shape if lc is not None else None)
  want = (cache.batch, cfg.n_kv_heads, cfg.head_dim)
  if (len(cache.layers) != cfg.n_layers or shape is None
      or (shape[0], shape[2], shape[3]) != want):
    raise ValueError(f"the cache does not fit this model: it has "
                     f"{len(cache.layers)} layers of shape {shape}, the model "
                     f"{cfg.n_layers} layers of [batch={cache.batch}, slot, "
                     f"{cfg.n_kv_heads}, {cfg.head_dim}]; build it with "
                     "init_cache(model.config, batch)")
  if tokens.shape[0] != cache.batch:
    raise ValueError(f"tokens have batch {tokens.shape[0]}, the cache "
                     f"{cache.batch}")
  if tokens.shape[1] > cache.max_len:
    raise ValueError(f"{tokens.shape[1]} tokens do not fit a cache of max_len="
                     f"{cache.max_len}")


def num_params(params: Any) -> int:
  """Returns the number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))
