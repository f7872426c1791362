"""GPU tests of the Mosaic GPU low-bit kernels against their references.

Every check draws fresh random inputs (never zeros), frees a NaN buffer of the
output's size right before the kernel runs (so an unwritten element shows up as
NaN or a large error), and compares with the module's ``reference``. Needs a
Hopper GPU (sm_90); skipped elsewhere (tests/conftest.py skips ``gpu`` tests
without a GPU backend, and the fixture below skips non-Hopper GPUs).
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.core._qarray import to_code_order
from lowbit_jax.kernels import gpu_w8a8
from lowbit_jax.kernels import gpu_weight_only
from lowbit_jax.kernels._api import MatmulProblem
from tests.kernels._gpu_operands import make_w8, make_wo, np_weight_only, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_hopper():
  dev = jax.devices()[0]
  if not str(getattr(dev, "compute_capability", "")).startswith("9."):
    pytest.skip("Mosaic GPU kernels here target Hopper (sm_90)")


def _key():
  return jax.random.key(time.time_ns() % (2 ** 31))


def _run_poisoned(fn, ops, shape, dtype):
  poison = jnp.full(shape, jnp.nan, dtype)
  poison.block_until_ready()
  poison.delete()
  return jax.block_until_ready(jax.jit(fn)(ops))


def _unit_activations(m, k):
  """Row i is the unit vector e_{k_i}, the 16 first K positions covering all
  8 nibble positions of a 32-bit code word (and two 256-column steps)."""
  cols = np.array([i * 8 + (i % 8) + 256 * (i // 8) for i in range(m)])
  x = np.zeros((m, k), np.float32)
  x[np.arange(m), cols] = 1.0
  return jnp.asarray(x, jnp.bfloat16)


def _wo_ops(fmt, group, m, n, k):
  return make_wo(_key(), fmt, group, m, n, k, out_dtype="bfloat16",
                 scale_range=(0.001, 0.02))


WO_CASES = [("int4", 128), ("int4", 32), ("int4", None), ("int8", None),
            ("int8", 128), ("fp4_e2m1", 32), ("mxfp4", 32), ("nvfp4", 16)]


@pytest.mark.parametrize("fmt,group", WO_CASES)
@pytest.mark.parametrize("m,n,k", [(1, 1024, 2048), (5, 2048, 4096),
                                   (16, 4096, 8192)])
def test_weight_only_kernel_matches_reference(fmt, group, m, n, k):
  ops, prob = _wo_ops(fmt, group, m, n, k)
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob), ops, (m, n),
                      jnp.bfloat16)
  ref = gpu_weight_only.reference(ops, prob)
  assert out.shape == (m, n) and out.dtype == jnp.bfloat16
  assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("ws", [False, True])
def test_weight_only_kernel_real_shape(ws):
  ops, prob = _wo_ops("int4", 128, 16, 8192, 8192)
  cfg = gpu_weight_only.Config(tile_n=64, tile_k=512 if ws else 256, tile_m=16,
                               stages=4, split_k=1 if ws else 2, ws=ws)
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob, config=cfg),
                      ops, (16, 8192), jnp.bfloat16)
  assert rel_err(out, gpu_weight_only.reference(ops, prob)) < 1e-2


@pytest.mark.parametrize("fmt,group", [("int4", None), ("int4", 128),
                                       ("int8", None), ("fp4_e2m1", 32),
                                       ("mxfp4", 32), ("nvfp4", 16)])
@pytest.mark.parametrize("m,tile_n,tile_m,tile_k", [(1, 128, 8, 256),
                                                    (16, 256, 16, 256),
                                                    (256, 128, 128, 128),
                                                    (256, 128, 256, 128)])
def test_weight_only_n_split_matches_reference(fmt, group, m, tile_n, tile_m,
                                               tile_k):
  # Config(ws=True, n_split=True): two compute warpgroups, each its half of
  # the CTA's weight rows; decode and M = 256 (two M tiles of 128).
  n, k = 2048, 4096
  ops, prob = _wo_ops(fmt, group, m, n, k)
  cfg = gpu_weight_only.Config(tile_n=tile_n, tile_k=tile_k, tile_m=tile_m,
                               stages=2 if tile_m == 256 else 3, split_k=1,
                               ws=True, n_split=True)
  assert gpu_weight_only._shape_ok(prob, cfg)  # pylint: disable=protected-access
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob, config=cfg),
                      ops, (m, n), jnp.bfloat16)
  assert rel_err(out, gpu_weight_only.reference(ops, prob)) < 1e-2


@pytest.mark.parametrize("fmt,group", [("fp4_e2m1", 32), ("mxfp4", 32),
                                       ("nvfp4", 16), ("fp4_e2m1", None)])
@pytest.mark.parametrize("m,n,k", [(1, 1024, 2048), (16, 4096, 8192)])
@pytest.mark.parametrize("decode", ["fast", "lut", "lut+fast"])
def test_weight_only_fast_decode_matches_reference(fmt, group, m, n, k, decode):
  # The byte-permute E2M1 decode and the hardware E4M3 scale conversion
  # (Config.fast_decode), the table-lookup decode (Config.lut_decode), on
  # every E4M3 scale code but NaN (subnormals too).
  ops, prob = _wo_ops(fmt, group, m, n, k)
  if fmt == "nvfp4":
    codes = jax.random.randint(_key(), ops.w_scale.shape, 1, 0x7F).astype(
        jnp.uint8)
    ops = dataclasses.replace(ops, w_scale=jax.lax.bitcast_convert_type(
        codes, jnp.float8_e4m3fn))
  cfg = dataclasses.replace(gpu_weight_only._decode_config(prob),  # pylint: disable=protected-access
                            fast_decode="fast" in decode,
                            lut_decode="lut" in decode)
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob, config=cfg),
                      ops, (m, n), jnp.bfloat16)
  assert rel_err(out, gpu_weight_only.reference(ops, prob)) < 1e-2


@pytest.mark.parametrize("fmt,group", [("fp4_e2m1", 32), ("fp4_e2m1", None),
                                       ("mxfp4", 32)])
@pytest.mark.parametrize("decode", ["bits", "fast", "lut"])
def test_weight_only_e2m1_decode_is_exact_on_unit_activations(fmt, group,
                                                              decode):
  # Row i of x is the unit vector e_{k_i}: y[i, :] is column k_i of the
  # dequantized weight times its scale, one product rounded once to bf16 on
  # both sides, so every decoded code is checked element by element (16 K
  # positions covering all 8 nibble positions of a 32-bit code word).
  m, n, k = 16, 1024, 2048
  ops, prob = _wo_ops(fmt, group, m, n, k)
  ops = dataclasses.replace(ops, x=_unit_activations(m, k))
  cfg = dataclasses.replace(gpu_weight_only._decode_config(prob),  # pylint: disable=protected-access
                            fast_decode=decode == "fast",
                            lut_decode=decode == "lut")
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob, config=cfg),
                      ops, (m, n), jnp.bfloat16)
  want = gpu_weight_only.reference(ops, prob)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want, np.float32), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("fmt,group", WO_CASES)
@pytest.mark.parametrize("m,n,k", [(1, 1024, 2048), (16, 4096, 8192)])
def test_weight_only_k_chunks_matches_reference(fmt, group, m, n, k):
  # Each K step decoded and multiplied in two column chunks, the first
  # chunk's asynchronous WGMMA reading its registers while the second is
  # decoded (Config.k_chunks; ptxas must keep them apart); with fast_decode
  # for E2M1 weights.
  ops, prob = _wo_ops(fmt, group, m, n, k)
  cfg = dataclasses.replace(gpu_weight_only._decode_config(prob), k_chunks=2,  # pylint: disable=protected-access
                            fast_decode=fmt in ("fp4_e2m1", "mxfp4", "nvfp4"))
  assert gpu_weight_only._shape_ok(prob, cfg)  # pylint: disable=protected-access
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob, config=cfg),
                      ops, (m, n), jnp.bfloat16)
  assert rel_err(out, gpu_weight_only.reference(ops, prob)) < 1e-2


def _two_tilings(ops, prob, cfg, base):
  """``(unit, out with cfg, out with base, operands)`` as float32 arrays, on
  the operands' activations and, where M >= 16, on unit activations."""
  m, n, k = prob.m, prob.n, prob.k
  for xs in (ops.x, _unit_activations(m, k) if m >= 16 else None):
    if xs is None:
      continue
    o = dataclasses.replace(ops, x=xs)
    got, want = (_run_poisoned(
        lambda a, c=c: gpu_weight_only.matmul(a, prob, config=c), o, (m, n),
        jnp.bfloat16) for c in (cfg, base))
    yield (xs is not ops.x, np.asarray(got, np.float32),
           np.asarray(want, np.float32), o)


