"""PTQ through the rules machinery: the same Hessians and GPTQ on Linen, NNX and a function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import lowbit_jax as lb
from lowbit_jax._rules import QuantRule, QWeight, is_qarray, path_str
from lowbit_jax.flax import quantize_linen, quantize_nnx
from lowbit_jax.flax._capture import capture_dense_stats
from tests import _toy_models as toy

# q (DenseGeneral to heads) and o (two contraction axes): GPTQ runs on one
# [32, 32] matrix shape, which keeps its compiles few (Dense and conv: RTN below).
RULES = [QuantRule(".*/(q|o)", weight=lb.QuantSpec("int4", group_size=16))]
CONV_DENSE = [QuantRule(".*/(conv|up)", weight=lb.QuantSpec("int4", group_size=16))]
ALL_WEIGHTS = [QuantRule("head"), QuantRule(".*", weight="int8")]


def _mask(batch):
  return (jnp.arange(toy.SEQ)[None, :] < jnp.array([[toy.SEQ], [5]])).astype(jnp.float32)


@pytest.fixture(scope="module")
def setup():
  model, v = toy.init_linen()
  return model, v, [toy.tokens(s) for s in range(2)], toy.nnx_from_linen(v["params"])


@pytest.fixture(scope="module")
def fn_result(setup):
  _, v, batches, _ = setup
  return lb.ptq_params(toy.toy_apply, v["params"], batches, RULES)


def _leaves(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)
  return {path_str(k): leaf for k, leaf in flat}


def test_hessians_equal_on_every_front_end_and_the_linen_capture(setup):
  model, v, batches, nm = setup
  cf = lb.capture_hessians(toy.toy_apply, v["params"], batches, ALL_WEIGHTS,
                           token_mask=_mask)
  cl = lb.capture_hessians(model, v, batches, ALL_WEIGHTS, token_mask=_mask)
  cn = lb.capture_hessians(nm, None, batches, ALL_WEIGHTS, token_mask=_mask)
  # Every weight site but the float head: conv, q/k/v/o (einsum), up/down.
  names = ("conv", "q", "k", "v", "o", "up", "down")
  assert sorted(cf.stats) == sorted(f"layers_{i}/{n}/kernel" for i in range(2)
                                    for n in names)
  assert sorted(cl.stats) == sorted(cn.stats) == sorted(cf.stats)
  for p, st in cf.stats.items():
    for other in (cl, cn):
      np.testing.assert_allclose(other.stats[p].hessian, st.hessian, rtol=1e-6,
                                 atol=1e-6)
      assert float(other.stats[p].count) == float(st.count)
  assert cf.stats["layers_0/o/kernel"].hessian.shape == (32, 32)  # heads x head_dim
  assert cf.stats["layers_0/conv/kernel"].hessian.shape == (3 * toy.D, 3 * toy.D)
  # The Linen capture (call boundaries of Dense and Conv) gives the same numbers.
  ref = capture_dense_stats(model, v["params"], batches, token_mask=_mask,
                            max_samples=0)
  for layer, st in ref.stats.items():
    mine = cf.stats[f"{layer}/kernel"]
    np.testing.assert_allclose(mine.hessian, st.gram, rtol=1e-6, atol=1e-6)
    assert float(mine.count) == float(st.count) == 2 * (toy.SEQ + 5)


def test_gptq_lowers_every_layer_error_vs_rtn_on_a_function(fn_result):
  layers = fn_result.report["layers"]
  assert sorted(layers) == sorted(f"layers_{i}/{n}/kernel" for i in range(2)
                                  for n in ("q", "o"))
  for p, e in layers.items():
    assert e["error"] < 0.8 * e["rtn_error"], (p, e)


def test_function_real_mode_stores_exactly_the_gptq_codes(setup, fn_result):
  _, v, _, _ = setup
  t = toy.tokens(7)
  qr = lb.quantize_function(toy.toy_apply, RULES, mode="real")
  rp = qr.quantize_params(fn_result.params, t,
                          **lb.real_mode_kwargs(fn_result, "function"))
  stored, gp = _leaves(rp), _leaves(fn_result.params)
  for p in fn_result.report["layers"]:
    assert isinstance(stored[p], QWeight)
    np.testing.assert_array_equal(stored[p].logical(), gp[p])
  np.testing.assert_allclose(qr(rp, t), jax.jit(toy.toy_apply)(fn_result.params, t),
                             rtol=1e-5, atol=1e-5)
  # Without the scales, real mode re-derives them and changes codes.
  plain = _leaves(qr.quantize_params(fn_result.params, t))
  assert any(not np.array_equal(plain[p].logical(), gp[p])
             for p in fn_result.report["layers"])


def test_nnx_gptq_matches_the_function_and_real_equals_fake(setup, fn_result):
  _, v, batches, nm = setup
  m = nnx.clone(nm)
  res = lb.ptq_params(m, None, batches, RULES)
  for p, e in res.report["layers"].items():
    np.testing.assert_allclose(e["error"], fn_result.report["layers"][p]["error"],
                               rtol=1e-4)
  # The model's own Params were updated in place.
  np.testing.assert_array_equal(m.layers_0.up.kernel.get_value(),
                                fn_result.params["layers_0"]["up"]["kernel"])
  t = toy.tokens(7)
  fake = nnx.jit(lambda m, t: m(t))(m, t)
  q = quantize_nnx(m, RULES, mode="real", **lb.real_mode_kwargs(res, "nnx"))
  assert isinstance(q.layers_1.o.kernel.get_value(), QWeight)
  np.testing.assert_array_equal(q.layers_1.o.kernel.get_value().logical(),
                                fn_result.params["layers_1"]["o"]["kernel"])
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(q, t), fake, rtol=1e-5,
                             atol=1e-5)


def test_linen_real_mode_with_the_returned_scales(setup):
  model, v, batches, nm = setup
  res = lb.ptq_params(model, v, batches, CONV_DENSE, method="rtn")
  assert len(res.report["layers"]) == 4
  assert all(e["error"] == e["rtn_error"] for e in res.report["layers"].values())
  t = toy.tokens(7)
  ql = quantize_linen(CONV_DENSE, mode="real")
  rv = ql.quantize_params(model, {**res.params, **lb.real_mode_kwargs(res, "linen")}, t)
  stored, rp = _leaves(rv["params"]), _leaves(res.params["params"])
  for p in res.report["layers"]:
    np.testing.assert_array_equal(stored[p].logical(), rp[p])
  np.testing.assert_allclose(jax.jit(ql(model.apply))(rv, t),
                             jax.jit(model.apply)(res.params, t),
                             rtol=1e-5, atol=1e-5)


def test_clear_errors(setup):
  _, v, batches, nm = setup
  with pytest.raises(ValueError, match="no weight site was captured"):
    lb.ptq_params(toy.toy_apply, v["params"], batches,
                  [QuantRule(".*/nothing_here", weight="int4")])
  with pytest.raises(ValueError, match="method must be one of"):
    lb.ptq_params(toy.toy_apply, v["params"], batches, RULES, method="no_such_method")
  with pytest.raises(ValueError, match=r"weight_scales for \['layers_0/q/kernel'\]"):
    quantize_nnx(nm, RULES, mode="fake",
                 weight_scales={"layers_0/q/kernel": jnp.ones((2, 2, 16))})
  with pytest.raises(ValueError, match="NNX model holds its parameters"):
    lb.capture_hessians(nm, v["params"], batches, RULES)
  # A mask that fits no site's rows would weight nothing (it was dropped).
  bad_mask = lambda b: _mask(b)[..., None]   # noqa: E731  [B, T, 1]
  with pytest.raises(ValueError, match=r"shape \(2, 8, 1\), which matches the rows of "
                     "no captured site"):
    lb.capture_hessians(toy.toy_apply, v["params"], batches, RULES, token_mask=bad_mask)
  with pytest.raises(ValueError, match="matches the leading .* of no captured layer"):
    capture_dense_stats(setup[0], v["params"], batches, token_mask=bad_mask)

  def scanned(params, x):
    def body(h, w):
      return jnp.tanh(h @ w), None
    return jax.lax.scan(body, x, params["w"])[0]
  with pytest.raises(ValueError, match="w: this site runs inside lax.scan"):
    lb.capture_hessians(scanned, {"w": jnp.ones((2, 4, 4))}, [jnp.ones((3, 4))],
                        [QuantRule(".*", weight="int8")])


def test_mixed_precision_rules_run_on_every_front_end(setup):
  _, v, batches, nm = setup
  cap = lb.capture_hessians(toy.toy_apply, v["params"], batches, RULES)
  cands = {"int4": lb.QuantSpec("int4", group_size=16), "int8": "int8", "float": None}
  rules, alloc = lb.mixed_precision_rules(toy.toy_apply, v["params"], cap, cands, 7.5)
  assert alloc.avg_bits <= 7.5 and set(alloc.assignment) == set(cap.stats)
  assert len(set(alloc.assignment.values())) > 1   # a real trade-off, not one format
  # The NNX model gives the same sensitivities, hence the same choice.
  cap_n = lb.capture_hessians(nm, None, batches, RULES)
  _, alloc_n = lb.mixed_precision_rules(nm, None, cap_n, cands, 7.5)
  assert alloc_n.assignment == alloc.assignment
  # The rules match exactly the chosen weights on every front end.
  quantized = {p for p, c in alloc.assignment.items() if cands[c] is not None}
  cfg = lb.QuantConfig(rules, strict=True)
  quantize_nnx(nm, cfg, mode="fake")
  assert {p for p, st in cfg.sites.items() if st.weight is not None} == quantized
  plan = lb.quantize_function(toy.toy_apply, rules, strict=True).plan(
      v["params"], toy.tokens(7))
  assert set(plan) == quantized
  # The capture is reused with the chosen rules: each layer at its own
  # format (it was rounded with the capture's specs, the rules ignored).
  res = lb.ptq_params(toy.toy_apply, v["params"], batches, rules, capture=cap,
                      method="rtn")
  assert set(res.report["layers"]) == quantized
  for p in quantized:
    assert res.report["layers"][p]["spec"] == str(lb.core.as_spec(
        cands[alloc.assignment[p]]).replace(axis=None))
  fresh = lb.ptq_params(toy.toy_apply, v["params"], batches, rules, method="rtn")
  for p in quantized:
    np.testing.assert_array_equal(_leaves(res.params)[p], _leaves(fresh.params)[p])
  with pytest.raises(ValueError, match="token_mask applies while capturing"):
    lb.ptq_params(toy.toy_apply, v["params"], batches, rules, capture=cap,
                  token_mask=_mask)
  with pytest.raises(ValueError, match="quantize none of the captured"):
    lb.ptq_params(toy.toy_apply, v["params"], batches, [QuantRule("nothing", weight="int8")],
                  capture=cap)


@pytest.mark.slow
def test_linen_gptq_equals_apply_ptq_bit_for_bit(setup):
  from lowbit_jax.flax import apply_ptq
  model, v, batches, _ = setup
  spec = lb.QuantSpec("int4", group_size=16)
  qp, rep = apply_ptq(model, v["params"], batches, "gptq", spec, layers=".*/(up|down)")
  res = lb.ptq_params(model, v, batches, [QuantRule(".*/(up|down)", weight=spec)])
  for i in range(toy.LAYERS):
    for n in ("up", "down"):
      np.testing.assert_array_equal(res.params["params"][f"layers_{i}"][n]["kernel"],
                                    qp[f"layers_{i}"][n]["kernel"])
      np.testing.assert_array_equal(res.weight_scales[f"layers_{i}/{n}/kernel"],
                                    rep["quant_scales"][f"layers_{i}"][n]["weight_scale"])


@pytest.mark.slow
def test_gptq_after_quarot_on_the_decoder_as_a_function():
  """QuaRot's fold (rotate_model) then ptq_params with its online-Hadamard rules."""
  from lowbit_jax.algorithms import rotate_model
  from lowbit_jax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  toks = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab)
  fn = lambda p, t: model.apply({"params": p}, t)
  params = jax.jit(model.init)(jax.random.key(0), toks)["params"]
  new, info = rotate_model(fn, params, toks, key=jax.random.key(3),
                           online=".*/down_proj/kernel")
  rules = info.rules([QuantRule("lm_head"),
                      QuantRule(".*", weight=lb.QuantSpec("int4", group_size=16))])
  res = lb.ptq_params(fn, new, [toks], rules)
  assert len(res.report["layers"]) == 14
  for p, e in res.report["layers"].items():
    assert e["error"] < 0.5 * e["rtn_error"], (p, e)
  # The down projections' Hessians are of their Hadamard-rotated inputs, so
  # real mode (online transform, GPTQ's codes) equals the rotated float model.
  qr = lb.quantize_function(fn, rules, mode="real")
  rp = qr.quantize_params(res.params, toks, **lb.real_mode_kwargs(res, "function"))
  ref = lb.quantize_function(fn, info.rules())(res.params, toks)
  np.testing.assert_allclose(qr(rp, toks), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "rtn", "awq", "smoothquant"])
