"""SpinQuant: Cayley SGD on the orthogonal group, learned rotations folded as QuaRot."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from lowbit_jax import QuantRule, quantize_function
from lowbit_jax.algorithms import (SpinQuantConfig, cayley_sgd, next_token_loss,
                                   orthogonality_error, random_hadamard,
                                   random_orthogonal, spinquant_model)
from lowbit_jax.flax import apply_ptq, quantize_linen


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
  with jax.default_matmul_precision("float32"):
    yield


def test_cayley_sgd_keeps_matrices_orthogonal_and_descends():
  """Li et al. 2020's Cayley SGD: every iterate orthogonal; it minimises."""
  k1, k2 = jax.random.split(jax.random.key(0))
  target = random_orthogonal(k1, 12)
  target = target.at[:, 0].multiply(jnp.sign(jnp.linalg.det(target)))  # in SO(n)
  params = {"r": jnp.eye(12), "batch": jnp.broadcast_to(jnp.eye(6), (3, 6, 6))}
  opt = cayley_sgd(0.2, momentum=0.9)
  state = opt.init(params)
  noise = jax.random.normal(k2, (3, 6, 6))

  @jax.jit
  def step(params, state, i):
    g = {"r": jax.grad(lambda r: jnp.sum((r - target) ** 2))(params["r"]),
         "batch": noise * jnp.cos(i)}   # arbitrary gradients for the batch leaf
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  for i in range(200):
    params, state = step(params, state, jnp.float32(i))
  assert orthogonality_error(params["r"]) < 1e-5
  assert orthogonality_error(params["batch"]) < 1e-5
  assert float(jnp.sum((params["r"] - target) ** 2)) < 1e-3
  with pytest.raises(ValueError, match="needs the current matrices"):
    opt.update(params, state)
  with pytest.raises(ValueError, match=r"every leaf must be \[..., n, n\]"):
    opt.init({"v": jnp.ones((3, 4))})


# A tiny pre-norm decoder as a plain function: embedding, one attention block
# with an MLP, a head; planted outlier channels in the embedding.
V, D, H, HD, FF = 64, 32, 2, 16, 64


def _rms(x, g):
  return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g


def toy_apply(p, t):
  x = p["embed"][t]
  b, n = t.shape
  h = _rms(x, p["n1"])
  q, k, v = ((h @ p[m]).reshape(b, n, H, HD) for m in ("q", "k", "v"))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD)
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e9)
  a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, n, H * HD)
  x = x + a @ p["o"]
  x = x + jax.nn.gelu(_rms(x, p["n2"]) @ p["up"]) @ p["down"]
  return _rms(x, p["nf"]) @ p["head"]


def _tokens(seed, n, t=32):
  """Sequences of the map ``t -> 5 t + 3 (mod V)`` from random starts."""
  start = np.random.default_rng(seed).integers(0, V, n)
  seq = [start]
  for _ in range(t - 1):
    seq.append((5 * seq[-1] + 3) % V)
  return jnp.asarray(np.stack(seq, 1), jnp.int32)


def trained_toy():
  """The toy decoder trained briefly (Adam), with 3 outlier embedding channels."""
  ks = jax.random.split(jax.random.key(0), 8)
  init = lambda k, s: jax.random.normal(k, s) / np.sqrt(s[0] if s[0] != V else 1)
  p = {"embed": init(ks[0], (V, D)).at[:, :3].multiply(10.0), "n1": jnp.ones(D),
       "n2": jnp.ones(D), "nf": jnp.ones(D), "q": init(ks[1], (D, D)),
       "k": init(ks[2], (D, D)), "v": init(ks[3], (D, D)), "o": init(ks[4], (D, D)),
       "up": init(ks[5], (D, FF)), "down": init(ks[6], (FF, D)),
       "head": init(ks[7], (D, V))}
  opt = optax.adam(1e-2)
  state = opt.init(p)

  @jax.jit
  def step(p, state, t):
    g = jax.grad(lambda p: next_token_loss(toy_apply(p, t), t))(p)
    upd, state = opt.update(g, state, p)
    return optax.apply_updates(p, upd), state

  for i in range(25):
    p, state = step(p, state, _tokens(i, 16))
  return p


@pytest.fixture(scope="module")
def toy():
  return trained_toy()


W4A4 = [QuantRule(".*", weight="int4", activation="int4")]


