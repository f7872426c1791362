"""Delayed scaling: amax histories as explicit state (pure functions).

The Transformer Engine FP8 recipe (Micikevicius et al. 2022, "FP8 Formats for
Deep Learning") quantizes a tensor with a range taken from the amaxes of the
previous steps instead of its own: the history is a float32 vector, newest
entry at index 0, and the range is its max (or its newest entry).

The quantized ops take histories through ``amax_history={"lhs": h, ...}`` and
hand the updated ones back as the "gradient" of ``h`` (see
``lowbit_jax.core.ops.dot_general``), so a training step must replace each
history leaf with its gradient instead of applying an optimizer to it.

>>> h = init_history(16)
>>> amax = amax_from_history(h)          # 0 on the first step: ops fall back
>>> h = update_history(h, jnp.max(jnp.abs(x)))   # to the current amax
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("max", "most_recent")


def init_history(length: int) -> jax.Array:
  """A fresh amax history: ``float32[length]`` zeros.

  Args:
    length: steps remembered (Transformer Engine's default is 1024; 16 to 128
      is common).

  Returns:
    zeros of shape ``(length,)``.

  Raises:
    ValueError: length is not a positive int.
  """
  if not isinstance(length, int) or length < 1:
    raise ValueError(f"history length must be a positive int, got {length!r}")
  return jnp.zeros((length,), jnp.float32)


def _check_history(history: jax.Array) -> jax.Array:
  history = jnp.asarray(history)
  if history.ndim != 1 or history.shape[0] < 1:
    raise ValueError(f"an amax history is a 1-d array (init_history(n)), got shape "
                     f"{history.shape}")
  return history


def amax_from_history(history: jax.Array, reduce: str = "max") -> jax.Array:
  """The range a delayed-scaling step quantizes with.

  Args:
    history: ``float32[n]``, newest amax at index 0.
    reduce: "max" (the largest amax remembered) or "most_recent" (index 0).

  Returns:
    A float32 scalar (0 for a fresh history).

  Raises:
    ValueError: an unknown reduction or a history that is not 1-d.
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
  history = _check_history(history)
  if reduce == "max":
    return jnp.max(history).astype(jnp.float32)
  return history[0].astype(jnp.float32)


def update_history(history: jax.Array, amax: jax.Array) -> jax.Array:
  """The history rolled by one step, ``amax`` at index 0 (the oldest drops).

  Args:
    history: ``float32[n]``.
    amax: this step's amax, a scalar.

  Returns:
    ``[amax, history[0], ..., history[n - 2]]`` in the history's dtype.
  """
  history = _check_history(history)
  amax = jnp.asarray(amax, history.dtype)
  if amax.ndim != 0:
    raise ValueError(f"amax must be a scalar, got shape {amax.shape}")
  return jnp.concatenate([amax[None], history[:-1]])


def current_amax(x: jax.Array) -> jax.Array:
  """``max |x|`` over the finite values of x, as float32 (0 if none).

  Non-finite values are left out so that one overflowing step does not
  poison the range of the next ``n`` steps (the quantizers still turn a
  block holding them into NaN).
  """
  a = jnp.abs(x)
  return jnp.max(jnp.where(jnp.isfinite(a), a, jnp.zeros_like(a))).astype(jnp.float32)
