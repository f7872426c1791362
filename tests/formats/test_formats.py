"""The format registry: names, bare eXmY conventions, NF4, user formats, validation."""
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import formats as F

# Every name issue 3 lists (the bare eXmY examples and aliases included).
ISSUE_NAMES = (
    "int8", "int4", "int3", "int2", "uint8", "uint4", "binary", "ternary",
    "fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz", "fp8_e3m4", "fp6_e2m3",
    "fp6_e3m2", "fp4_e2m1", "e8m0", "e3m3", "e2m2", "e5m3", "e2m1", "e2m3", "e3m2",
    "e4m3", "e5m2", "nf4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2",
    "mxfp4", "mxint8", "nvfp4")

# QLoRA's published NF4 levels (Dettmers et al. 2023, Appendix E; the table
# bitsandbytes ships).
QLORA_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)


def test_names_lists_every_issue_name():
  got = F.names()
  missing = [n for n in ISSUE_NAMES if n not in got]
  assert not missing, missing
  assert got == sorted(got)
  for n in got:
    assert isinstance(F.get(n), F.Format)


def test_top_level_names_command_output():
  # The issue's check: `python -c "import lowbit_jax as lb; print(lb.formats.names())"`.
  assert set(ISSUE_NAMES) <= set(lb.formats.names())


def test_formats_are_frozen_and_hashable():
  for n in F.names():
    f = F.get(n)
    hash(f)
    with pytest.raises(Exception):
      f.name = "other"  # frozen dataclass
  assert F.FloatFormat(3, 3) == F.get("e3m3")
  assert hash(F.FloatFormat(3, 3)) == hash(F.get("e3m3"))


def _ocp_max(x, y):
  bias = 2 ** (x - 1) - 1
  return (2 - 2.0 ** -y) * 2.0 ** (2 ** x - 1 - bias)


@pytest.mark.parametrize("name", ["e3m3", "e2m2", "e5m3", "e1m2", "e4m1", "e6m1", "e3m5",
                                  "e4m0", "e2m6", "e7m2"])
def test_bare_names_follow_ocp_convention(name):
  x, y = int(name[1]), int(name[3])
  f = F.get(name)
  assert isinstance(f, F.FloatFormat)
  assert (f.exp_bits, f.man_bits) == (x, y)
  assert f.bias == 2 ** (x - 1) - 1
  assert f.special == "none" and not f.has_inf and not f.has_nan
  assert f.max == _ocp_max(x, y)
  assert f.bits == 1 + x + y
  table = f.decode_table()
  assert np.all(np.isfinite(table)), "no inf or NaN codes"
  assert table.size == 2 ** f.bits
  assert np.max(table) == np.float32(f.max)
  # Subnormals: the smallest positive value is 2**(1 - bias - y).
  assert np.min(table[table > 0]) == np.float32(2.0 ** (1 - f.bias - y))
  # Saturating, never inf or NaN.
  big = jnp.array([1e30, -1e30, jnp.inf, -jnp.inf, f.max * 1.01], jnp.float32)
  out = np.asarray(lb.cast(big, f))
  np.testing.assert_array_equal(out, np.float32([f.max, -f.max, f.max, -f.max, f.max]))


def test_bare_e3m3_values():
  # e3m3: bias 3, max (2 - 1/8) * 2**(7 - 3) = 30, subnormal step 2**-5.
  f = F.get("e3m3")
  assert f.max == 30.0 and f.min_subnormal == 2.0 ** -5 and f.min_normal == 2.0 ** -2
  assert F.get("e2m2").max == 7.0
  assert F.get("e5m3").max == 122880.0


@pytest.mark.parametrize("bare,full,dt", [
    ("e2m1", "fp4_e2m1", ml_dtypes.float4_e2m1fn),
    ("e2m3", "fp6_e2m3", ml_dtypes.float6_e2m3fn),
    ("e3m2", "fp6_e3m2", ml_dtypes.float6_e3m2fn),
    ("e4m3", "fp8_e4m3", ml_dtypes.float8_e4m3fn),
    ("e5m2", "fp8_e5m2", ml_dtypes.float8_e5m2),
    ("e3m4", "fp8_e3m4", ml_dtypes.float8_e3m4),
])
def test_bare_aliases_equal_named_formats(bare, full, dt):
  assert F.get(bare) is F.get(full)
  assert F.get(full).ml_dtype is dt
  assert F.get(dt.__name__) is F.get(full)  # ml_dtypes' own name works too