@pytest.mark.parametrize("fmt,group", WO_CASES)
@pytest.mark.parametrize("m,n,k,split", [(1, 1024, 2048, 2), (1, 8192, 8192, 4),
                                         (16, 4096, 8192, 8), (64, 1024, 8192, 4)])
def test_weight_only_cluster_reduce_matches_split_partials(fmt, group, m, n, k,
                                                           split):
  # Config.cluster_reduce: the K slices of a tile are one cluster and sum
  # their partials through distributed shared memory in rank order; the
  # kernel writes the output itself. Against the same tiling whose float32
  # partials XLA sums, and against the reference; on unit activations (each
  # output one product, so every slice but one adds zeros) bit for bit.
  ops, prob = _wo_ops(fmt, group, m, n, k)
  base = dataclasses.replace(gpu_weight_only._decode_config(prob),  # pylint: disable=protected-access
                             split_k=split, ws=False, n_split=False)
  cfg = dataclasses.replace(base, cluster_reduce=True)
  if not gpu_weight_only._shape_ok(prob, cfg):  # pylint: disable=protected-access
    pytest.skip(f"{cfg} does not tile {prob}")
  for unit, got, want, o in _two_tilings(ops, prob, cfg, base):
    assert rel_err(got, gpu_weight_only.reference(o, prob)) < 1e-2
    if unit:
      np.testing.assert_array_equal(got, want)
    else:
      assert rel_err(got, want) < 1e-2


