"""lowbit_jax.optim.adamw: quantized Adam states against optax.adamw."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit_jax as lb
import lowbit_jax.optim as lo
from lowbit_jax.core import QArray

STEPS = 200


def _problem(seed=0):
  """Least squares with 8192 + 64 parameters, minibatches of 32 rows out of 512
  (the papers' setting: stochastic gradients). Feature scales span 100x, so the
  gradients (and second moments) within one block span 10**4."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (512, 128)) * jnp.logspace(0.0, -2.0, 128)
  w_true = jax.random.normal(k2, (128, 64))
  y = x @ w_true + 0.3 * jax.random.normal(k3, (512, 64))

  def loss(p, rows=None):
    xb, yb = (x, y) if rows is None else (x[rows], y[rows])
    return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

  return loss, {"w": jnp.zeros((128, 64)), "b": jnp.zeros((64,))}


def _train(tx, steps=STEPS):
  """(final full-batch loss, largest minibatch loss on the way, final state)."""
  loss, params = _problem()

  def step(carry, key):
    p, s = carry
    val, g = jax.value_and_grad(loss)(p, jax.random.randint(key, (32,), 0, 512))
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), val

  keys = jax.random.split(jax.random.key(1), steps)
  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), keys))  # one compile
  (params, state), losses = run(params)
  return float(loss(params)), float(jnp.max(losses)), state


_SCHED = optax.cosine_decay_schedule(0.1, STEPS)


@pytest.fixture(scope="module")
def float_loss():
  return _train(optax.adamw(_SCHED, weight_decay=1e-4))[0]


@pytest.mark.parametrize("state_format,tol", [("8bit", 0.05), ("4bit", 0.25)])
def test_convex_regression_close_to_float_adamw(float_loss, state_format, tol):
  final, _, state = _train(lo.adamw(_SCHED, weight_decay=1e-4,
                                    state_format=state_format))
  assert np.isfinite(final)
  assert final <= float_loss * (1 + tol), (final, float_loss)
  # The 8192-element weight's moments are quantized; the 64-element bias's are
  # float32 (fewer than min_size elements).
  mu, nu = state[0].mu, state[0].nu
  assert isinstance(mu["w"], QArray) and isinstance(nu["w"], QArray)
  assert not isinstance(mu["b"], QArray) and mu["b"].dtype == jnp.float32
  m_fmt, v_fmt, _ = lo.PRESETS[state_format]
  assert mu["w"].spec.format.name == m_fmt and nu["w"].spec.format.name == v_fmt


def _linear_v_adamw(lr, v_spec):
  """Negative control: AdamW whose second moment is plain blockwise-linear
  (quantize/dequantize with nothing keeping positive values off zero)."""
  b1, b2, eps = 0.9, 0.999, 1e-8

  def init(params):
    return (jnp.zeros([], jnp.int32),
            jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(lambda p: lb.quantize(jnp.zeros((p.size,)), v_spec), params))

  def update(grads, state, params=None):
    del params
    count, mu, nu = state
    count = count + 1
    mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, grads, mu)
    nu = jax.tree.map(lambda g, v: b2 * lb.dequantize(v).reshape(g.shape)
                      + (1 - b2) * g * g, grads, nu)
    upd = jax.tree.map(
        lambda m, v: -lr(count) * (m / (1 - b1 ** count))
        / (jnp.sqrt(v / (1 - b2 ** count)) + eps), mu, nu)
    nu = jax.tree.map(lambda v: lb.quantize(v.reshape(-1), v_spec), nu)
    return upd, (count, mu, nu)

  return optax.GradientTransformation(init, update)


def test_linear_second_moment_blows_up_where_ours_does_not(float_loss):
  # int8 blocks of 2048 with absmax scales: a second moment below amax / 254
  # of its block rounds to 0 and that coordinate steps by m / eps.
  spec = lb.QuantSpec("int8", axis=0, group_size=2048, pad=True)
  final, worst, _ = _train(_linear_v_adamw(_SCHED, spec))
  assert not final < 100 * float_loss, (final, worst)
  # Ours with the same linear int8 second moment (behind the never-zero guard)
  # and with the default maps: see test_convex_regression_close_to_float_adamw.


# A zero-free map, and formats that code 0 (so the guard acts): integer,
# power-of-two (E8M0) block scales, 9-bit floats (one uint16 code each), then
# two-level NVFP4 scales and more.
V_FORMATS = ["dynamic8_unsigned", "int8", "mxfp4", "e5m3"]
V_FORMATS_MORE = ["dynamic4_unsigned", "linear4_unsigned", "int4", "fp8_e4m3", "nf4",
                  "nvfp4", lb.QuantSpec("uint8", group_size=256)]


