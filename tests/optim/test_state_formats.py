"""The optimizer-state codebooks: Dettmers' dynamic maps and Li et al.'s 4-bit maps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import formats as F
from lowbit_jax.core._qarray import unpack

NAMES = ["dynamic8", "dynamic8_unsigned", "dynamic4", "dynamic4_unsigned",
         "linear4_unsigned"]


def _tree_code_value(code: int, bits: int, signed: bool) -> float:
  """Decodes one dynamic tree code from its bit layout (Dettmers et al. 2022):
  [sign] zeros (decimal exponent) | indicator 1 | linear fraction bits."""
  n = bits - 1
  sign = 1.0
  body_bits = n if signed else bits
  if signed and code >> n & 1:
    sign = -1.0
  body = code & ((1 << body_bits) - 1)
  e = 0
  while e < body_bits and not body >> (body_bits - 1 - e) & 1:
    e += 1
  if not signed:
    e_max = n - 1  # the unsigned map keeps the signed map's decades
    if e > e_max:
      return None  # the all-zero code: zero
  elif e == body_bits:
    return None
  f = body_bits - 1 - e
  frac = body & ((1 << f) - 1)
  return sign * 10.0 ** -e * (0.1 + 0.9 * (frac + 0.5) / (1 << f))


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_dynamic_maps_follow_the_tree_bit_layout(bits, signed):
  vals = set()
  for code in range(1 << bits):
    v = _tree_code_value(code, bits, signed)
    if v is not None:
      vals.add(round(v, 15))
  name = f"dynamic{bits}" + ("" if signed else "_unsigned")
  table = F.get(name).table
  # The layout's values, +1.0, and zero for the signed map only (the unsigned
  # maps hold Adam's second moment, which must never code as 0).
  want = sorted(vals | {1.0} | ({0.0} if signed else set()))
  np.testing.assert_allclose(table, want, rtol=1e-12, atol=0)
  assert len(table) == (1 << bits) - (0 if signed else 1)
  assert (0.0 in table) == signed and max(table) == 1.0
  # Each decade holds half the codes of the one above it (7 decades at 8 bits).
  pos = np.asarray([t for t in table if t > 0 and t < 1.0])
  counts = [int(np.sum((pos >= 0.1 * 10.0 ** -e) & (pos < 10.0 ** -e)))
            for e in range(bits - 1)]
  top = (1 << (bits - 2)) * (1 if signed else 2)
  assert counts == [top >> e for e in range(bits - 1)]


def test_linear4_unsigned_is_zero_point_free():
  t = F.get("linear4_unsigned").table
  assert t == tuple((i + 1) / 16 for i in range(16))


def test_codebooks_round_trip_bit_exactly():
  fmts = [F.get(n) for n in NAMES]
  tables = [np.asarray(f.table, np.float32) for f in fmts]
  specs = [lb.QuantSpec(f, axis=0, group_size=len(t)) for f, t in zip(fmts, tables)]
  # Through quantize too for an 8-bit map and a 4-bit one of odd length (the
  # others share the code path; tests/core quantizes every registered format).
  through_q = {"dynamic8", "dynamic4_unsigned"}
  # A block whose absmax is 2**-3 codes every table value times 2**-3 exactly.
  xs = [jnp.asarray(np.tile(t, 3) * np.float32(2.0 ** -3)) for t in tables]

  @jax.jit  # one compilation for every format
  def run(xs):
    out = []
    for f, spec, x in zip(fmts, specs, xs):
      codes = jnp.arange(len(f.table), dtype=jnp.uint32)
      vals = lb.core.decode(codes, f)
      q = lb.quantize(x, spec) if f.name in through_q else None
      out.append((vals, lb.core.encode(vals, f), lb.cast(vals, f), q,
                  None if q is None else lb.dequantize(q),
                  None if q is None else unpack(q.codes, f, 0)[:x.size]))
    return out

  for name, f, table, x, (vals, codes, cast, q, y, got) in zip(
      NAMES, fmts, tables, xs, run(xs)):
    assert np.all(np.diff(table) > 0), name  # distinct in float32
    np.testing.assert_array_equal(np.asarray(vals), table, err_msg=name)
    np.testing.assert_array_equal(np.asarray(codes), np.arange(len(table)),
                                  err_msg=name)
    np.testing.assert_array_equal(np.asarray(cast), table, err_msg=name)
    if q is None:
      continue
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=name)
    np.testing.assert_array_equal(np.asarray(got), np.tile(np.arange(len(table)), 3),
                                  err_msg=name)
    assert q.codes.dtype == jnp.uint8
    assert q.codes.size == -(-x.size * f.bits // 8), name  # 4 bits: two codes a byte