@pytest.mark.parametrize("x,y,dt", [(2, 1, ml_dtypes.float4_e2m1fn),
                                    (2, 3, ml_dtypes.float6_e2m3fn),
                                    (3, 2, ml_dtypes.float6_e3m2fn)])
def test_ocp_convention_reproduces_ml_dtypes_fp6_fp4(x, y, dt):
  # The generic convention with default bias gives exactly ml_dtypes' tables.
  f = F.FloatFormat(x, y)
  assert f.ml_dtype is dt
  codes = np.arange(2 ** f.bits, dtype=np.uint8)
  np.testing.assert_array_equal(f.decode_table(), codes.view(dt).astype(np.float32))
  assert f.max == float(ml_dtypes.finfo(dt).max)


@pytest.mark.parametrize("name,dt", [
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2),
    ("fp8_e4m3fnuz", ml_dtypes.float8_e4m3fnuz),
    ("fp8_e5m2fnuz", ml_dtypes.float8_e5m2fnuz),
    ("fp8_e4m3b11fnuz", ml_dtypes.float8_e4m3b11fnuz),
    ("fp8_e3m4", ml_dtypes.float8_e3m4), ("fp8_e4m3ieee", ml_dtypes.float8_e4m3),
    ("fp6_e2m3", ml_dtypes.float6_e2m3fn), ("fp6_e3m2", ml_dtypes.float6_e3m2fn),
    ("fp4_e2m1", ml_dtypes.float4_e2m1fn), ("e8m0", ml_dtypes.float8_e8m0fnu)])
def test_float_format_tables_match_ml_dtypes(name, dt):
  f = F.get(name)
  assert f.ml_dtype is dt
  codes = np.arange(2 ** f.bits, dtype=np.uint8)
  ref = codes.view(dt).astype(np.float32)
  got = f.decode_table()
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  ok = ~np.isnan(ref)
  np.testing.assert_array_equal(got[ok].view(np.uint32), ref[ok].view(np.uint32))
  fi = ml_dtypes.finfo(dt)
  assert f.max == float(fi.max)
  assert f.min_normal == float(fi.smallest_normal)
  if name != "e8m0":
    assert f.min_subnormal == float(fi.smallest_subnormal)
  assert f.has_inf == bool(np.isinf(ref).any())
  assert f.has_nan == bool(np.isnan(ref).any())


def test_integer_formats():
  for b in (8, 4, 3, 2):
    f = F.get(f"int{b}")
    assert f.signed and f.bits == b
    assert (f.qmin, f.qmax) == (-2 ** (b - 1), 2 ** (b - 1) - 1)
    assert f.max == 2 ** (b - 1) - 1  # symmetric restricted range
  for b in (8, 4):
    f = F.get(f"uint{b}")
    assert not f.signed and (f.qmin, f.qmax) == (0, 2 ** b - 1)
  assert F.get("int2").max == 1  # int2 quantizes to {-1, 0, 1}
  m = F.get("mxint8").element
  assert m.frac_bits == 6 and m.max == 127 / 64 and m.emax == 0


def test_binary_ternary_nf4():
  assert F.get("binary").values().tolist() == [-1.0, 1.0]
  assert F.get("binary").bits == 1
  assert F.get("ternary").values().tolist() == [-1.0, 0.0, 1.0]
  assert F.get("ternary").bits == 2
  nf4 = F.get("nf4")
  assert nf4.bits == 4 and nf4.default_block == 64 and nf4.scale_method == "absmax"
  # Bit for bit the float32 levels of QLoRA's reference (bitsandbytes), so
  # codes of its checkpoints read back the same numbers (was up to 1.8e-7 off).
  np.testing.assert_array_equal(np.asarray(nf4.values(), np.float32),
                                np.asarray(QLORA_NF4, np.float32))


