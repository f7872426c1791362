"""Embedding metrics against straightforward numpy definitions."""
import numpy as np
import pytest

from lowbit_jax.eval import sentence


def test_spearman_matches_pearson_of_ranks_with_ties():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 5, 200).astype(float)  # many ties
  b = a + rng.normal(0, 1, 200)
  def ranks(x):
    return np.array([np.mean(np.flatnonzero(np.sort(x) == v)) for v in x])
  want = np.corrcoef(ranks(a), ranks(b))[0, 1]
  assert sentence.spearman(a, b) == pytest.approx(want, abs=1e-12)


def test_embedding_metrics_identity_and_noise():
  rng = np.random.default_rng(1)
  e = rng.normal(size=(50, 16))
  m = sentence.embedding_metrics(e, e)
  assert m["mean_cos"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
  noisy = e + rng.normal(0, 0.5, e.shape)
  m2 = sentence.embedding_metrics(e, noisy)
  assert m2["worst_cos"] < m2["mean_cos"] < 1.0
  assert 0 < m2["spearman"] < 1.0


def test_sqnr_db():
  x = np.ones(100)
  assert sentence.sqnr_db(x, x * 1.1) == pytest.approx(20.0)
  assert sentence.sqnr_db(x, x) == float("inf")
  assert sentence.sqnr_db(np.zeros(3), np.ones(3)) == float("-inf")
  assert np.isnan(sentence.sqnr_db(x, np.where(np.arange(100) == 3, np.nan, x)))
  # No broadcasting: identical values in another shape are an error, not 0.7 dB.
  with pytest.raises(ValueError, match=r"one shape, got \(3, 1\) and \(3,\)"):
    sentence.sqnr_db(x[:3, None], x[:3])
  with pytest.raises(ValueError, match="empty"):
    sentence.sqnr_db(np.zeros(0), np.zeros(0))


def test_a_nan_sample_has_no_spearman():
  # NaN has no rank: a NaN model must not get a good-looking correlation.
  assert np.isnan(sentence.spearman([1, np.nan, 3, 4], [1, 2, 3, 4]))
  e = np.random.default_rng(0).normal(size=(5, 4))
  m = sentence.embedding_metrics(e, np.where(np.arange(5)[:, None] == 2, np.nan, e))
  assert np.isnan(m["spearman"]) and np.isnan(m["mean_cos"])


def test_bad_shapes():
  with pytest.raises(ValueError, match="same|one shape"):
    sentence.embedding_metrics(np.zeros((4, 3)), np.zeros((5, 3)))


def test_tied_infinities_share_their_rank():
  # inf - inf is NaN, which split the tie: -0.5 instead of scipy's -0.866.
  got = sentence.spearman(np.array([np.inf, np.inf, 1.0]), np.array([1.0, 2.0, 3.0]))
  want = sentence.spearman(np.array([1e300, 1e300, 1.0]), np.array([1.0, 2.0, 3.0]))
  assert got == pytest.approx(want) and got == pytest.approx(-0.8660254)
