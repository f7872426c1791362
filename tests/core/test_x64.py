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


def test_round_to_dtype_of_float64_rounds_as_the_convert_does(x64):
  # Through float32, as XLA's CPU convert from float64 does, and with no
  # convert pair for XLA on a GPU to drop (tests/_excess_precision.py).
  del x64
  from lowbit_jax.core._cast import round_to_dtype  # pylint: disable=import-outside-toplevel
  from tests._excess_precision import Counter, as_gpu_xla  # pylint: disable=import-outside-toplevel
  x = jnp.asarray([1 + 2.0 ** -8 + 2.0 ** -30, 1.3, -2.5e-6, 7e4], jnp.float64)
  for dt in (jnp.bfloat16, jnp.float16):
    want = np.asarray(jax.jit(lambda a, dt=dt: a.astype(dt).astype(jnp.float64))(x))
    c = Counter()
    got = np.asarray(as_gpu_xla(lambda a, dt=dt: round_to_dtype(a, dt), c)(x))
    assert got.dtype == np.float64 and c.dropped == 0
    np.testing.assert_array_equal(got, want)
