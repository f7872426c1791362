"""Per-layer format choice under a bits-per-weight budget."""
import itertools
import re

import jax
import numpy as np
import pytest

from lowbit_jax import QuantConfig, QuantRule

from lowbit_jax.algorithms import (allocate_bits, assignment_to_rules, gram, rules_bits,
                                   spec_bits, weight_sensitivity)
from lowbit_jax.core import QuantSpec


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
  # Exact-arithmetic checks need full float32 matmuls (GPUs default to TF32).
  with jax.default_matmul_precision("float32"):
    yield


BITS = {"int2": 2.0, "int4": 4.0, "int8": 8.0}


def _table(n_layers=8, seed=0):
  rng = np.random.default_rng(seed)
  sens = 10.0 ** rng.uniform(-2.0, 2.0, n_layers)   # four decades of sensitivity
  costs = {f"l{i}": {"int2": s * 16.0, "int4": s * 1.0, "int8": s * 0.004}
           for i, s in enumerate(sens)}
  sizes = {f"l{i}": int(n) for i, n in enumerate(rng.integers(1, 5, n_layers) * 1000)}
  return costs, sizes


def _bits(assign, sizes):
  return sum(BITS[assign[l]] * sizes[l] for l in sizes) / sum(sizes.values())


def _cost(assign, costs):
  return sum(costs[l][c] for l, c in assign.items())


@pytest.mark.parametrize("method", ["dp", "greedy"])
def test_respects_budget_and_beats_uniform(method):
  costs, sizes = _table()
  uniform = {l: "int4" for l in costs}
  res = allocate_bits(costs, sizes, BITS, 4.0, method=method)
  assert _bits(res.assignment, sizes) <= 4.0 + 1e-12
  np.testing.assert_allclose(res.avg_bits, _bits(res.assignment, sizes))
  np.testing.assert_allclose(res.cost, _cost(res.assignment, costs))
  assert res.cost < 0.8 * _cost(uniform, costs)
  assert set(res.assignment.values()) - {"int4"}     # it really mixes formats


def test_dp_is_optimal():
  costs, sizes = _table(n_layers=6, seed=1)
  for budget in (3.0, 4.0, 5.5):
    best = min((dict(zip(costs, combo)) for combo in
                itertools.product(BITS, repeat=len(costs))
                if _bits(dict(zip(costs, combo)), sizes) <= budget),
               key=lambda a: _cost(a, costs))
    res = allocate_bits(costs, sizes, BITS, budget, method="dp")
    np.testing.assert_allclose(res.cost, _cost(best, costs), rtol=1e-12)
    greedy = allocate_bits(costs, sizes, BITS, budget, method="greedy")
    assert greedy.cost >= res.cost - 1e-12


def test_dp_when_the_bits_do_not_integerize():
  # Scale overheads of 16 / K bits (K = 768, 3072, 50257) leave no small
  # common denominator, so dp rounds weights up; at a budget every layer's
  # best choice fits it must still return that optimum, and below it never
  # lose to greedy.
  shapes = {"head": (768, 50257)} | {f"l{i}": (768 if i % 2 else 3072, 2304)
                                     for i in range(8)}
  sizes = {l: k * n for l, (k, n) in shapes.items()}
  bits = {l: {"int4": 4.125, "int8": 8 + 16 / k} for l, (k, _) in shapes.items()}
  rng = np.random.default_rng(0)
  costs = {l: {"int4": float(rng.uniform(0.5, 2)), "int8": float(rng.uniform(0, .02))}
           for l in shapes}
  total = sum(sizes.values())
  all8 = sum(bits[l]["int8"] * sizes[l] for l in sizes) / total
  for budget in (all8, all8 + 0.5, 16.0):
    for method in ("dp", "greedy", "auto"):
      res = allocate_bits(costs, sizes, bits, budget, method=method)
      assert set(res.assignment.values()) == {"int8"}, (budget, method)
  for budget in (5.0, 6.0, 7.0, 7.9):
    best = min((dict(zip(costs, combo)) for combo in
                itertools.product(("int4", "int8"), repeat=len(costs))
                if sum(bits[l][c] * sizes[l] for l, c in zip(costs, combo))
                <= budget * total), key=lambda a: _cost(a, costs))
    dp = allocate_bits(costs, sizes, bits, budget, method="dp")
    greedy = allocate_bits(costs, sizes, bits, budget, method="greedy")
    assert dp.avg_bits <= budget
    assert _cost(best, costs) <= dp.cost <= greedy.cost + 1e-12
    np.testing.assert_allclose(dp.cost, _cost(best, costs), rtol=1e-9)


