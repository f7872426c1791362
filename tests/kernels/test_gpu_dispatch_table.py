"""CPU tests of the weight-only dispatch table and of XLA's fused baseline path.

The table (``lowbit_jax/kernels/gpu_tuned_configs.json``, written by
``experiments/bench_kernels.py --mode=tune``) decides per weight case, shape class
and M bucket whether the kernel runs and with which tiling; ``xla_fused_matmul``
is what runs everywhere else.
"""
import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

from lowbit_jax.kernels import _gpu_common as common
from lowbit_jax.kernels import gpu_weight_only as wo
from lowbit_jax.kernels._api import MatmulProblem
from tests.kernels._gpu_operands import make_wo, np_weight, rel_err


@pytest.fixture(autouse=True)
def _restore_table():
  yield
  wo.set_table(None)


def _prob(**kw):
  return MatmulProblem(**{**dict(m=1, n=8192, k=8192, x_dtype="bfloat16",
                                 w_format="int4", w_block=128), **kw})


def _entry(use, config=None, m=1):
  return dict(use_kernel=use, config=config, shape="8192x8192", m=m,
              kernel_us=10.0, xla_us=20.0, bf16_us=30.0)


def test_names_buckets_and_shape_classes():
  assert wo.case_name("int4", 128) == "int4_g128"
  assert wo.case_name("int8", None) == "int8_pc"
  assert wo.case_name("fp4_e2m1", 32) == "fp4_g32"
  assert wo.case_name("mxfp4", 32) == "mxfp4"
  assert [wo.m_bucket(m) for m in (1, 2, 4, 5, 16, 17, 64, 65, 300, 513, 9000)] == [
      1, 4, 4, 16, 16, 64, 64, 256, 512, 4096, 4096]
  assert wo.shape_class(8192, 28672) == "k8k_n32k"
  assert wo.shape_class(14336, 4096) == "k16k_n4k"
  assert wo.shape_class(4096, 1024) == "k4k_n1k"


def test_supports_follows_the_table(monkeypatch):
  monkeypatch.setattr(common, "on_hopper_gpu", lambda problem: True)
  wo.set_table({"meta": {}, "entries": {"int4_g128": {"k8k_n8k": {
      "1": _entry(True, [64, 512, 16, 3, 2, False]),
      "16": _entry(False, m=16)}}}})
  assert wo.supports(_prob())
  # The table's tile_m (16) is fitted to M = 1 (8 rows).
  assert wo.tuned_config(_prob()) == wo.Config(64, 512, 8, 3, 2, False)
  assert not wo.supports(_prob(m=16))          # measured slower than XLA
  assert not wo.supports(_prob(m=4))           # bucket not in the table
  assert not wo.supports(_prob(w_block=64))    # case not in the table
  assert not wo.supports(_prob(n=4096))        # shape class not in the table
  assert not wo.supports(_prob(n=8192 + 64 * 3, k=8192))  # class ok, no tiling
  # Without a table entry, matmul's default tiling is the built-in one.
  assert wo.tuned_config(_prob(m=4)) == wo._decode_config(_prob(m=4))  # pylint: disable=protected-access


def test_wgmma_ordered_weights_use_their_rows_else_a_reordering_estimate(
    monkeypatch):
  monkeypatch.setattr(common, "on_hopper_gpu", lambda problem: True)
  cfg = [64, 256, 8, 4, 2, False]
  slow = dict(_entry(False, cfg), kernel_us=25.0, xla_us=20.0)
  wo.set_table({"meta": {}, "entries": {
      "int4_g128": {"k8k_n8k": {"1": slow, "4": slow,
                                "4096": dict(slow, kernel_us=80.0)}},
      "int4_g128@wgmma": {"k8k_n8k": {"4": dict(slow, kernel_us=24.0)}}}})
  w = functools.partial(_prob, w_order="wgmma")
  assert not wo.supports(_prob())
  # No measured wgmma row at M = 1: the natural row plus one read and write
  # of the 32 MB of codes at the stream bandwidth (15.6 us) for XLA's path.
  e = wo.tuned_entry(w())
  assert e["estimated"] and e["xla_us"] == pytest.approx(20.0 + 2 * 8192 * 4096 / 4.30e6)
  assert wo.supports(w())
  assert not wo.supports(w(m=4096))   # 80 us against 35.6: XLA still wins
  # A measured wgmma row is taken as it is (here: XLA measured faster).
  assert "estimated" not in wo.tuned_entry(w(m=4))
  assert not wo.supports(w(m=4))
  # A table that measured its device's bandwidth (an H100's 3.03 TB/s) prices
  # the reordering at that bandwidth.
  wo.set_table({"meta": {"stream_TBps": 3.03}, "entries": {
      "int4_g128": {"k8k_n8k": {"1": slow}}}})
  assert wo.tuned_entry(w())["xla_us"] == pytest.approx(
      20.0 + 2 * 8192 * 4096 / 3.03e6)