def test_nvfp4_ptq_stores_exactly(method):
  # A two-level result carries the tensor scale its block scales were chosen
  # under (weight_tensor_scales), so real mode stores exactly the PTQ codes.
  # Seeds 4 and 7: GPTQ's scales used to come from a tensor scale of their own
  # (its groups, updated, stay below the tensor's range) and were refused.
  fn = lambda p, x: x @ p["l"]["kernel"]  # noqa: E731
  x = jax.random.normal(jax.random.key(0), (256, 128))
  rules = [lb.QuantRule(".*", weight="nvfp4",
                        activation="int8" if method == "smoothquant" else None)]
  from lowbit_jax._rules import logical_value  # pylint: disable=g-import-not-at-top
  for seed in (4, 7):
    w = (jax.random.normal(jax.random.key(seed), (128, 64))
         * jnp.exp(jax.random.normal(jax.random.key(100 + seed), (128, 1))))
    res = lb.ptq_params(fn, {"l": {"kernel": w}}, [x], rules, method=method)
    assert set(res.weight_tensor_scales) == {"l/kernel"}
    qf = lb.quantize_function(fn, rules, mode="real")
    kw = lb.real_mode_kwargs(res, "function")
    assert "weight_tensor_scale" in kw["quant_scales"]["l/kernel"]
    qp = qf.quantize_params(res.params, x, **kw)
    assert isinstance(qp["l"]["kernel"], QWeight)
    np.testing.assert_array_equal(np.asarray(logical_value(qp["l"]["kernel"])),
                                  np.asarray(res.params["l"]["kernel"]))
    if method == "gptq":
      # The pure per-site function returns the same tensor scale.
      cap = lb.capture_hessians(fn, {"l": {"kernel": w}}, [x], rules)
      site = lb.quantize_site("gptq", w, cap.stats["l/kernel"],
                              cap.sites["l/kernel"].weight)
      assert (np.asarray(site.tensor_scale).view(np.uint32)
              == np.asarray(res.weight_tensor_scales["l/kernel"]).view(np.uint32))


