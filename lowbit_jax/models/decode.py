"""Jitted autoregressive decoding of the Llama decoder with a (quantized) KV cache.

One ``jax.jit`` holds the whole generation: the prompt batch is prefilled in
one forward pass (its tokens attend to each other in float), then tokens are
generated one at a time inside a ``jax.lax.scan`` of fixed length, each step
reading the cache (dequantizing quantized chunks, see
``lowbit_jax.models.kv_cache``) and appending the new token's keys and values.
With a quantized cache the scan is nested at a static cadence: an outer scan
over windows of ``residual`` steps quantizes each full window once, after an
inner scan of steps that only write into the float window, so no step
branches on the data or quantizes.

Prompts of different lengths are left-padded (``left_pad``): every row then
writes the same cache slot at each step, pads are masked out of attention, and
row ``b``'s tokens sit at rotary positions ``slot - pad[b]``, so with a float
cache a padded row decodes as it would alone. A quantized cache groups slots,
not a row's own tokens: padding moves a row's tokens across the group
boundaries (and its zeros join the first groups' ranges), so a padded row's
logits differ from its lone run by quantization error, of the order of the
cache's own distance from the float cache.

>>> from lowbit_jax.models import decode, kv_cache
>>> tokens, lengths = decode.left_pad([[5, 6, 7], [8, 9]])
>>> out = decode.generate(model, variables, tokens, lengths, 32,
...                       cache_rules=kv_cache.kivi_rules(4), key=jax.random.key(0),
...                       temperature=0.8, top_k=40)

A weight-quantized model decodes the same way through its quantizer's
wrapped apply: ``apply_fn=quantize_linen(rules)(model.apply)``.
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax._rules import as_rules
from lowbit_jax.models import kv_cache as kv_lib


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0,
             length: Optional[int] = None) -> tuple:
  """Left-pads token lists into one prompt batch.

  Args:
    seqs: token id lists (each non-empty).
    pad_id: id written into padding slots (never attended to).
    length: padded length (default the longest list).

  Returns:
    ``(tokens int32 [B, length], lengths int32 [B])``.

  Raises:
    ValueError: an empty list, or one longer than ``length``.
  """
  seqs = [list(s) for s in seqs]
  if not seqs or any(not s for s in seqs):
    raise ValueError("left_pad needs at least one prompt and no empty prompt")
  n = max(len(s) for s in seqs) if length is None else int(length)
  if any(len(s) > n for s in seqs):
    raise ValueError(f"a prompt of {max(len(s) for s in seqs)} tokens does not fit "
                     f"length={n}")
  out = np.full((len(seqs), n), pad_id, np.int32)
  for i, s in enumerate(seqs):
    out[i, n - len(s):] = s
  return jnp.asarray(out), jnp.asarray([len(s) for s in seqs], jnp.int32)


def sample_token(logits: jax.Array, key: Optional[jax.Array], temperature: float,
                 top_k: Optional[int]) -> jax.Array:
  """The next token of each row: argmax, or a sample from the tempered top-k.

  Args:
    logits: ``[B, V]`` float32.
    key: PRNG key (unused when greedy).
    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: sample among the ``top_k`` largest logits only (None: all).

  Returns:
    int32 ``[B]``.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / jnp.float32(temperature)
  if top_k is not None and top_k < logits.shape[-1]:
    # Exactly k candidates (a threshold at the k-th value kept every tie:
    # bf16 logits tie often); ties go to the lower token id, as argmax's.
    vals, idx = jax.lax.top_k(logits, top_k)
    pick = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, key) -> None:
  if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
      or not temperature >= 0):
    raise ValueError(f"temperature must be a number >= 0 (0: greedy), got "
                     f"{temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                            or top_k < 1):
    raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: pass "
                     "key=jax.random.key(seed)")