def _special_e8m0_scales(ops):
  """MXFP4 operands whose first four rows hold the E8M0 scale codes 0
  (2**-127), 1, 254 and 255 (NaN) in every byte position of a 32-bit word."""
  s = np.array(ops.w_scale)
  special = np.array([0, 1, 254, 255], np.uint8)
  for r in range(4):
    s[r, :4 * 4] = np.roll(np.tile(special, 4), r)
  return dataclasses.replace(ops, w_scale=jnp.asarray(s))


@pytest.mark.parametrize("fmt,group", [("mxfp4", 32), ("nvfp4", 16)])
@pytest.mark.parametrize("m,n,k,tile_k,chunks", [(1, 1024, 2048, 256, 1),
                                                 (16, 4096, 8192, 256, 2),
                                                 (64, 1024, 4096, 128, 1)])
@pytest.mark.parametrize("variant", ["scale_words", "lut_regs", "both"])
def test_weight_only_scale_words_are_bit_identical(fmt, group, m, n, k, tile_k,
                                                   chunks, variant):
  # Config.scale_words reads a row's group scales four at a time and converts
  # them in one PTX block; every scale must be the same bf16 as the per-scale
  # path's, so the outputs are the same bits. The MXFP4 scales include the
  # E8M0 codes 0 (2**-127), 1, 254 and 255 (NaN) in every byte position of
  # a word (rows whose outputs then hold NaN or huge values on both sides).
  # Config.lut_regs reads the lookup tables from shared memory: the same
  # decoded values.
  ops, prob = _wo_ops(fmt, group, m, n, k)
  if fmt == "mxfp4":
    ops = _special_e8m0_scales(ops)
  base = dataclasses.replace(gpu_weight_only._decode_config(prob),  # pylint: disable=protected-access
                             tile_k=tile_k, k_chunks=chunks, fast_decode=True,
                             lut_decode=True)
  cfg = dataclasses.replace(base, scale_words=variant != "lut_regs",
                            lut_regs=variant != "scale_words")
  assert gpu_weight_only._shape_ok(prob, cfg)  # pylint: disable=protected-access
  for _, got, want, _ in _two_tilings(ops, prob, cfg, base):
    np.testing.assert_array_equal(got, want)