def test_infeasible_budget_and_bad_tables():
  costs, sizes = _table()
  with pytest.raises(ValueError, match="below the cheapest"):
    allocate_bits(costs, sizes, BITS, 1.5)
  with pytest.raises(ValueError, match="method"):
    allocate_bits(costs, sizes, BITS, 4.0, method="ilp")
  with pytest.raises(ValueError, match="no bits"):
    allocate_bits(costs, sizes, {"int4": 4.0}, 4.0)
  for bad in (float("nan"), 0.0, -1.0, "four"):
    with pytest.raises(ValueError, match="budget must be a positive number"):
      allocate_bits(costs, sizes, BITS, bad)
  top = max(BITS.values())  # at or above the dearest choice: unconstrained
  for method in ("dp", "greedy"):
    free = allocate_bits(costs, sizes, BITS, float("inf"), method=method)
    assert free == allocate_bits(costs, sizes, BITS, top, method=method)


def test_from_real_sensitivities_to_rules():
  k1, k2 = jax.random.split(jax.random.key(0))
  shapes = {"blk/q": (128, 128), "blk/up": (128, 256), "blk/down": (256, 128)}
  cands = {"int3_g64": QuantSpec("int3", group_size=64),
           "int4_g128": QuantSpec("int4", group_size=128),
           "int8": QuantSpec("int8")}
  costs, bits = {}, {}
  for i, (path, shape) in enumerate(shapes.items()):
    w = jax.random.normal(jax.random.fold_in(k1, i), shape) * (1.0 + 3 * i)
    x = jax.random.normal(jax.random.fold_in(k2, i), (256, shape[0]))
    costs[path] = weight_sensitivity(w, gram(x), cands)
    bits[path] = {c: spec_bits(s, shape) for c, s in cands.items()}
    assert costs[path]["int3_g64"] > costs[path]["int4_g128"] > costs[path]["int8"] > 0
  np.testing.assert_allclose(bits["blk/q"]["int4_g128"], 4.25)
  sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
  res = allocate_bits(costs, sizes, bits, 5.0)
  rules = assignment_to_rules(res.assignment, cands)
  assert [r.path for r in rules] == [re.escape(p) for p in shapes]
  assert all(isinstance(r, QuantRule) and isinstance(r.weight, QuantSpec)
             for r in rules)
  # Every front end takes them: the rules match the kernels of those layers.
  cfg = QuantConfig(rules)
  for p in shapes:
    assert cfg.find((p, p + "/kernel"), ("dot_general",)) is not None
  np.testing.assert_allclose(rules_bits(rules, shapes), res.avg_bits)
  assert res.avg_bits <= 5.0
  # An expert stack [G, K, N] counts its [K, N] matrices (the expert axis was
  # taken for K: int4 g16 counted 12 bits for 6); other ranks are refused.
  for spec, want in ((QuantSpec("int4", group_size=16), 6.0), (QuantSpec("int8"), 9.0),
                     (QuantSpec("mxfp4"), 4.25)):
    np.testing.assert_allclose(rules_bits([("e", spec)], {"e": (4, 32, 64)}), want)
  with pytest.raises(ValueError, match="is not a \\[K, N\\] matrix"):
    rules_bits([("c", QuantSpec("int8"))], {"c": (3, 3, 8, 16)})