def test_e2m1_split_weights_use_their_rows_else_the_wgmma_ones(monkeypatch):
  # "wgmma_e2m1" codes are "wgmma" bytes with their bits permuted: without a
  # row of their own the dispatcher takes the "wgmma" row (estimated), its
  # tiling without the table decode's options (refused for this order).
  monkeypatch.setattr(common, "on_hopper_gpu", lambda problem: True)
  table_cfg = [64, 256, 8, 4, 4, False, True, 1, False, True, False, True, True]
  row = dict(_entry(True, table_cfg), kernel_us=19.3, xla_us=205.7)
  nat = dict(_entry(True, [64, 256, 8, 4, 2, False]), kernel_us=30.0, xla_us=200.0)
  wo.set_table({"meta": {}, "entries": {
      "mxfp4": {"k8k_n8k": {"1": nat, "16": nat}},
      "mxfp4@wgmma": {"k8k_n8k": {"1": row}},
      "mxfp4@wgmma_e2m1": {"k8k_n8k": {"4": dict(row, kernel_us=15.0)}}}})
  sp = functools.partial(_prob, w_format="mxfp4", w_block=32,
                         w_order="wgmma_e2m1")
  e = wo.tuned_entry(sp())
  assert e["estimated"] and e["kernel_us"] == 19.3
  cfg = wo.tuned_config(sp())
  assert not cfg.lut_decode and not cfg.lut_regs and cfg.scale_words
  assert wo._config_refusal(sp(), cfg) is None  # pylint: disable=protected-access
  assert wo.supports(sp())
  assert wo.tuned_entry(sp(m=4))["kernel_us"] == 15.0  # its own row
  assert wo.tuned_entry(sp(m=16))["estimated"]  # the natural row, reordering priced
  # int4 codes cannot take the order (nor E2M1 ones "wgmma_int4"): refused,
  # never dispatched
  with pytest.raises(ValueError, match="E2M1 codes"):
    wo._validate(_prob(w_order="wgmma_e2m1"))  # pylint: disable=protected-access
  assert not wo.supports(_prob(w_order="wgmma_e2m1"))
  with pytest.raises(ValueError, match="int4 codes"):
    wo._validate(sp(w_order="wgmma_int4"))  # pylint: disable=protected-access
  # "wgmma_int4" int4 weights take the "wgmma" row the same way
  wo.set_table({"meta": {}, "entries": {"int4_g128@wgmma": {"k8k_n8k": {
      "1": dict(_entry(True, [64, 256, 8, 4, 2, False]), kernel_us=15.3)}}}})
  e = wo.tuned_entry(_prob(w_order="wgmma_int4"))
  assert e["estimated"] and e["kernel_us"] == 15.3
  assert wo.supports(_prob(w_order="wgmma_int4"))


def test_bench_code_order_per_case():
  from experiments import bench_kernels  # pylint: disable=g-import-not-at-top
  got = {(r, f): bench_kernels.case_order(r, f)
         for r in ("natural", "wgmma", "wgmma_e2m1", "wgmma_int4", "kernel")
         for f in ("int4", "mxfp4", "int8")}
  assert got[("kernel", "int4")] == "wgmma_int4"
  assert got[("kernel", "mxfp4")] == "wgmma_e2m1"
  assert got[("wgmma_e2m1", "int4")] == got[("wgmma_int4", "mxfp4")] == "wgmma"
  assert got[("wgmma_int4", "int4")] == "wgmma_int4"
  assert {got[(r, "int8")] for r in ("wgmma", "kernel")} == {"natural"}


