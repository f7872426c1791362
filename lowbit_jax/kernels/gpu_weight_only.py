"""Weight-only low-bit matmul (W4A16 / W8A16 family) for Hopper GPUs, in Mosaic GPU.

Computes ``y[M, N] = x[M, K] @ dequant(W)[N, K]^T`` for bf16 activations and
int4 / int8 (per channel or groups of 32, 64, 128 along K), fp4 E2M1 with
per-channel or group scales, MXFP4 (E2M1 codes, E8M0 scales per 32) and NVFP4
(E2M1 codes, E4M3 scales per 16, one float32 tensor scale) weights.

The kernel swaps the operands, ``y^T = W x^T`` (the scheme of Marlin, Frantar et
al. 2024, "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large
Language Models"): a ``[tile_n, tile_k]`` weight tile is the WGMMA M side and is
dequantized in registers (int4 -> bf16 through the magic-exponent trick Mosaic GPU
implements; E2M1 -> bf16 by placing the three magnitude bits in the exponent/mantissa
of a bf16 and multiplying by 2**126, or with ``Config.lut_decode`` by two byte-permute
table lookups), while the activation tile ``[tile_m, K]``
(tile_m = 8 .. 256) is the N side read transposed from shared memory. Weight and
activation tiles stream through a TMA pipeline of several stages; group scales of a
weight tile are loaded once per CTA and applied per register; per-channel and
tensor scales are applied to the f32 accumulator. A K split adds parallelism for
short N (partials in f32, summed by XLA; with ``Config.cluster_reduce`` the K
slices of a tile are one thread-block cluster and sum their partials through
distributed shared memory, so the kernel writes the output itself).

``matmul(..., interpret=True)`` runs the same kernel on the CPU in the Mosaic GPU
interpreter (simulated shared memory, TMA and barriers, optional race detection);
only the in-register helpers are swapped for whole-tile jnp twins there, because
the interpreter cannot run raw MLIR (``tests/kernels/test_gpu_interpret.py``).

Three variants: the default runs one warpgroup per CTA (``Config(ws=False)``,
the one measured on an H100); ``Config(ws=True)`` is warp-specialized (a TMA
warpgroup and two compute warpgroups that each take half of every K step and add
their partial sums through shared memory), tested on CPU and the H200, where it
was slower than the default on every decode row timed
(benchmarks/kernels_h200_runs/run_tune2.md); the tuner no longer tries it.
``Config(ws=True, n_split=True)`` gives the two compute warpgroups half of the
CTA's weight rows each instead (a ``tile_n`` of 128 or 256): both read the one
activation tile the TMA warpgroup loads, each dequantizes and multiplies its
own rows, keeps its own accumulator and writes its own output columns, so no
partial sums meet. It is the split the notes of run_tune2 and of the Nsight
profile ask for (``benchmarks/kernels_h200_notes.md``): two warpgroups
decoding while the other's WGMMA runs, and from M = 64 on an activation tile
read once for 128-256 weight rows rather than for 64 (the activation re-reads
through L2 are what the one-warpgroup kernel's 64x128 tiles pay for at
M = 256). The tuner offers it as a candidate and the table keeps it only
where it measures fastest: on the H200 that is M = 64 and 256 on
8192x28672 for int4 per channel, int4 g128 and int8 per channel
(``benchmarks/kernels_h200.md``).

4-bit codes may be stored in the kernel's register order
(``MatmulProblem.w_order="wgmma"``, codes by ``_qarray.wgmma_byte_order``; for QArrays
``ops.set_code_order``): the bytes of each 16-byte run along K transposed as
a 4 x 4 grid, so that the 32-bit word a thread loads from shared memory is
already its WGMMA fragment and the relayout Mosaic GPU otherwise emits (two
warp shuffles and two byte permutes per eight codes) disappears. The bits
are the same as with natural codes; on the H200 the same tiling ran
0.96-1.38x as fast (benchmarks/wgmma_order_h200.md) and the retuned decode at
M = 1 and 16 1.09-1.39x the table's natural rows
(benchmarks/kernels_h200_runs/run_wg1.md).
The table keeps such rows as ``<case>@wgmma``; where it has none,
``reordered_estimate`` adapts the natural row.

E2M1 codes (fp4_e2m1, MXFP4, NVFP4) may go one step further
(``w_order="wgmma_e2m1"``, ``_qarray.split_bits``): the bits of each
32-bit word permuted so that each pair of codes is a rotation and a mask of
the word away from the bf16 bits of its values times 2**-126, which one
exact multiply by 2**126 restores (``e2m1_split_ptx``). The E2M1 rows were
issue-bound on the H200 (MXFP4 on 8192x28672 at M = 1 took the same time on
the H100, with 70% of its bandwidth), and with scale_words and lut_regs
the table decode still spends 1.9-2.2 integer instructions an element on
the ALU pipe (PRMT, LOP3, SHF) against int4's 1.1; this decode 1.1-1.5
(benchmarks/decode_sass.md), the second multiply going to the FMA pipe. On
the H200 it took MXFP4 on 8192x28672 at M = 1 from 53.5 to 43.9 us (two
calls: benchmarks/kernels_h200_runs/run_wg3.md, run_sp1.md). The table
decode's options do
not apply (``e2m1_split_config``); the table keeps such rows as
``<case>@wgmma_e2m1`` and, where it has none, takes the ``@wgmma`` row.
Signed int4 codes likewise (``w_order="wgmma_int4"``, ``int4_split_ptx``):
each pair of a word in nibbles ``i`` and ``i + 4``, one shift from the input
of Mosaic GPU's own int4 conversion, which then needs no byte permute
(1.84 -> 1.59 instructions an element for int4 per channel, 2.37 -> 2.12 in
groups of 128, benchmarks/decode_sass.md). On an H100 it took int4 g128
at M = 1 from 18.2 to 15.5 us on 8192x8192 and from 51.6 to 48.3 on
8192x28672, int4 per channel level there (46.0 / 46.6 us), two calls of
session 38 (``benchmarks/kernels_h100_s38.md``); the H200 has not timed it.

Dispatch is data: ``gpu_tuned_configs.json`` beside this file (written by
``experiments/bench_kernels.py --mode=tune``) holds, per weight case (``int4_g128``,
``int8_pc``, ...), shape class (``shape_class``) and M bucket (``m_bucket``), the
tiling measured fastest and whether it beat the path it replaces there: the
quantized ``dot_general``'s own XLA path (``ops.dot_general`` with
``use_kernel="never"``, the entry's ``baseline`` ``"fallback"``), or, in rows
measured before session 44, XLA's fused path (``xla_fused_matmul``, baseline
``"xla_fused"``), which is not what the public dot runs without a kernel and is
slower than it for group scales (on the H200, int4 g128 on 8192x8192: 136
against 95 us at M = 256, 831 against 714 at M = 4096; the fused column of
``benchmarks/kernels_h200.md`` against the matmul table of
``benchmarks/primitives_h200.md``, two runs). ``supports`` says yes
only where the table says the kernel won; everywhere else the quantized
``dot_general`` keeps its XLA path.
That file was measured on the H200; a run on another Hopper part (the H100)
writes ``gpu_tuned_configs.<device>.json``, whose rows win on that part
(``table_for_device``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from lowbit_jax.core._qarray import (E2M1_SPLIT_MASK, SPLIT_ORDERS, from_code_order,
                                     pack, split_bits, wgmma_byte_order)
from lowbit_jax.formats import IntFormat
from lowbit_jax.kernels import _gpu_common as common
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem, check_scale_dtypes

_FORMATS = ("int4", "int8", "fp4_e2m1", "mxfp4", "nvfp4")
E2M1_FORMATS = ("fp4_e2m1", "mxfp4", "nvfp4")  # E2M1 codes
# The codes each split code order (``_qarray.SPLIT_ORDERS``) lays out: their
# kind and the weight formats that have them.
SPLIT_ORDER_FORMATS = {"wgmma_e2m1": ("E2M1", E2M1_FORMATS),
                       "wgmma_int4": ("int4", ("int4",))}


def split_order_for(fmt: str) -> Optional[str]:
  """The split code order that lays out ``fmt``'s codes, or None."""
  return next((o for o, (_, fs) in SPLIT_ORDER_FORMATS.items() if fmt in fs),
              None)
