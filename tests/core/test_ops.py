"""Quantized dot_general / einsum / conv: fake vs real, unset axes, kernel dispatch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowbit_jax as lb
from lowbit_jax import ops

DN = (((1,), (0,)), ((), ()))  # x [M, K] @ w [K, N]
TOL = dict(rtol=2e-5, atol=2e-5)


def _xw(m=8, k=256, n=48, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n)) * 0.1


@functools.lru_cache(maxsize=None)
def _fq_fn(spec):
  return jax.jit(lambda v: lb.fake_quant(v, spec))


def _fq(x, spec, **kw):
  """jit'd fake_quant (the references below; eager dispatch is slow to compile)."""
  spec = spec.replace(**kw) if isinstance(spec, lb.QuantSpec) else lb.QuantSpec(spec, **kw)
  return _fq_fn(spec)(x)


@functools.lru_cache(maxsize=None)
def _fake_real(lhs_spec, rhs_spec, dn=DN):
  def run(x, w):
    f = ops.dot_general(x, w, dn, lhs_spec=lhs_spec, rhs_spec=rhs_spec, mode="fake")
    r = ops.dot_general(x, w, dn, lhs_spec=lhs_spec, rhs_spec=rhs_spec, mode="real")
    return f, r
  return jax.jit(run)


CASES = [
    (None, lb.QuantSpec("int4")),
    (lb.QuantSpec("int8"), lb.QuantSpec("int4", group_size=128)),
    (lb.QuantSpec("fp8_e4m3"), lb.QuantSpec("fp8_e4m3")),
    (lb.QuantSpec("mxfp8_e4m3"), lb.QuantSpec("mxfp4")),
    (None, lb.QuantSpec("nvfp4")),
    (lb.QuantSpec("int8", scale_dtype="bfloat16"), lb.QuantSpec("nf4")),
    (lb.QuantSpec("uint8"), lb.QuantSpec("uint4", group_size=64)),
    (lb.QuantSpec("mxint8"), lb.QuantSpec("mxfp6_e3m2")),
]


@pytest.mark.parametrize("ls,rs", CASES, ids=[
    f"{getattr(a, 'format', 'f32')}-{b.format}" for a, b in CASES])
def test_dot_general_fake_equals_real_reference(ls, rs):
  x, w = _xw()
  f, r = _fake_real(ls, rs)(x, w)
  np.testing.assert_allclose(np.asarray(f), np.asarray(r), **TOL)
  # Both equal the float matmul of the fake-quantized operands: unset axes are
  # the contraction axes (per token for x, per output channel / K-groups for w).
  xq = x if ls is None else _fq(x, ls, axis=1)
  wq = _fq(w, rs, axis=0)
  np.testing.assert_allclose(np.asarray(f), np.asarray(xq @ wq), **TOL)


def test_unset_axis_filled_with_contraction_axes():
  x = jax.random.normal(jax.random.key(1), (2, 4, 8, 64))  # [B, T, H, D]
  w = jax.random.normal(jax.random.key(2), (8, 64, 16))  # [H, D, N]
  dn = (((2, 3), (0, 1)), ((), ()))
  ls, rs = lb.QuantSpec("int8"), lb.QuantSpec("int4")
  f, r = _fake_real(ls, rs, dn)(x, w)
  xq = _fq(x, "int8", axis=(2, 3))
  wq = _fq(w, "int4", axis=(0, 1))
  ref = lax.dot_general(xq, wq, dn)
  np.testing.assert_allclose(np.asarray(f), np.asarray(ref), **TOL)
  np.testing.assert_allclose(np.asarray(r), np.asarray(ref), **TOL)
  # With a group size, groups run along the last contraction axis.
  rs = lb.QuantSpec("int4", group_size=32)
  f, _ = _fake_real(None, rs, dn)(x, w)
  wq = _fq(w, "int4", axis=1, group_size=32)
  np.testing.assert_allclose(np.asarray(f), np.asarray(lax.dot_general(x, wq, dn)),
                             **TOL)


def test_batched_dot_general():
  q = jax.random.normal(jax.random.key(3), (2, 16, 64))
  k = jax.random.normal(jax.random.key(4), (2, 32, 64))
  dn = (((2,), (2,)), ((0,), (0,)))
  spec = lb.QuantSpec("fp8_e4m3")
  f, r = _fake_real(spec, spec, dn)(q, k)
  assert f.shape == (2, 16, 32)
  np.testing.assert_allclose(np.asarray(f), np.asarray(r), **TOL)
  ref = lax.dot_general(_fq(q, "fp8_e4m3", axis=2),
                        _fq(k, "fp8_e4m3", axis=2), dn)
  np.testing.assert_allclose(np.asarray(f), np.asarray(ref), **TOL)


