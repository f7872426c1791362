"""Mixed precision: choose a number format per layer under a bits-per-weight budget.

Given an additive cost per layer and candidate format (e.g. the layer's output
squared error, or the increase of the loss, when only that layer is quantized
with that format) and each candidate's storage bits per weight, pick one
candidate per layer minimizing the total cost subject to

    sum_l size_l * bits_l(choice_l) <= budget * sum_l size_l.

This is a multiple-choice knapsack. ``method="dp"`` solves it exactly by dynamic
programming over the integerized bit budget (as in HAQ-style and HAWQ-V3
bit allocation: Wang et al. 2019, "HAQ"; Yao et al. 2021, "HAWQ-V3", which
solves the same problem as an integer program); ``method="greedy"`` upgrades
the layer with the best cost decrease per extra bit until the budget is spent
(the marginal-benefit rule of e.g. Dong et al. 2019, "HAWQ"). The result turns
into QuantRules-like data with ``assignment_to_rules``.
"""
from __future__ import annotations

import fractions
import functools
import math
import re
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.algorithms.rtn import SpecLike, check_kernel, hessian_error_parts, kernel_spec
from lowbit_jax.core import fake_quant

Bits = Union[Mapping[str, float], Mapping[str, Mapping[str, float]]]
METHODS = ("auto", "dp", "greedy")


class Allocation(NamedTuple):
  """What ``allocate_bits`` returns.

  Attributes:
    assignment: layer -> chosen candidate name (in the input order of layers).
    avg_bits: the resulting average bits per weight.
    cost: the total cost of the assignment.
  """
  assignment: dict
  avg_bits: float
  cost: float


def spec_bits(spec: Optional[SpecLike], shape: Sequence[int],
              float_bits: float = 16.0) -> float:
  """Storage bits per weight of a ``[K, N]`` kernel under ``spec``, scales included.

  Args:
    spec: a weight spec (unset axis: K), or None for a kernel kept in float.
    shape: the kernel's shape.
    float_bits: bits per weight of a kernel kept in float.

  Returns:
    Bits per element.
  """
  if spec is None:
    return float(float_bits)
  return float(kernel_spec(spec).bits_per_element(tuple(shape)))


def weight_sensitivity(w: jax.Array, hessian: jax.Array,
                       candidates: Mapping[str, Optional[SpecLike]], *,
                       tensor_amax=None) -> dict:
  """Output squared error ``trace(E^T H E)`` of RTN with each candidate format.

  Args:
    w: float kernel ``[K, N]`` (a conv's: ``kernel.reshape(-1, cout)``, with
      the Gram matrix of its im2col patches from ``capture_dense_stats``).
    hessian: ``[K, K]`` Gram matrix ``X^T X`` of its calibration inputs.
    candidates: name -> weight spec (None: keep float, cost 0).
    tensor_amax: the tensor range of candidates with a tensor scale (NVFP4)
      when ``w`` is part of a larger tensor, e.g. one expert of a stack that
      is quantized as one tensor; None takes ``w``'s own. Other candidates
      ignore it.

  Returns:
    name -> float cost.
  """
  w = check_kernel(w)
  out = {}
  for name, spec in candidates.items():
    if spec is None:
      out[name] = 0.0
    else:
      spec = kernel_spec(spec)
      t = tensor_amax if spec.tensor_scale else None
      # (in parts, multiplied in float64: weights near 1e20 overflowed the
      # float32 error to inf or NaN)
      val, e_max, h_max = _rtn_error(w, jnp.asarray(hessian), t, spec=spec)
      out[name] = float(val) * float(e_max) ** 2 * float(h_max)
  return out


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn_error(w, hessian, tensor_amax, *, spec):
  return hessian_error_parts(hessian, w, fake_quant(w, spec, tensor_amax=tensor_amax))