def test_bench_candidates_for_e2m1_split_codes():
  # bench_kernels --w_order=wgmma_e2m1: no table-decode options (the codes
  # decode by rotations), fast_decode only where it picks NVFP4's scale
  # conversion, no duplicates; the refine phase the same.
  from experiments import bench_kernels  # pylint: disable=g-import-not-at-top
  for fmt, g in (("mxfp4", 32), ("nvfp4", 16), ("fp4_e2m1", 32)):
    prob = MatmulProblem(m=1, n=8192, k=8192, x_dtype="bfloat16", w_format=fmt,
                         w_block=g, w_order="wgmma_e2m1")
    for got in (bench_kernels.candidates(wo, prob, tune=True),
                bench_kernels.refine_candidates(
                    wo, prob, wo.Config(64, 256, 8, 4, 4, fast_decode=True))):
      assert got and len(set(got)) == len(got)
      assert not any(c.lut_decode or c.lut_regs for c in got)
      assert fmt == "nvfp4" or not any(c.fast_decode for c in got)
      assert all(wo._shape_ok(prob, c) for c in got)  # pylint: disable=protected-access


def test_supports_needs_a_hopper_gpu_even_where_the_table_wins():
  wo.set_table({"meta": {}, "entries": {"int4_g128": {"k8k_n8k": {
      "1": _entry(True)}}}})
  assert jax.default_backend() != "gpu"
  assert not wo.supports(_prob())
  # Off a GPU the table is never read: an entry it could not use does not
  # break a CPU matmul.
  wo.set_table({"meta": {}, "entries": {"int4_g128": {"k8k_n8k": {
      "1": _entry(True, {"tile_n": 0, "tile_k": 0})}}}})
  assert not wo.supports(_prob())


