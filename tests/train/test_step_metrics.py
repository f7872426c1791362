"""The jitted training step returns the metrics known at trace time from the
host: the same metrics as ``train_step``, without a device copy for each
constant (``train.split_constant_metrics``)."""
import functools
import re

import jax
import numpy as np
import pytest

from lowbit_jax import train
from lowbit_jax.models.llama import Llama

from tests.train._helpers import batches, synthetic_data, tiny_config


def _constant_copies(hlo: str) -> int:
  """``copy`` ops of constants in a compiled program (one per constant output)."""
  consts = set(re.findall(r"%(\S+) = \S+ constant\(", hlo))
  return sum(1 for a in re.findall(r"= \S+ copy\(%(\S+)\)", hlo) if a in consts)


def test_sharded_step_returns_constant_metrics_from_the_host():
  # MXFP8 weights and activations: dynamic ranges, whose clipped fractions are
  # zero by construction (gradients left unquantized: a smaller program to
  # compile, the same metrics).
  model = Llama(tiny_config())
  recipe = train.recipe_from_config({"quant": {"rules": "mxfp8", "grad": "none"}})
  tx = recipe.optimizer(train.make_optimizer(1e-2, 1, 10), train.make_schedule(1e-2, 1, 10),
                        b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  mesh = train.make_mesh("data:1")
  layout = train.Layout(mesh)
  init = functools.partial(train.loop._fresh_state, model, tx, recipe, None)  # pylint: disable=protected-access
  batch = train.shard_batch(batches(synthetic_data(n_train=2000, n_heldout=100), 1)[0], mesh)
  fresh = lambda: recipe.init_from_data(  # noqa: E731
      model, init(jax.random.key(0)), batch[:, :-1], layout)

  plain = functools.partial(train.train_step, model=model, tx=tx, recipe=recipe)
  plain_c = jax.jit(plain).lower(fresh(), batch).compile()
  want_state, want = plain_c(fresh(), batch)
  step = train.make_train_step(model, tx, layout, recipe=recipe)
  got_state, got = step(fresh(), batch)

  # The same metrics, leaf for leaf; the clipped fractions are numpy zeros.
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  clipped = [v for p, v in jax.tree.leaves_with_path(got["quant_metrics"])
             if "clipped" in jax.tree_util.keystr(p)]
  assert clipped and all(isinstance(v, np.generic) and v == 0 for v in clipped)
  for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The plain step copies each constant into an output on the device; the
  # split one has none of those copies and returns fewer arrays.
  # The program ShardedStep runs (train.split_constant_metrics of the step).
  fn, rebuild = step._compiled(got_state, batch)  # pylint: disable=protected-access
  assert _constant_copies(plain_c.as_text()) >= len(clipped)
  assert _constant_copies(fn.lower(fresh(), batch).compile().as_text()) == 0
  _, dynamic = fn(fresh(), batch)
  # (also moe_aux_loss and scale_grad_norm: no MoE layer, no learned scale)
  consts = [v for v in jax.tree.leaves(got) if isinstance(v, np.generic)]
  assert len(consts) == len(clipped) + 2
  assert len(dynamic) == len(jax.tree.leaves(want)) - len(consts)
  np.testing.assert_array_equal(np.asarray(rebuild(dynamic)["loss"]),
                                np.asarray(want["loss"]))


def test_split_constant_metrics_puts_the_constants_back_and_refuses_mixups():
  def step(state, batch):
    return state + 1, {"loss": jax.numpy.sum(batch), "zero": np.float32(0.0),
                       "more": {"c": np.float32(2.0), "d": state * 2}}

  traced, rebuild = train.split_constant_metrics(step)
  with pytest.raises(RuntimeError, match="before the step was traced"):
    rebuild([])
  fn = jax.jit(traced)
  new, dynamic = fn(jax.numpy.float32(1.0), jax.numpy.ones(3))
  assert float(new) == 2.0 and len(dynamic) == 2   # loss and d; not the constants
  m = rebuild(dynamic)
  assert m["zero"] == 0 and isinstance(m["zero"], np.generic)
  assert m["more"]["c"] == 2.0 and float(m["more"]["d"]) == 2.0 and float(m["loss"]) == 3.0
  with pytest.raises(RuntimeError, match="1 traced metrics, but the last trace recorded 2"):
    rebuild(dynamic[:1])


def test_constants_that_depend_on_the_batch_shape_follow_each_call():
  # A step whose trace-time metric comes from the batch's shape: each shape
  # has its own program, and each call gets its own shape's constant (one
  # split for all shapes gave the last traced shape's to every call).
  from lowbit_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  traces = []

  def step(s, batch):
    traces.append(batch.shape)
    return s, {"loss": jax.numpy.sum(batch), "rows": np.float32(batch.shape[0])}

  ss = train.ShardedStep(step, train.Layout(train.make_mesh("data:1")))
  st = state_lib.TrainState(step=jax.numpy.int32(0),
                            params={"w": jax.numpy.ones((4, 4))}, opt_state={})
  for rows in (2, 4, 2, 4, 4, 2):
    st, m = ss(st, jax.numpy.ones((rows, 8), jax.numpy.int32))
    assert m["rows"] == rows and int(m["loss"]) == 8 * rows
  assert sorted(set(traces)) == [(2, 8), (4, 8)]


def test_split_constant_metrics_refuses_a_trace_with_other_constants():
  def step(state, batch):
    return state, {"loss": jax.numpy.sum(batch), "rows": np.float32(batch.shape[0]),
                   "nan": np.float32(np.nan)}

  traced, rebuild = train.split_constant_metrics(step)
  fn = jax.jit(traced)
  _, dyn = fn(jax.numpy.float32(0), jax.numpy.ones(3))
  assert rebuild(dyn)["rows"] == 3 and np.isnan(rebuild(dyn)["nan"])
  fn(jax.numpy.float32(0), jax.numpy.ones(3, jax.numpy.int32))  # equal constants (NaN too)
  with pytest.raises(ValueError, match=r"other trace-time metrics .*metrics\['rows'\]: .*3\.0.* then .*5\.0"):
    fn(jax.numpy.float32(0), jax.numpy.ones(5))
