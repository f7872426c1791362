"""MoE experts as a grouped matmul (``jax.lax.ragged_dot``): model, quantized op
on every front end, and PTQ per expert."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit_jax import QuantRule, QuantSpec, quantize_function
from lowbit_jax.algorithms.rtn import hessian_error, rtn
from lowbit_jax.core import fake_quant, ops
from lowbit_jax.flax import (NnxRaggedDense, RaggedDense, apply_ptq,
                             capture_dense_stats, quantize_linen, quantize_nnx)
from lowbit_jax.models.llama import LlamaConfig, MoEMLP

# The MoE layer of a smoke decoder (the rest of the model does not change).
_CFG = LlamaConfig.smoke(vocab=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                         d_ff=32, max_len=32, n_experts=4, top_k=2)
_SPEC = QuantSpec("int4", group_size=16)
_PTQ_SPEC = QuantSpec("int3", group_size=16)
_EXPERTS = "(gate|up|down)_proj"


def _hidden(seed, shape=(2, 16)):
  return jax.random.normal(jax.random.key(seed), (*shape, _CFG.d_model))


@pytest.fixture(scope="module")
def moe():
  model = MoEMLP(_CFG)
  x = _hidden(1)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  return model, params, x


def _sorted_rows(n_groups=3, sizes=(5, 0, 7), k=32, n=32, extra=2, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (sum(sizes) + extra, k))  # rows past the groups: zeros
  w = jax.random.normal(kw, (n_groups, k, n))
  return x, w, jnp.asarray(sizes, jnp.int32)


def test_ragged_moe_equals_dense_forward_and_gradients(moe):
  model, params, x = moe
  dense = MoEMLP(_CFG.replace(moe_impl="dense"))

  def grads(m):
    def loss(p):
      y = m.apply({"params": p}, x)
      return jnp.mean(jnp.square(y)), y
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  (g_r, y_r), (g_d, y_d) = grads(model), grads(dense)
  np.testing.assert_allclose(y_r, y_d, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_r["gate_proj"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g_r["router"]["kernel"]).sum()) > 0
  with pytest.raises(ValueError, match="moe_impl"):
    _CFG.replace(moe_impl="sparse")


def test_quantized_ragged_dot_matches_per_expert_reference_and_real_mode():
  x, w, gs = _sorted_rows()

  @jax.jit
  def run(x, w, gs):
    out = {}
    for name, wspec, w2d in [("channel", "int4", QuantSpec("int4", axis=0)),
                             ("group", _SPEC, QuantSpec("int4", axis=0,
                                                        group_size=16))]:
      out[name] = (ops.ragged_dot(x, w, gs, lhs_spec="int8", rhs_spec=wspec),
                   ops.ragged_dot(x, w, gs, lhs_spec="int8", rhs_spec=wspec,
                                  mode="real"),
                   fake_quant(x, QuantSpec("int8", axis=1)),
                   jnp.stack([fake_quant(w[e], w2d) for e in range(w.shape[0])]))
    return out

  for y, y_real, xq, wq in run(x, w, gs).values():
    ref, start = np.zeros(y.shape, np.float32), 0
    for e, n in enumerate(np.asarray(gs)):
      ref[start:start + n] = np.asarray(xq[start:start + n]) @ np.asarray(wq[e])
      start += n
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(y[start:]) == 0)
    np.testing.assert_array_equal(y_real, y)
  # Straight-through gradients reach every expert that has rows; a quantized
  # output gradient too.
  g = jax.jit(jax.grad(lambda w: ops.ragged_dot(x, w, gs, rhs_spec="int4",
                                                grad_spec="fp8_e5m2").sum()))(w)
  assert float(jnp.abs(g[1]).max()) == 0 and float(jnp.abs(g[0]).min()) > 0
  with pytest.raises(ValueError, match="cross group"):
    ops.ragged_dot(x, w, gs, rhs_spec="int4", grad_spec="mxfp8_e5m2")
  with pytest.raises(ValueError, match=r"rhs \[G, K, N\]"):
    ops.ragged_dot(x, w[0], gs, rhs_spec="int4")


def test_linen_model_experts_fake_equals_real_and_dense_path(moe):
  model, params, x = moe
  rules = [QuantRule("router"), QuantRule(".*", weight=_SPEC, activation="int8")]
  fake = quantize_linen(rules, "fake")
  y_fake = jax.jit(fake(model.apply))({"params": params}, x)
  assert set(fake.config.sites) == {f"{n}_proj/kernel" for n in ("gate", "up", "down")}
  real = quantize_linen(rules, "real")
  variables = real.quantize_params(model, {"params": params}, x)
  q = variables["params"]["gate_proj"]["kernel"]
  assert q.shape == (4, 32, 32) and q.scale.shape == (4, 2, 32)  # per expert
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (4, 16, 32)  # packed
  np.testing.assert_array_equal(jax.jit(real(model.apply))(variables, x), y_fake)
  # The dense path's einsums quantize each expert the same way.
  dense = MoEMLP(_CFG.replace(moe_impl="dense"))
  np.testing.assert_allclose(jax.jit(fake(dense.apply))({"params": params}, x),
                             y_fake, rtol=1e-4, atol=1e-4)


def test_nnx_and_function_front_ends_quantize_experts():
  x, w, gs = _sorted_rows()
  rules = [QuantRule(".*", weight=_SPEC, activation="int8")]
  ref = ops.ragged_dot(x, w, gs, lhs_spec="int8", rhs_spec=_SPEC)
  # NNX
  layer = NnxRaggedDense(3, 32, 32, rngs=nnx.Rngs(0))
  layer.kernel.set_value(w)
  np.testing.assert_allclose(layer(x, gs), jax.lax.ragged_dot(x, w, gs), rtol=1e-6)
  np.testing.assert_array_equal(nnx.jit(quantize_nnx(layer, rules, "fake"))(x, gs),
                                ref)
  real = quantize_nnx(layer, rules, "real")
  assert real.kernel.get_value().shape == (3, 32, 32)
  np.testing.assert_array_equal(nnx.jit(real)(x, gs), ref)

  # quantize_function
  def fn(p, x, gs):
    return jax.lax.ragged_dot(x, p["experts"], gs)

  qf = quantize_function(fn, rules, "fake")
  np.testing.assert_array_equal(jax.jit(qf)({"experts": w}, x, gs), ref)
  qr = quantize_function(fn, rules, "real")
  pr = qr.quantize_params({"experts": w}, x, gs)
  np.testing.assert_array_equal(jax.jit(qr)(pr, x, gs), ref)


class _Experts(nn.Module):
  """One grouped matmul: rows sorted by expert, sizes given."""

  @nn.compact
  def __call__(self, x, group_sizes):
    return RaggedDense(3, 32, name="experts")(x, group_sizes)


def test_capture_builds_each_experts_hessian_from_its_tokens_only():
  m = _Experts()
  batches = []
  for i, sizes in enumerate([(5, 0, 7), (2, 0, 10)]):
    x, _, gs = _sorted_rows(sizes=sizes, seed=i + 1)
    batches.append((x, gs))
  params = jax.jit(m.init)(jax.random.key(0), *batches[0])["params"]
  cap = capture_dense_stats(m, params, batches, max_samples=64)
  st = cap.stats["experts"]
  want = np.zeros((3, 32, 32))
  for x, gs in batches:
    x, start = np.asarray(x, np.float64), 0
    for e, n in enumerate(np.asarray(gs)):
      want[e] += x[start:start + n].T @ x[start:start + n]
      start += n
  np.testing.assert_allclose(st.gram, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(st.count, [7, 0, 17])
  assert set(np.asarray(st.sample_group).tolist()) == {0, 2}   # no padding rows
  # GPTQ: expert 1 saw no token and falls back to RTN (reported).
  qp, rep = apply_ptq(m, params, batches, "gptq", _PTQ_SPEC)
  entry = rep["layers"]["experts"]
  assert entry["rtn_fallback"] == [1] and entry["calibration_tokens"] == [7, 0, 17]
  w = params["experts"]["kernel"]
  np.testing.assert_array_equal(qp["experts"]["kernel"][1], rtn(w[1], _PTQ_SPEC))
  # The others lower their own layer error (on their own tokens) below RTN's.
  for e in (0, 2):
    err_gptq = hessian_error(st.gram[e], w[e], qp["experts"]["kernel"][e])
    err_rtn = hessian_error(st.gram[e], w[e], rtn(w[e], _PTQ_SPEC))
    assert float(err_gptq) < 0.9 * float(err_rtn), (e, err_gptq, err_rtn)


def test_gptq_on_moe_layer_beats_rtn_and_real_mode_reproduces_it(moe):
  model, params, x = moe
  batches = [_hidden(i + 2, (2, 32)) for i in range(2)]
  qp, rep = apply_ptq(model, params, batches, "gptq", _PTQ_SPEC, layers=_EXPERTS)
  rtn_params = dict(params)
  for name in ("gate_proj", "up_proj", "down_proj"):
    entry = rep["layers"][name]
    assert entry["rtn_fallback"] == [] and sum(entry["calibration_tokens"]) == 2 * 64 * _CFG.top_k
    rtn_params[name] = {"kernel": jax.vmap(lambda a: rtn(a, _PTQ_SPEC))(
        params[name]["kernel"])}
  apply = jax.jit(model.apply)
  ref = apply({"params": params}, batches[0])
  err = {k: float(jnp.mean(jnp.square(apply({"params": p}, batches[0]) - ref)))
         for k, p in (("gptq", qp), ("rtn", rtn_params))}
  assert err["gptq"] < 0.8 * err["rtn"], err
  # Real mode stores the per-expert codes GPTQ chose: real == fake.
  real = quantize_linen([QuantRule(_EXPERTS, weight=_PTQ_SPEC)], "real")
  variables = real.quantize_params(
      model, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  np.testing.assert_array_equal(jax.jit(real(model.apply))(variables, x),
                                apply({"params": qp}, x))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_block_format_experts_store_exactly(moe, fmt):
  # apply_ptq's expert scales for E8M0 (MX) and two-level (NVFP4) blocks are
  # the stored ones (rtn_scales), and NVFP4's under the stack's tensor scale:
  # real mode stores exactly the per-expert codes GPTQ chose.
  model, params, x = moe
  spec = QuantSpec(fmt)
  batches = [_hidden(i + 2, (2, 32)) for i in range(2)]
  qp, rep = apply_ptq(model, params, batches, "gptq", spec, layers=_EXPERTS)
  scales = rep["quant_scales"]["up_proj"]
  assert ("weight_tensor_scale" in scales) == (fmt == "nvfp4")
  real = quantize_linen([QuantRule(_EXPERTS, weight=spec)], "real")
  variables = real.quantize_params(
      model, {"params": qp, "quant_scales": rep["quant_scales"]}, x)
  for name in ("gate_proj", "up_proj", "down_proj"):
    np.testing.assert_array_equal(variables["params"][name]["kernel"].logical(),
                                  qp[name]["kernel"])


@pytest.mark.parametrize("fmt,calibration", [("uint8", "minmax"), ("int8", "percentile"),
                                             ("uint8", "absmax_ema")])
def test_calibration_sees_the_routed_rows_only(fmt, calibration):
  # Rows past sum(group_sizes) belong to no expert. They were zeroed before
  # the observer: an asymmetric range then reached down to 0 (0.50 without
  # them) and a percentile moved. They are skipped now, whatever they hold.
  def fn(p, x, gs):
    return jax.lax.ragged_dot(x, p["experts"], gs)

  kx, kw = jax.random.split(jax.random.key(3))
  x = jnp.abs(jax.random.normal(kx, (10, 32))) + 0.5
  p = {"experts": jax.random.normal(kw, (2, 32, 16))}
  gs = jnp.array([5, 3], jnp.int32)
  spec = QuantSpec(fmt, axis="tensor", calibration=calibration)
  cal = quantize_function(fn, [QuantRule(".*", activation=spec, static=True)],
                          mode="calibrate")
  run = jax.jit(lambda x: cal.finalize_stats(cal(p, x, gs)[1])["experts"])
  want = run(x[:8])
  assert float(want["amax"]) > 3.0
  if fmt == "uint8":
    assert float(want["amin"]) >= 0.5
  for pad in (0.0, 7.0, jnp.inf):
    got = run(x.at[8:].set(pad))
    for name, v in want.items():
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(v))
