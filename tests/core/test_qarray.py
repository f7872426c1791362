"""QArray: packed storage layout, true nbytes, and the pytree under jit / vmap."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import formats as F

F32 = np.float32


def _quantize(x, spec):
  return jax.jit(lambda v: lb.quantize(v, spec))(jnp.asarray(x, jnp.float32))


def test_int4_two_codes_per_byte_low_nibble_first():
  codes = np.array([-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 0])
  x = codes.astype(F32)[None]  # amax 7: scale 1, codes are the values
  q = _quantize(x, lb.QuantSpec("int4", axis=-1))
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (1, 8)
  nib = codes & 0xF
  np.testing.assert_array_equal(np.asarray(q.codes)[0], nib[0::2] | (nib[1::2] << 4))
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q)), x)


def test_fp4_nibbles_are_e2m1_bit_patterns():
  vals = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 6], F32)
  q = _quantize(vals[None], lb.QuantSpec("fp4_e2m1", axis=-1))  # amax 6: scale 1
  e2m1 = vals.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
  np.testing.assert_array_equal(np.asarray(q.codes)[0], e2m1[0::2] | (e2m1[1::2] << 4))


def _bits_le(codes, bits, n_bytes):
  word = 0
  for i, c in enumerate(codes):
    word |= (int(c) & ((1 << bits) - 1)) << (bits * i)
  return [(word >> (8 * j)) & 0xFF for j in range(n_bytes)]


def test_int3_eight_codes_in_three_bytes():
  codes = np.array([-3, -2, -1, 0, 1, 2, 3, 3, 1, -1, 0, 2, -3, 3, -2, 1])
  q = _quantize(codes.astype(F32)[None], lb.QuantSpec("int3", axis=-1))
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (1, 6)
  ref = _bits_le(codes[:8], 3, 3) + _bits_le(codes[8:], 3, 3)
  np.testing.assert_array_equal(np.asarray(q.codes)[0], ref)
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q))[0], codes)


def test_fp6_four_codes_in_three_bytes():
  vals = np.array([7.5, -7.5, 0.125, 1.75, -0.875, 3, 0, -6], F32)  # e2m3, amax 7.5
  q = _quantize(vals[None], lb.QuantSpec("fp6_e2m3", axis=-1))
  assert q.codes.shape == (1, 6)
  c = vals.astype(ml_dtypes.float6_e2m3fn).view(np.uint8)
  ref = _bits_le(c[:4], 6, 3) + _bits_le(c[4:], 6, 3)
  np.testing.assert_array_equal(np.asarray(q.codes)[0], ref)
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q))[0], vals)


@pytest.mark.parametrize("name,bits,per_byte", [("int2", 2, 4), ("ternary", 2, 4),
                                                ("binary", 1, 8)])
def test_two_and_one_bit_codes(name, bits, per_byte):
  x = jax.random.normal(jax.random.key(0), (3, 64))
  q = _quantize(x, lb.QuantSpec(name, axis=-1))
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 64 // per_byte)
  c = np.asarray(q.codes).astype(np.int64)
  unpacked = np.stack([(c >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)],
                      axis=-1).reshape(3, 64)
  table = np.asarray(F.get(name).values())
  if name == "int2":
    vals = np.where(unpacked >= 2, unpacked - 4, unpacked)
  else:
    vals = table[unpacked]
  np.testing.assert_allclose(np.asarray(lb.dequantize(q)),
                             vals * np.asarray(q.scale), rtol=1e-6)


@pytest.mark.parametrize("name,dtype", [("int8", jnp.int8), ("uint8", jnp.uint8),
                                        ("fp8_e4m3", jnp.float8_e4m3fn),
                                        ("fp8_e5m2", jnp.float8_e5m2),
                                        ("fp8_e4m3fnuz", jnp.float8_e4m3fnuz),
                                        ("mxint8", jnp.int8),
                                        ("mxfp8_e4m3", jnp.float8_e4m3fn)])
def test_eight_bit_codes_one_per_byte_native_dtype(name, dtype):
  x = jax.random.normal(jax.random.key(1), (4, 64))
  q = _quantize(x, lb.QuantSpec(name, axis=-1))
  assert q.codes.dtype == dtype and q.codes.shape == (4, 64)
  if name.startswith("fp8"):
    # The stored fp8 codes are the values on the grid: codes * scale = values.
    np.testing.assert_array_equal(
        np.asarray(q.codes.astype(jnp.float32)) * np.asarray(q.scale),
        np.asarray(lb.dequantize(q)))


@pytest.mark.parametrize("fmt,dtype", [(F.IntFormat(5), jnp.uint8),
                                       (F.FloatFormat(3, 1), jnp.uint8),
                                       (F.IntFormat(12), jnp.uint16),
                                       (F.LookupFormat(tuple(range(-16, 16)),
                                                       name="lut32"), jnp.uint8)])
def test_other_widths(fmt, dtype):
  x = jax.random.normal(jax.random.key(2), (4, 64))
  q = _quantize(x, lb.QuantSpec(fmt, axis=-1))
  assert q.codes.dtype == dtype and q.codes.shape == (4, 64)
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q)),
                                np.asarray(jax.jit(lambda v: lb.fake_quant(
                                    v, lb.QuantSpec(fmt, axis=-1)))(x)))


@pytest.mark.parametrize("name,kw,expected", [
    # codes + scales (+ zero points) (+ tensor scale), in bytes, for x [64, 256]
    ("int4", {"axis": -1}, 64 * 128 + 64 * 4),
    ("int4", {"axis": -1, "group_size": 128}, 64 * 128 + 64 * 2 * 4),
    ("int4", {"axis": -1, "group_size": 128, "scale_dtype": "bfloat16"},
     64 * 128 + 64 * 2 * 2),
    ("uint4", {"axis": -1, "group_size": 128}, 64 * 128 + 64 * 2 * (4 + 1)),
    ("int8", {"axis": -1}, 64 * 256 + 64 * 4),
    ("int3", {"axis": -1}, 64 * 96 + 64 * 4),
    ("int2", {"axis": -1}, 64 * 64 + 64 * 4),
    ("binary", {"axis": -1}, 64 * 32 + 64 * 4),
    ("fp6_e3m2", {"axis": -1}, 64 * 192 + 64 * 4),
    ("fp8_e4m3", {}, 64 * 256 + 4),
    ("mxfp4", {"axis": -1}, 64 * 128 + 64 * 8),
    ("mxfp6_e2m3", {"axis": -1}, 64 * 192 + 64 * 8),
    ("mxfp8_e5m2", {"axis": -1}, 64 * 256 + 64 * 8),
    ("mxint8", {"axis": -1}, 64 * 256 + 64 * 8),
    ("nvfp4", {"axis": -1}, 64 * 128 + 64 * 16 + 4),
    ("nf4", {"axis": -1}, 64 * 128 + 64 * 4 * 4),
])
def test_nbytes_is_true_storage(name, kw, expected):
  x = jnp.zeros((64, 256), jnp.float32)
  q = jax.eval_shape(lambda v: lb.quantize(v, name, **kw), x)
  leaves = [q.codes, q.scale, q.zero_point, q.tensor_scale]
  assert q.nbytes == expected == sum(
      np.dtype(l.dtype).itemsize * int(np.prod(l.shape)) for l in leaves
      if l is not None)
  assert q.bits_per_element == pytest.approx(8 * expected / x.size)
  spec = lb.QuantSpec(name, **kw)
  assert spec.bits_per_element(x.shape) == pytest.approx(8 * expected / x.size)


def test_nbytes_counts_packing_padding():
  # int4 per output channel of a [5, 3] weight: 5 codes along axis 0 pad to 6.
  x = jax.random.normal(jax.random.key(3), (5, 3))
  q = _quantize(x, lb.QuantSpec("int4", axis=0))
  assert q.codes.shape == (3, 3) and q.pack_axis == 0
  assert q.nbytes == 9 + 3 * 4
  np.testing.assert_array_equal(np.asarray(lb.dequantize(q)),
                                np.asarray(lb.fake_quant(x, "int4", axis=0)))


def test_pytree_structure_and_jit():
  x = jax.random.normal(jax.random.key(4), (8, 64))
  q = _quantize(x, lb.QuantSpec("nvfp4", axis=-1))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 3  # codes, scale, tensor scale (zero point is None)
  q2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert q2.spec == q.spec and q2.shape == q.shape
  # A QArray passes in and out of jit; its spec stays static.
  out = jax.jit(lambda qq: qq)(q)
  assert isinstance(out, lb.QArray) and out.spec == q.spec
  y = np.asarray(jax.jit(lb.dequantize)(q))
  np.testing.assert_array_equal(y, np.asarray(jax.jit(lambda v: lb.fake_quant(
      v, "nvfp4", axis=-1))(x)))
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda qq: qq.dequantize())(q)), y)
  # tree_map reaches the arrays only.
  doubled = jax.tree.map(lambda a: a, q)
  assert doubled.pack_axis == q.pack_axis
  assert "nvfp4" in repr(q) and "uint8" in repr(q)


def test_qarray_vmap_and_scan():
  xs = jax.random.normal(jax.random.key(5), (3, 8, 64))
  spec = lb.QuantSpec("int4", axis=-1, group_size=32)
  qs = jax.jit(jax.vmap(lambda v: lb.quantize(v, spec)))(xs)
  assert qs.codes.shape == (3, 8, 32) and qs.scale.shape == (3, 8, 2)
  assert qs.shape == (8, 64)  # the logical shape of one example

  def body(carry, q):
    return carry + jnp.sum(lb.dequantize(q)), lb.dequantize(q)

  total, ys = jax.lax.scan(body, jnp.float32(0), qs)
  ref = jax.vmap(lambda v: lb.fake_quant(v, spec))(xs)
  np.testing.assert_array_equal(np.asarray(ys), np.asarray(ref))
  np.testing.assert_allclose(float(total), float(jnp.sum(ref)), rtol=1e-5)


def test_dequantize_refuses_arrays_that_do_not_fit_the_recorded_shape_or_dtype():
  # A QArray returned by shard_map recorded its shard's shape over the full
  # arrays: dequantize returned the first shard's rows, silently. A tree.map
  # cast of a parameter tree reached the codes and decoded them as values.
  x = jax.random.normal(jax.random.key(7), (16, 256))
  q = lb.quantize(x, lb.QuantSpec("int4", axis=-1, group_size=128))
  shard = jax.tree.map(lambda a: a, q)
  object.__setattr__(shard, "shape", (2, 256))   # what shard_map's out_specs gives
  with pytest.raises(ValueError, match=r"records a \(2, 256\) array.*shard_map"):
    lb.dequantize(shard)
  q8 = lb.quantize(x, lb.QuantSpec("int8", axis=-1))
  with pytest.raises(ValueError, match="codes are bfloat16, not the int8"):
    lb.dequantize(jax.tree.map(lambda a: a.astype(jnp.bfloat16), q8))
  # Mapping over a stack quantized whole names the way that works.
  w = jax.random.normal(jax.random.key(8), (3, 64, 16))
  whole = lb.quantize(w, lb.QuantSpec("int4", axis=1, group_size=32))
  with pytest.raises(ValueError, match="jax.vmap\\(lambda w: lowbit_jax.quantize"):
    jax.lax.scan(lambda c, ql: (c, lb.dequantize(ql)), None, whole)
  per = jax.vmap(lambda v: lb.quantize(v, lb.QuantSpec("int4", axis=0, group_size=32)))(w)
  ys = jax.lax.scan(lambda c, ql: (c, lb.dequantize(ql)), None, per)[1]
  np.testing.assert_array_equal(np.asarray(ys), np.asarray(lb.dequantize(whole)))


def test_dequantize_inside_shard_map_reads_the_local_blocks():
  # Inside shard_map the body sees the global QArray's local blocks (arrays
  # smaller than the record): dequantize reads them; only arrays larger than
  # the record (a shard_map output) are refused.
  from jax.sharding import Mesh, PartitionSpec as P   # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  w = jax.random.normal(jax.random.key(0), (64, 32))
  for spec in (lb.QuantSpec("int8", axis=0), lb.QuantSpec("int4", axis=0, group_size=16),
               lb.QuantSpec("int8", axis=0, rounding="stochastic")):
    q = lb.quantize(w, spec, key=jax.random.key(1) if spec.rounding != "nearest" else None)
    specs = jax.tree.map(lambda _: P(None, "x"), q)
    f = jax.jit(jax.shard_map(lb.dequantize, mesh=mesh, in_specs=(specs,),
                              out_specs=P(None, "x")))
    np.testing.assert_array_equal(np.asarray(f(q)), np.asarray(lb.dequantize(q)))


def test_dequantize_keeps_dtype_and_shape():
  x = jax.random.normal(jax.random.key(6), (2, 3, 64)).astype(jnp.bfloat16)
  q = jax.jit(lambda v: lb.quantize(v, "mxfp4", axis=-1))(x)
  assert q.dtype == "bfloat16" and q.shape == (2, 3, 64) and q.ndim == 3
  assert q.size == 384
  y = jax.jit(lb.dequantize)(q)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape


def test_repr_survives_a_tree_map_over_the_data_fields():
  q = lb.quantize(jnp.ones((4, 8)), lb.QuantSpec("int8", axis=1))
  assert "codes=int8[4, 8]" in repr(q)
  shapes = jax.tree.map(lambda a: a.shape, q)   # what users print to inspect
  assert "codes=(4, 8)" in repr(shapes)
