"""The Mosaic GPU kernels' inline PTX, on the CPU.

Every block assembles for sm_90a: the kernels are lowered for CUDA and
``experiments/ptx_check.py`` reads each ``llvm.inline_asm`` out of the Mosaic
GPU module and runs ``ptxas`` on a one-block kernel of it (skipped where no
``ptxas`` is installed, the CUDA toolkit). The decode blocks compute the
exact values: its PTX emulator runs them on every code. The SASS counts of
``experiments/scale_words_sass.py`` and ``decode_sass.py`` need ``nvdisasm``
as well.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from experiments import ptx_check
from lowbit_jax.kernels import gpu_quantize as gq
from lowbit_jax.kernels import gpu_w8a8
from lowbit_jax.kernels import gpu_weight_only as wo
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem
from tests.kernels._gpu_operands import abstract_wo

PTXAS = ptx_check.find_ptxas()
NVDISASM = ptx_check.find_nvdisasm()
needs_ptxas = pytest.mark.skipif(PTXAS is None, reason="no ptxas (CUDA toolkit)")


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _lower(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _assert_assembles(lowered, min_blocks=1):
  rows = ptx_check.check_lowered(lowered, PTXAS)
  assert len(rows) >= min_blocks
  bad = [(b.asm, b.constraints, msg) for b, ok, msg in rows if not ok]
  assert not bad, bad
  return rows


def _wo_lowered(fmt, group, m, cfg, order="natural", n=1024, k=4096):
  ops, prob = abstract_wo(fmt, group, m, n, k)
  prob = dataclasses.replace(prob, w_order=order)
  assert wo._shape_ok(prob, cfg)  # pylint: disable=protected-access
  return _lower(lambda o: wo.matmul(o, prob, config=cfg), ops)


_C = wo.Config


# CI runs every other case, the first, third, ... (tests/conftest.py's
# SLOW_EVERY_OTHER): of those, the ninth and eleventh (MXFP4 with all three
# options, NVFP4 n_split with lut_regs and scale_words) cover the options
# together, the thirteenth the "wgmma_e2m1" decode with clusters, the
# fifteenth the "wgmma_int4" decode.
@needs_ptxas
@pytest.mark.parametrize("fmt,group,m,cfg,order", [
    ("int4", None, 1, _C(64, 256, 8, 4, 4, cluster_reduce=True), "natural"),
    ("int4", 128, 16, _C(64, 256, 16, 4, 2, k_chunks=2), "wgmma"),
    ("int8", None, 1, _C(64, 256, 8, 4, 8, cluster_reduce=True), "natural"),
    ("fp4_e2m1", 32, 1, _C(64, 256, 8, 4, 2, fast_decode=True), "natural"),
    ("mxfp4", 32, 1, _C(64, 256, 8, 4, 4, lut_decode=True,
                       cluster_reduce=True), "wgmma"),
    ("nvfp4", 16, 16, _C(64, 256, 16, 4, 2, fast_decode=True, lut_decode=True),
     "natural"),
    ("nvfp4", 16, 1, _C(128, 256, 8, 4, 2, ws=True, n_split=True,
                        fast_decode=True), "wgmma"),
    ("mxfp4", 32, 16, _C(64, 256, 16, 4, 2, lut_decode=True, scale_words=True),
     "wgmma"),
    ("mxfp4", 32, 1, _C(64, 256, 8, 4, 4, lut_decode=True, lut_regs=True,
                        scale_words=True, cluster_reduce=True), "wgmma"),
    ("nvfp4", 16, 1, _C(64, 256, 8, 4, 4, fast_decode=True, lut_decode=True,
                        cluster_reduce=True, scale_words=True), "natural"),
    ("nvfp4", 16, 16, _C(128, 256, 16, 4, 2, ws=True, n_split=True,
                         fast_decode=True, lut_decode=True, lut_regs=True,
                         scale_words=True), "natural"),
    ("fp4_e2m1", 32, 16, _C(64, 256, 16, 4, 2), "wgmma_e2m1"),
    ("mxfp4", 32, 1, _C(64, 256, 8, 4, 4, scale_words=True,
                        cluster_reduce=True), "wgmma_e2m1"),
    ("int4", None, 1, _C(64, 256, 8, 4, 2), "wgmma_int4"),
    ("int4", 128, 16, _C(64, 256, 16, 4, 2, k_chunks=2), "wgmma_int4"),
])
def test_weight_only_inline_ptx_assembles(fmt, group, m, cfg, order):
  rows = _assert_assembles(_wo_lowered(fmt, group, m, cfg, order))
  text = "\n".join(b.asm for b, _, _ in rows)
  assert "wgmma.mma_async" in text  # Mosaic GPU's own blocks are checked too
  if cfg.cluster_reduce:
    assert wo.cluster_sum_ptx(cfg.split_k) in text
  if fmt in ("fp4_e2m1", "mxfp4", "nvfp4") and (cfg.fast_decode or
                                                cfg.lut_decode):
    assert "prmt.b32" in text
  if order in ("wgmma_e2m1", "wgmma_int4"):
    block = wo.e2m1_split_ptx if order == "wgmma_e2m1" else wo.int4_split_ptx
    for part in range(4):
      assert block(part) in text
  if fmt == "nvfp4" and cfg.fast_decode:
    assert "cvt.rn.f16x2.e4m3x2" in text
  if cfg.scale_words:
    assert wo.scale_word_ptx({"mxfp4": "e8m0", "nvfp4": "e4m3"}[fmt]) in text
  if cfg.lut_regs:
    assert wo._E2M1_LUT_IDX_REGS_PTX in text  # pylint: disable=protected-access
    assert "mov.b32 tl," not in text  # no table word as a constant


@needs_ptxas
@pytest.mark.parametrize("kind,cfg", [
    ("int8_pc", None), ("nvfp4", None),
    ("int4_pc", gq.Config(tile_n=128, tile_k=64, k_per_cta=1024, stages=4,
                          unroll=True, one_pass=4, warpgroups=2))])
def test_quantizer_inline_ptx_assembles(kind, cfg):
  x = _sds((4096, 256), jnp.bfloat16)
  if cfg is None:
    cfg = gq.default_config(kind, 4096, 256, jnp.bfloat16)
  rows = _assert_assembles(
      _lower(lambda a: gq.quantize(a, gq.spec_for(kind), config=cfg), x))
  text = "\n".join(b.asm for b, _, _ in rows)
  if cfg.one_pass > 1:
    assert "ld.shared::cluster.f32" in text


@needs_ptxas
@pytest.mark.parametrize("case", ["fp8_block", "mxfp8"])
def test_w8a8_inline_ptx_assembles(case):
  m, n, k = 256, 512, 1024
  if case == "mxfp8":
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype="fp8_e4m3",
                         w_format="mxfp8_e4m3", x_format="mxfp8_e4m3")
    sx, sw, sdt = (m, k // 32), (n, k // 32), jnp.uint8
  else:
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype="fp8_e4m3",
                         w_format="fp8_e4m3", x_format="fp8_e4m3",
                         w_block=(128, 128), x_block=128)
    sx, sw, sdt = (m, k // 128), (n // 128, k // 128), jnp.float32
  code = jnp.float8_e4m3fn
  ops = MatmulOperands(x=_sds((m, k), code), w_codes=_sds((n, k), code),
                       w_scale=_sds(sw, sdt), x_scale=_sds(sx, sdt))
  _assert_assembles(_lower(lambda o: gpu_w8a8.matmul(o, prob), ops))


@needs_ptxas
def test_a_wrong_block_is_rejected():
  # The check is not vacuous: a misspelt state space and an operand of the
  # wrong width are both refused, with ptxas' message.
  good = ptx_check.AsmBlock(wo.cluster_sum_ptx(2), "=&f,=&f,r")
  ok, _ = ptx_check.assemble(ptx_check.probe_kernel(good), PTXAS)
  assert ok
  typo = dataclasses.replace(good, asm=good.asm.replace("shared::cluster.v2",
                                                        "shared::clustr.v2"))
  ok, msg = ptx_check.assemble(ptx_check.probe_kernel(typo), PTXAS)
  assert not ok and "clustr" in msg
  wide = ptx_check.AsmBlock("add.f32 $0, $1, $2;", "=l,l,l")
  ok, msg = ptx_check.assemble(ptx_check.probe_kernel(wide), PTXAS)
  assert not ok and msg


def test_probe_kernel_binds_operands_by_constraint():
  block = ptx_check.AsmBlock(
      "{ .reg .pred p; setp.ne.b32 p, $3, 0; mov.b32 $0, $2; $$x; }",
      "=r,=f,r,n,0,~{memory}", immediates=((1, 7),))
  ptx = ptx_check.probe_kernel(block)
  assert ".reg .b32 %o0;" in ptx and ".reg .f32 %o1;" in ptx
  assert "setp.ne.b32 p, 7, 0; mov.b32 %o0, %i0; $x;" in ptx
  with pytest.raises(ValueError, match="uses \\$5"):
    ptx_check.probe_kernel(ptx_check.AsmBlock("mov.b32 $0, $5;", "=r,r"))
  with pytest.raises(ValueError, match="no constant value"):
    ptx_check.probe_kernel(ptx_check.AsmBlock("mov.b32 $0, $1;", "=r,n"))


@pytest.mark.parametrize("kind", ["e8m0", "e4m3"])
def test_scale_word_blocks_convert_every_code_in_every_byte(kind):
  # Config.scale_words' blocks, run by the emulator on the PTX text itself:
  # each of the four scales of a word becomes its bf16 in both lanes, for all
  # 256 codes in every byte position (E8M0's 0 and 255, E4M3's subnormals
  # and NaN included), whatever the other three bytes hold.
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import _gpu_common as common  # pylint: disable=g-import-not-at-top
  codes = np.arange(256, dtype=np.uint8)
  if kind == "e8m0":
    want = np.asarray(common.bf16_from_e8m0(jnp.asarray(codes)))
  else:
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(ml_dtypes.bfloat16)
  want = want.view(np.uint16)
  ptx = wo.scale_word_ptx(kind)
  rng = np.random.default_rng(0)
  for pos in range(4):
    for c in range(256):
      other = rng.integers(0, 256, 4, dtype=np.uint8)
      other[pos] = c
      word = int.from_bytes(other.tobytes(), "little")
      outs = ptx_check.emulate(ptx, [0x80], 4, smem={0x80: word})
      for i, o in enumerate(outs):
        w = int(want[other[i]])
        lanes = (o & 0xFFFF, o >> 16)
        if kind == "e4m3" and other[i] & 0x7F == 0x7F:  # NaN: any NaN bits
          assert all((v & 0x7F80) == 0x7F80 and v & 0x7F for v in lanes)
        else:
          assert lanes == (w, w), (kind, pos, c, i, hex(o), hex(w))


def test_emulator_runs_the_e2m1_table_decode_exactly():
  # The emulator on the kernels' shipped LUT decode blocks: every 16-bit
  # group of four codes gives the exact E2M1 values (the tables' own check
  # at import time covers the constants, this the PTX text).
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import _gpu_common as common  # pylint: disable=g-import-not-at-top
  u_lo, u_hi, t_lo, t_hi = wo._e2m1_lut_tables()  # pylint: disable=protected-access
  idx = wo._E2M1_LUT_IDX_PTX.format(u_lo=hex(u_lo), u_hi=hex(u_hi))  # pylint: disable=protected-access
  val = wo._E2M1_LUT_PTX.format(t_lo=hex(t_lo), t_hi=hex(t_hi))  # pylint: disable=protected-access
  table = np.array([v * s for s in (1, -1) for v in common.E2M1_VALUES],
                   ml_dtypes.bfloat16).view(np.uint16)
  for w16 in range(0, 1 << 16, 7):
    sel, = ptx_check.emulate(idx, [w16 & 0x7777, w16], 1)
    for pair in range(2):
      bits, = ptx_check.emulate(val, [sel >> (16 * pair)], 1)
      byte = (w16 >> (8 * pair)) & 0xFF
      assert (bits & 0xFFFF, bits >> 16) == (table[byte & 15], table[byte >> 4])


@pytest.mark.parametrize("order", ["wgmma_e2m1", "wgmma_int4"])
def test_emulator_runs_the_split_order_decodes_exactly(order):
  # The split orders' decode blocks (wgmma_e2m1: rotate, mask, multiply by
  # 2**126; wgmma_int4: shift, mask and magic number, subtract) on words of
  # codes in that order: every code of every pair and lane gives its exact
  # value (E2M1's 0.5 through the bf16 subnormal), every byte value in every
  # position of a word.
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import _qarray  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import _gpu_common as common  # pylint: disable=g-import-not-at-top
  if order == "wgmma_e2m1":
    values = [v * s for s in (1, -1) for v in common.E2M1_VALUES]
    block = wo.e2m1_split_ptx
  else:
    values = [c - 16 * (c > 7) for c in range(16)]  # two's complement
    block = wo.int4_split_ptx
  table = np.array(values, ml_dtypes.bfloat16).view(np.uint16)
  wg = np.random.default_rng(0).integers(0, 256, (384, 4), np.uint8)
  wg[:256] = np.arange(256)[:, None]
  sp = np.asarray(_qarray.split_bits(jnp.asarray(wg.reshape(1, -1)), order))
  sp = sp.reshape(-1, 4).astype(np.uint32)
  words = sp[:, 0] | sp[:, 1] << 8 | sp[:, 2] << 16 | sp[:, 3] << 24
  for row, q in enumerate(words):
    for part in range(4):
      bits, = ptx_check.emulate(block(part), [int(q)], 1)
      byte = int(wg[row, part])
      assert (bits & 0xFFFF, bits >> 16) == (table[byte & 15], table[byte >> 4])


def test_emulator_refuses_what_it_does_not_know():
  with pytest.raises(NotImplementedError, match="fma.rn.f32"):
    ptx_check.emulate("fma.rn.f32 $0, $1, $2, $3;", [1, 2, 3], 1)
  with pytest.raises(KeyError, match="not in smem"):
    ptx_check.emulate("ld.shared.b32 $0, [$1];", [4], 1, smem={})


@needs_ptxas
@pytest.mark.skipif(NVDISASM is None,
                    reason="no nvdisasm (pip install nvidia-cuda-nvdisasm)")
def test_scale_words_take_fewer_sass_instructions():
  # experiments/scale_words_sass: the word blocks against the per-scale
  # paths, counted in ptxas' SASS for sm_90a (one shared-memory load for
  # four scales instead of four).
  from experiments import scale_words_sass  # pylint: disable=g-import-not-at-top
  rows = scale_words_sass.rows()
  got = {(k, p.split()[0]): h for k, p, h in rows}
  for kind in ("e8m0", "e4m3"):
    word, per = got[(kind, "word")], got[(kind, "per")]
    assert word["LDS"] == 1 and per["LDS"] == 4
    assert sum(word.values()) < sum(per.values())
  assert sum(got[("e8m0", "word")].values()) <= 14
  text = scale_words_sass.report(rows)
  assert "| e8m0 | word (scale_words) |" in text


def test_table_blocks_with_register_tables_match_the_constant_ones():
  # Config.lut_regs' blocks take the table words as operands: given
  # lut_table_words() they give the constant blocks' bits on every group of
  # four codes.
  u_lo, u_hi, t_lo, t_hi = wo._e2m1_lut_tables()  # pylint: disable=protected-access
  idx = wo._E2M1_LUT_IDX_PTX.format(u_lo=hex(u_lo), u_hi=hex(u_hi))  # pylint: disable=protected-access
  val = wo._E2M1_LUT_PTX.format(t_lo=hex(t_lo), t_hi=hex(t_hi))  # pylint: disable=protected-access
  k, ul, uh, tl, th = wo.lut_table_words()
  assert (ul, uh, tl, th) == (u_lo, u_hi, t_lo, t_hi)
  for w16 in range(0, 1 << 16, 5):
    sel, = ptx_check.emulate(idx, [w16 & 0x7777, w16], 1)
    sel_r, = ptx_check.emulate(wo._E2M1_LUT_IDX_REGS_PTX,  # pylint: disable=protected-access
                               [w16 & 0x7777, w16, k, ul, uh], 1)
    assert sel_r == sel
    for part in range(2):
      a, = ptx_check.emulate(val, [sel >> (16 * part)], 1)
      b, = ptx_check.emulate(wo._E2M1_LUT_REGS_PTX, [sel >> (16 * part), tl, th],  # pylint: disable=protected-access
                             1)
      assert a == b


@needs_ptxas
@pytest.mark.skipif(NVDISASM is None,
                    reason="no nvdisasm (pip install nvidia-cuda-nvdisasm)")
def test_decode_step_estimate_counts_the_table_rebuilds():
  # experiments/decode_sass: the table decode with its tables in registers
  # loses the IMADs that rebuild them (0.74 an element in the estimate, 0.70
  # in the Nsight listing of the kernel), and with the scale words the MXFP4
  # step drops by a fifth or more.
  # The split code orders: "wgmma_int4" drops int4's byte permutes,
  # "wgmma_e2m1" cuts MXFP4's integer (ALU-pipe) instructions by a third.
  from experiments import decode_sass  # pylint: disable=g-import-not-at-top
  names = ("mxfp4 (table)", "mxfp4 (table, lut_regs)",
           "mxfp4 (table, lut_regs, scale_words)", "int4_pc", "int4_g128",
           "int4_pc (wgmma_int4)", "mxfp4 (wgmma_e2m1, scale_words)",
           "int4_g128 (acc_scale)")
  got = {name: (sum(h.values()) / decode_sass.ELEMENTS, h)
         for name, h in decode_sass.rows(names)}
  table, hist = got["mxfp4 (table)"]
  regs, rhist = got["mxfp4 (table, lut_regs)"]
  both, bhist = got["mxfp4 (table, lut_regs, scale_words)"]
  assert hist["IMAD"] / decode_sass.ELEMENTS > 0.5
  assert rhist.get("IMAD", 0) / decode_sass.ELEMENTS < 0.25
  assert regs < table and both < 0.8 * table
  assert got["int4_pc"][0] < got["int4_g128"][0] < table
  i4, i4hist = got["int4_pc (wgmma_int4)"]
  assert i4 < 0.9 * got["int4_pc"][0] and "PRMT" not in i4hist
  alu = lambda h: sum(h.get(op, 0) for op in ("PRMT", "LOP3", "SHF"))  # noqa: E731
  sp, sphist = got["mxfp4 (wgmma_e2m1, scale_words)"]
  assert sp < both and alu(sphist) < 0.7 * alu(bhist)
  # Config.acc_scale: int4 g128 without the weight multiply (HMUL2), its
  # promotion (FFMA) about a tenth of an instruction an element.
  acc, ahist = got["int4_g128 (acc_scale)"]
  assert "HMUL2" not in ahist and 0 < ahist["FFMA"] / decode_sass.ELEMENTS < 0.1
  assert acc < got["int4_g128"][0] - 0.35


def test_emulator_runs_the_shipped_e4m3_scale_conversion_exactly():
  # _E4M3_PTX (fast_decode's NVFP4 scale, one byte in a 16-bit register):
  # the float32 of every E4M3 code, NaN for 0x7F and 0xFF.
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  codes = np.arange(256, dtype=np.uint8)
  want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  for c in range(256):
    bits, = ptx_check.emulate(wo._E4M3_PTX, [c], 1)  # pylint: disable=protected-access
    got = np.array(bits, np.uint32).view(np.float32)
    if np.isnan(want[c]):
      assert np.isnan(got)
    else:
      assert got == want[c] and np.signbit(got) == np.signbit(want[c]), c