@pytest.mark.parametrize("v_formats", [
    V_FORMATS, pytest.param(V_FORMATS_MORE, marks=pytest.mark.slow)],
    ids=["common", "more"])
def test_second_moment_is_positive_wherever_it_was(v_formats):
  # Gradients spanning 10 decades, some exactly zero: v = (1 - b2) g**2 spans 20.
  n = 4096
  rng = np.random.default_rng(0)
  g = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-10, 0, n)).astype(np.float32)
  g[rng.random(n) < 0.05] = 0.0
  txs = [lo.scale_by_adam(state_format=(None, f), min_size=0) for f in v_formats]
  ref_tx = lo.scale_by_adam()

  @jax.jit  # one compilation for every format
  def run(g):
    v = ref_tx.update(g, ref_tx.init(g))[1].nu  # the float32 second moment
    out = []
    for tx in txs:
      nu = tx.update(g, tx.init(g))[1].nu
      plain = lb.dequantize(lb.quantize(v, nu.spec))  # no guard
      out.append((nu, lb.dequantize(nu), plain))
    return v, out

  v_float, out = run(jnp.asarray(g))
  v_float = np.asarray(v_float)
  pos = v_float > 0
  for fmt, (nu, v_q, plain) in zip(v_formats, out):
    spec = nu.spec
    v_q, plain = np.asarray(v_q), np.asarray(plain)
    assert np.all(v_q[pos] > 0), (fmt, int(np.sum(v_q[pos] <= 0)))
    values = spec.storage_format.values()
    if 0.0 in values:
      # The data does hit the hazard: quantized plainly, the format loses
      # positive entries; the guard changes exactly those, and zero stays zero.
      assert np.any(plain[pos] == 0), fmt
      np.testing.assert_array_equal(v_q[plain > 0], plain[plain > 0], err_msg=str(fmt))
      assert np.all(v_q[~pos] == 0), fmt
    else:
      # A map without zero needs no guard: the plain codes, and an exact zero
      # reads back as the smallest code times its block's absmax.
      np.testing.assert_array_equal(v_q, plain, err_msg=str(fmt))
      amax = np.repeat(np.max(v_float.reshape(-1, spec.group_size), axis=1),
                       spec.group_size)
      smallest = np.min(values[values > 0])
      assert np.all(v_q[~pos] <= smallest * amax[~pos] * (1 + 1e-6)), fmt


def test_float_states_match_optax_adamw():
  params = {"w": jax.random.normal(jax.random.key(0), (96, 64)),
            "b": jax.random.normal(jax.random.key(1), (64,)),
            "s": jnp.ones((3,))}
  mask = {"w": True, "b": False, "s": True}
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 3, 10)
  kw = dict(b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2, mask=mask)
  ours, ref = lo.adamw(sched, **kw), optax.adamw(sched, **kw)

  def loss(p):
    return jnp.sum(jnp.tanh(p["w"] @ jnp.ones((64,)) * p["s"][0]) ** 2) + jnp.sum(
        p["b"] ** 3)

  def run(tx):
    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      p = optax.apply_updates(p, u)
      return (p, s), p
    return jax.lax.scan(step, (params, tx.init(params)), None, length=10)

  ((_, s_ours), ps), ((_, s_ref), qs) = jax.jit(lambda: (run(ours), run(ref)))()
  for k in params:  # every step's parameters
    np.testing.assert_allclose(np.asarray(ps[k]), np.asarray(qs[k]), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(s_ours[0].mu[k]), np.asarray(s_ref[0].mu[k]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s_ours[0].nu[k]), np.asarray(s_ref[0].nu[k]),
                               rtol=1e-6, atol=0)
  assert int(s_ours[0].count) == int(s_ref[0].count) == 10


