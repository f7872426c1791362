"""QArray.code_order: 4-bit weights stored in the GPU kernel's register order.

``ops.set_code_order(tree, "wgmma")`` transposes the bytes of every 16-byte
run along K (the order in which the Hopper weight-only kernel's threads load
their WGMMA fragments, tests/kernels for the kernel itself). The values must
not change anywhere: dequantize, the real-mode matmul off the kernel,
checkpoints and jit all read either order.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import checkpoint
from lowbit_jax._rules import QWeight, as_qweight
from lowbit_jax.core import ops
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


@pytest.mark.parametrize("name", sorted(_SPECS))
def test_values_do_not_change(name):
  q = ops.prepare_weight(_w(), _SPECS[name])
  qw = ops.set_code_order(q, "wgmma")
  assert qw.code_order == "wgmma" and q.code_order == "natural"
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


def test_checkpoint_keeps_the_order(tmp_path):
  q = ops.prepare_weight(_w(), _SPECS["nvfp4"])
  tree = {"w": as_qweight(ops.set_code_order(q, "wgmma"), transposed=True)}
  checkpoint.save(tmp_path / "ck", tree)
  got = checkpoint.restore(tmp_path / "ck")
  assert got["w"].code_order == "wgmma" and isinstance(got["w"], QWeight)
  np.testing.assert_array_equal(np.asarray(got["w"].codes),
                                np.asarray(tree["w"].codes))
  np.testing.assert_array_equal(_bits(got["w"].logical()),
                                _bits(as_qweight(q, transposed=True).logical()))


def test_an_unknown_order_is_refused_where_the_qarray_is_built():
  import dataclasses  # pylint: disable=g-import-not-at-top
  q = ops.prepare_weight(_w(), _SPECS["int4_pc"])
  with pytest.raises(ValueError, match="code_order must be one of"):
    dataclasses.replace(q, code_order="marlin")
