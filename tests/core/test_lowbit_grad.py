"""Quantized gradients in ops: grad_spec, blocking of the backward matmuls."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import ops
from lowbit_jax.core import as_spec

S = lb.QuantSpec
DN = (((1,), (0,)), ((), ()))  # x [M, K] @ w [K, N]
TOL = dict(rtol=1e-5, atol=1e-5)


def _xwc(m=32, k=64, n=32, seed=0):
  kx, kw, kc = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n)) * 0.1,
          jax.random.normal(kc, (m, n)))


def _grads(x, w, ct, **kw):
  f = lambda x, w: jnp.sum(ops.dot_general(x, w, DN, **kw) * ct)  # noqa: E731
  return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)


@functools.lru_cache(maxsize=None)
def _fq_fn(spec):
  return jax.jit(lambda v: lb.fake_quant(v, spec))


def _fq(v, spec, axis):
  """jit'd fake_quant (eager dispatch of its many small ops compiles slowly)."""
  return _fq_fn(as_spec(spec, axis=axis))(v)


@functools.lru_cache(maxsize=None)
def _ste_fn(spec):
  return jax.jit(lambda v, ct: jax.vjp(lambda a: lb.fake_quant(a, spec), v)[1](ct)[0])


def _ste(v, spec, axis, ct):
  """The forward quantizer's own (straight-through) gradient applied to ct."""
  return _ste_fn(as_spec(spec, axis=axis))(v, ct)


@pytest.mark.parametrize("ls,rs,gs", [("fp8_e4m3", "fp8_e4m3", "fp8_e5m2"),
                                      ("int8", "int8", "int8")])
def test_per_tensor_grad_spec_matches_reference(ls, rs, gs):
  x, w, ct = _xwc()
  gx, gw = _grads(x, w, ct, lhs_spec=ls, rhs_spec=rs, grad_spec=gs)
  xq, wq = _fq(x, ls, 1), _fq(w, rs, 0)  # per token, per output channel
  gq = _fq(ct, gs, "tensor")  # unset grad axis: one per-tensor quantization
  np.testing.assert_allclose(np.asarray(gx), np.asarray(_ste(x, ls, 1, gq @ wq.T)),
                             **TOL)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(_ste(w, rs, 0, xq.T @ gq)),
                             **TOL)
  # The quantized gradient differs from the unquantized one.
  gx0, _ = _grads(x, w, ct, lhs_spec=ls, rhs_spec=rs)
  assert not np.allclose(np.asarray(gx), np.asarray(gx0), rtol=1e-6)


@pytest.mark.parametrize("fwd,bwd", [
    ("mxfp8_e4m3", "mxfp8_e5m2"),
    pytest.param("mxfp4", "mxfp4", marks=pytest.mark.slow)])
def test_block_grad_spec_reblocks_every_backward_matmul(fwd, bwd):
  x, w, ct = _xwc()
  gx, gw = _grads(x, w, ct, lhs_spec=fwd, rhs_spec=fwd, grad_spec=bwd)
  # dx = q(dy along N) . q(W along N)^T, then x's forward quantizer (along K).
  dx = _fq(ct, bwd, 1) @ _fq(w, fwd, 1).T
  # dW = q(x along M)^T . q(dy along M), then W's forward quantizer (along K).
  dw = _fq(x, fwd, 0).T @ _fq(ct, bwd, 0)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(_ste(x, S(fwd), 1, dx)), **TOL)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(_ste(w, S(fwd), 0, dw)), **TOL)
  # Blocking along the forward axes instead gives other numbers.
  wrong = _fq(ct, bwd, 1) @ _fq(w, fwd, 0).T
  assert not np.allclose(np.asarray(dx), np.asarray(wrong), rtol=1e-4)


def test_without_grad_spec_gradients_are_unchanged():
  x, w, ct = _xwc()
  gx, gw = _grads(x, w, ct, lhs_spec="int8", rhs_spec="int4")
  ref = jax.jit(jax.grad(
      lambda x, w: jnp.sum((lb.fake_quant(x, "int8", axis=1)
                            @ lb.fake_quant(w, "int4", axis=0)) * ct),
      argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(ref[0]), **TOL)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(ref[1]), **TOL)


@pytest.mark.parametrize("gs", ["int8", pytest.param("fp8_e5m2",
                                                       marks=pytest.mark.slow)])
