"""A key/value cache for autoregressive decoding, optionally stored quantized.

The cache of a decoder holds, for every layer, the rotary-embedded keys and
the values of all tokens seen so far, laid out ``[batch, slot, kv_head,
head_dim]`` for a fixed number of slots (``max_len``). One slot index is
shared by the whole batch: prompts are *left*-padded, ``pad[b]`` slots at the
start of row ``b`` are padding (masked out of attention and stored as zeros),
and the token in slot ``s`` of row ``b`` sits at rotary position ``s - pad[b]``.

Quantization is chosen by rules, the same ``QuantRule`` s as everything else:
a rule whose ``ops`` name ``"kv_cache"`` (``CACHE_OP``) and whose regex fully
matches ``layers_{i}/attn/cache/key`` or ``layers_{i}/attn/cache/value``
(``cache_path``) stores that tensor with the rule's ``activation`` spec; a
matched rule without one keeps it in float. Spec axes refer to the
``[batch, slot, kv_head, head_dim]`` layout:

* per token (and head): ``axis=-1`` (the default when the axis is unset), or
  groups along ``head_dim`` with ``group_size``;
* per channel: ``axis=1, group_size=G``, one scale per channel and group of
  ``G`` consecutive tokens;
* per token across heads: ``axis=(2, 3)``.

Quantized tensors follow KIVI (Liu et al., 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache"): the most recent tokens stay in a
float *residual* window of ``residual`` slots; whenever it fills, its
``residual`` tokens are quantized together (so a per-channel group of ``G``
tokens is complete when it is quantized) and written into the quantized store
as real data: a ``QArray`` whose codes are packed (two 4-bit codes a byte) and
whose scales and zero points have one entry per block, so the cache is really
smaller (``KVCache.nbytes``). At every step, tokens in quantized chunks are
read dequantized, the rest (including the current token) in float;
``kivi_rules`` builds the paper's recipe. Nothing branches on the data:
``append`` writes completed chunks with masked updates, and the decode loops
defer flushes (``KVCache.defer_flush``) to ``flush`` calls at a static
cadence, once per window.

Optionally (``rotate=True``) queries, keys and values are multiplied by the
normalized Walsh-Hadamard matrix over ``head_dim`` before they meet the cache
and the attention output by it afterwards, which leaves attention unchanged in
exact arithmetic and spreads outlier channels before quantization (as QuaRot,
Ashkboos et al., 2024, does for the KV cache). Per tensor, a cache rule with
``input_rotation="hadamard"`` does the same for what it matches: on
``.../cache/key`` the keys are stored in the Hadamard domain and the queries
rotated to match (after the rotary embedding), so ``q.k`` is unchanged and
the values are untouched: SpinQuant's R3 (Liu et al., 2024, "SpinQuant",
Sec. 3); on ``.../cache/value`` the values are stored rotated and the
attention output rotated back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax._rules import CACHE_OPS, QuantConfig, QuantRule, as_rules
from lowbit_jax.core._hadamard import hadamard
from lowbit_jax.core._qarray import QArray
from lowbit_jax.core._quantize import dequantize_as, fake_quant, quantize
from lowbit_jax.core._spec import QuantSpec

CACHE_OP = CACHE_OPS[0]
KEY, VALUE = "key", "value"
_TOKEN_AXIS = 1

Tensor = Union[jax.Array, QArray]


def cache_path(layer: int, which: str) -> str:
  """The path cache rules match for one layer's keys or values.

  Args:
    layer: the decoder block index.
    which: ``"key"`` or ``"value"``.

  Returns:
    ``"layers_{layer}/attn/cache/{which}"``.
  """
  if which not in (KEY, VALUE):
    raise ValueError(f"which must be {KEY!r} or {VALUE!r}, got {which!r}")
  return f"layers_{layer}/attn/cache/{which}"


def kivi_rules(bits: int = 4, group_size: int = 32, *,
               layers: str = r"layers_\d+") -> list[QuantRule]:
  """KIVI's cache quantization as rules (Liu et al., 2024, "KIVI").

  Keys are quantized per channel in groups of ``group_size`` consecutive
  tokens, values per token (one range per token and head), both asymmetric
  (``int{bits}`` on an unsigned grid, ``symmetric=False``: a scale and a
  zero point per group). Use with a residual
  window that is a multiple of ``group_size`` (``init_cache`` defaults to
  ``group_size`` itself).

  Args:
    bits: code width, e.g. 4 or 2.
    group_size: tokens per key group.
    layers: regex for the layer part of the path.

  Returns:
    Two rules with ``ops=("kv_cache",)``.
  """
  fmt = f"int{bits}"
  return [QuantRule(f"{layers}/attn/cache/key", ops=(CACHE_OP,),
                    activation=QuantSpec(fmt, axis=_TOKEN_AXIS, group_size=group_size,
                                         symmetric=False)),
          QuantRule(f"{layers}/attn/cache/value", ops=(CACHE_OP,),
                    activation=QuantSpec(fmt, axis=-1, symmetric=False))]


@dataclasses.dataclass(frozen=True)
class CacheTensor:
  """The keys (or values) of one layer.

  Attributes:
    store: ``[B, S, KVH, D]``: float, or a QArray holding the quantized
      chunks (slots below the last multiple of the residual length).
    residual: ``[B, R, KVH, D]`` float window of the newest tokens (slot
      ``s`` at ``s % R``) when ``store`` is quantized, else None.
  """
  store: Tensor
  residual: Optional[jax.Array]

  @property
  def quantized(self) -> bool:
    """Whether the store holds quantized data."""
    return isinstance(self.store, QArray)


@dataclasses.dataclass(frozen=True)
class LayerCache:
  """Keys and values of one decoder layer.

  Attributes:
    key: the cached keys.
    value: the cached values.
    rotate_key: keys are stored Hadamard-rotated over ``head_dim`` and the
      queries are rotated to match (static; SpinQuant's R3).
    rotate_value: values are stored Hadamard-rotated and the attention output
      rotated back (static).
  """
  key: CacheTensor
  value: CacheTensor
  rotate_key: bool = False
  rotate_value: bool = False


@dataclasses.dataclass(frozen=True)
class KVCache:
  """The decoding cache of a whole model (a pytree; see the module docstring).

  Attributes:
    layers: one ``LayerCache`` per decoder block.
    index: int32 scalar, slots written so far (the next token's slot).
    pad: int32 ``[B]``, padding slots at the start of each row.
    max_len: slots (static).
    residual: float window length of quantized tensors (static; 0 when all
      tensors are float).
    rotate: whether q, k, v are Hadamard-rotated (static).
    defer_flush: the caller quantizes full windows (static): ``append``
      takes one token at a time into the window and never writes the store;
      the caller calls ``flush`` each time ``index`` reaches a multiple of
      ``residual`` (the decode loops do, at a static cadence, so a step has
      no data-dependent branch and quantizes nothing).
  """
  layers: tuple
  index: jax.Array
  pad: jax.Array
  max_len: int
  residual: int
  rotate: bool
  defer_flush: bool = False

  @property
  def batch(self) -> int:
    return int(self.pad.shape[0])

  @property
  def nbytes(self) -> int:
    """Bytes the cache's keys and values occupy (codes, scales, residuals)."""
    total = 0
    for leaf in jax.tree.leaves([l for l in self.layers]):
      total += int(np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape))
    return total

  @property
  def slots(self) -> int:
    """Slots ``read`` returns: ``max_len`` rounded up to whole residual windows."""
    r = self.residual
    return -(-self.max_len // r) * r if r else self.max_len

  def replace(self, **changes: Any) -> "KVCache":
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(CacheTensor, data_fields=["store", "residual"],
                                 meta_fields=[])
jax.tree_util.register_dataclass(LayerCache, data_fields=["key", "value"],
                                 meta_fields=["rotate_key", "rotate_value"])
jax.tree_util.register_dataclass(KVCache, data_fields=["layers", "index", "pad"],
                                 meta_fields=["max_len", "residual", "rotate",
                                              "defer_flush"])


# ---------------------------------------------------------------------------
# Building a cache


def _check_rule(rule: QuantRule, path: str) -> None:
  bad = [name for name, v in (("weight", rule.weight), ("grad", rule.grad),
                              ("learn_weight", rule.learn_weight),
                              ("learn_activation", rule.learn_activation))
         if v is not None]
  if rule.static:
    bad.append("static")
  if rule.delayed:
    bad.append("scaling='delayed'")
  if bad:
    raise ValueError(f"{path}: rule {rule.path!r} sets {', '.join(bad)}, which a KV "
                     "cache does not use: a cached tensor takes only the rule's "
                     "activation spec (quantized per call from its own range), e.g. "
                     "QuantRule('.*/attn/cache/key', activation=QuantSpec('int8', "
                     "axis=-1), ops=('kv_cache',))")


def _cache_rules(n_layers: int, rules, strict: bool) -> tuple:
  """``((key_rule, value_rule), ...)`` per layer: the matched rules or None."""
  if rules is not None:
    rules = as_rules(rules)
  if not rules:
    return tuple((None, None) for _ in range(n_layers))
  config = QuantConfig(rules)
  out = []
  for i in range(n_layers):
    pair = []
    for which in (KEY, VALUE):
      path = cache_path(i, which)
      rule = config.match((path,), (CACHE_OP,))
      if rule is not None:
        _check_rule(rule, path)
      pair.append(rule)
    out.append(tuple(pair))
  unused = [r for r in config.unused_rules() if CACHE_OP in r.ops]
  if strict and unused:
    raise ValueError("these KV-cache rules matched no cache path: "
                     + ", ".join(repr(r.path) for r in unused) + ". Cache paths "
                     "read 'layers_0/attn/cache/key' and 'layers_0/attn/cache/value'")
  return tuple(out)


def cache_specs(n_layers: int, rules, *, strict: bool = False) -> tuple:
  """``((key_spec, value_spec), ...)`` per layer from rules (None = float).

  Args:
    n_layers: decoder blocks.
    rules: QuantRules (or None); only those listing ``"kv_cache"`` in their
      ``ops`` take part.
    strict: raise if a ``"kv_cache"`` rule matched no cache path.

  Raises:
    ValueError: a matched rule sets options a cache does not use, or (strict)
      a cache rule matched nothing.
  """
  out = []
  for pair in _cache_rules(n_layers, rules, strict):
    specs = []
    for rule in pair:
      spec = None if rule is None else rule.activation
      if spec is not None and spec.axis is None and spec.tile is None:
        spec = spec.replace(axis=-1)
      specs.append(spec)
    out.append(tuple(specs))
  return tuple(out)


def cache_rotations(n_layers: int, rules) -> tuple:
  """``((rotate_key, rotate_value), ...)`` per layer: rules with ``input_rotation``.

  A ``"kv_cache"`` rule with ``input_rotation="hadamard"`` stores the tensor
  it matches Hadamard-rotated over ``head_dim`` (keys: SpinQuant's R3).
  """
  return tuple(tuple(r is not None and r.input_rotation is not None for r in pair)
               for pair in _cache_rules(n_layers, rules, False))


def _token_block(spec: QuantSpec, shape: tuple) -> int:
  """Slots one scale spans along the token axis, from ``quantize``'s layout.

  The cache quantizes chunks of whole blocks, so its length need not be a
  multiple of the block: a group that does not divide it is read off a cache
  rounded up to whole groups.
  """
  def block(shp):
    q = jax.eval_shape(lambda x: quantize(x, spec),
                       jax.ShapeDtypeStruct(shp, jnp.float32))
    return shp[_TOKEN_AXIS] // max(q.scale.shape[_TOKEN_AXIS], 1)
  try:
    return block(shape)
  except ValueError:
    if spec.group_size is None:
      raise
    g = spec.group_size
    up = list(shape)
    up[_TOKEN_AXIS] = -(-shape[_TOKEN_AXIS] // g) * g
    return block(tuple(up))


def _check_spec(spec: QuantSpec, path: str) -> None:
  if spec.tensor_scale:
    raise ValueError(f"{path}: {spec.format.name!r} keeps one float32 scale for the "
                     "whole tensor, which a cache filled chunk by chunk cannot keep; "
                     "use a format without a tensor scale, e.g. 'mxfp4'")
  if spec.rounding == "stochastic":
    raise ValueError(f"{path}: stochastic rounding needs a key per chunk, which the "
                     "cache does not draw; use rounding='nearest'")


def _check_chunks(spec: QuantSpec, path: str, batch: int, slots: int, r: int,
                  kvh: int, d: int, dtype) -> None:
  """Raises unless chunks of ``r`` slots quantize into aligned store slices."""
  desc = (f"the spec (format={spec.format.name!r}, axis={spec.axis!r}, group_size="
          f"{spec.group_size!r}, tile={spec.tile!r}) does not split into "
          f"independent chunks of residual={r} tokens of a [batch, slot, kv_head, "
          f"head_dim] = {(batch, slots, kvh, d)} cache")
  advice = ("A scale may span tokens only in groups that divide the residual "
            "window: use axis=-1 (per token), or axis=1 with a group_size that "
            "divides residual (per channel, KIVI), and a residual that is a "
            "multiple of the packing unit of codes packed along tokens (2 tokens "
            "for 4-bit codes, 4 for 2-bit, 8 for 3-bit)")
  try:
    store = jax.eval_shape(lambda x: quantize(x, spec),
                           jax.ShapeDtypeStruct((batch, slots, kvh, d), dtype))
    chunk = jax.eval_shape(lambda x: quantize(x, spec),
                           jax.ShapeDtypeStruct((batch, r, kvh, d), dtype))
  except ValueError as e:
    raise ValueError(f"{path}: {desc} ({e}). {advice}") from None
  n = slots // r
  for name in ("codes", "scale", "zero_point"):
    a, b = getattr(store, name), getattr(chunk, name)
    if a is None:
      continue
    ok = (a.ndim == b.ndim == 4 and a.shape[_TOKEN_AXIS] == n * b.shape[_TOKEN_AXIS]
          and all(a.shape[i] == b.shape[i] for i in (0, 2, 3)))
    if not ok:
      raise ValueError(f"{path}: {desc} (its {name} is {list(a.shape)} for the store "
                       f"and {list(b.shape)} for one chunk). {advice}")


def _chunks_fit(spec: QuantSpec, batch: int, slots: int, r: int, kvh: int, d: int,
                dtype) -> bool:
  try:
    _check_chunks(spec, "", batch, slots, r, kvh, d, dtype)
  except ValueError:
    return False
  return True


def init_cache(config, batch: int, *, rules=None, residual: Optional[int] = None,
               max_len: Optional[int] = None, pad=None, rotate: bool = False,
               dtype: Any = None, strict: bool = False) -> KVCache:
  """An empty cache for ``batch`` rows of a ``LlamaConfig`` model.

  Args:
    config: the model's ``LlamaConfig`` (``n_layers``, ``n_kv_heads``,
      ``head_dim``, ``max_len``, ``compute_dtype``).
    batch: rows.
    rules: QuantRules choosing quantized tensors (see the module docstring),
      e.g. ``kivi_rules(4)``; None keeps the whole cache in float.
    residual: float window of quantized tensors, in tokens (see Returns for
      the default); at most ``max_len``.
    max_len: slots (default ``config.max_len``); prompt plus generated tokens
      must fit.
    pad: int32 ``[batch]`` left padding of each row (default none).
    rotate: Hadamard-rotate q, k, v over ``head_dim`` (a power of two) in
      every layer. Cache rules with ``input_rotation="hadamard"`` rotate only
      what they match (keys: R3, any order ``core.hadamard`` builds).
    dtype: float dtype of float stores and residuals (default the model's
      compute dtype); the dtype dequantized keys and values come back in.
    strict: raise if a cache rule matched nothing.

  Returns:
    A ``KVCache`` with ``index`` 0. Default ``residual``: the largest number of
    tokens one scale spans in any spec (a per-channel group), or 32 when every
    quantized spec is per token (KIVI's window keeps recent tokens exact);
    doubled (up to 8x) until codes packed along the tokens fit it.

  Raises:
    ValueError: a spec that cannot be filled chunk by chunk, a residual that
      does not fit, a head_dim no Hadamard matrix exists for with a rotation.
  """
  n_layers, kvh, d = config.n_layers, config.n_kv_heads, config.head_dim
  if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
    raise ValueError(f"batch must be a positive int, got {batch!r}")
  slots = max_len if max_len is not None else config.max_len
  if (isinstance(slots, bool) or not isinstance(slots, (int, np.integer))
      or slots < 1):
    raise ValueError(f"max_len must be a positive int, got {slots!r}")
  batch, slots = int(batch), int(slots)
  if rules is not None:
    rules = as_rules(rules)   # an iterator is read once, here
  asked = slots   # the cache's max_len (what the model lets it hold)
  dt = jnp.dtype(dtype if dtype is not None else config.compute_dtype)
  specs = cache_specs(n_layers, rules, strict=strict)
  rotations = tuple((bool(rotate) or k, bool(rotate) or v)
                    for k, v in cache_rotations(n_layers, rules))
  if any(v for _, v in rotations) and d & (d - 1):
    raise ValueError(f"rotating the cached values (rotate=True or a value rule with "
                     f"input_rotation) rotates the attention output back with the "
                     f"same symmetric Walsh-Hadamard matrix, which needs head_dim a "
                     f"power of two; head_dim is {d} (rotate only the keys: a key "
                     f"rule with input_rotation)")
  if any(k for k, _ in rotations):
    try:
      hadamard(d)
    except ValueError as e:
      raise ValueError(f"rotating the cached keys needs a Hadamard matrix over "
                       f"head_dim={d}: {e}") from None
  quantized = [s for pair in specs for s in pair if s is not None]
  for i, pair in enumerate(specs):
    for which, spec in zip((KEY, VALUE), pair):
      if spec is not None:
        _check_spec(spec, cache_path(i, which))
  r = 0
  if quantized:
    if residual is None:
      try:
        blocks = [_token_block(s, (batch, slots, kvh, d)) for s in quantized]
      except ValueError as e:
        raise ValueError(f"a cache spec does not fit a [batch, slot, kv_head, "
                         f"head_dim] = {(batch, slots, kvh, d)} cache: {e}") from None
      r = max(blocks) if max(blocks) > 1 else 32
      if max(blocks) > slots:
        # Shorter than one group: no group ever fills, so every token stays in
        # the float window; the stores take one group's slots (the ones past
        # max_len, which stays the one asked for, are never written or read).
        slots = max(blocks)
      r = min(r, slots)
      # Codes narrower than a byte pack along the tokens too (2 tokens a byte
      # for 4-bit codes, 4 for 2-bit, 8 in 3 bytes for 3-bit): the first
      # multiple of the group that every spec's chunks fit.
      for m in (1, 2, 4, 8):
        cand = min(r * m, slots)
        if all(_chunks_fit(s, batch, (slots // cand) * cand, cand, kvh, d, dt)
               for s in quantized):
          r = cand
          break
    else:
      r = residual
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= slots:
      raise ValueError(f"residual must be an int in [1, max_len={slots}], got "
                       f"{residual!r}")
  elif residual is not None:
    raise ValueError("residual is the float window of quantized cache tensors, but "
                     "no cache rule quantizes anything; drop residual or pass rules")
  q_slots = (slots // r) * r if r else 0
  layers = []
  for i, pair in enumerate(specs):
    tensors = []
    for which, spec in zip((KEY, VALUE), pair):
      if spec is None:
        tensors.append(CacheTensor(jnp.zeros((batch, slots, kvh, d), dt), None))
        continue
      _check_chunks(spec, cache_path(i, which), batch, q_slots, r, kvh, d, dt)
      # Zero leaves of the right layout (no quantize call: under jit it would
      # be constant-folded); a slot is read only once its chunk is written.
      store = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
          lambda x, spec=spec: quantize(x, spec),
          jax.ShapeDtypeStruct((batch, q_slots, kvh, d), dt)))
      tensors.append(CacheTensor(store, jnp.zeros((batch, r, kvh, d), dt)))
    layers.append(LayerCache(*tensors, *rotations[i]))
  if pad is None:
    pad = jnp.zeros((batch,), jnp.int32)
  pad = jnp.asarray(pad, jnp.int32)
  if pad.shape != (batch,):
    raise ValueError(f"pad must have shape [batch] = [{batch}], got {pad.shape}")
  return KVCache(tuple(layers), jnp.zeros((), jnp.int32), pad, asked, r, bool(rotate))


# ---------------------------------------------------------------------------
# Reading and writing (inside the model)


def read(t: CacheTensor, cache: KVCache, dtype) -> jax.Array:
  """The cached tensor as float values, slot ``s`` at position ``s``.

  Args:
    t: one layer's keys or values.
    cache: the cache (for ``index`` and ``residual``).
    dtype: dtype of the returned values.

  Returns:
    ``[B, cache.slots, KVH, D]``: a float store as it is; a quantized one
    dequantized below the last full chunk and the residual window above it.
    Which slots hold tokens is ``valid_slots(cache)``.
  """
  n = cache.slots
  if not t.quantized:
    vals = t.store.astype(dtype)
    if vals.shape[_TOKEN_AXIS] < n:
      vals = jnp.pad(vals, ((0, 0), (0, n - vals.shape[_TOKEN_AXIS]), (0, 0), (0, 0)))
    return vals
  r = cache.residual
  n_q = (cache.index // r) * r
  deq = dequantize_as(t.store, dtype)
  deq = jnp.pad(deq, ((0, 0), (0, n - deq.shape[_TOKEN_AXIS]), (0, 0), (0, 0)))
  res = jnp.tile(t.residual.astype(dtype), (1, n // r, 1, 1))  # slot s at s % r
  slots = jnp.arange(n, dtype=jnp.int32)[None, :, None, None]
  return jnp.where(slots < n_q, deq, res)


def valid_slots(cache: KVCache) -> jax.Array:
  """``[B, cache.slots]`` bool: slots written so far that are not padding."""
  slots = jnp.arange(cache.slots, dtype=jnp.int32)[None]
  return (slots < cache.index) & (slots >= cache.pad[:, None])


def _write_chunk(store: QArray, chunk: QArray, c: jax.Array,
                 write: jax.Array) -> QArray:
  """``store`` with chunk number ``c`` (of equal-size chunks) replaced where
  ``write`` (a bool scalar) holds, else unchanged (no branch: the chunk's old
  contents are written back; an out-of-range ``c`` is clamped the same way by
  the read and the write, so a masked write is a no-op there too)."""

  def put(a, b):
    if a is None:
      return None
    start = [jnp.zeros((), jnp.int32)] * a.ndim
    start[_TOKEN_AXIS] = (c * b.shape[_TOKEN_AXIS]).astype(jnp.int32)
    old = lax.dynamic_slice(a, start, b.shape)
    return lax.dynamic_update_slice(a, jnp.where(write, b.astype(a.dtype), old), start)

  return dataclasses.replace(store, codes=put(store.codes, chunk.codes),
                             scale=put(store.scale, chunk.scale),
                             zero_point=put(store.zero_point, chunk.zero_point))


def append(t: CacheTensor, cache: KVCache, new: jax.Array) -> CacheTensor:
  """``t`` with ``new [B, T, KVH, D]`` written at slots ``index ...``.

  A float store takes the tokens in place. A quantized tensor takes them into
  its residual window; each time the window fills, its ``residual`` tokens
  are quantized as one chunk into the store. There is no branch on the data
  (no ``lax.cond``, whose predicate a GPU copies to the host): the tokens go
  into a float buffer of the window plus enough chunks for ``T`` more tokens,
  every chunk that may complete is quantized, and each is written into the
  store only where it did complete (a masked ``dynamic_update_slice``). Slot
  ``s`` of the window holds the newest token at ``s % residual``, as if the
  tokens had been written one by one.

  With ``cache.defer_flush`` (one token per call) the token only goes into
  the window; ``flush`` quantizes it when it is full.
  """
  idx = cache.index
  if not t.quantized:
    start = (0, idx, 0, 0)
    return CacheTensor(lax.dynamic_update_slice(t.store, new.astype(t.store.dtype),
                                                start), None)
  r = cache.residual
  spec = t.store.spec
  n = new.shape[_TOKEN_AXIS]
  res = t.residual
  if cache.defer_flush:
    if n != 1:
      raise ValueError(f"a cache with defer_flush=True takes one token per call "
                       f"(the caller flushes every residual={r} tokens), got {n}; "
                       "append several tokens to cache.replace(defer_flush=False)")
    return CacheTensor(t.store, lax.dynamic_update_slice_in_dim(
        res, new.astype(res.dtype), idx % r, axis=_TOKEN_AXIS))
  off = idx % r                       # the window's first slot is idx - off
  most = (r - 1 + n) // r             # chunks that can complete (static)
  shape = list(res.shape)
  shape[_TOKEN_AXIS] = (most + 1) * r
  buf = lax.dynamic_update_slice_in_dim(jnp.zeros(shape, res.dtype), res, 0,
                                        axis=_TOKEN_AXIS)
  buf = lax.dynamic_update_slice_in_dim(buf, new.astype(res.dtype), off,
                                        axis=_TOKEN_AXIS)
  full = (off + n) // r               # chunks completed by these tokens
  store = t.store
  for j in range(most):
    chunk = quantize(lax.slice_in_dim(buf, j * r, (j + 1) * r, axis=_TOKEN_AXIS), spec)
    store = _write_chunk(store, chunk, idx // r + j, j < full)
  # The new window: the open chunk's tokens, and where it has none yet the
  # last complete chunk's (what writing token by token leaves there).
  cur = lax.dynamic_slice_in_dim(buf, full * r, r, axis=_TOKEN_AXIS)
  prev = lax.dynamic_slice_in_dim(buf, jnp.maximum(full - 1, 0) * r, r,
                                  axis=_TOKEN_AXIS)
  pos = jnp.arange(r, dtype=jnp.int32)[None, :, None, None]
  res = jnp.where(pos < off + n - full * r, cur, prev)
  return CacheTensor(store, res)


def flush(cache: KVCache) -> KVCache:
  """Quantizes the full residual window of every quantized tensor into its store.

  For a cache with ``defer_flush`` (whose ``append`` never flushes): call it
  right after the step that makes ``index`` a multiple of ``residual``; the
  window's ``residual`` tokens are quantized as one chunk, the chunk that
  ends at ``index``, as ``append`` without ``defer_flush`` would have done.
  The window keeps its tokens (they are read from the store from now on, and
  overwritten by the next ones).
  """
  if not cache.residual:
    return cache
  c = cache.index // cache.residual - 1
  true = jnp.ones((), bool)

  def one(t):
    if not t.quantized:
      return t
    chunk = quantize(t.residual, t.store.spec)
    return CacheTensor(_write_chunk(t.store, chunk, c, true), t.residual)

  return cache.replace(layers=tuple(
      dataclasses.replace(l, key=one(l.key), value=one(l.value))
      for l in cache.layers))


def update(t: CacheTensor, cache: KVCache, new: jax.Array,
           dtype) -> tuple[jax.Array, CacheTensor]:
  """Appends ``new`` and returns what attention reads: old slots and new tokens.

  The decode step's keys (or values) without concatenating the cache and the
  new tokens: the tokens are written into the cache (in place) and the cache
  is read; where the stored dtype is not ``dtype`` (or several tokens may
  complete chunks of a quantized tensor) they are written again, exactly,
  into the array ``read`` returns. Slot ``index + i`` holds ``new[:, i]``
  exactly, the slots below ``index`` what ``read`` gives for ``t``.

  Args:
    t: one layer's keys or values.
    cache: the cache before the tokens (``index`` is their first slot).
    new: ``[B, T, KVH, D]`` tokens of slots ``index ... index + T - 1``.
    dtype: dtype of the returned values.

  Returns:
    ``(values [B, cache.slots, KVH, D], t with new appended)``; which slots
    hold tokens: ``slot < index + T`` and not padding.
  """
  dtype = jnp.dtype(dtype)
  written = append(t, cache, new)
  if not t.quantized:  # (read of a float store of ``dtype``: the store itself)
    src, exact = written, written.store.dtype == dtype
  elif new.shape[_TOKEN_AXIS] == 1:
    # One token: the written tensor read below the old index's last full
    # chunk is the old one plus the token (the chunk it may complete, if
    # any, is written into the store above that bound, and the window still
    # holds the chunk). Reading it, not ``t``, lets the store be updated in
    # place.
    src, exact = written, written.residual.dtype == dtype
  else:
    src, exact = t, False
  vals = read(src, cache, dtype)
  if not exact:
    vals = lax.dynamic_update_slice(vals, new.astype(dtype), (0, cache.index, 0, 0))
  return vals, written


def fake_quant_chunks(x: jax.Array, spec: QuantSpec, residual: int,
                      length: int) -> jax.Array:
  """Keys or values ``[B, S, KVH, D]`` as a quantized cache holds them.

  The reference of the quantized cache: slots in the complete chunks of
  ``residual`` tokens below ``length`` are fake-quantized chunk by chunk,
  the rest stay as they are.

  Args:
    x: float slots.
    spec: the tensor's spec (axes in the cache layout).
    residual: the residual window (chunk) length.
    length: tokens written so far.
  """
  n_q = (length // residual) * residual
  if n_q == 0:
    return x
  chunks = [fake_quant(x[:, c:c + residual], spec) for c in range(0, n_q, residual)]
  return jnp.concatenate(chunks + [x[:, n_q:]], axis=_TOKEN_AXIS)


__all__ = ["CACHE_OP", "KVCache", "LayerCache", "CacheTensor", "cache_path",
           "cache_specs", "cache_rotations", "kivi_rules", "init_cache", "read",
           "valid_slots", "append", "flush", "update", "fake_quant_chunks"]
