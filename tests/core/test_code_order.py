"""QArray.code_order: 4-bit weights stored in the GPU kernel's register order.

``ops.set_code_order(tree, "wgmma")`` transposes the bytes of every 16-byte
run along K (the order in which the Hopper weight-only kernel's threads load
their WGMMA fragments, tests/kernels for the kernel itself); ``"wgmma_e2m1"``
(E2M1 codes) then permutes the bits of every 32-bit word for the kernel's
rotate-and-mask decode. The values must not change anywhere: dequantize, the
real-mode matmul off the kernel, checkpoints and jit all read any order.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import checkpoint
from lowbit_jax._rules import QWeight, as_qweight
from lowbit_jax.core import ops
from lowbit_jax.core import _qarray
from lowbit_jax.core._qarray import wgmma_byte_order

_SPECS = {
    "int4_pc": lb.QuantSpec("int4"),
    "int4_g128": lb.QuantSpec("int4", group_size=128),
    "fp4_g32": lb.QuantSpec("fp4_e2m1", group_size=32),
    "mxfp4": lb.QuantSpec("mxfp4"),
    "nvfp4": lb.QuantSpec("nvfp4"),
}


def _w(k=256, n=96, seed=0):
  return jax.random.normal(jax.random.key(seed), (k, n), jnp.float32).astype(
      jnp.bfloat16)


def _bits(a):
  return np.asarray(a).reshape(-1).view(np.uint8)


def test_byte_order_is_a_transpose_of_each_16_byte_run():
  codes = jnp.arange(3 * 32, dtype=jnp.uint8).reshape(3, 32)
  p = np.asarray(wgmma_byte_order(codes))
  c = np.asarray(codes)
  for run in (0, 16):
    for q in range(4):
      for i in range(4):
        assert p[1, run + 4 * q + i] == c[1, run + 4 * i + q]
  np.testing.assert_array_equal(np.asarray(wgmma_byte_order(p)), c)


_E2M1 = ("fp4_g32", "mxfp4", "nvfp4")


@pytest.mark.parametrize("name,order", [(n, "wgmma") for n in sorted(_SPECS)]
                         + [(n, "wgmma_e2m1") for n in _E2M1]
                         + [(n, "wgmma_int4") for n in ("int4_pc", "int4_g128")])
def test_values_do_not_change(name, order):
  q = ops.prepare_weight(_w(), _SPECS[name])
  qw = ops.set_code_order(q, order)
  assert qw.code_order == order and q.code_order == "natural"
  assert not np.array_equal(np.asarray(qw.codes), np.asarray(q.codes))
  np.testing.assert_array_equal(_bits(lb.dequantize(qw)), _bits(lb.dequantize(q)))
  back = ops.set_code_order(qw, "natural")
  np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))
  assert back.code_order == "natural"
  # The real-mode matmul off the kernel (CPU) reads either order.
  x = jax.random.normal(jax.random.key(1), (4, 256), jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  want = ops.dot_general(x, q, dn, mode="real")
  got = jax.jit(lambda a, b: ops.dot_general(a, b, dn, mode="real"))(x, qw)
  np.testing.assert_array_equal(_bits(got), _bits(want))


def _words(byts):
  """Each 4 consecutive bytes as the little-endian 32-bit word the kernel
  loads (uint64, so that the tests' rotations do not wrap)."""
  b = np.asarray(byts).reshape(-1, 4).astype(np.uint64)
  return b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24


def test_e2m1_split_order_decodes_by_rotate_and_mask():
  # Every byte value in every position of a word: pair i of a "wgmma_e2m1"
  # word, rotated and masked as the kernel's PTX does (gpu_weight_only's
  # e2m1_split_ptx), is the bf16 pair of its two E2M1 values times 2**-126,
  # bit for bit (the value 0.5 as the bf16 subnormal 2**-127, -0 as -0).
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  vals = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
  want16 = np.array([(-1.0 if c & 8 else 1.0) * vals[c & 7] * 2.0 ** -126
                     for c in range(16)], ml_dtypes.bfloat16).view(np.uint16)
  byts = np.arange(256, dtype=np.uint8)
  for part in range(4):
    wg = np.zeros((256, 4), np.uint8)
    wg[:, part] = byts
    wg[:, (part + 1) % 4] = byts[::-1]  # the neighbours must not leak in
    sp = np.asarray(_qarray.split_bits(jnp.asarray(wg.reshape(1, -1)),
                                       "wgmma_e2m1"))
    q = _words(sp)
    rotr = lambda v, r: ((v >> r) | (v << (32 - r))) & 0xFFFFFFFF  # noqa: E731
    m = _qarray.E2M1_SPLIT_MASK
    out = [q & m, rotr(q, 6) & m, rotr(q, 12) & m,
           rotr(q, 2) & 0x81808180 | rotr(q, 10) & 0x00400040][part]
    np.testing.assert_array_equal(out & 0xFFFF, want16[byts & 0xF])
    np.testing.assert_array_equal(out >> 16, want16[byts >> 4])


@pytest.mark.parametrize("order", ["wgmma_e2m1", "wgmma_int4"])
def test_split_orders_are_permutations(order):
  table = {"wgmma_e2m1": _qarray.E2M1_SPLIT_POS,
           "wgmma_int4": _qarray.INT4_SPLIT_POS}[order]
  pos = [p for pair in table for lane in pair for p in lane]
  assert sorted(pos) == list(range(32))
  c = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 64), np.uint8))
  s = _qarray.split_bits(c, order)
  np.testing.assert_array_equal(
      np.asarray(_qarray.split_bits(s, order, inverse=True)), np.asarray(c))
  np.testing.assert_array_equal(
      np.asarray(_qarray.from_code_order(_qarray.to_code_order(c, order),
                                         order)), np.asarray(c))


