"""Delayed-scaling histories: pure functions, and their use in the quantized ops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import ops
from lowbit_jax import scaling

DN = (((1,), (0,)), ((), ()))


def test_history_functions():
  h = scaling.init_history(3)
  assert h.dtype == jnp.float32 and h.tolist() == [0.0, 0.0, 0.0]
  h = scaling.update_history(h, 2.0)
  h = scaling.update_history(h, 5.0)
  h = scaling.update_history(h, 1.0)
  assert h.tolist() == [1.0, 5.0, 2.0]
  assert scaling.update_history(h, 4.0).tolist() == [4.0, 1.0, 5.0]
  assert float(scaling.amax_from_history(h)) == 5.0
  assert float(scaling.amax_from_history(h, "most_recent")) == 1.0
  with pytest.raises(ValueError, match="reduce"):
    scaling.amax_from_history(h, "mean")
  with pytest.raises(ValueError, match="positive"):
    scaling.init_history(0)
  with pytest.raises(ValueError, match="1-d"):
    scaling.update_history(jnp.zeros((2, 2)), 1.0)


def test_delayed_scaling_three_steps():
  """The histories come back as the 'gradient'; step 2 uses step 1's amax."""
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (8, 16))
  w = jax.random.normal(kw, (16, 4)) * 0.1
  ct = jax.random.normal(kc, (8, 4))
  specs = dict(lhs_spec="fp8_e4m3", rhs_spec="fp8_e4m3", grad_spec="fp8_e5m2")

  def loss(x, w, h):
    y = ops.dot_general(x, w, DN, amax_history=h, **specs)
    return jnp.sum(y * ct), y

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  fq = jax.jit(lambda v, a: lb.fake_quant(v, "fp8_e4m3", axis="tensor", amax=a))
  wa = float(jnp.max(jnp.abs(w)))
  h = {k: scaling.init_history(3) for k in ("lhs", "rhs", "grad")}
  scales = [1.0, 3.0, 0.5]
  amaxes = []
  for i, c in enumerate(scales):
    (_, _, new_h), y = step(x * c, w, h)
    ax = float(jnp.max(jnp.abs(x * c)))
    amaxes.append(ax)
    if i == 1:
      # Step 2's forward quantizes x with step 1's amax, not its own.
      ref = fq(x * c, amaxes[0]) @ fq(w, wa)
      np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6)
      own = fq(x * c, ax) @ fq(w, wa)
      assert not np.allclose(np.asarray(y), np.asarray(own), rtol=1e-6)
    h = new_h
  expect = [amaxes[2], amaxes[1], amaxes[0]]
  np.testing.assert_allclose(np.asarray(h["lhs"]), expect, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(h["rhs"]), [wa] * 3, rtol=1e-7)
  # dy = ct whatever the step: its amax is recorded three times.
  np.testing.assert_allclose(np.asarray(h["grad"]), [float(jnp.max(jnp.abs(ct)))] * 3,
                             rtol=1e-7)


def test_delayed_scaling_gradient_is_straight_through_past_the_history():
  # A value above its history's range saturates in the forward; its gradient
  # passes straight through, as Transformer Engine's and flax's fp8 casts do
  # (it was zeroed: a weight growing past its history learned every other step).
  w = jnp.array([[1.0], [2.0], [3.0], [0.5]])
  x = jnp.ones((1, 4))
  h = {"rhs": scaling.update_history(scaling.init_history(4), 2.9)}
  g = jax.grad(lambda w: jnp.sum(ops.dot_general(
      x, w, DN, rhs_spec="fp8_e4m3", amax_history=h)))(w)
  np.testing.assert_array_equal(np.asarray(g), np.ones((4, 1)))


def test_history_needs_a_per_tensor_spec():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 2))
  h = scaling.init_history(4)
  with pytest.raises(ValueError, match="per-tensor"):
    ops.dot_general(x, w, DN, lhs_spec=lb.QuantSpec("int8", axis=1),
                    amax_history={"lhs": h})
  with pytest.raises(ValueError, match="per-tensor"):
    ops.dot_general(x, w, DN, rhs_spec="mxfp8_e4m3", amax_history={"rhs": h})
  with pytest.raises(ValueError, match="grad_spec"):
    ops.dot_general(x, w, DN, lhs_spec="int8", amax_history={"grad": h})
  with pytest.raises(ValueError, match="fake"):
    ops.dot_general(x, w, DN, lhs_spec="int8", amax_history={"lhs": h}, mode="real")