def test_block_formats_with_float_scales_stay_off_the_kernels():
  # The kernels decode E8M0 / E4M3 scale codes: an MX or NVFP4 weight stored
  # with bf16 or float32 scales (scale_dtype=) goes to XLA's path, and a
  # kernel given such scales refuses them rather than misreading them.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._spec import QuantSpec  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_w8a8  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels._api import MatmulOperands  # pylint: disable=g-import-not-at-top
  w = jax.random.normal(jax.random.key(0), (512, 128))
  x = jnp.ones((1, 512), jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  for fmt in ("mxfp4", "nvfp4"):
    assert ops.kernel_problem(x, ops.prepare_weight(w, QuantSpec(fmt)), dn,
                              backend="gpu")[0].w_format == fmt
    for sd in ("bfloat16", "float32"):
      prob, why = ops.kernel_problem(
          x, ops.prepare_weight(w, QuantSpec(fmt, scale_dtype=sd)), dn, backend="gpu")
      assert prob is None and "no kernel" in why
  prob = _prob(n=128, k=512, w_format="mxfp4", w_block=32)
  q = ops.prepare_weight(w, QuantSpec("mxfp4", scale_dtype="bfloat16"))
  with pytest.raises(ValueError, match="w_scale of a mxfp4 operand must be uint8, "
                     "got bfloat16"):
    wo.matmul(MatmulOperands(x, q.codes, q.scale), prob, interpret=True)
  w8 = MatmulProblem(m=128, n=128, k=512, x_dtype="float8_e4m3fn",
                     w_format="mxfp8_e4m3", w_block=32, x_format="mxfp8_e4m3",
                     x_block=32)
  with pytest.raises(ValueError, match="x_scale of a mxfp8_e4m3 operand"):
    gpu_w8a8.matmul(MatmulOperands(jnp.zeros((128, 512), jnp.float8_e4m3fn),
                                   jnp.zeros((128, 512), jnp.float8_e4m3fn),
                                   jnp.zeros((128, 16), jnp.uint8),
                                   jnp.ones((128, 16), jnp.float32)), w8,
                    interpret=True)


def test_preferred_element_type_reaches_the_kernel_problem():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._spec import QuantSpec  # pylint: disable=g-import-not-at-top
  q = ops.prepare_weight(jax.random.normal(jax.random.key(0), (512, 128)),
                         QuantSpec("int8"))
  x = jnp.ones((1, 512), jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  assert ops.kernel_problem(x, q, dn, backend="gpu")[0].out_dtype == "bfloat16"
  assert ops.kernel_problem(x, q, dn, backend="gpu",
                            out_dtype=jnp.float32)[0].out_dtype == "float32"


def test_load_table_reads_the_shipped_file_and_rejects_bad_ones(tmp_path):
  table = wo.load_table()
  assert table["entries"], "the shipped table is empty"
  for case, classes in table["entries"].items():
    for buckets in classes.values():
      for b, e in buckets.items():
        assert int(b) in wo.M_BUCKETS and isinstance(e["use_kernel"], bool), case
  assert table["meta"]["device"] == wo.DEFAULT_TABLE_DEVICE
  # Every other device's shipped table is named by the device it was
  # measured on and overlays the default one there.
  d = os.path.dirname(wo.TABLE_PATH)
  others = [f for f in os.listdir(d)
            if f.startswith("gpu_tuned_configs.") and f != "gpu_tuned_configs.json"]
  assert others, "the H100's table (session 33) is shipped"
  for f in others:
    dev = wo.load_table(os.path.join(d, f))["meta"]["device"]
    assert wo.table_filename(dev) == f
    assert wo.table_for_device(dev)["meta"]["device"] == dev
  bad = tmp_path / "t.json"
  bad.write_text(json.dumps({"entries": {"int4_g128": {"k8k_n8k": {"3": {
      "use_kernel": True}}}}}))
  with pytest.raises(ValueError, match="k8k_n8k/3: the M bucket must be one of"):
    wo.load_table(str(bad))
  # An entry that loads but would break the dispatcher later is refused
  # here, naming the file, the entry and the field.
  good = {"tile_n": 64, "tile_k": 256, "tile_m": 16, "stages": 3}
  for entry, match in (
      ({"use_kernel": "false"}, "use_kernel true or false"),
      ({"use_kernel": True, "config": {**good, "tilek": 1}},
       "is not a gpu_weight_only.Config"),
      ({"use_kernel": True, "config": {**good, "tile_n": 0}},
       "tile_n=0 must be a positive int"),
      ({"use_kernel": True, "config": {**good, "tile_k": "256"}},
       "tile_k='256' must be a positive int"),
      ({"use_kernel": True, "config": {**good, "ws": 1}}, "ws=1 must be true or false"),
      ("yes", "is not a dict")):
    bad.write_text(json.dumps({"entries": {"int4_g128": {"k8k_n8k": {"1": entry}}}}))
    with pytest.raises(ValueError, match=f"t.json: entry int4_g128/k8k_n8k/1.*{match}"
                       ".*--mode=tune"):
      wo.load_table(str(bad))
  bad.write_text(json.dumps({"entries": {}, "w8a8": {"fp8_channel": {
      "config": {"tile_m": 0}}}}))
  with pytest.raises(ValueError, match="w8a8 entry 'fp8_channel'.*tile_m=0"):
    wo.load_table(str(bad))
  bad.write_text(json.dumps({"rows": []}))
  with pytest.raises(ValueError, match="--mode=tune"):
    wo.load_table(str(bad))


@pytest.mark.parametrize("fmt,group,decode", [
    ("int4", 128, "native"), ("nvfp4", 16, "native"), ("mxfp4", 32, "arith"),
    pytest.param("int8", None, "native", marks=pytest.mark.slow),
    pytest.param("fp4_e2m1", None, "arith", marks=pytest.mark.slow)])
def test_xla_fused_path_matches_float64(fmt, group, decode):
  m, n, k = 3, 64, 256
  ops, prob = make_wo(jax.random.key(len(fmt) + (group or 0)), fmt, group, m, n,
                      k, out_dtype="float32")
  w = np_weight(fmt, ops.w_codes, ops.w_scale, group, n, k, ops.w_tensor_scale)
  want = np.asarray(ops.x, np.float64) @ w.T
  got = jax.jit(lambda o: wo.xla_fused_matmul(o, prob, decode=decode))(ops)
  assert got.shape == (m, n)
  # bf16 weights (group scales applied in bf16): bf16-operand accuracy.
  assert rel_err(got, want) < 1e-2


def _prmt(a, b, sel):
  """PTX ``prmt.b32`` (default mode) on Python ints."""
  src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [
      (b >> (8 * i)) & 0xFF for i in range(4)]
  out = 0
  for i in range(4):
    s = (sel >> (4 * i)) & 0xF
    v = src[s & 7]
    if s & 8:  # sign-replicate mode
      v = 0xFF if v & 0x80 else 0
    out |= v << (8 * i)
  return out


def _lop3(a, b, c, lut):
  """PTX ``lop3.b32``: bit i of the result is lut[(a_i << 2) | (b_i << 1) | c_i]."""
  return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1)
                       | ((c >> i) & 1))) & 1) << i for i in range(32))