def test_einsum_fake_real_and_qarray_operand():
  x, w = _xw(seed=5)
  run = jax.jit(lambda a, b: (
      ops.einsum("mk,kn->mn", a, b, lhs_spec="int8", rhs_spec="int4"),
      ops.einsum("mk,kn->mn", a, b, lhs_spec="int8", rhs_spec="int4", mode="real"),
      ops.dot_general(a, b, DN, lhs_spec="int8", rhs_spec="int4")))
  e_fake, e_real, dg = run(x, w)
  np.testing.assert_allclose(np.asarray(e_fake), np.asarray(dg), **TOL)
  np.testing.assert_allclose(np.asarray(e_real), np.asarray(dg), **TOL)
  # A weight quantized ahead of time.
  qw = jax.jit(lambda v: lb.quantize(v, "int4", axis=0))(w)
  e_q = jax.jit(lambda a, q: ops.einsum("mk,kn->mn", a, q, lhs_spec="int8"))(x, qw)
  np.testing.assert_allclose(np.asarray(e_q), np.asarray(dg), **TOL)
  # Batched einsum with the contraction in the middle.
  a = jax.random.normal(jax.random.key(6), (2, 8, 32))
  b = jax.random.normal(jax.random.key(7), (2, 32, 4))
  y = jax.jit(lambda u, v: ops.einsum("bik,bkj->bij", u, v, lhs_spec="int8",
                                      rhs_spec="int8"))(a, b)
  ref = jnp.einsum("bik,bkj->bij", _fq(a, "int8", axis=2),
                   _fq(b, "int8", axis=1))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), **TOL)


def test_conv_fake_equals_real_and_per_channel_weights():
  x = jax.random.normal(jax.random.key(8), (2, 12, 12, 16))
  w = jax.random.normal(jax.random.key(9), (3, 3, 16, 8)) * 0.2
  dn = ("NHWC", "HWIO", "NHWC")

  @jax.jit
  def run(a, b):
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=dn,
              lhs_spec="int8", rhs_spec="int4")
    return (ops.conv_general_dilated(a, b, mode="fake", **kw),
            ops.conv_general_dilated(a, b, mode="real", **kw))

  f, r = run(x, w)
  np.testing.assert_allclose(np.asarray(f), np.asarray(r), **TOL)
  # Unset axes: weights per output channel (all but O share a scale), activations
  # per spatial position (over the input features).
  wq = _fq(w, "int4", axis=(0, 1, 2))
  xq = _fq(x, "int8", axis=3)
  ref = lax.conv_general_dilated(xq, wq, (1, 1), "SAME", dimension_numbers=dn)
  np.testing.assert_allclose(np.asarray(f), np.asarray(ref), **TOL)


def test_prepare_weight_is_k_major():
  x, w = _xw(seed=10)
  spec = lb.QuantSpec("int4", group_size=64)
  qw = ops.prepare_weight(w, spec)
  assert qw.shape == (48, 256) and qw.pack_axis == 1 and qw.spec.axis == 1
  assert qw.codes.shape == (48, 128) and qw.scale.shape == (48, 4)
  # A [N, K] weight (contracting=1) gives the same QArray.
  qw2 = ops.prepare_weight(w.T, spec, contracting=1)
  for a, b in zip(jax.tree.leaves(qw), jax.tree.leaves(qw2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  dn = (((1,), (1,)), ((), ()))
  y = ops.dot_general(x, qw, dn, mode="real", use_kernel="never")
  y_auto = ops.dot_general(x, qw, dn, mode="real")  # no CPU kernel: the reference
  ref = x @ _fq(w, "int4", axis=0, group_size=64)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), **TOL)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_auto))
  np.testing.assert_allclose(np.asarray(ops.dot_general(x, qw, dn, mode="fake")),
                             np.asarray(ref), **TOL)
  with pytest.raises(ValueError, match="2-d weight"):
    ops.prepare_weight(jnp.ones((2, 3, 4)), spec)


_ALL_4BIT = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4), jnp.dtype(jnp.float4_e2m1fn))


@pytest.mark.parametrize("fmt,kw", [
    ("fp4_e2m1", {}), ("fp4_e2m1", dict(group_size=32)), ("mxfp4", {}), ("nvfp4", {})])
