"""Held-out perplexity and bits per byte of a language model.

The token stream is cut into consecutive windows of ``seq_len + 1`` tokens that
overlap by one token (stride ``seq_len``); the model sees ``window[:-1]`` and is
scored on ``window[1:]``. Every token of the stream except the first is scored
exactly once (the last window is padded and the padding masked), so with a
stream built as ``[EOS] doc_1 [EOS] doc_2 ...`` every byte of the text is
covered and ``bits_per_byte = total_nll / ln 2 / num_bytes`` is exact for the
stream (Gao et al., 2020, "The Pile", use this tokenizer-independent measure).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a stream into ``[N, seq_len + 1]`` windows and a ``[N, seq_len]`` mask."""
  n_targets = tokens.size - 1
  n_windows = -(-n_targets // seq_len)
  padded = np.zeros(n_windows * seq_len + 1, dtype=np.int32)
  padded[: tokens.size] = tokens
  idx = np.arange(n_windows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  mask = (idx[:, 1:] <= n_targets).astype(np.float32)
  return padded[idx], mask


def _nll_sum(apply_fn, params, x, mask):
  """``(summed nll, the logits' vocabulary size)``."""
  logits = apply_fn(params, x[:, :-1]).astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, x[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * mask), jnp.int32(logits.shape[-1])


# Compiled once per (apply_fn, shapes): pass the same apply_fn object to reuse it.
_nll_sum_jit = jax.jit(_nll_sum, static_argnums=0)


def perplexity(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
               tokens: np.ndarray, seq_len: int, batch: int, *,
               num_bytes: int | None = None,
               batch_sharding: jax.sharding.Sharding | None = None
               ) -> dict[str, float | int | None]:
  """Scores a token stream with a causal language model.

  Args:
    apply_fn: ``apply_fn(params, tokens [B, T] int32) -> logits [B, T, V]``;
      pass a quantized apply to score a quantized model.
    params: whatever ``apply_fn`` takes as its first argument.
    tokens: 1-D integer token stream with at least 2 tokens.
    seq_len: context length of each scored window.
    batch: windows per forward pass (the last pass is padded to ``batch``).
    num_bytes: UTF-8 bytes of the text the stream encodes (e.g.
      ``stdlib_corpus.split_num_bytes("heldout")``); needed for bits per byte.
    batch_sharding: where to place each ``[batch, seq_len + 1]`` input (e.g.
      split over a data-parallel mesh); default: let jit place it.

  Returns:
    ``{"loss": mean nll per scored token (nats), "perplexity": exp(loss),
    "bits_per_byte": total nll / ln 2 / num_bytes (None without num_bytes),
    "num_tokens": scored tokens}``.

  Raises:
    ValueError: for a stream shorter than 2 tokens, ids that are not integers
      in [0, vocab), or non-positive sizes.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size < 2:
    raise ValueError(f"tokens must be a 1-D stream of at least 2 tokens, got shape "
                     f"{tokens.shape}.")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi > np.iinfo(np.int32).max:
    raise ValueError(f"token ids must be in [0, vocab), got ids from {lo} to {hi}.")
  for name, v in (("seq_len", seq_len), ("batch", batch)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}.")
  if num_bytes is not None and num_bytes < 1:
    raise ValueError(f"num_bytes must be >= 1 or None, got {num_bytes}.")

  windows, mask = _windows(tokens, seq_len)
  n = windows.shape[0]
  n_padded = -(-n // batch) * batch
  windows = np.concatenate(
      [windows, np.zeros((n_padded - n, seq_len + 1), np.int32)])
  mask = np.concatenate([mask, np.zeros((n_padded - n, seq_len), np.float32)])

  try:
    hash(apply_fn)
    nll_sum = functools.partial(_nll_sum_jit, apply_fn)
  except TypeError:  # an unhashable callable: compile for this call only
    nll_sum = jax.jit(functools.partial(_nll_sum, apply_fn))

  total = 0.0
  for i in range(0, n_padded, batch):
    x, m = windows[i:i + batch], mask[i:i + batch]
    if batch_sharding is not None:
      x, m = jax.device_put((x, m), batch_sharding)
    part, vocab = nll_sum(params, x, m)
    if i == 0 and hi >= int(vocab):  # an embedding gather past its end
      raise ValueError(f"token id {hi} is outside the model's vocabulary "
                       f"of {int(vocab)} (its logits' last axis).")
    total += float(part)
  # Every target is scored once (an integer: a float32 sum of the mask was
  # off by one above 2**24 tokens).
  count = tokens.size - 1
  loss = total / count
  return {
      "loss": loss,
      # exp overflows a float above ~709 nats: a hopeless model, not an error.
      # A NaN loss (NaN logits, a broken quantized model) stays NaN: it was
      # reported as inf, a finite-loss model's number. Sweeps keep NaN rows
      # in their tables and off their Pareto fronts.
      "perplexity": (math.nan if math.isnan(loss) else
                     math.exp(loss) if loss < 709.0 else math.inf),
      "bits_per_byte": (total / math.log(2) / num_bytes
                        if num_bytes is not None else None),
      "num_tokens": count,
  }