def _same_bits_in_two_orders(ops, prob, first, second):
  """Runs the kernel on ``ops``'s codes in each ``(config, code order)``,
  with unit activations on 16 K positions (every nibble of a code word,
  element by element) and with ``ops.x``; asserts the same bits each time.
  Returns the second's output on ``ops.x``."""
  m, n, k = prob.m, prob.n, prob.k
  outs = []
  for xs in (_unit_activations(m, k), ops.x):
    outs = []
    for cfg, order in (first, second):
      o = dataclasses.replace(ops, x=xs,
                              w_codes=to_code_order(ops.w_codes, order))
      pr = dataclasses.replace(prob, w_order=order)
      outs.append(_run_poisoned(
          lambda a, pr=pr, cfg=cfg: gpu_weight_only.matmul(a, pr, config=cfg),
          o, (m, n), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(outs[1], np.float32),
                                  np.asarray(outs[0], np.float32))
  return outs[1]


_FOUR_BIT = [("int4", 128), ("int4", 32), ("int4", None), ("fp4_e2m1", 32),
             ("mxfp4", 32), ("nvfp4", 16)]


@pytest.mark.parametrize("fmt,group", _FOUR_BIT)
@pytest.mark.parametrize("variant", ["decode", "chunks", "nsplit", "lut"])
def test_weight_only_wgmma_order_is_bit_identical(fmt, group, variant):
  # Codes stored in the "wgmma" order are read without the register relayout:
  # byte i of a thread's word must be the register of column tile i, or the
  # products land on the wrong activations. Unit activations on 16 K
  # positions covering every nibble of a word check it element by element;
  # the same tiling on natural codes must give the same bits.
  m, n, k = 16, 1024, 2048
  ops, prob = _wo_ops(fmt, group, m, n, k)
  cfg = gpu_weight_only._decode_config(prob)  # pylint: disable=protected-access
  e2m1 = fmt != "int4"
  if variant == "chunks":
    cfg = dataclasses.replace(cfg, k_chunks=2)
  elif variant == "nsplit":
    cfg = dataclasses.replace(cfg, ws=True, n_split=True, tile_n=128)
  elif variant == "lut":
    if not e2m1:
      pytest.skip("lut_decode is an E2M1 decode")
    cfg = dataclasses.replace(cfg, lut_decode=True, fast_decode=True)
  assert gpu_weight_only._shape_ok(prob, cfg)  # pylint: disable=protected-access
  b = _same_bits_in_two_orders(ops, prob, (cfg, "natural"), (cfg, "wgmma"))
  assert rel_err(b, gpu_weight_only.reference(ops, prob)) < 1e-2


@pytest.mark.parametrize("fmt,group", [("fp4_e2m1", 32), ("mxfp4", 32),
                                       ("nvfp4", 16), ("int4", None),
                                       ("int4", 128), ("int4", 32)])
@pytest.mark.parametrize("variant", ["decode", "chunks", "nsplit",
                                     "scale_words", "cluster"])
def test_weight_only_split_orders_are_bit_identical(fmt, group, variant):
  # E2M1 codes in the "wgmma_e2m1" order decode by rotate, mask and a
  # multiply by 2**126 (the code 0.5 through the bf16 subnormal 2**-127);
  # each must be the value the table decode gives, and the scale the same
  # multiply. int4 codes in the "wgmma_int4" order sit a shift from the
  # conversion's input. Either way the outputs are the same bits as the
  # "wgmma" order's with the same tiling. Unit activations on 16 K positions
  # check every nibble of a word; MXFP4's scales include the E8M0 codes 0,
  # 1, 254 and 255.
  m, n, k = 16, 1024, 2048
  ops, prob = _wo_ops(fmt, group, m, n, k)
  if fmt == "mxfp4":
    ops = _special_e8m0_scales(ops)
  cfg = gpu_weight_only._decode_config(prob)  # pylint: disable=protected-access
  if variant == "chunks":
    cfg = dataclasses.replace(cfg, k_chunks=2)
  elif variant == "nsplit":
    cfg = dataclasses.replace(cfg, ws=True, n_split=True, tile_n=128)
  elif variant == "scale_words":
    if fmt not in ("mxfp4", "nvfp4"):
      pytest.skip("scale_words reads one-byte scales (MXFP4, NVFP4)")
    cfg = dataclasses.replace(cfg, scale_words=True, fast_decode=True)
  elif variant == "cluster":
    cfg = dataclasses.replace(cfg, split_k=2, cluster_reduce=True)
  assert gpu_weight_only._shape_ok(prob, cfg)  # pylint: disable=protected-access
  if fmt == "int4":
    first, order = cfg, "wgmma_int4"
  else:
    first = dataclasses.replace(cfg, lut_decode=True, fast_decode=True)
    order = "wgmma_e2m1"
  b = _same_bits_in_two_orders(ops, prob, (first, "wgmma"), (cfg, order))
  if fmt != "mxfp4":  # (MXFP4's special scales put NaN and inf in outputs)
    assert rel_err(b, gpu_weight_only.reference(ops, prob)) < 1e-2


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", 128),
                                       ("int8", 64), ("fp4_e2m1", 128)])