def test_nvfp4_gptq_stores_exactly_on_linen_and_nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_linen, quantize_nnx  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (256, 128))
  w = (jax.random.normal(jax.random.key(7), (128, 64))
       * jnp.exp(jax.random.normal(jax.random.key(107), (128, 1))))
  rules = [lb.QuantRule(".*", weight="nvfp4")]
  dense = nn.Dense(64, use_bias=False)
  params = {"params": {"kernel": w}}
  res = lb.ptq_params(dense, params, [x], rules)
  q = quantize_linen(rules, mode="real")
  qv = q.quantize_params(dense, {**res.params, **lb.real_mode_kwargs(res, "linen")}, x)
  np.testing.assert_array_equal(qv["params"]["kernel"].logical(),
                                res.params["params"]["kernel"])
  assert "weight_tensor_scale" not in str(qv.get("quant_scales", {}))
  model = nnx.Linear(128, 64, use_bias=False, rngs=nnx.Rngs(0))
  model.kernel.set_value(w)
  res = lb.ptq_params(model, None, [x], rules)
  kw = lb.real_mode_kwargs(res, "nnx")
  assert set(kw["weight_tensor_scales"]) == {"kernel"}
  want = np.asarray(model.kernel.get_value())
  qm = quantize_nnx(model, rules, mode="real", **kw)
  np.testing.assert_array_equal(qm.kernel.get_value().logical(), want)
  with pytest.raises(ValueError, match="without their block scales"):
    quantize_nnx(model, rules, mode="real",
                 weight_tensor_scales=kw["weight_tensor_scales"])


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_non_finite_calibration_inputs_are_named(method):
  fn = lambda p, x: x @ p["l"]["kernel"]  # noqa: E731
  w = jax.random.normal(jax.random.key(0), (32, 16))
  x = jax.random.normal(jax.random.key(1), (64, 32)).at[3, 5].set(jnp.nan)
  rules = [lb.QuantRule(".*", weight=lb.QuantSpec("int4", group_size=16))]
  with pytest.raises(ValueError, match=r"calibration inputs of \['l/kernel'\] are "
                     "not finite"):
    lb.ptq_params(fn, {"l": {"kernel": w}}, [x], rules, method=method)


