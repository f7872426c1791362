"""QuaRot that folds: residual stream from the jaxpr, gains fused, online Hadamard."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import _toy_models as toy
from lowbit_jax import QuantRule
from lowbit_jax.algorithms import rotate_model
from lowbit_jax.core import hadamard, hadamard_transform
from lowbit_jax.flax import quantize_linen, quantize_nnx
from lowbit_jax.models.llama import Llama, LlamaConfig


@pytest.fixture(autouse=True, scope="module")
def _float32_matmuls():
  with jax.default_matmul_precision("float32"):
    yield


def test_hadamard_orders_and_fast_transform():
  for n in (28, 704):   # Paley II; Paley I (44) x Walsh-Hadamard 16
    h = np.asarray(hadamard(n), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, n, 2)))
    np.testing.assert_allclose(np.asarray(hadamard_transform(x, axis=1)),
                               np.einsum("anb,nk->akb", x, h), rtol=1e-5, atol=1e-5)


def test_hadamard_orders_from_prime_power_fields():
  # 11008 (Llama-2-7B's MLP width) was 5504 x 2: a dense 5504-wide block,
  # costlier than the matmul it precedes. GF(7^3) gives Paley I of order 344,
  # GF(7^2) Paley II of order 100.
  from lowbit_jax.core import _hadamard
  assert _hadamard.hadamard_factors(11008) == (344, 32)
  for n in (100, 344, 52):
    h = _hadamard._paley(n).astype(np.int64)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))
  assert _hadamard._paley(344) is _hadamard._paley(344)   # built once
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 200)))
  np.testing.assert_allclose(np.asarray(hadamard_transform(x)),
                             x @ np.asarray(hadamard(200), np.float64), rtol=1e-5, atol=1e-5)


def test_hadamard_order_without_construction():
  with pytest.raises(ValueError, match="no Hadamard matrix of order 172"):
    hadamard(172)


@pytest.fixture(scope="module")
def llama():
  """The smoke decoder with non-trivial gains and planted outlier channels.

  Trained LLMs have a few residual channels far larger than the rest; here
  four embedding columns are scaled by 25.
  """
  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  toks = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab)
  params = model.init(jax.random.key(0), toks)["params"]
  keys = iter(jax.random.split(jax.random.key(7), 64))

  def perturb(kp, x):
    if kp[-1].key == "scale":
      return x + 0.3 * jax.random.normal(next(keys), x.shape)
    if kp[-1].key == "embedding":
      return x.at[:, :4].multiply(25.0)
    return x
  params = jax.tree_util.tree_map_with_path(perturb, params)
  fn = lambda p, t: model.apply({"params": p}, t)
  new, info = rotate_model(fn, params, toks, key=jax.random.key(3),
                           online=".*/down_proj/kernel",
                           heads=(".*/v_proj/kernel", ".*/o_proj/kernel",
                                  cfg.head_dim))
  return model, params, toks, fn(params, toks), new, info


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_llama_rotation_keeps_float_outputs(llama):
  model, params, toks, ref, new, info = llama
  s = info.stream
  assert s.width == 64
  # Every Dense reads or writes the stream, or takes the online Hadamard.
  assert {p for p, _ in s.rotate} | set(info.online_paths) == {
      "embed/embedding", "lm_head/kernel"} | {
          f"layers_{i}/{m}/kernel" for i in range(2) for m in (
              "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
              "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
  assert {f.gain for f in s.fusions} == {"final_norm/scale"} | {
      f"layers_{i}/{n}/scale" for i in range(2) for n in ("attn_norm", "mlp_norm")}
  np.testing.assert_array_equal(new["final_norm"]["scale"], 1.0)
  # The weights really changed, the function did not.
  assert _rel(new["layers_0"]["attn"]["q_proj"]["kernel"],
              params["layers_0"]["attn"]["q_proj"]["kernel"]) > 0.5
  out = jax.jit(quantize_linen(info.rules())(model.apply))({"params": new}, toks)
  assert _rel(out, ref) < 1e-5
  # Without the online transform the down projections are wrong.
  assert _rel(model.apply({"params": new}, toks), ref) > 1e-2


def test_llama_w4a4_error_lower_after_rotation(llama):
  model, params, toks, ref, new, info = llama
  w4a4 = [QuantRule(".*", weight="int4", activation="int4")]
  plain = jax.jit(quantize_linen(w4a4)(model.apply))({"params": params}, toks)
  rotated = jax.jit(quantize_linen(info.rules(w4a4))(model.apply))({"params": new},
                                                                   toks)
  e_plain, e_rot = _rel(plain, ref), _rel(rotated, ref)
  assert e_rot < 0.75 * e_plain, (e_plain, e_rot)   # measured 0.24 -> 0.15


def test_toy_model_plain_function():
  model, variables = toy.init_linen()
  params, toks = variables["params"], toy.tokens()
  ref = model.apply(variables, toks)
  new, info = rotate_model(toy.toy_apply, params, toks, key=jax.random.key(3))
  # conv (after norm1) and up read the stream; o, down (+ biases) write it.
  assert ("layers_0/conv/kernel", 1) in info.stream.rotate
  assert ("layers_0/o/kernel", 2) in info.stream.rotate
  assert ("layers_0/down/bias", 0) in info.stream.rotate
  assert _rel(toy.toy_apply(new, toks), ref) < 1e-5


@pytest.mark.slow
def test_toy_model_nnx():
  model, variables = toy.init_linen()
  params, toks = variables["params"], toy.tokens()
  ref = model.apply(variables, toks)
  nm = toy.nnx_from_linen(params)
  gd, state = nnx.split(nm)
  new, info = rotate_model(lambda s, t: nnx.merge(gd, s)(t), state, toks,
                           key=jax.random.key(4), online=".*/down/kernel")
  nnx.update(nm, new)
  assert _rel(quantize_nnx(nm, info.rules())(toks), ref) < 1e-5


class _LayerNormLM(nn.Module):
  post_norm: bool = False

  @nn.compact
  def __call__(self, t):
    x = nn.Embed(16, 8, name="embed")(t)
    if self.post_norm:   # two post-norm blocks
      x = nn.RMSNorm(name="norm")(x + nn.Dense(8, name="ff")(x))
      x = nn.RMSNorm(name="norm2")(x + nn.Dense(8, name="ff2")(x))
    else:
      x = x + nn.Dense(8, name="ff")(nn.LayerNorm(name="ln")(x))
    return nn.Dense(16, name="head")(x)


@pytest.mark.parametrize("post_norm,match", [
    (False, "reduce_sum.*ln.*mean subtraction"),
    (True, "added to the output of the norm with gain 'norm/scale'"),
])
def test_models_that_cannot_rotate_name_the_layer(post_norm, match):
  m = _LayerNormLM(post_norm)
  t = jnp.zeros((1, 4), jnp.int32)
  p = m.init(jax.random.key(0), t)["params"]
  with pytest.raises(ValueError, match=match):
    rotate_model(lambda p, t: m.apply({"params": p}, t), p, t, key=jax.random.key(0))


def test_tied_embedding_and_head_after_a_gained_norm_is_refused():
  # Fusing the final gain into the tied table would rescale every lookup.
  cfg = LlamaConfig.smoke(tie_embeddings=True)
  m = Llama(cfg)
  t = jnp.zeros((1, 4), jnp.int32)
  p = m.init(jax.random.key(0), t)["params"]
  with pytest.raises(ValueError, match="'embed/embedding' reads norm gain "
                     "'final_norm/scale' but also writes.*Untie them"):
    rotate_model(lambda p, t: m.apply({"params": p}, t), p, t, key=jax.random.key(0))


def _rms(x, g):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g


@pytest.mark.parametrize("shared", ["gain", "kernel"])
def test_a_stream_parameter_also_used_off_the_stream_is_refused(shared):
  # A gain also applied to a hidden state, or a reader kernel also applied to
  # a non-stream value: the fold would change that second use.
  k = iter(jax.random.split(jax.random.key(0), 8))
  p = {n: jax.random.normal(next(k), s) for n, s in
       (("emb", (16, 8)), ("g", (8,)), ("w", (8, 8)), ("down", (8, 8)),
        ("head", (8, 16)))}

  def fn(p, t):
    x = p["emb"][t]
    h = _rms(x, p["g"]) @ p["w"]
    h = _rms(h, p["g"]) if shared == "gain" else jnp.tanh(h) @ p["w"]
    x = x + h @ p["down"]
    return _rms(x, 1.0) @ p["head"]

  match = ("norm gain 'g' is also used outside the norm" if shared == "gain" else
           "'w' \\(axis 0\\) is part of the stream's rotation but is also "
           "contracted with a value that is not the stream")
  with pytest.raises(ValueError, match=match):
    rotate_model(fn, p, jnp.arange(6)[None], key=jax.random.key(1))


def test_input_rotation_rule_validation():
  with pytest.raises(ValueError, match="input_rotation must be one of"):
    QuantRule(".*", input_rotation="random")
  assert not QuantRule(".*", input_rotation="hadamard").is_float


@pytest.mark.slow
def test_apply_ptq_quarot_with_gptq(llama):
  """The Linen PTQ driver: rotate, check, GPTQ on the rotated kernels, W4A4."""
  from lowbit_jax.flax import apply_ptq
  model, params, toks, ref, _, _ = llama
  w4a4 = [QuantRule(".*", weight="int4", activation="int4")]
  plain = jax.jit(quantize_linen(w4a4)(model.apply))({"params": params}, toks)
  qparams, rep = apply_ptq(model, params, [(toks,)], "quarot", "int4", "int4",
                           quantizer="gptq", online=".*/down_proj/kernel")
  assert rep["rotation"].online_paths == ("layers_0/mlp/down_proj/kernel",
                                          "layers_1/mlp/down_proj/kernel")
  a4 = [QuantRule(".*", activation="int4")]   # weights are in qparams
  out = jax.jit(quantize_linen(rep["rotation"].rules(a4))(model.apply))(
      {"params": qparams}, toks)
  assert _rel(out, ref) < 0.75 * _rel(plain, ref)
  with pytest.raises(ValueError, match="online= and heads= apply to method="):
    apply_ptq(model, params, [(toks,)], "gptq", "int4", online=".*")


def test_bf16_llama_quarot_folds_and_stays_within_bf16_noise():
  """A model computing in bfloat16 (the decoder on a GPU): the embedding lookup
  is found through the bf16 cast of its table (ml_dtypes' bfloat16 is no numpy
  floating type), the fold check allows bf16 rounding, and the rotated float
  model stays within a few bf16 ulps of the original."""
  from lowbit_jax import _ptq_rotation, pipelines
  from lowbit_jax.flax import ptq as ptq_lib
  cfg = LlamaConfig.smoke(dtype="bfloat16")
  m = Llama(cfg)
  p = m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  t = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab)
  q, _ = ptq_lib.apply_ptq(m, p, [(t,)], "quarot", None, None,
                           online=pipelines.LLAMA_ONLINE)
  rotated = [k for k, v in jax.tree_util.tree_leaves_with_path(q)
             if not np.array_equal(np.asarray(v),
                                   np.asarray(_leaf(p, k)))]
  assert rotated, "nothing was rotated"
  assert _ptq_rotation.compute_eps(lambda pp, tt: m.apply({"params": pp}, tt), p,
                                   (t,)) == float(jnp.finfo(jnp.bfloat16).eps)
  with pytest.raises(ValueError, match="no embedding lookup"):
    # An integer table is no embedding: still refused.
    from lowbit_jax._residual import find_residual_stream
    find_residual_stream(lambda pp, tt: pp["w"][tt] @ pp["w"].T.astype(jnp.float32),
                         {"w": jnp.ones((8, 4), jnp.int32)}, jnp.zeros((2,), jnp.int32))


def _leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_a_stream_only_the_embedding_writes_is_refused():
  # x = E[t] @ w_in (or rms(E[t]) @ w_in), then a pre-norm block: the search
  # follows the table's lookup, whose readers project it away; it returned
  # that stream and QuaRot left the real residual stream unrotated, silently.
  from lowbit_jax._residual import find_residual_stream
  k = jax.random.split(jax.random.key(0), 3)
  p = {"embed": jax.random.normal(k[0], (16, 8)), "w_in": jax.random.normal(k[1], (8, 8)),
       "up": jax.random.normal(k[2], (8, 8))}

  def rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

  def fn(pp, tt):
    x = pp["embed"][tt] @ pp["w_in"]
    return x + rms(x) @ pp["up"]

  def normed(pp, tt):
    x = rms(pp["embed"][tt]) @ pp["w_in"]
    return x + rms(x) @ pp["up"]

  for f in (fn, normed):
    with pytest.raises(ValueError, match="nothing but the embedding writes"):
      find_residual_stream(f, p, jnp.zeros((2, 3), jnp.int32))


def _attention_lm(p, t, mask=None):
  """A one-block pre-norm attention LM with biased q/k/v (Qwen2-style), 2
  heads of 4; ``mask`` (per token, or per feature) zeroes stream entries."""
  b, s = t.shape
  x = p["emb"][t]
  if mask is not None:
    x = jnp.where(mask, x, 0.0)
  h = _rms(x, p["g1"])
  q, k, v = ((h @ p[n]["kernel"] + p[n]["bias"]).reshape(b, s, 2, 4) for n in "qkv")
  a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, -1)
  o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, s, 8)
  x = x + o @ p["o"]["kernel"] + p["o"]["bias"]
  return _rms(x, p["g2"]) @ p["head"]


def _attention_params():
  k = iter(jax.random.split(jax.random.key(0), 16))
  p = {"emb": jax.random.normal(next(k), (16, 8)), "head": jax.random.normal(next(k), (8, 16)),
       "g1": 1 + 0.3 * jax.random.normal(next(k), (8,)),
       "g2": 1 + 0.3 * jax.random.normal(next(k), (8,))}
  for n in "qkvo":
    p[n] = {"kernel": jax.random.normal(next(k), (8, 8)) / 3,
            "bias": 0.5 * jax.random.normal(next(k), (8,))}
  return p


def test_per_head_rotation_folds_into_the_value_bias():
  # heads= rotated the value kernel's output per head but not the bias added
  # to it: with a nonzero v bias the output moved by 0.29 (relative), silently.
  p, t = _attention_params(), jax.random.randint(jax.random.key(1), (2, 6), 0, 16)
  new, rot = rotate_model(_attention_lm, p, t, key=jax.random.key(2),
                          heads=("v/kernel", "o/kernel", 4))
  assert ("v/kernel", "v/bias", 0) in rot.stream.biases
  assert not np.allclose(np.asarray(new["v"]["bias"]), np.asarray(p["v"]["bias"]))
  assert _rel(_attention_lm(new, t), _attention_lm(p, t)) < 1e-5


def test_a_per_token_mask_on_the_stream_rotates_and_a_per_feature_one_is_refused():
  # jnp.where(mask, x, 0) on the stream (padding) was refused with a wrong
  # reason: select_n's state was read from its predicate.
  p, t = _attention_params(), jax.random.randint(jax.random.key(1), (2, 6), 0, 16)
  tok_mask = (jnp.arange(6) < 4)[None, :, None]
  fn = lambda pp, tt: _attention_lm(pp, tt, tok_mask)
  new, _ = rotate_model(fn, p, t, key=jax.random.key(2))
  assert _rel(fn(new, t), fn(p, t)) < 1e-5
  feat_mask = (jnp.arange(8) < 6)[None, None, :]
  with pytest.raises(ValueError, match="select_n.*mixes the stream's feature axis"):
    rotate_model(lambda pp, tt: _attention_lm(pp, tt, feat_mask), p, t,
                 key=jax.random.key(2))


def test_nnx_rmsnorm_model_rotates():
  # flax.nnx.RMSNorm subtracts a reshaped broadcast zero "mean"; the stream
  # finder did not know a reshaped zero is zero and refused every such model.
  class LM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(16, 8, rngs=rngs)
      self.n1 = nnx.RMSNorm(8, rngs=rngs)
      self.ff = nnx.Linear(8, 8, rngs=rngs)
      self.norm = nnx.RMSNorm(8, rngs=rngs)
      self.head = nnx.Linear(8, 16, rngs=rngs)

    def __call__(self, t):
      x = self.embed(t)
      x = x + self.ff(self.n1(x))
      return self.head(self.norm(x))

  g, st = nnx.split(LM(nnx.Rngs(0)))
  st = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(3), a.shape), st)
  fn = lambda pp, tt: nnx.merge(g, pp)(tt)
  t = jnp.arange(8).reshape(2, 4)
  new, _ = rotate_model(fn, st, t, key=jax.random.key(0))
  assert _rel(fn(new, t), fn(st, t)) < 1e-5


def test_bf16_stored_float32_computed_model_folds():
  # Parameters stored in bf16, computed in float32 (as Flax promotes them):
  # the folded parameters are written back in bf16, so the float check must
  # allow bf16 rounding; at float32's tolerance QuaRot (and SmoothQuant, AWQ)
  # refused every such model.
  from lowbit_jax import _ptq_rotation
  p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _attention_params())
  t = jax.random.randint(jax.random.key(1), (2, 6), 0, 16)
  fn = lambda pp, tt: _attention_lm(jax.tree.map(lambda a: a.astype(jnp.float32), pp), tt)
  assert _ptq_rotation.compute_eps(fn, p, (t,)) == float(jnp.finfo(jnp.bfloat16).eps)
  new, _, _ = _ptq_rotation.rotate_checked(
      fn, p, [(t,)], "quarot", rules=None, seed=0, online=None, heads=None,
      config=None, rtol=1e-3, quantize=_ptq_rotation.quantizer_for("function"))
  assert new["emb"].dtype == jnp.bfloat16
  # One bf16 scalar in a float32 model does not widen the check.
  p32 = {**_attention_params(), "temp": jnp.ones((), jnp.bfloat16)}
  assert _ptq_rotation.compute_eps(
      lambda pp, tt: _attention_lm(pp, tt) * pp["temp"].astype(jnp.float32), p32,
      (t,)) == float(jnp.finfo(jnp.float32).eps)
