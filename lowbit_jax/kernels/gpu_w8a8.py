"""W8A8 matmuls for Hopper GPUs in Mosaic GPU: fp8 e4m3 / int8 codes on both sides.

``y[M, N] = (sx * x)[M, K] @ (sw * W)[N, K]^T`` with the scaling fused:

* ``"channel"``: per-token ``sx [M, 1]`` x per-channel ``sw [N, 1]`` scales, applied
  to the f32 (or int32) accumulator in the epilogue;
* ``"block"``: 1 x 128 activation groups ``sx [M, K/128]`` and 128 x 128 weight
  tiles ``sw [N/128, K/128]`` (the DeepSeek-V3 recipe, DeepSeek-AI 2024, "DeepSeek-V3
  Technical Report", section 3.3): each 128-deep K step is one MMA into a fresh
  accumulator, promoted into the f32 running sum with one FMA per element;
* ``"mx"``: MXFP8 x MXFP8 (OCP Microscaling Formats v1.0: E4M3 elements, E8M0
  scales per 32 along K on both sides) emulated on Hopper, which has no
  block-scaled MMA: each 32-deep K block is one fp8 MMA into a fresh accumulator,
  multiplied by ``2**(ex + ew - 254)`` and added to the running f32 sum in K order.
  ``reference`` does the same arithmetic in the same order, so the two agree bit for
  bit whenever the MMA's per-block sum is exact.

Both operands are K-major (``x [M, K]``, ``W [N, K]``), the layout 8-bit WGMMA needs.
The kernel is persistent and warp-specialized: one warpgroup issues TMA copies,
two compute warpgroups each own a ``tile_m x tile_n`` half of the CTA tile.
``matmul(..., interpret=True)`` runs it on the CPU in the Mosaic GPU interpreter
(simulated shared memory, TMA and barriers; optional race detection), with the
in-register scaling swapped for whole-tile jnp twins
(``tests/kernels/test_gpu_interpret.py``).
``supports`` only accepts cases measured faster than XLA's own path
(``MEASURED_WINS``): the per-channel mode (fp8 and int8, on an H100,
``benchmarks/kernels_h100.md``, and again on the H200) and the block mode
with fp8 codes (on the H200, ``benchmarks/kernels_h200.md``: 4096 x 8192 x
8192 in 499 us against 869 us for XLA's dequantize-then-dot and 687 us for
XLA's bf16 dot, with the 64 x 128 tiling per warpgroup). The block mode was
slower than XLA on the H100 with 128 x 128 tiles per warpgroup (two f32
accumulators do not fit in registers), the tiling it no longer uses; int8
codes in the block mode were not timed. MXFP8 stays off: 1647 us on the H200
against XLA's 851 (each 32-deep K block is its own MMA and rescale). The
rescale is about twice the block's MMA in issue slots (64 x 128 products and
FMAs a warpgroup against a 64 x 128 x 32 fp8 MMA), so two warpgroups
overlapping perfectly would reach about 1.2x bf16; one block a pipeline step
also pays the step's barrier wait, TMA issue and release every 32-deep MMA,
which ``Config.sub_blocks`` (several 32-wide tiles a step; untimed) amortizes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.kernels import _gpu_common as common
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem, check_scale_dtypes


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of the W8A8 kernel.

  Attributes:
    tile_m: rows of x per compute warpgroup (multiple of 64).
    tile_n: rows of W per compute warpgroup (multiple of 8, <= 256).
    tile_k: K per pipeline step (128 for fp8 / int8 rows of 128 bytes).
    stages: TMA pipeline depth.
    grid_tile_width: width of the snake over output tiles (L2 reuse).
    epi_n: columns per epilogue store tile.
    wg_dim: "n" if the two compute warpgroups split the CTA tile along N, "m"
      if along M.
    ctas: persistent CTAs in the grid; None for one per SM (2 in interpret
      mode, so that each CTA walks several output tiles).
    sub_blocks: MX only: 32-deep K blocks per pipeline step, each its own
      32-wide shared-memory tile of x and W (a swizzled tile cannot be
      sliced below its swizzle width, so a step of several blocks is several
      tiles). One step a block pays the pipeline's barrier wait, TMA issue
      and release for every 32-deep MMA; several amortize them.
  """
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  stages: int = 4
  grid_tile_width: int = 8
  epi_n: int = 64
  wg_dim: str = "n"
  ctas: Optional[int] = None
  sub_blocks: int = 1