def _scan_steps(step: Callable, carry: tuple, xs, *, start: int, residual: int):
  """``jax.lax.scan(step, carry, xs)`` over decode steps, ``carry[-1]`` the cache.

  With a quantized cache (``residual > 0``) the steps run with
  ``defer_flush`` and full windows are quantized (``kv_cache.flush``) at a
  static cadence: a scan up to the first slot that is a multiple of
  ``residual``, an outer scan over chunks of ``residual`` steps (an inner
  scan, then a flush), then the remaining steps. The tokens land where
  ``append`` with a per-step flush puts them, but no step branches on the
  data (XLA GPU copies a conditional's predicate to the host) or quantizes.

  Args:
    step: the scan body, ``(carry, x) -> (carry, y)``, one token per step.
    carry: the initial carry, its last element the ``KVCache``.
    xs: the per-step inputs (a pytree of arrays with a leading step axis).
    start: the cache's ``index`` before the first step (static).
    residual: the cache's window length (static; 0 for a float cache).

  Returns:
    ``(carry, ys)`` as ``lax.scan`` returns them; the cache in the carry
    holds every step's token, as with per-step flushes.
  """
  if not residual:
    return jax.lax.scan(step, carry, xs)
  n = jax.tree.leaves(xs)[0].shape[0]
  with_cache = lambda c, cache: c[:-1] + (cache,)  # noqa: E731
  carry = with_cache(carry, carry[-1].replace(defer_flush=True))
  head = min(-start % residual, n)     # steps up to the first window's end
  body = (n - head) // residual        # whole windows
  tail = n - head - body * residual
  take = lambda a, b: jax.tree.map(lambda x: x[a:b], xs)  # noqa: E731
  flush = lambda c: with_cache(c, kv_lib.flush(c[-1]))  # noqa: E731
  ys = []
  if head:
    carry, y = jax.lax.scan(step, carry, take(0, head))
    ys.append(y)
    if head == -start % residual:
      carry = flush(carry)
  if body:
    def window(c, x):
      c, y = jax.lax.scan(step, c, x)
      return flush(c), y
    chunks = jax.tree.map(
        lambda x: x.reshape((body, residual) + x.shape[1:]),
        take(head, head + body * residual))
    carry, y = jax.lax.scan(window, carry, chunks)
    ys.append(jax.tree.map(lambda x: x.reshape((body * residual,) + x.shape[2:]), y))
  if tail:
    carry, y = jax.lax.scan(step, carry, take(n - tail, n))
    ys.append(y)
  carry = with_cache(carry, carry[-1].replace(defer_flush=False))
  return carry, jax.tree.map(lambda *a: jnp.concatenate(a), *ys)


def _rules_tuple(rules):
  """None, or the rules as a tuple (hashable, and an iterator read once)."""
  return None if rules is None else as_rules(rules)