def test_gptq_on_padded_groups_stores_exactly():
  # 176 rows in groups of 128 (pad=True) are a group of 128 and one of 48;
  # the group ranges were spread as two groups of 88, so the scales did not
  # reproduce GPTQ's codes and every d_ff = 176 / 704 / 1728 model failed.
  from lowbit_jax._rules import logical_value  # pylint: disable=g-import-not-at-top
  fn = lambda p, x: x @ p["l"]["kernel"]  # noqa: E731
  w = jax.random.normal(jax.random.key(0), (176, 64))
  x = jax.random.normal(jax.random.key(1), (64, 176))
  rules = [lb.QuantRule(".*", weight=lb.QuantSpec("int4", group_size=128, pad=True))]
  res = lb.ptq_params(fn, {"l": {"kernel": w}}, [x], rules, method="gptq")
  e = res.report["layers"]["l/kernel"]
  assert e["error"] < e["rtn_error"]
  qf = lb.quantize_function(fn, rules, mode="real")
  qp = qf.quantize_params(res.params, x, **lb.real_mode_kwargs(res, "function"))
  np.testing.assert_array_equal(np.asarray(logical_value(qp["l"]["kernel"])),
                                np.asarray(res.params["l"]["kernel"]))
  # apply_ptq's Linen path spreads the ranges the same way.
  from lowbit_jax.flax import apply_ptq  # pylint: disable=g-import-not-at-top

  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(64, use_bias=False, name="l")(x)
  qp2, rep = apply_ptq(One(), {"l": {"kernel": w}}, [x], "gptq", rules[0].weight)
  np.testing.assert_array_equal(np.asarray(qp2["l"]["kernel"]),
                                np.asarray(res.params["l"]["kernel"]))
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  q = quantize_linen(rules, mode="real")
  qv = q.quantize_params(One(), {"params": qp2, "quant_scales": rep["quant_scales"]}, x)
  np.testing.assert_array_equal(qv["params"]["l"]["kernel"].logical(),
                                qp2["l"]["kernel"])


