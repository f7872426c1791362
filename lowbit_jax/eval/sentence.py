"""Sentence-encoder quality under quantization: how far embeddings moved."""
from __future__ import annotations

import numpy as np

from lowbit_jax.algorithms.rtn import sqnr_db  # noqa: F401  (re-exported)


def _rank(a: np.ndarray) -> np.ndarray:
  """Ranks with ties averaged (as Spearman's rho needs), float64."""
  order = np.argsort(a, kind="mergesort")
  ranks = np.empty(len(a), np.float64)
  sorted_a = a[order]
  # Average ranks over runs of equal values.
  # (Compared, not subtracted: inf - inf is NaN, which would split a tie.)
  boundaries = np.flatnonzero(sorted_a[1:] != sorted_a[:-1]) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(a)]])
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = 0.5 * (s + e - 1)
  return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation of two 1-d samples (NaN if either holds a NaN)."""
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  if a.shape != b.shape or a.size < 2:
    raise ValueError(f"spearman needs two samples of equal length >= 2, got "
                     f"{a.shape} and {b.shape}")
  if np.isnan(a).any() or np.isnan(b).any():   # NaN has no rank
    return float("nan")
  ra, rb = _rank(a), _rank(b)
  ra -= ra.mean()
  rb -= rb.mean()
  den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
  return float((ra * rb).sum() / den) if den > 0 else float("nan")


def embedding_metrics(ref: np.ndarray, quant: np.ndarray) -> dict:
  """Compares quantized embeddings with the float32 reference.

  Args:
    ref: [N, D] reference embeddings.
    quant: [N, D] embeddings of the quantized model, same sentences.

  Returns:
    dict with ``mean_cos`` and ``worst_cos`` (cosine similarity of each
    sentence's quantized vs reference embedding) and ``spearman`` (rank
    correlation of the two pairwise cosine-similarity matrices' upper
    triangles: does the quantized model still order sentence pairs the same).

  Raises:
    ValueError: shapes differ or fewer than 3 sentences.
  """
  ref = np.asarray(ref, np.float64)
  quant = np.asarray(quant, np.float64)
  if ref.shape != quant.shape or ref.ndim != 2 or ref.shape[0] < 3:
    raise ValueError(f"need two [N >= 3, D] arrays of one shape, got {ref.shape} "
                     f"and {quant.shape}")
  def unit(x):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1, n)
  r, q = unit(ref), unit(quant)
  cos = np.sum(r * q, axis=1)
  iu = np.triu_indices(len(r), k=1)
  sim_r = (r @ r.T)[iu]
  sim_q = (q @ q.T)[iu]
  return {"mean_cos": float(cos.mean()), "worst_cos": float(cos.min()),
          "spearman": spearman(sim_r, sim_q)}