def make_generate(model, max_new_tokens: int, *, prompt_len: int, batch: int,
                  cache_rules=None, residual: Optional[int] = None,
                  rotate: bool = False, temperature: float = 0.0,
                  top_k: Optional[int] = None, max_len: Optional[int] = None,
                  apply_fn: Optional[Callable] = None) -> Callable:
  """A jitted ``fn(variables, tokens, lengths, key) -> tokens [B, max_new_tokens]``.

  Builds the cache, prefills the left-padded prompt batch, then samples
  ``max_new_tokens`` tokens in a ``lax.scan``, all in one jit (compiled on
  the first call; later calls with the same shapes reuse it).

  Args:
    model: a ``Llama``.
    max_new_tokens: tokens generated per row (at least 1).
    prompt_len: the prompt batch's padded length.
    batch: rows.
    cache_rules: QuantRules for the cache (``"kv_cache"`` ops; see
      ``kv_cache``), None for a float cache.
    residual: the float window of quantized cache tensors (``init_cache``).
    rotate: Hadamard-rotate q, k, v (``init_cache``).
    temperature: 0 (greedy) or the sampling temperature.
    top_k: sample among the top-k logits only.
    max_len: cache slots (default ``prompt_len + max_new_tokens``).
    apply_fn: ``apply_fn(variables, tokens, cache=cache)``; default
      ``model.apply`` (pass a quantizer's wrapped apply for a quantized model).

  Returns:
    The jitted function; ``key`` may be None when greedy.

  Raises:
    ValueError: bad sizes or sampling options.
  """
  cfg = model.config
  for name, v in (("max_new_tokens", max_new_tokens), ("prompt_len", prompt_len),
                  ("batch", batch)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  cache_rules = _rules_tuple(cache_rules)   # an iterator is read once, here
  _check_sampling(temperature, top_k, key=0)  # (the key comes with each call)
  slots = max_len if max_len is not None else prompt_len + max_new_tokens
  if prompt_len + max_new_tokens > slots:
    raise ValueError(f"prompt_len + max_new_tokens = {prompt_len + max_new_tokens} "
                     f"exceeds max_len={slots}")
  if slots > cfg.max_len:
    raise ValueError(f"a cache of {slots} slots (prompt_len + max_new_tokens = "
                     f"{prompt_len + max_new_tokens}) goes past the model's "
                     f"LlamaConfig.max_len={cfg.max_len}, the longest sequence it "
                     "accepts (its forward pass refuses longer ones); generate "
                     "fewer tokens or raise max_len")
  apply = apply_fn if apply_fn is not None else model.apply
  # Validate the cache layout now, outside the trace (errors name the rule).
  window = kv_lib.init_cache(cfg, batch, rules=cache_rules, residual=residual,
                             max_len=slots, rotate=rotate).residual

  def run(variables, tokens, lengths, key):
    if tokens.shape != (batch, prompt_len):
      raise ValueError(f"tokens must be [batch, prompt_len] = {(batch, prompt_len)}, "
                       f"got {tokens.shape}")
    cache = kv_lib.init_cache(cfg, batch, rules=cache_rules, residual=residual,
                              max_len=slots, rotate=rotate,
                              pad=prompt_len - lengths.astype(jnp.int32))
    logits, cache = apply(variables, tokens, cache=cache)
    keys = (jax.random.split(key, max_new_tokens) if temperature > 0
            else [None] * max_new_tokens)
    first = sample_token(logits[:, -1], keys[0], temperature, top_k)
    if max_new_tokens == 1:
      return first[:, None]

    def step(carry, k):
      tok, cache = carry
      logits, cache = apply(variables, tok[:, None], cache=cache)
      nxt = sample_token(logits[:, 0], k, temperature, top_k)
      return (nxt, cache), tok

    xs = keys[1:] if temperature > 0 else jnp.zeros((max_new_tokens - 1,))
    if temperature == 0:
      step_fn = lambda c, _: step(c, None)  # noqa: E731
    else:
      step_fn = step
    (last, _), toks = _scan_steps(step_fn, (first, cache), xs, start=prompt_len,
                                  residual=window)
    return jnp.concatenate([toks.T, last[:, None]], axis=1)

  return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _cached_generate(model, max_new_tokens, prompt_len, batch, cache_rules, residual,
                     rotate, temperature, top_k, max_len, apply_fn):
  return make_generate(model, max_new_tokens, prompt_len=prompt_len, batch=batch,
                       cache_rules=cache_rules, residual=residual, rotate=rotate,
                       temperature=temperature, top_k=top_k, max_len=max_len,
                       apply_fn=apply_fn)


def generate(model, variables, tokens: jax.Array, lengths: jax.Array,
             max_new_tokens: int, *, key: Optional[jax.Array] = None,
             temperature: float = 0.0, top_k: Optional[int] = None,
             cache_rules=None, residual: Optional[int] = None, rotate: bool = False,
             max_len: Optional[int] = None,
             apply_fn: Optional[Callable] = None) -> jax.Array:
  """Generates ``max_new_tokens`` tokens after each left-padded prompt.

  Args:
    model: a ``Llama``.
    variables: its variables (``{"params": ...}``).
    tokens: int32 ``[B, P]`` left-padded prompts (``left_pad``).
    lengths: int32 ``[B]`` real prompt lengths.
    max_new_tokens: tokens to generate.
    key: PRNG key, required when ``temperature > 0``.
    temperature, top_k: sampling (``temperature=0``: greedy).
    cache_rules, residual, rotate, max_len, apply_fn: see ``make_generate``.

  Returns:
    int32 ``[B, max_new_tokens]``.

  The jitted function is kept (per model, shapes and options) for later calls.
  """
  _check_sampling(temperature, top_k, key)
  if isinstance(temperature, numbers.Real) and not isinstance(temperature, float):
    temperature = float(temperature)   # a numpy scalar: hashable, one cache entry
  try:
    toks = np.asarray(tokens)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    toks = None  # traced: the caller's jit owns the check
  if np.ndim(tokens) != 2:
    raise ValueError(f"tokens must be [batch, prompt_len] (left_pad makes them), got "
                     f"shape {np.shape(tokens)}")
  vocab = model.config.vocab
  if toks is not None and toks.size and (toks.min() < 0 or toks.max() >= vocab):
    raise ValueError(f"prompt token ids must be in [0, vocab={vocab}), got ids from "
                     f"{toks.min()} to {toks.max()}")
  tokens = jnp.asarray(tokens, jnp.int32)
  b, p = tokens.shape
  try:
    ln = np.asarray(lengths)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    ln = None  # traced: the caller's jit owns the check
  if ln is not None and (ln.shape != (b,) or ln.size == 0 or ln.min() < 1
                         or ln.max() > p):
    raise ValueError(f"lengths must be [batch] = [{b}] real prompt lengths in "
                     f"[1, prompt_len={p}] (left_pad returns them), got "
                     f"{ln.tolist()}")
  cache_rules = _rules_tuple(cache_rules)
  fn = _cached_generate(model, max_new_tokens, p, b, cache_rules, residual, rotate,
                        temperature, top_k, max_len, apply_fn)
  if key is None:
    key = jax.random.key(0)  # unused: greedy
  return fn(variables, tokens, jnp.asarray(lengths, jnp.int32), key)


def make_teacher_forced(model, seq_len: int, batch: int, *, prompt_len: int = 1,
                        cache_rules=None, residual: Optional[int] = None,
                        rotate: bool = False,
                        apply_fn: Optional[Callable] = None) -> Callable:
  """A jitted ``fn(variables, tokens [B, seq_len]) -> logits [B, seq_len, V]``.

  The logits of every position as decoding computes them: the first
  ``prompt_len`` tokens are prefilled in one pass, then each further token is
  fed through the cache alone (teacher forcing: the given token, not a
  sampled one), so every position after the prompt attends to its past as the
  cache stores it. With a float cache this equals ``model.apply`` on the
  whole sequence up to float rounding; with a quantized cache it is the
  perplexity path of a quantized-cache decoder.

  Args:
    model: a ``Llama``.
    seq_len: tokens per row.
    batch: rows.
    prompt_len: tokens prefilled together (1 to seq_len).
    cache_rules, residual, rotate, apply_fn: see ``make_generate``.

  Returns:
    The jitted function.
  """
  cfg = model.config
  for name, v in (("seq_len", seq_len), ("batch", batch), ("prompt_len", prompt_len)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if not 1 <= prompt_len <= seq_len:
    raise ValueError(f"prompt_len must be in [1, seq_len={seq_len}], got {prompt_len}")
  if seq_len > cfg.max_len:
    raise ValueError(f"seq_len={seq_len} goes past the model's LlamaConfig.max_len="
                     f"{cfg.max_len}, the longest sequence it accepts (its forward "
                     "pass refuses longer ones); score shorter windows or raise "
                     "max_len")
  cache_rules = _rules_tuple(cache_rules)   # an iterator is read once, here
  apply = apply_fn if apply_fn is not None else model.apply
  window = kv_lib.init_cache(cfg, batch, rules=cache_rules, residual=residual,
                             max_len=seq_len, rotate=rotate).residual

  def run(variables, tokens):
    if tokens.shape != (batch, seq_len):
      raise ValueError(f"tokens must be [batch, seq_len] = {(batch, seq_len)}, got "
                       f"{tokens.shape}")
    cache = kv_lib.init_cache(cfg, batch, rules=cache_rules, residual=residual,
                              max_len=seq_len, rotate=rotate)
    logits, cache = apply(variables, tokens[:, :prompt_len], cache=cache)
    if prompt_len == seq_len:
      return logits

    def step(carry, tok):
      out, cache = apply(variables, tok[:, None], cache=carry[0])
      return (cache,), out[:, 0]

    _, rest = _scan_steps(step, (cache,), tokens[:, prompt_len:].T,
                          start=prompt_len, residual=window)
    return jnp.concatenate([logits, jnp.moveaxis(rest, 0, 1)], axis=1)

  return jax.jit(run)


__all__ = ["left_pad", "sample_token", "make_generate", "generate",
           "make_teacher_forced"]