def test_state_bytes_8bit_and_4bit():
  params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
            "b": jax.ShapeDtypeStruct((1024,), jnp.float32)}
  n = 1024 * 1024
  floats = lo.state_nbytes(jax.eval_shape(lo.adamw(1e-3).init, params))
  assert floats == 2 * 4 * (n + 1024) + 4  # two float32 moments + the count
  s8 = lo.state_nbytes(jax.eval_shape(lo.adamw(1e-3, state_format="8bit").init,
                                      params))
  s4 = lo.state_nbytes(jax.eval_shape(lo.adamw(1e-3, state_format="4bit").init,
                                      params))
  # Codes + one float32 scale per block; the bias stays float32.
  assert s8 == 2 * (n + 4 * n // 2048) + 2 * 4 * 1024 + 4
  assert s4 == 2 * (n // 2 + 4 * n // 128) + 2 * 4 * 1024 + 4
  assert s8 <= 0.27 * floats and s4 <= 0.15 * floats
  # A real state measures the same as its abstract one.
  small = {"w": jnp.zeros((64, 100))}
  tx = lo.adamw(1e-3, state_format="4bit", min_size=0)
  assert lo.state_nbytes(jax.jit(tx.init)(small)) == lo.state_nbytes(
      jax.eval_shape(tx.init, small))


def test_sharded_jit_equals_single_device():
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8
  mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
  shardings = {"w": NamedSharding(mesh, P("data", "model")),
               "b": NamedSharding(mesh, P("model"))}
  params = {"w": jax.random.normal(jax.random.key(3), (256, 64)), "b": jnp.zeros((64,))}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) * 10.0 ** -(i % 3),
                        params) for i in range(2)]
  tx = lo.adamw(1e-2, state_format="4bit", min_size=1024)

  def run(params, grads):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  p1, s1 = jax.jit(run)(params, grads)
  put = lambda t: jax.device_put(t, shardings)  # noqa: E731
  p2, s2 = jax.jit(run)(put(params), [put(g) for g in grads])
  assert len(p2["w"].sharding.device_set) == 8
  assert isinstance(s2[0].mu["w"], QArray)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_multi_transform_and_chain():
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 128)),
                      "kernel_scale": jnp.full((1, 128), 0.05)}}
  grads = jax.tree.map(lambda p: jnp.cos(p) * 1e-2, params)

  def labels(p):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "scale" if "scale" in jax.tree_util.keystr(path)
        else "weight", p)

  w_tx = optax.chain(optax.clip_by_global_norm(1.0),
                     lo.adamw(1e-3, state_format="8bit"))
  s_tx = lo.adamw(1e-2, weight_decay=0.0)
  tx = optax.multi_transform({"weight": w_tx, "scale": s_tx}, param_labels=labels)

  def two_steps(tx, p, g):
    s = tx.init(p)
    for _ in range(2):
      u, s = tx.update(g, s, p)
    return u, s

  @jax.jit
  def run():
    alone = {k: two_steps(t, params["dense"][k], grads["dense"][k])[0]
             for t, k in ((w_tx, "kernel"), (s_tx, "kernel_scale"))}
    return two_steps(tx, params, grads), alone

  (upd, state), alone = run()
  # Each group gets exactly what its own transformation gives it alone.
  for k, u in alone.items():
    np.testing.assert_array_equal(np.asarray(upd["dense"][k]), np.asarray(u))
  inner = state.inner_states["weight"].inner_state[1][0]
  assert isinstance(inner.mu["dense"]["kernel"], QArray)
  assert lo.state_nbytes(state) < 4 * 2 * 64 * 128  # the kernel's moments: 8-bit


def test_state_checkpoint_round_trip(tmp_path):
  from lowbit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params = {"w": jax.random.normal(jax.random.key(0), (64, 96)), "b": jnp.ones((96,))}
  tx = lo.adamw(1e-3, state_format="4bit", min_size=1000)
  state = jax.jit(lambda p: tx.update(jax.tree.map(jnp.sin, p), tx.init(p), p)[1])(
      params)
  is_q = lambda x: isinstance(x, QArray)  # noqa: E731
  leaves, treedef = jax.tree.flatten(state, is_leaf=is_q)
  checkpoint.save(str(tmp_path / "opt"), leaves)
  back = jax.tree.unflatten(treedef, checkpoint.restore(str(tmp_path / "opt")))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert back[0].mu["w"].spec == state[0].mu["w"].spec


