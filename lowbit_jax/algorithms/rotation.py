"""Randomized Hadamard rotations that spread outliers before quantization.

Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler & Hensman,
"QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024; and Liu et
al., "SpinQuant: LLM Quantization with Learned Rotations", 2024 (which learns the
rotation; here it is random). The randomized Hadamard transform is from Ailon &
Chazelle 2006 and was used for quantization by Chee et al. 2023 ("QuIP").

An orthogonal ``R`` leaves a linear layer unchanged,
``x @ w == (x @ R) @ (R^T @ w)``, while spreading the energy of a few outlier
channels over all of them, so that per-token activation scales and per-group
weight scales fit the bulk of the values. ``R`` is a Walsh-Hadamard matrix
(Sylvester's construction, normalized) with random signs on its rows. For a
dimension ``n = 2^a * m`` with odd ``m > 1`` there is no Sylvester Hadamard; the
rotation is then ``H_{2^a} kron Q_m`` with ``Q_m`` a random orthogonal ``m x m``
block (Haar, from a QR decomposition), still with random signs; for odd ``n``
it is a plain random orthogonal matrix. ``block_size`` builds a block-diagonal
rotation (one independent rotation per block), which keeps channels within a
block, e.g. within an attention head.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.algorithms.rtn import check_kernel

Kernels = Union[jax.Array, Sequence[jax.Array]]


def _pow2_part(n: int) -> int:
  return n & -n


def hadamard_matrix(n: int) -> np.ndarray:
  """The normalized Sylvester Walsh-Hadamard matrix ``H_n`` (``H H^T = I``).

  Args:
    n: a power of two.

  Returns:
    float32 ``[n, n]`` numpy array with entries ``+-1/sqrt(n)``; symmetric.

  Raises:
    ValueError: n is not a positive power of two.
  """
  if not isinstance(n, int) or n < 1 or n & (n - 1):
    raise ValueError(f"a Walsh-Hadamard matrix needs a power-of-two size, got {n!r}; "
                     "use random_hadamard for other sizes")
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / math.sqrt(n)).astype(np.float32)


def walsh_hadamard_transform(x: jax.Array) -> jax.Array:
  """``x @ H_n`` over the last axis in O(n log n) (fast Walsh-Hadamard transform).

  Args:
    x: float array whose last axis has a power-of-two length n.

  Returns:
    ``x @ hadamard_matrix(n)`` (x's shape and dtype).

  Raises:
    ValueError: the last axis is not a power of two.
  """
  x = jnp.asarray(x)
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f"the last axis must be a power of two, got {n}")
  lead = x.shape[:-1]
  y = x.astype(jnp.float32)
  h = 1
  while h < n:
    y = y.reshape(lead + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return (y.reshape(lead + (n,)) / np.float32(math.sqrt(n))).astype(x.dtype)


def random_orthogonal(key: jax.Array, n: int) -> jax.Array:
  """A Haar-random orthogonal ``[n, n]`` float32 matrix (QR of a Gaussian).

  Args:
    key: PRNG key.
    n: the size.

  Returns:
    ``Q`` with ``Q Q^T = I``.
  """
  g = jax.random.normal(key, (n, n), jnp.float32)
  q, r = jnp.linalg.qr(g)
  return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]


def _one_block(key: jax.Array, n: int) -> jax.Array:
  k_sign, k_orth = jax.random.split(key)
  p = _pow2_part(n)
  m = n // p
  h = jnp.asarray(hadamard_matrix(p))
  if m > 1:
    h = jnp.kron(h, random_orthogonal(k_orth, m))
  signs = jax.random.rademacher(k_sign, (n,), jnp.float32)
  return signs[:, None] * h


def random_hadamard(key: jax.Array, n: int, *,
                    block_size: Optional[int] = None) -> jax.Array:
  """A randomized Hadamard rotation ``R = diag(+-1) H`` (QuaRot, Ashkboos et al. 2024).

  Args:
    key: PRNG key (signs, and the orthogonal factor when n is not a power of
      two).
    n: the dimension.
    block_size: if given, a block-diagonal rotation of independent
      ``block_size x block_size`` blocks (must divide n).

  Returns:
    float32 orthogonal ``[n, n]``: rotate with ``x @ R`` and ``R.T @ w``.

  Raises:
    ValueError: n < 1 or block_size does not divide n.
  """
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}")
  if block_size is None:
    return _one_block(key, n)
  if not isinstance(block_size, int) or block_size < 1 or n % block_size:
    raise ValueError(f"block_size must be a positive divisor of n={n}, got "
                     f"{block_size!r}")
  keys = jax.random.split(key, n // block_size)
  blocks = [_one_block(k, block_size) for k in keys]
  return jax.scipy.linalg.block_diag(*blocks)


def rotate_weights(weights: Kernels, r: jax.Array) -> tuple:
  """``R^T w`` for each kernel ``[K, N]`` (the inputs become ``x @ R``).

  Args:
    weights: a kernel or several sharing the input.
    r: orthogonal ``[K, K]``.

  Returns:
    A tuple of rotated kernels (dtypes kept).

  Raises:
    ValueError: shapes disagree.
  """
  ws = weights if isinstance(weights, (list, tuple)) else (weights,)
  out = []
  for i, w in enumerate(ws):
    w = check_kernel(w, f"weights[{i}]")
    if r.shape != (w.shape[0], w.shape[0]):
      raise ValueError(f"rotation shape {r.shape} does not match the kernel's "
                       f"{w.shape[0]} input features")
    out.append(jnp.matmul(r.T, w.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST).astype(w.dtype))
  return tuple(out)


def rotate_inputs(x: jax.Array, r: jax.Array) -> jax.Array:
  """``x @ R`` over the last axis (x's dtype kept)."""
  x = jnp.asarray(x)
  return jnp.matmul(x.astype(jnp.float32), r,
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
