"""apply_ptq as the Linen front door of ptq_params: the delegated methods agree.

"rtn", "gptq", "quarot" and "spinquant" run through ``ptq_params``; on a Linen
model ``apply_ptq``'s kernels and scales equal ``ptq_params``' with the same
rules bit for bit (exact equality, no tolerance).
"""
import jax
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import QuantRule, QuantSpec
from lowbit_jax.flax import apply_ptq
from lowbit_jax.flax.ptq import SHARED_METHODS
from tests import _toy_models as toy

SPEC = QuantSpec("int4", group_size=16)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    out.update(_flat(v, p) if hasattr(v, "items") else {p: np.asarray(v)})
  return out


def _assert_same(qp, rep, res):
  """apply_ptq's params and scales equal the PTQResult's exactly."""
  got, want = _flat(qp), _flat(res.params["params"])
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=p)
  scales = _flat(rep["quant_scales"])
  assert {p.replace("/weight_scale", "/kernel") for p in scales} == set(res.weight_scales)
  for p, s in res.weight_scales.items():
    np.testing.assert_array_equal(scales[p.replace("/kernel", "/weight_scale")], s)


@pytest.fixture(scope="module")
def toy_setup():
  model, v = toy.init_linen()
  return model, v["params"], [toy.tokens(s) for s in (1, 2)]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rtn_and_gptq_equal_ptq_params_on_the_toy_model(toy_setup, method):
  """Every Dense and conv layer (layers=".*"); Einsum, 3-d DenseGeneral stay float."""
  model, params, batches = toy_setup
  qp, rep = apply_ptq(model, params, batches, method, SPEC)
  res = lb.ptq_params(model, {"params": params}, batches,
                      [QuantRule(".*/(conv|up|down)", weight=SPEC)], method=method)
  _assert_same(qp, rep, res)
  assert set(rep["layers"]) == {f"layers_{i}/{n}" for i in range(toy.LAYERS)
                                for n in ("conv", "up", "down")}
  for p, e in rep["layers"].items():
    assert e["spec"] == "int4_g16"
    assert e["error"] == res.report["layers"][p + "/kernel"]["error"]
    assert e["weight_sqnr_db"] > 10 and e["output_sqnr_db"] > 10
    assert e.get("conv", False) == p.endswith("conv")
  for n in ("q", "k", "v", "o"):
    np.testing.assert_array_equal(qp["layers_0"][n]["kernel"],
                                  params["layers_0"][n]["kernel"])


def test_layers_left_float_and_options_of_the_linen_path(toy_setup):
  model, params, batches = toy_setup
  qp, rep = apply_ptq(model, params, batches, "rtn", [(".*/up", SPEC)],
                      layers=".*/(up|down)")
  assert rep["layers"]["layers_0/down"] == {"spec": None, "transform": "none",
                                            "fold": "none"}
  np.testing.assert_array_equal(qp["layers_0"]["down"]["kernel"],
                                params["layers_0"]["down"]["kernel"])
  assert set(rep["quant_scales"]["layers_0"]) == {"up"}
  with pytest.raises(ValueError, match="apply_kwargs= applies to"):
    apply_ptq(model, params, batches, "gptq", SPEC, apply_kwargs={"x": 1})
  assert SHARED_METHODS == ("rtn", "gptq", "quarot", "spinquant")


@pytest.mark.parametrize("method,kw,read_by", [
    ("rtn", {"act_order": True}, "'gptq'"),
    ("awq", {"blocksize": 64}, "'gptq'"),
    ("gptq", {"alpha": 0.9}, "'smoothquant'"),
    ("smoothquant", {"n_grid": 4}, "'awq'"),
    ("awq", {"rotation_block_size": 8}, "'rotation'"),
    ("gptq", {"extra_folds": {"a": "b"}}, "'awq' / 'smoothquant'"),
    ("rtn", {"fold_rtol": 1e-2}, "'awq'"),
])
def test_options_the_method_never_reads_are_refused(toy_setup, method, kw, read_by):
  # apply_ptq accepted them and returned the defaults' result bit for bit;
  # ptq_params already refused the same options.
  model, params, batches = toy_setup
  with pytest.raises(ValueError, match=f"method={method!r} does not use .*{read_by}"):
    apply_ptq(model, params, batches, method, SPEC, **kw)


@pytest.fixture(scope="module")
def llama():
  from lowbit_jax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  toks = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab)
  return model, jax.jit(model.init)(jax.random.key(0), toks)["params"], [(toks,)]


@pytest.mark.slow
@pytest.mark.parametrize("method,quantizer", [("quarot", "rtn"), ("quarot", "gptq"),
                                              ("spinquant", "rtn")])
def test_rotations_equal_ptq_params_on_the_smoke_llama(llama, method, quantizer):
  """The rotated model is captured under its online-Hadamard rules, as
  ptq_params captures it, so GPTQ's Hessians (and kernels) agree too."""
  from lowbit_jax.algorithms import SpinQuantConfig
  model, params, batches = llama
  kw = {"online": ".*/down_proj/kernel", "quantizer": quantizer}
  if method == "spinquant":
    kw["spinquant"] = SpinQuantConfig(steps=2)
  qp, rep = apply_ptq(model, params, batches, method, SPEC, **kw)
  res = lb.ptq_params(model, {"params": params}, batches, [QuantRule(".*", weight=SPEC)],
                      method=method, **kw)
  _assert_same(qp, rep, res)
  assert rep["rotation"].online == res.report["rotation"].online
  assert len(rep["layers"]) == 15   # 14 linears and the head
