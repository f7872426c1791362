"""One tiny decoder transformer written three ways: Linen, NNX and a plain function.

All three share the parameter tree (Linen's ``params`` layout, e.g.
``layers_0/mlp/up/kernel``) and compute the same float numbers, so the three
quantization paths can be compared exactly:

* token embedding, then per block: RMS norm, a causal width-3 convolution
  (``nn.Conv``), attention with ``DenseGeneral`` q/k/v/o projections, RMS norm,
  an MLP of two ``Dense`` layers; a final norm and an ``Einsum`` output head.
* ``toy_apply(params, tokens)`` is the plain-JAX version (``@``, ``jnp.einsum``,
  ``lax.conv_general_dilated``); ``nnx_from_linen`` builds the NNX model holding
  the same values.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

VOCAB, D, HEADS, HEAD_DIM, FF, LAYERS = 32, 32, 2, 16, 64, 2
BATCH, SEQ = 2, 8


def rms_norm(x, scale):
  return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def attention(q, k, v):
  """Causal softmax attention of ``[B, T, H, Dh]`` tensors (no weights)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
  t = q.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  s = jnp.where(mask, s, -1e9)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


# -----------------------------------------------------------------------------
# Linen


class Norm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],)))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = Norm(name="norm1")(x)
    h = nn.Conv(D, kernel_size=(3,), padding="CAUSAL", name="conv")(h)
    q = nn.DenseGeneral((HEADS, HEAD_DIM), name="q")(h)
    k = nn.DenseGeneral((HEADS, HEAD_DIM), name="k")(h)
    v = nn.DenseGeneral((HEADS, HEAD_DIM), name="v")(h)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), name="o")(attention(q, k, v))
    h = Norm(name="norm2")(x)
    h = jax.nn.gelu(nn.Dense(FF, name="up")(h))
    return x + nn.Dense(D, name="down")(h)


class ToyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    for i in range(LAYERS):
      x = Block(name=f"layers_{i}")(x)
    x = Norm(name="final_norm")(x)
    return nn.Einsum((D, VOCAB), "btd,dv->btv", use_bias=False, name="head")(x)


def tokens(seed: int = 1):
  return jax.random.randint(jax.random.key(seed), (BATCH, SEQ), 0, VOCAB)


def init_linen(seed: int = 0):
  """(model, variables) with non-trivial norm scales and biases."""
  model = ToyLM()

  @jax.jit
  def init(key):
    variables = model.init(key, tokens())
    keys = iter(jax.random.split(jax.random.fold_in(key, 100), 200))

    def perturb(path, x):
      if path[-1].key in ("scale", "bias"):
        return x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
      return x
    return {"params": jax.tree_util.tree_map_with_path(perturb, variables["params"])}
  return model, init(jax.random.key(seed))


# -----------------------------------------------------------------------------
# Plain JAX


def toy_apply(params, toks):
  """The same model as a plain function of the Linen parameter tree."""
  x = jnp.take(params["embed"]["embedding"], toks, axis=0)
  for i in range(LAYERS):
    p = params[f"layers_{i}"]
    h = rms_norm(x, p["norm1"]["scale"])
    hp = jnp.pad(h, [(0, 0), (2, 0), (0, 0)])
    h = lax.conv_general_dilated(hp, p["conv"]["kernel"], (1,), "VALID",
                                 lhs_dilation=(1,), rhs_dilation=(1,),
                                 dimension_numbers=("NWC", "WIO", "NWC"))
    h = h + p["conv"]["bias"]
    q, k, v = (jnp.einsum("btd,dhk->bthk", h, p[n]["kernel"]) + p[n]["bias"]
               for n in ("q", "k", "v"))
    a = attention(q, k, v)
    x = x + (jnp.einsum("bthk,hkd->btd", a, p["o"]["kernel"]) + p["o"]["bias"])
    h = rms_norm(x, p["norm2"]["scale"])
    h = jax.nn.gelu(h @ p["up"]["kernel"] + p["up"]["bias"])
    x = x + (h @ p["down"]["kernel"] + p["down"]["bias"])
  x = rms_norm(x, params["final_norm"]["scale"])
  return jnp.einsum("btd,dv->btv", x, params["head"]["kernel"])


# -----------------------------------------------------------------------------
# NNX


class NNXNorm(nnx.Module):
  def __init__(self):
    self.scale = nnx.Param(jnp.ones((D,)))

  def __call__(self, x):
    return rms_norm(x, self.scale[...])


class NNXBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm1 = NNXNorm()
    self.conv = nnx.Conv(D, D, kernel_size=(3,), padding="CAUSAL", rngs=rngs)
    self.q = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
    self.k = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
    self.v = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
    self.o = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), rngs=rngs)
    self.norm2 = NNXNorm()
    self.up = nnx.Linear(D, FF, rngs=rngs)
    self.down = nnx.Linear(FF, D, rngs=rngs)

  def __call__(self, x):
    h = self.conv(self.norm1(x))
    x = x + self.o(attention(self.q(h), self.k(h), self.v(h)))
    h = jax.nn.gelu(self.up(self.norm2(x)))
    return x + self.down(h)


class NNXToyLM(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.layers_0 = NNXBlock(rngs)
    self.layers_1 = NNXBlock(rngs)
    self.final_norm = NNXNorm()
    self.head = nnx.Einsum("btd,dv->btv", (D, VOCAB), rngs=rngs)

  def __call__(self, toks):
    x = self.embed(toks)
    x = self.layers_1(self.layers_0(x))
    return self.head(self.final_norm(x))


def nnx_from_linen(params) -> NNXToyLM:
  """The NNX model holding the Linen parameter values (same paths)."""
  model = NNXToyLM(nnx.Rngs(0))

  def put(node, tree):
    for k, v in tree.items():
      child = getattr(node, k)
      if isinstance(v, dict):
        put(child, v)
      else:
        assert child.get_value().shape == v.shape, (k, child.get_value().shape, v.shape)
        child.set_value(v)
  put(model, params)
  return model