def test_e2m1_codes_keep_the_dequantize_first_order(fmt, kw, monkeypatch):
  """E2M1 codes do not go into the dot by default (``ops._NATIVE_4BIT_DTYPES``:
  slower than dequantize-first on an H100), per channel or in groups, while
  int4 codes of the same layout do; the product is dequantize-first's."""
  monkeypatch.setattr(ops, "_compute_dtype", lambda dt: jnp.bfloat16)
  monkeypatch.setattr(ops, "_NATIVE_CODE_BACKENDS", (jax.default_backend(),))
  x, w = _xw(m=1, k=256, n=24, seed=15)
  xb = x.astype(jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  qw = ops.prepare_weight(w, lb.QuantSpec(fmt, **kw))
  grouped = qw.spec.group_size is not None
  qi = ops.prepare_weight(w, lb.QuantSpec("int4", group_size=qw.spec.group_size))
  order = ((lambda q: ops._group_scaled_dot(xb, q, dn, jnp.bfloat16, 1, None))
           if grouped else (lambda q: ops._scale_after_dot(q, dn, jnp.bfloat16)))
  assert order(qw) is None
  assert order(qi) is not None
  y = ops.dot_general(xb, qw, dn, mode="real", use_kernel="never")
  with monkeypatch.context() as mp:
    mp.setattr(ops, "_NATIVE_CODE_BACKENDS", ())
    want = ops.dot_general(xb, qw, dn, mode="real", use_kernel="never")
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("fmt,kw,after", [
    ("int8", {}, True), ("fp8_e4m3", {}, True), ("fp8_e5m2", dict(axis="tensor"), True),
    ("int4", {}, True), ("fp4_e2m1", {}, True), ("int4", dict(group_size=32), False),
    ("int8", dict(group_size=64), False), ("uint8", {}, True), ("uint4", {}, True),
    ("int3", {}, False)])
def test_16bit_reference_dot_scales_after_the_dot(fmt, kw, after, monkeypatch):
  """A bf16 dot (the path off the CPU) takes per-channel 8-bit codes as they are
  stored, and packed int4 / E2M1 codes as XLA's 4-bit dtypes (E2M1 where
  enabled: test_e2m1_codes_keep_the_dequantize_first_order), and scales its
  output; other weights are dequantized first."""
  monkeypatch.setattr(ops, "_compute_dtype", lambda dt: jnp.bfloat16)
  monkeypatch.setattr(ops, "_NATIVE_CODE_BACKENDS", (jax.default_backend(),))
  monkeypatch.setattr(ops, "_NATIVE_4BIT_DTYPES", _ALL_4BIT)
  x, w = _xw(m=4, k=128, n=24, seed=12)
  xb = x.astype(jnp.bfloat16)
  w = w.at[:, 5].set(jnp.nan)  # a NaN channel stays NaN
  qw = ops.prepare_weight(w, lb.QuantSpec(fmt, **kw))
  dn = (((1,), (1,)), ((), ()))
  post = ops._scale_after_dot(qw, dn, jnp.bfloat16)
  assert (post is not None) == after
  if after and qw.spec.storage_format.bits == 4:
    # 4-bit codes only where that order was measured (the GPU).
    with monkeypatch.context() as mp:
      mp.setattr(ops, "_NATIVE_CODE_BACKENDS", ())
      assert ops._scale_after_dot(qw, dn, jnp.bfloat16) is None
  assert ops._scale_after_dot(qw, dn, jnp.float32) is None  # float32: exact order
  if post is not None:
    # The codes the dot converts, times the output scale, are the weight
    # dequantize gives, bit for bit (4-bit codes: their nibble order too);
    # with a zero point, less its shift, to a float32 rounding.
    codes, s, shift = post
    got_w = np.asarray(codes.astype(jnp.float32)) * np.asarray(s)[:, None]
    want_w = np.asarray(lb.dequantize(qw), np.float32)
    assert (shift is not None) == (qw.zero_point is not None)
    if shift is None:
      np.testing.assert_array_equal(got_w, want_w)
    else:
      got_w = got_w - np.asarray(shift)[:, None]
      np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
  y = jax.jit(lambda a, q: ops.dot_general(a, q, dn, mode="real",
                                           use_kernel="never"))(xb, qw)
  assert y.dtype == jnp.bfloat16
  wq = np.asarray(lb.dequantize(qw), np.float64)  # [N, K]
  ref = np.asarray(xb, np.float64) @ wq.T
  got = np.asarray(y, np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
  assert np.isnan(got[:, 5]).all()
  ok = ~np.isnan(ref)
  # bf16 output rounding (and, dequantizing first, the bf16 weight's).
  np.testing.assert_allclose(got[ok], ref[ok], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt,kw,layout", [
    ("int4", dict(group_size=128), "nk"), ("int4", dict(group_size=32), "nk"),
    ("int8", dict(group_size=64), "nk"), ("fp4_e2m1", dict(group_size=32), "nk"),
    ("fp8_e4m3", dict(group_size=64), "nk"), ("mxfp4", {}, "nk"), ("nvfp4", {}, "nk"),
    # Zero points (asymmetric, as AWQ / GPTQ store int4).
    ("uint4", dict(group_size=128), "nk"), ("uint8", dict(group_size=32), "nk"),
    # [K, N] weights, scales along K: 8-bit codes (4-bit ones pack along N).
    ("int8", dict(group_size=64), "kn"), ("fp8_e4m3", dict(group_size=32), "kn"),
    ("uint8", dict(group_size=64), "kn")])
def test_16bit_reference_dot_sums_group_scaled_partials(fmt, kw, layout,
                                                        monkeypatch):
  """At small M a bf16 dot (off the CPU) takes a group-scaled weight's codes
  into a dot batched over the groups and sums the scaled partials: within
  float32 accumulation error of the float64 product with the dequantized
  weight, in both weight layouts and with zero points; NaN channels stay
  NaN; too many rows, or a float32 dot, keep the dequantize-first order.
  (E2M1 codes with the order enabled for them.)"""
  monkeypatch.setattr(ops, "_compute_dtype", lambda dt: jnp.bfloat16)
  monkeypatch.setattr(ops, "_NATIVE_CODE_BACKENDS", (jax.default_backend(),))
  monkeypatch.setattr(ops, "_NATIVE_4BIT_DTYPES", _ALL_4BIT)
  k, n = 256, 24
  x, w = _xw(m=2, k=k, n=n, seed=14)
  xb = x.astype(jnp.bfloat16)
  w = w.at[:, 5].set(jnp.nan)
  spec = lb.QuantSpec(fmt, **kw)
  if layout == "nk":
    qw, dn = ops.prepare_weight(w, spec), (((1,), (1,)), ((), ()))
  else:
    qw, dn = lb.quantize(w, spec.replace(axis=0)), (((1,), (0,)), ((), ()))
  ct = jnp.bfloat16
  got = jax.jit(lambda a, q: ops._group_scaled_dot(a, q, dn, ct, 2, None))(xb, qw)
  assert got is not None
  y = jax.jit(lambda a, q: ops.dot_general(
      a, q, dn, mode="real", use_kernel="never",
      preferred_element_type=jnp.float32))(xb, qw)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(got))
  # Leading activation axes (a [batch, tokens, K] input) come out in place.
  dn3 = ((((2,), dn[0][1])), ((), ()))
  y3 = jax.jit(lambda a, q: ops._group_scaled_dot(a, q, dn3, ct, 2, None))(
      xb.reshape(1, 2, k), qw)
  np.testing.assert_allclose(np.asarray(y3).reshape(2, n), np.asarray(got),
                             rtol=1e-6, atol=1e-6)
  wq = np.asarray(lb.dequantize(qw), np.float64)
  ref = np.asarray(xb, np.float64) @ (wq.T if layout == "nk" else wq)
  out = np.asarray(y, np.float64)
  assert np.isnan(out[:, 5]).all()
  ok = ~np.isnan(ref)
  np.testing.assert_array_equal(np.isnan(out), ~ok)
  err = np.abs(out[ok] - ref[ok]).max() / np.abs(ref[ok]).max()
  assert err < 1e-5, err
  # Rows beyond the group's share: no.
  rows = qw.spec.group_size // ops._GROUP_DOT_ROWS_PER_GROUP + 1
  assert ops._group_scaled_dot(xb, qw, dn, ct, rows, None) is None
  assert ops._group_scaled_dot(xb, qw, dn, jnp.float32, 2, None) is None