def test_mx_and_nvfp4_definitions():
  emax = {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e2m3": 2, "mxfp6_e3m2": 4,
          "mxfp4": 2, "mxint8": 0}
  for n, e in emax.items():
    f = F.get(n)
    assert isinstance(f, F.BlockFormat)
    assert f.scale == "e8m0" and f.block_size == 32 and f.scale_rounding == "floor"
    assert f.element.emax == e, n
    assert not f.tensor_scale
    assert f.bits_per_element == f.element.bits + 8 / 32
  nv = F.get("nvfp4")
  assert nv.element is F.get("fp4_e2m1") and nv.scale == "fp8_e4m3"
  assert nv.block_size == 16 and nv.tensor_scale


def _end_to_end(fmt_name, x, **kw):
  """quantize / dequantize / fake_quant / grad under jit; checks fq == dq(q)."""

  @jax.jit
  def run(v):
    q = lb.quantize(v, fmt_name, **kw)
    g = jax.grad(lambda u: jnp.sum(lb.fake_quant(u, fmt_name, **kw)))(v)
    return q, lb.dequantize(q), lb.fake_quant(v, fmt_name, **kw), g

  q, y, fq, g = run(x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(fq))
  assert y.shape == x.shape and y.dtype == x.dtype
  assert g.shape == x.shape
  return q, np.asarray(fq)


USER_FORMATS = [
    ("u_int5", F.IntFormat(5)),
    ("u_e3m1", F.FloatFormat(3, 1)),
    ("u_e4m2_b5_ieee", F.FloatFormat(4, 2, bias=5, special="ieee")),
    ("u_e3m2_fn", F.FloatFormat(3, 2, special="fn")),
    ("u_lut5", F.LookupFormat((-1.0, -0.3, 0.0, 0.5, 1.0), name="u_lut5")),
    ("u_int6_bf16_b8", F.BlockFormat(F.IntFormat(6), "bfloat16", 8)),
    ("u_e3m2_e8m0_b16_ceil", F.BlockFormat(F.FloatFormat(3, 2), "e8m0", 16,
                                           scale_rounding="ceil")),
    ("u_e2m2_e8m0_b64_nearest", F.BlockFormat(F.get("e2m2"), "e8m0", 64,
                                              scale_rounding="nearest")),
    ("u_nf4_e4m3_b32_ts", F.BlockFormat(F.get("nf4"), "fp8_e4m3", 32,
                                        tensor_scale=True)),
    ("u_int4_f32_b128", F.BlockFormat(F.get("int4"), "float32", 128)),
    ("u_e5m3_f16_b4", F.BlockFormat(F.get("e5m3"), "float16", 4)),
]


@pytest.mark.parametrize("name,fmt", USER_FORMATS, ids=[n for n, _ in USER_FORMATS])
def test_user_registered_formats_work_end_to_end(name, fmt):
  if name not in F.names():
    F.register(fmt, name)
  assert F.get(name) is fmt
  x = jax.random.normal(jax.random.key(1), (8, 256), jnp.float32) * 2.0
  kw = {"axis": -1}
  if not isinstance(fmt, F.BlockFormat) and isinstance(fmt, F.IntFormat):
    kw["group_size"] = 32
  q, fq = _end_to_end(name, x, **kw)
  assert q.spec.format is fmt
  # True storage agrees with the spec's accounting (codes, scales, tensor scale).
  assert q.nbytes * 8 == pytest.approx(q.spec.bits_per_element(x.shape) * x.size)
  err = np.abs(fq - np.asarray(x))
  assert np.all(np.isfinite(fq))
  assert float(np.mean(err)) < float(np.mean(np.abs(np.asarray(x))))
  # The same format through a quantized matmul: fake == real.
  w = jax.random.normal(jax.random.key(2), (256, 16), jnp.float32)
  dn = (((1,), (0,)), ((), ()))
  wspec = lb.QuantSpec(name, axis=0, group_size=32 if kw.get("group_size") else None)
  y_fake, y_real = jax.jit(lambda a, b: (
      lb.ops.dot_general(a, b, dn, rhs_spec=wspec, mode="fake"),
      lb.ops.dot_general(a, b, dn, rhs_spec=wspec, mode="real")))(x, w)
  np.testing.assert_allclose(np.asarray(y_fake), np.asarray(y_real), rtol=1e-5,
                             atol=1e-5)