def mode_of(problem: MatmulProblem) -> str:
  """Which scaling scheme a problem uses: "channel", "block" or "mx".

  Raises:
    ValueError: if the combination of formats and blocks is not a W8A8 case.
  """
  wf, xf = problem.w_format, problem.x_format
  if xf is None:
    raise ValueError("gpu_w8a8 needs quantized activations (x_format set)")
  if wf == "mxfp8_e4m3" or xf == "mxfp8_e4m3":
    if wf != xf:
      raise ValueError("MXFP8 needs mxfp8_e4m3 on both sides, got "
                       f"w={wf!r} x={xf!r}")
    if problem.w_block not in (32, None) or problem.x_block not in (32, None):
      raise ValueError("MXFP8 blocks are 32 along K")
    return "mx"
  if wf not in ("fp8_e4m3", "int8") or xf != wf:
    raise ValueError(f"gpu_w8a8 supports fp8_e4m3 x fp8_e4m3 and int8 x int8 "
                     f"(and MXFP8), got w={wf!r} x={xf!r}")
  if problem.w_block is None and problem.x_block is None:
    return "channel"
  if problem.w_block == (128, 128) and problem.x_block == 128:
    return "block"
  raise ValueError("W8A8 scales are per-token x per-channel (w_block=None, "
                   "x_block=None) or 1x128 x 128x128 (x_block=128, "
                   f"w_block=(128, 128)); got x_block={problem.x_block} "
                   f"w_block={problem.w_block}")


def _problem_for_decode(problem: MatmulProblem) -> MatmulProblem:
  """The same problem with the MX blocks spelled out for the shared decoders."""
  if mode_of(problem) == "mx":
    return dataclasses.replace(problem, w_block=32, x_block=32)
  return problem


