"""quantize_linen: method interception of Dense/DenseGeneral/Conv/Einsum/attend."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax._rules import QuantRule, QWeight
from lowbit_jax.flax import quantize_linen
from tests import _toy_models as toy

_fq = jax.jit(lb.fake_quant, static_argnums=1)
INT8 = lb.QuantSpec("int8")


def _axes(path):
  """The contraction-axis fill of each toy kernel, for manual fake quant."""
  name = path.split("/")[-2]
  return {"o": (0, 1), "conv": (0, 1)}.get(name, 0)


def _fake_params(params, spec):
  def f(kp, x):
    path = "/".join(k.key for k in kp)
    if path.endswith("kernel"):
      return _fq(x, spec.replace(axis=_axes(path)))
    return x
  return jax.tree_util.tree_map_with_path(f, params)


@pytest.fixture(scope="module")
def toy_model():
  model, v = toy.init_linen()
  return model, v, toy.tokens()


def test_fake_weights_match_manual_and_grads_are_ste(toy_model):
  model, v, t = toy_model
  q = quantize_linen([QuantRule(".*", weight=INT8)])
  got = jax.jit(q(model.apply))(v, t)
  pq = _fake_params(v["params"], INT8)
  want = jax.jit(model.apply)({"params": pq}, t)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert q.unused_rules() == []
  assert len(q.config.sites) == 2 * 7 + 1
  # Straight-through: the gradient w.r.t. w is the gradient at fake_quant(w).
  loss = lambda fn: lambda p: jnp.sum(jnp.tanh(fn({"params": p}, t)))  # noqa: E731
  g = jax.jit(jax.grad(loss(q(model.apply))))(v["params"])
  g_ref = jax.jit(jax.grad(loss(model.apply)))(pq)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_context_manager_equals_wrapper(toy_model):
  model, v, t = toy_model
  rules = [QuantRule(".*/(up|down)", weight="int4", activation="int8")]
  q = quantize_linen(rules)
  with q:
    a = jax.jit(model.apply)(v, t)
  b = jax.jit(quantize_linen(rules)(model.apply))(v, t)
  np.testing.assert_array_equal(a, b)
  assert sorted(q.config.sites) == [f"layers_{i}/{n}/kernel" for i in (0, 1)
                                    for n in ("down", "up")]
  # A function jitted and traced before the block runs its cached float
  # program inside it: nothing is quantized, and that is said.
  f = jax.jit(lambda vv, tt: model.apply(vv, tt))
  f(v, t)
  with pytest.warns(UserWarning, match="no Flax module method has run under this"):
    with quantize_linen(rules):
      f(v, t)
  # A function traced in an earlier block of the same quantizer runs its
  # cached quantized program: no warning (warnings are errors here).
  g, q2 = jax.jit(lambda vv, tt: model.apply(vv, tt)), quantize_linen(rules)
  for _ in range(2):
    with q2:
      np.testing.assert_array_equal(g(v, t), b)


def test_real_params_are_packed_and_equal_fake(toy_model):
  model, v, t = toy_model
  rules = [QuantRule("head", weight="int8"),
           QuantRule(".*", weight=lb.QuantSpec("int4", group_size=16),
                     activation="int8")]
  fake = jax.jit(quantize_linen(rules)(model.apply))(v, t)
  q = quantize_linen(rules, mode="real")
  qv = q.quantize_params(model, v, t)
  qp = qv["params"]
  up = qp["layers_0"]["up"]["kernel"]
  assert isinstance(up, QWeight) and up.transposed and up.shape == (toy.FF, toy.D)
  assert isinstance(qp["layers_0"]["o"]["kernel"], QWeight)   # 3-D, own layout
  assert isinstance(qp["layers_0"]["conv"]["kernel"], QWeight)
  assert isinstance(qp["head"]["kernel"], QWeight)
  assert not isinstance(qp["layers_0"]["up"]["bias"], lb.QArray)
  fp_k = sum(x.nbytes for kp, x in jax.tree_util.tree_leaves_with_path(v["params"])
             if kp[-1].key == "kernel")
  q_k = sum(x.nbytes for kp, x in jax.tree_util.tree_leaves_with_path(
      qp, is_leaf=lambda a: isinstance(a, lb.QArray)) if kp[-1].key == "kernel")
  assert q_k < 0.3 * fp_k, (q_k, fp_k)
  real = jax.jit(q(model.apply))(qv, t)
  np.testing.assert_allclose(real, fake, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="wrapped apply"):
    with quantize_linen(rules, mode="real"):
      model.apply(qv, t)


def test_unsupported_layer_fails_clearly():
  class WithLocal(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, name="proj")(x)
      return nn.ConvLocal(4, (3,), name="up")(x)

  m = WithLocal()
  x = jnp.ones((1, 6, 4))
  v = m.init(jax.random.key(0), x)
  with pytest.raises(ValueError,
                     match="'up', a ConvLocal layer.*QuantRule\\('up'\\)"):
    quantize_linen([QuantRule(".*", weight="int8")])(m.apply)(v, x)
  q = quantize_linen([QuantRule("up"), QuantRule(".*", weight="int8")])
  q(m.apply)(v, x)
  assert list(q.config.sites) == ["proj/kernel"]


def test_strict_reports_typos():
  m = nn.Dense(4)
  x = jnp.ones((2, 8))
  v = m.init(jax.random.key(0), x)
  q = quantize_linen([QuantRule("dense", weight="int8")])  # the root path is ''
  q(m.apply)(v, x)
  assert [r.path for r in q.unused_rules()] == ["dense"]
  with pytest.raises(ValueError, match="matched no layer"):
    quantize_linen([QuantRule("dense", weight="int8")], strict=True)(m.apply)(v, x)
  q = quantize_linen([QuantRule("|kernel", weight="int8")], strict=True)
  q(m.apply)(v, x)


class MoEHead(nn.Module):
  """An expert einsum jnp.einsum evaluates with swapped operands, and attend."""

  @nn.compact
  def __call__(self, tok):
    emb = nn.Embed(16, 32, name="embed")
    x = emb(tok)                                            # [B, T, 32]
    h = jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (4, 32))
    y = nn.Einsum((4, 32, 32), use_bias=False, name="experts")(h, "btef,efd->bted")
    return emb.attend(jnp.mean(y, axis=2))


def test_swapped_einsum_and_attend():
  m = MoEHead()
  tok = jnp.array([[1, 2, 3], [4, 5, 6]])
  v = m.init(jax.random.key(0), tok)
  q = quantize_linen([QuantRule(".*", weight="int4")])
  got = jax.jit(q(m.apply))(v, tok)
  p = v["params"]
  pq = {"embed": p["embed"],
        "experts": {"kernel": _fq(p["experts"]["kernel"],
                                  lb.QuantSpec("int4", axis=1))}}

  def manual(params):
    x = jnp.take(params["embed"]["embedding"], tok, axis=0)
    h = jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (4, 32))
    y = jnp.einsum("btef,efd->bted", h, params["experts"]["kernel"])
    e = _fq(params["embed"]["embedding"], lb.QuantSpec("int4", axis=1))
    return jnp.mean(y, axis=2) @ e.T
  np.testing.assert_allclose(got, jax.jit(manual)(pq), rtol=1e-5, atol=1e-5)
  assert sorted(q.config.sites) == ["embed/embedding", "experts/kernel"]
  # Real mode: the expert kernel is packed; the embedding table (also gathered)
  # stays in float and the tied head quantizes it per call.
  r = quantize_linen([QuantRule(".*", weight="int4")], mode="real")
  qv = r.quantize_params(m, v, tok)
  assert isinstance(qv["params"]["experts"]["kernel"], QWeight)
  assert not isinstance(qv["params"]["embed"]["embedding"], lb.QArray)
  np.testing.assert_allclose(jax.jit(r(m.apply))(qv, tok), got, rtol=1e-5, atol=1e-5)


def test_calibrate_collects_stats_then_static(toy_model):
  model, v, _ = toy_model
  rules = [QuantRule(".*/(up|down)", weight="int8", activation="int8", static=True)]
  cal = quantize_linen(rules, mode="calibrate")
  step = jax.jit(lambda v, t: cal(model.apply)(v, t, mutable=[lb.flax.STATS]))
  stats = {}
  for s in range(3):
    y, upd = step({**v, "quant_stats": stats}, toy.tokens(s))
    stats = upd["quant_stats"]
  np.testing.assert_allclose(y, jax.jit(model.apply)(v, toy.tokens(2)), rtol=1e-6)
  assert set(stats["layers_0"]) == {"up", "down"}
  assert int(stats["layers_0"]["up"]["act"]["batches"]) == 3
  with pytest.raises(ValueError, match="mutable=\\['quant_stats'\\]"):
    cal(model.apply)(v, toy.tokens(0))
  t = toy.tokens(0)
  fq = quantize_linen(rules)
  a = jax.jit(fq(model.apply))({**v, "quant_stats": stats}, t)
  final = cal.finalize_stats(stats)
  assert set(final["layers_0"]["up"]["act"]) == {"amax"}
  b = jax.jit(fq(model.apply))({**v, "quant_stats": final}, t)
  np.testing.assert_array_equal(a, b)
  r = quantize_linen(rules, mode="real")
  qv = r.quantize_params(model, v, t)
  c = jax.jit(r(model.apply))({**qv, "quant_stats": final}, t)
  np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no calibration statistics"):
    fq(model.apply)(v, t)


def test_real_mode_quantizes_the_weight_the_bf16_layer_computes_with():
  """A bf16 layer promotes its float32 kernel before the matmul, so fake mode
  quantizes bf16 values: real mode must store the codes of those values (its
  dequantized weight equals fake mode's), not of the float32 kernel."""
  layer = nn.Dense(64, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (4, 256), jnp.bfloat16)
  v = layer.init(jax.random.key(1), x)
  # A kernel whose float32 values round differently in bf16 (low mantissa bits set).
  k = v["params"]["kernel"] * (1 + 2.0 ** -9)
  v = {"params": {"kernel": k}}
  rules = [QuantRule(".*", weight=lb.QuantSpec("int4", group_size=32))]
  qr = quantize_linen(rules, mode="real")
  qw = qr.quantize_params(layer, v, x)["params"]["kernel"]
  assert isinstance(qw, QWeight) and qw.transposed
  seen = k.astype(jnp.bfloat16).astype(jnp.float32)
  want = lb.dequantize(lb.quantize(seen.T, lb.QuantSpec("int4", group_size=32, axis=1)))
  got = lb.dequantize(qw)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  from_f32 = lb.dequantize(lb.quantize(k.T, lb.QuantSpec("int4", group_size=32, axis=1)))
  assert not np.array_equal(np.asarray(from_f32), np.asarray(want))  # the test can fail


@pytest.mark.parametrize("spec", ["int4", lb.QuantSpec("int4", group_size=8), "fp8_e4m3",
                                  "nvfp4"])
def test_bf16_params_in_a_float32_layer_real_equals_fake(spec):
  """bf16 params promoted to a float32 computation: real mode's weight must
  dequantize into float32 (as fake mode's quantized promoted weight is), not
  round code * scale to bf16 first."""
  layer = nn.Dense(64, param_dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (4, 128), jnp.float32)
  v = layer.init(jax.random.key(1), x)
  rules = [QuantRule(".*", weight=spec)]
  fake = quantize_linen(rules, mode="fake")(layer.apply)(v, x)
  qr = quantize_linen(rules, mode="real")
  real = qr(layer.apply)(qr.quantize_params(layer, v, x), x)
  assert real.dtype == fake.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(real), np.asarray(fake), rtol=1e-6, atol=1e-6)