def test_stochastic_gradient_rounding_is_unbiased(gs):
  x, w, ct = _xwc(m=8, k=16, n=8)
  spec = S(gs, rounding="stochastic")

  def dx(key):
    f = lambda x: jnp.sum(ops.dot_general(x, w, DN, grad_spec=spec, key=key) * ct)  # noqa
    return jax.grad(f)(x)

  keys = jax.random.split(jax.random.key(3), 256)
  many = jax.jit(jax.vmap(dx))(keys)
  exact = np.asarray(ct @ w.T)
  one = np.abs(np.asarray(many[0]) - exact).mean()
  mean = np.abs(np.asarray(many.mean(0)) - exact).mean()
  assert one > 0
  assert mean < 0.15 * one  # 256 draws: the error of the mean shrinks ~sqrt(256) = 16
  with pytest.raises(ValueError, match="stochastic"):
    ops.dot_general(x, w, DN, grad_spec=spec)


def test_attention_einsum_both_operands_quantized():
  kq, kk, kc = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(kq, (1, 32, 2, 32))  # b q h d
  k = jax.random.normal(kk, (1, 32, 2, 32))  # b k h d
  ct = jax.random.normal(kc, (1, 2, 32, 32))  # b h q k
  fs, gs = S("mxfp8_e4m3"), S("mxfp8_e5m2")

  def f(q, k):
    y = ops.einsum("bqhd,bkhd->bhqk", q, k, lhs_spec=fs, rhs_spec=fs, grad_spec=gs)
    return jnp.sum(y * ct), y

  (gq, gk), y = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(q, k)
  qf, kf = _fq(q, fs, 3), _fq(k, fs, 3)
  np.testing.assert_allclose(np.asarray(y),
                             np.asarray(jnp.einsum("bqhd,bkhd->bhqk", qf, kf)), **TOL)
  # dq contracts over k: dy blocked along k, k re-quantized along its k axis.
  dq = jnp.einsum("bhqk,bkhd->bqhd", _fq(ct, gs, 3), _fq(k, fs, 1))
  dk = jnp.einsum("bhqk,bqhd->bkhd", _fq(ct, gs, 2), _fq(q, fs, 1))
  np.testing.assert_allclose(np.asarray(gq), np.asarray(_ste(q, fs, 3, dq)), **TOL)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(_ste(k, fs, 3, dk)), **TOL)


def test_learned_scales_through_dot_general():
  x, w, ct = _xwc(m=8, k=32, n=8)
  rs = S("int4")
  s = lb.init_scale(w, ops.operand_spec(rs, (0,), 2))
  assert s.shape == lb.scale_shape(w.shape, rs.replace(axis=0)) == (1, 8)
  f = lambda s: jnp.sum(ops.dot_general(x, w, DN, rhs_spec=rs, rhs_scale=s) * ct)  # noqa
  ref = lambda s: jnp.sum((x @ lb.fake_quant(w, rs, axis=0, scale=s)) * ct)  # noqa
  np.testing.assert_allclose(np.asarray(jax.grad(f)(s)), np.asarray(jax.grad(ref)(s)),
                             **TOL)


def test_grad_spec_errors():
  x, w, _ = _xwc(m=8, k=32, n=8)
  with pytest.raises(ValueError, match="mode='fake'"):
    ops.dot_general(x, w, DN, rhs_spec="int8", grad_spec="int8", mode="real")
  with pytest.raises(ValueError, match="multiple of the block size"):
    ops.dot_general(x, w, DN, lhs_spec="mxfp8_e4m3", grad_spec="mxfp8_e5m2")
  with pytest.raises(ValueError, match="grad_spec"):
    ops.conv_general_dilated(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1),
                             "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                             grad_spec="mxfp8_e5m2")


@pytest.mark.slow
def test_conv_grad_spec():
  img = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  ker = jax.random.normal(jax.random.key(2), (3, 3, 4, 6)) * 0.2
  dn = ("NHWC", "HWIO", "NHWC")
  ct = jax.random.normal(jax.random.key(3), (2, 8, 8, 6))
  conv = lambda a, b, **kw: ops.conv_general_dilated(  # noqa: E731
      a, b, (1, 1), "SAME", dimension_numbers=dn, lhs_spec="int8", rhs_spec="int8", **kw)
  gi, gk = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b, grad_spec="int8") * ct),
                            argnums=(0, 1)))(img, ker)
  gq = _fq(ct, "int8", "tensor")
  ref = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b) * gq), argnums=(0, 1)))(img,
                                                                                ker)
  np.testing.assert_allclose(np.asarray(gi), np.asarray(ref[0]), **TOL)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(ref[1]), **TOL)