def test_asymmetric_gptq_stores_exactly_with_its_zero_points():
  # GPTQ's asymmetric blocks need not reach the ranges they were rounded
  # with: the result carries each weight's (scale, zero point) grid, so real
  # mode stores exactly the returned kernel (it re-derived other ranges).
  # (Expert stacks: tests/test_ptq_experts.py.)
  rng = np.random.default_rng(0)
  spec = lb.QuantSpec("int4", symmetric=False, group_size=16)
  w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  xs = [jnp.asarray(rng.standard_normal((48, 64)), jnp.float32) for _ in range(2)]
  rules = [QuantRule("w", weight=spec)]
  fn = lambda p, x: x @ p["w"]  # noqa: E731
  res = lb.ptq_params(fn, {"w": w}, xs, rules)
  assert isinstance(res.weight_scales["w"], tuple)
  assert not np.array_equal(np.asarray(lb.fake_quant(res.params["w"], spec.replace(
      axis=0))), np.asarray(res.params["w"]))   # the test can fail
  qf = lb.quantize_function(fn, rules, mode="real")
  rp = qf.quantize_params(res.params, xs[0], **lb.real_mode_kwargs(res, "function"))
  np.testing.assert_array_equal(np.asarray(rp["w"].logical()), np.asarray(res.params["w"]))


def _transposed_problem():
  k = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(k[0], (4, 16, 32)) * jnp.exp(jax.random.normal(k[1], (32,)))
  return x, jax.random.normal(k[2], (32, 32)) / 6   # square: [in, out]


def test_gptq_on_a_weight_read_transposed_equals_gptq_on_its_transpose():
  # PyTorch-style [out, in] weights (x @ w.T) and tied heads (Embed.attend):
  # the Hessian is over the stored weight's columns. A square weight used to
  # take GPTQ along its rows, silently.
  x, w_in_out = _transposed_problem()
  spec = lb.QuantSpec("int4", group_size=16)
  rules = [QuantRule(".*", weight=spec)]
  ref = lb.ptq_params(lambda p, a: a @ p["w"], {"w": w_in_out}, [x], rules)
  fn_t = lambda p, a: a @ p["w"].T
  got = lb.ptq_params(fn_t, {"w": w_in_out.T}, [x], rules)
  np.testing.assert_array_equal(got.params["w"], ref.params["w"].T)
  assert got.report["layers"]["w"]["error"] == pytest.approx(
      ref.report["layers"]["w"]["error"], rel=1e-6)
  qr = lb.quantize_function(fn_t, rules, mode="real")
  qp = qr.quantize_params(got.params, x, **lb.real_mode_kwargs(got, "function"))
  np.testing.assert_array_equal(qr(qp, x), fn_t(got.params, x))   # GPTQ's codes

  class Tied(nn.Module):   # only the head reads the table: it is stored quantized
    @nn.compact
    def __call__(self, a):
      return nn.Embed(32, 32, name="emb").attend(a)

  lin = lb.ptq_params(Tied(), {"emb": {"embedding": w_in_out.T}}, [x], rules)
  np.testing.assert_array_equal(lin.params["emb"]["embedding"], ref.params["w"].T)