def test_int4_split_order_puts_each_pair_a_shift_away():
  # Pair i of a "wgmma_int4" word, shifted right by 4i and masked with
  # 0x000F000F, is the pair's two nibbles in its lanes' low bits.
  wg = np.random.default_rng(1).integers(0, 256, (512, 4), np.uint8)
  sp = np.asarray(_qarray.split_bits(jnp.asarray(wg.reshape(1, -1)),
                                     "wgmma_int4")).reshape(-1, 4)
  q = _words(sp)
  for i in range(4):
    t = (q >> (4 * i)) & 0x000F000F
    np.testing.assert_array_equal(t & 0xF, wg[:, i] & 0xF)
    np.testing.assert_array_equal(t >> 16, wg[:, i] >> 4)


def test_orders_convert_into_each_other():
  q = ops.prepare_weight(_w(), _SPECS["mxfp4"])
  direct = ops.set_code_order(q, "wgmma_e2m1")
  via = ops.set_code_order(ops.set_code_order(q, "wgmma"), "wgmma_e2m1")
  np.testing.assert_array_equal(np.asarray(via.codes), np.asarray(direct.codes))
  back = ops.set_code_order(direct, "wgmma")
  np.testing.assert_array_equal(
      np.asarray(back.codes), np.asarray(ops.set_code_order(q, "wgmma").codes))


def test_kernel_order_picks_each_formats_fastest():
  tree = {"mx": ops.prepare_weight(_w(), _SPECS["mxfp4"]),
          "i4": ops.set_code_order(ops.prepare_weight(_w(seed=1),
                                                      _SPECS["int4_g128"]),
                                   "wgmma_e2m1", strict=False),
          "i8": ops.prepare_weight(_w(seed=2), lb.QuantSpec("int8")),
          "odd": ops.prepare_weight(_w(k=48, seed=3), _SPECS["nvfp4"])}
  out = ops.set_code_order(tree, "kernel")
  assert [out[k].code_order for k in ("mx", "i4", "i8", "odd")] == [
      "wgmma_e2m1", "wgmma_int4", "natural", "natural"]
  for k in tree:
    np.testing.assert_array_equal(_bits(lb.dequantize(out[k])),
                                  _bits(lb.dequantize(tree[k])))
  back = ops.set_code_order(out, "natural")
  np.testing.assert_array_equal(np.asarray(back["mx"].codes),
                                np.asarray(tree["mx"].codes))