@pytest.mark.parametrize("fmt,kw,materialized", [
    ("int4", dict(group_size=32), True), ("int8", {}, False)])
def test_16bit_reference_dot_materializes_the_weight_at_large_m(fmt, kw, materialized,
                                                                 monkeypatch):
  """From _MATERIALIZE_MIN_ROWS rows on, a weight whose codes cannot go into the
  dot is dequantized behind an optimization barrier (its own pass before the
  GEMM): same numbers as the fused order, and the barrier is in the program."""
  monkeypatch.setattr(ops, "_compute_dtype", lambda dt: jnp.bfloat16)
  x, w = _xw(m=16, k=128, n=24, seed=13)
  xb = x.astype(jnp.bfloat16)
  qw = ops.prepare_weight(w, lb.QuantSpec(fmt, **kw))
  dn = (((1,), (1,)), ((), ()))
  f = jax.jit(lambda a, q: ops.dot_general(a, q, dn, mode="real", use_kernel="never"))
  monkeypatch.setattr(ops, "_MATERIALIZE_MIN_ROWS", 1 << 62)
  y_fused = f(xb, qw)
  # The dequantize itself may hold barriers (core._quantize._per_block on
  # CPU): the materialized order adds one.
  def barriers(a):
    return f.lower(a, qw).as_text().count("optimization_barrier")
  n_fused = barriers(xb)
  monkeypatch.setattr(ops, "_MATERIALIZE_MIN_ROWS", 16)
  f = jax.jit(lambda a, q: ops.dot_general(a, q, dn, mode="real", use_kernel="never"))
  assert (barriers(xb) > n_fused) == materialized
  np.testing.assert_array_equal(np.asarray(f(xb, qw), np.float32),
                                np.asarray(y_fused, np.float32))
  assert barriers(xb[:15]) == n_fused  # 15 rows: fused