def reference(operands: MatmulOperands, problem: MatmulProblem) -> jax.Array:
  """Pure-jnp definition of the W8A8 matmul.

  ``channel`` and ``block``: exact f32 dequantization of both operands and one
  f32 matmul at HIGHEST precision. ``mx``: for each 32-deep K block the f32 dot of
  the decoded E4M3 elements, times ``2**(ex + ew - 254)``, accumulated in f32 in K
  order (the kernel's arithmetic).

  Args:
    operands: codes ``x [M, K]``, ``w_codes [N, K]`` and their scales.
    problem: the static description.

  Returns:
    ``[M, N]`` in ``problem.out_dtype``.
  """
  mode = mode_of(problem)
  if mode != "mx":
    x = common.dequantize_activation(operands, problem)
    w = common.dequantize_weight(operands, problem)
    y = jnp.dot(x, w.T, precision=lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32)
    return y.astype(problem.out_dtype)
  m, n, k = problem.m, problem.n, problem.k
  nb = k // 32
  xv = operands.x.astype(jnp.float32).reshape(m, nb, 32).transpose(1, 0, 2)
  wv = operands.w_codes.astype(jnp.float32).reshape(n, nb, 32).transpose(1, 0, 2)
  sx = common.decode_e8m0(operands.x_scale.reshape(m, nb)).T  # [nb, m]
  sw = common.decode_e8m0(operands.w_scale.reshape(n, nb)).T  # [nb, n]

  def body(acc, blk):
    xb, wb, sxb, swb = blk
    part = jnp.dot(xb, wb.T, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
    return acc + part * (sxb[:, None] * swb[None, :]), None

  acc, _ = lax.scan(body, jnp.zeros((m, n), jnp.float32), (xv, wv, sx, sw))
  return acc.astype(problem.out_dtype)


def xla_matmul(operands: MatmulOperands, problem: MatmulProblem) -> jax.Array:
  """XLA's best own path for the same math (what runs without a kernel).

  ``channel``: a K-major 8-bit dot with f32 (int32) output, scaled afterwards (the
  pattern XLA rewrites to cuBLASLt). ``block`` and ``mx``: dequantize to bf16, then
  a bf16 dot.
  """
  mode = mode_of(problem)
  nt = (((1,), (1,)), ((), ()))
  if mode == "channel":
    acc_t = jnp.int32 if problem.w_format == "int8" else jnp.float32
    acc = lax.dot_general(operands.x, operands.w_codes, nt,
                          preferred_element_type=acc_t).astype(jnp.float32)
    y = acc * operands.x_scale.reshape(-1, 1).astype(jnp.float32) * (
        operands.w_scale.reshape(1, -1).astype(jnp.float32))
    return y.astype(problem.out_dtype)
  p = _problem_for_decode(problem)
  x = common.dequantize_activation(operands, p).astype(jnp.bfloat16)
  w = common.dequantize_weight(operands, p).astype(jnp.bfloat16)
  return lax.dot_general(x, w, nt, preferred_element_type=jnp.float32).astype(
      problem.out_dtype)


# ----------------------------------------------------------------------------
# Dispatch policy.
# ----------------------------------------------------------------------------

def case_of(problem: MatmulProblem) -> str:
  """The benchmark's and the tuned table's name for a W8A8 problem:
  ``"fp8_channel"``, ``"int8_channel"``, ``"fp8_block"``, ``"int8_block"`` or
  ``"mxfp8"``."""
  mode = mode_of(problem)
  if mode == "mx":
    return "mxfp8"
  return ("int8" if problem.w_format == "int8" else "fp8") + "_" + mode


def tuned_config(problem: MatmulProblem) -> Optional[Config]:
  """The tiling the tuned table (``gpu_tuned_configs.json``, its ``"w8a8"``
  section, written by ``experiments/bench_kernels.py --mode=tune`` with the
  ``w8a8`` phase) measured fastest for this problem's case, where it tiles
  the problem; else None.

  Raises:
    ValueError: the table's entry for the case is not a Config.
  """
  from lowbit_jax.kernels import gpu_weight_only  # pylint: disable=g-import-not-at-top
  entry = gpu_weight_only.get_table().get("w8a8", {}).get(case_of(problem))
  if not entry:
    return None
  try:
    cfg = common.config_from_json(Config, entry.get("config"),
                                  f"the tuned table's w8a8 entry {case_of(problem)!r}")
  except ValueError as e:
    raise ValueError(f"{e}; regenerate it with experiments/bench_kernels.py "
                     "--mode=tune") from None
  return cfg if _shape_ok(problem, cfg) else None


def heuristic_config(problem: MatmulProblem) -> Config:
  """The tiling without a tuned entry (the one first measured)."""
  mode = mode_of(problem)
  if mode == "mx":
    # One 32-deep K block per pipeline step (a swizzled SMEM tile cannot be
    # sliced below its 128-byte swizzle width). Two f32 accumulators (running
    # sum and the block's partial) must fit in registers: 64 x 128 per
    # warpgroup, the two warpgroups stacked along M.
    return Config(tile_m=64, tile_n=128, tile_k=32, stages=8, wg_dim="m")
  if mode == "block":
    return Config(tile_m=64, tile_n=128, tile_k=128, stages=4, wg_dim="m")
  return Config()


def _default_config(problem: MatmulProblem) -> Config:
  """The tuned table's tiling for the case where it fits, else the
  heuristic's."""
  return tuned_config(problem) or heuristic_config(problem)


def _cta_tile(cfg: Config) -> tuple[int, int]:
  return (cfg.tile_m * (2 if cfg.wg_dim == "m" else 1),
          cfg.tile_n * (2 if cfg.wg_dim == "n" else 1))


# Shared memory a Hopper CTA may use (227 KiB), less a little for barriers.
MAX_SMEM_BYTES = 232448 - 1024


def smem_bytes(problem: MatmulProblem, cfg: Config) -> int:
  """Shared memory of one CTA: the pipeline's operand (and block / MX scale)
  tiles and the two epilogue tiles."""
  cta_m, cta_n = _cta_tile(cfg)
  mode = mode_of(problem)
  step_k = cfg.tile_k * (cfg.sub_blocks if mode == "mx" else 1)
  per_stage = (cta_m + cta_n) * step_k  # 8-bit codes
  if mode == "block":
    per_stage += (cta_m + cta_n) * 4
  elif mode == "mx":
    per_stage += (cta_m + cta_n) * 4 * (step_k // 32)
  out_bytes = 2 * 64 * cfg.epi_n * jnp.dtype(problem.out_dtype).itemsize
  return cfg.stages * per_stage + out_bytes


def _shape_ok(problem: MatmulProblem, cfg: Config) -> bool:
  m, n, k = problem.m, problem.n, problem.k
  cta_m, cta_n = _cta_tile(cfg)
  if cfg.sub_blocks != 1 and (mode_of(problem) != "mx" or cfg.sub_blocks < 1
                              or cfg.tile_k != 32):
    return False  # several 32-deep tiles a step: MX only
  return (m % cta_m == 0 and n % cta_n == 0
          and k % (cfg.tile_k * cfg.sub_blocks) == 0
          and cfg.tile_n % cfg.epi_n == 0
          and smem_bytes(problem, cfg) <= MAX_SMEM_BYTES)


# Where the dispatcher may take the kernel: (mode, codes) -> minimum (M, N, K).
# Measured on an H100 at 4096 x 8192 x 8192 (benchmarks/kernels_h100.md):
# per-token x per-channel fp8 1469 TFLOP/s (1.77x XLA bf16, 1.12x XLA's scaled
# fp8 dot) and int8 1641 TOP/s (1.98x bf16, 1.33x XLA's int8 dot); on the H200
# (benchmarks/kernels_h200.md, run_tune) 1416 / 1580, and block-scaled fp8 1102
# TFLOP/s (1.38x bf16, 1.74x XLA's dequantize-then-dot). MXFP8 (0.42x bf16,
# 0.52x XLA's path) and int8 codes with block scales (not timed) are not
# claimed.
MEASURED_WINS = {("channel", "fp8_e4m3"): (4096, 8192, 8192),
                 ("channel", "int8"): (4096, 8192, 8192),
                 ("block", "fp8_e4m3"): (4096, 8192, 8192)}


def supports(problem: MatmulProblem) -> bool:
  """Whether the kernel handles ``problem`` and beats XLA there (measured).

  Args:
    problem: the static description of the matmul.

  Returns:
    True only on a Hopper GPU, for shapes that tile evenly and the modes,
    codes and sizes where a benchmark (``MEASURED_WINS``) showed a win over
    XLA's own path.
  """
  # The backend first: a CPU or TPU process never reads the GPU's table.
  if not common.on_hopper_gpu(problem):
    return False
  if problem.w_order != "natural":
    return False  # 8-bit weights: no other order exists
  try:
    mode = mode_of(problem)
  except ValueError:
    return False
  win = MEASURED_WINS.get((mode, problem.w_format))
  if win is None:
    return False
  if any(d < w for d, w in zip((problem.m, problem.n, problem.k), win)):
    return False
  if problem.out_dtype not in ("bfloat16", "float32"):
    return False
  return _shape_ok(problem, _default_config(problem))


# ----------------------------------------------------------------------------
# Register helpers.
# ----------------------------------------------------------------------------

def _scale_channel(acc, sx_ref, sw_ref):
  """acc[r, c] * sx[r] * sw[c] for an f32 WGMMA fragment; refs are 1-D f32."""
  mgpu, fa, ir, arith, _, memref, vector = common._mlir()
  f32 = ir.F32Type.get()
  index = ir.IndexType.get()
  shape = tuple(acc.shape)
  bases = common.thread_col_base(shape)
  rows = {}
  cols = {}
  new_regs = acc.registers.copy()
  vty = ir.VectorType.get((2,), f32)
  for idx, row_key, col_tile in common.wgmma_reg_rows_cols(shape):
    row, col = bases[idx]
    if row_key not in rows:
      rows[row_key] = memref.load(sx_ref, [row])
    if col_tile not in cols:
      c0 = memref.load(sw_ref, [col])
      c1 = memref.load(sw_ref, [arith.addi(col, arith.constant(index, 1))])
      cols[col_tile] = vector.from_elements(vty, [c0, c1])
    sr = vector.broadcast(vty, rows[row_key])
    new_regs[idx] = arith.mulf(arith.mulf(acc.registers[idx], sr),
                               cols[col_tile])
  return fa.FragmentedArray(_registers=new_regs, _layout=acc.layout,
                            _is_signed=None)


def _promote_block(acc, part, sx_ref, sw_ref):
  """acc + part * sx[r] * sw for the 1x128 x 128x128 scheme.

  ``sx_ref`` is the ``[tile_m]`` f32 slice of this step's activation scales and
  ``sw_ref`` a 1-element f32 ref with the weight tile's scale.
  """
  mgpu, fa, ir, arith, _, memref, vector = common._mlir()
  f32 = ir.F32Type.get()
  index = ir.IndexType.get()
  shape = tuple(acc.shape)
  rows = common.wgmma_row_index(shape)
  sw = memref.load(sw_ref, [arith.constant(index, 0)])
  vty = ir.VectorType.get((2,), f32)
  cache = {}
  new_regs = acc.registers.copy()
  for idx, row_key, _ in common.wgmma_reg_rows_cols(shape):
    if row_key not in cache:
      s = arith.mulf(memref.load(sx_ref, [rows[row_key]]), sw)
      cache[row_key] = vector.broadcast(vty, s)
    p = part.registers[idx]
    if ir.VectorType(p.type).element_type != f32:
      p = arith.sitofp(vty, p)
    new_regs[idx] = vector.fma(p, cache[row_key], acc.registers[idx])
  return fa.FragmentedArray(_registers=new_regs, _layout=acc.layout,
                            _is_signed=None)


def _promote_mx(acc, part, sx_ref, sw_ref):
  """acc + part * (sx[r] * sw[c]) with f32 scale refs (decoded E8M0 values).

  One f32 product of the two scales and one FMA per element, exactly as
  ``reference`` computes ``acc + p * (sx * sw)``.
  """
  mgpu, fa, ir, arith, _, memref, vector = common._mlir()
  f32 = ir.F32Type.get()
  shape = tuple(acc.shape)
  bases = common.thread_col_base(shape)
  vty = ir.VectorType.get((2,), f32)
  rows = {}
  cols = {}
  new_regs = acc.registers.copy()
  for idx, row_key, col_tile in common.wgmma_reg_rows_cols(shape):
    row, col = bases[idx]
    if row_key not in rows:
      rows[row_key] = vector.broadcast(vty, memref.load(sx_ref, [row]))
    if col_tile not in cols:
      cols[col_tile] = vector.load(vty, sw_ref, [col])
    s = arith.mulf(rows[row_key], cols[col_tile])
    new_regs[idx] = vector.fma(part.registers[idx], s, acc.registers[idx])
  return fa.FragmentedArray(_registers=new_regs, _layout=acc.layout,
                            _is_signed=None)


# ----------------------------------------------------------------------------
# Interpret-mode twins of the register helpers above (whole-tile jnp).
#
# The Mosaic GPU interpreter cannot run ``inline_mgpu`` bodies; with
# ``interpret`` the kernel calls these instead, on the same refs and indices.
# The pipeline, the persistent tile loop, barriers and the epilogue's SMEM ->
# GMEM copies are the compiled kernel's own code.
# ----------------------------------------------------------------------------

def _jnp_scale_channel(acc, sx, sw):
  """``_scale_channel``: ``(acc * sx[r]) * sw[c]`` in f32 (int32 converted first)."""
  return (acc.astype(jnp.float32) * sx[:, None]) * sw[None, :]


def _jnp_promote(acc, part, sx, sw):
  """``_promote_block`` / ``_promote_mx``: ``acc + part * (sx[r] * sw[c])``.

  ``sw`` is ``[1]`` (one 128 x 128 weight tile) or ``[cols]`` (MX). The compiled
  kernel fuses the last multiply-add (one rounding); this twin rounds twice, as
  ``reference`` does.
  """
  return acc + part.astype(jnp.float32) * (sx[:, None] * sw[None, :])


# ----------------------------------------------------------------------------
# The kernel.
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _build(mode: str, code: str, m: int, n: int, k: int, out_dtype: str,
           cfg: Config, interpret=None):
  """Builds the persistent warp-specialized kernel for one static problem.

  ``interpret`` (``InterpretGPUParams`` or None) runs it in the Mosaic GPU
  interpreter, with the register helpers replaced by their ``_jnp_*`` twins.
  """
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_m, cta_n = _cta_tile(cfg)
  wg_m = cfg.wg_dim == "m"
  # MX: ``sub_blocks`` 32-deep tiles of x and W a pipeline step.
  nb = cfg.sub_blocks if mode == "mx" else 1
  m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // (tile_k * nb)
  is_int = code == "int8"
  acc_dtype = jnp.int32 if is_int else jnp.float32
  out_jdtype = jnp.dtype(out_dtype)
  swz = plgpu.find_swizzle(tile_k * 8, "operand tile")
  op_transforms = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz))
  epi_m = 64
  epi_n = cfg.epi_n
  out_swz = plgpu.find_swizzle(epi_n * out_jdtype.itemsize * 8, "out tile")
  out_transforms = (
      plgpu.TilingTransform((8, out_swz // out_jdtype.itemsize)),
      plgpu.SwizzleTransform(out_swz))
  sub_k = 32 if mode == "mx" else tile_k
  interp = interpret is not None
  code_jdtype = jnp.int8 if is_int else jnp.float8_e4m3fn
  if mode == "block" and tile_k != 128:
    raise ValueError("block mode needs tile_k == 128")

  def kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, o_gmem):
    in_specs = [
        plgpu.BlockSpec((rows, tile_k), lambda kk, t=t: (0, kk * nb + t),
                        transforms=op_transforms, memory_space=plgpu.SMEM)
        for rows in (cta_m, cta_n) for t in range(nb)]
    if mode == "block":
      # sx^T [K/128, M] and the weight scales expanded along N: [K/128, N].
      in_specs += [
          plgpu.BlockSpec((1, cta_m), lambda kk: (kk, 0),
                          memory_space=plgpu.SMEM),
          plgpu.BlockSpec((1, cta_n), lambda kk: (kk, 0),
                          memory_space=plgpu.SMEM),
      ]
    elif mode == "mx":
      nsub = tile_k * nb // 32
      in_specs += [
          plgpu.BlockSpec((nsub, cta_m), lambda kk: (kk, 0),
                          memory_space=plgpu.SMEM),
          plgpu.BlockSpec((nsub, cta_n), lambda kk: (kk, 0),
                          memory_space=plgpu.SMEM),
      ]

    def get_pipeline(body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=40, in_specs=in_specs,
          wg_axis="wg", num_compute_wgs=2,
          max_concurrent_steps=cfg.stages, compute_context=compute_context)

    ignore = lambda *_, **__: None
    gm_args = lambda mi, ni: [
        x_gmem.at[pl.ds(mi * cta_m, cta_m), :]] * nb + [
        w_gmem.at[pl.ds(ni * cta_n, cta_n), :]] * nb + (
        [] if mode == "channel" else [
        sx_gmem.at[:, pl.ds(mi * cta_m, cta_m)],
        sw_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
    ])

    @functools.partial(
        pl.run_scoped,
        allocs=get_pipeline(ignore, ignore).get_allocations(*gm_args(0, 0)),
        out_smem=plgpu.SMEM((2, epi_m, epi_n), out_jdtype,
                            transforms=out_transforms),
        # Interpret mode only: per-warpgroup operand staging for the wgmma.
        **({} if not interp else dict(
            stage_a=plgpu.SMEM((2, tile_m, sub_k), code_jdtype),
            stage_b=plgpu.SMEM((2, sub_k, tile_n), code_jdtype))),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem, **stage_refs):
      wg = lax.axis_index("wg")
      stage = (stage_refs["stage_a"].at[wg], stage_refs["stage_b"].at[wg]) if (
          interp) else None

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _loop(info):
        (lin,) = info.index
        mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1,
                                    cfg.grid_tile_width)
        if wg_m:
          wg_m0 = mi * cta_m + wg * tile_m
          wg_n0 = ni * cta_n
          wg_rows = pl.ds(wg * tile_m, tile_m)
          wg_cols = pl.ds(0, tile_n)
        else:
          wg_m0 = mi * cta_m
          wg_n0 = ni * cta_n + wg * tile_n
          wg_rows = pl.ds(0, tile_m)
          wg_cols = pl.ds(wg * tile_n, tile_n)

        def epilogue(acc):
          if mode == "channel" and interp:
            acc = _jnp_scale_channel(acc, sx_gmem[pl.ds(wg_m0, tile_m)],
                                     sw_gmem[pl.ds(wg_n0, tile_n)])
          elif mode == "channel":
            @plgpu.inline_mgpu(
                arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()),
                return_type=plgpu.ShapeDtypeStruct(
                    (tile_m, tile_n), jnp.float32, plgpu.Layout.WGMMA))
            def scale(_, a, sx, sw):
              if is_int:
                a = a.astype(common._mlir()[2].F32Type.get())
              return _scale_channel(a, sx, sw)
            acc = scale(acc, sx_gmem.at[pl.ds(wg_m0, tile_m)],
                        sw_gmem.at[pl.ds(wg_n0, tile_n)])
          out = acc.astype(out_jdtype)
          for em in range(tile_m // epi_m):
            for en in range(tile_n // epi_n):
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              out_smem[wg] = out[em * epi_m:(em + 1) * epi_m,
                                 en * epi_n:(en + 1) * epi_n]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg],
                  o_gmem.at[pl.ds(wg_m0 + em * epi_m, epi_m),
                            pl.ds(wg_n0 + en * epi_n, epi_n)])

        if mode == "channel":
          def compute_context(run):
            @functools.partial(pl.run_scoped,
                               acc_ref=plgpu.ACC((tile_m, tile_n), acc_dtype))
            def _acc(acc_ref):
              run(acc_ref)
              epilogue(acc_ref[...])

          def body(_, x_smem, w_smem, acc_ref):
            a = x_smem.at[wg_rows] if wg_m else x_smem
            if interp:
              common.interpret_wgmma(acc_ref, a[...], w_smem.at[wg_cols][...],
                                     stage)
            else:
              plgpu.wgmma(acc_ref, a,
                          common.transpose_ref(w_smem.at[wg_cols]))
            plgpu.wgmma_wait(0)
            return acc_ref
        else:
          def compute_context(run):
            init = jnp.zeros((tile_m, tile_n), jnp.float32)
            if not interp:  # the interpreter has no layouts
              init = plgpu.layout_cast(init, plgpu.Layout.WGMMA)
            epilogue(run(init))

          def body(_, *refs):
            # nb tiles of x, nb of W, the scale rows of the step, the sum.
            sx_smem, sw_smem, acc = refs[2 * nb:]
            for blk, x_smem, w_smem, j in (
                (t * (tile_k // sub_k) + j, refs[t], refs[nb + t], j)
                for t in range(nb) for j in range(tile_k // sub_k)):
              ks = pl.ds(j * sub_k, sub_k)

              def mma(part_ref):
                if interp:
                  common.interpret_wgmma(part_ref, x_smem.at[wg_rows, ks][...],
                                         w_smem.at[wg_cols, ks][...], stage)
                else:
                  plgpu.wgmma(part_ref, x_smem.at[wg_rows, ks],
                              common.transpose_ref(w_smem.at[wg_cols, ks]))
                plgpu.wgmma_wait(0)
                return part_ref[...]
              part = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), acc_dtype))
              if interp:
                sw_cols = (pl.ds(wg_cols.start, 1) if mode == "block"
                           else wg_cols)
                acc = _jnp_promote(acc, part,
                                   sx_smem[0 if mode == "block" else blk, wg_rows],
                                   sw_smem[0 if mode == "block" else blk, sw_cols])
              elif mode == "block":
                @plgpu.inline_mgpu(
                    arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA,
                               plgpu.RefType(), plgpu.RefType()),
                    return_type=plgpu.ShapeDtypeStruct(
                        (tile_m, tile_n), jnp.float32, plgpu.Layout.WGMMA))
                def promote(_, a, p, sx, sw):
                  return _promote_block(a, p, sx, sw)
                acc = promote(acc, part, sx_smem.at[0, wg_rows],
                              sw_smem.at[0, pl.ds(wg_cols.start, 1)])
              else:
                @plgpu.inline_mgpu(
                    arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA,
                               plgpu.RefType(), plgpu.RefType()),
                    return_type=plgpu.ShapeDtypeStruct(
                        (tile_m, tile_n), jnp.float32, plgpu.Layout.WGMMA))
                def promote(_, a, p, ex, ew):
                  return _promote_mx(a, p, ex, ew)
                acc = promote(acc, part, sx_smem.at[blk, wg_rows],
                              sw_smem.at[blk, wg_cols])
            return acc

        get_pipeline(body, compute_context)(*gm_args(mi, ni), allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  ctas = cfg.ctas or (2 if interp else (
      common.num_sms() if _on_gpu() else 132))
  kern = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m, n), out_jdtype),
      grid=(ctas,),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Lane),
      **({} if interpret is None else {"interpret": interpret}),
  )
  return kern