def test_trees_keep_qweights_and_other_leaves():
  q = ops.prepare_weight(_w(), _SPECS["int4_g128"])
  tree = {"w": as_qweight(q, transposed=True), "b": jnp.ones(3),
          "w8": ops.prepare_weight(_w(seed=2), lb.QuantSpec("int8"))}
  out = ops.set_code_order(tree, "wgmma", strict=False)
  assert isinstance(out["w"], QWeight) and out["w"].transposed
  assert out["w"].code_order == "wgmma"
  assert out["w8"].code_order == "natural"  # 8-bit codes keep their order
  np.testing.assert_array_equal(_bits(out["w"].logical()),
                                _bits(tree["w"].logical()))
  assert "code_order=wgmma" in repr(out["w"])


def test_bad_requests_say_what_is_wrong():
  q8 = ops.prepare_weight(_w(), lb.QuantSpec("int8"))
  with pytest.raises(ValueError, match="8-bit"):
    ops.set_code_order({"layer": q8}, "wgmma")
  with pytest.raises(ValueError, match=r"\['layer'\]"):
    ops.set_code_order({"layer": q8}, "wgmma")
  q48 = ops.prepare_weight(_w(k=48), lb.QuantSpec("int4"))
  with pytest.raises(ValueError, match="multiple of 16"):
    ops.set_code_order(q48, "wgmma")
  qk = lb.quantize(_w(), lb.QuantSpec("int4", axis=0))  # packed along axis 0
  with pytest.raises(ValueError, match="packed along axis 0"):
    ops.set_code_order(qk, "wgmma")
  with pytest.raises(ValueError, match="order must be one of"):
    ops.set_code_order(q8, "marlin")
  q4 = ops.prepare_weight(_w(), lb.QuantSpec("int4", group_size=128))
  with pytest.raises(ValueError, match="not E2M1.*use 'wgmma'"):
    ops.set_code_order(q4, "wgmma_e2m1")
  nf4 = ops.prepare_weight(_w(), lb.QuantSpec("nf4", group_size=64))
  with pytest.raises(ValueError, match="not E2M1"):
    ops.set_code_order(nf4, "wgmma_e2m1")
  assert ops.set_code_order(q4, "wgmma_e2m1", strict=False).code_order == "natural"
  with pytest.raises(ValueError, match="not signed int4"):
    ops.set_code_order(ops.prepare_weight(_w(), _SPECS["mxfp4"]), "wgmma_int4")


def test_kernels_see_the_order_and_only_the_gpu_one_takes_it():
  from lowbit_jax.kernels import tpu_matmul  # pylint: disable=g-import-not-at-top
  q = ops.set_code_order(ops.prepare_weight(_w(), _SPECS["int4_g128"]), "wgmma")
  x = jnp.ones((2, 256), jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  prob, _ = ops.kernel_problem(x, q, dn, backend="tpu")
  assert prob.w_order == "wgmma"
  assert "'wgmma' order" in tpu_matmul.unsupported_reason(prob)
  with pytest.raises(ValueError, match="no kernel supports"):
    ops.dot_general(x, q, dn, mode="real", use_kernel="always")


@pytest.mark.parametrize("order", ["wgmma", "wgmma_e2m1"])
def test_checkpoint_keeps_the_order(tmp_path, order):
  q = ops.prepare_weight(_w(), _SPECS["nvfp4"])
  tree = {"w": as_qweight(ops.set_code_order(q, order), transposed=True)}
  checkpoint.save(tmp_path / "ck", tree)
  got = checkpoint.restore(tmp_path / "ck")
  assert got["w"].code_order == order and isinstance(got["w"], QWeight)
  np.testing.assert_array_equal(np.asarray(got["w"].codes),
                                np.asarray(tree["w"].codes))
  np.testing.assert_array_equal(_bits(got["w"].logical()),
                                _bits(as_qweight(q, transposed=True).logical()))


def test_an_unknown_order_is_refused_where_the_qarray_is_built():
  import dataclasses  # pylint: disable=g-import-not-at-top
  q = ops.prepare_weight(_w(), _SPECS["int4_pc"])
  with pytest.raises(ValueError, match="code_order must be one of"):
    dataclasses.replace(q, code_order="marlin")