def test_a_reshaped_weight_is_skipped_with_the_reason():
  x, w = _transposed_problem()

  def fn(p, a):   # heads by a reshape of the stored [32, 32] weight, then a Dense
    h = jnp.einsum("btd,dhk->bthk", a, p["w"].reshape(32, 2, 16))
    return h.sum(-1) @ p["v"]

  rules = [QuantRule("w", weight=lb.QuantSpec("int4", group_size=16)),
           QuantRule("v", weight="int8")]
  res = lb.ptq_params(fn, {"w": w, "v": w[:2]}, [x], rules)
  assert "reshape" in res.report["skipped"]["w"]
  assert list(res.report["layers"]) == ["v"]
  np.testing.assert_array_equal(res.params["w"], w)   # left float: rounded per call


def test_ptq_reads_weights_from_any_pytree():
  # Layers in an nnx.List (integer keys in its state), params in a NamedTuple:
  # every method looked weights up by string keys and failed.
  import typing

  class P(typing.NamedTuple):
    w0: jax.Array
    w1: jax.Array

  x, w = _transposed_problem()
  rules = [QuantRule(".*", weight=lb.QuantSpec("int4", group_size=16))]
  as_dict = lb.ptq_params(lambda p, a: jnp.tanh(a @ p["w0"]) @ p["w1"],
                          {"w0": w, "w1": w.T}, [x], rules)
  as_tuple = lb.ptq_params(lambda p, a: jnp.tanh(a @ p.w0) @ p.w1, P(w, w.T), [x], rules)
  for n in ("w0", "w1"):
    np.testing.assert_array_equal(getattr(as_tuple.params, n), as_dict.params[n])

  class Net(nnx.Module):
    def __init__(self):
      self.layers = nnx.List([nnx.Linear(32, 32, use_bias=False, rngs=nnx.Rngs(0))
                              for _ in range(2)])
      self.layers[0].kernel.set_value(w)
      self.layers[1].kernel.set_value(w.T)

    def __call__(self, a):
      return self.layers[1](jnp.tanh(self.layers[0](a)))

  net = Net()
  for method in ("gptq", "awq"):
    res = lb.ptq_params(nnx.clone(net), None, [x], rules, method=method)
    assert sorted(res.report["layers"]) == ["layers/0/kernel", "layers/1/kernel"]
  res = lb.ptq_params(net, None, [x], rules)
  np.testing.assert_array_equal(net.layers[0].kernel.get_value(), as_dict.params["w0"])


def test_mixed_precision_leaves_out_candidates_a_weight_cannot_take():
  # An [H, Dh, D] output projection (Dh = 8) cannot take MXFP4's blocks of 32
  # along Dh (its [H * Dh, D] matrix could): it was assigned anyway, and fake
  # and real mode then failed. Errors at a site name its parameter.
  x, w = _transposed_problem()
  params = {"o": w.reshape(4, 8, 32), "d": w}
  fn = lambda p, a: jnp.einsum("bthk,hkd->btd", a.reshape(4, 16, 4, 8), p["o"]) @ p["d"]  # noqa: E731
  rules = [QuantRule(".*", weight="int8")]
  cap = lb.capture_hessians(fn, params, [x], rules)
  cands = {"int8": "int8", "mxfp4": "mxfp4"}
  mp_rules, alloc = lb.mixed_precision_rules(fn, params, cap, cands, 7.0)
  assert alloc.assignment == {"o": "int8", "d": "mxfp4"}
  lb.quantize_function(fn, mp_rules)(params, x)   # runs
  with pytest.raises(ValueError, match="budget 5.0 bits/weight is below"):
    lb.mixed_precision_rules(fn, params, cap, cands, 5.0)
  with pytest.raises(ValueError, match="^o: .*block size 32"):
    lb.ptq_params(fn, params, [x], [QuantRule("o", weight="mxfp4")], method="rtn")


