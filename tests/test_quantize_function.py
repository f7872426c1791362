"""quantize_function: jaxpr data flow from params, rewriting, modes, plans."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowbit_jax as lb
from lowbit_jax._function import quantize_function
from lowbit_jax._rules import QuantConfig, QuantRule, QWeight

_fq = jax.jit(lb.fake_quant, static_argnums=1)
INT4_G8 = lb.QuantSpec("int4", group_size=8)


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  return {"layers": [{"mlp": {"up": {"kernel": jax.random.normal(k[0], (16, 32))}}},
                     {"mlp": {"up": {"kernel": jax.random.normal(k[1], (32, 16))}}}],
          "emb": jax.random.normal(k[2], (10, 16)),
          "experts": jax.random.normal(k[3], (4, 16, 8)),
          "conv": jax.random.normal(k[4], (3, 16, 16)),
          "stack": jax.random.normal(k[5], (2, 16, 16))}


def _views(p, x):
  """Weights reached through a jit, bf16 convert, transpose, einsum and conv."""
  w0 = p["layers"][0]["mlp"]["up"]["kernel"]
  h = jax.nn.relu(x @ w0)                                     # custom_jvp relu
  h = jax.jit(lambda a, b: a @ b.T)(h, p["layers"][1]["mlp"]["up"]["kernel"].T)
  e = jnp.einsum("bd,edf->bef", x, p["experts"])
  c = lax.conv_general_dilated(x[None], p["conv"], (1,), "SAME",
                               dimension_numbers=("NWC", "WIO", "NWC"))[0]
  tied = x @ p["emb"].T                                       # tied output head
  return h.sum(-1) + e.sum((-1, -2)) + c.sum(-1) + tied.sum(-1)


def _manual(p, x, spec_w):
  q = dict(p)
  q["layers"] = [{"mlp": {"up": {"kernel": _fq(l["mlp"]["up"]["kernel"],
                                               spec_w.replace(axis=0))}}}
                 for l in p["layers"]]
  q["experts"] = _fq(p["experts"], spec_w.replace(axis=1))
  q["conv"] = _fq(p["conv"], spec_w.replace(axis=1))  # conv groups: input features
  q["emb"] = _fq(p["emb"], spec_w.replace(axis=1))    # contraction axis of emb.T
  return _views(q, x)


def test_fake_quant_of_every_view_matches_manual():
  p, x = _params(), jax.random.normal(jax.random.key(9), (5, 16))
  qf = quantize_function(_views, [QuantRule(".*", weight=INT4_G8)])
  got = qf(p, x)
  np.testing.assert_allclose(got, jax.jit(_manual, static_argnums=2)(p, x, INT4_G8),
                             rtol=1e-5, atol=1e-4)
  assert not np.allclose(got, jax.jit(_views)(p, x), atol=1e-2)
  assert sorted(qf.config.sites) == ["conv", "emb", "experts",
                                     "layers/0/mlp/up/kernel",
                                     "layers/1/mlp/up/kernel"]
  assert qf.__name__ == "_views"


def test_rules_match_param_or_parent_path_and_report_unused():
  p, x = _params(), jnp.ones((2, 16))
  rules = [QuantRule("layers/1/mlp/up", weight="int8"),        # layer (parent) path
           QuantRule("layers/0/mlp/up/kernel", weight="int8"),  # parameter path
           QuantRule("layers/./mlp/down", weight="int8")]       # a typo
  qf = quantize_function(_views, rules)
  qf(p, x)
  assert qf.unused_rules() == [rules[2]]
  assert set(qf.config.matched()[rules[0]]) == {"layers/1/mlp/up/kernel"}
  strict = quantize_function(_views, rules, strict=True)
  with pytest.raises(ValueError, match="layers/./mlp/down"):
    strict(p, x)


def test_unknown_mode_and_format():
  with pytest.raises(ValueError, match="mode must be one of"):
    quantize_function(_views, [], mode="int8")
  with pytest.raises(ValueError, match="unknown format 'nvfp5'"):
    quantize_function(_views, [QuantRule(".*", weight="nvfp5")])


def test_grad_is_straight_through_in_fake_mode():
  p, x = _params(), jax.random.normal(jax.random.key(1), (5, 16))
  w = p["layers"][0]["mlp"]["up"]["kernel"]

  def f(params, x):
    return jnp.sum((x @ params["w"]) ** 2)

  qf = quantize_function(f, [QuantRule("w", weight="int4")])
  g = jax.jit(jax.grad(qf))({"w": w}, x)
  wq = _fq(w, lb.QuantSpec("int4", axis=0))
  # STE: d/dw of sum((x @ wq)^2) with dwq/dw = 1 (no clipping for absmax scales).
  np.testing.assert_allclose(g["w"], 2 * x.T @ (x @ wq), rtol=1e-4, atol=1e-4)
  gx = jax.grad(qf, argnums=1)({"w": w}, x)
  np.testing.assert_allclose(gx, 2 * (x @ wq) @ wq.T, rtol=1e-4, atol=1e-4)


def _loops(p, x):
  def body(c, w):
    return jnp.tanh(c @ w), None
  y, _ = lax.scan(body, x, p["stack"])                        # stacked weights
  z = jax.checkpoint(lambda a: a @ p["stack"][0])(x)          # remat
  u = lax.cond(x.sum() > 0, lambda a: a @ p["stack"][1], lambda a: -a, x)

  def wbody(c):
    i, a = c
    return i + 1, a @ p["stack"][i]                           # dynamic_slice
  _, v = lax.while_loop(lambda c: c[0] < 2, wbody, (0, x))
  return y + z + u + v


def test_control_flow_is_rewritten():
  p, x = _params(), jax.random.normal(jax.random.key(2), (3, 16))
  qf = quantize_function(_loops, [QuantRule("stack", weight="int4")])
  got = qf(p, x)
  q = dict(p, stack=_fq(p["stack"], lb.QuantSpec("int4", axis=1)))
  np.testing.assert_allclose(got, jax.jit(_loops)(q, x), rtol=1e-5, atol=1e-5)
  assert len([k for k in qf.config.sites if k.startswith("stack")]) == 4


def test_custom_vjp_without_sites_keeps_its_rule():
  @jax.custom_vjp
  def clip_grad(x):
    return x

  clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))

  def f(p, x):
    return jnp.sum(clip_grad(x @ p["w"]) * 3.0)

  p = {"w": jnp.ones((4, 4))}
  x = jnp.ones((2, 4))
  qf = quantize_function(f, [QuantRule("w", weight="int8")])
  g = jax.grad(qf, argnums=1)(p, x)
  np.testing.assert_allclose(g, jnp.full((2, 4), 0.4), rtol=1e-6)


def test_pallas_call_is_never_rewritten():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def kern(x_ref, w_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], w_ref[...])

  def f(p, x):
    inside = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((4, 8), jnp.float32),
                            interpret=True)(x, p["w"])
    return inside, x @ p["w"]

  p = {"w": jax.random.normal(jax.random.key(3), (16, 8))}
  x = jax.random.normal(jax.random.key(4), (4, 16))
  inside, outside = quantize_function(f, [QuantRule("w", weight="int2")])(p, x)
  np.testing.assert_allclose(inside, x @ p["w"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outside, x @ _fq(p["w"], lb.QuantSpec("int2", axis=0)),
                             rtol=1e-5, atol=1e-5)


def test_barriers_are_views_and_unrewritten_bodies_are_refused():
  # A frozen (stop_gradient) or barriered weight is still the weight; a weight
  # entering a shard_map, whose matmuls the interpreter does not rewrite,
  # raises rather than staying float silently.
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  p = {"w": jax.random.normal(jax.random.key(3), (16, 8))}
  x = jax.random.normal(jax.random.key(4), (4, 16))
  want = x @ _fq(p["w"], lb.QuantSpec("int4", axis=0))
  rules = [QuantRule("w", weight="int4")]
  for wrap in (lax.stop_gradient, lambda w: lax.optimization_barrier((w, w))[1]):
    qf = quantize_function(lambda p, x: x @ wrap(p["w"]), rules)
    np.testing.assert_allclose(qf(p, x), want, rtol=1e-5, atol=1e-5)
    assert list(qf.config.sites) == ["w"]
  # Frozen stays frozen: no gradient reaches the weight.
  g = jax.grad(lambda p: quantize_function(
      lambda p, x: x @ lax.stop_gradient(p["w"]), rules)(p, x).sum())(p)
  assert not np.any(np.asarray(g["w"]))
  mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
  smap = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P(), P()),
                       out_specs=P())
  with pytest.raises(ValueError, match="weight 'w', which a rule quantizes, "
                     "enters `shard_map`.*float rule"):
    quantize_function(lambda p, x: smap(x, p["w"]), rules)(p, x)
  # A parameter that reaches no matmul weight inside the body (a gain on the
  # activation) is no reason to refuse.
  gain = jax.shard_map(lambda a, g: (a * g) @ (a * g).T, mesh=mesh,
                       in_specs=(P(), P()), out_specs=P())
  quantize_function(lambda p, x: gain(x, p["g"]),
                    [QuantRule(".*", weight="int8")])({"g": jnp.ones(16)}, x)
  # A scatter's combining function holds no matmul: not refused as a body;
  # the scattered weight is made from the parameter and a constant, which
  # the matmul cannot read quantized (test_a_weight_made_from_parameters_...).
  with pytest.raises(ValueError, match="through `scatter-add`"):
    quantize_function(lambda p, x: x @ p["w"].at[0].add(1.0), rules)(p, x)


MASK = np.tril(np.ones((16, 16), bool))


def test_a_weight_made_from_parameters_is_refused_not_left_float():
  # A matmul reading a value made from parameters alone (a fused QKV
  # concatenated in the function, a padded or scaled weight) would run on
  # the float weight: quantize_function quantizes the leaves a matmul reads.
  # It raises, naming the weight and the primitive; a float rule for the
  # leaves keeps them float knowingly. Activations mixed with parameters (a
  # bias, a norm's gain, an embedding lookup) stay activations.
  k = jax.random.split(jax.random.key(11), 4)
  p = {"wq": jax.random.normal(k[0], (16, 8)), "wk": jax.random.normal(k[1], (16, 8)),
       "b": jax.random.normal(k[2], (16,)), "g": jnp.ones(16),
       "w": jax.random.normal(k[3], (16, 16))}
  x = jax.random.normal(jax.random.key(12), (4, 16))
  rules = [QuantRule(".*", weight="int8")]
  made = {
      "concatenate": lambda p, x: x @ jnp.concatenate([p["wq"], p["wk"]], axis=1),
      "pad": lambda p, x: x @ jnp.pad(p["wq"], ((0, 0), (0, 8))),
      "mul": lambda p, x: x @ (p["w"] * 0.5),
      "add": lambda p, x: x @ (p["w"] + p["w"].T),
      # with a closed-over constant
      "select_n": lambda p, x: x @ jnp.where(MASK, p["w"], 0.0),
  }
  for via, f in made.items():
    with pytest.raises(ValueError, match=rf"weight '(wq|w)', which a rule quantizes, "
                       rf"reaches a dot_general only through `{via}`.*float rule"):
      quantize_function(f, rules)(p, x)
  # inside a scanned body, and as the lhs of x.T-style products
  with pytest.raises(ValueError, match="through `concatenate`"):
    quantize_function(lambda p, x: lax.scan(
        lambda c, _: (c @ jnp.concatenate([p["wq"], p["wk"]], axis=1), None),
        x, None, length=2)[0], rules)(p, x)
  with pytest.raises(ValueError, match="through `mul`"):
    quantize_function(lambda p, x: (p["w"] * 2.0) @ x.T, rules)(p, x)
  # Kept float on purpose: the float rules come first.
  f = made["concatenate"]
  out = quantize_function(f, [QuantRule("wq"), QuantRule("wk")] + rules)(p, x)
  np.testing.assert_allclose(out, f(p, x), rtol=1e-6)
  # Mixed with activations: the weights are read directly and quantized.
  def g(p, x):
    h = (x @ p["w"] + p["b"]) * (1.0 + p["g"])
    return h @ p["w"]
  qf = quantize_function(g, rules)
  w8 = _fq(p["w"], lb.QuantSpec("int8", axis=0))
  want = ((x @ w8 + p["b"]) * (1.0 + p["g"])) @ w8
  np.testing.assert_allclose(qf(p, x), want, rtol=1e-5, atol=1e-5)


def test_derived_weights_are_found_in_bodies_and_closures_are_not_constants():
  # Constants reach bodies (checkpoint, scan, cond, a custom_jvp function, a
  # jitted helper), so a masked weight raises there as at the top level; a
  # value closed over from an enclosing jit is an activation, not a
  # constant; a ragged_dot whose input is made from parameters and a fixed
  # batch still quantizes its experts.
  p = {"w": jax.random.normal(jax.random.key(13), (16, 16))}
  x = jax.random.normal(jax.random.key(14), (4, 16))
  rules = [QuantRule(".*", weight="int8")]
  masked = lambda w: jnp.where(MASK, w, 0.0)
  bodies = {
      "checkpoint": lambda p, x: jax.checkpoint(lambda a: a @ masked(p["w"]))(x),
      "scan": lambda p, x: lax.scan(lambda c, _: (c @ masked(p["w"]), None), x, None,
                                    length=2)[0],
      "cond": lambda p, x: lax.cond(True, lambda a: a @ masked(p["w"]), lambda a: a, x),
      "custom_jvp": lambda p, x: x @ jax.nn.relu(p["w"]),
      "jitted helper": lambda p, x: x @ (p["w"] * jnp.tril(jnp.ones((16, 16)))),
  }
  for where, f in bodies.items():
    with pytest.raises(ValueError, match="reaches a dot_general only through"):
      quantize_function(f, rules)(p, x)
      pytest.fail(where)

  @jax.jit
  def outer(p, x, g):  # g: an activation closed over by the quantized function
    return quantize_function(lambda p, x: x @ (p["w"] * g), rules)(p, x)
  np.testing.assert_allclose(outer(p, x, jnp.ones(16) * 2.0), x @ (p["w"] * 2.0),
                             rtol=1e-5, atol=1e-5)

  experts = {"g": jnp.full((16,), 1.5), "e": jax.random.normal(jax.random.key(15),
                                                               (2, 16, 8))}
  batch = np.asarray(jax.random.normal(jax.random.key(16), (8, 16)))
  sizes = jnp.asarray([3, 5], jnp.int32)
  out = quantize_function(lambda p: lax.ragged_dot(batch * p["g"], p["e"], sizes),
                          rules)(experts)
  want = lax.ragged_dot(batch * experts["g"],
                        _fq(experts["e"], lb.QuantSpec("int8", axis=1)), sizes)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_gather_ends_data_flow():
  def f(p, tok):
    return jnp.take(p["emb"], tok, axis=0) @ p["w"]

  p = {"emb": jax.random.normal(jax.random.key(5), (10, 16)),
       "w": jax.random.normal(jax.random.key(6), (16, 4))}
  qf = quantize_function(f, [QuantRule(".*", weight="int8")])
  tok = jnp.array([1, 2, 3])
  np.testing.assert_allclose(
      qf(p, tok), p["emb"][tok] @ _fq(p["w"], lb.QuantSpec("int8", axis=0)),
      rtol=1e-5, atol=1e-5)
  assert list(qf.config.sites) == ["w"]


def test_real_equals_fake_and_memory_drops():
  p, x = _params(), jax.random.normal(jax.random.key(7), (5, 16))
  rules = [QuantRule(".*", weight=INT4_G8, activation="int8")]
  fake = quantize_function(_views, rules)(p, x)
  real = quantize_function(_views, rules, mode="real")
  qp = real.quantize_params(p, x)
  for path in ("layers", "experts", "conv"):
    for leaf in jax.tree.leaves(qp[path], is_leaf=lambda a: isinstance(a, QWeight)):
      assert isinstance(leaf, QWeight)
  assert qp["layers"][0]["mlp"]["up"]["kernel"].transposed
  assert not isinstance(qp["stack"], QWeight)  # unused by _views: not planned
  # emb is only used through a transpose: stored as is, contracted on axis 1.
  assert isinstance(qp["emb"], QWeight) and not qp["emb"].transposed
  q_bytes = sum(l.nbytes for l in (qp["experts"], qp["conv"], qp["emb"]))
  f_bytes = sum(p[k].nbytes for k in ("experts", "conv", "emb"))
  assert q_bytes <= 0.25 * f_bytes  # 4-bit codes + a float32 scale per 8
  np.testing.assert_allclose(real(qp, x), fake, rtol=1e-5, atol=1e-4)
  # Float params in real mode are quantized on every call, same numbers.
  np.testing.assert_allclose(real(p, x), fake, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", [lb.QuantSpec("int4", axis=0), lb.QuantSpec("int4", axis=1),
                                  lb.QuantSpec("int4", axis=1, group_size=8),
                                  lb.QuantSpec("int8", tile=(4, 8))])
def test_an_explicit_axis_means_the_ops_view_in_real_mode_too(spec):
  # x @ w.T: fake mode reads an explicit axis on the op's view of w; real
  # mode planned it on the stored layout, another axis (outputs 0.78 apart).
  p = {"w": jax.random.normal(jax.random.key(0), (8, 16))}
  x = jax.random.normal(jax.random.key(1), (4, 16))

  def f(p, x):
    return x @ p["w"].T

  rules = [QuantRule(".*", weight=spec)]
  fake = quantize_function(f, rules)(p, x)
  np.testing.assert_array_equal(fake, x @ _fq(p["w"].T, spec))
  real = quantize_function(f, rules, mode="real")
  np.testing.assert_allclose(real(real.quantize_params(p, x), x), fake, rtol=1e-5,
                             atol=1e-5)


def test_plan_leaves_gathered_tables_in_float():
  def f(p, tok):
    h = jnp.take(p["emb"], tok, axis=0)
    return h @ p["emb"].T

  p = {"emb": jax.random.normal(jax.random.key(8), (10, 16))}
  real = quantize_function(f, [QuantRule(".*", weight="int8")], mode="real")
  assert real.plan(p, jnp.array([1, 2])) == {}


def test_calibrate_then_static():
  def f(p, x):
    return jnp.tanh(x @ p["a"]) @ p["b"]

  k = jax.random.split(jax.random.key(10), 3)
  p = {"a": jax.random.normal(k[0], (16, 32)), "b": jax.random.normal(k[1], (32, 8))}
  xs = [jax.random.normal(kk, (4, 16)) * (i + 1)
        for i, kk in enumerate(jax.random.split(k[2], 3))]
  rules = QuantConfig([QuantRule(".*", weight="int8", activation="int8", static=True)])
  cal = quantize_function(f, rules, mode="calibrate")
  stats = None
  for x in xs:
    y, stats = cal(p, x, quant_stats=stats)
    np.testing.assert_allclose(y, f(p, x), rtol=1e-5)  # calibration runs in float
  amax_a = max(float(jnp.abs(x).max()) for x in xs)
  final = cal.finalize_stats(stats)
  np.testing.assert_allclose(final["a"]["amax"], amax_a, rtol=1e-6)
  qf = quantize_function(f, rules)
  y_state = qf(p, xs[0], quant_stats=stats)
  y_range = qf(p, xs[0], quant_stats=final)
  np.testing.assert_array_equal(y_state, y_range)
  xq = lb.fake_quant(xs[0], lb.QuantSpec("int8", axis="tensor"), amax=amax_a)
  h = jnp.tanh(xq @ _fq(p["a"], lb.QuantSpec("int8", axis=0)))
  hq = lb.fake_quant(h, lb.QuantSpec("int8", axis="tensor"),
                     amax=final["b"]["amax"])
  np.testing.assert_allclose(y_state, hq @ _fq(p["b"], lb.QuantSpec("int8", axis=0)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no calibration statistics for 'a'"):
    qf(p, xs[0])


def test_static_nvfp4_fixes_the_tensor_scale_only():
  # A static NVFP4 activation: calibration fixes the tensor scale, block
  # scales stay dynamic (not one shared block scale).
  def f(p, x):
    return x @ p["a"]

  k = jax.random.split(jax.random.key(12), 3)
  p = {"a": jax.random.normal(k[0], (64, 8))}
  x_cal = jax.random.normal(k[1], (8, 64)) * 4
  x = jax.random.normal(k[2], (8, 64)) * jnp.linspace(0.01, 1.0, 64)
  rules = QuantConfig([QuantRule(".*", activation="nvfp4", static=True)])
  _, stats = quantize_function(f, rules, mode="calibrate")(p, x_cal)
  amax = float(jnp.abs(x_cal).max())
  y = quantize_function(f, rules)(p, x, quant_stats=stats)
  spec = lb.QuantSpec("nvfp4", axis=-1)
  want = lb.fake_quant(x, spec, tensor_amax=amax) @ p["a"]
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  # Dynamic block scales: small rows keep their precision, unlike one static
  # scale for every block (amax= broadcast to all blocks).
  one_scale = lb.fake_quant(x, spec, amax=amax) @ p["a"]
  err = lambda v: float(jnp.linalg.norm(v - x @ p["a"]))  # noqa: E731
  assert err(y) < 0.5 * err(one_scale)
  # Real mode stores the same numbers.
  y_real = quantize_function(f, rules, mode="real")(p, x, quant_stats=stats)
  np.testing.assert_allclose(np.asarray(y_real), np.asarray(want), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="calibrates only its tensor scale"):
    QuantRule(".*", activation=lb.QuantSpec("nvfp4", calibration="mse"),
              static=True)


def test_calibrating_inside_scan_is_rejected():
  p, x = _params(), jnp.ones((3, 16))
  cal = quantize_function(_loops, [QuantRule("stack", activation="int8",
                                             static=True)], mode="calibrate")
  with pytest.raises(ValueError, match="inside lax.scan"):
    cal(p, x)


def test_python_config_arguments_are_static():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False, act: str = "relu"):
      x = nn.Dense(8)(x)
      x = nn.Dropout(0.5, deterministic=not train)(x)
      return getattr(jax.nn, act)(x)

  m = Model()
  x = jax.random.normal(jax.random.key(11), (2, 4))
  v = m.init(jax.random.key(0), x)
  qf = quantize_function(m.apply, [QuantRule(".*", weight="int8")])
  w = _fq(v["params"]["Dense_0"]["kernel"], lb.QuantSpec("int8", axis=0))
  h = x @ w + v["params"]["Dense_0"]["bias"]
  np.testing.assert_allclose(qf(v, x, train=False), jax.nn.relu(h), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(qf(v, x, act="gelu"), jax.nn.gelu(h), rtol=1e-5,
                             atol=1e-6)
  assert list(qf.config.sites) == ["params/Dense_0/kernel"]


def test_static_calibration_observes_the_rotation_along_the_contraction_axis():
  # The activation contracts along axis 1 (not the last): the calibrated range
  # is the range of the activation rotated there, as the op quantizes it.
  from lowbit_jax.core._hadamard import hadamard_transform  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (16, 4))
  wr = hadamard_transform(w.T, -1).T
  r = jax.random.normal(jax.random.key(1), (2, 1, 8))
  x = r + 0.05 * jax.random.normal(jax.random.key(2), (2, 16, 8))
  f = lambda p, x: jnp.einsum("bkt,kn->btn", x, p["w"])  # noqa: E731
  rule = [QuantRule(".*", activation="int8", static=True, input_rotation="hadamard")]
  cal = quantize_function(f, rule, mode="calibrate")
  _, stats = cal({"w": wr}, x)
  rng = cal.finalize_stats(stats)
  np.testing.assert_allclose(float(rng["w"]["amax"]),
                             float(jnp.max(jnp.abs(hadamard_transform(x, 1)))),
                             rtol=1e-6)
  y = quantize_function(f, rule)({"w": wr}, x, quant_stats=rng)
  assert float(jnp.max(jnp.abs(y - f({"w": w}, x)))) < 0.3  # 2.99 when clipped


def test_a_kernel_flipped_by_conv_transpose_is_quantized():
  # lax.conv_transpose(transpose_kernel=True) flips the kernel (rev): the
  # flow from the parameter stopped there and the conv ran in float, with
  # '.*' reported as matching nothing.
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (2, 8, 8, 8))
  w = jax.random.normal(k[1], (3, 3, 16, 8))
  f = lambda p, x: lax.conv_transpose(x, p["w"], (2, 2), "SAME",  # noqa: E731
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      transpose_kernel=True)
  qf = quantize_function(f, [QuantRule(".*", weight=INT4_G8)])
  y = qf({"w": w}, x)
  assert sorted(qf.config.sites) == ["w"]
  # The flipped kernel's input features are the stored axis 3: groups there.
  want = f({"w": _fq(w, INT4_G8.replace(axis=3))}, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
  assert float(jnp.max(jnp.abs(y - f({"w": w}, x)))) > 1e-2


@pytest.mark.parametrize("wrap", ["jit", "checkpoint"])
def test_weights_through_one_shared_inner_jaxpr_get_their_own_sites(wrap):
  # jax reuses one inner jaxpr for every call of a jitted (or checkpointed)
  # layer with the same shapes: both weights' sites got the first's key, so
  # w2 used w1's calibrated range and LSQ scale.
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k[0], (8, 16))
  p = {"w1": jax.random.normal(k[1], (16, 16)),
       "w2": jax.random.normal(k[2], (16, 16)) * 0.01}
  layer = getattr(jax, wrap)(lambda h, w: jnp.tanh(h @ w))
  f = lambda p, x: layer(layer(x, p["w1"]) * 100.0, p["w2"])  # noqa: E731
  plain = lambda p, x: jnp.tanh(jnp.tanh(x @ p["w1"]) * 100.0 @ p["w2"])  # noqa: E731
  rules = [QuantRule("w1", weight="int8", activation="int8", static=True),
           QuantRule("w2", weight="int4", activation="int8", static=True)]
  outs = []
  for fn in (f, plain):
    _, stats = quantize_function(fn, rules, mode="calibrate")(p, x)
    assert sorted(stats) == ["w1", "w2"]
    qf = quantize_function(fn, rules)
    outs.append(qf(p, x, quant_stats=stats))
    assert {k: s.path for k, s in qf.config.sites.items()} == {"w1": "w1", "w2": "w2"}
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  lsq = quantize_function(f, [QuantRule(".*", weight="int4", learn_weight="lsq",
                                        scale_init="amax")])
  v = lsq.init_quant_vars(p, x)
  assert sorted(v["quant_scales"]) == ["w1", "w2"]
  man = f({n: lb.fake_quant(p[n], lb.QuantSpec("int4", axis=0)) for n in p}, x)
  np.testing.assert_allclose(lsq(p, x, **v), man, rtol=1e-5, atol=1e-5)


def test_metrics_under_jax_checkpoint_name_it_and_lsq_initializes_through_it():
  w = jax.random.normal(jax.random.key(2), (16, 16))
  x = jax.random.normal(jax.random.key(3), (4, 16))
  f = lambda p, x: jax.checkpoint(lambda h, w: h @ w)(x, p["w"])  # noqa: E731
  qf = quantize_function(f, [QuantRule("w", weight="int4")])
  with pytest.raises(ValueError, match=r"'w' runs inside jax.checkpoint \(remat\).*"
                     "without jax.checkpoint"):
    qf({"w": w}, x, quant_metrics=True)
  lsq = quantize_function(f, [QuantRule("w", weight="int4", learn_weight="lsq",
                                        scale_init="amax")])
  v = lsq.init_quant_vars({"w": w}, x)
  np.testing.assert_allclose(lsq({"w": w}, x, **v),
                             x @ lb.fake_quant(w, lb.QuantSpec("int4", axis=0)),
                             rtol=1e-5, atol=1e-5)
  # The learned scale's gradient is the same with and without the checkpoint.
  plain = quantize_function(lambda p, x: x @ p["w"], [QuantRule(
      "w", weight="int4", learn_weight="lsq", scale_init="amax")])
  grads = [jax.grad(lambda s, q=q: q({"w": w}, x, quant_scales=s).sum())(
      v["quant_scales"]) for q in (lsq, plain)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               *grads)
  assert float(jnp.abs(jax.tree.leaves(grads[0])[0]).sum()) > 0
