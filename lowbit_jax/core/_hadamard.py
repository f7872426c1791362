"""Hadamard matrices of many orders and their fast transform.

A Hadamard matrix ``H`` of order n has entries +-1 and ``H H^T = n I``; scaled
by ``1/sqrt(n)`` it is orthogonal. Sylvester's construction gives every power of
two; Paley's constructions (R. E. A. C. Paley, "On orthogonal matrices", J. Math.
Phys. 1933) give order ``q + 1`` for a prime ``q = 3 mod 4`` (type I) and
``2 (q + 1)`` for a prime ``q = 1 mod 4`` (type II), e.g. 12, 20, 28, 44. An
order ``n = b * 2^k`` is the Kronecker product ``H_b kron H_{2^k}``, whose
transform costs one Walsh-Hadamard butterfly of ``n log 2^k`` and one small
``b x b`` matmul per row: ``O(n (log n + b))``. QuaRot (Ashkboos et al. 2024,
"QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs") uses such a transform as
the online rotation in front of a quantized matmul.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _is_prime(q: int) -> bool:
  if q < 2:
    return False
  return all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> np.ndarray:
  """``Q[i, j] = chi(j - i)``, chi the quadratic character of GF(q), q prime."""
  squares = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx]


def _paley(order: int):
  """An unnormalized +-1 Hadamard matrix of ``order`` by Paley's I or II, or None."""
  q = order - 1
  if _is_prime(q) and q % 4 == 3:
    s = np.zeros((order, order), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(order, dtype=np.int64) + s
  if order % 2 == 0:
    q = order // 2 - 1
    if _is_prime(q) and q % 4 == 1:
      c = np.zeros((q + 1, q + 1), np.int64)
      c[0, 1:] = 1
      c[1:, 0] = 1
      c[1:, 1:] = _jacobsthal(q)
      return (np.kron(c, np.array([[1, 1], [1, -1]]))
              + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])))
  return None


def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple:
  """``(b, p)`` with ``n = b * p``, p a power of two and ``H_b`` built in code.

  ``b`` is 1 for a power of two, else the smallest ``m * 2^c`` (m the odd part
  of n) that Paley's construction I or II reaches.

  Args:
    n: the order.

  Returns:
    ``(b, p)``.

  Raises:
    ValueError: no Hadamard matrix of order n is constructed here.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"a Hadamard order must be a positive int, got {n!r}")
  p2 = n & -n
  m = n // p2
  if m == 1:
    return 1, n
  c = 1
  while m << c <= n:
    b = m << c
    if _paley(b) is not None:
      return b, n // b
    c += 1
  raise ValueError(
      f"no Hadamard matrix of order {n} is constructed here: orders are 2^k and "
      "b * 2^k for b a Paley order (q + 1, q prime = 3 mod 4; 2 (q + 1), q prime "
      f"= 1 mod 4), e.g. 12, 20, 28, 44. Pad the dimension to such an order, or "
      "use a random orthogonal rotation (lowbit_jax.algorithms.random_orthogonal)")


@functools.lru_cache(maxsize=None)
def _unnormalized(n: int) -> np.ndarray:
  b, p = hadamard_factors(n)
  sp = _sylvester(p)
  return sp if b == 1 else np.kron(_paley(b), sp)


def hadamard(n: int) -> np.ndarray:
  """The normalized Hadamard matrix ``H_n`` (``H H^T = I``) this module builds.

  ``H_b kron H_p`` (see ``hadamard_factors``); symmetric when n is a power of
  two (Sylvester), not in general.

  Args:
    n: the order (2^k or b * 2^k with b a Paley order).

  Returns:
    float32 ``[n, n]`` numpy array with entries ``+-1/sqrt(n)``.

  Raises:
    ValueError: no Hadamard matrix of order n is constructed here.
  """
  return (_unnormalized(n) / math.sqrt(n)).astype(np.float32)


def _fwht_unnormalized(y: jax.Array) -> jax.Array:
  """The Sylvester butterfly over the last axis (power-of-two length), unscaled."""
  lead, n = y.shape[:-1], y.shape[-1]
  h = 1
  while h < n:
    y = y.reshape(lead + (n // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return y.reshape(lead + (n,))


def hadamard_transform(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x @ hadamard(n)`` along ``axis`` in ``O(n (log n + b))`` per vector.

  Computed in float32 (x's dtype kept). ``x @ (A kron B)`` for ``x`` viewed as
  ``[b, p]`` is ``A^T X B``: the butterfly gives ``X B`` (B symmetric), then
  one ``b x b`` contraction.

  Args:
    x: float array.
    axis: the axis to transform; its length must be an order ``hadamard``
      builds.

  Returns:
    The transformed array (x's shape and dtype).

  Raises:
    ValueError: the axis length is not such an order.
  """
  x = jnp.asarray(x)
  ax = axis % x.ndim
  n = x.shape[ax]
  b, p = hadamard_factors(n)
  y = jnp.moveaxis(x, ax, -1).astype(jnp.float32)
  lead = y.shape[:-1]
  y = _fwht_unnormalized(y.reshape(lead + (b, p)))
  if b > 1:
    a = jnp.asarray(_paley(b), jnp.float32)
    y = jnp.einsum("...ip,ik->...kp", y, a, precision=jax.lax.Precision.HIGHEST)
  y = (y.reshape(lead + (n,)) * np.float32(1 / math.sqrt(n))).astype(x.dtype)
  return jnp.moveaxis(y, -1, ax)