def test_a_dense_subclass_that_goes_around_dot_general_is_refused():
  class Scaled(nn.Dense):  # computes by itself: the interceptor never reaches it
    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.normal(), (x.shape[-1], self.features))
      return jnp.dot(x, k) * 0.5

  class ViaSuper(nn.Dense):  # reaches dot_general through Dense.__call__
    @nn.compact
    def __call__(self, x):
      return super().__call__(x) * 0.5

  x = jax.random.normal(jax.random.key(0), (4, 16))
  q = quantize_linen([QuantRule(".*", weight="int2")])
  v = Scaled(8).init(jax.random.key(1), x)
  with pytest.raises(ValueError, match=r"never called self.dot_general.*float rule"):
    q(Scaled(8).apply)(v, x)
  v = ViaSuper(8).init(jax.random.key(1), x)
  want = x @ lb.fake_quant(v["params"]["kernel"], "int2", axis=0) * 0.5
  got = q(ViaSuper(8).apply)(v, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_real_mode_refuses_kernels_stacked_by_scan():
  class Blk(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(8, name="d")(x), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scanned = nn.scan(Blk, variable_axes={"params": 0},
                        split_rngs={"params": True}, length=3)
      return scanned(name="layers")(x, None)[0]

  x = jnp.ones((2, 8))
  v = Net().init(jax.random.key(0), x)
  q = quantize_linen([QuantRule(".*", weight="int4")], mode="real")
  with pytest.raises(ValueError, match=r"layers/d/kernel: its layer sees the kernel "
                     r"as \(8, 8\) but the params store \(3, 8, 8\)"):
    q.quantize_params(Net(), v, x)


def _scanned_net(axes):
  class Blk(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(8, name="d")(x) + x, None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scanned = nn.scan(Blk, variable_axes=axes, split_rngs={"params": True},
                        length=3)
      return scanned(name="layers")(x, None)[0]
  return Net()


def test_scan_without_the_quant_collections_says_to_add_them():
  # Asked for at the apply but not passed through nn.scan: the error names the
  # collection and the variable_axes fix (it told the user to pass mutable=,
  # which they had).
  x = jnp.ones((2, 8))
  net = _scanned_net({"params": 0})
  v = net.init(jax.random.key(0), x)
  static = [QuantRule(".*", weight="int8", activation="int8", static=True)]
  with pytest.raises(ValueError, match=r"'layers/d' runs inside a lifted transform.*"
                     r"add 'quant_stats' to that transform's variable_axes"):
    quantize_linen(static, "calibrate")(net.apply)(v, x, mutable=["quant_stats"])
  delayed = [QuantRule(".*", weight="fp8_e4m3", activation="fp8_e4m3",
                       scaling="delayed")]
  with pytest.raises(ValueError, match="add 'quant_state' to that transform's"):
    quantize_linen(delayed).init_quant_vars(net, v, x)
  # Metrics asked for were dropped for the scanned layers, silently.
  with pytest.raises(ValueError, match="add 'quant_metrics' to that transform's"):
    quantize_linen([QuantRule(".*", weight="int8", activation="int8")])(net.apply)(
        v, x, mutable=["quant_metrics"])
  # With the collections in variable_axes both work, and one history per
  # step is no shared history (no warning: warnings are errors here).
  net = _scanned_net({"params": 0, "quant_stats": 0, "quant_state": 0})
  v = net.init(jax.random.key(0), x)
  _, st = quantize_linen(static, "calibrate")(net.apply)(v, x, mutable=["quant_stats"])
  assert st["quant_stats"]["layers"]["d"]["act"]["max"].shape == (3,)
  qv = quantize_linen(delayed).init_quant_vars(net, v, x)
  assert qv["quant_state"]["layers"]["d"]["act_history"].shape[0] == 3


def test_stored_weights_of_another_format_are_refused():
  # Params quantized under int8 rules applied with an int4 rule ran as int8
  # while the site report said int4.
  layer = nn.Dense(16)
  x = jax.random.normal(jax.random.key(0), (2, 32))
  v = layer.init(jax.random.key(1), x)
  int8 = quantize_linen([QuantRule(".*", weight="int8")], mode="real")
  qv = int8.quantize_params(layer, v, x)
  for rule, match in ((QuantRule(".*", weight="int4"), "format 'int8' \\(the rule: "
                       "'int4'\\)"),
                      (QuantRule(".*", weight=lb.QuantSpec("int8", group_size=8)),
                       "group_size None \\(the rule: 8\\)")):
    with pytest.raises(ValueError, match=f"kernel: the weight is stored quantized "
                       f"with {match}"):
      quantize_linen([rule], mode="real")(layer.apply)(qv, x)
  int8(layer.apply)(qv, x)   # its own rules run it


def test_partitioned_params_quantize_for_real_mode():
  # nn.with_partitioning boxes: real mode's params come back unboxed (the
  # codes do not take the kernel's partition names), and equal fake mode.
  layer = nn.Dense(16, kernel_init=nn.with_partitioning(
      nn.initializers.lecun_normal(), (None, "model")))
  x = jax.random.normal(jax.random.key(0), (2, 32))
  v = layer.init(jax.random.key(1), x)
  assert isinstance(v["params"]["kernel"], nn.Partitioned)
  rules = [QuantRule(".*", weight="int4")]
  fake = quantize_linen(rules)(layer.apply)(v, x)
  q = quantize_linen(rules, mode="real")
  qv = q.quantize_params(layer, v, x)
  assert isinstance(qv["params"]["kernel"], QWeight)
  np.testing.assert_allclose(np.asarray(q(layer.apply)(qv, x)), np.asarray(fake),
                             rtol=1e-6, atol=1e-6)


def test_an_empty_batch_runs_through_learned_scales_and_calibration():
  # Plain fake and real modes returned (0, N); an LSQ activation raised a bare
  # ZeroDivisionError and calibrate mode numpy's "zero-size array" error.
  m = nn.Dense(16)
  x, e = jnp.ones((3, 32)), jnp.ones((0, 32))
  v = m.init(jax.random.key(0), x)
  q = quantize_linen([QuantRule(".*", weight="int4", activation="int8",
                                learn_activation="lsq")])
  vv = {**v, **q.init_quant_vars(m, v, x)}
  assert q(m.apply)(vv, e).shape == (0, 16)
  qc = quantize_linen([QuantRule(".*", weight="int8", activation="int8", static=True)],
                      "calibrate")
  _, st = qc(m.apply)(v, x, mutable=["quant_stats"])
  y, st2 = qc(m.apply)({**v, **st}, e, mutable=["quant_stats"])
  assert y.shape == (0, 16)
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(st2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layers_quantize_linen_would_change_are_refused():
  # A layer's own dot_general, an Embed.attend override, and a stored
  # quantized kernel under a float rule: silently dropped or a cryptic crash.
  x = jax.random.normal(jax.random.key(0), (2, 16))
  twice = lambda *a, **k: 2 * jax.lax.dot_general(*a, **k)  # noqa: E731
  m = nn.Dense(8, dot_general=twice)
  v = m.init(jax.random.key(1), x)
  with pytest.raises(ValueError, match="built with its own dot_general"):
    quantize_linen([QuantRule(".*", weight="int8")])(m.apply)(v, x)
  plain = nn.Dense(8, dot_general=jax.lax.dot_general)   # the plain op is fine
  quantize_linen([QuantRule(".*", weight="int8")])(plain.apply)(v, x)

  class Capped(nn.Embed):
    def attend(self, query):
      return jnp.tanh(super().attend(query))
  e = Capped(12, 16)
  ve = e.init(jax.random.key(2), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="overrides nn.Embed.attend"):
    quantize_linen([QuantRule(".*", weight="int8")])(
        lambda v, q: e.apply(v, q, method="attend"))(ve, x)

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="head")(nn.Dense(16, name="body")(x))
  mm = M()
  vm = mm.init(jax.random.key(3), x)
  q = quantize_linen([QuantRule(".*", weight="int8")], "real")
  qv = q.quantize_params(mm, vm, x)
  with pytest.raises(ValueError, match="head/kernel: the rules leave this layer float, "
                     "but its weight is stored quantized"):
    quantize_linen([QuantRule("head"), QuantRule(".*", weight="int8")], "real")(
        mm.apply)(qv, x)
