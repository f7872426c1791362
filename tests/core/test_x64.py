"""Under jax_enable_x64, float64 inputs are refused, not computed in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_float64_is_refused_clearly(x64):
  del x64
  x = jnp.array([[1e300, 2e300, -1e300, 5e299]], jnp.float64)
  assert x.dtype == jnp.float64
  spec = lb.QuantSpec("int8", axis=-1)
  for fn in (lb.fake_quant, lb.quantize):
    with pytest.raises(TypeError, match="do not take float64"):
      fn(x, spec)
  # float32 still works with x64 on.
  y = lb.fake_quant(jnp.array([[1.0, 2.0, -3.0, 4.0]], jnp.float32), spec)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, [[1.0, 2.0, -3.0, 4.0]], rtol=0.02)