def test_learned_rotation_lowers_quantized_loss_and_folds_exactly(toy):
  """W4A4 on the trained toy decoder (measured with the suite's XLA flags:
  0.2395 -> 0.2312 on calibration, 0.2388 -> 0.2320 held out).

  The quantized loss along the Cayley path moves by +-2% from step to step
  (rounding flips), and which steps land low depends on float summation
  order (without the suite's flags the best step is another, 0.2361 / 0.2384):
  the selection looks at every step, and held out the learned rotation must
  not be worse than the start.
  """
  calib, held = [(_tokens(1000, 512),)], [(_tokens(2000, 512),)]
  cfg = SpinQuantConfig(steps=30, learning_rate=1.5, select_every=1)
  new, rot, hist = spinquant_model(toy_apply, toy, calib, W4A4, config=cfg,
                                   online="down", heads=("v", "o", HD),
                                   eval_batches=held)
  # Below the randomized Hadamard (QuaRot) start, on calibration and held-out data.
  assert hist["best_step"] > 0
  assert hist["calib_after"] < hist["calib_before"] - 1e-3, hist
  assert hist["eval_after"] < hist["eval_before"], hist
  # Learned rotations are orthogonal and not the start.
  assert orthogonality_error(rot.rotation) < 1e-5
  assert orthogonality_error(rot.head_rotations) < 1e-5
  assert float(jnp.max(jnp.abs(rot.rotation - random_hadamard(jax.random.key(0), D)))
              ) > 1e-2
  assert rot.online_paths == ("down",)
  # The folded float model equals the unrotated one.
  t = held[0][0][:4]
  ref = toy_apply(toy, t)
  out = quantize_function(toy_apply, rot.rules())(new, t)
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5


class _TinyLM(nn.Module):
  @nn.compact
  def __call__(self, t):
    x = nn.Embed(V, D, name="embed")(t)
    h = nn.Dense(FF, name="up")(nn.RMSNorm(name="norm")(x))
    x = x + nn.Dense(D, name="down")(jax.nn.gelu(h))
    return nn.Dense(V, name="head")(nn.RMSNorm(name="final_norm")(x))


@pytest.mark.slow
def test_apply_ptq_spinquant_real_mode_equals_fake_mode():
  """The Linen driver: learn, fold, check, RTN; real mode stores the PTQ result."""
  m = _TinyLM()
  t = _tokens(3, 8, 16)
  params = m.init(jax.random.key(1), t)["params"]
  qp, rep = apply_ptq(m, params, [(t,)], "spinquant", "int4", "int8",
                      online="down/kernel",
                      spinquant=SpinQuantConfig(steps=3))
  hist = rep["spinquant"]
  assert len(hist["loss"]) == 3 and hist["calib_after"] <= hist["calib_before"]
  assert rep["rotation"].online_paths == ("down/kernel",)
  a8 = [QuantRule(".*", activation="int8")]   # weights are in qp
  fake = quantize_linen(rep["rotation"].rules(a8))(m.apply)({"params": qp}, t)
  real_rules = rep["rotation"].rules([QuantRule(".*", weight="int4", activation="int8")])
  q = quantize_linen(real_rules, mode="real")
  qv = q.quantize_params(m, {"params": qp, "quant_scales": rep["quant_scales"]}, t)
  np.testing.assert_array_equal(qv["params"]["up"]["kernel"].logical(),
                                qp["up"]["kernel"])
  np.testing.assert_allclose(q(m.apply)(qv, t), fake, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="spinquant= applies to method='spinquant'"):
    apply_ptq(m, params, [(t,)], "quarot", "int4", spinquant=SpinQuantConfig())
  with pytest.raises(ValueError, match="learning the per-head rotations needs heads"):
    apply_ptq(m, params, [(t,)], "spinquant", "int4",
              spinquant=SpinQuantConfig(learn=("residual", "heads")))


def test_config_validation():
  with pytest.raises(ValueError, match="learn must be None or a non-empty subset"):
    SpinQuantConfig(learn=("r3",))
  with pytest.raises(ValueError, match="loss must be one of"):
    SpinQuantConfig(loss="mse")
  with pytest.raises(ValueError, match="needs the model to map int tokens"):
    next_token_loss(jnp.zeros((2, 5)), jnp.zeros((2,), jnp.int32))


@pytest.mark.slow
def test_nnx_model_through_quantize_function():
  """An NNX model (conv, DenseGeneral, einsum head) as a function of its state."""
  from flax import nnx
  from tests import _toy_models as toy
  from lowbit_jax.flax import quantize_nnx
  model, variables = toy.init_linen()
  toks = toy.tokens()
  ref = model.apply(variables, toks)
  nm = toy.nnx_from_linen(variables["params"])
  gd, state = nnx.split(nm)
  new, rot, hist = spinquant_model(lambda s, t: nnx.merge(gd, s)(t), state, [(toks,)],
                                   W4A4, online=".*/down/kernel",
                                   config=SpinQuantConfig(steps=3, select_every=1))
  assert hist["calib_after"] < hist["calib_before"]   # measured 4.61 -> 4.45
  nnx.update(nm, new)
  out = quantize_nnx(nm, rot.rules())(toks)
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5