@pytest.mark.parametrize("m,n,k,split,order", [
    (1, 1024, 2048, 2, "natural"), (16, 4096, 8192, 2, "kernel"),
    (1, 8192, 8192, 4, "wgmma"), (5, 2048, 4096, 1, "kernel")])
def test_weight_only_acc_scale_matches_its_model(fmt, group, m, n, k, split,
                                                 order):
  # Config.acc_scale: each group's MMA into its own accumulator, multiplied
  # by the group's scale into the running sum. The weights stay exact, so
  # the float32 output must sit within float32 accumulation error of the
  # float64 sum (the weight-tile path is 2**-9 away: it rounds code * scale
  # to bf16); in every code order the kernel reads, with K chunks of one
  # group each (128 int4 / fp4 columns, 64 or 128 int8 ones) and with the K
  # split's partials summed after the kernel.
  ops, prob = make_wo(_key(), fmt, group, m, n, k, scale_range=(0.001, 0.02))
  model = np_weight_only(ops, prob, acc_scale=True)
  ref = gpu_weight_only.reference(ops, prob)
  if order == "kernel":
    order = gpu_weight_only.split_order_for(fmt) or (
        "wgmma" if fmt != "int8" else "natural")
  if fmt == "int8":
    order = "natural"
  ops = dataclasses.replace(ops, w_codes=to_code_order(ops.w_codes, order))
  prob = dataclasses.replace(prob, w_order=order)
  base = dataclasses.replace(gpu_weight_only._decode_config(prob),  # pylint: disable=protected-access
                             split_k=split, tile_k=256)
  cfg = gpu_weight_only.acc_scale_config(prob, base)
  assert cfg is not None and cfg.acc_scale and cfg.k_chunks == 256 // group
  out = _run_poisoned(lambda o: gpu_weight_only.matmul(o, prob, config=cfg),
                      ops, (m, n), jnp.float32)
  assert rel_err(out, model) < 2e-5
  assert rel_err(out, ref) < 2e-5


# Tuned tilings (every table beside the kernel) whose float32 group scales
# would not fit in shared memory: ``kernel_scales`` rounds them to bf16. The
# table's shape classes stand for their largest Llama-style dimension.
_CLASS_DIM = {"1k": 1024, "4k": 4096, "8k": 8192, "16k": 14336, "32k": 28672}


def _f32_scale_overflows():
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  cases = {gpu_weight_only.case_name(f, g): (f, g) for f, g in WO_CASES
           if g is not None and f not in ("mxfp4", "nvfp4")}
  found = []
  pattern = os.path.join(os.path.dirname(gpu_weight_only.TABLE_PATH),
                         "gpu_tuned_configs*.json")
  for path in sorted(glob.glob(pattern)):
    for case, classes in gpu_weight_only.load_table(path)["entries"].items():
      if case not in cases:
        continue
      fmt, group = cases[case]
      for cls, buckets in classes.items():
        k, n = (_CLASS_DIM[d[1:]] for d in cls.split("_"))
        for b, e in buckets.items():
          cfg = gpu_weight_only._config_from_json(e.get("config"))  # pylint: disable=protected-access
          prob = MatmulProblem(m=int(b), n=n, k=k, x_dtype="bfloat16",
                               w_format=fmt, w_block=group,
                               out_dtype="float32")
          if (cfg is not None and gpu_weight_only.smem_bytes(
              prob, cfg, scale_itemsize=4) > gpu_weight_only.MAX_SMEM_BYTES):
            found.append(pytest.param(prob, cfg, id=f"{os.path.basename(path)}"
                                      f"-{case}-{cls}-m{b}"))
  return found


