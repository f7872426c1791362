"""experiments/probe_l2_bands: its banded programs compute what the two-pass
one does (the probe times them on a GPU; here they run on the CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import probe_l2_bands


@pytest.mark.parametrize("bands", [2, 4])
def test_banded_programs_give_the_two_pass_codes(bands):
  k, n = 128, 256
  progs = probe_l2_bands.programs(k, n, [bands])
  x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32).astype(
      jnp.bfloat16)
  x = x.at[:, 3].set(0)  # a zero column (scale 1 by the program's rule)
  q0, a0 = progs["two_pass"](x)
  q, a = progs[f"bands_{bands}_dus"](x)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a0))
  parts, a = progs[f"bands_{bands}_parts"](x)
  assert len(parts) == bands
  np.testing.assert_array_equal(
      np.concatenate([np.asarray(p) for p in parts], axis=1), np.asarray(q0))
  # every band's quantize is its own fusion after its own amax
  assert probe_l2_bands.fusions(progs[f"bands_{bands}_parts"], x) >= 2 * bands
