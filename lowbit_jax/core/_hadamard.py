"""Hadamard matrices of many orders and their fast transform.

A Hadamard matrix ``H`` of order n has entries +-1 and ``H H^T = n I``; scaled
by ``1/sqrt(n)`` it is orthogonal. Sylvester's construction gives every power of
two; Paley's constructions (R. E. A. C. Paley, "On orthogonal matrices", J. Math.
Phys. 1933) give order ``q + 1`` for a prime power ``q = 3 mod 4`` (type I) and
``2 (q + 1)`` for a prime power ``q = 1 mod 4`` (type II), e.g. 12, 20, 28, 44,
and through the fields GF(p^k) 52, 100 and 344 (11008, Llama-2-7B's MLP width,
is 344 * 32). An
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


def _prime_power(q: int):
  """``(p, k)`` with ``q = p^k``, p prime and k >= 1, or None."""
  if q < 2:
    return None
  p = next(d for d in range(2, q + 1) if q % d == 0)
  k = 0
  while q % p == 0:
    q //= p
    k += 1
  return (p, k) if q == 1 else None


def _poly_mod(a: list, f: list, p: int) -> list:
  """``a mod f`` over GF(p); coefficient lists lowest degree first, f monic."""
  a = list(a)
  while len(a) >= len(f):
    c = a[-1]
    if c:
      for i in range(len(f)):
        a[len(a) - len(f) + i] = (a[len(a) - len(f) + i] - c * f[i]) % p
    a.pop()
  return a


def _irreducible(p: int, k: int) -> list:
  """A monic irreducible polynomial of degree k over GF(p) (lowest degree first):
  the first one with no monic factor of degree 1..k/2."""
  def polys(d):
    for n in range(p ** d):
      yield [(n // p ** i) % p for i in range(d)] + [1]
  for f in polys(k):
    if f[0] and not any(not any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1)
                        for g in polys(d)):
      return f
  raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _quadratic_character(q: int) -> tuple:
  """``(chi, sub)`` of GF(q), q an odd prime power, its elements numbered by
  their base-p digits (coefficients of polynomials modulo an irreducible one):
  ``chi[a]`` is 0, 1 or -1 as a is zero, a nonzero square or not a square, and
  ``sub[i, j]`` is the number of ``j - i``."""
  p, k = _prime_power(q)
  digits = np.array([[(n // p ** i) % p for i in range(k)] for n in range(q)], np.int64)
  weights = p ** np.arange(k, dtype=np.int64)
  if k == 1:
    squares = np.unique(np.arange(1, q, dtype=np.int64) ** 2 % q)
  else:
    f = _irreducible(p, k)
    sq = set()
    for row in digits[1:]:
      prod = [0] * (2 * k - 1)
      for i in range(k):
        for j in range(k):
          prod[i + j] += int(row[i]) * int(row[j])
      r = _poly_mod([c % p for c in prod], f, p) + [0] * k
      sq.add(int(np.dot(r[:k], weights)))
    squares = np.array(sorted(sq), np.int64)
  chi = -np.ones(q, np.int8)
  chi[0] = 0
  chi[squares] = 1
  sub = ((digits[None, :, :] - digits[:, None, :]) % p) @ weights
  return chi, sub


def _jacobsthal(q: int) -> np.ndarray:
  """``Q[i, j] = chi(j - i)``, chi the quadratic character of GF(q)."""
  chi, sub = _quadratic_character(q)
  return chi[sub]


def _paley_q(order: int):
  """``(type, q)`` of the Paley construction that reaches ``order``, or None."""
  pk = _prime_power(order - 1)
  if pk and pk[0] > 2 and (order - 1) % 4 == 3:
    return "I", order - 1
  if order % 2 == 0:
    pk = _prime_power(order // 2 - 1)
    if pk and pk[0] > 2 and (order // 2 - 1) % 4 == 1:
      return "II", order // 2 - 1
  return None


@functools.lru_cache(maxsize=None)
def _paley(order: int):
  """An unnormalized +-1 Hadamard matrix of ``order`` by Paley's I or II
  (read-only int8, cached), or None."""
  kind = _paley_q(order)
  if kind is None:
    return None
  kind, q = kind
  if kind == "I":
    s = np.zeros((order, order), np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    h = np.eye(order, dtype=np.int8) + s
  else:
    c = np.zeros((q + 1, q + 1), np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    h = (np.kron(c, np.array([[1, 1], [1, -1]], np.int8))
         + np.kron(np.eye(q + 1, dtype=np.int8), np.array([[1, -1], [-1, -1]], np.int8)))
  h.setflags(write=False)
  return h


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
    if _paley_q(b) is not None:
      return b, n // b
    c += 1
  raise ValueError(
      f"no Hadamard matrix of order {n} is constructed here: orders are 2^k and "
      "b * 2^k for b a Paley order (q + 1, q a prime power = 3 mod 4; 2 (q + 1), "
      "q a prime power = 1 mod 4), e.g. 12, 20, 28, 44, 52, 100, 344. Pad the "
      "dimension to such an order, or use a random orthogonal rotation "
      "(lowbit_jax.algorithms.random_orthogonal)")


@functools.lru_cache(maxsize=None)
def _unnormalized(n: int) -> np.ndarray:
  b, p = hadamard_factors(n)
  sp = _sylvester(p)
  return sp if b == 1 else np.kron(_paley(b).astype(np.int64), sp)


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
