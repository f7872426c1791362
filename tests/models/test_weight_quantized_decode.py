"""Decoding with weight-only quantized projections in real mode (bench_decode's path).

``experiments/bench_decode.py --weights`` stores the block projections as
QWeights through the public rules path (``quantize_linen(rules, "real")``,
``quantize_params``) and decodes through the quantizer's wrapped apply; these
tests check that path on a tiny bf16 model against a fake-quant reference.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_decode as bd
from lowbit_jax import QArray
from lowbit_jax.flax import quantize_linen
from lowbit_jax.kernels import MatmulProblem, gpu_weight_only
from lowbit_jax.models import decode
from lowbit_jax.models.llama import Llama, LlamaConfig

# Two projection shapes only (64x64 and the k/v 64x32), so quantizing the
# parameters compiles twice.
_CFG = LlamaConfig.smoke(vocab=96, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_len=32, dtype="bfloat16")
_P, _N, _B = 6, 5, 2
# Greedy tokens may differ from the reference only where its top two logits
# are this close (bf16 rounding of real vs fake quantization's products).
_TIE = 0.05


@pytest.fixture(scope="module")
def model_vars():
  model = Llama(_CFG)
  # Random bf16 parameters drawn with numpy (compiling model.init would take
  # longer than the test): normal(0, 1/sqrt(fan_in)), norm scales one.
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)

  def draw(kp, s):
    if kp[-1].key == "scale":
      return jnp.ones(s.shape, jnp.bfloat16)
    std = 1.0 if kp[-1].key == "embedding" else s.shape[0] ** -0.5
    return jnp.asarray(rng.standard_normal(s.shape) * std, jnp.bfloat16)
  return model, {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


# (scheme, code dtype, codes per byte, scale dtype)
_CASES = [("int8", jnp.int8, 1, jnp.bfloat16), ("mxfp4", jnp.uint8, 2, jnp.uint8)]


@pytest.mark.parametrize("name,code_dtype,per_byte,scale_dtype", _CASES)
def test_quantized_weight_decode_matches_fake_quant_reference(
    model_vars, name, code_dtype, per_byte, scale_dtype):
  model, v = model_vars
  toks = jax.random.randint(jax.random.key(3), (_B, _P), 0, _CFG.vocab)
  qv, apply = bd.quantize_weights(model, v, name, toks[:1])
  # The projections are stored QWeights with low-bit codes, K-major; the
  # embedding and lm_head stay bf16 arrays.
  qp = qv["params"]
  leaves = bd._projection_leaves(qp)  # pylint: disable=protected-access
  assert len(leaves) == 7 * _CFG.n_layers
  assert not bd._projection_leaves(qp, quantized=False)  # pylint: disable=protected-access
  for path, w in leaves:
    k, n = w.logical_shape
    assert w.transposed and w.codes.dtype == code_dtype, path
    assert w.codes.shape == (n, k // per_byte), (path, w.codes.shape)
    assert w.scale.dtype == scale_dtype, path
  for path in (("embed", "embedding"), ("lm_head", "kernel")):
    leaf = qp[path[0]][path[1]]
    assert not isinstance(leaf, QArray) and leaf.dtype == jnp.bfloat16
  total, proj = bd.param_bytes(qp)
  f_total, f_proj = bd.param_bytes(v["params"])
  assert proj < (0.6 if per_byte == 1 else 0.35) * f_proj, (proj, f_proj)
  assert f_total - total == f_proj - proj
  # Every projection asks the dispatcher; no kernel on CPU.
  disp = bd.projection_dispatch(qp, _B)
  assert len(disp) == 7 * _CFG.n_layers
  assert all(e["kernel"] is None and e["why"] for e in disp.values())

  # Real-mode decode through the cache.
  lengths = jnp.full((_B,), _P, jnp.int32)
  out = np.asarray(decode.generate(model, qv, toks, lengths, _N, apply_fn=apply))
  assert out.shape == (_B, _N)
  # Reference: the fake-quant forward pass (float params, same rules) over the
  # prompt and the generated tokens, no cache; its argmax at each position
  # must be the token real mode chose (up to near-ties of bf16 rounding).
  fake = quantize_linen(bd.weight_rules(name), mode="fake")(model.apply)
  seq = jnp.concatenate([toks, jnp.asarray(out[:, :-1])], axis=1)
  logits = np.asarray(jax.jit(fake)(v, seq))[:, _P - 1:]
  chosen = np.take_along_axis(logits, out[..., None], -1)[..., 0]
  best = logits.max(-1)
  np.testing.assert_array_less(best - chosen, _TIE)
  top2 = np.sort(logits, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > _TIE
  assert clear.mean() > 0.5
  np.testing.assert_array_equal(out[clear], logits.argmax(-1)[clear])


def test_wgmma_code_order_decodes_the_same_tokens(model_vars):
  # ``mxfp4@wgmma`` stores the same weights with their bytes in the Hopper
  # kernel's order; off the kernel (CPU) every matmul reorders them back, so
  # the greedy decode is token for token the natural one's.
  model, v = model_vars
  toks = jax.random.randint(jax.random.key(4), (_B, _P), 0, _CFG.vocab)
  lengths = jnp.full((_B,), _P, jnp.int32)
  outs = []
  for name in ("mxfp4", "mxfp4@wgmma"):
    qv, apply = bd.quantize_weights(model, v, name, toks[:1])
    orders = {w.code_order for _, w in bd._projection_leaves(qv["params"])}  # pylint: disable=protected-access
    assert orders == {name.partition("@")[2] or "natural"}
    outs.append(np.asarray(decode.generate(model, qv, toks, lengths, _N,
                                           apply_fn=apply)))
  np.testing.assert_array_equal(outs[1], outs[0])


def test_llama8b_projections_dispatch_as_the_tuned_table_says():
  cfg = bd.llama8b_config(1)
  assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.dtype) == (
      4096, 32, 8, 14336, "bfloat16")
  model = Llama(cfg)
  toks = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda k: jax.tree.map(
      lambda p: p.astype(jnp.bfloat16), model.init(k, toks)["params"]),
                          jax.random.key(0))
  shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
            "o_proj": (4096, 4096), "gate_proj": (4096, 14336),
            "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
  fmt = {"int8": ("int8", None), "int4_g128": ("int4", 128), "int4": ("int4", None),
         "fp4_g32": ("fp4_e2m1", 32), "mxfp4": ("mxfp4", 32), "nvfp4": ("nvfp4", 16)}
  for name, (wf, group) in fmt.items():
    qv = jax.eval_shape(lambda p, name=name: bd.quantize_weights(
        model, {"params": p}, name, toks)[0], params)
    for m in (1, 16, 2048):
      disp = bd.projection_dispatch(qv["params"], m)
      assert len(disp) == 7
      for layer, e in disp.items():
        proj = layer.rsplit("/", 1)[-1]
        assert (e["k"], e["n"]) == shapes[proj]
        prob = MatmulProblem(
            m=m, n=e["n"], k=e["k"], x_dtype="bfloat16", w_format=wf,
            w_block=group)
        want = gpu_weight_only.tuned_entry(prob)
        assert e["table"] == (None if want is None else want["use_kernel"]), (
            name, layer, m)
        if jax.default_backend() != "gpu":
          assert e["kernel"] is None
  with pytest.raises(ValueError, match="unknown weight scheme"):
    bd.weight_spec("int3")


@pytest.mark.slow
def test_cli_writes_weight_rows(tmp_path):
  cmd = [sys.executable, "-m", "experiments.bench_decode", "--config=tiny",
         "--layers=1", "--prompt_len=8", "--new_tokens=3", "--iters=1",
         "--batches=2", "--schemes=bf16", "--weights=int4_pc,bf16",
         f"--out_dir={tmp_path}", "--tag=t"]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run(cmd, check=True, cwd=root, capture_output=True, timeout=600)
  rows = json.loads((tmp_path / "t.json").read_text())["rows"]
  assert [r["weights"] for r in rows] == ["bf16", "int4"]
  assert rows[1]["projection_bytes"] < 0.35 * rows[0]["projection_bytes"]
  assert rows[1]["projections"] == 7
  md = (tmp_path / "t.md").read_text()
  assert "## Kernel dispatch" in md and "| int4 | bf16 | 2 |" in md


def test_llama8b_decode_step_lowers_one_mosaic_call_per_dispatched_projection(
    monkeypatch):
  """The model's real-mode decode, lowered for a GPU (no GPU needed): every
  projection the dispatcher sends to the kernel is one Mosaic GPU call."""
  from lowbit_jax.kernels import _gpu_common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_gpu_common, "on_hopper_gpu", lambda prob: True)
  cfg = bd.llama8b_config(1, vocab=256, max_len=16)
  model = Llama(cfg)
  toks = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda k: jax.tree.map(
      lambda p: p.astype(jnp.bfloat16), model.init(k, toks)["params"]),
                          jax.random.key(0))
  holder = {}

  def quantize(p):
    qv, holder["apply"] = bd.quantize_weights(model, {"params": p}, "int8", toks)
    return qv
  qv = jax.eval_shape(quantize, params)
  b, p = 16, 8
  disp = bd.projection_dispatch(qv["params"], b)
  want = sum(e["kernel"] == "gpu_weight_only" for e in disp.values())
  assert want == 5   # the table: k/v and gate/up/down, not q/o (XLA's faster)
  pre = sum(e["kernel"] == "gpu_weight_only"
            for e in bd.projection_dispatch(qv["params"], b * p).values())
  args = (qv, jax.ShapeDtypeStruct((b, p), jnp.int32),
          jax.ShapeDtypeStruct((b,), jnp.int32), jax.random.key(0))
  counts = []
  for n in (2, 1):
    fn = decode.make_generate(model, n, prompt_len=p, batch=b,
                              apply_fn=holder["apply"])
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    counts.append(bd.count_mosaic_calls(text))
  # generate(2) = prefill (M = 128, the table's M <= 256 bucket) + one decode step.
  assert counts == [pre + want, pre]


def test_step_kernels_keep_the_decode_loops_launches():
  steps = 7
  launches = ([("prefill_fusion", 2.0), ("body_mosaic_gpu_kernel", 0.5)]
              + [("body_mosaic_gpu_kernel", 0.01), ("loop_fusion", 0.002)]
              * (2 * steps))
  per = bd.step_kernels(launches, steps)
  assert list(per) == ["body_mosaic_gpu_kernel", "loop_fusion"]
  np.testing.assert_allclose(per["loop_fusion"], 1e3 * 0.002 * 2)
  # (a name the prefill shares is spread over the steps too: the bench checks
  # the prefill lowers no Mosaic call, mosaic_calls_prefill_hlo)
  np.testing.assert_allclose(per["body_mosaic_gpu_kernel"],
                             1e3 * (0.5 + 0.01 * 2 * steps) / steps)


@pytest.mark.parametrize("name,rows_taken", [
    ("int4", (2, 12)),       # per-channel int4 codes into the dot at any M
    ("mxfp4", (2,)),         # groups of 32: the group-batched dot up to M = 8
    ("fp4_g32", (2,))])
def test_gpu_dot_orders_give_the_model_the_same_logits(model_vars, name,
                                                       rows_taken, monkeypatch):
  # The GPU's non-kernel orders (ops._native_4bit_codes, _group_scaled_dot),
  # forced on the CPU (for E2M1 codes as well) with the 16-bit dot they run in
  # there, through the public rules path of a whole bf16 model: the logits are
  # those of the
  # dequantize-first order to bf16 rounding, at the rows where each order
  # takes the projections (counted), and the prefill rows where it does not.
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  model, v = model_vars
  toks = jax.random.randint(jax.random.key(5), (_B, _P), 0, _CFG.vocab)
  qv, apply = bd.quantize_weights(model, v, name, toks[:1])
  monkeypatch.setattr(ops, "_compute_dtype", lambda dt: jnp.dtype(dt) if jnp.dtype(
      dt) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.float32)
  taken = []
  for t in (toks[:1, :2], toks):
    # A fresh function each time: jit's trace cache is keyed on the function,
    # and the orders are chosen at trace time.
    want = np.asarray(jax.jit(lambda a, b: apply(a, b))(qv, t), np.float32)
    with monkeypatch.context() as mp:
      mp.setattr(ops, "_NATIVE_CODE_BACKENDS", (jax.default_backend(),))
      # E2M1 codes too, which are off by default (ops._NATIVE_4BIT_DTYPES).
      mp.setattr(ops, "_NATIVE_4BIT_DTYPES", (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4),
                                              jnp.dtype(jnp.float4_e2m1fn)))
      for fn in ("_group_scaled_dot", "_native_4bit_codes"):
        orig = getattr(ops, fn)

        def spy(*a, orig=orig, **kw):
          out = orig(*a, **kw)
          if out is not None:
            taken.append(t.size)
          return out
        mp.setattr(ops, fn, spy)
      got = np.asarray(jax.jit(lambda a, b: apply(a, b))(qv, t), np.float32)
    scale = np.abs(want).max()
    # bf16 rounding of the products and the output: 0.6% of the largest
    # logit here.
    assert np.abs(got - want).max() < 0.02 * scale, (t.shape, np.abs(got - want).max(), scale)
  assert sorted(set(taken)) == sorted(rows_taken), taken