def _table(costs, sizes, bits):
  layers = list(costs)
  if not layers:
    raise ValueError("costs is empty: give at least one layer")
  missing = [l for l in layers if l not in sizes]
  if missing:
    raise ValueError(f"sizes lacks layers {missing[:5]}")
  names, c_rows, w_rows = [], [], []
  for l in layers:
    cands = list(costs[l])
    if not cands:
      raise ValueError(f"layer {l!r} has no candidates")
    size = sizes[l]
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"sizes[{l!r}] must be a positive int, got {size!r}")
    row_bits = bits[l] if isinstance(bits.get(l), Mapping) else bits
    for c in cands:
      if c not in row_bits:
        raise ValueError(f"no bits given for candidate {c!r} (layer {l!r})")
    names.append(cands)
    row = [float(costs[l][c]) for c in cands]
    bad = [c for c, v in zip(cands, row) if math.isnan(v) or v == -math.inf]
    if bad:
      raise ValueError(f"layer {l!r}: the cost of {bad} is NaN or -inf (a weight "
                       "or Hessian that is not finite?); costs are finite, or "
                       "+inf to forbid a candidate")
    if all(v == math.inf for v in row):
      raise ValueError(f"layer {l!r}: every candidate costs +inf (forbidden); "
                       "allow at least one")
    c_rows.append(row)
    w_rows.append([float(row_bits[c]) * int(size) for c in cands])
  return layers, names, c_rows, w_rows