def test_remat_and_untreated_layers_name_the_way_out():
  from lowbit_jax.flax import apply_ptq

  class Block(nn.Module):
    @nn.compact
    def __call__(self, a):
      return a + nn.Dense(32)(jnp.tanh(a))

  class Remat(nn.Module):
    @nn.compact
    def __call__(self, a):
      return nn.remat(Block)(name="b0")(a)

  x, _ = _transposed_problem()
  m = Remat()
  v = m.init(jax.random.key(0), x)
  rules = [QuantRule(".*", weight="int4")]
  with pytest.raises(ValueError, match="remat.*a function of the parameters"):
    lb.ptq_params(m, v, [x], rules)
  res = lb.ptq_params(lambda p, a: m.apply({"params": p}, a), v["params"], [x], rules)
  assert list(res.report["layers"]) == ["b0/Dense_0/kernel"]   # that route works
  with pytest.raises(ValueError, match="lifted transform .*nn.remat"):
    apply_ptq(m, v["params"], [x], "awq", "int4")   # (was a raw tracer leak)

  class Attn(nn.Module):
    @nn.compact
    def __call__(self, a):
      return nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(a)

  a_m = Attn()
  a_v = a_m.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="none of the kinds apply_ptq treats"):
    apply_ptq(a_m, a_v["params"], [x], "gptq", "int8")


def test_ptq_reports_rules_that_matched_nothing():
  # A typo'd per-layer override was silently ignored, and strict=True did not raise.
  x, w = _transposed_problem()
  fn = lambda p, a: a @ p["w"]  # noqa: E731
  rules = [QuantRule("ww", weight="int4"), QuantRule(".*", weight="int8")]
  for method in ("gptq", "awq"):
    res = lb.ptq_params(fn, {"w": w}, [x], rules, method=method)
    assert res.report["unused_rules"] == ["ww"]
  with pytest.raises(ValueError, match="matched no layer or parameter path: 'ww'"):
    lb.ptq_params(fn, {"w": w}, [x], lb.QuantConfig(rules, strict=True))


def test_linen_params_boxed_by_with_partitioning():
  # nn.with_partitioning's boxes: every method failed to find the kernel.
  x, _ = _transposed_problem()

  class M(nn.Module):
    boxed: bool

    @nn.compact
    def __call__(self, a):
      init = nn.initializers.lecun_normal()
      return nn.Dense(32, name="up", kernel_init=nn.with_partitioning(
          init, (None, "model")) if self.boxed else init)(nn.RMSNorm(name="norm")(a))

  rules = [QuantRule(".*kernel", weight=lb.QuantSpec("int4", group_size=16))]
  v = M(True).init(jax.random.key(1), x)
  plain = nn.unbox(v)
  for method in ("gptq", "awq"):
    got = lb.ptq_params(M(True), v, [x], rules, method=method)
    want = lb.ptq_params(M(False), plain, [x], rules, method=method)
    k = got.params["params"]["up"]["kernel"]
    assert isinstance(k, nn.Partitioned) and k.names == (None, "model")
    np.testing.assert_array_equal(k.value, want.params["params"]["up"]["kernel"])
  for method in ("gptq", "awq"):   # apply_ptq too (it failed on the boxes)
    from lowbit_jax.flax import apply_ptq
    got, _ = apply_ptq(M(True), v["params"], [x], method, lb.QuantSpec("int4", group_size=16))
    want, _ = apply_ptq(M(False), plain["params"], [x], method,
                        lb.QuantSpec("int4", group_size=16))
    assert isinstance(got["up"]["kernel"], nn.Partitioned)
    np.testing.assert_array_equal(got["up"]["kernel"].value, want["up"]["kernel"])


def test_capture_reuse_counts_rules_of_skipped_sites_as_used():
  # A grouped conv is matched but not captured: with capture= its rule read as
  # unused, and a strict config raised where the direct call did not.
  class M(nn.Module):
    @nn.compact
    def __call__(self, a):
      a = nn.Conv(8, (3,), feature_group_count=2, name="g")(a)
      return nn.Dense(8, name="d")(a)

  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  m = M()
  v = m.init(jax.random.key(1), x)
  cfg = lb.QuantConfig([QuantRule("g", weight="int8"), QuantRule("d", weight="int8")],
                       strict=True)
  cap = lb.capture_hessians(m, v, [x], cfg)
  assert "g/kernel" in cap.skipped
  res = lb.ptq_params(m, v, [x], cfg, capture=cap)
  assert res.report["unused_rules"] == [] and list(res.report["layers"]) == ["d/kernel"]