def _on_gpu() -> bool:
  try:
    return jax.devices()[0].platform == "gpu"
  except RuntimeError:
    return False


def matmul(operands: MatmulOperands, problem: MatmulProblem, *,
           config: Optional[Config] = None, interpret=False) -> jax.Array:
  """Runs the Mosaic GPU W8A8 kernel.

  Args:
    operands: ``x`` codes ``[M, K]``, ``w_codes [N, K]``, ``x_scale`` and
      ``w_scale`` as described in the module docstring.
    problem: the static description; ``supports(problem)`` should be True.
    config: tiling override (benchmarks).
    interpret: False to compile for a Hopper GPU; True (or an
      ``InterpretGPUParams``, e.g. with ``detect_races=True``) to run the kernel
      on the CPU in the Mosaic GPU interpreter, for testing. See
      ``_gpu_common.interpret_params``.

  Returns:
    ``[M, N]`` in ``problem.out_dtype``.

  Raises:
    ValueError: for unsupported formats or shapes that do not tile.
  """
  params = common.interpret_params(interpret)
  mode = mode_of(problem)
  cfg = config or _default_config(problem)
  if params is not None:
    common.check_interpreter_threads(3)
  if not _shape_ok(problem, cfg):
    raise ValueError(f"shape M={problem.m} N={problem.n} K={problem.k} does not "
                     f"fit the tiling {cfg} (tiles must divide M, N and K; "
                     f"{smem_bytes(problem, cfg)} bytes of shared memory "
                     f"against {MAX_SMEM_BYTES})")
  check_scale_dtypes(operands, problem, "gpu_w8a8")
  code = problem.w_format if mode != "mx" else "fp8_e4m3"
  kern = _build(mode, code, problem.m, problem.n, problem.k, problem.out_dtype,
                cfg, params)
  m, n, k = problem.m, problem.n, problem.k
  if mode == "channel":
    sx = operands.x_scale.reshape(m).astype(jnp.float32)
    sw = operands.w_scale.reshape(n).astype(jnp.float32)
  elif mode == "block":
    sx = operands.x_scale.reshape(m, k // 128).astype(jnp.float32).T
    sw = jnp.repeat(operands.w_scale.reshape(n // 128, k // 128).astype(
        jnp.float32), 128, axis=0).T
  else:
    # E8M0 -> f32 once per call (exact), transposed to [K/32, rows].
    sx = common.decode_e8m0(operands.x_scale.reshape(m, k // 32)).T
    sw = common.decode_e8m0(operands.w_scale.reshape(n, k // 32)).T
  if params is None:
    return kern(operands.x, operands.w_codes, sx, sw)
  return common.run_interpreted(kern, operands.x, operands.w_codes, sx, sw)