def test_e2m1_byte_permute_decode_is_exact_on_random_words():
  # A model of _E2M1_PTX (prmt / shl / and / prmt / lop3, then x 2**126) with
  # the kernel's own selectors, against the exact decoder, for all 4 byte
  # positions of random words and every byte value.
  from lowbit_jax.kernels import _gpu_common as common  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = [int(v) for v in rng.integers(0, 2 ** 32, 64, dtype=np.uint64)]
  words += list(range(256))  # one byte, zero-extended (the fallback path)
  for w in words:
    nib = np.array([(w >> (4 * i)) & 0xF for i in range(8)], np.uint8)
    want = np.asarray(common.decode_e2m1(nib))
    for part in range(4 if w > 255 else 1):
      sel_mag, sel_sign = wo.e2m1_prmt_selectors(part)
      t = ((_prmt(w, w >> 4, sel_mag) << 6) & 0xFFFFFFFF) & 0x01C001C0
      g = _prmt((w << 4) & 0xFFFFFFFF, w, sel_sign)
      r = _lop3(t, g, 0x80008000, 0xF8)
      got = np.array([r & 0xFFFF, r >> 16], np.uint16).view(
          ml_dtypes.bfloat16).astype(np.float32) * np.float32(2.0 ** 126)
      np.testing.assert_array_equal(got, want[2 * part: 2 * part + 2])
  with pytest.raises(ValueError, match="0..3"):
    wo.e2m1_prmt_selectors(4)


def test_e2m1_table_lookup_decode_is_exact_on_random_words():
  # A model of Config.lut_decode (_E2M1_LUT_IDX_PTX once per 16-bit half of
  # a word, _E2M1_LUT_PTX once per pair, with the kernel's own constants and
  # shifts) against the exact decoder, bit for bit (signed zeros included),
  # for all 4 byte positions of random words and every byte value.
  from lowbit_jax.kernels import _gpu_common as common  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  u_lo, u_hi, t_lo, t_hi = wo._e2m1_lut_tables()  # pylint: disable=protected-access
  # The model's immediates are read from the PTX the kernel emits.
  idx_ptx = wo._E2M1_LUT_IDX_PTX.format(u_lo=hex(u_lo), u_hi=hex(u_hi))  # pylint: disable=protected-access
  val_ptx = wo._E2M1_LUT_PTX.format(t_lo=hex(t_lo), t_hi=hex(t_hi))  # pylint: disable=protected-access
  movs = dict(re.findall(r"mov\.b32 (\w+), (0x[0-9a-fA-F]+);", idx_ptx + val_ptx))
  assert [int(movs[r], 16) for r in ("ul", "uh", "tl", "th")] == [
      u_lo, u_hi, t_lo, t_hi]
  k = int(movs["k"], 16)
  assert re.search(r"prmt\.b32 s, k, k, \$2;", idx_ptx)
  assert re.search(r"prmt\.b32 \$0, ul, uh, \$1;", idx_ptx)
  assert re.search(r"prmt\.b32 \$0, tl, th, \$1;", val_ptx)
  mask, lut = (int(v, 16) for v in re.search(
      r"lop3\.b32 \$0, \$0, s, (0x[0-9a-fA-F]+), (0x[0-9a-fA-F]+);",
      idx_ptx).groups())
  rng = np.random.default_rng(1)
  words = [int(v) for v in rng.integers(0, 2 ** 32, 64, dtype=np.uint64)]
  words += list(range(256))  # one byte, zero-extended (the fallback path)
  for w in words:
    nib = np.array([(w >> (4 * i)) & 0xF for i in range(8)], np.uint8)
    want = np.asarray(common.decode_e2m1(nib), np.float32)
    for part in range(4 if w > 255 else 1):
      word = w >> 16 if part >= 2 else w
      sign = _prmt(k, k, word)
      sel = _lop3(_prmt(u_lo, u_hi, word & 0x7777), sign, mask, lut)
      if part % 2:
        sel >>= 16
      r = _prmt(t_lo, t_hi, sel)
      got = np.array([r & 0xFFFF, r >> 16], np.uint16).view(
          ml_dtypes.bfloat16).astype(np.float32)
      np.testing.assert_array_equal(got.view(np.uint32),
                                    want[2 * part: 2 * part + 2].view(np.uint32))