def test_use_kernel_always_without_a_kernel_raises_on_cpu():
  x, w = _xw(seed=11)
  qw = ops.prepare_weight(w, "int4")
  dn = (((1,), (1,)), ((), ()))
  with pytest.raises(ValueError, match="use_kernel='always'.*no kernel supports"):
    ops.dot_general(x, qw, dn, mode="real", use_kernel="always")
  with pytest.raises(ValueError, match="use_kernel='always'.*K-major"):
    ops.dot_general(x, w, DN, rhs_spec="int4", mode="real", use_kernel="always")
  # Where no kernel is even tried, "always" was ignored and XLA ran.
  with pytest.raises(ValueError, match="neither a QArray nor given an rhs_spec"):
    ops.dot_general(x, w, DN, mode="real", use_kernel="always")
  with pytest.raises(ValueError, match="einsum runs XLA's einsum and never a kernel"):
    ops.einsum("mk,kn->mn", x, w, rhs_spec="int4", mode="real", use_kernel="always")
  with pytest.raises(ValueError, match="mode must be"):
    ops.dot_general(x, w, DN, rhs_spec="int4", mode="int")
  with pytest.raises(ValueError, match="use_kernel must be"):
    ops.dot_general(x, w, DN, rhs_spec="int4", use_kernel="sometimes")


def test_fake_mode_gradients_are_straight_through():
  x, w = _xw(seed=12)

  def loss(a, b):
    return jnp.sum(ops.dot_general(a, b, DN, lhs_spec="int8", rhs_spec="int4") ** 2)

  gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  xq = _fq(x, "int8", axis=1)
  wq = _fq(w, "int4", axis=0)
  ref_gx, ref_gw = jax.grad(lambda a, b: jnp.sum((a @ b) ** 2), argnums=(0, 1))(xq, wq)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(ref_gx), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(ref_gw), rtol=1e-4, atol=1e-4)


def test_real_mode_refuses_gradients_through_quantizing_in_the_call():
  # Rounding to codes has no derivative: the gradient was silently zero. A
  # weight quantized ahead of time stays differentiable in the activation.
  x, w = _xw(seed=15)
  for kw, argnums in ((dict(lhs_spec="int8"), 0), (dict(rhs_spec="int4"), 1),
                      (dict(lhs_spec="int8", rhs_spec="int4"), 0),
                      (dict(lhs_spec="int8", rhs_spec="int4"), 1)):
    side = r"activation \(lhs\)" if argnums == 0 else r"weight \(rhs\)"
    with pytest.raises(ValueError, match=f"mode='real' quantizes this float {side}"
                       ".*mode='fake'"):
      jax.grad(lambda a, b: ops.dot_general(a, b, DN, mode="real", **kw).sum(),
               argnums=argnums)(x, w)
  for f in (lambda a: ops.einsum("bk,kn->bn", a, w, lhs_spec="int8", mode="real"),):
    with pytest.raises(ValueError, match="mode='real' quantizes"):
      jax.grad(lambda a: f(a).sum())(x)
  qw = ops.prepare_weight(w, lb.QuantSpec("int4"))
  with jax.default_matmul_precision("float32"):   # (a GPU's default is TF32)
    gx = jax.grad(lambda a: ops.dot_general(a, qw, (((1,), (1,)), ((), ())),
                                            mode="real").sum())(x)
  np.testing.assert_allclose(np.asarray(gx), np.broadcast_to(
      np.asarray(lb.dequantize(qw)).sum(0), x.shape), rtol=1e-5, atol=1e-5)
  # Not differentiated, or differentiated elsewhere: no error.
  jax.grad(lambda a: ops.dot_general(a, jax.lax.stop_gradient(w), DN,
                                     rhs_spec="int4", mode="real").sum())(x)


