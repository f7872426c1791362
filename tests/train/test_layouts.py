"""Every mesh layout trains like one device: float, QAT (W4A8 LSQ), FP8 and MX.

Each case runs the same steps on one device and on a mesh (parameters,
optimizer states and learned scales laid out by ``LLAMA_RULES``) and compares
the losses and the final parameters to float tolerance. One float case on the
mixed mesh runs by default; the full grid is ``--runslow``.
"""
import functools

import jax
import numpy as np
import pytest

from lowbit_jax import train
from lowbit_jax.models.llama import Llama

from tests.train._helpers import batches, synthetic_data, tiny_config

MESHES = ("data:8", "fsdp:8", "tensor:2,data:4", "data:2,fsdp:2,tensor:2")
KINDS = ("float", "w4a8", "fp8_delayed", "mxfp8", "float_4bit_moments")
STEPS = 3


@functools.lru_cache(maxsize=None)
def _data():
  return synthetic_data()


@functools.lru_cache(maxsize=None)
def _setup(kind: str):
  """(model, tx, recipe) of one kind of training."""
  model = Llama(tiny_config())
  fmt = "4bit" if kind == "float_4bit_moments" else "float32"
  if kind == "float_4bit_moments":
    model = Llama(tiny_config(d_model=64, d_ff=128))
  tx = train.make_optimizer(1e-2, 1, 10, state_format=fmt)
  recipe = None
  if not kind.startswith("float"):
    # "<rules>_nograd": the scheme with its gradients left unquantized
    rules, nograd = (kind[:-7], True) if kind.endswith("_nograd") else (kind, False)
    quant = {"rules": rules, **({"grad": "none"} if nograd else {})}
    recipe = train.recipe_from_config({"quant": quant})
    tx = recipe.optimizer(tx, train.make_schedule(1e-2, 1, 10), b1=0.9, b2=0.95,
                          eps=1e-8, clip_norm=1.0)
  return model, tx, recipe


@functools.lru_cache(maxsize=None)
def step_fn(kind: str, mesh_spec: str) -> train.ShardedStep:
  """The jitted step of one kind on one mesh (compiled once per test session)."""
  model, tx, recipe = _setup(kind)
  return train.make_train_step(model, tx, train.Layout(train.make_mesh(mesh_spec)),
                               recipe=recipe)


def run(kind: str, mesh_spec: str, steps: int = STEPS):
  """Trains ``steps`` steps; returns (losses, final state, step function)."""
  model, tx, recipe = _setup(kind)
  step = step_fn(kind, mesh_spec)
  layout = step.layout
  mesh = layout.mesh
  init = functools.partial(train.loop._fresh_state, model, tx, recipe, None)  # pylint: disable=protected-access
  shardings = train.state_shardings(jax.eval_shape(init, jax.random.key(0)), layout)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  data = batches(_data(), steps)
  if recipe is not None:
    state = recipe.init_from_data(model, state,
                                  train.shard_batch(data[0], mesh)[:, :-1], layout)
  losses = []
  for b in data:
    state, metrics = step(state, train.shard_batch(b, mesh))
    losses.append(float(metrics["loss"]))
  return losses, state, step


@functools.lru_cache(maxsize=None)
def reference(kind: str):
  losses, state, _ = run(kind, "data:1")
  return losses, jax.device_get(state)


# Per-tensor FP8 with a tensor-parallel mesh: a row-parallel matmul sums its
# partial products across devices, in another order than one device, so its
# outputs differ in the last float32 bits; an FP8 (e5m2) gradient rounding
# near a boundary then takes the neighbouring value, and AdamW's normalized
# step turns a near-zero gradient of the other sign into an update of about
# the learning rate. Measured (fp8_delayed, tensor:2,data:4, 3 steps): the
# amax histories of steps 1-2 equal one device's to 4e-7 (the global amax is
# right), the parameters equal after step 1 (0.0), 5e-5 apart after step 2,
# and after step 3 36 of the embedding's 8192 values differ by more than 1e-3
# (at most 0.012), every parameter's mean |difference| is at most 2.2e-4, the
# loss 3.5e-5 relative. Such cases are checked to those bounds: the loss to
# 1e-4, each parameter's mean |difference| to 0.05 learning rates (5e-4; the
# float and FP8 runs on one device, two different computations, are 1.4e-3
# apart) and its largest to 2 learning rates. An FSDP mesh flips the same
# roundings (session 46, 3 steps: fsdp:8's loss 3.5e-5 relative from one
# device's and its parameters' mean |difference| at most 2.2e-4, as
# tensor:2,data:4's; data:8's loss 1.6e-7), and only through the gradients'
# FP8: with them unquantized fsdp:8 trains as one device to float tolerance
# (its loss 1.6e-7 relative; test_fp8_flips_come_from_the_gradients_rounding).
_FLIPS = {"fp8_delayed"}
_LR = 1e-2


def _check(kind, mesh_spec):
  ref_losses, ref_state = reference(kind)
  losses, state, _ = run(kind, mesh_spec)
  flips = kind in _FLIPS and ("tensor" in mesh_spec or "fsdp" in mesh_spec)
  tol = 1e-4 if flips else 2e-5
  np.testing.assert_allclose(losses, ref_losses, rtol=tol, atol=tol)
  assert losses[-1] != losses[0]   # it trained
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    a, b = np.asarray(a), np.asarray(b)
    if not flips:
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)
      continue
    d = np.abs(a - b)
    assert d.mean() <= 0.05 * _LR and d.max() <= 2 * _LR, (d.mean(), d.max(), a.shape)
  for a, b in zip(jax.tree.leaves(state.quant_scales),
                  jax.tree.leaves(ref_state.quant_scales)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)
  return state


def test_mixed_mesh_float_matches_one_device():
  state = _check("float", "data:2,fsdp:2,tensor:2")
  q = state.params["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(q.addressable_shards[0].data.shape) == 2
  assert q.addressable_shards[0].data.shape == (16, 16)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_matches_one_device(kind, mesh_spec):
  state = _check(kind, mesh_spec)
  if kind == "w4a8":
    assert jax.tree.leaves(state.quant_scales), "LSQ learns scales"
  if kind == "fp8_delayed":
    hist = jax.tree.leaves(state.quant_state)
    assert hist and all(np.asarray(h).shape == (16,) for h in hist)
    assert any(np.count_nonzero(np.asarray(h)) == STEPS for h in hist)


@pytest.mark.slow
def test_fp8_flips_come_from_the_gradients_rounding():
  # fp8_delayed's FSDP case gets the flip bounds above; without its E5M2
  # gradients the same mesh agrees with one device to float tolerance.
  state = _check("fp8_delayed_nograd", "fsdp:8")
  assert jax.tree.leaves(state.quant_state)
