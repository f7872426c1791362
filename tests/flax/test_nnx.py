"""quantize_nnx: graph rewrite of Linear/LinearGeneral/Einsum/Conv op attributes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax._rules import QuantConfig, QuantRule, QWeight
from lowbit_jax.flax import QuantOp, QuantStat, finalize_nnx, quantize_nnx
from tests import _toy_models as toy

_fq = jax.jit(lb.fake_quant, static_argnums=1)


def _run(m, t):
  return nnx.jit(lambda m, t: m(t))(m, t)


@pytest.fixture(scope="module")
def linen_params():
  _, v = toy.init_linen()
  return v["params"]


def test_same_variables_and_fp_checkpoints_still_load(linen_params):
  m = toy.nnx_from_linen(linen_params)
  t = toy.tokens()
  y_fp = _run(m, t)
  cfg = QuantConfig([QuantRule(".*", weight="int8")])
  qm = quantize_nnx(m, cfg)
  assert cfg.unused_rules() == []
  assert isinstance(qm.layers_0.up.dot_general, QuantOp)
  assert isinstance(qm.head.einsum_op, QuantOp)
  assert isinstance(qm.layers_0.conv.conv_general_dilated, QuantOp)
  assert m.layers_0.up.dot_general is jax.lax.dot_general  # input graph unchanged
  assert qm.layers_0.up.kernel is m.layers_0.up.kernel      # the same Variable
  params = nnx.state(qm, nnx.Param)
  assert jax.tree.structure(params) == jax.tree.structure(nnx.state(m, nnx.Param))
  # A float checkpoint (here: another model's Param state) loads unchanged.
  other = toy.nnx_from_linen(jax.tree.map(lambda x: x * 0.5, linen_params))
  nnx.update(qm, nnx.state(other, nnx.Param))
  y_half = _run(qm, t)
  want = _run(quantize_nnx(other, [QuantRule(".*", weight="int8")]), t)
  np.testing.assert_array_equal(y_half, want)
  assert not np.allclose(y_half, y_fp, atol=1e-3)


def test_fake_matches_manual_and_grads(linen_params):
  t = toy.tokens()
  qm = quantize_nnx(toy.nnx_from_linen(linen_params),
                    [QuantRule(".*/(up|down)", weight="int4")])
  pq = dict(linen_params)
  for i in (0, 1):
    blk = dict(pq[f"layers_{i}"])
    for n in ("up", "down"):
      blk[n] = dict(blk[n], kernel=_fq(blk[n]["kernel"], lb.QuantSpec("int4", axis=0)))
    pq[f"layers_{i}"] = blk
  np.testing.assert_allclose(_run(qm, t), _run(toy.nnx_from_linen(pq), t),
                             rtol=1e-5, atol=1e-5)

  def loss(m):
    return jnp.sum(jnp.tanh(m(t)))
  g = nnx.jit(nnx.grad(loss))(qm)
  up = g["layers_0"]["up"]["kernel"].get_value()
  assert float(jnp.abs(up).sum()) > 0


def test_real_mode_packs_kernels_in_place(linen_params):
  t = toy.tokens()
  rules = [QuantRule(".*", weight=lb.QuantSpec("int4", group_size=16),
                     activation="int8")]
  fake = _run(quantize_nnx(toy.nnx_from_linen(linen_params), rules), t)
  m = toy.nnx_from_linen(linen_params)
  steps = []
  qm = quantize_nnx(m, rules, mode="real", on_step=lambda p, q: steps.append(p))
  assert "layers_0/up/kernel" in steps and len(steps) == 15
  k = qm.layers_0.up.kernel.get_value()
  assert isinstance(k, QWeight) and k.transposed
  assert isinstance(qm.layers_0.o.kernel.get_value(), QWeight)
  assert isinstance(qm.head.kernel.get_value(), QWeight)
  assert m.layers_0.up.kernel.get_value() is not None  # shared Variable
  fp_bytes = sum(x.nbytes for x in jax.tree.leaves(linen_params))
  q_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(qm, nnx.Param)))
  assert q_bytes < 0.45 * fp_bytes, (q_bytes, fp_bytes)  # embedding stays float
  np.testing.assert_allclose(_run(qm, t), fake, rtol=1e-5, atol=1e-5)


def test_calibrate_stats_are_not_params(linen_params):
  rules = [QuantRule(".*/(up|down)", weight="int8", activation="int8", static=True)]
  m = quantize_nnx(toy.nnx_from_linen(linen_params), rules, mode="calibrate")
  for s in range(3):
    _run(m, toy.tokens(s))
  stat = m.layers_0.up.dot_general.stats
  assert isinstance(stat, QuantStat) and int(stat.get_value()["batches"]) == 3
  param_paths = [jax.tree_util.keystr(kp) for kp, _ in
                 jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param))]
  assert param_paths and not [p for p in param_paths if "stats" in p]
  assert len(jax.tree.leaves(nnx.state(m, QuantStat))) == 4 * 3
  t = toy.tokens(0)
  static = quantize_nnx(m, rules)  # keeps the QuantStats
  a = _run(static, t)
  finalize_nnx(static)
  assert set(static.layers_0.up.dot_general.stats.get_value()) == {"amax"}
  np.testing.assert_array_equal(_run(static, t), a)
  with pytest.raises(ValueError, match="no calibration statistics"):
    _run(quantize_nnx(toy.nnx_from_linen(linen_params), rules), t)
  # Re-quantizing with rules that no longer match restores the float ops.
  back = quantize_nnx(static, [QuantRule("nothing", weight="int8")])
  assert back.layers_0.up.dot_general is jax.lax.dot_general
  np.testing.assert_allclose(_run(back, t), _run(toy.nnx_from_linen(linen_params), t),
                             rtol=1e-6, atol=1e-6)
  # QAT with static ranges: the optimizer updates Params, not the statistics.
  before = jax.tree.map(jnp.copy, stat.get_value())
  k_before = jnp.copy(static.layers_0.up.kernel.get_value())
  opt = nnx.Optimizer(static, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def train_step(m, opt, t):
    g = nnx.grad(lambda m: jnp.mean(m(t) ** 2))(m)
    opt.update(m, g)
  train_step(static, opt, t)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(stat.get_value())):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(k_before, static.layers_0.up.kernel.get_value())


def test_unsupported_layer_and_unknown_format():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(4, 8, rngs=rngs)
      self.up = nnx.ConvTranspose(8, 4, kernel_size=(3,), rngs=rngs)

  m = Model(nnx.Rngs(0))
  with pytest.raises(ValueError, match="'up', a ConvTranspose layer"):
    quantize_nnx(m, [QuantRule(".*", weight="int8")])
  cfg = QuantConfig([QuantRule("up"), QuantRule(".*", weight="int8"),
                     QuantRule("nowhere", weight="int8")])
  quantize_nnx(m, cfg)
  assert [r.path for r in cfg.unused_rules()] == ["nowhere"]
  with pytest.raises(ValueError, match="matched no layer"):
    quantize_nnx(m, cfg.rules, strict=True)
  with pytest.raises(ValueError, match="unknown format 'int7x'"):
    quantize_nnx(m, [QuantRule(".*", weight="int7x")])


def test_a_layer_subclass_with_its_own_call_is_refused():
  class Scaled(nnx.Linear):
    def __call__(self, x):
      return jnp.dot(x, self.kernel[...]) * 0.5

  m = Scaled(16, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"overrides nnx.Linear.__call__.*float rule"):
    quantize_nnx(m, [QuantRule(".*", weight="int4")])
  quantize_nnx(m, [QuantRule(".*")])  # a float rule leaves it alone


def test_real_mode_refuses_kernels_stacked_by_vmap():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(8, 8, rngs=rngs)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return Block(rngs)

  stack = make(nnx.Rngs(0))
  assert stack.lin.kernel[...].shape == (3, 8, 8)
  with pytest.raises(ValueError, match=r"lin: this Linear holds a kernel of shape "
                     r"\(3, 8, 8\).*nnx.vmap"):
    quantize_nnx(stack, [QuantRule(".*", weight="int4")], mode="real")


def test_a_module_shared_at_two_paths_gets_one_rule():
  # The graph walk visits a shared layer at one path: a float rule naming the
  # other path was ignored and the layer quantized. Disagreeing rules now
  # raise; agreeing ones quantize it once, under both paths' rules.
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.enc = nnx.Linear(16, 16, rngs=rngs)
      self.dec = self.enc

    def __call__(self, x):
      return self.dec(jax.nn.relu(self.enc(x)))

  with pytest.raises(ValueError, match=r"'dec' and 'enc' are one shared Linear.*"
                     r"float at 'enc'"):
    quantize_nnx(Tied(nnx.Rngs(0)), [QuantRule("enc"), QuantRule(".*", weight="int4")])
  m = quantize_nnx(Tied(nnx.Rngs(0)), [QuantRule(".*", weight="int4")])
  assert isinstance(m.enc.dot_general, QuantOp) and m.enc is m.dec
  x = jax.random.normal(jax.random.key(1), (2, 16))
  w = lb.fake_quant(Tied(nnx.Rngs(0)).enc.kernel.get_value(), "int4", axis=0)
  b = Tied(nnx.Rngs(0)).enc.bias.get_value()
  np.testing.assert_allclose(np.asarray(m(x)),
                             np.asarray(jax.nn.relu(x @ w + b) @ w + b),
                             rtol=1e-5, atol=1e-5)


def test_nnx_refuses_what_it_would_change_and_keeps_the_model_on_failure():
  x = jax.random.normal(jax.random.key(0), (2, 16))
  twice = lambda *a, **k: 2 * jax.lax.dot_general(*a, **k)  # noqa: E731
  lin = nnx.Linear(16, 8, dot_general=twice, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="built with its own dot_general"):
    quantize_nnx(lin, [QuantRule(".*", weight="int8")])

  class Tied(nnx.Module):   # one kernel Variable, two layers
    def __init__(self):
      self.enc = nnx.Linear(16, 16, use_bias=False, rngs=nnx.Rngs(1))
      self.dec = nnx.Linear(16, 16, use_bias=False, rngs=nnx.Rngs(2))
      self.dec.kernel = self.enc.kernel
    def __call__(self, x):
      return self.dec(self.enc(x))
  with pytest.raises(ValueError, match=r"one kernel Variable is held by layers.*"
                     r"'dec' \(float\).*'enc' \(int8\)"):
    quantize_nnx(Tied(), [QuantRule("dec"), QuantRule(".*", weight="int8")], "real")

  # a kernel stored quantized under a rule set that now leaves its layer float
  seq = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(3)),
                       nnx.Linear(16, 8, rngs=nnx.Rngs(4)))
  quantize_nnx(seq, [QuantRule(".*", weight="int8")], "real")
  with pytest.raises(ValueError, match=r"layers/1/kernel: the rules leave this layer "
                     r"float, but its weight is stored quantized \(int8\)"):
    quantize_nnx(seq, [QuantRule("layers/1"), QuantRule(".*", weight="int8")], "real")

  class Two(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(16, 32, rngs=nnx.Rngs(3))
      self.b = nnx.Linear(32, 24, rngs=nnx.Rngs(4))
    def __call__(self, x):
      return self.b(self.a(x))
  m = Two()
  before = m(x)
  # b's 32-blocks do not fit its 24 outputs along axis 1: a fails to quantize
  # only after a was quantized. Its float kernel must survive, the layer named.
  with pytest.raises(ValueError, match="b/kernel: "):
    quantize_nnx(m, [QuantRule(".*", weight=lb.QuantSpec("mxfp4", axis=1))], "real")
  assert not isinstance(m.a.kernel.get_value(), lb.QArray)
  np.testing.assert_array_equal(m(x), before)