def test_w8a8_tiling_comes_from_the_table_where_it_fits():
  # The table's "w8a8" section (bench_kernels.w8a8_entries) names a tiling per
  # case; gpu_w8a8 runs it where it tiles the problem, else its heuristic.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_w8a8  # pylint: disable=g-import-not-at-top
  block = MatmulProblem(m=4096, n=8192, k=8192, x_dtype="fp8_e4m3",
                        w_format="fp8_e4m3", x_format="fp8_e4m3",
                        w_block=(128, 128), x_block=128)
  chan = dataclasses.replace(block, w_block=None, x_block=None)
  assert gpu_w8a8.case_of(block) == "fp8_block"
  assert gpu_w8a8.case_of(dataclasses.replace(
      chan, x_dtype="int8", w_format="int8", x_format="int8")) == "int8_channel"
  heur = gpu_w8a8.heuristic_config(block)
  tuned = dataclasses.replace(heur, grid_tile_width=16, stages=3)
  wo.set_table({"meta": {}, "entries": {},
                "w8a8": {"fp8_block": dict(config=dataclasses.asdict(tuned))}})
  assert gpu_w8a8._default_config(block) == tuned  # pylint: disable=protected-access
  assert gpu_w8a8._default_config(chan) == gpu_w8a8.heuristic_config(chan)  # pylint: disable=protected-access
  # A 64-row M does not tile the tuned (nor the heuristic) 128-row CTA.
  assert gpu_w8a8.tuned_config(dataclasses.replace(block, m=64)) is None
  # A tiling past the shared memory a CTA has is refused, with the reason.
  big = dataclasses.replace(heur, stages=8)
  assert not gpu_w8a8._shape_ok(block, big)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="shared memory"):
    gpu_w8a8.matmul(None, block, config=big)
  wo.set_table({"meta": {}, "entries": {},
                "w8a8": {"fp8_block": dict(config=dict(tile_q=3))}})
  with pytest.raises(ValueError, match="not a gpu_w8a8.Config"):
    gpu_w8a8.tuned_config(block)


def _table_file(path, device, entries, w8a8=None):
  t = {"meta": {"device": device}, "entries": entries}
  if w8a8 is not None:
    t["w8a8"] = w8a8
  path.write_text(json.dumps(t))


def test_device_tables_named_and_overlaid(tmp_path):
  h100 = "NVIDIA H100 80GB HBM3"
  assert wo.table_filename(wo.DEFAULT_TABLE_DEVICE) == "gpu_tuned_configs.json"
  assert wo.table_filename(h100) == "gpu_tuned_configs.nvidia_h100_80gb_hbm3.json"
  with pytest.raises(ValueError, match="no letters or digits"):
    wo.table_filename("--")
  cfg = [64, 256, 8, 4, 2, False, False]
  _table_file(tmp_path / "gpu_tuned_configs.json", wo.DEFAULT_TABLE_DEVICE, {
      "int4_g128": {"k8k_n8k": {"1": _entry(True, cfg), "16": _entry(True, cfg)}},
      "int8_pc": {"k8k_n8k": {"1": _entry(True, cfg)}}},
      w8a8={"fp8_pc": {"config": None, "kernel_us": 1.0}})
  # The H100's own run measured int4_g128 at M = 1 losing to XLA.
  _table_file(tmp_path / wo.table_filename(h100), h100, {
      "int4_g128": {"k8k_n8k": {"1": _entry(False, cfg)}}})
  h200_t = wo.table_for_device(wo.DEFAULT_TABLE_DEVICE, str(tmp_path))
  assert h200_t["entries"]["int4_g128"]["k8k_n8k"]["1"]["use_kernel"]
  # A device without its own file (or the CPU) reads the default table as is.
  assert wo.table_for_device("NVIDIA H20", str(tmp_path)) == h200_t
  assert wo.table_for_device(None, str(tmp_path)) == h200_t
  t = wo.table_for_device(h100, str(tmp_path))
  own = t["entries"]["int4_g128"]["k8k_n8k"]["1"]
  assert not own["use_kernel"] and "table_device" not in own
  for e in (t["entries"]["int4_g128"]["k8k_n8k"]["16"],
            t["entries"]["int8_pc"]["k8k_n8k"]["1"], t["w8a8"]["fp8_pc"]):
    assert e["table_device"] == wo.DEFAULT_TABLE_DEVICE
  assert t["meta"]["device"] == h100
  # The dispatcher follows the overlaid rows.
  wo.set_table(t)
  assert not wo.table_says_kernel(_prob())
  assert wo.table_says_kernel(_prob(m=16))
  # A file whose name and measured device disagree is refused, with the fix.
  _table_file(tmp_path / wo.table_filename(h100), wo.DEFAULT_TABLE_DEVICE, {})
  with pytest.raises(ValueError, match="measured on 'NVIDIA H200'.*regenerate"):
    wo.table_for_device(h100, str(tmp_path))