@pytest.mark.parametrize("prob,cfg", _f32_scale_overflows())
def test_tuned_tilings_take_float32_group_scales(prob, cfg):
  # A QuantSpec's group scales are float32; these tilings were tuned with
  # bf16 ones and would need more shared memory than Hopper has with float32.
  # Through kernel_scales they compile and give the bf16-scale kernel's bits.
  ops, _ = make_wo(_key(), prob.w_format, prob.w_block, prob.m, prob.n,
                   prob.k, scale_range=(0.001, 0.02))
  f32 = dataclasses.replace(ops, w_scale=ops.w_scale.astype(jnp.float32))
  assert gpu_weight_only.kernel_scales(f32.w_scale, prob, cfg).dtype == (
      jnp.bfloat16)
  run = lambda o: gpu_weight_only.matmul(o, prob, config=cfg)  # noqa: E731
  got = _run_poisoned(run, f32, (prob.m, prob.n), jnp.float32)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(jax.jit(run)(ops)))
  assert rel_err(got, gpu_weight_only.reference(ops, prob)) < 1e-2


def _w8_ops(case, m, n, k, exact=False):
  out = "float32" if (exact and case == "mxfp8") else "bfloat16"
  return make_w8(_key(), case, m, n, k, out_dtype=out, exact=exact,
                 e8m0_range=(117, 137))


@pytest.mark.parametrize("case", ["fp8_channel", "int8_channel", "fp8_block",
                                  "int8_block", "mxfp8"])
@pytest.mark.parametrize("m,n,k", [(256, 512, 1024), (512, 1024, 2048)])
def test_w8a8_kernel_matches_reference(case, m, n, k):
  ops, prob = _w8_ops(case, m, n, k)
  out = _run_poisoned(lambda o: gpu_w8a8.matmul(o, prob), ops, (m, n),
                      jnp.bfloat16)
  assert rel_err(out, gpu_w8a8.reference(ops, prob)) < 1e-2


@pytest.mark.parametrize("sub_blocks", [1, 2, 4])
def test_mxfp8_kernel_is_bit_exact_on_exact_block_sums(sub_blocks):
  # (Config.sub_blocks: several 32-deep tiles a pipeline step.)
  ops, prob = _w8_ops("mxfp8", 256, 512, 1024, exact=True)
  cfg = dataclasses.replace(gpu_w8a8.heuristic_config(prob),
                            sub_blocks=sub_blocks,
                            stages=8 if sub_blocks == 1 else 4)
  out = _run_poisoned(lambda o: gpu_w8a8.matmul(o, prob, config=cfg), ops,
                      (256, 512), jnp.float32)
  ref = gpu_w8a8.reference(ops, prob)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_block_fp8_public_dot_takes_the_kernel():
  # The dispatcher's block-scaled fp8 path at a measured shape, from the
  # QArrays lowbit_jax.quantize makes, against the same dot without a kernel.
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from lowbit_jax import kernels  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  m, k, n = 4096, 8192, 8192
  kx, kw = jax.random.split(_key())
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
  qw = ops.prepare_weight(w, lb.QuantSpec("fp8_e4m3", tile=(128, 128)))
  qx = lb.quantize(x, lb.QuantSpec("fp8_e4m3", axis=-1, group_size=128))
  dn = (((1,), (1,)), ((), ()))
  prob, why = ops.kernel_problem(qx, qw, dn)
  assert prob is not None, why
  assert kernels.find(prob) is gpu_w8a8
  got = jax.jit(lambda a, b: ops.dot_general(a, b, dn, mode="real",
                                             use_kernel="always"))(qx, qw)
  want = jax.jit(lambda a, b: ops.dot_general(a, b, dn, mode="real",
                                              use_kernel="never"))(qx, qw)
  assert rel_err(got, want) < 8e-3


def test_grad_through_the_weight_only_kernel():
  # Real mode with a stored weight is differentiable in the activation (a
  # frozen quantized base under LoRA): the kernel's custom VJP gives dx from
  # the dequantized weight; Pallas has no differentiation rule of its own.
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from lowbit_jax import kernels  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  kx, kw = jax.random.split(_key())
  x = jax.random.normal(kx, (16, 4096), jnp.float32).astype(jnp.bfloat16)
  qw = ops.prepare_weight(jax.random.normal(kw, (4096, 4096), jnp.float32) * 0.02,
                          lb.QuantSpec("int4", group_size=128))
  dn = (((1,), (1,)), ((), ()))
  prob, why = ops.kernel_problem(x, qw, dn)
  assert prob is not None and kernels.find(prob) is not None, why

  def loss(a, use_kernel):
    y = ops.dot_general(a, qw, dn, mode="real", use_kernel=use_kernel)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  got = jax.jit(jax.grad(loss), static_argnums=1)(x, "always")
  want = jax.jit(jax.grad(loss), static_argnums=1)(x, "never")
  assert got.dtype == jnp.bfloat16 and rel_err(got, want) < 2e-2