def test_user_block_format_any_combination():
  # Any element x any scale x any block size.
  elements = [F.get("int4"), F.get("fp8_e5m2"), F.get("e3m3"), F.get("nf4"),
              F.IntFormat(8, frac_bits=6)]
  x = jax.random.normal(jax.random.key(3), (4, 96), jnp.float32)
  scales = F.SCALE_DTYPES
  for i, e in enumerate(elements):  # every element with two scale types ...
    for j in (i, i + 2):  # ... so that every scale type meets two elements
      sc = scales[j % len(scales)]
      bsz = (3, 32, 96)[j % 3]
      bf = F.BlockFormat(e, sc, bsz)

      def run(v, bf=bf):
        q = lb.quantize(v, bf, axis=-1)
        return q, lb.dequantize(q), lb.fake_quant(v, bf, axis=-1)

      q, y, fq = jax.jit(run)(x)
      np.testing.assert_array_equal(np.asarray(y), np.asarray(fq))
      assert q.scale.shape == (4, 96 // bsz)
      assert np.all(np.isfinite(np.asarray(fq)))


def test_register_rejects_duplicates_and_bad_names():
  f = F.IntFormat(7, name="my_int7")
  F.register(f, "test_dup_int7", overwrite=True)
  with pytest.raises(ValueError, match="overwrite=True"):
    F.register(f, "test_dup_int7")
  with pytest.raises(ValueError, match="overwrite=True"):
    F.register(f, "e4m3")  # an alias is taken too
  with pytest.raises(ValueError, match="letters, digits"):
    F.register(f, "bad name!")
  with pytest.raises(TypeError, match="takes a Format"):
    F.register("int4")


def test_unknown_and_invalid_names():
  with pytest.raises(KeyError, match="register"):
    F.get("int5x")
  with pytest.raises(ValueError, match="FloatFormat"):
    F.get("e8m1")  # largest value overflows float32: the message says how to build it
  with pytest.raises(ValueError, match="unknown format"):
    lb.QuantSpec("not_a_format")


@pytest.mark.parametrize("build,match", [
    (lambda: F.IntFormat(0), r"\[1, 16\]"),
    (lambda: F.IntFormat(17), r"\[1, 16\]"),
    (lambda: F.IntFormat(1, signed=True), "binary"),
    (lambda: F.IntFormat(8, frac_bits=-1), "frac_bits"),
    (lambda: F.FloatFormat(0, 3), "exp_bits"),
    (lambda: F.FloatFormat(9, 3), "exp_bits"),
    (lambda: F.FloatFormat(4, 23), "man_bits"),
    (lambda: F.FloatFormat(4, 3, special="bogus"), "one of"),
    (lambda: F.FloatFormat(8, 1, special="e8m0"), "man_bits=0"),
    (lambda: F.FloatFormat(3, 0, special="fn"), "man_bits >= 1"),
    (lambda: F.FloatFormat(5, 0, special="ieee"), "no NaN code"),
    (lambda: F.FloatFormat(8, 2), "larger bias"),
    (lambda: F.FloatFormat(8, 7, bias=200), "raise the bias|shorten"),
    (lambda: F.LookupFormat((1.0,), name="t"), "2 to 256"),
    (lambda: F.LookupFormat(tuple(range(257)), name="t"), "2 to 256"),
    (lambda: F.LookupFormat((1.0, 0.0), name="t"), "sorted ascending"),
    (lambda: F.LookupFormat((0.0, 0.0), name="t"), "distinct"),
    (lambda: F.LookupFormat((0.0, math.inf), name="t"), "finite"),
    (lambda: F.LookupFormat((0.0, 1.0), name="t", scale_method="x"), "absmax"),
    (lambda: F.BlockFormat(F.get("mxfp4"), "e8m0", 32), "element format"),
    (lambda: F.BlockFormat(F.get("int4"), "int8", 32), "scale must be one of"),
    (lambda: F.BlockFormat(F.get("int4"), "e8m0", 0), "positive int"),
    (lambda: F.BlockFormat(F.get("int4"), "e8m0", 32, scale_rounding="up"), "'ceil'"),
    (lambda: F.BlockFormat(F.get("uint4"), "float32", 32), "signed"),
    (lambda: F.BlockFormat(F.get("e8m0"), "e8m0", 32), "a block scale, not an element"),
    (lambda: F.BlockFormat(F.get("fp4_e2m1"), "e8m0", 16, tensor_scale=True),
     "tensor scale needs a float block scale"),
    (lambda: lb.QuantSpec("nvfp4", axis=-1, scale_dtype="e8m0"), "needs float block"),
])
def test_invalid_formats_raise_value_error_naming_the_fix(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_block_format_element_must_be_format():
  with pytest.raises(TypeError, match="must be a Format"):
    F.BlockFormat("int4", "e8m0", 32)


@pytest.mark.parametrize("kw,match", [
    ({"axis": "rows"}, "axis must be"),
    ({"axis": (0, 0)}, "repeats"),
    ({"axis": ()}, "must hold ints"),
    ({"axis": -1, "group_size": 0}, "positive int"),
    ({"axis": (0, 1), "group_size": 4}, "single axis"),
    ({"tile": (4,)}, "two positive ints"),
    ({"tile": (4, 4), "group_size": 4}, "not both"),
    ({"symmetric": False}, "integer format"),
    ({"scale_dtype": "int8"}, "scale_dtype must be"),
    ({"scale_rounding": "ceil"}, "e8m0 scales"),
    ({"scale_dtype": "e8m0", "scale_rounding": "up"}, "'ceil'"),
    ({"rounding": "down"}, "'stochastic'"),
    ({"clip_ratio": 0.0}, r"\(0, 1\]"),
    ({"clip_ratio": 1.5}, r"\(0, 1\]"),
    ({"calibration": "magic"}, "calibration must be"),
])
def test_invalid_specs_raise_value_error_naming_the_fix(kw, match):
  with pytest.raises(ValueError, match=match):
    lb.QuantSpec("fp8_e4m3", **kw)


def test_invalid_specs_format_specific():
  with pytest.raises(ValueError, match="symmetric=False"):
    lb.QuantSpec("uint4", symmetric=True)
  with pytest.raises(ValueError, match="symmetric only"):
    lb.QuantSpec("int4", symmetric=False, scale_dtype="e8m0")
  with pytest.raises(ValueError, match="scale_dtype='e8m0'"):
    lb.QuantSpec("e8m0")
  with pytest.raises(ValueError, match="axis=-1"):
    lb.QuantSpec("mxfp4", axis="tensor")
  with pytest.raises(ValueError, match="axis=-1"):
    lb.fake_quant(jnp.ones((4, 32)), "mxfp4")  # a block format needs an axis
  with pytest.raises(ValueError, match="axis=-1"):
    lb.fake_quant(jnp.ones((4, 32)), "int4", group_size=8)  # so do groups
  with pytest.raises(TypeError, match="QuantSpec or a format name"):
    lb.quantize(jnp.ones(4), 3)


def test_spec_defaults():
  s = lb.QuantSpec("mxfp4", axis=-1)
  assert s.group_size == 32 and s.scale_dtype == "e8m0" and s.scale_rounding == "floor"
  assert lb.QuantSpec("nf4", axis=0).group_size == 64
  assert lb.QuantSpec("nf4", axis="tensor").group_size is None
  assert lb.QuantSpec("uint4").symmetric is False
  assert lb.QuantSpec("int4").symmetric is True
  assert lb.QuantSpec("int4", scale_dtype="bf16").scale_dtype == "bfloat16"
  assert lb.QuantSpec("int4", scale_dtype="fp32").scale_dtype == "float32"
  assert lb.QuantSpec("nvfp4", axis=-1).tensor_scale
  s = lb.QuantSpec("int4", axis=[0, 1])
  assert s.axis == (0, 1)
  hash(s)


def test_a_non_integer_axis_is_a_type_error_naming_the_field():
  with pytest.raises(TypeError, match="axis"):
    lb.QuantSpec("int8", axis=1.5)


@pytest.mark.parametrize("bias", [-1, 4, 9])
def test_custom_float_bias_beyond_the_standard_range(bias):
  # A FloatFormat whose exponent bias lies outside [0, 2**exp_bits - 1] has
  # exponents ReducePrecision's one-bit-wider type cannot hold: its saturating
  # cast (fake_quant's) takes the integer emulation, so the grid maps to
  # itself and fake_quant equals dequantize(quantize(x)) (the top values came
  # back inf and the smallest 0).
  f = lb.formats.FloatFormat(2, 1, bias=bias)
  grid = jnp.asarray(f.values(), jnp.float32)
  np.testing.assert_array_equal(lb.cast(grid, f, saturate=True), grid)
  x = jax.random.normal(jax.random.key(0), (4, 32))
  fq = lb.fake_quant(x, f, axis=-1)
  np.testing.assert_array_equal(fq, lb.dequantize(lb.quantize(x, f, axis=-1)))
  # Up to the scale it is fp4_e2m1's grid (the bias only shifts exponents).
  np.testing.assert_allclose(fq, lb.fake_quant(x, "fp4_e2m1", axis=-1), rtol=1e-6)


def test_fixed_point_ints_quantize_asymmetrically_on_whole_codes():
  # frac_bits relabel codes; an asymmetric spec's zero point and scale place
  # the unsigned grid, so the values equal plain uint8's (they collapsed).
  x = jnp.asarray([[-1.0, -0.3, 0.2, 0.7, 1.5]])
  want = lb.fake_quant(x, "uint8", axis=-1)
  for f, kw in ((lb.formats.IntFormat(8, signed=False, frac_bits=4), {}),
                (lb.formats.IntFormat(8, frac_bits=6), {"symmetric": False})):
    np.testing.assert_array_equal(lb.fake_quant(x, f, axis=-1, **kw), want)
    np.testing.assert_array_equal(
        lb.dequantize(lb.quantize(x, f, axis=-1, **kw)), want)


def test_bad_keys_and_meaningless_specs_are_refused():
  x = jax.random.normal(jax.random.key(0), (4, 32))
  spec = lb.QuantSpec("int4", axis=-1, rounding="stochastic")
  for fn in (lb.fake_quant, lb.quantize):
    with pytest.raises(TypeError, match=r"jax.random.key\(0\)"):
      fn(x, spec, key=0)
  # Old-style raw key data is the same key.
  np.testing.assert_array_equal(
      lb.fake_quant(x, spec, key=jax.random.PRNGKey(0)),
      lb.fake_quant(x, spec, key=jax.random.wrap_key_data(jax.random.PRNGKey(0))))
  with pytest.raises(ValueError, match="threshold"):
    lb.QuantSpec("ternary", rounding="stochastic")


def test_a_qarray_made_under_vmap_is_refused_outside_it():
  xs = jax.random.normal(jax.random.key(0), (4, 8, 32))
  q = jax.vmap(lambda w: lb.quantize(w, "int4", axis=-1))(xs)
  with pytest.raises(ValueError, match="made under jax.vmap"):
    lb.dequantize(q)
  np.testing.assert_array_equal(
      jax.vmap(lb.dequantize)(q),
      jnp.stack([lb.fake_quant(w, "int4", axis=-1) for w in xs]))


def test_float_formats_wider_than_16_bits_are_refused():
  # Codes live in uint8 or uint16: an 18-bit e5m12 was accepted and its codes
  # cut to 16 bits (dequantize off by 2.6 on N(0, 1) data).
  for x, y in ((5, 12), (8, 10), (4, 16), (3, 20)):
    with pytest.raises(ValueError, match=rf"e{x}m{y} codes take {x + y + 1} bits.*"
                       "at most 16 bits"):
      F.FloatFormat(x, y, bias=128 if x == 8 else None)
  f = F.FloatFormat(5, 10)  # 16 bits: exact
  x = jax.random.normal(jax.random.key(0), (8, 64))
  np.testing.assert_array_equal(lb.dequantize(lb.quantize(x, f, axis=-1)),
                                lb.fake_quant(x, f, axis=-1))


@pytest.mark.parametrize("fmt", [F.FloatFormat(3, 0), F.FloatFormat(2, 0),
                                 F.FloatFormat(3, 3, bias=130),
                                 F.FloatFormat(2, 3, bias=128),
                                 F.IntFormat(8, frac_bits=31)],
                         ids=lambda f: f.name)
def test_exotic_custom_elements_quantize_as_they_fake_quantize(fmt):
  # e3m0 / e2m0: quantize's codes rounded ties (0.75 between 0.5 and 1) to
  # the even code, fake_quant up, as ml_dtypes' e8m0 does. Narrow formats of
  # bias >= 128 and frac_bits=31 raised a bare numpy/JAX OverflowError.
  x = jnp.asarray([[0.75, 3.0, 12.0, -3.0, 1.5, 6.0, -0.4, 5.0, 0.0, 2.25, 1.0, -7.0]])
  x = jnp.concatenate([x, jax.random.normal(jax.random.key(1), (3, 12))])
  for spec in (lb.QuantSpec(fmt, axis=-1), lb.QuantSpec(fmt, axis=-1, group_size=4)):
    np.testing.assert_array_equal(lb.dequantize(lb.quantize(x, spec)),
                                  lb.fake_quant(x, spec))


def test_codebook_parameters_are_checked():
  with pytest.raises(ValueError, match="table must be \\(-1.0, 0.0, 1.0\\)"):
    F.LookupFormat((-0.5, 0.0, 0.5), name="t", scale_method="twn")
  with pytest.raises(ValueError, match="within float32's range"):
    F.LookupFormat((-1e39, 0.0, 1e39), name="t")
  with pytest.raises(ValueError, match="distinct in float32"):
    F.LookupFormat((1.0, 1.000000000001, 2.0), name="t")
  for b in (0, -4, 2.5, True):
    with pytest.raises(ValueError, match="default_block must be a positive int"):
      F.LookupFormat((-1.0, 0.0, 1.0), name="t", default_block=b)
  assert F.LookupFormat((-1.0, 0.0, 1.0), name="t", default_block=32).default_block == 32


def test_zero_points_of_wide_unsigned_codes_count_16_bits():
  # uint12's zero points are stored as uint16 (as its codes): 12 + 32/32 +
  # 16/32 bits an element, not 17.25.
  f = F.IntFormat(12, signed=False)
  spec = lb.QuantSpec(f, axis=-1, group_size=32, symmetric=False)
  q = lb.quantize(jnp.ones((4, 64)), spec)
  assert q.zero_point.dtype == jnp.uint16
  assert spec.bits_per_element((4, 64)) == 17.5
  assert lb.QuantSpec("uint8", axis=-1, group_size=32,
                      symmetric=False).bits_per_element((4, 64)) == 9.25


def test_an_element_max_below_one_saturates_a_huge_block_instead_of_nan():
  # amax / max overflowed to an inf float32 scale: finite data came back NaN.
  for f in (F.FloatFormat(4, 3, bias=20, special="fn"),
            F.LookupFormat((-0.01, 0.0, 0.01), name="tiny")):
    x = jnp.asarray([[3e38, -3e38, 1.0, 0.0]])
    for out in (lb.fake_quant(x, f, axis=-1),
                lb.dequantize(lb.quantize(x, f, axis=-1))):
      assert np.all(np.isfinite(out)), out
      assert out[0, 0] > 1e36 and out[0, 1] < -1e36