def test_bench_refine_phase_tries_the_new_options_on_the_fastest_tiling():
  # experiments/bench_kernels: the tune phase's candidates carry none of
  # session 35's options; the refine phase gives the fastest tiling every
  # combination of those that apply (cluster_reduce where K is split over a
  # portable cluster, lut_regs for E2M1, scale_words for MXFP4 / NVFP4,
  # acc_scale for int4 / int8 / fp4 in groups of 64 or 128).
  from experiments import bench_kernels  # pylint: disable=g-import-not-at-top
  prob = MatmulProblem(m=1, n=8192, k=8192, x_dtype="bfloat16",
                       w_format="mxfp4", w_block=32)
  tuned = bench_kernels.candidates(wo, prob, tune=True)
  assert not any(c.cluster_reduce or c.scale_words or c.lut_regs for c in tuned)
  best = wo.Config(64, 256, 8, 4, 4, fast_decode=True)
  got = bench_kernels.refine_candidates(wo, prob, best)
  # seven combinations, and the four with cluster_reduce again a stage fewer
  # (a cluster is resident whole or not at all: more CTAs an SM)
  assert len(got) == 11 and len(set(got)) == 11 and best not in got
  assert sorted(c.stages for c in got if c.cluster_reduce) == [3] * 4 + [4] * 4
  assert all(c.cluster_reduce for c in got if c.stages == 3)
  assert all(wo._shape_ok(prob, c) for c in got)  # pylint: disable=protected-access
  assert all(c.lut_decode for c in got if c.lut_regs)
  assert dataclasses.replace(best, cluster_reduce=True, scale_words=True,
                             lut_decode=True, lut_regs=True) in got
  # int4 in groups of 32: only the cluster reduction, and none without a K
  # split
  int4 = dataclasses.replace(prob, w_format="int4", w_block=32)
  assert bench_kernels.refine_candidates(wo, int4, best) == [
      dataclasses.replace(best, cluster_reduce=True),
      dataclasses.replace(best, cluster_reduce=True, stages=3)]
  # a table row that already clusters (session 36's H100 rows) gets its twin
  clustered = dataclasses.replace(best, cluster_reduce=True)
  assert bench_kernels.refine_candidates(wo, int4, clustered) == [
      dataclasses.replace(clustered, stages=3)]
  two = dataclasses.replace(best, stages=2)
  assert bench_kernels.refine_candidates(wo, int4, two) == [
      dataclasses.replace(two, cluster_reduce=True)]
  assert bench_kernels.refine_candidates(
      wo, int4, dataclasses.replace(best, split_k=1)) == []
  # in groups of 128 also acc_scale (session 43), with the K chunks it needs
  # (one a group), alone and with the cluster
  g128 = dataclasses.replace(prob, w_format="int4", w_block=128)
  acc = dataclasses.replace(best, acc_scale=True, k_chunks=2)
  assert bench_kernels.refine_candidates(wo, g128, best) == [
      clustered, acc, dataclasses.replace(acc, cluster_reduce=True),
      dataclasses.replace(clustered, stages=3),
      dataclasses.replace(acc, cluster_reduce=True, stages=3)]
  assert bench_kernels.refine_candidates(
      wo, g128, dataclasses.replace(best, split_k=1)) == [
          dataclasses.replace(acc, split_k=1)]
  # a warp-specialized best gets none of it
  assert not any(c.acc_scale for c in bench_kernels.refine_candidates(
      wo, g128, dataclasses.replace(best, ws=True, tile_k=512)))