def test_supports_measured_cases_on_hopper():
  prob = MatmulProblem(m=1, n=8192, k=8192, x_dtype="bfloat16",
                       w_format="int4", w_block=128)
  # Weight-only dispatch is whatever the tuned table says for this case.
  assert gpu_weight_only.supports(prob) == gpu_weight_only.table_says_kernel(
      prob)
  assert gpu_w8a8.supports(MatmulProblem(
      m=4096, n=8192, k=8192, x_dtype="fp8_e4m3", w_format="fp8_e4m3",
      x_format="fp8_e4m3"))


@pytest.mark.parametrize("spec,order", [
    (dict(format="int4", group_size=128), "wgmma"),
    (dict(format="mxfp4"), "wgmma"), (dict(format="nvfp4"), "wgmma"),
    (dict(format="mxfp4"), "wgmma_e2m1"), (dict(format="nvfp4"), "wgmma_e2m1"),
    (dict(format="int4", group_size=128), "wgmma_int4")])
@pytest.mark.parametrize("m", [1, 512])
def test_public_dot_reads_wgmma_ordered_weights(spec, order, m):
  # ops.set_code_order(q, "wgmma") through the quantized dot_general. The
  # dispatcher may send the two orders to different paths (reordered codes
  # make XLA's path pay a reorder pass, ``reordered_estimate``; at M = 512 on
  # the H100 the kernel took the reordered weight and XLA the natural one,
  # 0.3% apart in accumulation order), so each path is checked on its own:
  # XLA's path (it reorders the bytes back) gives the same bits for both
  # orders (the kernel's are test_weight_only_wgmma_order_is_bit_identical),
  # and what "auto" picks for the reordered weight matches the reference.
  import lowbit_jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._spec import QuantSpec  # pylint: disable=g-import-not-at-top
  k, n = 8192, 8192
  w = jax.random.normal(_key(), (k, n), jnp.float32).astype(jnp.bfloat16)
  q = ops.prepare_weight(w, QuantSpec(**spec))
  qw = ops.set_code_order(q, order)
  x = jax.random.normal(_key(), (m, k), jnp.float32).astype(jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  prob, _ = ops.kernel_problem(x, qw, dn)
  assert prob is not None
  run = lambda a, b, use: np.asarray(jax.jit(  # noqa: E731
      lambda a, b: ops.dot_general(a, b, dn, mode="real", use_kernel=use))(
          a, b), np.float32)
  np.testing.assert_array_equal(run(x, qw, "never"), run(x, q, "never"))
  ref = (np.asarray(x, np.float32)
         @ np.asarray(lowbit_jax.dequantize(q), np.float32).T)
  assert rel_err(run(x, qw, "auto"), ref) < 1e-2


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("scale_dtype", [None, "bfloat16", "float32"])
@pytest.mark.parametrize("m", [1, 16])
def test_block_formats_with_any_scale_dtype_through_the_public_dot(fmt, scale_dtype, m):
  # Float-scaled MX / NVFP4 weights crashed in the kernel (it decodes E8M0 /
  # E4M3 scale codes); they now take XLA's path, and every scale dtype gives
  # the exact product to bf16 accuracy under the default dispatch.
  import lowbit_jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._spec import QuantSpec  # pylint: disable=g-import-not-at-top
  k, n = 4096, 1024
  w = jax.random.normal(_key(), (k, n), jnp.float32) * 0.05
  q = ops.prepare_weight(w, QuantSpec(fmt, scale_dtype=scale_dtype))
  x = jax.random.normal(_key(), (m, k), jnp.float32).astype(jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  exact = (np.asarray(x, np.float64)
           @ np.asarray(lowbit_jax.dequantize(q), np.float64).T)
  for use in ("auto", "never"):
    y = jax.jit(lambda a, b: ops.dot_general(a, b, dn, mode="real", use_kernel=use))(
        x, q)
    assert rel_err(np.asarray(y, np.float32), exact) < 1e-2, use