_GROUPS = {"int4": (None, 32, 64, 128), "int8": (None, 32, 64, 128),
           "fp4_e2m1": (None, 32, 64, 128), "mxfp4": (32,), "nvfp4": (16,)}


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of the weight-only kernel.

  Attributes:
    tile_n: weight rows per CTA (a multiple of 64; the WGMMA M side).
    tile_k: K elements per pipeline step.
    tile_m: activation rows per CTA (multiple of 8, at most 256; WGMMA N
      side). 256 reads the weight once for M = 256 (the accumulator is then
      128 registers a thread for 64 weight rows a warpgroup).
    stages: pipeline depth (TMA copies in flight).
    split_k: number of K slices computed by separate CTAs.
    ws: warp-specialized (a TMA warpgroup and two compute warpgroups, each
      taking half of every K step) instead of one warpgroup doing everything.
    n_split: with ``ws``, the two compute warpgroups split the CTA's
      ``tile_n`` weight rows (each ``tile_n // 2``, a multiple of 64) and the
      whole of every K step, instead of half of every K step and all rows;
      no reduction between them.
    lut_decode: for E2M1 weights, decode by two byte-permute table lookups
      (``_e2m1_regs_to_bf16_lut``: about 4 instructions a pair of codes and
      the exact bf16 values, no multiply by 2**126), instead of the
      bit-by-bit path or ``fast_decode``'s permutes (``fast_decode`` still
      picks NVFP4's scale conversion); no effect on int4 / int8.
    fast_decode: for E2M1 weights (fp4_e2m1, MXFP4, NVFP4), decode two codes
      with byte permutes (``_E2M1_PTX``, about half the instructions of the
      bit-by-bit path) and convert NVFP4's E4M3 scales with the hardware
      ``cvt`` (``_E4M3_PTX``); no effect on int4 / int8.
    k_chunks: each K step's weight tile is dequantized and multiplied in this
      many column chunks, every chunk's WGMMA issued before the next chunk is
      decoded and one wait at the end of the step, so the tensor cores work
      on chunk c while the warpgroup decodes chunk c + 1 (with 1, every
      step's decode waits for the previous step's MMA). The registers in
      flight are the same (the step's whole tile is held either way); the
      shared-memory tiles are swizzled by the chunk's width.
    cluster_reduce: with ``split_k`` of 2, 4 or 8 (one warpgroup, not
      ``ws``), the K slices of one output tile run as one thread-block
      cluster and add their partial sums through distributed shared memory
      (``_cluster_sum_acc``): the kernel writes the output itself, in its
      dtype, instead of ``[split_k, M, N]`` float32 partials that XLA sums in
      a second kernel (3.4-3.6 us after each decode kernel in the Nsight
      profile of ``benchmarks/kernels_h200_notes.md``, caches flushed; 1.1-1.7
      us with warm caches as the benchmarks time it, on an H100 in session
      40, where a reduction through a global semaphore instead of a cluster
      lost to both: BUILD.md).
    scale_words: MXFP4 / NVFP4 only: a row's group scales are read four at a
      time (one 32-bit shared-memory load) and converted together
      (``_E8M0_WORD_PTX``: 3.25 SASS instructions a scale against 7;
      ``_E4M3_WORD_PTX``: 2.75 against 5; benchmarks/scale_words_sass.md),
      where a K chunk holds a multiple of four groups.
    lut_regs: with ``lut_decode``: the lookup tables' words are stored to
      shared memory at the kernel's start and read from there by each
      decode, so that ptxas keeps them in registers instead of rebuilding
      a constant before every lookup (``_E2M1_LUT_IDX_REGS_PTX``).
    acc_scale: group scales of int4 / int8 / fp4 weights (bf16 or float32,
      in groups of 64 or 128 along K) applied to the accumulator instead of
      the weight tile: each K chunk is exactly one group
      (``tile_k // k_chunks == group``), its MMA goes into a fresh
      accumulator, and the chunk's float32 scale multiplies that partial
      sum into the running one with one FMA per element
      (``_promote_rows``). The decode then has no multiply: 0.5 fewer
      instructions an element for a 2-byte-scale format, against about 0.1
      for the promotion (a thread's two scale loads and its accumulator
      FMAs per group). The weights also stay exact (the codes are exact in
      bf16), where the weight-tile path rounds each ``code * scale`` (and a
      float32 scale) to bf16; float32 scales stay float32 where they fit
      in shared memory (``kernel_scales``). So the sums are closer to
      ``reference``'s float32 ones and not bit-identical to the other
      path's. One
      warpgroup (not ``ws``); for MXFP4's and NVFP4's groups of 32 and 16
      the promotion would cost as much as the multiply it saves. On an
      H100 (session 43, ``benchmarks/kernels_h100_runs/run_acc_h100.md``,
      int4 g128 on ``"wgmma_int4"`` codes) it was 1-3% slower than the
      same tiling without it (8192x28672 at M = 1: 49.6 against 48.4 us;
      8192x8192: 15.6 against 15.4): there the kernel sits at 80-83% of the
      roofline, where fewer instructions buy little; the H200, where the
      decode's instructions cost time (``benchmarks/kernels_h200_notes.md``),
      has not timed it. The tuner offers it (``refine``) and the table keeps
      it only where it measures fastest.
  """
  tile_n: int = 64
  tile_k: int = 256
  tile_m: int = 16
  stages: int = 4
  split_k: int = 1
  ws: bool = False
  fast_decode: bool = False
  k_chunks: int = 1
  n_split: bool = False
  lut_decode: bool = False
  cluster_reduce: bool = False
  scale_words: bool = False
  lut_regs: bool = False
  acc_scale: bool = False


# A portable thread-block cluster holds at most 8 CTAs.
CLUSTER_SPLITS = (2, 4, 8)


def _validate(problem: MatmulProblem) -> None:
  if problem.x_format is not None:
    raise ValueError("gpu_weight_only handles weight-only problems (x_format "
                     f"None), got x_format={problem.x_format!r}")
  if problem.w_format not in _FORMATS:
    raise ValueError(f"gpu_weight_only supports {_FORMATS}, got "
                     f"{problem.w_format!r}")
  g = common.weight_group(problem)
  if g not in _GROUPS[problem.w_format]:
    raise ValueError(f"{problem.w_format} weights take w_block in "
                     f"{_GROUPS[problem.w_format]}, got {g}")
  if g is not None and problem.k % g:
    raise ValueError(f"K={problem.k} is not a multiple of the group size {g}")
  if problem.w_order != "natural" and (problem.w_format == "int8" or problem.k % 32):
    raise ValueError(f"w_order={problem.w_order!r} reorders 4-bit codes in runs "
                     f"of 32 along K: it needs a 4-bit format and K a multiple "
                     f"of 32, got {problem.w_format} with K={problem.k}")
  if (problem.w_order in SPLIT_ORDERS
      and split_order_for(problem.w_format) != problem.w_order):
    kind, fmts = SPLIT_ORDER_FORMATS[problem.w_order]
    raise ValueError(f"w_order={problem.w_order!r} lays out {kind} codes "
                     f"({', '.join(fmts)}) for their decode, got "
                     f"{problem.w_format}; use w_order='wgmma'")


def reference(operands: MatmulOperands, problem: MatmulProblem) -> jax.Array:
  """Pure-jnp definition: exact float32 dequantization, float32 matmul.

  Args:
    operands: ``x [M, K]`` float, ``w_codes`` / ``w_scale`` (/ ``w_tensor_scale``
      for NVFP4) in the layout of ``lowbit_jax.kernels._api``.
    problem: the static description.

  Returns:
    ``[M, N]`` in ``problem.out_dtype``.

  Raises:
    ValueError: if the problem is not a weight-only format this module covers.
  """
  _validate(problem)
  w = common.dequantize_weight(operands, problem)
  y = jnp.dot(operands.x.astype(jnp.float32), w.T,
              precision=lax.Precision.HIGHEST,
              preferred_element_type=jnp.float32)
  return y.astype(problem.out_dtype)


def xla_dequant_matmul(operands: MatmulOperands,
                       problem: MatmulProblem) -> jax.Array:
  """XLA's own low-bit path: dequantize to bf16 in jnp, then one dot.

  This is what runs without a kernel (and what the benchmark compares against):
  codes are unpacked and scaled in bf16, the dot accumulates in f32.
  """
  _validate(problem)
  w = common.dequantize_weight(operands, problem).astype(jnp.bfloat16)
  y = lax.dot_general(operands.x.astype(jnp.bfloat16), w,
                      (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32)
  return y.astype(problem.out_dtype)


def _codes_to_bf16(operands: MatmulOperands, problem: MatmulProblem,
                   decode: str) -> jax.Array:
  """The ``[N, K]`` weight codes as bf16 values (no scale applied)."""
  n, k = problem.n, problem.k
  fmt = problem.w_format
  codes = operands.w_codes
  if fmt == "int8":
    return codes.astype(jnp.bfloat16)
  codes = from_code_order(codes, problem.w_order)
  if decode == "native":
    # Bitcasts to the 4-bit dtypes XLA converts (and fuses into the dot). The
    # barrier keeps the uint8 -> 4-bit bitcast out of the dot's fusion: XLA's
    # GPU GemmFusion (jax 0.10.2 and 0.11.2) aborts the process
    # (triton_tiling_propagation "Check failed: dst_dim_it != dst_dim_end")
    # when it traces a fused convert back through the element-count-changing
    # bitcast ``u8[N, K/2] -> s4[N, K/2, 2]`` to a parameter (per-channel int4
    # at every M; experiments/xla_gemm_fusion_check.py). Behind the barrier the
    # fusion's operand is the 4-bit ``[N, K]`` array itself, still converted
    # inside the GEMM (read in its stored width); the barrier copies nothing.
    narrow = jnp.int4 if fmt == "int4" else jnp.float4_e2m1fn
    w4 = lax.optimization_barrier(
        lax.bitcast_convert_type(codes, narrow).reshape(n, k))
    return w4.astype(jnp.bfloat16)
  if decode == "arith":
    nib = common.unpack_nibbles(codes)
    vals = common.decode_int4(nib) if fmt == "int4" else common.decode_e2m1(nib)
    return vals.astype(jnp.bfloat16)
  raise ValueError(f"decode must be 'native' or 'arith', got {decode!r}")


def _scales_f32(operands: MatmulOperands, problem: MatmulProblem,
                decode: str) -> tuple:
  """Weight scales as float32 ``[N, groups]``, and a scale for the output.

  Returns:
    ``(scale, post)``: ``post`` is NVFP4's tensor scale (else None), applied
    to the dot's float32 output, as the kernel applies it: folded into the
    E4M3 block scales it made their product a float32 subnormal for a tensor
    scale near 2**-126 (flushed to 0 by XLA on CPU, so the weight read as 0),
    and rounded that product to bf16's 8 bits.
  """
  fmt = problem.w_format
  s = operands.w_scale
  if fmt == "mxfp4":
    s = (lax.bitcast_convert_type(s, jnp.float8_e8m0fnu).astype(jnp.float32)
         if decode == "native" else common.decode_e8m0(s))
  else:
    s = s.astype(jnp.float32)
  post = None
  if fmt == "nvfp4" and operands.w_tensor_scale is not None:
    post = jnp.asarray(operands.w_tensor_scale, jnp.float32)
  return s.reshape(problem.n, -1), post


def xla_fused_matmul(operands: MatmulOperands, problem: MatmulProblem, *,
                     decode: str = "native") -> jax.Array:
  """XLA's best plain-jnp weight-only path: ``(x @ w.astype(bf16)) * scale``.

  The code-to-bf16 convert feeds the dot directly, so XLA fuses it into the GEMM
  (the weight is read once, in its stored width). Per-channel scales multiply the
  f32 result; group scales cannot leave the sum, so they multiply the bf16
  weight (``w.reshape(N, K/g, g) * s``) inside the same fusion. NVFP4's
  tensor scale multiplies the f32 result, as the kernel applies it. This is
  the baseline issue 13 names for a weight-only kernel. Where ``supports``
  says no, the public ``ops.dot_general`` runs its own path (per-channel
  codes into the dot as here; group scales in a dot batched over the
  groups at small M, else dequantized before the dot), which the tuned
  table's newer rows are decided against. (MXFP4's E8M0 code 0, 2**-127, is a subnormal scale
  here: exact on GPU, flushed to 0 by XLA on CPU.)

  Args:
    operands: as for ``reference``.
    problem: the static description.
    decode: "native" bitcasts packed codes to ``int4`` / ``float4_e2m1fn`` (and
      E8M0 scales to ``float8_e8m0fnu``) and lets XLA convert them; "arith"
      decodes them with integer arithmetic (for backends without those types).

  Returns:
    ``[M, N]`` in ``problem.out_dtype``.
  """
  _validate(problem)
  n, k = problem.n, problem.k
  w = _codes_to_bf16(operands, problem, decode)
  s, post = _scales_f32(operands, problem, decode)
  g = common.weight_group(problem)
  x = operands.x.astype(jnp.bfloat16)
  dn = (((1,), (1,)), ((), ()))
  if g is None:
    y = lax.dot_general(x, w, dn, preferred_element_type=jnp.float32)
    y = y * s.reshape(1, n)
  else:
    w = (w.reshape(n, k // g, g) * s.astype(jnp.bfloat16)[:, :, None]).reshape(
        n, k)
    y = lax.dot_general(x, w, dn, preferred_element_type=jnp.float32)
  if post is not None:
    # The barrier keeps XLA's algebraic simplifier from moving the scalar into
    # the dot's smaller operand (x * t), which would be subnormal again.
    y = lax.optimization_barrier(y) * post
  return y.astype(problem.out_dtype)


# ----------------------------------------------------------------------------
# Dispatch policy.
# ----------------------------------------------------------------------------

def _decode_config(problem: MatmulProblem) -> Config:
  """The tiling used for a problem.

  Decode (M <= 16) uses the single-warpgroup kernel with a K split of 2: the
  variant measured fastest on the H100 (``benchmarks/kernels_h100.md``, sweep).
  The K split doubles further while there are fewer CTAs than SMs.
  """
  m, n = problem.m, problem.n
  if m <= 16:
    tile_m, tile_k, stages = max(8, -(-m // 8) * 8), 256, 4
  elif m <= 64:
    tile_m, tile_k, stages = -(-m // 8) * 8, 256, 3
  else:
    tile_m, tile_k, stages = 128, 128, 3
  cfg = Config(tile_n=64, tile_k=tile_k, tile_m=tile_m, stages=stages,
               split_k=1, ws=False)
  ctas = (n // 64) * (-(-m // tile_m))
  while ((cfg.split_k < 2 and m <= 16) or ctas * cfg.split_k < 100) and (
      cfg.split_k < 8):
    trial = dataclasses.replace(cfg, split_k=cfg.split_k * 2)
    if not _shape_ok(problem, trial):
      break
    cfg = trial
  if not _shape_ok(problem, cfg) and tile_k == 256:
    cfg = dataclasses.replace(cfg, tile_k=128)
  # Group scales of a long K are held in shared memory for the whole K slice:
  # split K further until they fit.
  while _tiles_ok(problem, cfg) and not _smem_ok(problem, cfg) and (
      cfg.split_k < 8):
    trial = dataclasses.replace(cfg, split_k=cfg.split_k * 2)
    if not _tiles_ok(problem, trial):
      break
    cfg = trial
  return cfg


# Shared memory a CTA may use on Hopper (227 KiB), less a little for barriers.
MAX_SMEM_BYTES = 232448 - 512


def smem_bytes(problem: MatmulProblem, cfg: Config,
               scale_itemsize: Optional[int] = None) -> int:
  """Shared memory of one CTA: the pipeline's weight and activation tiles, the
  weight scales of the CTA's rows for its whole K slice, the warp-specialized
  reduction buffer. Group scales count one byte (MXFP4, NVFP4) or two (bf16,
  as the benchmarks and so the tuned tilings have them), or
  ``scale_itemsize`` (``kernel_scales`` checks the given scales' size)."""
  bits = 8 if problem.w_format == "int8" else 4
  per_stage = cfg.tile_n * cfg.tile_k * bits // 8 + cfg.tile_m * cfg.tile_k * 2
  g = common.weight_group(problem)
  itemsize = scale_itemsize or (1 if problem.w_format in ("mxfp4", "nvfp4")
                                else 2)
  groups = 1 if g is None else problem.k // cfg.split_k // g
  total = cfg.stages * per_stage + cfg.tile_n * groups * itemsize
  if (cfg.ws and not cfg.n_split) or cfg.cluster_reduce:
    total += cfg.tile_n * cfg.tile_m * 4  # partial sums exchanged
  return total


def _smem_ok(problem: MatmulProblem, cfg: Config) -> bool:
  return smem_bytes(problem, cfg) <= MAX_SMEM_BYTES


def _shape_ok(problem: MatmulProblem, cfg: Config) -> bool:
  """Whether the shape tiles evenly, every TMA box is legal and the CTA's
  shared memory fits."""
  return _tiles_ok(problem, cfg) and _smem_ok(problem, cfg)


def _tiles_ok(problem: MatmulProblem, cfg: Config) -> bool:
  """Whether the shape tiles evenly and every TMA box is legal."""
  m, n, k = problem.m, problem.n, problem.k
  if n % cfg.tile_n or k % (cfg.tile_k * cfg.split_k):
    return False
  if m > cfg.tile_m and m % cfg.tile_m:
    return False
  if _config_refusal(problem, cfg) is not None:
    return False
  tkw = cfg.tile_k // (2 if cfg.ws and not cfg.n_split else 1)
  if cfg.k_chunks < 1 or tkw % cfg.k_chunks:
    return False
  ckw = tkw // cfg.k_chunks  # columns dequantized and multiplied at a time
  bits = 8 if problem.w_format == "int8" else 4
  if ckw < 64 or (ckw * bits) % 512:
    return False  # weight rows of a chunk must be 64 or 128 bytes (swizzle)
  g = common.weight_group(problem)
  if g is not None:
    kps = k // cfg.split_k
    if kps % g:
      return False
    if not (ckw % g == 0 or g % ckw == 0):
      return False
    itemsize = 1 if problem.w_format in ("mxfp4", "nvfp4") else 2
    cw = scale_chunk(problem.w_format, kps // g, max(1, ckw // g), itemsize)
    if (cw * itemsize) % 16:
      return False
  return True


def _config_refusal(problem: MatmulProblem, cfg: Config) -> Optional[str]:
  """Why ``cfg``'s options cannot apply to ``problem`` (whatever the shape),
  or None: ``_tiles_ok`` refuses such tilings, ``matmul`` raises with it."""
  if cfg.n_split and not cfg.ws:
    return (f"Config(n_split=True) splits the rows between the two compute "
            f"warpgroups of the warp-specialized kernel: pass ws=True as well "
            f"(got {cfg})")
  if cfg.n_split and cfg.tile_n % 128:
    return (f"Config(n_split=True) gives each of two warpgroups tile_n / 2 "
            f"weight rows, which must be a multiple of 64 (a WGMMA's rows): "
            f"tile_n must be a multiple of 128, got {cfg.tile_n}")
  if cfg.cluster_reduce and (cfg.ws or cfg.split_k not in CLUSTER_SPLITS):
    return (f"Config(cluster_reduce=True) runs the split_k K slices of the "
            f"one-warpgroup kernel as one cluster: it needs ws=False and "
            f"split_k in {CLUSTER_SPLITS} (a portable cluster holds at most 8 "
            f"CTAs), got {cfg}")
  if cfg.scale_words and problem.w_format not in ("mxfp4", "nvfp4"):
    return (f"Config(scale_words=True) reads one-byte group scales (MXFP4's "
            f"E8M0, NVFP4's E4M3) four at a time; {problem.w_format} has none")
  if problem.w_order == "wgmma_e2m1" and (cfg.lut_decode or cfg.lut_regs):
    return (f"codes in the 'wgmma_e2m1' order decode by rotations, with no "
            f"tables: pass lut_decode=False and lut_regs=False, got {cfg}")
  if cfg.acc_scale:
    why = _acc_scale_refusal(problem, cfg)
    if why is not None:
      return why
  if cfg.lut_regs and not (cfg.lut_decode and problem.w_format in E2M1_FORMATS):
    return (f"Config(lut_regs=True) keeps the table decode's tables in "
            f"registers: it needs lut_decode=True and an E2M1 format "
            f"({', '.join(E2M1_FORMATS)}), got {cfg} for {problem.w_format}")
  return None


ACC_SCALE_FORMATS = ("int4", "int8", "fp4_e2m1")  # bf16 / float32 group scales
ACC_SCALE_GROUPS = (64, 128)


def _acc_scale_refusal(problem: MatmulProblem, cfg: Config) -> Optional[str]:
  g = common.weight_group(problem)
  if problem.w_format not in ACC_SCALE_FORMATS or g not in ACC_SCALE_GROUPS:
    return (f"Config(acc_scale=True) applies group scales of "
            f"{'/'.join(ACC_SCALE_FORMATS)} weights in groups of "
            f"{' or '.join(map(str, ACC_SCALE_GROUPS))} to the accumulator; got "
            f"{problem.w_format} with w_block={g}")
  if cfg.ws:
    return (f"Config(acc_scale=True) runs in the one-warpgroup kernel: pass "
            f"ws=False (got {cfg})")
  if cfg.tile_k % g or cfg.k_chunks != cfg.tile_k // g:
    return (f"Config(acc_scale=True) multiplies one group's partial sum at a "
            f"time: each K chunk must be one group, k_chunks = tile_k // "
            f"{g} = {cfg.tile_k // g if cfg.tile_k % g == 0 else 'a whole number'}"
            f" (tile_k={cfg.tile_k} a multiple of {g}), got k_chunks="
            f"{cfg.k_chunks}")
  return None


def acc_scale_config(problem: MatmulProblem, cfg: Config) -> Optional[Config]:
  """``cfg`` with ``acc_scale`` (and the K chunks it needs), or None where it
  cannot apply (``_acc_scale_refusal``) or the tiling no longer fits."""
  g = common.weight_group(problem)
  if g is None or cfg.tile_k % g:
    return None
  out = dataclasses.replace(cfg, acc_scale=True, k_chunks=cfg.tile_k // g)
  return out if _shape_ok(problem, out) else None


def scale_chunk(fmt: str, ng_total: int, ng_step: int, itemsize: int) -> int:
  """Groups per row of one shared-memory copy of a CTA's group scales.

  The scales land in shared memory as ``[copies, tile_n, chunk]`` (one TMA box
  a copy), and each thread reads one scale at a time for two rows eight apart
  while the warp's eight row pairs read the same group. NVFP4: rows of
  16 bytes (or one step's groups where that is more), where those eight reads
  fall in eight different banks; otherwise the whole K slice in as few chunks
  as TMA boxes allow (``gcd(ng_total, 256)``), rows of 64 to 512 bytes, where
  they fall in one to four. Nsight Compute on the H200 counted 80% of the
  NVFP4 kernel's shared wavefronts as excess (1-byte E4M3 scales in rows of
  128 bytes: 8-way conflicts; experiments/ncu_probe.py, 8192x28672, M = 1),
  and the narrow rows made NVFP4 14-20% faster
  (benchmarks/kernels_h200_runs/run_tune4.md against run_tune3.md:
  8192x28672 M = 1 112.5 -> 96.3 us, 8192x8192 40.5 -> 32.6), but int4 g128,
  fp4 g32 and MXFP4 1-9% slower (more TMA copies per CTA, fewer excess
  wavefronts to remove: 12-19%), so only NVFP4 takes them.
  """
  if fmt == "nvfp4":
    cw = max(16 // itemsize, ng_step)
    if ng_total % cw == 0:
      return cw
  return math.gcd(ng_total, 256)


# ----------------------------------------------------------------------------
# The tuned table (data, measured by experiments/bench_kernels.py --mode=tune).
# ----------------------------------------------------------------------------

M_BUCKETS = (1, 4, 16, 64, 256, 512, 4096)
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "gpu_tuned_configs.json")
_table_lock = threading.Lock()
_table: Optional[dict] = None


def case_name(fmt: str, group: Optional[int]) -> str:
  """The table's name of a weight case: ``int4_g128``, ``int8_pc``, ``mxfp4``."""
  if fmt in ("mxfp4", "nvfp4"):
    return fmt
  short = {"fp4_e2m1": "fp4"}.get(fmt, fmt)
  return f"{short}_pc" if group is None else f"{short}_g{group}"


def m_bucket(m: int) -> int:
  """The smallest of ``M_BUCKETS`` at or above ``m`` (the last one above it)."""
  for b in M_BUCKETS:
    if m <= b:
      return b
  return M_BUCKETS[-1]


def _dim_class(d: int) -> str:
  for lim, name in ((1024, "1k"), (4096, "4k"), (8192, "8k"), (16384, "16k")):
    if d <= lim:
      return name
  return "32k"


def shape_class(k: int, n: int) -> str:
  """The table's class of a ``K x N`` weight: K and N each rounded up to one of
  1k, 4k, 8k, 16k, 32k (so 8192x28672 is ``k8k_n32k``)."""
  return f"k{_dim_class(k)}_n{_dim_class(n)}"


def _config_from_json(value, where: str = "the tuned table's entry"
                      ) -> Optional[Config]:
  if value is None:
    return None
  return common.config_from_json(Config, value, where)


def load_table(path: Optional[str] = None) -> dict:
  """Reads a tuned table (JSON written by ``bench_kernels.py --mode=tune``).

  Args:
    path: the file; default ``TABLE_PATH``.

  Returns:
    ``{"meta": {...}, "entries": {case: {shape_class: {str(bucket): entry}}}}``.

  Raises:
    ValueError: if the file is not such a table.
  """
  path = path or TABLE_PATH
  fix = "; regenerate it with experiments/bench_kernels.py --mode=tune"
  with open(path) as f:
    try:
      table = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}){fix}") from None
  if not isinstance(table, dict) or not isinstance(table.get("entries"), dict):
    raise ValueError(f"{path} is not a tuned kernel table (no 'entries' dict){fix}")
  for case, classes in table["entries"].items():
    if not isinstance(classes, dict):
      raise ValueError(f"{path}: entry {case!r} is not a dict of shape classes{fix}")
    for cls, buckets in classes.items():
      if not isinstance(buckets, dict):
        raise ValueError(f"{path}: entry {case}/{cls} is not a dict of M buckets{fix}")
      for b, e in buckets.items():
        where = f"{path}: entry {case}/{cls}/{b}"
        if not (isinstance(b, str) and b.isdigit() and int(b) in M_BUCKETS):
          raise ValueError(f"{where}: the M bucket must be one of {M_BUCKETS}{fix}")
        if not isinstance(e, dict) or not isinstance(e.get("use_kernel"), bool):
          raise ValueError(f"{where}: {e!r} is not a dict with use_kernel true or "
                           f"false{fix}")
        try:
          _config_from_json(e.get("config"), where)
        except ValueError as err:
          raise ValueError(f"{err}{fix}") from None
  w8 = table.get("w8a8", {})
  if not isinstance(w8, dict):
    raise ValueError(f"{path}: 'w8a8' is not a dict of cases{fix}")
  if w8:
    from lowbit_jax.kernels import gpu_w8a8  # pylint: disable=g-import-not-at-top
    for case, e in w8.items():
      if not isinstance(e, dict):
        raise ValueError(f"{path}: w8a8 entry {case!r} is not a dict{fix}")
      if e.get("config") is None:
        continue
      try:
        common.config_from_json(gpu_w8a8.Config, e["config"],
                                f"{path}: w8a8 entry {case!r}")
      except ValueError as err:
        raise ValueError(f"{err}{fix}") from None
  return table


# The device kind ``TABLE_PATH`` was measured on. A table measured on another
# device kind lives beside it as ``gpu_tuned_configs.<slug>.json``
# (``table_filename``); on such a device its rows win and the rows it lacks
# come from ``TABLE_PATH``, marked with ``"table_device"``, so a partial
# tuning run on a second Hopper part is usable at once and never mixed into
# this device's file (a time measured on one part says little about another:
# the H100's 3.0 TB/s against the H200's 4.3).
DEFAULT_TABLE_DEVICE = "NVIDIA H200"


device_slug = common.device_slug


def table_filename(device_kind: str) -> str:
  """The file name a tuned table measured on ``device_kind`` is kept under."""
  if device_kind == DEFAULT_TABLE_DEVICE:
    return os.path.basename(TABLE_PATH)
  return f"gpu_tuned_configs.{device_slug(device_kind)}.json"


_current_device_kind = common.current_gpu_kind


def overlay_tables(own: dict, base: dict) -> dict:
  """``own``'s rows (weight-only buckets, W8A8 cases) over ``base``'s.

  The rows taken from ``base`` carry ``"table_device"`` (``base``'s device),
  so what the dispatcher decides can be traced to where it was measured.
  """
  where = base.get("meta", {}).get("device", "?")
  tag = lambda e: dict(e, table_device=where)
  entries = {}
  for case in set(base["entries"]) | set(own["entries"]):
    b_cls, o_cls = base["entries"].get(case, {}), own["entries"].get(case, {})
    entries[case] = {}
    for cls in set(b_cls) | set(o_cls):
      rows = {mb: tag(e) for mb, e in b_cls.get(cls, {}).items()}
      rows.update(o_cls.get(cls, {}))
      entries[case][cls] = rows
  w8 = {c: tag(e) for c, e in base.get("w8a8", {}).items()}
  w8.update(own.get("w8a8", {}))
  meta = dict(own.get("meta", {}), fallback=base.get("meta", {}))
  out = {"meta": meta, "entries": entries}
  if w8:
    out["w8a8"] = w8
  return out


def table_for_device(device_kind: Optional[str],
                     table_dir: Optional[str] = None) -> dict:
  """The table the dispatcher uses on ``device_kind`` (None: not a GPU).

  ``TABLE_PATH``'s (or ``table_dir``'s default file), overlaid by the
  device's own file where there is one (``table_filename``, ``overlay_tables``).

  Raises:
    ValueError: if the device's file says it was measured on another device.
  """
  d = table_dir or os.path.dirname(TABLE_PATH)
  default = os.path.join(d, os.path.basename(TABLE_PATH))
  base = (load_table(default) if os.path.exists(default)
          else {"meta": {}, "entries": {}})
  if device_kind is None or device_kind == DEFAULT_TABLE_DEVICE:
    return base
  own_path = os.path.join(d, table_filename(device_kind))
  if not os.path.exists(own_path):
    return base
  own = load_table(own_path)
  measured_on = own.get("meta", {}).get("device")
  if measured_on != device_kind:
    raise ValueError(
        f"{own_path} is the tuned table for {device_kind!r} by its name but "
        f"its meta says it was measured on {measured_on!r}; regenerate it on "
        "that device (experiments/bench_kernels.py --mode=report writes the "
        "file name from the runs' device)")
  return overlay_tables(own, base)


def set_table(table: Optional[dict]) -> None:
  """Replaces the table the dispatcher reads (``None``: reload the files)."""
  global _table
  with _table_lock:
    _table = table


def get_table() -> dict:
  """The table the dispatcher reads: ``table_for_device`` of the default
  device, loaded once (or what ``set_table`` put there)."""
  global _table
  with _table_lock:
    if _table is None:
      _table = table_for_device(_current_device_kind())
    return _table


def tuned_entry(problem: MatmulProblem) -> Optional[dict[str, Any]]:
  """The table's entry for ``problem`` (its case, shape class, M bucket), or None."""
  try:
    g = common.weight_group(problem)
  except ValueError:
    return None
  entries = get_table()["entries"]
  case = case_name(problem.w_format, g)
  cls, mb = shape_class(problem.k, problem.n), str(m_bucket(problem.m))
  e = entries.get(case, {}).get(cls, {}).get(mb)
  if problem.w_order != "natural":
    # Rows measured on reordered codes (bench_kernels --w_order=wgmma: their
    # XLA path includes reordering the codes back); else the natural row,
    # its XLA time plus that reordering (``reordered_estimate``).
    own = entries.get(f"{case}@{problem.w_order}", {}).get(cls, {}).get(mb)
    if own is not None:
      return own
    if problem.w_order in SPLIT_ORDERS:
      # The same bytes as "wgmma" with their bits permuted: that order's
      # row (a decode of more instructions than the split orders'), its
      # tiling (for E2M1 without the tables: ``e2m1_split_config``).
      wg = entries.get(f"{case}@wgmma", {}).get(cls, {}).get(mb)
      if wg is not None:
        return dict(wg, estimated=True)
    return None if e is None else reordered_estimate(e, problem)
  return e


# The H200's stream bandwidth (benchmarks/wgmma_order_h200.json: 4.30 TB/s,
# 1 GiB f32 read + write), for ``reordered_estimate`` where the table's meta
# does not give the bandwidth its run measured (``stream_TBps``).
STREAM_BYTES_PER_US = 4.30e6


def stream_bytes_per_us() -> float:
  """The stream bandwidth the dispatcher's table was measured at (bytes/us)."""
  tbps = get_table().get("meta", {}).get("stream_TBps")
  return float(tbps) * 1e6 if tbps else STREAM_BYTES_PER_US


def reordered_estimate(entry: dict, problem: MatmulProblem) -> dict:
  """A natural-order table row adapted to codes in ``problem.w_order``.

  Not measured: the kernel's time is the natural row's (on the H200 the
  reordered codes' kernel was 0.96-1.38x faster with the same tiling,
  benchmarks/wgmma_order_h200.md), and XLA's path must first reorder the
  codes, one read and one write of them at the stream bandwidth of the
  table's run (``stream_bytes_per_us``), added to the natural row's XLA
  time. The kernel is taken where it beats that sum.
  """
  out = dict(entry, estimated=True)
  kus, xus = entry.get("kernel_us"), entry.get("xla_us")
  if entry.get("config") is None or kus is None or xus is None:
    return out
  reorder_us = 2 * (problem.n * problem.k // 2) / stream_bytes_per_us()
  out["xla_us"] = xus + reorder_us
  out["use_kernel"] = bool(entry.get("use_kernel")) or kus <= out["xla_us"]
  return out


def tuned_config(problem: MatmulProblem) -> Config:
  """The tiling for ``problem``: the table's (its tile_m fitted to M), else
  ``_decode_config``."""
  e = tuned_entry(problem)
  cfg = _config_from_json(e.get("config")) if e else None
  if cfg is None:
    return _decode_config(problem)
  tm = min(cfg.tile_m, max(8, -(-problem.m // 8) * 8))
  cfg = dataclasses.replace(cfg, tile_m=tm)
  return e2m1_split_config(cfg) if problem.w_order == "wgmma_e2m1" else cfg


def e2m1_split_config(cfg: Config) -> Config:
  """``cfg`` for codes in the ``"wgmma_e2m1"`` order: the same tiling with
  the table decode's options off (its codes decode by rotations)."""
  return dataclasses.replace(cfg, lut_decode=False, lut_regs=False)


def table_says_kernel(problem: MatmulProblem) -> bool:
  """Whether the table measured the kernel faster than XLA's path for this case."""
  e = tuned_entry(problem)
  return bool(e and e.get("use_kernel"))


def supports(problem: MatmulProblem) -> bool:
  """Whether the kernel handles ``problem`` and was measured faster than XLA there.

  Args:
    problem: the static description of the matmul.

  Returns:
    True only on a Hopper GPU, for bf16 activations, where the tuned table
    (``gpu_tuned_configs.json``) has an entry for this weight case, shape class
    and M bucket that beat the path it replaces (the entry's ``baseline``),
    and the shape tiles evenly with that entry's tiling.
  """
  # The backend first: a CPU or TPU process never reads the GPU's table.
  if not common.on_hopper_gpu(problem):
    return False
  try:
    _validate(problem)
  except ValueError:
    return False
  if problem.x_dtype != "bfloat16" or problem.out_dtype not in (
      "bfloat16", "float32"):
    return False
  if not table_says_kernel(problem):
    return False
  return _shape_ok(problem, tuned_config(problem))


# ----------------------------------------------------------------------------
# In-register dequantization (Mosaic GPU fragments).
# ----------------------------------------------------------------------------

def _bf16_const_vec(value_bits: int):
  mgpu, _, ir, arith, _, _, _ = common._mlir()
  bf16 = ir.BF16Type.get()
  i16 = ir.IntegerType.get_signless(16)
  scalar = arith.bitcast(bf16, arith.constant(i16, value_bits))
  from jax._src.lib.mlir.dialects import vector  # pylint: disable=g-import-not-at-top
  return vector.broadcast(ir.VectorType.get((2,), bf16), scalar)


# E4M3 -> f32 in two instructions (sm_89+): the hardware converts the byte pair
# to f16x2 exactly (every E4M3 value, subnormals and NaN included, is an f16),
# and the low f16 widens to f32 exactly. Replaces ~20 integer ops per scale.
_E4M3_PTX = """{
.reg .b32 t;
.reg .b16 lo, hi;
cvt.rn.f16x2.e4m3x2 t, $1;
mov.b32 {lo, hi}, t;
cvt.f32.f16 $0, lo;
}"""


def _scale_to_bf16(val, kind: str, fast: bool = False):
  """Converts one loaded scale (MLIR scalar) to bf16.

  Args:
    val: the scalar loaded from SMEM.
    kind: "float" (bf16 / f32 scales), "e8m0" (uint8 codes) or "e4m3".
    fast: E4M3 through the hardware conversion (``_E4M3_PTX``).
  """
  mgpu, _, ir, arith, llvm, _, _ = common._mlir()
  if kind == "e4m3" and fast:
    i8 = ir.IntegerType.get_signless(8)
    i16 = ir.IntegerType.get_signless(16)
    b16 = arith.extui(i16, arith.bitcast(i8, val))
    f = llvm.inline_asm(ir.F32Type.get(), [b16], _E4M3_PTX, "=f,h")
    return arith.truncf(ir.BF16Type.get(), f)
  bf16 = ir.BF16Type.get()
  i8 = ir.IntegerType.get_signless(8)
  i16 = ir.IntegerType.get_signless(16)
  i32 = ir.IntegerType.get_signless(32)
  f32 = ir.F32Type.get()
  c16 = lambda v: arith.constant(i16, v)
  c32 = lambda v: arith.constant(i32, v)
  if kind == "float":
    if val.type == bf16:
      return val
    return arith.truncf(bf16, val)
  if kind == "e8m0":
    # 2**(c - 127): bf16 bits c << 7 for 1 <= c <= 254; c == 0 is the bf16
    # subnormal 2**-127 (0x0040); c == 255 is NaN.
    code = arith.extui(i16, val)
    bits = arith.shli(code, c16(7))
    bits = arith.select(arith.cmpi(arith.CmpIPredicate.eq, code, c16(0)),
                        c16(0x0040), bits)
    bits = arith.select(arith.cmpi(arith.CmpIPredicate.eq, code, c16(255)),
                        c16(0x7FC0), bits)
    return arith.bitcast(bf16, bits)
  if kind == "e4m3":
    b = arith.extui(i32, arith.bitcast(i8, val))
    sign = arith.andi(b, c32(0x80))
    e = arith.andi(arith.shrui(b, c32(3)), c32(0xF))
    m = arith.andi(b, c32(7))
    # Normal: (e - 7 + 127) << 23 | m << 20 as float32 bits.
    normal = arith.ori(arith.shli(arith.addi(e, c32(120)), c32(23)),
                       arith.shli(m, c32(20)))
    # Subnormal: m * 2**-9.
    sub = arith.mulf(arith.uitofp(f32, m), arith.constant(f32, 2.0 ** -9))
    mag = arith.select(arith.cmpi(arith.CmpIPredicate.eq, e, c32(0)),
                       arith.bitcast(i32, sub), normal)
    is_nan = arith.andi(
        arith.cmpi(arith.CmpIPredicate.eq, e, c32(15)),
        arith.cmpi(arith.CmpIPredicate.eq, m, c32(7)))
    mag = arith.select(is_nan, c32(0x7FC00000), mag)
    f = arith.bitcast(f32, arith.ori(mag, arith.shli(sign, c32(24))))
    return arith.truncf(bf16, f)
  raise ValueError(kind)


def _e2m1_regs_to_bf16(w):
  """E2M1 nibble pairs (an int4-typed WGMMA fragment) to exact bf16 values."""
  mgpu, fa, ir, arith, _, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  bf16 = ir.BF16Type.get()
  i8 = ir.IntegerType.get_signless(8)
  i32 = ir.IntegerType.get_signless(32)
  c32 = lambda v: arith.constant(i32, v)
  two126 = _bf16_const_vec(0x7E80)  # 2**126
  new_regs = w.registers.copy()
  for idx, reg in np.ndenumerate(w.registers):
    u = arith.extui(i32, mgpu_utils.bitcast(reg, i8))
    lo = arith.ori(arith.shli(arith.andi(u, c32(0x8)), c32(12)),
                   arith.shli(arith.andi(u, c32(0x7)), c32(6)))
    hi = arith.ori(arith.shli(arith.andi(u, c32(0x80)), c32(24)),
                   arith.shli(arith.andi(u, c32(0x70)), c32(18)))
    bits = arith.ori(lo, hi)
    vec = mgpu_utils.bitcast(bits, ir.VectorType.get((2,), bf16))
    new_regs[idx] = arith.mulf(vec, two126)
  return fa.FragmentedArray(_registers=new_regs, _layout=w.layout,
                            _is_signed=None)


def e2m1_prmt_selectors(part: int) -> tuple[int, int]:
  """``prmt`` selectors of ``_E2M1_PTX`` for byte ``part`` (0..3) of a word.

  The first puts byte ``part`` of the codes in lane 0 and of the codes >> 4 in
  lane 1 (each lane's element in its low nibble); the second fills the high
  byte of each lane with copies of that element's sign bit (sign-replicate
  mode on byte ``part`` of the codes << 4, whose top bit is element 2j's sign,
  and of the codes, whose top bit is element 2j+1's).
  """
  if not 0 <= part < 4:
    raise ValueError(f"part must be in 0..3, got {part}")
  sel_mag = part | (part << 4) | ((4 + part) << 8) | ((4 + part) << 12)
  sel_sign = ((8 | part) << 4) | ((8 | 4 | part) << 12)
  return sel_mag, sel_sign


# Two E2M1 codes (byte ``part`` of a word of eight) to the bit patterns of two
# bf16 values scaled by 2**-126: lane = (mag << 6) | (sign << 15), so that the
# three magnitude bits land on the exponent's two low bits and the mantissa's
# top bit, and one multiply by 2**126 gives the exact value (0.5 through the
# subnormal 2**-127). $1 = codes, $2 = codes >> 4, $3 = codes << 4.
_E2M1_PTX = """{{
.reg .b32 t, g;
prmt.b32 t, $1, $2, {sel_mag};
shl.b32 t, t, 6;
and.b32 t, t, 0x01C001C0;
prmt.b32 g, $3, $1, {sel_sign};
lop3.b32 $0, t, g, 0x80008000, 0xF8;
}}"""


def _word_part(reg):
  """``(word, byte)`` where a fragment register (two 4-bit codes) is byte
  ``byte`` of a 32-bit vector ``word`` (as after a relayout from
  ``WGMMA_UPCAST_4X``), else ``(reg, None)``."""
  _, _, _, _, _, _, vector = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  op = getattr(reg.owner, "opview", None)
  if (isinstance(op, vector.ExtractStridedSliceOp)
      and mgpu_utils.bitwidth(op.source.type) == 32
      and op.strides[0].value == 1):
    return op.source, op.offsets[0].value // 2
  return reg, None


# The order of 4-bit codes the kernel reads without a relayout ("wgmma").
#
# A 32-bit shared-memory load of ``WGMMA_UPCAST_4X`` gives a thread eight
# consecutive codes of one row, where the WGMMA A fragment wants, of each 32
# columns, columns 2q, 2q + 1, 2q + 8, 2q + 9, ..., 2q + 25 (q = lane % 4).
# Mosaic GPU's relayout between the two moves them with two warp shuffles and
# two byte permutes per word of eight codes. Stored with the bytes of every
# 16-byte run (32 codes along K) transposed as a 4 x 4 grid, physical byte
# 4q + i holds logical byte 4i + q (codes 8i + 2q and 8i + 2q + 1), so the
# word a thread loads is already its WGMMA fragment: byte i is the register of
# column tile i. The transpose is its own inverse
# (``lowbit_jax.core._qarray.wgmma_byte_order``).


def _upcast4x_as_wgmma(w):
  """A ``WGMMA_UPCAST_4X`` fragment of ``"wgmma"``-ordered 4-bit codes as the
  WGMMA-layout fragment of the logical codes, with no data movement: byte
  ``i`` of the word for 32-column block ``b`` is the register of 8-column
  tile ``4b + i`` (``wgmma_byte_order``)."""
  mgpu, fa, _, _, _, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  shape = tuple(w.shape)
  src = w.registers
  want = mgpu.WGMMA_LAYOUT.registers_shape(shape)
  if (src.shape[1] * 4 != want[1] or src.shape[0] != want[0]
      or tuple(src.shape[2:]) != tuple(want[2:])):
    raise NotImplementedError(f"unexpected register shapes {src.shape} -> "
                              f"{want} for {shape}")
  new_regs = np.empty(want, dtype=object)
  for idx, reg in np.ndenumerate(src):
    for i in range(4):
      new_regs[(idx[0], idx[1] * 4 + i, *idx[2:])] = mgpu_utils.vector_slice(
          reg, slice(2 * i, 2 * i + 2))
  return fa.FragmentedArray(_registers=new_regs, _layout=mgpu.WGMMA_LAYOUT,
                            _is_signed=w.is_signed)


def _jnp_unpermute_tile(w):
  """``wgmma_byte_order`` on a ``[rows, cols]`` tile of logical 4-bit codes
  (their pairs are the bytes)."""
  rows, cols = w.shape
  return wgmma_byte_order(w.reshape(rows, cols // 2, 2), axis=1).reshape(
      rows, cols)


def _jnp_unsplit_tile(w, order: str):
  """``split_bits(..., order)`` undone on a ``[rows, cols]`` tile of 4-bit
  codes (int4-typed, as the interpreter moves them; pairs are the bytes),
  giving the ``"wgmma"``-ordered tile."""
  nib = (w.astype(jnp.int32) & 0xF).astype(jnp.uint32)
  byts = split_bits(pack(nib, IntFormat(4, signed=False), axis=1), order,
                    axis=1, inverse=True)
  out = common.unpack_nibbles(byts).astype(jnp.int32)
  return jnp.where(out >= 8, out - 16, out).astype(w.dtype)


# The decode of "wgmma_e2m1"-ordered codes (``_qarray.E2M1_SPLIT_POS``): pair
# ``i`` of a 32-bit word is ``rotr(word, r) & mask`` (pair 3 the OR of two
# such), which is the bf16 pair of its E2M1 values times 2**-126, exactly
# (the code 0.5 the bf16 subnormal 2**-127); the exact multiply by 2**126
# (0x7E80 a lane) gives the values. Nine integer instructions a word of eight
# codes (benchmarks/decode_sass.md), against about seventeen for the table
# decode.
_E2M1_SPLIT_PICK = {
    0: "and.b32 t, $1, {m};",
    1: "shf.r.wrap.b32 t, $1, $1, 6;\nand.b32 t, t, {m};",
    2: "shf.r.wrap.b32 t, $1, $1, 12;\nand.b32 t, t, {m};",
    3: ("shf.r.wrap.b32 t, $1, $1, 2;\nshf.r.wrap.b32 u, $1, $1, 10;\n"
        "and.b32 u, u, 0x00400040;\nlop3.b32 t, t, 0x81808180, u, 0xEA;"),
}


def e2m1_split_ptx(part: int) -> str:
  """The PTX block decoding byte pair ``part`` (0..3) of a ``"wgmma_e2m1"``
  word ($1) into its bf16 pair ($0)."""
  pick = _E2M1_SPLIT_PICK[part].format(m=hex(E2M1_SPLIT_MASK))
  return ("{\n.reg .b32 t, u, k;\n" + pick + "\nmov.b32 k, 0x7E807E80;\n"
          "mul.rn.bf16x2 $0, t, k;\n}")


# The decode of "wgmma_int4"-ordered int4 codes (``_qarray.INT4_SPLIT_POS``):
# pair ``i`` of a 32-bit word sits in nibbles ``i`` and ``i + 4`` (bits
# ``4i..4i+3`` of each 16-bit lane), so one shift right by ``4i`` puts both
# codes in their lanes' low bits, where Mosaic GPU's own int4 conversion
# (the magic-number trick: ``(n & 0xF) ^ 0x4308`` is the bf16 of ``136 + v``
# for the two's-complement code ``v``, less 136) takes them without its byte
# permute: seven integer instructions a word of eight codes against nine.
def int4_split_ptx(part: int) -> str:
  """The PTX block decoding code pair ``part`` (0..3) of a ``"wgmma_int4"``
  word ($1) into its bf16 pair ($0)."""
  shift = f"shr.b32 t, $1, {4 * part};\n" if part else "mov.b32 t, $1;\n"
  return ("{\n.reg .b32 t, k;\n" + shift
          + "lop3.b32 t, t, 0x000F000F, 0x43084308, 0x6A;\n"
          "mov.b32 k, 0x43084308;\nsub.bf16x2 $0, t, k;\n}")


def _e2m1_split_regs_to_bf16(w):
  """The bf16 fragment of ``"wgmma_e2m1"``-ordered E2M1 codes (registers
  that are byte ``i`` of a loaded 32-bit word, as ``_upcast4x_as_wgmma``
  gives them): ``e2m1_split_ptx(i)`` on the word."""
  return _word_blocks_to_bf16(w, e2m1_split_ptx, "wgmma_e2m1")


def _int4_split_regs_to_bf16(w):
  """The bf16 fragment of ``"wgmma_int4"``-ordered int4 codes:
  ``int4_split_ptx(i)`` on the word."""
  return _word_blocks_to_bf16(w, int4_split_ptx, "wgmma_int4")


def _word_blocks_to_bf16(w, block_of, order: str):
  """Each register of ``w`` (byte ``i`` of a loaded 32-bit word of codes)
  as the bf16 pair ``block_of(i)``'s PTX makes of the whole word."""
  _, fa, ir, _, llvm, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  bf16 = ir.BF16Type.get()
  i32 = ir.IntegerType.get_signless(32)
  new_regs = w.registers.copy()
  for idx, reg in np.ndenumerate(w.registers):
    src, part = _word_part(reg)
    if part is None or mgpu_utils.bitwidth(src.type) != 32:
      raise NotImplementedError(
          f"the {order} decode reads whole 32-bit words of codes; got a "
          f"register {reg.type} that is not a byte of one")
    bits = llvm.inline_asm(i32, [_code_word(src)], block_of(part), "=r,r")
    new_regs[idx] = mgpu_utils.bitcast(bits, ir.VectorType.get((2,), bf16))
  return fa.FragmentedArray(_registers=new_regs, _layout=w.layout,
                            _is_signed=None)


def _code_word(src):
  """``src`` of ``_word_part`` as an i32: the 32-bit word, or the lone byte
  zero-extended."""
  _, _, ir, arith, _, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  i32 = ir.IntegerType.get_signless(32)
  if mgpu_utils.bitwidth(src.type) == 32:
    return mgpu_utils.bitcast(src, i32)
  return arith.extui(i32, mgpu_utils.bitcast(src, ir.IntegerType.get_signless(8)))


def _e2m1_regs_to_bf16_prmt(w):
  """``_e2m1_regs_to_bf16`` with byte permutes on whole 32-bit words.

  Where a register is a slice of a 32-bit vector (as after a relayout from
  ``WGMMA_UPCAST_4X``), the shifts of the word are shared by its four byte
  pairs; otherwise each byte is widened on its own.
  """
  mgpu, fa, ir, arith, llvm, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  bf16 = ir.BF16Type.get()
  i32 = ir.IntegerType.get_signless(32)
  c32 = lambda v: arith.constant(i32, v)
  two126 = _bf16_const_vec(0x7E80)  # 2**126
  words = {}
  new_regs = w.registers.copy()
  for idx, reg in np.ndenumerate(w.registers):
    src, part = _word_part(reg)
    shifted = words.get(src) if part is not None else None
    if shifted is None:
      word = _code_word(src)
      shifted = (word, arith.shrui(word, c32(4)), arith.shli(word, c32(4)))
      if part is not None:
        words[src] = shifted
    sel_mag, sel_sign = e2m1_prmt_selectors(part or 0)
    bits = llvm.inline_asm(
        i32, list(shifted),
        _E2M1_PTX.format(sel_mag=hex(sel_mag), sel_sign=hex(sel_sign)),
        "=r,r,r,r")
    vec = mgpu_utils.bitcast(bits, ir.VectorType.get((2,), bf16))
    new_regs[idx] = arith.mulf(vec, two126)
  return fa.FragmentedArray(_registers=new_regs, _layout=w.layout,
                            _is_signed=None)


@functools.lru_cache(maxsize=None)
def _e2m1_lut_tables() -> tuple[int, int, int, int]:
  """The four 32-bit table constants of ``Config.lut_decode``: ``(u_lo,
  u_hi)`` of ``_E2M1_LUT_IDX_PTX``, ``(t_lo, t_hi)`` of ``_E2M1_LUT_PTX``.

  ``t`` is an 8-byte table holding every byte a bf16 E2M1 value has: the low
  bytes 00/40/80/C0 at even slots, the high bytes 00/3F/40 of the positive
  magnitudes at slots 0-2 and their negatives 80/BF/C0 at the same slots
  plus 4. ``u`` maps a magnitude (three bits) to one selector byte for the
  lookup in ``t``: the slot of its value's low byte in the low nibble, of its
  high byte in the high nibble. A negative code's high-byte slot is the same
  or 4 (``| 0x40`` on the selector byte). No selector nibble has bit 3 set,
  so both lookups stay in ``prmt``'s plain mode.
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  t = [0x00, 0x3F, 0x40, 0x00, 0x80, 0xBF, 0xC0, 0x00]
  u = []
  for mag in common.E2M1_VALUES:
    bits = int(np.array(mag, ml_dtypes.bfloat16).view(np.uint16))
    lo, hi = bits & 0xFF, bits >> 8
    lo_slot = t.index(lo)
    hi_slot = t.index(hi)
    if lo_slot % 2 or hi_slot > 2 or t[hi_slot | 4] != hi | 0x80:
      raise AssertionError(f"E2M1 value {mag} does not fit the lookup table")
    u.append(lo_slot | hi_slot << 4)
  word = lambda b: sum(v << (8 * i) for i, v in enumerate(b))  # noqa: E731
  return word(u[:4]), word(u[4:]), word(t[:4]), word(t[4:])


# Two-level E2M1 decode (Config.lut_decode). $1: four codes' magnitudes in the
# low 16 bits (a nibble each), $2: the same four codes with their signs. The
# first prmt turns each magnitude into its selector byte for the value table;
# the second gives 0xFF for a negative code's byte (sign-replicate mode on
# bytes of 0x80) and 0x80 for a positive one, whose bit 6 moves the high
# byte's slot to the negative half of the table.
_E2M1_LUT_IDX_PTX = """{{
.reg .b32 s, k, ul, uh;
mov.b32 k, 0x80808080;
mov.b32 ul, {u_lo};
mov.b32 uh, {u_hi};
prmt.b32 s, k, k, $2;
prmt.b32 $0, ul, uh, $1;
lop3.b32 $0, $0, s, 0x40404040, 0xF8;
}}"""
# Two bf16 values (lanes 0, 1) from two selector bytes (the low 16 bits of $1).
_E2M1_LUT_PTX = """{{
.reg .b32 tl, th;
mov.b32 tl, {t_lo};
mov.b32 th, {t_hi};
prmt.b32 $0, tl, th, $1;
}}"""


# Config.lut_regs: the same two lookups with the table words as operands
# ($3..$5 and $2, $3), read from shared memory where each thread stored them
# at the kernel's start (``_lut_table_fill``, ``_lut_table_load``). Written
# into the blocks as constants, ptxas rebuilds a table word with an
# IMAD.MOV before nearly every lookup (a prmt takes at most one immediate),
# 0.70 instructions an element of the MXFP4 kernel in the Nsight listing;
# a loaded word it cannot rebuild, so it stays in a register
# (benchmarks/decode_sass.md: the MXFP4 step with scale_words 3.62 -> 3.04
# instructions an element, the IMADs 0.62 -> 0.04).
_E2M1_LUT_IDX_REGS_PTX = """{
.reg .b32 s;
prmt.b32 s, $3, $3, $2;
prmt.b32 $0, $4, $5, $1;
lop3.b32 $0, $0, s, 0x40404040, 0xF8;
}"""
_E2M1_LUT_REGS_PTX = "prmt.b32 $0, $2, $3, $1;"
LUT_TABLE_WORDS = 5  # k, u_lo, u_hi, t_lo, t_hi


def lut_table_words() -> tuple[int, ...]:
  """The words ``Config.lut_regs`` keeps in shared memory: the sign
  replicator 0x80808080 of ``_E2M1_LUT_IDX_PTX``, then ``_e2m1_lut_tables``."""
  return (0x80808080,) + _e2m1_lut_tables()


def _lut_table_fill(ref):
  """Every thread stores the table words to ``ref`` (``[8]`` uint32 in
  shared memory): the same values, so the writes of different threads do
  not conflict, and each thread reads back its own. In PTX, so that LLVM
  does not forward the constants to the loads."""
  _, _, ir, arith, llvm, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  i32 = ir.IntegerType.get_signless(32)
  base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref))
  for i, v in enumerate(lut_table_words()):
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [base],
                    f"st.shared.b32 [$0+{4 * i}], {hex(v)};", "r",
                    has_side_effects=True)


_LUT_TABLE_LOAD_PTX = """ld.shared.v4.b32 {$0, $1, $2, $3}, [$5];
ld.shared.b32 $4, [$5+16];"""


def _lut_table_load(ref):
  """The table words ``_lut_table_fill`` stored, as five i32 values."""
  _, _, ir, _, llvm, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  i32 = ir.IntegerType.get_signless(32)
  base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref))
  ty = ir.Type.parse("!llvm.struct<(i32, i32, i32, i32, i32)>")
  out = llvm.inline_asm(ty, [base], _LUT_TABLE_LOAD_PTX, "=r,=r,=r,=r,=r,r",
                        has_side_effects=True)
  return [llvm.extractvalue(i32, out, [i]) for i in range(LUT_TABLE_WORDS)]


def _e2m1_regs_to_bf16_lut(w, table_ref=None):
  """``_e2m1_regs_to_bf16`` by table lookups (``_E2M1_LUT_IDX_PTX`` once per
  four codes, ``_E2M1_LUT_PTX`` once per pair), exact bf16 values.

  Where a register is a slice of a 32-bit vector, the selector word of each
  16-bit half of the word is shared by its two byte pairs. With
  ``table_ref`` (``Config.lut_regs``) the table words come from there.
  """
  mgpu, fa, ir, arith, llvm, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  bf16 = ir.BF16Type.get()
  i32 = ir.IntegerType.get_signless(32)
  c32 = lambda v: arith.constant(i32, v)
  u_lo, u_hi, t_lo, t_hi = _e2m1_lut_tables()
  idx_ptx = _E2M1_LUT_IDX_PTX.format(u_lo=hex(u_lo), u_hi=hex(u_hi))
  val_ptx = _E2M1_LUT_PTX.format(t_lo=hex(t_lo), t_hi=hex(t_hi))
  idx_args, val_args = [], []
  if table_ref is not None:
    k, ul, uh, tl, th = _lut_table_load(table_ref)
    idx_ptx, val_ptx = _E2M1_LUT_IDX_REGS_PTX, _E2M1_LUT_REGS_PTX
    idx_args, val_args = [k, ul, uh], [tl, th]
  selectors = {}
  new_regs = w.registers.copy()
  for idx, reg in np.ndenumerate(w.registers):
    src, part = _word_part(reg)
    part = part or 0
    key = (src, part // 2)
    sel = selectors.get(key) if src is not reg else None
    if sel is None:
      word = _code_word(src)
      if part >= 2:
        word = arith.shrui(word, c32(16))
      mags = arith.andi(word, c32(0x7777))
      sel = llvm.inline_asm(i32, [mags, word] + idx_args, idx_ptx,
                            "=r" + ",r" * (2 + len(idx_args)))
      if src is not reg:
        selectors[key] = sel
    if part % 2:
      sel = arith.shrui(sel, c32(16))
    bits = llvm.inline_asm(i32, [sel] + val_args, val_ptx,
                           "=r" + ",r" * (1 + len(val_args)))
    new_regs[idx] = mgpu_utils.bitcast(bits, ir.VectorType.get((2,), bf16))
  return fa.FragmentedArray(_registers=new_regs, _layout=w.layout,
                            _is_signed=None)


# Config.scale_words: a row's group scales read four at a time (one 32-bit
# shared-memory load) and converted in registers, each to a bf16 pair holding
# the scale twice, ready for the per-register multiply.
#
# E8M0 (MXFP4): the bf16 of 2**(c - 127) is c << 7, except c = 0 (the
# subnormal 2**-127, 0x0040) and c = 255 (NaN, 0x7FC0): both are c << 7 with
# 0x40 or'd in. A byte is 0 or 255 when its bits all agree, which the word
# finds for its four bytes at once: z = (w ^ w >> 1) & 0x7F7F7F7F has a zero
# byte there, z + 0x7F7F7F7F a clear top bit (no carry leaves a byte), and
# f = ~(that) & 0x80808080 is 0x80 in the bytes of those codes. Then one
# prmt per scale lays out (f_i | c_i << 8) in both lanes and one shift right
# gives (c_i << 7) | (f_i >> 1) in each. Four instructions for the word and
# two a scale, against a byte load, a shift, two compares and two selects a
# scale (the Nsight profile of benchmarks/kernels_h200_notes.md: about 0.75
# instructions an element of the MXFP4 kernel). $0..$3: the four scales,
# $4: the word's shared-memory address.
_E8M0_WORD_PTX = """{{
.reg .b32 w, z, f;
ld.shared.b32 w, [$4];
shr.b32 z, w, 1;
lop3.b32 z, w, z, 0x7F7F7F7F, 0x28;
add.u32 z, z, 0x7F7F7F7F;
lop3.b32 f, z, 0x80808080, 0, 0x0C;
{scales}
}}"""
_E8M0_SCALE_PTX = """prmt.b32 ${i}, w, f, {sel};
shr.b32 ${i}, ${i}, 1;"""


def e8m0_word_selector(i: int) -> int:
  """The ``prmt`` selector of ``_E8M0_WORD_PTX`` for byte ``i`` of the word:
  lanes of (f_i, c_i) from ``{f, w}``."""
  if not 0 <= i < 4:
    raise ValueError(f"byte must be in 0..3, got {i}")
  return (4 + i) | (i << 4) | ((4 + i) << 8) | (i << 12)


def e8m0_word_ptx() -> str:
  return _E8M0_WORD_PTX.format(scales="\n".join(
      _E8M0_SCALE_PTX.format(i=i, sel=hex(e8m0_word_selector(i)))
      for i in range(4)))


# E4M3 (NVFP4): the hardware converts a byte pair to f16x2 exactly, each f16
# to bf16 exactly (an E4M3 value has four significant bits) in one
# instruction, and the bf16 is repeated in both lanes: per scale half a
# conversion, one F2F and one move, against a byte load and three conversions.
_E4M3_PAIR_PTX = """cvt.rn.f16x2.e4m3x2 h, {half};
mov.b32 {{a, b}}, h;
cvt.rn.bf16.f16 a, a;
mov.b32 ${lo}, {{a, a}};
cvt.rn.bf16.f16 b, b;
mov.b32 ${hi}, {{b, b}};"""
_E4M3_WORD_PTX = """{
.reg .b32 w, h;
.reg .b16 p, q, a, b;
ld.shared.b32 w, [$4];
mov.b32 {p, q}, w;
""" + _E4M3_PAIR_PTX.format(half="p", lo=0, hi=1) + "\n" + _E4M3_PAIR_PTX.format(
    half="q", lo=2, hi=3) + "\n}"


def scale_word_ptx(kind: str) -> str:
  """The block of ``Config.scale_words`` for scales ``kind`` ("e8m0", "e4m3")."""
  if kind == "e8m0":
    return e8m0_word_ptx()
  if kind == "e4m3":
    return _E4M3_WORD_PTX
  raise ValueError(f"scale_words converts e8m0 or e4m3 scales, got {kind!r}")


def _scale_words_ok(s_ref, group: Optional[int], tile_k_total: int) -> bool:
  """Whether a row's scales of this tile come in whole aligned words: four
  or more a row, a multiple of four, rows of a multiple of 4 bytes."""
  _, _, ir, _, _, _, _ = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  if group is None or group >= tile_k_total or (tile_k_total // group) % 4:
    return False
  ty = ir.MemRefType(s_ref.type)
  strides, _ = ty.get_strides_and_offset()
  return (mgpu_utils.bitwidth(ty.element_type) == 8
          and len(strides) == 2 and strides[1] == 1 and strides[0] > 0
          and strides[0] % 4 == 0 and ty.shape[1] % 4 == 0)


def _scale_regs(w, s_ref, group: Optional[int], tile_k_total: int, kind: str,
                fast: bool = False, words: bool = False):
  """Multiplies a bf16 WGMMA fragment ``[rows, cols]`` by per-row/group scales.

  Args:
    w: bf16 FragmentedArray in the WGMMA layout.
    s_ref: SMEM memref ``[rows, ng]`` of scales for the groups this tile spans.
    group: group size along K (columns), or None if ``s_ref`` has one column.
    tile_k_total: number of columns of ``w``.
    kind: scale encoding, see ``_scale_to_bf16``.
    fast: E4M3 scales through the hardware conversion.
    words: E8M0 / E4M3 scales four at a time (``Config.scale_words``) where
      a row's scales come in whole words (``_scale_words_ok``).
  """
  mgpu, fa, ir, arith, llvm, memref, vector = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  bf16 = ir.BF16Type.get()
  i32 = ir.IntegerType.get_signless(32)
  index = ir.IndexType.get()
  shape = tuple(w.shape)
  rows = common.wgmma_row_index(shape)
  words = (words and kind in ("e8m0", "e4m3")
           and _scale_words_ok(s_ref, group, tile_k_total))
  if words:
    base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(s_ref))
    stride = ir.MemRefType(s_ref.type).get_strides_and_offset()[0][0]
    word_ptx = scale_word_ptx(kind)
    pair_ty = ir.VectorType.get((2,), bf16)
    quad_ty = ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>")
  cache = {}
  new_regs = w.registers.copy()
  for idx, row_key, col_tile in common.wgmma_reg_rows_cols(shape):
    gi = 0 if group is None or group >= tile_k_total else (col_tile * 8) // group
    key = (row_key, gi)
    if key not in cache and words:
      row = arith.index_cast(i32, rows[row_key])
      addr = arith.addi(base, arith.addi(
          arith.muli(row, arith.constant(i32, stride)),
          arith.constant(i32, gi - gi % 4)))
      quad = llvm.inline_asm(quad_ty, [addr], word_ptx, "=r,=r,=r,=r,r",
                             has_side_effects=True)
      for j in range(4):
        bits = llvm.extractvalue(i32, quad, [j])
        cache[(row_key, gi - gi % 4 + j)] = mgpu_utils.bitcast(bits, pair_ty)
    if key not in cache:
      s = memref.load(s_ref, [rows[row_key], arith.constant(index, gi)])
      s = _scale_to_bf16(s, kind, fast)
      cache[key] = vector.broadcast(ir.VectorType.get((2,), bf16), s)
    new_regs[idx] = arith.mulf(w.registers[idx], cache[key])
  return fa.FragmentedArray(_registers=new_regs, _layout=w.layout,
                            _is_signed=None)


def _map_acc_rows(acc, row_scale, combine):
  """A new f32 WGMMA fragment of ``acc``'s shape and layout: register ``idx``
  is ``combine(idx, s)``, ``s`` the f32 pair of its row's value
  ``row_scale(row)`` (an f32 scalar, computed once a row; ``row`` the row's
  index value)."""
  _, fa, ir, _, _, _, vector = common._mlir()
  shape = tuple(acc.shape)
  rows = common.wgmma_row_index(shape)
  vty = ir.VectorType.get((2,), ir.F32Type.get())
  cache = {}
  new_regs = acc.registers.copy()
  for idx, row_key, _ in common.wgmma_reg_rows_cols(shape):
    if row_key not in cache:
      cache[row_key] = vector.broadcast(vty, row_scale(rows[row_key]))
    new_regs[idx] = combine(idx, cache[row_key])
  return fa.FragmentedArray(_registers=new_regs, _layout=acc.layout,
                            _is_signed=None)


def _scale_acc_rows(acc, s_ref, kind: str, t_ref=None):
  """Multiplies an f32 WGMMA accumulator by a per-row scale (and a scalar)."""
  _, _, ir, arith, _, memref, _ = common._mlir()
  f32 = ir.F32Type.get()
  index = ir.IndexType.get()
  t = None
  if t_ref is not None:
    t = memref.load(t_ref, [arith.constant(index, 0)])

  def row_scale(row):
    if s_ref is None:
      return t
    s = memref.load(s_ref, [row])
    s = arith.extf(f32, _scale_to_bf16(s, kind)) if s.type != f32 else s
    return s if t is None else arith.mulf(s, t)
  return _map_acc_rows(acc, row_scale,
                       lambda idx, s: arith.mulf(acc.registers[idx], s))


def _promote_rows(acc, part, s_ref):
  """``acc + part * s[row]`` in float32, one FMA an element (``Config.acc_scale``).

  ``part`` is one group's partial sum (f32 WGMMA accumulator ``[rows, cols]``),
  ``s_ref`` the SMEM ``[rows, 1]`` of that group's scales (bf16 or float32,
  widened exactly).
  """
  _, _, ir, arith, _, memref, vector = common._mlir()
  f32 = ir.F32Type.get()
  zero = arith.constant(ir.IndexType.get(), 0)

  def row_scale(row):
    s = memref.load(s_ref, [row, zero])
    return s if s.type == f32 else arith.extf(f32, s)
  return _map_acc_rows(acc, row_scale, lambda idx, s: vector.fma(
      part.registers[idx], s, acc.registers[idx]))


def _store_acc_transposed(acc, o_ref, valid_cols: Optional[int]):
  """Stores ``acc [rows, cols]`` (WGMMA layout) to ``o_ref [cols, rows]``.

  Args:
    acc: f32 FragmentedArray in the WGMMA layout.
    o_ref: GMEM memref of shape ``[cols_or_less, rows]``.
    valid_cols: if not None, only columns ``< valid_cols`` are written.
  """
  mgpu, fa, ir, arith, _, memref, vector = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  index = ir.IndexType.get()
  out_ty = ir.MemRefType(o_ref.type).element_type
  shape = tuple(acc.shape)
  bases = common.thread_col_base(shape)
  for idx, _, _ in common.wgmma_reg_rows_cols(shape):
    row, col = bases[idx]
    reg = acc.registers[idx]
    for v in range(2):
      val = vector.extract(reg, dynamic_position=[],
                           static_position=ir.DenseI64ArrayAttr.get([v]))
      if val.type != out_ty:
        val = arith.truncf(out_ty, val)
      c = arith.addi(col, arith.constant(index, v))
      if valid_cols is None:
        memref.store(val, o_ref, [c, row])
      else:
        ok = arith.cmpi(arith.CmpIPredicate.ult, c,
                        arith.constant(index, valid_cols))
        with mgpu_utils.when(ok):
          memref.store(val, o_ref, [c, row])


# Config.cluster_reduce, in four steps per thread (``_cluster_sum_acc``,
# ``_cluster_wait``): (1) each register pair of the partial accumulator is
# stored to this CTA's exchange buffer, (2) a cluster barrier (arrive has
# release and wait acquire semantics: every CTA's stores are seen after it),
# (3) every CTA of the cluster, the CTA itself included, is read at the same
# word through distributed shared memory (``mapa`` gives the peer's address)
# and summed in rank order, so that the sum is the same bits whichever CTA
# stores it, then an arrive, and (4) after the output is written, the wait
# that keeps every CTA's shared memory alive until all reads are done. The
# CTA's rank is never needed: every CTA holds the whole sum. Written as PTX,
# as the amax exchange of ``gpu_quantize.Config.one_pass`` (a peer view of a
# Pallas ref did not lower on jax 0.11.2).
_CLUSTER_STORE_PTX = "st.shared.v2.f32 [$0], {$1, $2};"
_CLUSTER_SYNC_PTX = """barrier.cluster.arrive.aligned;
barrier.cluster.wait.aligned;"""
_CLUSTER_SUM_PTX = """{{
.reg .b32 r;
.reg .f32 a, b;
mapa.shared::cluster.u32 r, $2, 0;
ld.shared::cluster.v2.f32 {{$0, $1}}, [r];
{peers}
}}"""
_CLUSTER_PEER_PTX = """mapa.shared::cluster.u32 r, $2, {j};
ld.shared::cluster.v2.f32 {{a, b}}, [r];
add.f32 $0, $0, a;
add.f32 $1, $1, b;"""
_CLUSTER_ARRIVE_PTX = "barrier.cluster.arrive.aligned;"
_CLUSTER_WAIT_PTX = "barrier.cluster.wait.aligned;"


def cluster_sum_ptx(ctas: int) -> str:
  """The PTX of step (3) of ``Config.cluster_reduce`` for ``ctas`` CTAs: the
  register pair at shared-memory address ``$2`` summed over ranks 0 ..
  ``ctas - 1`` into ``$0, $1``."""
  if ctas < 2:
    raise ValueError(f"a cluster reduction needs 2 or more CTAs, got {ctas}")
  return _CLUSTER_SUM_PTX.format(peers="\n".join(
      _CLUSTER_PEER_PTX.format(j=j) for j in range(1, ctas)))


def _cluster_sum_acc(acc, ref, ctas: int):
  """Steps (1)-(3) of ``Config.cluster_reduce``: ``acc`` (an f32 WGMMA
  fragment, one warpgroup) summed over the cluster's ``ctas`` CTAs through
  ``ref``, a float32 shared-memory buffer of ``acc.size`` words."""
  _, fa, ir, arith, llvm, _, vector = common._mlir()
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  f32 = ir.F32Type.get()
  i32 = ir.IntegerType.get_signless(32)
  void = ir.Type.parse("!llvm.void")
  regs = acc.registers
  if ir.MemRefType(ref.type).element_type != f32 or math.prod(
      ir.MemRefType(ref.type).shape) != 2 * 128 * regs.size:
    raise ValueError(f"the exchange buffer must hold {2 * 128 * regs.size} "
                     f"float32 words, got {ref.type}")
  base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref))
  lane = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, 128))
  # register r of thread t at word pair r * 128 + t: a warp's stores and loads
  # are 256 consecutive bytes
  addrs, pairs = [], []
  for r, (idx, reg) in enumerate(np.ndenumerate(regs)):
    off = arith.addi(arith.muli(lane, arith.constant(i32, 8)),
                     arith.constant(i32, r * 128 * 8))
    addrs.append(arith.addi(base, off))
    pairs.append(idx)
    a, b = (vector.extract(reg, dynamic_position=[],
                           static_position=ir.DenseI64ArrayAttr.get([v]))
            for v in range(2))
    llvm.inline_asm(void, [addrs[-1], a, b], _CLUSTER_STORE_PTX, "r,f,f",
                    has_side_effects=True)
  llvm.inline_asm(void, [], _CLUSTER_SYNC_PTX, "", has_side_effects=True)
  pair_ty = ir.Type.parse("!llvm.struct<(f32, f32)>")
  sum_ptx = cluster_sum_ptx(ctas)
  new = regs.copy()
  for idx, addr in zip(pairs, addrs):
    out = llvm.inline_asm(pair_ty, [addr], sum_ptx, "=&f,=&f,r",
                          has_side_effects=True)
    a = llvm.extractvalue(f32, out, [0])
    b = llvm.extractvalue(f32, out, [1])
    v = vector.broadcast(regs[idx].type, a)
    new[idx] = vector.insert(b, v, dynamic_position=[],
                             static_position=ir.DenseI64ArrayAttr.get([1]))
  llvm.inline_asm(void, [], _CLUSTER_ARRIVE_PTX, "", has_side_effects=True)
  return fa.FragmentedArray(_registers=new, _layout=acc.layout, _is_signed=None)


def _cluster_wait():
  """Step (4) of ``Config.cluster_reduce``."""
  _, _, ir, _, llvm, _, _ = common._mlir()
  llvm.inline_asm(ir.Type.parse("!llvm.void"), [], _CLUSTER_WAIT_PTX, "",
                  has_side_effects=True)


# ----------------------------------------------------------------------------
# Interpret-mode twins of the register helpers above (whole-tile jnp).
#
# The Mosaic GPU interpreter runs a kernel's jaxpr on the CPU but cannot run
# ``inline_mgpu`` bodies (raw MLIR on register fragments). With ``interpret``
# the kernel calls these instead: the same arithmetic on whole tiles, read from
# the same shared-memory refs at the same indices. Everything around them (TMA
# pipeline, scale copies, barriers, split K, the warp-specialized reduction,
# the output slicing) is the compiled kernel's own code.
# ----------------------------------------------------------------------------

def _jnp_scale_to_bf16(val, kind: str):
  """Scales to bf16 as ``_scale_to_bf16`` converts them, on a whole array."""
  if kind == "float":
    return val.astype(jnp.bfloat16)
  if kind == "e8m0":
    return common.bf16_from_e8m0(val)
  if kind == "e4m3":
    return val.astype(jnp.float32).astype(jnp.bfloat16)
  raise ValueError(kind)


def _jnp_scale_regs(w, s, group: Optional[int], tile_k_total: int, kind: str):
  """``_scale_regs`` on a whole ``[rows, cols]`` bf16 tile; ``s`` is ``[rows, ng]``."""
  s = _jnp_scale_to_bf16(s, kind)
  if group is None or group >= tile_k_total:
    s = s[:, :1]
  else:
    s = jnp.repeat(s, group, axis=1)
  return w * s


def _jnp_promote_rows(acc, part, s):
  """``_promote_rows`` on a whole f32 tile (``s``: ``[rows, 1]``). The
  compiled kernel fuses the multiply-add (one rounding); this twin rounds
  twice."""
  return acc + part * s.astype(jnp.float32)


def _jnp_scale_acc_rows(acc, s, kind: str, t):
  """``_scale_acc_rows`` on a whole f32 tile: ``s`` per row (or None), ``t`` scalar."""
  if s is not None:
    s = s if s.dtype == jnp.float32 else _jnp_scale_to_bf16(s, kind).astype(
        jnp.float32)
    if t is not None:
      s = s * t
    return acc * s[:, None]
  return acc * t


# ----------------------------------------------------------------------------
# The kernel.
# ----------------------------------------------------------------------------

def _scale_kind(fmt: str) -> str:
  return {"mxfp4": "e8m0", "nvfp4": "e4m3"}.get(fmt, "float")


@functools.lru_cache(maxsize=None)
def _build(fmt: str, group: Optional[int], m: int, n: int, k: int,
           scale_dtype: str, out_dtype: str, cfg: Config, interpret=None,
           w_order: str = "natural"):
  """Builds the pallas kernel for one static problem; returns a callable.

  With ``cfg.ws`` the kernel is warp-specialized: one warpgroup issues the TMA
  copies and two compute warpgroups each dequantize and multiply one half of every
  K step, their partial sums are added through shared memory at the end; with
  ``cfg.n_split`` as well, each compute warpgroup takes half of the weight rows
  and all of every K step, and writes its own output columns. Without ``ws``
  one warpgroup does everything with a software pipeline.

  ``interpret`` (``InterpretGPUParams`` or None) runs the kernel in the Mosaic GPU
  interpreter, with the register helpers replaced by their ``_jnp_*`` twins.
  """
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  tile_n, tile_k, tile_m = cfg.tile_n, cfg.tile_k, cfg.tile_m
  ws = cfg.ws
  n_split = ws and cfg.n_split
  k_parts = 2 if ws and not n_split else 1
  tkw = tile_k // k_parts  # K columns each compute warpgroup handles per step
  wrows = tile_n // 2 if n_split else tile_n  # weight rows per compute warpgroup
  kch = cfg.k_chunks
  ckw = tkw // kch  # K columns dequantized and multiplied at a time
  split = cfg.split_k
  kps = k // split
  k_steps = kps // tile_k
  m_tiles = -(-m // tile_m)
  n_tiles = n // tile_n
  rows_out = min(tile_m, m)
  valid_cols = None if m % tile_m == 0 else m - (m_tiles - 1) * tile_m
  if m_tiles > 1 and valid_cols is not None:
    raise NotImplementedError("M must be a multiple of tile_m when M > tile_m")
  four_bit = fmt != "int8"
  wgmma_order = w_order != "natural"
  # codes whose word bits are permuted for a shorter decode
  split_order = w_order if w_order in SPLIT_ORDERS else None
  w_bits = 4 if four_bit else 8
  w_swz = plgpu.find_swizzle(ckw * w_bits, "weight tile")
  w_transforms = (plgpu.TilingTransform((8, w_swz * 8 // w_bits)),
                  plgpu.SwizzleTransform(w_swz))
  x_swz = plgpu.find_swizzle(ckw * 16, "activation tile")
  x_transforms = (plgpu.TilingTransform((8, x_swz // 2)),
                  plgpu.SwizzleTransform(x_swz))
  kind = _scale_kind(fmt)
  interp = interpret is not None
  # Config.cluster_reduce: the K slices are one cluster and add their partial
  # sums themselves. The interpreter cannot run the exchange (PTX through
  # distributed shared memory): there the cluster's CTAs write float32
  # partials that XLA sums, as without it.
  cluster = cfg.cluster_reduce and split > 1
  partials = split > 1 and (not cluster or interp)
  # Config.lut_regs: compiled kernels only (the interpreter's decode is jnp)
  lut_regs = cfg.lut_regs and not interp
  per_channel = group is None
  ng_total = None if per_channel else kps // group
  ng_step = None if per_channel else max(1, ckw // group)
  acc_out_dtype = jnp.float32 if partials else jnp.dtype(out_dtype)
  s_jdtype = jnp.dtype(scale_dtype)
  has_t = fmt == "nvfp4"
  if per_channel:
    scale_cw, n_scale_copies = 1, 1
  else:
    scale_cw = scale_chunk(fmt, ng_total, ng_step, s_jdtype.itemsize)
    n_scale_copies = ng_total // scale_cw

  def load_w(w_ref, tab=None):
    """The bf16 weight tile; ``tab``: the table words (``Config.lut_regs``)."""
    if interp:
      w = w_ref[...]
      if split_order:
        w = _jnp_unsplit_tile(w, split_order)
      if wgmma_order:
        w = _jnp_unpermute_tile(w)
      if fmt in ("int4", "int8"):
        return w.astype(jnp.bfloat16)
      return common.e2m1_from_int4(w).astype(jnp.bfloat16)
    layout = (plgpu.Layout.WGMMA_UPCAST_4X if four_bit
              else plgpu.Layout.WGMMA_UPCAST_2X)
    w = common.plgpu_load(w_ref, layout)
    in_layout = layout if wgmma_order else plgpu.Layout.WGMMA
    if not wgmma_order:
      w = plgpu.layout_cast(w, plgpu.Layout.WGMMA)
    if fmt == "int8":
      return w.astype(jnp.bfloat16)
    if fmt == "int4" and not wgmma_order:
      return w.astype(jnp.bfloat16)

    @plgpu.inline_mgpu(
        arg_types=(in_layout,) + ((plgpu.RefType(),) if tab is not None
                                  else ()),
        return_type=plgpu.ShapeDtypeStruct((wrows, ckw), jnp.bfloat16,
                                           plgpu.Layout.WGMMA))
    def to_bf16(_, wf, *table):
      if wgmma_order:
        wf = _upcast4x_as_wgmma(wf)
      if fmt == "int4" and split_order:
        return _int4_split_regs_to_bf16(wf)
      if fmt == "int4":
        return wf.astype(common._mlir()[2].BF16Type.get(), is_signed=True)
      if split_order:
        return _e2m1_split_regs_to_bf16(wf)
      if cfg.lut_decode:
        return _e2m1_regs_to_bf16_lut(wf, table[0] if table else None)
      if cfg.fast_decode:
        return _e2m1_regs_to_bf16_prmt(wf)
      return _e2m1_regs_to_bf16(wf)
    return to_bf16(w) if tab is None else to_bf16(w, tab)

  def fill_tables(tab):
    """``Config.lut_regs``: every thread stores the table words."""
    if tab is None:
      return

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def fill(_, ref):
      _lut_table_fill(ref)
    fill(tab)

  def scale_w(w, s_ref):
    if interp:
      return _jnp_scale_regs(w, s_ref[...], group, ckw, kind)

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.Layout.WGMMA),
        return_type=plgpu.ShapeDtypeStruct((wrows, ckw), jnp.bfloat16,
                                           plgpu.Layout.WGMMA))
    def apply(_, s, wf):
      return _scale_regs(wf, s, group, ckw, kind, cfg.fast_decode,
                         cfg.scale_words)
    return apply(s_ref, w)

  def mma_step(kk, x_ref, w_ref, acc_ref, s_smem, s_bar, part, stage=None,
               s_rows=slice(None), tab=None):
    """Dequantizes columns ``part`` of this step's tiles and accumulates,
    ``k_chunks`` column chunks at a time (each chunk's MMA in flight while
    the next is decoded). ``w_ref`` holds this warpgroup's weight rows,
    ``s_rows`` selects their rows of the group scales. ``acc_ref``: one
    accumulator, or (``Config.acc_scale``) one a chunk, whose group scales
    the caller applies to the sums."""
    if not per_channel:
      @pl.when(kk == 0)
      def _():
        plgpu.barrier_wait(s_bar.at[0])
    for c in range(kch):
      cols = pl.ds(c * ckw, ckw)
      wc = w_ref if kch == 1 else w_ref.at[:, cols]
      xc = x_ref if kch == 1 else x_ref.at[:, cols]
      dest = acc_ref[c] if cfg.acc_scale else acc_ref
      w = load_w(wc, tab)
      if not per_channel and not cfg.acc_scale:
        col0 = kk * tile_k + part * tkw + c * ckw
        g0 = col0 // group
        w = scale_w(w, s_smem.at[g0 // scale_cw, s_rows,
                                 pl.ds(g0 % scale_cw, ng_step)])
      if interp:
        common.interpret_wgmma(dest, w, xc[...], stage)
      else:
        plgpu.wgmma(dest, w, common.transpose_ref(xc))
    # The A operands live in registers that the next step overwrites: the
    # MMAs must be complete before the body returns.
    plgpu.wgmma_wait(0)

  def mma_step_acc(kk, x_ref, w_ref, carry, s_smem, s_bar, tab=None):
    """``Config.acc_scale``: each K chunk (one group) decoded with no scale,
    its MMA into a fresh accumulator (``mma_step``: every chunk's MMA issued
    before the one wait, so chunk c's runs while chunk c + 1 is decoded),
    then each partial sum times its group's scales added to the running sum
    ``carry``, in K order."""
    def mmas(*parts):
      mma_step(kk, x_ref, w_ref, parts, s_smem, s_bar, 0, tab=tab)
      return tuple(p[...] for p in parts)

    parts = pl.run_scoped(
        mmas, *[plgpu.ACC((tile_n, tile_m), jnp.float32) for _ in range(kch)])
    for c, part in enumerate(parts):
      g0 = (kk * tile_k + c * ckw) // group
      carry = promote(carry, part,
                      s_smem.at[g0 // scale_cw, :, pl.ds(g0 % scale_cw, 1)])
    return carry

  def promote(acc, part, s_ref):
    if interp:
      return _jnp_promote_rows(acc, part, s_ref[...])

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((tile_n, tile_m), jnp.float32,
                                           plgpu.Layout.WGMMA))
    def fma(_, a, p, s):
      return _promote_rows(a, p, s)
    return fma(acc, part, s_ref)

  def issue_scale_copy(s_gmem, s_smem, s_bar, n0, si):
    if per_channel:
      plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(n0, tile_n)], s_smem,
                              s_bar.at[0])
    else:
      # TMA boxes are at most 256 elements along each dimension: the scales of
      # a tile are copied in chunks of ``scale_cw`` groups.
      for c in range(n_scale_copies):
        plgpu.copy_gmem_to_smem(
            s_gmem.at[pl.ds(n0, tile_n),
                      pl.ds(si * ng_total + c * scale_cw, scale_cw)],
            s_smem.at[c], s_bar.at[0])

  def epilogue(acc, s_smem, s_bar, t_gmem, o_gmem, n0, mi, si, r0=None,
               red_smem=None):
    """Scales and stores an accumulator of ``acc.shape[0]`` weight rows: the
    CTA's rows from ``n0``, or with ``r0`` those from ``n0 + r0`` (the
    per-channel scales' rows from ``r0`` in ``s_smem``)."""
    rows = acc.shape[0]
    if per_channel:
      plgpu.barrier_wait(s_bar.at[0])
    if cluster and not interp:
      # every CTA sums the cluster's partials; the first K slice's stores them
      @plgpu.inline_mgpu(
          arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
          return_type=plgpu.ShapeDtypeStruct((rows, tile_m), jnp.float32,
                                             plgpu.Layout.WGMMA))
      def exchange(_, a, red):
        return _cluster_sum_acc(a, red, split)
      acc = exchange(acc, red_smem)

      @pl.when(si == 0)
      def _():
        _finish(acc, s_smem, t_gmem, o_gmem, n0, mi, si, rows, r0)

      @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
      def wait(_, red):
        del red  # the buffer the peers read, alive until they are done
        _cluster_wait()
      wait(red_smem)
      return
    _finish(acc, s_smem, t_gmem, o_gmem, n0, mi, si, rows, r0)

  def _finish(acc, s_smem, t_gmem, o_gmem, n0, mi, si, rows, r0):
    """The per-row scales and the store of ``epilogue``."""
    if r0 is not None:
      if per_channel:
        s_smem = s_smem.at[pl.ds(r0, rows)]
      n0 = n0 + r0
    if interp and (per_channel or has_t):
      acc = _jnp_scale_acc_rows(acc, s_smem[...] if per_channel else None, kind,
                                t_gmem[0] if has_t else None)
    elif per_channel or has_t:
      arg_types = [plgpu.Layout.WGMMA, plgpu.RefType()]
      args = [acc, s_smem]
      if has_t:
        arg_types.append(plgpu.RefType())
        args.append(t_gmem)

      @plgpu.inline_mgpu(
          arg_types=tuple(arg_types),
          return_type=plgpu.ShapeDtypeStruct((rows, tile_m), jnp.float32,
                                             plgpu.Layout.WGMMA))
      def epi(_, a, s, *t):
        return _scale_acc_rows(a, s if per_channel else None, kind,
                               t[0] if t else None)
      acc = epi(*args)
    if partials:
      o_view = o_gmem.at[si, pl.ds(mi * tile_m, rows_out), pl.ds(n0, rows)]
    else:
      o_view = o_gmem.at[pl.ds(mi * tile_m, rows_out), pl.ds(n0, rows)]

    if interp:
      o_view[...] = acc.T[:rows_out].astype(acc_out_dtype)
      return

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(_, a, o):
      _store_acc_transposed(a, o, valid_cols)
    store(acc, o_view)

  def split_refs(refs):
    if has_t:
      x_gmem, w_gmem, s_gmem, t_gmem, o_gmem = refs[:5]
      rest = refs[5:]
    else:
      x_gmem, w_gmem, s_gmem, o_gmem = refs[:4]
      t_gmem = None
      rest = refs[4:]
    return x_gmem, w_gmem, s_gmem, t_gmem, o_gmem, rest

  if per_channel:
    s_scratch = plgpu.SMEM((tile_n,), s_jdtype)
  else:
    s_scratch = plgpu.SMEM((n_scale_copies, tile_n, scale_cw), s_jdtype)

  def body_single(*refs):
    x_gmem, w_gmem, s_gmem, t_gmem, o_gmem, rest = split_refs(refs)
    s_smem, s_bar, *rest = rest
    red = rest.pop(0) if cluster and not interp else None
    tab = rest.pop(0) if lut_regs else None
    ni = lax.axis_index("n")
    mi = lax.axis_index("m")
    si = lax.axis_index("s")
    n0 = pl.multiple_of(ni * tile_n, tile_n)
    issue_scale_copy(s_gmem, s_smem, s_bar, n0, si)
    fill_tables(tab)

    xs = plgpu.BlockSpec((tile_m, tile_k), lambda kk: (mi, kk),
                         transforms=x_transforms)
    wsp = plgpu.BlockSpec((tile_n, tile_k), lambda kk: (0, kk),
                          transforms=w_transforms)
    views = (x_gmem.at[:, pl.ds(si * kps, kps)],
             w_gmem.at[pl.ds(n0, tile_n), pl.ds(si * kps, kps)])

    def compute(acc_ref):
      def step(idx, x_smem, w_smem):
        mma_step(idx[0], x_smem, w_smem, acc_ref, s_smem, s_bar, 0, tab=tab)

      plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=[xs, wsp],
                          max_concurrent_steps=cfg.stages)(*views)
      return acc_ref[...]

    if cfg.acc_scale:
      # The running sum is the pipeline's carry; each step's groups go
      # through accumulators of their own (mma_step_acc).
      def step_acc(idx, x_smem, w_smem, carry):
        return mma_step_acc(idx[0], x_smem, w_smem, carry, s_smem, s_bar,
                            tab=tab)

      init = jnp.zeros((tile_n, tile_m), jnp.float32)
      if not interp:  # the interpreter has no layouts
        init = plgpu.layout_cast(init, plgpu.Layout.WGMMA)
      acc = plgpu.emit_pipeline(step_acc, grid=(k_steps,), in_specs=[xs, wsp],
                                max_concurrent_steps=cfg.stages,
                                init_carry=init)(*views)
    else:
      acc = pl.run_scoped(compute, plgpu.ACC((tile_n, tile_m), jnp.float32))
    epilogue(acc, s_smem, s_bar, t_gmem, o_gmem, n0, mi, si, red_smem=red)

  def body_ws(*refs):
    x_gmem, w_gmem, s_gmem, t_gmem, o_gmem, rest = split_refs(refs)
    ni = lax.axis_index("n")
    mi = lax.axis_index("m")
    si = lax.axis_index("s")
    wg = lax.axis_index("wg")
    n0 = pl.multiple_of(ni * tile_n, tile_n)
    xs = plgpu.BlockSpec((tile_m, tile_k), lambda kk: (mi, kk),
                         transforms=x_transforms, memory_space=plgpu.SMEM)
    wsp = plgpu.BlockSpec((tile_n, tile_k), lambda kk: (0, kk),
                          transforms=w_transforms, memory_space=plgpu.SMEM)
    x_view = x_gmem.at[:, pl.ds(si * kps, kps)]
    w_view = w_gmem.at[pl.ds(n0, tile_n), pl.ds(si * kps, kps)]

    def get_pipeline(body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_steps,), memory_registers=40, in_specs=[xs, wsp],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages,
          compute_context=compute_context)

    ignore = lambda *_, **__: None

    # The K split adds the two partial sums through shared memory; the N split
    # has none to add.
    red = {} if n_split else dict(
        red_smem=plgpu.SMEM((tile_n, tile_m), jnp.float32),
        red_bar=plgpu.Barrier(num_barriers=1))

    @functools.partial(
        pl.run_scoped,
        allocs=get_pipeline(ignore, ignore).get_allocations(x_view, w_view),
        s_smem=s_scratch,
        s_bar=plgpu.Barrier(num_arrivals=n_scale_copies, num_barriers=1),
        **red,
        **({} if not lut_regs else dict(tab=plgpu.SMEM((8,), jnp.uint32))),
        # Interpret mode only: per-warpgroup operand staging for the wgmma.
        **({} if not interp else dict(
            stage_a=plgpu.SMEM((2, wrows, ckw), jnp.bfloat16),
            stage_b=plgpu.SMEM((2, ckw, tile_m), jnp.bfloat16))),
        collective_axes="wg",
    )
    def _scope(allocs, s_smem, s_bar, red_smem=None, red_bar=None, tab=None,
               **stage_refs):
      @pl.when(wg == 0)
      def _():
        issue_scale_copy(s_gmem, s_smem, s_bar, n0, si)
      fill_tables(tab)  # every warpgroup, for its own threads

      def compute_context(run):
        @functools.partial(pl.run_scoped,
                           acc_ref=plgpu.ACC((wrows, tile_m), jnp.float32))
        def _acc(acc_ref):
          run(acc_ref)
          acc = acc_ref[...]
          if n_split:
            epilogue(acc, s_smem, s_bar, t_gmem, o_gmem, n0, mi, si,
                     r0=pl.multiple_of(wg * wrows, wrows))
            return

          @pl.when(wg == 1)
          def _():
            red_smem[...] = acc
            plgpu.barrier_arrive(red_bar.at[0])

          @pl.when(wg == 0)
          def _():
            plgpu.barrier_wait(red_bar.at[0])
            red = (red_smem[...] if interp
                   else common.plgpu_load(red_smem, plgpu.Layout.WGMMA))
            total = acc + red
            epilogue(total, s_smem, s_bar, t_gmem, o_gmem, n0, mi, si)

      def body(idx, x_smem, w_smem, acc_ref):
        stage = (stage_refs["stage_a"].at[wg], stage_refs["stage_b"].at[wg]) if (
            interp) else None
        if n_split:
          rows = pl.ds(pl.multiple_of(wg * wrows, wrows), wrows)
          mma_step(idx[0], x_smem, w_smem.at[rows, :], acc_ref, s_smem, s_bar,
                   0, stage, s_rows=rows, tab=tab)
        else:
          ks = pl.ds(wg * tkw, tkw)
          mma_step(idx[0], x_smem.at[:, ks], w_smem.at[:, ks], acc_ref, s_smem,
                   s_bar, wg, stage, tab=tab)
        return acc_ref

      get_pipeline(body, compute_context)(x_view, w_view, allocations=allocs)

  out_shape = (split, m, n) if partials else (m, n)
  extra = {} if interpret is None else {"interpret": interpret}
  if ws:
    kern = plgpu.kernel(
        body_ws,
        out_type=jax.ShapeDtypeStruct(out_shape, acc_out_dtype),
        grid=(n_tiles, m_tiles, split),
        grid_names=("n", "m", "s"),
        num_threads=3,
        thread_name="wg",
        **extra,
    )
  else:
    scratch = [s_scratch, plgpu.Barrier(num_arrivals=n_scale_copies,
                                        num_barriers=1)]
    if cluster:
      # the K slices of an output tile: one cluster (axis "s")
      grid = dict(grid=(n_tiles, m_tiles), grid_names=("n", "m"),
                  cluster=(split,), cluster_names=("s",))
      if not interp:
        scratch.append(plgpu.SMEM((tile_n * tile_m,), jnp.float32))
    else:
      grid = dict(grid=(n_tiles, m_tiles, split), grid_names=("n", "m", "s"))
    if lut_regs:
      scratch.append(plgpu.SMEM((8,), jnp.uint32))
    kern = plgpu.kernel(
        body_single,
        out_type=jax.ShapeDtypeStruct(out_shape, acc_out_dtype),
        scratch_types=scratch,
        **grid,
        **extra,
    )

  def call(x, w_codes, w_scale, w_tensor_scale):
    if four_bit:
      w = lax.bitcast_convert_type(w_codes, jnp.int4).reshape(n, k)
    else:
      w = w_codes
    s = w_scale.reshape(n) if per_channel else w_scale
    args = [x.astype(jnp.bfloat16), w, s]
    if has_t:
      t = jnp.ones((1,), jnp.float32) if w_tensor_scale is None else (
          jnp.asarray(w_tensor_scale, jnp.float32).reshape(1))
      args.append(t)
    out = kern(*args) if interpret is None else common.run_interpreted(
        kern, *args)
    if partials:
      out = out.sum(axis=0)
    return out.astype(out_dtype)

  return call


def kernel_scales(w_scale: jax.Array, problem: MatmulProblem,
                  cfg: Config) -> jax.Array:
  """The group scales as the kernel takes them: as given, or as bf16 where
  the given ones would not fit in shared memory.

  ``smem_bytes`` counts two bytes a float group scale (the tuned tilings
  were measured with bf16 scales), but a ``QuantSpec``'s group scales are
  float32 by default: three of the H200 table's tilings of 28672x8192
  needed 238-340 KB of shared memory with them. Where the given dtype does
  not fit, the scales are rounded to bf16 first. The weight-tile path
  multiplies in bf16 anyway (``_scale_to_bf16`` rounds each scale in
  registers, to nearest even as ``astype`` does), so its bits do not change;
  ``Config.acc_scale`` then multiplies by the bf16 values. Where they fit,
  the scales pass unchanged: a conversion before the kernel would be an XLA
  op of its own on every call, a launch's time at decode. Per-channel scales
  (the float32 epilogue's) and MXFP4's / NVFP4's one-byte scales always pass
  unchanged.
  """
  g = common.weight_group(problem)
  if (g is None or _scale_kind(problem.w_format) != "float"
      or w_scale.dtype == jnp.bfloat16):
    return w_scale
  if smem_bytes(problem, cfg, scale_itemsize=jnp.dtype(w_scale.dtype).itemsize
                ) <= MAX_SMEM_BYTES:
    return w_scale
  return w_scale.astype(jnp.bfloat16)


def matmul(operands: MatmulOperands, problem: MatmulProblem, *,
           config: Optional[Config] = None, interpret=False) -> jax.Array:
  """Runs the Mosaic GPU weight-only kernel.

  Args:
    operands: see ``reference``.
    problem: the static description; ``supports(problem)`` should be True.
    config: tiling override (benchmarks); default: the tuned table's
      (``tuned_config``), else one picked from the shape.
    interpret: False to compile for a Hopper GPU; True (or an
      ``InterpretGPUParams``, e.g. with ``detect_races=True``) to run the kernel
      on the CPU in the Mosaic GPU interpreter, for testing. See
      ``_gpu_common.interpret_params``.

  Returns:
    ``[M, N]`` in ``problem.out_dtype``.

  Raises:
    ValueError: for problems outside this kernel's formats or shapes.
  """
  params = common.interpret_params(interpret)
  _validate(problem)
  check_scale_dtypes(operands, problem, "gpu_weight_only")
  refusal = None if config is None else _config_refusal(problem, config)
  if refusal is not None:
    raise ValueError(refusal)
  cfg = config
  if cfg is None:
    cfg = tuned_config(problem)
    if not _shape_ok(problem, cfg):
      cfg = _decode_config(problem)
  if params is not None:
    common.check_interpreter_threads(3 if cfg.ws else 1)
  if not _tiles_ok(problem, cfg):
    raise ValueError(f"shape M={problem.m} N={problem.n} K={problem.k} does not "
                     f"fit the tiling {cfg}")
  if not _smem_ok(problem, cfg):
    raise ValueError(
        f"the tiling {cfg} needs {smem_bytes(problem, cfg)} bytes of shared "
        f"memory for M={problem.m} N={problem.n} K={problem.k}, more than the "
        f"{MAX_SMEM_BYTES} a Hopper CTA may use; lower stages or tile_k, or "
        "raise split_k")
  g = common.weight_group(problem)
  scales = kernel_scales(operands.w_scale, problem, cfg)
  fn = _build(problem.w_format, g, problem.m, problem.n, problem.k,
              jnp.dtype(scales.dtype).name, problem.out_dtype, cfg,
              params, problem.w_order)
  return fn(operands.x, operands.w_codes, scales, operands.w_tensor_scale)