def test_static_activation_range_and_stochastic_key():
  x, w = _xw(seed=13)
  y = ops.dot_general(x, w, DN, lhs_spec=lb.QuantSpec("int8", axis="tensor"),
                      rhs_spec="int8", lhs_amax=1.0)
  xq = lb.fake_quant(x, "int8", axis="tensor", amax=1.0)
  np.testing.assert_allclose(np.asarray(y),
                             np.asarray(xq @ _fq(w, "int8", axis=0)), **TOL)
  sr = lb.QuantSpec("int4", rounding="stochastic")
  k = jax.random.key(0)
  a = ops.dot_general(x, w, DN, rhs_spec=sr, key=k)
  b = ops.dot_general(x, w, DN, rhs_spec=sr, key=k, mode="real")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
  c = ops.dot_general(x, w, DN, rhs_spec=sr, key=jax.random.key(1))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_bf16_operands_keep_their_dtype():
  x, w = _xw(seed=14)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  f = ops.dot_general(xb, wb, DN, lhs_spec="int8", rhs_spec="int4")
  r = ops.dot_general(xb, wb, DN, lhs_spec="int8", rhs_spec="int4", mode="real")
  assert f.dtype == jnp.bfloat16 and r.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(f, np.float32), np.asarray(r, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_einsum_grad_spec_axes_are_the_outputs():
  # 'td,fd->ft' runs as a dot_general giving 'tf', then a transpose: an
  # explicit grad_spec axis was taken in that internal layout (dW off by 17).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) * jnp.array(
      [1e-3, 1.0, 1e2, 1e-2])[:, None]
  gs = lb.QuantSpec("int4", axis=1)   # one scale per output row f
  _, vjp = jax.vjp(lambda a, b: ops.einsum("td,fd->ft", a, b, grad_spec=gs), x, w)
  np.testing.assert_allclose(vjp(dy)[1], lb.fake_quant(dy, gs) @ x, rtol=1e-5, atol=1e-6)
  tiles = lb.QuantSpec("int8", tile=(2, 3))
  _, vjp = jax.vjp(lambda a, b: ops.einsum("td,fd->ft", a, b, grad_spec=tiles), x, w)
  np.testing.assert_allclose(vjp(dy)[1], lb.fake_quant(dy, tiles) @ x, rtol=1e-5, atol=1e-6)


def test_prepare_weight_reads_an_explicit_axis_in_the_given_layout():
  # QuantSpec(axis=0, group_size=128) of a [K, N] weight means groups along K;
  # prepare_weight applied it to the transpose (groups along N), silently.
  w = jax.random.normal(jax.random.key(0), (256, 128))
  for spec in (lb.QuantSpec("int4", axis=0, group_size=128),
               lb.QuantSpec("int8", axis=-1), lb.QuantSpec("int8", tile=(64, 32))):
    q = ops.prepare_weight(w, spec)
    np.testing.assert_array_equal(np.asarray(lb.dequantize(q)).T,
                                  np.asarray(lb.dequantize(lb.quantize(w, spec))))


def test_ragged_dot_rows_of_no_group_do_not_enter_the_ranges():
  # Rows past sum(group_sizes) belong to no expert; with 1000 in them a
  # per-tensor activation scale (and a calibrated range) was theirs.
  x = jax.random.normal(jax.random.key(0), (12, 32))
  w = jax.random.normal(jax.random.key(1), (2, 32, 16)) * 0.1
  gs = jnp.array([5, 3], jnp.int32)
  for mode in ("fake", "real"):
    f = lambda a: ops.ragged_dot(a, w, gs, lhs_spec=lb.QuantSpec("int8", axis="tensor"),  # noqa: E731
                                 rhs_spec="int8", mode=mode)
    np.testing.assert_array_equal(np.asarray(f(x.at[8:].set(1000.0))[:8]),
                                  np.asarray(f(x.at[8:].set(0.0))[:8]))