def test_mixed_precision_leaves_out_candidates_an_expert_stack_cannot_take():
  # Expert matrices [K=48, N] cannot take groups of 32 along K: the whole
  # allocation failed on them, where a dense weight leaves the candidate out.
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (16, 48))
  params = {"e": jax.random.normal(kw, (2, 48, 32)) * 0.1,
            "d": jax.random.normal(kd, (32, 64)) * 0.1}
  gs = jnp.array([10, 6], jnp.int32)
  fn = lambda p, a: jax.lax.ragged_dot(a, p["e"], gs) @ p["d"]  # noqa: E731
  cap = lb.capture_hessians(fn, params, [x], [QuantRule(".*", weight="int8")])
  cands = {"int8": "int8", "int4g32": lb.QuantSpec("int4", group_size=32)}
  mp_rules, alloc = lb.mixed_precision_rules(fn, params, cap, cands, 7.5)
  assert alloc.assignment == {"e": "int8", "d": "int4g32"}
  lb.quantize_function(fn, mp_rules)(params, x)   # runs


@pytest.mark.parametrize("method", [pytest.param("gptq", marks=pytest.mark.slow), "awq"])
def test_oihw_conv_kernels_take_the_same_ptq_as_hwio(method):
  # lax.conv's default OIHW layout flattened the [K, N] rows as (I, H, W), so
  # group_size blocks ran along the kernel window while real and fake mode
  # group along the input features: GPTQ refused, AWQ's clip search tuned
  # other blocks than the ones stored (and did worse than without it).
  from jax import lax  # pylint: disable=g-import-not-at-top
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (2, 6, 6, 16))
  w = jax.random.normal(k[1], (3, 3, 16, 8))
  hwio = lambda p, a: lax.conv_general_dilated(  # noqa: E731
      a, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  oihw = lambda p, a: lax.conv(a, p["w"], (1, 1), "SAME")  # noqa: E731
  to_oihw = lambda t: jnp.transpose(t, (3, 2, 0, 1))  # noqa: E731
  rules = [QuantRule(".*", weight=lb.QuantSpec("int4", group_size=8))]
  ref = lb.ptq_params(hwio, {"w": w}, [(x,)], rules, method=method)
  got = lb.ptq_params(oihw, {"w": to_oihw(w)}, [(jnp.transpose(x, (0, 3, 1, 2)),)],
                      rules, method=method)
  np.testing.assert_array_equal(got.params["w"], to_oihw(ref.params["w"]))
  assert got.report["layers"]["w"]["error"] == pytest.approx(
      ref.report["layers"]["w"]["error"], rel=1e-5)


def test_rotation_leaves_a_depthwise_conv_producer_unrotated():
  # A grouped conv's output channels each read their own group: a rotation of
  # them does not fold. The analysis offered it and the float check then
  # aborted the whole run.
  from jax import lax  # pylint: disable=g-import-not-at-top
  dn = ("NHWC", "HWIO", "NHWC")
  def f(p, a):
    h = lax.conv_general_dilated(a, p["dw"], (1, 1), "SAME", dimension_numbers=dn,
                                 feature_group_count=8)
    return lax.conv_general_dilated(h, p["pw"], (1, 1), "SAME", dimension_numbers=dn)
  k = jax.random.split(jax.random.key(1), 3)
  params = {"dw": jax.random.normal(k[0], (3, 3, 1, 8)),
            "pw": jax.random.normal(k[1], (1, 1, 8, 16))}
  x = jax.random.normal(k[2], (2, 6, 6, 8))
  fold = lb.find_scaling_folds(f, params, x).folds["dw"]
  assert "grouped or depthwise" in fold.rotation_why
  res = lb.ptq_params(f, params, [(x,)], [QuantRule(".*", weight="int4")],
                      method="rotation")
  assert res.report["layers"]["pw"]["fold"] is None
  np.testing.assert_array_equal(
      res.params["pw"], lb.ptq_params(f, params, [(x,)], [QuantRule(
          ".*", weight="int4")], method="rtn").params["pw"])
