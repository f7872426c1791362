"""The Mosaic GPU kernels run on the CPU in Pallas' Mosaic GPU interpreter.

``matmul(..., interpret=...)`` runs the kernels' own jaxpr: the TMA pipelines,
scale copies, barriers, split K, the persistent tile loop, the warp-specialized
reduction and the output slicing, with warpgroups as threads, shared memory
filled with NaN before first use, and the happens-before race detector on. Only
the in-register helpers (raw MLIR through ``inline_mgpu``) are swapped for
whole-tile jnp twins, which the GPU tests (test_gpu_kernels.py) cover instead.

Each result is compared with a float64 model of the kernel's arithmetic
(``np_weight_only``: bf16 rounding exactly where the kernel rounds; ``np_w8a8``),
so a wrong scale, tile, K slice or masked row shows up as a large error; MXFP8
is compared bit for bit with ``reference`` on inputs whose block sums are exact.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.core._qarray import to_code_order
from lowbit_jax.kernels import _gpu_common as common
from lowbit_jax.kernels import gpu_w8a8
from lowbit_jax.kernels import gpu_weight_only
from tests.kernels._gpu_operands import (WO_CASES, make_w8, make_wo, np_w8a8,
                                         np_weight_only, rel_err)

def _params(tail_rows=False):
  """Race detection on; out-of-bounds reads raise unless the activation has a
  ragged tail, where the TMA box runs past M (zero-filled by the hardware; the
  interpreter fills NaN, which the masked store must keep out of the output)."""
  return common.interpret_params(
      True, detect_races=True, out_of_bounds_reads="uninitialized" if tail_rows else "raise")


def _check_wo(fmt, group, m, n, k, cfg, *, seed=0, out_dtype="float32"):
  ops, prob = make_wo(jax.random.key(seed), fmt, group, m, n, k,
                      out_dtype=out_dtype)
  out = gpu_weight_only.matmul(
      ops, prob, config=cfg, interpret=_params(tail_rows=m % cfg.tile_m != 0))
  assert not common.races_found()
  assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype)
  want = np_weight_only(ops, prob)
  tol = 1e-5 if out_dtype == "float32" else 8e-3
  assert rel_err(out, want) < tol, (fmt, group, cfg)
  return ops, prob, out


def _wo_cfg(**kw):
  base = dict(tile_n=64, tile_k=256, tile_m=8, stages=2, split_k=1, ws=False)
  return gpu_weight_only.Config(**{**base, **kw})


# ----------------------------------------------------------------------------
# Weight-only.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,group", WO_CASES)
def test_weight_only_kernel_every_format(fmt, group):
  # 4 K steps through a 2-deep pipeline (slots reused), 2 N tiles, and M = 5
  # in an 8-row tile: the store must write exactly the 5 valid rows.
  _check_wo(fmt, group, 5, 128, 1024, _wo_cfg())


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int8", None),
                                       ("mxfp4", 32), ("nvfp4", 16)])
def test_weight_only_kernel_split_k(fmt, group):
  # Two K slices per output tile, partial sums in f32 added after the kernel.
  _check_wo(fmt, group, 16, 128, 2048, _wo_cfg(tile_m=16, split_k=2), seed=1)


def test_weight_only_kernel_several_m_tiles():
  _check_wo("int4", 64, 32, 64, 512, _wo_cfg(tile_m=16, stages=3), seed=2)


def test_weight_only_kernel_group_wider_than_a_step():
  # int8 with 128-element groups in 64-element K steps: one scale column
  # serves two steps.
  _check_wo("int8", 128, 8, 64, 1024, _wo_cfg(tile_k=64, stages=3), seed=3)


@pytest.mark.parametrize("m,n,k", [(1, 256, 2048), (16, 512, 4096),
                                   (64, 128, 1024), (128, 128, 1024)])
def test_weight_only_kernel_default_configs(m, n, k):
  # The tilings the dispatcher picks (decode split K, prefill tiles).
  for fmt, group in [("int4", 128), ("nvfp4", 16)]:
    ops, prob = make_wo(jax.random.key(m), fmt, group, m, n, k)
    out = gpu_weight_only.matmul(ops, prob, interpret=_params(tail_rows=m < 8))
    assert rel_err(out, np_weight_only(ops, prob)) < 1e-5, (fmt, m, n, k)


@pytest.mark.parametrize("fmt,group,tile_k,chunks", [
    ("int4", 128, 256, 2), ("int4", None, 512, 4), ("int8", None, 256, 2),
    ("int8", 128, 256, 4), ("mxfp4", 32, 256, 2), ("nvfp4", 16, 512, 4),
    ("fp4_e2m1", 128, 512, 4)])
def test_weight_only_kernel_k_chunks(fmt, group, tile_k, chunks):
  # Each step decoded and multiplied in 2 or 4 column chunks of 64 (8-bit)
  # or 128 (4-bit) columns (each chunk's group scales; groups wider than a
  # chunk), one wait a step.
  _check_wo(fmt, group, 5, 128, 1024, _wo_cfg(tile_k=tile_k, k_chunks=chunks),
            seed=7)


def test_weight_only_k_chunks_are_refused_where_they_do_not_tile():
  ops, prob = make_wo(jax.random.key(8), "int4", 128, 8, 128, 1024)
  # 3 does not divide 256; chunks of 64 int4 columns are 32-byte rows.
  for cfg in (_wo_cfg(k_chunks=3), _wo_cfg(k_chunks=4), _wo_cfg(k_chunks=0)):
    assert not gpu_weight_only._tiles_ok(prob, cfg)  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="does not fit the tiling"):
      gpu_weight_only.matmul(ops, prob, config=cfg, interpret=True)


def test_weight_only_kernel_bf16_output():
  _check_wo("int4", 128, 16, 128, 1024, _wo_cfg(tile_m=16), seed=4,
            out_dtype="bfloat16")


@pytest.mark.parametrize("fmt,group,chunks", [
    ("int4", 128, 1), ("int8", None, 1), ("mxfp4", 32, 1), ("nvfp4", 16, 1),
    ("fp4_e2m1", 32, 1), ("int4", 128, 2)])
def test_weight_only_warp_specialized_kernel(fmt, group, chunks):
  # One TMA warpgroup, two compute warpgroups each taking half of every
  # 512-deep K step; their partial sums meet in shared memory.
  ops, prob = make_wo(jax.random.key(5), fmt, group, 16, 128, 2048)
  cfg = _wo_cfg(tile_k=512, tile_m=16, ws=True, k_chunks=chunks)
  out = gpu_weight_only.matmul(
      ops, prob, config=cfg,
      interpret=_params())
  assert not common.races_found()
  assert rel_err(out, np_weight_only(ops, prob)) < 1e-5


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("fmt,group,tile_n,m,extra", [
    ("int4", 128, 128, 16, {}), ("int8", None, 128, 5, {}),
    ("nvfp4", 16, 128, 16, {}), ("int8", 128, 128, 256, dict(tile_k=128)),
    # (--runslow: 256 rows of E2M1, a K split, K chunks, two M tiles.)
    pytest.param("mxfp4", 32, 256, 8, {}, marks=_SLOW),
    pytest.param("fp4_e2m1", 32, 128, 16, dict(split_k=2), marks=_SLOW),
    pytest.param("int4", None, 256, 16, dict(k_chunks=2), marks=_SLOW),
    pytest.param("int4", 64, 128, 32, dict(tile_m=16), marks=_SLOW),
    # (the tuner's candidates where the split tiling makes fewer CTAs than
    # SMs: 64-row activation tiles, and K split in two at 128 rows)
    pytest.param("int4", 128, 128, 256, dict(tile_k=128, tile_m=64), marks=_SLOW),
    pytest.param("int4", 128, 128, 256, dict(tile_k=128, tile_m=128, split_k=2),
                 marks=_SLOW)])
def test_weight_only_n_split_kernel(fmt, group, tile_n, m, extra):
  # ws with n_split: the TMA warpgroup loads one activation tile for both
  # compute warpgroups, each dequantizes and multiplies its own half of the
  # weight rows (its own group / channel scales) and writes its own output
  # columns. 2 N tiles, 4 K steps through 2 stages; M = 5 in an 8-row tile,
  # M = 32 in two M tiles, a K split, two K chunks, a 256-row activation tile.
  cfg = _wo_cfg(tile_n=tile_n, tile_k=256, tile_m=max(8, -(-m // 8) * 8),
                ws=True, n_split=True)
  cfg = dataclasses.replace(cfg, **extra)
  _check_wo(fmt, group, m, 2 * tile_n, 1024 * cfg.split_k, cfg, seed=9)


def test_weight_only_kernel_256_activation_rows():
  # tile_m = 256 (WGMMA's widest N) with a ragged M of 200 in the one tile.
  _check_wo("int4", None, 200, 128, 1024,
            _wo_cfg(tile_k=128, tile_m=256), seed=10)


def test_weight_only_n_split_is_refused_without_ws_or_half_tiles():
  ops, prob = make_wo(jax.random.key(8), "int4", 128, 8, 256, 1024)
  with pytest.raises(ValueError, match="pass ws=True"):
    gpu_weight_only.matmul(ops, prob, config=_wo_cfg(tile_n=128, n_split=True),
                           interpret=True)
  # 64 weight rows leave 32 a warpgroup: not a WGMMA's 64.
  cfg = _wo_cfg(tile_n=64, ws=True, n_split=True)
  assert not gpu_weight_only._tiles_ok(prob, cfg)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="multiple of 128, got 64"):
    gpu_weight_only.matmul(ops, prob, config=cfg, interpret=True)


@pytest.mark.parametrize("fmt,group,split,m", [("int4", 128, 2, 5),
                                               ("nvfp4", 16, 4, 16)])
def test_weight_only_cluster_reduce_grid(fmt, group, split, m):
  # Config.cluster_reduce launches the K slices as one cluster (axis "s");
  # the interpreter runs that grid, each CTA's K slice and its output tile
  # (its exchange through distributed shared memory is PTX, which the
  # interpreter cannot run: there the partials are summed after the kernel).
  _check_wo(fmt, group, m, 128, 1024 * split,
            _wo_cfg(tile_m=8 if m < 8 else 16, split_k=split,
                    cluster_reduce=True), seed=11)


def test_weight_only_register_tables_and_scale_words_run_interpreted():
  # Config.lut_regs and scale_words change only in-register code, which the
  # interpreter swaps for its jnp twins: the same kernel, the same numbers.
  cfg = _wo_cfg(lut_decode=True, lut_regs=True, scale_words=True)
  _check_wo("mxfp4", 32, 5, 128, 1024, cfg, seed=12)
  ops, prob = make_wo(jax.random.key(8), "int4", 128, 8, 256, 1024)
  with pytest.raises(ValueError, match="lut_regs=True"):
    gpu_weight_only.matmul(ops, prob, config=_wo_cfg(lut_regs=True),
                           interpret=True)
  with pytest.raises(ValueError, match="scale_words=True"):
    gpu_weight_only.matmul(ops, prob, config=_wo_cfg(scale_words=True),
                           interpret=True)
  ops, prob = make_wo(jax.random.key(8), "mxfp4", 32, 8, 256, 1024)
  with pytest.raises(ValueError, match="needs lut_decode=True"):
    gpu_weight_only.matmul(ops, prob, config=_wo_cfg(lut_regs=True),
                           interpret=True)


def test_weight_only_cluster_reduce_is_refused_where_it_cannot_apply():
  ops, prob = make_wo(jax.random.key(8), "int4", 128, 8, 256, 2048)
  for bad in (dict(split_k=1), dict(split_k=2, ws=True)):
    cfg = _wo_cfg(cluster_reduce=True, **bad)
    assert not gpu_weight_only._tiles_ok(prob, cfg)  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="split_k in"):
      gpu_weight_only.matmul(ops, prob, config=cfg, interpret=True)
  ops, prob = make_wo(jax.random.key(8), "int4", 128, 8, 256, 256 * 16)
  with pytest.raises(ValueError, match="at most 8 CTAs"):
    gpu_weight_only.matmul(ops, prob, config=_wo_cfg(
        cluster_reduce=True, split_k=16), interpret=True)


@pytest.mark.parametrize("fmt,group,m,extra", [
    ("int4", 128, 5, dict(tile_k=256)),
    ("int8", 64, 8, dict(tile_k=256)),
    ("fp4_e2m1", 128, 16, dict(tile_k=512, tile_m=16, split_k=2)),
    ("int4", 128, 8, dict(tile_k=128, stages=3)),
    ("int8", 128, 16, dict(tile_k=256, tile_m=16, split_k=2,
                           cluster_reduce=True))])
def test_weight_only_acc_scale_kernel(fmt, group, m, extra):
  # Config.acc_scale: each K chunk is one group, its MMA into a fresh
  # accumulator, the group's scales multiplying that partial sum into the
  # running one (the pipeline's carry). Nothing is rounded to bf16, so the
  # result is the float64 sum to float32 accumulation error, where the
  # weight-tile path's bf16 products sit 2**-9 away: the assertions tell the
  # two paths apart. A K split (partials after the kernel), a one-group step,
  # the cluster grid.
  k = 1024 * extra.get("split_k", 1)
  cfg = gpu_weight_only.acc_scale_config(
      make_wo(jax.random.key(0), fmt, group, m, 128, k)[1],
      _wo_cfg(**extra))
  assert cfg is not None and cfg.acc_scale
  assert cfg.k_chunks == cfg.tile_k // group
  ops, prob = make_wo(jax.random.key(13), fmt, group, m, 128, k)
  out = gpu_weight_only.matmul(
      ops, prob, config=cfg, interpret=_params(tail_rows=m % cfg.tile_m != 0))
  assert not common.races_found()
  assert rel_err(out, np_weight_only(ops, prob, acc_scale=True)) < 1e-6
  assert rel_err(out, np_weight_only(ops, prob)) > 1e-4


def test_weight_only_acc_scale_is_refused_where_it_cannot_apply():
  cases = [
      (("mxfp4", 32), _wo_cfg(acc_scale=True), "groups of 64 or 128"),
      (("int4", 32), _wo_cfg(acc_scale=True, k_chunks=2), "w_block=32"),
      (("int4", None), _wo_cfg(acc_scale=True), "w_block=None"),
      (("int4", 128), _wo_cfg(acc_scale=True), "k_chunks = tile_k // 128 = 2"),
      (("int4", 128), _wo_cfg(acc_scale=True, tile_k=512, k_chunks=2, ws=True),
       "pass ws=False")]
  for (fmt, group), cfg, msg in cases:
    ops, prob = make_wo(jax.random.key(8), fmt, group, 8, 128, 1024)
    assert not gpu_weight_only._tiles_ok(prob, cfg)  # pylint: disable=protected-access
    with pytest.raises(ValueError, match=msg):
      gpu_weight_only.matmul(ops, prob, config=cfg, interpret=True)
  # The helper the tuner uses sets the chunks, or says no.
  prob = make_wo(jax.random.key(8), "int4", 128, 8, 128, 1024)[1]
  assert gpu_weight_only.acc_scale_config(prob, _wo_cfg()).k_chunks == 2
  prob = make_wo(jax.random.key(8), "nvfp4", 16, 8, 128, 1024)[1]
  assert gpu_weight_only.acc_scale_config(prob, _wo_cfg()) is None


def test_weight_only_kernel_has_no_races():
  ops, prob = make_wo(jax.random.key(6), "int4", 32, 16, 128, 2048)
  out = gpu_weight_only.matmul(
      ops, prob, config=_wo_cfg(tile_m=16, split_k=2, stages=3),
      interpret=_params())
  assert not common.races_found()
  assert rel_err(out, np_weight_only(ops, prob)) < 1e-5


# ----------------------------------------------------------------------------
# W8A8 (persistent, warp-specialized: 3 warpgroups).
# ----------------------------------------------------------------------------

def _check_w8(case, m, n, k, cfg=None, *, exact=False, out_dtype="float32",
              seed=0):
  ops, prob = make_w8(jax.random.key(seed), case, m, n, k, exact=exact,
                      out_dtype=out_dtype)
  out = gpu_w8a8.matmul(ops, prob, config=cfg,
                        interpret=_params())
  assert not common.races_found()
  assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype)
  tol = 1e-6 if out_dtype == "float32" else 8e-3
  assert rel_err(out, np_w8a8(ops, prob)) < tol, (case, cfg)
  return ops, prob, out


@pytest.mark.parametrize("case", ["fp8_channel", "int8_channel"])
def test_w8a8_channel_kernel(case):
  # 128 x 256 CTA tiles: 3 x 2 = 6 output tiles over 2 persistent CTAs, 6 K
  # steps through a 4-deep pipeline.
  _check_w8(case, 384, 512, 768)


@pytest.mark.parametrize("case", ["fp8_block", "int8_block"])
def test_w8a8_block_scaled_kernel(case):
  # 1x128 activation and 128x128 weight scales; 128 x 128 CTA tiles (two
  # 64-row warpgroups): 3 x 2 tiles over 2 CTAs, 3 K steps.
  _check_w8(case, 384, 256, 384, seed=1)


def test_w8a8_block_kernel_through_the_public_dot(monkeypatch):
  # What the dispatcher runs for a 1x128 x 128x128 fp8 dot: QArrays from
  # lowbit_jax.quantize (the activation in groups of 128 along K, the weight
  # in 128x128 tiles, K-major), through ops.dot_general with the kernel
  # forced (interpreted here), against the same dot without the kernel.
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, "on_hopper_gpu", lambda problem: True)
  monkeypatch.setattr(gpu_w8a8, "MEASURED_WINS",
                      {("block", "fp8_e4m3"): (128, 128, 128)})
  run = gpu_w8a8.matmul
  calls = []

  def interpreted(operands, problem, **kw):
    calls.append(problem)
    return run(operands, problem, interpret=_params(), **kw)
  monkeypatch.setattr(gpu_w8a8, "matmul", interpreted)
  m, k, n = 256, 384, 256
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
  qw = ops.prepare_weight(w, lb.QuantSpec("fp8_e4m3", tile=(128, 128)))
  qx = lb.quantize(x, lb.QuantSpec("fp8_e4m3", axis=-1, group_size=128))
  dn = (((1,), (1,)), ((), ()))
  got = ops.dot_general(qx, qw, dn, mode="real", use_kernel="always")
  assert len(calls) == 1 and gpu_w8a8.mode_of(calls[0]) == "block"
  assert not common.races_found()
  want = ops.dot_general(qx, qw, dn, mode="real", use_kernel="never")
  assert got.shape == want.shape == (m, n) and got.dtype == want.dtype
  assert rel_err(got, want) < 8e-3  # both round to bf16 (2**-7 apart)


def test_mxfp8_kernel_is_bit_exact_on_exact_block_sums():
  # Small-integer E4M3 codes: every 32-deep block sum is exact, so the kernel
  # must give the reference's bits. 3 tiles over 2 CTAs, 8 K blocks.
  ops, prob, out = _check_w8("mxfp8", 384, 128, 256, exact=True, seed=2)
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(gpu_w8a8.reference(ops, prob)))


@pytest.mark.parametrize("sub_blocks", [2, 4])
def test_mxfp8_kernel_with_several_blocks_a_step_is_bit_exact(sub_blocks):
  # Config.sub_blocks: 2 or 4 32-deep tiles of x and W a pipeline step (8 K
  # blocks: 4 or 2 steps), each block its own MMA and rescale in K order as
  # before, so the bits stay the reference's.
  import dataclasses  # pylint: disable=g-import-not-at-top
  prob = make_w8(jax.random.key(2), "mxfp8", 256, 128, 256, exact=True)[1]
  cfg = dataclasses.replace(gpu_w8a8.heuristic_config(prob),
                            sub_blocks=sub_blocks, stages=4)
  assert gpu_w8a8._shape_ok(prob, cfg)  # pylint: disable=protected-access
  ops, prob, out = _check_w8("mxfp8", 256, 128, 256, cfg, exact=True, seed=2)
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(gpu_w8a8.reference(ops, prob)))


def test_w8a8_sub_blocks_are_mx_only():
  import dataclasses  # pylint: disable=g-import-not-at-top
  ops, prob = make_w8(jax.random.key(0), "fp8_channel", 128, 256, 128)
  cfg = dataclasses.replace(gpu_w8a8.heuristic_config(prob), sub_blocks=2)
  with pytest.raises(ValueError, match="does not fit the tiling"):
    gpu_w8a8.matmul(ops, prob, config=cfg, interpret=True)


def test_mxfp8_kernel_random_codes():
  _check_w8("mxfp8", 256, 256, 256, seed=3)


@pytest.mark.parametrize("wg_dim,ctas", [("n", 1), ("m", 3)])
def test_w8a8_channel_kernel_other_layouts(wg_dim, ctas):
  # Warpgroups stacked along M, one CTA walking every tile, or more CTAs
  # than some get tiles for.
  cfg = gpu_w8a8.Config(tile_m=64 if wg_dim == "m" else 128, tile_n=128,
                        stages=2, wg_dim=wg_dim, ctas=ctas)
  _check_w8("int8_channel", 256, 256, 512, cfg, seed=4)


def test_w8a8_kernel_bf16_output():
  _check_w8("fp8_channel", 128, 256, 256, out_dtype="bfloat16", seed=5)


# ----------------------------------------------------------------------------
# The harness itself.
# ----------------------------------------------------------------------------

def _two_warpgroup_kernel(synchronized: bool):
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  def body(x_gmem, o_gmem):
    @functools.partial(pl.run_scoped, smem=plgpu.SMEM((64, 64), jnp.float32),
                       bar=plgpu.Barrier(num_barriers=1), collective_axes="wg")
    def _(smem, bar):
      wg = jax.lax.axis_index("wg")

      @pl.when(wg == 0)
      def _():
        smem[...] = x_gmem[...] * 2.0
        if synchronized:
          plgpu.barrier_arrive(bar.at[0])

      @pl.when(wg == 1)
      def _():
        if synchronized:
          plgpu.barrier_wait(bar.at[0])
        o_gmem[...] = smem[...]

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32), grid=(1,),
      grid_names=("x",), num_threads=2, thread_name="wg",
      interpret=_params())


def test_race_detector_sees_a_planted_race():
  x = jax.random.normal(jax.random.key(0), (64, 64), jnp.float32)
  out = common.run_interpreted(_two_warpgroup_kernel(True), x)
  assert not common.races_found()
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)
  common.run_interpreted(_two_warpgroup_kernel(False), x)
  assert common.races_found()


def test_interpreting_three_warpgroups_needs_the_scheduler_flag(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  ops, prob = make_w8(jax.random.key(0), "int8_channel", 128, 256, 128)
  with pytest.raises(RuntimeError, match="xla_cpu_enable_concurrency"):
    gpu_w8a8.matmul(ops, prob, interpret=True)
  ops, prob = make_wo(jax.random.key(0), "int4", 128, 16, 128, 1024)
  with pytest.raises(RuntimeError, match="deadlock"):
    gpu_weight_only.matmul(ops, prob, config=_wo_cfg(tile_k=512, ws=True),
                           interpret=True)


def test_interpret_argument_is_validated():
  ops, prob = make_w8(jax.random.key(0), "int8_channel", 128, 256, 128)
  with pytest.raises(TypeError, match="InterpretGPUParams"):
    gpu_w8a8.matmul(ops, prob, interpret=1)
  bad = dataclasses.replace(prob, n=200)
  with pytest.raises(ValueError, match="does not fit the tiling"):
    gpu_w8a8.matmul(ops, bad, interpret=True)


# ----------------------------------------------------------------------------
# 4-bit codes stored in the kernel's register order (w_order="wgmma").
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,group,extra,order", [
    ("int4", 128, {}, "wgmma"), ("nvfp4", 16, dict(lut_decode=True), "wgmma"),
    ("mxfp4", 32, dict(ws=True, n_split=True, tile_n=128), "wgmma"),
    ("mxfp4", 32, dict(scale_words=True), "wgmma_e2m1"),
    ("nvfp4", 16, dict(k_chunks=2, fast_decode=True), "wgmma_e2m1"),
    ("int4", 128, {}, "wgmma_int4"),
    pytest.param("int4", None, dict(k_chunks=2), "wgmma", marks=_SLOW),
    pytest.param("int4", None, dict(k_chunks=2), "wgmma_int4", marks=_SLOW),
    pytest.param("fp4_e2m1", 32, dict(split_k=2), "wgmma", marks=_SLOW),
    pytest.param("fp4_e2m1", 32, dict(split_k=2), "wgmma_e2m1", marks=_SLOW)])
def test_weight_only_kernel_reads_reordered_codes(fmt, group, extra, order):
  # The same operands with the codes in the kernel's orders give the same
  # bits: "wgmma" (bytes permuted) and, for E2M1, "wgmma_e2m1" (then the bits
  # of each word permuted for the rotate-and-mask decode), for int4
  # "wgmma_int4" (each pair a shift from the conversion's input).
  cfg = dataclasses.replace(_wo_cfg(), **extra)
  m, n, k = 5, 2 * cfg.tile_n, 1024 * cfg.split_k
  ops, prob = make_wo(jax.random.key(11), fmt, group, m, n, k)
  params = _params(tail_rows=True)
  want = gpu_weight_only.matmul(ops, prob, config=cfg, interpret=params)
  perm = dataclasses.replace(ops, w_codes=to_code_order(ops.w_codes, order))
  pprob = dataclasses.replace(prob, w_order=order)
  got = gpu_weight_only.matmul(perm, pprob, config=cfg, interpret=params)
  # The references read the order from the problem too.
  np.testing.assert_array_equal(
      np.asarray(gpu_weight_only.reference(perm, pprob)),
      np.asarray(gpu_weight_only.reference(ops, prob)))
  assert not common.races_found()
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert rel_err(got, np_weight_only(ops, prob)) < 1e-5


def test_wgmma_order_is_refused_where_it_cannot_apply():
  ops, prob = make_wo(jax.random.key(12), "int8", None, 8, 128, 1024)
  with pytest.raises(ValueError, match="4-bit format"):
    gpu_weight_only.matmul(ops, dataclasses.replace(prob, w_order="wgmma"),
                           config=_wo_cfg(), interpret=True)
  with pytest.raises(ValueError, match="w_order must be"):
    dataclasses.replace(prob, w_order="marlin")
  assert not gpu_w8a8.supports(dataclasses.replace(prob, w_order="wgmma"))
  ops4, prob4 = make_wo(jax.random.key(12), "int4", 128, 8, 128, 1024)
  with pytest.raises(ValueError, match="E2M1 codes"):
    gpu_weight_only.matmul(ops4, dataclasses.replace(prob4, w_order="wgmma_e2m1"),
                           config=_wo_cfg(), interpret=True)
  opsf, probf = make_wo(jax.random.key(12), "mxfp4", 32, 8, 128, 1024)
  with pytest.raises(ValueError, match="decode by rotations"):
    gpu_weight_only.matmul(
        opsf, dataclasses.replace(probf, w_order="wgmma_e2m1"),
        config=_wo_cfg(lut_decode=True), interpret=True)


def test_weight_only_kernel_takes_float32_group_scales_that_do_not_fit_as_bf16(
    monkeypatch):
  # A QuantSpec's group scales are float32 by default, but the tilings'
  # shared memory counts bf16 ones. Where float32 scales fit, they reach the
  # kernel as they are (no XLA op before it); where they would not, matmul
  # rounds them to bf16 first, as the weight-tile path rounds each one in
  # registers anyway: the same bits. acc_scale multiplies by float32 scales
  # exactly where they fit.
  ops, prob = make_wo(jax.random.key(14), "int4", 128, 8, 128, 1024)
  f32 = dataclasses.replace(
      ops, w_scale=ops.w_scale.astype(jnp.float32) * (1 + 2.0 ** -12))
  bf = dataclasses.replace(f32, w_scale=f32.w_scale.astype(jnp.bfloat16))
  assert not np.array_equal(np.asarray(f32.w_scale),
                            np.asarray(bf.w_scale, np.float32))
  seen = []
  build = gpu_weight_only._build  # pylint: disable=protected-access

  def spy(*args, **kw):
    seen.append(args[5])  # the scale dtype the kernel is built for
    return build(*args, **kw)
  monkeypatch.setattr(gpu_weight_only, "_build", spy)
  cfg = _wo_cfg()
  a = gpu_weight_only.matmul(f32, prob, config=cfg, interpret=True)
  b = gpu_weight_only.matmul(bf, prob, config=cfg, interpret=True)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  acc = gpu_weight_only.acc_scale_config(prob, cfg)
  c = gpu_weight_only.matmul(f32, prob, config=acc, interpret=True)
  assert seen == ["float32", "bfloat16", "float32"]
  assert rel_err(c, np_weight_only(f32, prob, acc_scale=True)) < 1e-6
  # A long K whose float32 scales would not fit: bf16, for either path.
  big = dataclasses.replace(prob, k=28672)
  s = jnp.ones((128, 28672 // 128), jnp.float32)
  for tight in (gpu_weight_only.Config(tile_n=128, tile_k=128, tile_m=128,
                                       stages=3, k_chunks=1, acc_scale=True),
                gpu_weight_only.Config(tile_n=128, tile_k=128, tile_m=128,
                                       stages=3)):
    assert gpu_weight_only._shape_ok(big, tight)  # pylint: disable=protected-access
    assert gpu_weight_only.smem_bytes(big, tight, scale_itemsize=4) > (
        gpu_weight_only.MAX_SMEM_BYTES)
    assert gpu_weight_only.kernel_scales(s, big, tight).dtype == jnp.bfloat16
    fits = dataclasses.replace(tight, stages=2)
    assert gpu_weight_only.kernel_scales(s, big, fits).dtype == jnp.float32
  # Per-channel scales pass as they are.
  pc = make_wo(jax.random.key(15), "int4", None, 8, 128, 1024)[1]
  assert gpu_weight_only.kernel_scales(s[:, :1], pc, cfg).dtype == jnp.float32