def test_spec_options_are_kept_and_blocks_follow_the_rules():
  p = {"w": jnp.zeros((300, 50))}  # 15000 elements: the last block is padded

  def moments(**kw):  # shapes and dtypes only: traced, never compiled
    s = jax.eval_shape(lo.scale_by_adam(**kw).init, p)
    return s.mu["w"], s.nu["w"]

  m, v = moments(state_format="8bit")
  assert m.scale.shape == v.scale.shape == (-(-15000 // 2048),)
  m, v = moments(state_format="4bit", block_size=64)
  assert m.scale.shape == (-(-15000 // 64),) and m.codes.dtype == jnp.uint8
  m, v = moments(state_format="fp8_e4m3")
  assert m.scale.shape == (8,) and m.spec.format.name == "fp8_e4m3"
  m, v = moments(state_format="mxfp4")  # a block format keeps its own block
  assert m.scale.shape == (-(-15000 // 32),) and m.scale.dtype == jnp.uint8
  m, v = moments(state_format=(lb.QuantSpec("int4", group_size=32,
                                            scale_dtype="bfloat16"), None))
  assert m.scale.shape == (-(-15000 // 32),) and m.scale.dtype == jnp.bfloat16
  assert v.dtype == jnp.float32 and v.shape == (300, 50)  # None: float32
  m, v = moments(state_format="nf4", min_size=20000)  # below min_size: float32
  assert not isinstance(m, QArray) and m.shape == (300, 50)


@pytest.mark.parametrize("kw,match", [
    ({"state_format": "not_a_format"}, "unknown format"),
    ({"state_format": lb.QuantSpec("int8", tile=(8, 8))}, "tile"),
    ({"state_format": lb.QuantSpec("int8", rounding="stochastic")}, "nearest"),
    ({"state_format": ("int8", "ternary")}, "second moment"),
    ({"state_format": ("int8", "int8", "int8")}, "pair"),
    ({"state_format": "8bit", "block_size": 0}, "block_size"),
    ({"state_format": "mxfp4", "block_size": 64}, "blocks of 32"),
    ({"b2": 1.0}, r"\[0, 1\)"),
    ({"min_size": -1}, "min_size"),
    ({"state_format": "dynamic8_unsigned"}, r"no negative values.*pair"),
    ({"state_format": ("linear4_unsigned", None)}, "no negative values"),
    ({"state_format": "8bit", "min_size": jnp.int32(4096)},
     r"static_args=\('min_size', 'block_size'\)"),
])
def test_bad_arguments_say_how_to_fix(kw, match):
  with pytest.raises(ValueError, match=match):
    lo.adamw(1e-3, **kw)



def test_bad_arguments_under_inject_hyperparams_say_how_to_fix():
  with pytest.raises(ValueError, match=r"static_args=\('min_size'"):
    optax.inject_hyperparams(lo.adamw)(learning_rate=1e-3, state_format="8bit").init(
        {"w": jnp.ones((64, 64))})
  tx = optax.inject_hyperparams(lo.adamw, static_args=("min_size",))(
      learning_rate=1e-3, state_format="8bit", min_size=16)
  state = tx.init({"w": jnp.ones((64, 64))})
  assert isinstance(state.inner_state[0].mu["w"], QArray)


def test_complex_and_empty_parameters_match_optax_adamw():
  params = {"c": jnp.array([1 + 1j, 2 - 1j, -0.5j], jnp.complex64),
            "w": jax.random.normal(jax.random.key(0), (64, 64)),
            "lora_b": jnp.zeros((0, 8))}
  grads = {"c": jnp.array([0.5 + 2j, -1 + 0.5j, 3 + 0j], jnp.complex64),
           "w": jax.random.normal(jax.random.key(1), (64, 64)),
           "lora_b": jnp.zeros((0, 8))}
  ref = optax.adamw(1e-2)
  for fmt in (None, "8bit"):
    tx = lo.adamw(1e-2, state_format=fmt, min_size=0)
    s, r = tx.init(params), ref.init(params)
    assert s[0].mu["c"].dtype == jnp.complex64 and s[0].nu["c"].dtype == jnp.float32
    assert s[0].mu["lora_b"].shape == (0, 8)
    for _ in range(3):
      u, s = tx.update(grads, s, params)
      v, r = ref.update(grads, r, params)
      # With b2 = 0.999, 1 - b2**t at t <= 3 turns one float32 ulp of b2**t
      # (6e-8, which differs between two compiled programs' pow) into 2e-5
      # relative; optax also keeps nu complex (complex division and sqrt).
      np.testing.assert_allclose(np.asarray(u["c"]), np.asarray(v["c"]), rtol=3e-5)
      assert u["lora_b"].shape == (0, 8)
      if fmt is None:
        np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(v["w"]),
                                   rtol=3e-5)


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
def test_a_gradient_whose_square_overflows_leaves_the_block_finite(fmt):
  # |g| = 1e20 squares to inf in float32; quantized, that inf made its whole
  # block's second moment NaN for every later step. Capping g**2 alone then
  # left m at 1e19 against a capped v: updates of 5 lr (1e20) to 5e7 lr
  # (1e30) for hundreds of steps. Adam's update stays within about lr.
  p = jnp.ones((4096,))
  for g0 in (1e20, 1e30, -3e38):
    big = jnp.full_like(p, 0.5).at[0].set(g0)
    tx = lo.adamw(1e-2, b2=0.95, weight_decay=0.0, state_format=fmt)
    s = tx.init(p)
    u, s = tx.update(big, s, p)
    np.testing.assert_allclose(float(u[0]), -np.sign(g0) * 1e-2, rtol=1e-3)
    for _ in range(3):
      u, s = tx.update(jnp.full_like(p, 0.5), s, p)
      assert bool(jnp.all(jnp.isfinite(u))), int(jnp.sum(~jnp.isfinite(u)))
      assert float(jnp.max(jnp.abs(u))) <= 1e-2
    assert bool(jnp.all(jnp.isfinite(lb.dequantize(s[0].nu))))


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_element_stays_in_that_element(fmt, bad):
  # optax: that element's update is non-finite; quantized moments must not
  # carry it into the other 2047 (8-bit) or 127 (4-bit) elements of its block.
  p = jnp.ones((4096,))
  g = jnp.full_like(p, 0.5)
  tx, ref = lo.adamw(1e-2, state_format=fmt), optax.adamw(1e-2)
  s, r = tx.init(p), ref.init(p)
  u, s = tx.update(g.at[0].set(bad), s, p)
  v, _ = ref.update(g.at[0].set(bad), r, p)
  np.testing.assert_array_equal(np.isfinite(np.asarray(u)), np.isfinite(np.asarray(v)))
  for _ in range(3):
    u, s = tx.update(g, s, p)
    assert bool(jnp.all(jnp.isfinite(u))), int(jnp.sum(~jnp.isfinite(u)))


def test_nnx_optimizer_and_flax_serialization():
  # nnx.Optimizer writes the new state back as nnx.State mappings, which
  # turned each quantized moment into a mapping of its fields: the second
  # step failed. flax.serialization could not save a QArray at all.
  from flax import nnx, serialization   # pylint: disable=g-import-not-at-top
  import lowbit_jax.flax   # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers QArrays with flax.serialization)
  x, y = jnp.ones((4, 64)), jnp.ones((4, 80))
  loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
  model = nnx.Linear(64, 80, rngs=nnx.Rngs(0))
  gd, params = nnx.split(model, nnx.Param)
  ref_p = jax.tree.map(jnp.array, params)   # a copy: the model's own change
  opt = nnx.Optimizer(model, lo.adamw(1e-2, state_format="8bit"), wrt=nnx.Param)
  tx = lo.adamw(1e-2, state_format="8bit")
  ref_s = tx.init(ref_p)
  for _ in range(3):
    opt.update(model, nnx.grad(loss)(model))
    g = jax.grad(lambda p: loss(nnx.merge(gd, p)))(ref_p)
    u, ref_s = tx.update(g, ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(ref_p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A wrapper that combines old and new states (their structures must agree).
  model2 = nnx.Linear(64, 80, rngs=nnx.Rngs(0))
  opt2 = nnx.Optimizer(model2, optax.MultiSteps(lo.adamw(1e-2, state_format="8bit"), 2),
                       wrt=nnx.Param)
  for _ in range(4):
    opt2.update(model2, nnx.grad(loss)(model2))
  p = {"w": jnp.ones((64, 80)), "b": jnp.ones((80,))}
  state = tx.update(p, tx.init(p), p)[1]
  back = serialization.from_bytes(state, serialization.to_bytes(state))
  assert isinstance(back[0].mu["w"], QArray)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Real mode's QWeights too (flax looks serializers up by exact type).
  from lowbit_jax.flax import quantize_linen   # pylint: disable=g-import-not-at-top
  import flax.linen as nn   # pylint: disable=g-import-not-at-top
  layer, xs = nn.Dense(16), jnp.ones((2, 32))
  qv = quantize_linen([lb.QuantRule(".*", weight="int8")], mode="real").quantize_params(
      layer, layer.init(jax.random.key(0), xs), xs)
  back = serialization.from_bytes(qv, serialization.to_bytes(qv))
  assert back["params"]["kernel"].transposed == qv["params"]["kernel"].transposed
  np.testing.assert_array_equal(np.asarray(back["params"]["kernel"].codes),
                                np.asarray(qv["params"]["kernel"].codes))