def _integerize(w_rows, capacity: float, max_states: int):
  """``(integer weights, capacity, exact)``: exact when a small rational
  scaling exists, else weights rounded up to ``capacity / max_states`` units
  (every integer solution then fits the real budget, but some real solutions
  no longer fit)."""
  flat = [v for row in w_rows for v in row]
  fr = [fractions.Fraction(v).limit_denominator(1 << 16) for v in flat]
  if all(abs(float(f) - v) <= 1e-9 * max(1.0, abs(v)) for f, v in zip(fr, flat)):
    den = math.lcm(*[f.denominator for f in fr])
    ints = [int(f * den) for f in fr]
    g = math.gcd(*ints) or 1
    cap = math.floor(capacity * den / g * (1 + 1e-12))
    if cap <= max_states:
      it = iter(v // g for v in ints)
      return [[next(it) for _ in row] for row in w_rows], cap, True
  unit = capacity / max_states
  return [[math.ceil(v / unit) for v in row] for row in w_rows], max_states, False


def _dp(c_rows, wi, cap):
  n_layers = len(c_rows)
  dp = np.zeros(cap + 1, np.float64)
  choice = np.zeros((n_layers, cap + 1), np.int16)
  for l in range(n_layers):
    best = np.full(cap + 1, np.inf)
    arg = np.zeros(cap + 1, np.int16)
    for j, (c, w) in enumerate(zip(c_rows[l], wi[l])):
      if w > cap:
        continue
      cand = np.full(cap + 1, np.inf)
      cand[w:] = dp[:cap + 1 - w] + c
      better = cand < best
      best = np.where(better, cand, best)
      arg = np.where(better, j, arg)
    dp, choice[l] = best, arg
  if not np.isfinite(dp[cap]):
    return None
  picks, c = [], cap
  for l in range(n_layers - 1, -1, -1):
    j = int(choice[l, c])
    picks.append(j)
    c -= wi[l][j]
  return picks[::-1]


def _greedy(c_rows, w_rows, capacity):
  picks = [int(np.argmin(w)) for w in w_rows]
  used = sum(w[j] for w, j in zip(w_rows, picks))
  if used > capacity * (1 + 1e-12):
    return None
  while True:
    best, best_move = 0.0, None
    for l, (cs, ws) in enumerate(zip(c_rows, w_rows)):
      j0 = picks[l]
      for j, (c, w) in enumerate(zip(cs, ws)):
        gain, extra = cs[j0] - c, w - ws[j0]
        # (not gain > 0: a NaN gain, of inf - inf, is no move; it was, to the
        # same pick, forever)
        if j == j0 or not gain > 0 or used + extra > capacity * (1 + 1e-12):
          continue
        ratio = gain / extra if extra > 0 else math.inf
        if ratio > best:
          best, best_move = ratio, (l, j, extra)
    if best_move is None:
      return picks
    l, j, extra = best_move
    picks[l] = j
    used += extra


def allocate_bits(costs: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int],
                  bits: Bits, budget: float, *, method: str = "auto",
                  max_states: int = 200_000) -> Allocation:
  """Chooses one candidate format per layer under an average bits-per-weight budget.

  Args:
    costs: layer -> candidate name -> additive cost (lower is better), e.g.
      from ``weight_sensitivity``.
    sizes: layer -> number of weights.
    bits: candidate -> bits per weight, or layer -> candidate -> bits per
      weight (scale overhead depends on the shape; see ``spec_bits``).
    budget: the largest allowed average bits per weight.
    method: "dp" (multiple-choice knapsack by dynamic programming: exact
      when the bit budget integerizes into at most ``max_states`` units;
      otherwise weights are rounded up to ``budget_total / max_states``
      units, which never exceeds the budget but can miss the optimum by up
      to one unit per layer, and the cheaper of that and greedy's answer is
      returned), "greedy" (best cost decrease per extra bit first) or
      "auto" (dp up to 512 layers, else greedy). Whatever the method, when
      every layer's lowest-cost candidate fits the budget together, that
      assignment is returned.
    max_states: size of the dynamic program's budget axis.

  Returns:
    ``Allocation(assignment, avg_bits, cost)``.

  Raises:
    ValueError: no assignment fits the budget, the tables are inconsistent, or
      a cost is NaN or -inf (+inf forbids a candidate).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  layers, names, c_rows, w_rows = _table(costs, sizes, bits)
  try:
    b = float(budget)
  except (TypeError, ValueError):
    b = math.nan
  if math.isnan(b) or b <= 0:
    raise ValueError(f"budget must be a positive number of bits per weight, got "
                     f"{budget!r}")
  total = float(sum(int(sizes[l]) for l in layers))
  # Above the dearest assignment every choice fits: cap there (an inf budget
  # means no constraint, and the DP's budget axis stays finite).
  capacity = min(b * total, float(sum(max(w) for w in w_rows)))
  cheapest = sum(min(w) for w in w_rows)
  if cheapest > capacity * (1 + 1e-12):
    raise ValueError(f"budget {budget} bits/weight is below the cheapest assignment "
                     f"({cheapest / total:.4f} bits/weight); raise the budget or add "
                     "a cheaper candidate")
  if method == "auto":
    method = "dp" if len(layers) <= 512 else "greedy"
  # Each layer's lowest-cost choice (the fewest bits among ties): when
  # that fits, it is the optimum whatever the method.
  best = [min(range(len(cs)), key=lambda j, cs=cs, ws=ws: (cs[j], ws[j]))
          for cs, ws in zip(c_rows, w_rows)]
  if sum(w_rows[i][j] for i, j in enumerate(best)) <= capacity * (1 + 1e-12):
    picks = best
  elif method == "dp":
    wi, cap, exact = _integerize(w_rows, capacity, max_states)
    picks = _dp(c_rows, wi, cap)
    if not exact:
      # The rounded-up weights can exclude real solutions (one unit lost per
      # layer at most), so greedy's answer, which fits the real budget, may
      # be better: keep the cheaper of the two.
      alt = _greedy(c_rows, w_rows, capacity)
      if picks is None or (alt is not None and sum(
          c_rows[i][j] for i, j in enumerate(alt)) < sum(
              c_rows[i][j] for i, j in enumerate(picks))):
        picks = alt
  else:
    picks = _greedy(c_rows, w_rows, capacity)
  if picks is None or any(c_rows[i][j] == math.inf for i, j in enumerate(picks)):
    raise ValueError(f"no assignment of finite cost fits the budget of {budget} "
                     "bits/weight (the candidates that fit are forbidden, +inf); "
                     "raise the budget or allow a cheaper candidate")
  assignment = {l: names[i][j] for i, (l, j) in enumerate(zip(layers, picks))}
  used = sum(w_rows[i][j] for i, j in enumerate(picks))
  cost = sum(c_rows[i][j] for i, j in enumerate(picks))
  return Allocation(assignment, used / total, float(cost))


def assignment_to_rules(assignment: Mapping[str, str],
                        specs: Mapping[str, Optional[SpecLike]], *,
                        activation: Optional[SpecLike] = None) -> list:
  """Turns a per-layer choice into ordered ``QuantRule`` s for any front end.

  Each rule's regex matches one layer's path exactly (``re.escape``; a rule
  matches a layer's path or its kernel's), so the list works unchanged with
  ``quantize_linen``, ``quantize_nnx``, ``quantize_function`` and
  ``apply_ptq``. A candidate whose spec is None gives a float rule (that
  layer stays float). An unset weight axis means the contraction axis, as in
  every rule.

  Args:
    assignment: layer path -> candidate name (``Allocation.assignment``).
    specs: candidate name -> QuantSpec / format name / None.
    activation: an activation spec for every quantized layer (None:
      weight-only).

  Returns:
    A list of ``QuantRule``.

  Raises:
    ValueError: a chosen candidate has no spec.
  """
  from lowbit_jax._rules import QuantRule  # pylint: disable=g-import-not-at-top
  rules = []
  for layer, cand in assignment.items():
    if cand not in specs:
      raise ValueError(f"candidate {cand!r} (layer {layer!r}) is not in specs")
    s = specs[cand]
    rules.append(QuantRule(re.escape(layer), weight=s,
                           activation=None if s is None else activation))
  return rules


def _rule_pairs(rules) -> list:
  """``[(matches(path) -> bool, spec or None)]`` of QuantRules or (regex, spec) pairs."""
  from lowbit_jax._rules import QuantRule  # pylint: disable=g-import-not-at-top
  out = []
  for r in rules:
    if isinstance(r, QuantRule):
      out.append((lambda p, r=r: r.matches(p) or r.matches(p + "/kernel"), r.weight))
    else:
      regex, spec = r
      out.append((lambda p, regex=regex: re.fullmatch(regex, p) is not None, spec))
  return out


def rules_bits(rules: Sequence[tuple], shapes: Mapping[str, Sequence[int]],
               float_bits: float = 16.0) -> float:
  """Average bits per weight that ``(regex, spec)`` rules give a set of kernels.

  The first rule whose regex fully matches a path wins; unmatched kernels count
  as float.

  Args:
    rules: QuantRules (``assignment_to_rules``) or ``[(regex, spec or None)]``.
    shapes: layer path -> the shape of its ``[K, N]`` matrix (an expert stack
      ``[G, K, N]`` with its experts: its matrices are the last two axes; a
      conv's ``[kh * kw * cin, cout]``), as ``mixed_precision_rules`` counts.
    float_bits: bits per weight of a float kernel.

  Returns:
    The weighted average bits per weight.

  Raises:
    ValueError: a shape of another rank (its matrix axes are ambiguous).
  """
  tot_bits = tot = 0.0
  for path, shape in shapes.items():
    if len(shape) == 3:   # an expert stack: G matrices [K, N]
      n = float(np.prod(shape))
      spec = next((s for m, s in _rule_pairs(rules) if m(path)), None)
      spec = None if spec is None else kernel_spec(spec)
      tot_bits += n * spec_bits(spec, tuple(shape)[-2:], float_bits)
      tot += n
      continue
    if len(shape) != 2:
      raise ValueError(f"{path}: shape {tuple(shape)} is not a [K, N] matrix (or "
                       "a [G, K, N] expert stack); give its matrix view, e.g. a "
                       "conv's [kh * kw * cin, cout]")
    spec = next((s for m, s in _rule_pairs(rules) if m(path)), None)
    spec = None if spec is None else kernel_spec(spec)
    n = float(np.prod(shape))
    tot_bits += n * spec_bits(spec, shape, float_bits)
    tot += n
  return tot_bits / tot
