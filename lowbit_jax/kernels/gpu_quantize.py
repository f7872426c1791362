"""One-pass quantize and fake_quant for scales along axis 0 (and per row), in Mosaic GPU.

``lowbit_jax.quantize(x, spec)`` of a ``[K, N]`` array whose scale blocks run
along axis 0 in short groups (MX formats, NVFP4, int, fp4 and NF4 ``group_size`` 16..128) is, on
XLA's GPU path, a reduction pass for the block amax and an elementwise pass that
reads ``x`` again (3 to 6 kernels in all). Here one kernel reads each ``[tile_k,
tile_n]`` tile of ``x`` once (TMA into shared memory, a pipeline of
``Config.stages``), and for each block of rows:

1. takes the per-column amax as an elementwise max over the block's rows (each
   row is a register vector of ``tile_n`` columns, so no cross-thread
   reduction is needed; rows are read from shared memory in chunks of
   ``Config.rows``, every load of a chunk before any arithmetic or store);
2. computes the block scale exactly as ``lowbit_jax.core._quantize._grid``
   does (E8M0 exponents from the amax's bits; float32 scales ``amax / max``;
   NVFP4's E4M3 block scale over the tensor scale);
3. scales, rounds and encodes each row (E4M3 through the hardware convert,
   E2M1 and E2M3 codes by a round-to-nearest-even on the float32 bits
   (``_float_codes``), integers by ``round``), packs 4-bit codes two rows
   to a byte and 6-bit codes four rows to three bytes (``QArray``'s layout
   along axis 0), and writes codes and scales (``quantize``) or the
   dequantized values (``fake_quant``'s forward; under differentiation also
   the straight-through gradient's clip mask, where core keeps one) through
   TMA.

The results equal ``lowbit_jax.quantize`` / ``fake_quant`` bit for bit (codes,
scales, tensor scale; the values of the fake-quant forward), except for which
NaN a block holding a NaN or an inf gets (its scale is NaN either way, the
E8M0 code 255 or an E4M3 NaN, so it dequantizes to NaN). Divisions use the
instruction XLA's GPU backend emits for a float32 ``/`` (``_div_full``), so
a scale such as ``amax / 7`` is the same number the XLA path computes on the
same GPU; in the interpreter (CPU) they are IEEE divisions, as the CPU
reference's. Which instruction that is (``div.full.f32``, within 2 ulp, or
``div.rn.f32``) is XLA's choice, per version and fusion: ``DIVISION`` holds
it per context (a block's scale, an element by its scale), and
``experiments/probe_gpu_division.py`` measures which one matches on a GPU
(uint8 per channel differed from XLA at float32 ties with ``div.full`` on
the H200, jax 0.11.2).

NVFP4's tensor scale needs the amax of the whole tensor before any block can
be scaled: XLA reduces it first (one read of ``x``), the kernel takes the
derived scalars, so NVFP4 costs two reads of ``x`` against one for the block
formats. Per-channel scales (one per column of axis 0's whole length:
``int8``/``int4``/``int3``/``int2``, ``fp8_e4m3``/``fp8_e5m2``, fp6 and fp4,
uint8 with a zero point, ternary (TWN: XLA also reduces its threshold) and
binary (BWN); ids ``<format>_pc``) and per-tensor ones (the 8-bit formats;
``<format>_pt``) likewise: their block does not fit on chip, so core's own ``_grid`` computes
the scale (XLA keeps only its amax reduction and scale arithmetic, so the
scale is the reference's bit for bit), and the kernel divides by it
(``div.full.f32``, as XLA's ``x / s``), rounds, packs along axis 0 as
``_qarray.pack`` does (two int4, four int2 or eight int3 codes per unit) and
writes codes or values in one pass (``Config.reverse`` walks the grid from
the last rows, which the amax pass may have left in L2). Two passes read
``x`` twice: bf16 int8 per channel moves 2 + 2 + 1 bytes per element against
the roofline's 2 + 1, so its quantize reaches at most 60% of the roofline
unless the L2 serves part of the second read (fake_quant: 6 against 4, 67%).
``Config.amax_kernel`` runs that range reduction as this module's own
kernel (``_build_amax``) for the symmetric absmax formats (and NVFP4's
tensor range), its partials maxed by XLA and handed to ``_grid``: the same scale, a reduction whose
walk is the quantize kernel's reversed (measured level with XLA's on an
H100, untimed on the H200; ``Config``). One pass would need a CTA to hold a
column's whole length: a strip of bf16
[8192, w] fits the 227 KB of shared memory only for w <= 13 columns, a TMA
box needs at least 16 bytes a row (8 bf16 columns, 16 int8 codes: the codes
of an 8-column strip could not leave through TMA), int4/int3/int2 codes pack
rows that such a strip spreads over different threads, and a strip of 128
columns (the width a row of this kernel's layout needs) over the whole length
is 2 MB, so 64 CTAs at once would hold 128 MB, far past the L2, for a second
read from there. A cluster of CTAs splitting the length and exchanging their
partial amax through distributed shared memory avoids all three:
``Config.one_pass`` (session 34) does that for the symmetric per-channel
formats (``one_pass_kinds``): a cluster of up to 8 CTAs (16, Hopper's
non-portable size, since session 41) of up to 4
warpgroups per column strip of 128, each CTA reducing its share of the rows
while its last ``stages`` tiles stay in shared memory, the partial amax rows
exchanged in PTX (``_CLUSTER_MAX_PTX``), the scale derived as a block's
(``_block_scale``), then its rows quantized, the others read again from the
L2. It is bit-exact (the interpreter, one CTA a strip; the H100, clusters
of 8, on the bench's on-device check) but measured slower than the two
passes on an H100 (bf16 8192x8192, jax 0.11.2,
``benchmarks/kernels_h100_runs/gpu_quantize_h100_s34{c,d,e,f}.md``): int8
quantize 159 us against 126 for the two-pass kernel and 143 for XLA,
fake_quant 163 against 151; fp8 e4m3 quantize 145 against 123, fake_quant
166 against 151. One CTA of 208 KB of shared memory is alone on its SM, so
its load and its arithmetic do not overlap as four small two-pass CTAs'
do (one warpgroup a CTA: 229 us; walking several strips a CTA so that the
next strip's loads run under this one's quantize, ``Config.strips``: 175 to
227 us). Clusters of 16, each CTA holding all of its 512 rows so that
nothing is read twice, were slower again (session 41, int8 quantize 179 us,
``gpu_quantize_h100_s41op16.md``): the L2 re-read is not the cost, the
serialized load and arithmetic are. So it is not among the tuner's
candidates (``candidate_configs``) and the dispatcher never picks it;
``one_pass_configs`` gives the tilings that were timed.

Per-row scales of the last axis (per token, ``axis=-1``: int8 and fp8; ids
``<format>_tok``) run in their own kernel (``_build_rows``): a CTA holds a
few whole rows a step, reduces each row's amax across the warpgroup and
derives the scale as the block path does, so the codes take one read of
``x`` where XLA's path reads it twice.

``dispatch(x, spec, ...)`` is what ``lowbit_jax.quantize`` and ``fake_quant``
ask on every call: a kernel runs only on a GPU backend, for a format
``ENABLED`` lists for that operation (quantize, fake_quant, fake_quant under
differentiation: the formats a measured run found faster than XLA's path for
it; see ``experiments/bench_gpu_quantize.py``), for the default keywords only (no
static ranges, learned scales, clipping, stochastic rounding, padding), where
the shape fits the tiling. ``ENABLED`` and the tilings are the shipped
table's, measured on the H200; on a GPU with a table of its own
(``gpu_quantize_configs.<device>.json`` beside it) that table over the
shipped one is read instead (``table_for_device``). The jnp path stays the reference, and is what runs
on CPU and TPU. Under ``vmap`` the jnp path runs (the kernel has no batching
rule). Inside ``shard_map`` the kernel sees the local shard. Under ``jit``
with sharded operands (not tried): the kernel is a custom call without a
partitioning rule, which XLA's SPMD partitioner can only run on a replicated
operand, so quantize inside ``shard_map`` there. ``quantize(...,
interpret=True)`` runs the kernel in Pallas' Mosaic GPU interpreter on the
CPU (tests/kernels/test_gpu_quantize.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax import lax

from lowbit_jax.core import _cast
from lowbit_jax.core import _quantize as _q
from lowbit_jax.core._qarray import QArray, default_pack_axis, normalize_axis, pack_unit
from lowbit_jax.core._spec import QuantSpec, as_spec
from lowbit_jax.formats import BlockFormat, FloatFormat, IntFormat, LookupFormat
from lowbit_jax.kernels import _gpu_common as common

_F32_MAX = np.float32(np.finfo(np.float32).max)
_E4M3_MAX = 448.0
_GROUPS = (16, 32, 64, 128)
_INT_FORMATS = ("int4", "int8", "int3", "int2")
MAX_SMEM_BYTES = 227 * 1024  # what one Hopper CTA may use


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of the quantizer.

  Attributes:
    tile_n: columns per tile (128 or 256: a TMA box is at most 256 wide, and
      a row must split evenly over the warpgroup's 128 threads).
    tile_k: rows per pipeline step (a multiple of the block size).
    k_per_cta: rows each CTA walks (a multiple of ``tile_k``); the grid is
      ``(N / tile_n, K / k_per_cta)``.
    stages: input tiles in flight (TMA loads ahead of the compute).
    unroll: unroll the row loops in Python (the GPU build; the interpreter
      compiles faster with loops).
    reverse: walk the grid in reverse order (last rows first). For the
      per-channel and per-tensor formats, whose scale XLA reduces first in
      its own pass over ``x``: the kernel's first reads may then hit the L2
      lines that reduction read last.
    rows: rows loaded from shared memory before any is computed on (a
      chunk; 0: as many as give each thread 16 elements, i.e. 8 rows of 256
      columns or 16 of 128), cut to a divisor of the block and a multiple of
      the packing unit. The kernel writes each chunk's results to shared
      memory, and the compiler cannot move a later row's load above an
      earlier row's store (it cannot prove the buffers apart), so one row
      per chunk runs every row's load, arithmetic and store back to back:
      Nsight Compute on the H200 (experiments/ncu_probe.py; int8 per channel
      quantize of bf16 8192x8192 and int4 g128 fake_quant, one row per
      chunk) read 16-18 registers per thread, 19-25 instructions per
      element and issue slots 34-55% busy.
    lut: NF4's codes by a binned table in shared memory (``_lut_codes``:
      the bin of ``y`` gives the code below it and the one threshold inside
      it) instead of the binary search, and (fake_quant, session 40) each
      value by the codebook's entry at that code, one more shared-memory
      load, where the values otherwise take one comparison and one select
      per threshold. On an H100 (bf16 8192x8192, bit-exact on the device,
      ``benchmarks/kernels_h100_runs/gpu_quantize_h100_s40nf4.md``) NF4
      fake_quant went from 167.6-187.6 us to 112.8-128.4 (49-55% -> 72-82%
      of the roofline), quantize from 97.8-133.4 to 74.9-86.1.
    one_pass: per-channel scales of axis 0 (``<format>_pc`` of the int,
      FP8, FP6 and FP4 formats) in one pass over ``x`` (see
      ``one_pass_kinds``): this many CTAs (``ONE_PASS_CTAS``: 1, 2, 4, 8 or
      Hopper's non-portable 16; more than one run as a thread-block cluster) split each column strip's ``K`` rows
      (``k_per_cta`` must be ``K / one_pass``), each reduces its rows'
      column amax, the cluster's CTAs exchange those through distributed
      shared memory, and each derives the scale (``_block_scale``, as for
      a block of the whole axis) and quantizes its rows. Of a CTA's rows
      the last ``stages`` tiles stay in shared memory from the amax pass
      and the others are read again (from the L2, which holds what the
      cluster just read). 0: the two-pass path (XLA reduces the scale).
      Bit-exact, but slower than the two-pass kernel on an H100 (the
      module docstring has the numbers): not among the tuner's candidates.
    warpgroups: with ``one_pass``, warpgroups a CTA (1, 2 or 4), each
      taking its share of every tile's rows: a CTA holding most of the
      shared memory is alone on its SM, and one warpgroup there leaves the
      SM too few warps to hide the arithmetic's latency (H100, int8 per
      channel 8192x8192 quantize: one warpgroup 229 us against 126 for the
      two-pass path, ``benchmarks/kernels_h100_runs/gpu_quantize_h100_s34c.md``).
    strips: with ``one_pass``, column strips (of ``tile_n``) each CTA, or
      cluster, walks in turn, the next strip's loads issued under this
      strip's quantize (a CTA alone on its SM otherwise leaves its memory
      pipe idle while it quantizes, and its arithmetic while it loads).
    amax_kernel: the symmetric per-channel and per-tensor formats, and
      NVFP4's tensor range where no static ``tensor_amax`` is given
      (``amax_kernel_kinds``): the range pass is this module's own kernel
      (``_build_amax``: each CTA the column amax of its ``k_per_cta`` rows
      of ``tile_n`` columns, the same tiles as the quantize kernel's,
      float32 partials that XLA maxes and hands to core's ``_grid`` as
      ``block_amax``, so the scale is still the reference's bit for bit)
      instead of XLA's reduction, and it walks the grid in the order
      opposite to the quantize kernel's (``reverse``): the tiles it reads
      last, those the L2 still holds, are the ones the quantize kernel
      reads first. On the H200 XLA's reduction of a bf16 8192x8192 took
      46.5-49.2 us (2.7 TB/s) and two small kernels after it 3.6
      (``benchmarks/primitives_h200_s31.json``'s ``top_kernels``), against
      40.6 us for the same bytes at the ``x * 2`` rate. On an H100 (session
      40, ``benchmarks/kernels_h100_runs/gpu_quantize_h100_s40amax.md``,
      nine formats, bit-exact on the device) it gained 0-1% (int8 per
      channel quantize 124.4 -> 123.8 us), with the quantize grid reversed
      or not: XLA's reduction there runs as fast as this kernel, and the L2
      served no measurable part of the second read. It is a tuning
      candidate (``candidate_configs``) for the H200 to decide. For NVFP4
      (session 41) the kernel takes the amax of the finite values (NaN and
      inf count as 0, as core's tensor range does, two more operations an
      element) and XLA maxes its partials to the one tensor amax: XLA's
      full reduction of that range was 155 MB of traffic for a bf16
      8192x8192 in its deviceless compile for the H200
      (``experiments/gpu_fusion_survey.py --formats=nvfp4``), where 134 MB
      is the tensor itself. On an H100 it lost (quantize 128.2 us against
      124.2 through XLA's reduction, fake_quant 164.0 against 156.1,
      ``benchmarks/kernels_h100_runs/gpu_quantize_h100_s41nvfp4.md``).
  """
  tile_n: int = 256
  tile_k: int = 64
  k_per_cta: int = 512
  stages: int = 2
  unroll: bool = True
  reverse: bool = False
  rows: int = 0
  lut: bool = False
  one_pass: int = 0
  warpgroups: int = 1
  strips: int = 1
  amax_kernel: bool = False


# A portable cluster holds at most 8 CTAs; Hopper takes 16 by opting in (a
# non-portable size: whether a launch gets it is the driver's to say, and a
# cluster of 16 CTAs alone on their SMs needs a GPC with 16 of them free).
ONE_PASS_CTAS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class _Kind:
  """What the kernel computes for one format (static)."""
  kind: str        # the id, e.g. "mxfp8_e4m3", "int4_g128", "int8_pc"
  scale: str       # "e8m0" | "float32" | "nvfp4" | "given" (per channel or
                   # per tensor: XLA computes it before the kernel)
  elem: str        # "fp8" | "fp4" | "fp6" | "int" | "uint" (asymmetric, with
                   # a zero point) | "lookup" (NF4's codebook)
  block: int       # rows per scale block (0: all of them)
  fmt: object      # the element Format
  bits: int        # stored bits per code (8, 6 or 4)
  rounding: str    # E8M0 scale rounding


def kind_of(spec: QuantSpec, ndim: int = 2) -> Optional[str]:
  """The kernel's id for a spec with blocks along axis 0, or None.

  Args:
    spec: a QuantSpec.
    ndim: the rank of the array it quantizes.

  Returns:
    "mxfp8_e4m3", "mxfp4", "mxfp6_e2m3", "mxint8", "nvfp4",
    "<int4|int8|fp4_e2m1|nf4>_g<16|32|64|128>", "<format>_pc" (per-channel
    scales of axis 0), "<format>_pt" (per tensor) or "<format>_tok" (per-row
    scales of the last axis; see ``supported_kinds``); None for anything else
    (other axes, other asymmetric specs, tiles).
  """
  k = _kind(spec, ndim)
  return None if k is None else k.kind


_GIVEN_INTS = ("int8", "int4", "int3", "int2")
_GIVEN_FP8 = ("fp8_e4m3", "fp8_e5m2")
# Per channel only (their codes are packed along axis 0): the block path's
# grid rounding (FP6's on the bits, FP4's codes from the float32 bits).
_GIVEN_NARROW = ("fp6_e2m3", "fp6_e3m2", "fp4_e2m1")


def _never_clips(kd: _Kind) -> bool:
  """Whether the straight-through gradient needs no clip mask (core's
  ``_never_clips`` for the default keywords): symmetric per-channel and
  per-tensor scales hold their whole range."""
  return (kd.scale == "row" or kd.scale == "given"
          and kd.elem not in ("uint", "ternary", "binary"))


def _given_kind(spec: QuantSpec, ax) -> Optional[_Kind]:
  """Per-channel (one scale per column of axis 0's whole length) and
  per-tensor float32 scales: ``<format>_pc`` / ``<format>_pt``."""
  fmt = spec.format
  if spec.scale_dtype != "float32" or spec.group_size is not None:
    return None
  if not spec.symmetric:  # uint8 with a zero point
    if fmt.name != "uint8" or spec.storage_format.name != "uint8":
      return None
    fmt = spec.storage_format
    elem = "uint"
  elif isinstance(fmt, IntFormat) and fmt.name in _GIVEN_INTS:
    elem = "int"
  elif isinstance(fmt, FloatFormat) and fmt.name in _GIVEN_FP8:
    elem = "fp8"
  elif isinstance(fmt, FloatFormat) and fmt.name in _GIVEN_NARROW and ax == 0:
    elem = "fp6" if fmt.bits == 6 else "fp4"
  elif (isinstance(fmt, LookupFormat) and fmt.scale_method == "twn"
        and fmt.table == (-1.0, 0.0, 1.0) and ax == 0):
    # TWN (ternary): XLA reduces the scale and the threshold 0.7 * mean |x|
    # (core's own code); the kernel compares |x| with the threshold.
    elem = "ternary"
  elif (isinstance(fmt, LookupFormat) and fmt.scale_method == "mean_abs"
        and fmt.table == (-1.0, 1.0) and ax == 0):
    # BWN (binary): XLA reduces mean |x|; nearest of -1, 1 by the rounding
    # threshold (_cast._nearest_thresholds: 2**-25 and an ulp, a normal
    # float32), an all-zero channel (scale 0) reads as +-0.
    elem = "binary"
  else:
    return None
  if ax == 0:
    return _Kind(f"{fmt.name}_pc", "given", elem, 0, fmt, fmt.bits, "floor")
  if ax is None and fmt.bits == 8:  # (packed codes run along the last axis)
    return _Kind(f"{fmt.name}_pt", "given", elem, 0, fmt, fmt.bits, "floor")
  return None


_ROW_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2")


def _row_kind(spec: QuantSpec) -> Optional[_Kind]:
  """Per-row scales of the last axis (per token: ``axis=-1``), 8-bit:
  ``<format>_tok``. The kernel reduces each row's amax itself (a row is at
  most a few tiles), so the codes take one read of ``x``."""
  fmt = spec.format
  if (spec.group_size is not None or not spec.symmetric
      or spec.scale_dtype != "float32" or fmt.name not in _ROW_FORMATS):
    return None
  elem = "int" if isinstance(fmt, IntFormat) else "fp8"
  return _Kind(f"{fmt.name}_tok", "row", elem, 0, fmt, 8, "floor")


def _kind(spec: QuantSpec, ndim: int) -> Optional[_Kind]:
  if spec.tile is not None or ndim < 2:
    return None
  try:
    ax = normalize_axis(spec.axis, ndim)
  except ValueError:
    return None
  if ax == ndim - 1:
    return _row_kind(spec)
  if spec.group_size is None and (ax == 0 or ax is None):
    return _given_kind(spec, ax)
  if not spec.symmetric or ax != 0 or spec.group_size not in _GROUPS:
    return None
  fmt = spec.format
  g = spec.group_size
  if isinstance(fmt, BlockFormat):
    el = fmt.element
    name = fmt.name
    if fmt.tensor_scale:
      if (name == "nvfp4" and spec.scale_dtype == "fp8_e4m3" and g == 16
          and el.name == "fp4_e2m1"):
        return _Kind("nvfp4", "nvfp4", "fp4", g, el, 4, "floor")
      return None
    if spec.scale_dtype != "e8m0" or g != 32:
      return None
    elem = {"fp8_e4m3": "fp8", "fp4_e2m1": "fp4", "fp6_e2m3": "fp6",
            "int8_fixed6": "int"}.get(el.name)
    if elem is None or name not in ("mxfp8_e4m3", "mxfp4", "mxfp6_e2m3", "mxint8"):
      return None
    return _Kind(name, "e8m0", elem, g, el, el.bits, spec.scale_rounding)
  if spec.scale_dtype != "float32":
    return None
  if isinstance(fmt, IntFormat) and fmt.name in _INT_FORMATS:
    return _Kind(f"{fmt.name}_g{g}", "float32", "int", g, fmt, fmt.bits, "floor")
  if isinstance(fmt, FloatFormat) and fmt.name == "fp4_e2m1":
    return _Kind(f"fp4_e2m1_g{g}", "float32", "fp4", g, fmt, 4, "floor")
  if (isinstance(fmt, LookupFormat) and fmt.name == "nf4"
      and fmt.scale_method == "absmax"):
    return _Kind(f"nf4_g{g}", "float32", "lookup", g, fmt, 4, "floor")
  return None


def supported_kinds() -> tuple:
  """Every id ``kind_of`` can return (what the kernel computes exactly)."""
  out = ["mxfp8_e4m3", "mxfp4", "nvfp4"]
  out += [f"fp4_e2m1_g{g}" for g in _GROUPS]
  out += [f"{f}_g{g}" for f in _INT_FORMATS for g in _GROUPS]
  out += [f"nf4_g{g}" for g in _GROUPS]
  out += [f"{f}_pc" for f in _GIVEN_INTS + _GIVEN_FP8 + _GIVEN_NARROW
          + ("uint8", "ternary", "binary")]
  out += [f"{f}_pt" for f in ("int8",) + _GIVEN_FP8 + ("uint8",)]
  out += [f"{f}_tok" for f in _ROW_FORMATS]
  return tuple(out + ["mxint8", "mxfp6_e2m3"])


def one_pass_kinds() -> tuple:
  """The per-channel ids ``Config.one_pass`` computes: symmetric scales from
  the column amax alone (uint8's zero point needs the minimum too, TWN's
  and BWN's scales are means, whose float32 sum order is XLA's)."""
  return tuple(f"{f}_pc" for f in _GIVEN_INTS + _GIVEN_FP8 + _GIVEN_NARROW)


def amax_kernel_kinds() -> tuple:
  """The kinds ``Config.amax_kernel`` applies to: scales given for the whole
  axis (per channel) or tensor whose range is the absmax (the symmetric
  int, FP8, FP6 and FP4 formats; not uint8's min and max, nor ternary's and
  binary's means), and NVFP4, whose tensor scale comes from the amax of the
  finite values (session 41)."""
  return tuple(k for k in supported_kinds()
               if ((k.endswith("_pc") or k.endswith("_pt"))
                   and _kind_by_id(k).elem not in ("uint", "ternary", "binary"))
               or _kind_by_id(k).scale == "nvfp4")


def spec_for(kind: str) -> QuantSpec:
  """The QuantSpec (blocks along axis 0) whose ``kind_of`` is ``kind``.

  Raises:
    ValueError: ``kind`` is not one of ``supported_kinds()``.
  """
  if kind not in supported_kinds():
    raise ValueError(f"unknown kernel format {kind!r}; one of {supported_kinds()}")
  if kind.endswith("_pc"):
    return QuantSpec(kind[:-3], axis=0)
  if kind.endswith("_pt"):
    return QuantSpec(kind[:-3])
  if kind.endswith("_tok"):
    return QuantSpec(kind[:-4], axis=-1)
  if "_g" in kind:
    fmt, g = kind.rsplit("_g", 1)
    return QuantSpec(fmt, axis=0, group_size=int(g))
  return QuantSpec(kind, axis=0)


@functools.lru_cache(maxsize=None)
def _kind_by_id(kind: str) -> _Kind:
  return _kind(spec_for(kind), 2)


# ---------------------------------------------------------------------------
# Tiling


TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "gpu_quantize_configs.json")


# The device the shipped table (``TABLE_PATH``) was measured on.
DEFAULT_TABLE_DEVICE = "NVIDIA H200"


@functools.lru_cache(maxsize=None)
def _table() -> dict:
  """The measured tilings (``gpu_quantize_configs.json`` beside this file,
  written by ``experiments/bench_gpu_quantize.py --write_configs``); empty
  where there is none."""
  if not os.path.exists(TABLE_PATH):
    return {}
  with open(TABLE_PATH) as f:
    return json.load(f)


def table_filename(device_kind: str) -> str:
  """The file name a tiling table measured on ``device_kind`` is kept under
  (beside ``TABLE_PATH``): the shipped one for ``DEFAULT_TABLE_DEVICE``, else
  ``gpu_quantize_configs.<device>.json``."""
  if device_kind == DEFAULT_TABLE_DEVICE:
    return os.path.basename(TABLE_PATH)
  return f"gpu_quantize_configs.{common.device_slug(device_kind)}.json"


def timed_of(table: dict) -> dict:
  """``{op: frozenset of formats}`` a table's runs timed (XLA and kernel) for
  each operation: its ``"timed"`` entry, or for a table without one the
  formats it has an entry or an enabled state for."""
  t = table.get("timed")
  if t is not None:
    return {op: frozenset(t.get(op, ())) for op in OPS}
  ents = table.get("entries", {})
  en = enabled_of(table)
  return {op: frozenset({k for k, ops in ents.items() if op in ops} | en[op])
          for op in OPS}


def merge_by_operation(base: dict, own: dict, timed: dict,
                       base_tag: dict, own_tag: dict) -> tuple:
  """``(entries, enabled)`` of ``own`` over ``base``, per operation: the
  formats in ``timed[op]`` take ``own``'s tiling and enabled state for it,
  the others keep ``base``'s. Each entry taken from ``base`` gets the keys of
  ``base_tag`` it lacks, each taken from ``own`` those of ``own_tag`` (over
  its own). ``overlay_tables`` (a device's table over the shipped one) and
  ``experiments/_quantize_table.merge_tables`` (a run over earlier ones)."""
  entries = {}
  for kind, ops in base.get("entries", {}).items():
    for op, e in ops.items():
      if kind not in timed.get(op, ()):
        entries.setdefault(kind, {})[op] = {**base_tag, **e}
  for kind, ops in own.get("entries", {}).items():
    for op, e in ops.items():
      if kind in timed.get(op, ()):
        entries.setdefault(kind, {})[op] = {**e, **own_tag}
  was, now = enabled_of(base, "the earlier table"), enabled_of(own, "the newer table")
  enabled = {op: sorted({k for k in was[op] if k not in timed.get(op, ())}
                        | {k for k in now[op] if k in timed.get(op, ())})
             for op in OPS}
  return entries, enabled


def overlay_tables(own: dict, base: dict) -> dict:
  """``own`` (a device's table) over ``base`` (the shipped one), per
  operation: the formats ``own``'s runs timed take ``own``'s tiling and
  enabled state, the others ``base``'s (their entries tagged
  ``"table_device"``, so a decision traces to where it was measured)."""
  where = base.get("device", DEFAULT_TABLE_DEVICE)
  entries, enabled = merge_by_operation(base, own, timed_of(own),
                                        {"table_device": where}, {})
  return dict(own, entries=entries, enabled=enabled, fallback_device=where)


def table_for_device(device_kind: Optional[str],
                     table_dir: Optional[str] = None) -> dict:
  """The table the dispatcher uses on ``device_kind`` (None: not a GPU): the
  shipped one, overlaid by the device's own file where there is one
  (``table_filename``, ``overlay_tables``).

  Raises:
    ValueError: if the device's file says it was measured on another device.
  """
  d = table_dir or os.path.dirname(TABLE_PATH)
  default = os.path.join(d, os.path.basename(TABLE_PATH))
  base = _table() if table_dir is None else {}
  if table_dir is not None and os.path.exists(default):
    with open(default) as f:
      base = json.load(f)
  if device_kind is None or device_kind == DEFAULT_TABLE_DEVICE:
    return base
  own_path = os.path.join(d, table_filename(device_kind))
  if not os.path.exists(own_path):
    return base
  with open(own_path) as f:
    own = json.load(f)
  if own.get("device") != device_kind:
    raise ValueError(
        f"{own_path} is the quantizer's tiling table for {device_kind!r} by its "
        f"name but says it was measured on {own.get('device')!r}; regenerate it "
        "on that device (experiments/bench_gpu_quantize.py --write_configs, or "
        "--from_results over that device's runs)")
  return overlay_tables(own, base)


@functools.lru_cache(maxsize=None)
def _device_table(device_kind: Optional[str]) -> Optional[dict]:
  """``table_for_device``, read once a device kind, where the device has a
  file of its own; else None (the shipped table and ``ENABLED`` apply)."""
  t = table_for_device(device_kind)
  return None if t is _table() else t


_current_device_kind = common.current_gpu_kind


def _active_table() -> dict:
  """The table the dispatcher reads on the default device."""
  t = _device_table(_current_device_kind())
  return _table() if t is None else t


def _fits(kind: str, k: int, n: int, x_dtype, cfg: Config, values: bool) -> bool:
  """Whether ``cfg`` tiles ``[k, n]`` within the kernel's limits."""
  kd = _kind_by_id(kind)
  try:
    _check_config(kd, k, n, x_dtype, cfg, not values, values,
                  values and not _never_clips(kd))
  except ValueError:
    return False
  return True


def default_config(kind: str, k: int, n: int, x_dtype,
                   values: bool = False) -> Optional[Config]:
  """The tiling for ``[k, n]`` (None where none fits).

  The measured one where ``gpu_quantize_configs.json`` (see ``_table``) has an
  entry for the format and operation that fits this shape, otherwise
  ``heuristic_config``.

  Args:
    kind: an id of ``supported_kinds()``.
    k, n: the array's rows and (flattened) columns.
    x_dtype: bfloat16 or float32.
    values: the fake_quant forward (values out) instead of quantize (codes
      and scales out).
  """
  forced_cfg = _forced.config(kind)
  if forced_cfg is not None and _fits(kind, k, n, x_dtype, forced_cfg, values):
    return forced_cfg
  ent = _active_table().get("entries", {}).get(kind, {}).get(
      "fake_quant" if values else "quantize")
  if ent:
    cfg = common.config_from_entry(Config, ent)
    if _fits(kind, k, n, x_dtype, cfg, values):
      return cfg
  return heuristic_config(kind, k, n, x_dtype, values)


def heuristic_config(kind: str, k: int, n: int, x_dtype,
                     values: bool = False) -> Optional[Config]:
  """A tiling for ``[k, n]`` from the kernel's limits alone (None where none
  fits).

  One block per step (at least 32 rows), so that a CTA's shared memory stays
  small and several CTAs share an SM (one warpgroup each): one stage for the
  block formats, two for a scale given for the whole axis (per channel, per
  tensor); 256 columns (128 for blocks of 128, whose tiles are four times
  taller), or 128 where 256 would not fit; the rows in a loop, not unrolled.
  Rows per CTA: as many steps as keep the grid at 4 CTAs per SM or more on
  132 SMs. Measured on the H200 (bf16 8192x8192): one stage beat two for
  every block format swept (benchmarks/gpu_quantize_h200_s24c.md: int4 g128
  quantize 120.1 -> 81.8 us and fake_quant 337.4 -> 147.0, fp4 g64
  fake_quant 443.0 -> 185.5, MXFP8 quantize 62.0 -> 59.0) but lost for per
  channel (int4 fake_quant 129.2 with two stages in
  benchmarks/gpu_quantize_h200_s24b.md, 137.5 with one in ..._s24d.md; int8
  132.8 against 137.2); rows in a loop compile in 1-4 s where unrolled ones
  took 35-280 s (benchmarks/gpu_quantize_h200_s23.json's ``compile_s``), and
  ran as fast or faster except MXFP8 (unrolled 57.5 / 80.0 us against 59.0
  / 93.4).

  Args:
    As ``default_config``.
  """
  if kind.endswith("_tok"):
    return _row_heuristic(kind, k, n, x_dtype, values)
  block = _block_of(kind)
  tk = max(block, 32)
  if k % tk:
    return None
  wide = (256, 128) if block <= 64 else (128,)
  for tn in wide:
    if n % tn:
      continue
    cfg = Config(tile_n=tn, tile_k=tk, k_per_cta=tk, stages=1 if block else 2,
                 unroll=False)
    if _fits(kind, k, n, x_dtype, dataclasses.replace(cfg, k_per_cta=k), values):
      break
  else:
    return None
  n_tiles, steps = n // tn, k // tk
  return dataclasses.replace(cfg, k_per_cta=tk * _steps_per_cta(steps, n_tiles))


def _steps_per_cta(steps: int, n_tiles: int) -> int:
  """The largest divisor of the step count that leaves at least 4 * 132 CTAs
  (4 per SM of an H100/H200) over ``n_tiles`` column tiles; at least 1."""
  per = 1
  for d in range(1, steps + 1):
    if steps % d == 0 and n_tiles * (steps // d) >= 4 * 132:
      per = d
  return per


# The three operations the dispatcher decides separately, because a kernel
# can win one and lose another (H200, benchmarks/gpu_quantize_h200_s24.md:
# MXFP4's fake_quant 191.0 -> 172.1 us with the kernel, but its forward under
# differentiation, which also writes the clip mask the straight-through
# gradient reads, makes fwd+bwd 214.7 -> 315.9 us): ``quantize`` (codes and
# scales out), ``fake_quant`` (the value, not differentiated) and
# ``fake_quant_grad`` (fake_quant's forward under ``jax.grad``/``vjp``).
OPS = ("quantize", "fake_quant", "fake_quant_grad")


def enabled_of(table: dict, where: str = TABLE_PATH) -> dict:
  """``{op: frozenset of formats}`` from a tiling table's "enabled" entry
  (the shipped one, or one ``experiments/bench_gpu_quantize.py`` merges).

  A list (tables written before the operations were decided separately)
  enables its formats for ``quantize`` and ``fake_quant``, the two it was
  measured for; ``fake_quant_grad`` then stays on XLA's path. No table: no
  format.

  Raises:
    ValueError: "enabled" names an operation not in ``OPS`` (``where`` names
      the table in the message).
  """
  e = table.get("enabled", {})
  if isinstance(e, (list, tuple)):
    e = {"quantize": e, "fake_quant": e}
  unknown = set(e) - set(OPS)
  if unknown:
    raise ValueError(f"{where}: 'enabled' names unknown operations "
                     f"{sorted(unknown)}; expected some of {OPS}")
  return {op: frozenset(e.get(op, ())) for op in OPS}


# What the dispatcher sends to the kernel, per operation: the formats a GPU
# run of experiments/bench_gpu_quantize.py (--write_configs) measured
# bit-exact and at least 2% faster than XLA's path for that operation
# (``gpu_quantize_configs.json``; BUILD.md has the runs and their figures).
ENABLED: dict = enabled_of(_table())


def candidate_configs(kind: str, k: int, n: int, x_dtype, values: bool = False,
                      limit: int = 4) -> list:
  """Tilings worth timing for ``[k, n]`` (at most ``limit``, the heuristic's
  first): the heuristic, the table's entry, then (``amax_kernel_kinds``: the
  symmetric per-channel and per-tensor formats, and NVFP4) ``amax_kernel``
  with the quantize grid reversed and not, then (per-channel and per-tensor
  formats, and NVFP4, whose tensor amax XLA reduces first) the grid reversed, (blocks of 128) 256 columns, then the other
  of one and two stages, three stages, the other ``tile_n``, twice the rows per CTA, and the rows
  unrolled; only those within the kernel's shared-memory and shape
  limits (per-row kinds: twice the rows a step, the other of one and two
  stages, half the rows a step, twice the rows a CTA)."""
  base = heuristic_config(kind, k, n, x_dtype, values)
  if base is None:
    return []
  out = [base]
  tab = default_config(kind, k, n, x_dtype, values)
  rep = dataclasses.replace
  if kind.endswith("_tok"):  # rows a step, stages, rows a CTA
    more = [rep(base, tile_k=2 * base.tile_k, k_per_cta=2 * base.k_per_cta),
            rep(base, stages=3 - base.stages),
            rep(base, tile_k=max(4, base.tile_k // 2)),
            rep(base, k_per_cta=2 * base.k_per_cta)]
  else:
    more = [rep(base, stages=3 - base.stages), rep(base, stages=3),
            rep(base, tile_n=384 - base.tile_n),
            rep(base, k_per_cta=2 * base.k_per_cta), rep(base, unroll=True)]
    if _block_of(kind) == 0 or kind == "nvfp4":
      # A scale (NVFP4: the tensor amax) reduced by XLA first: its L2 lines.
      more = [rep(base, reverse=True)] + more
    elif _block_of(kind) >= 128:
      more = [rep(base, tile_n=256)] + more  # two columns per thread
    if kind in amax_kernel_kinds():
      # The range from our own kernel, whose last tiles the quantize reads
      # first (session 40).
      more = [rep(base, amax_kernel=True, reverse=True),
              rep(base, amax_kernel=True)] + more
    if kind.startswith("nf4"):  # the binned table's encode (and values)
      more = [rep(base, lut=True)] + more
  for c in [tab] + more:
    if len(out) >= limit:
      break
    if c is not None and c not in out and _fits(kind, k, n, x_dtype, c, values):
      out.append(c)
  return out


def one_pass_configs(kind: str, k: int, n: int, x_dtype,
                     values: bool = False) -> list:
  """``Config.one_pass`` tilings for ``[k, n]``: 128 columns and 64 rows a
  step, four warpgroups a CTA, a cluster of 8 CTAs with as many resident
  tiles as fit (one CTA an SM) and with 6 (two CTAs an SM), then a cluster
  of 16 (Hopper's non-portable size) with as many as fit: for K = 8192 all
  of a CTA's 512 rows, so that nothing is read twice; only those within the
  limits. (Measured on an H100, int8 / fp8 / int4 per channel 8192x8192
  quantize, ``benchmarks/kernels_h100_runs/gpu_quantize_h100_s34d.md``:
  clusters of 4 CTAs and two warpgroups a CTA were slower still.)"""
  out = []
  for ctas, st in ((8, None), (8, 6), (16, None)):
    if k % (ctas * 64):
      continue
    steps = k // ctas // 64
    cfg = Config(tile_n=128, tile_k=64, k_per_cta=k // ctas, stages=1,
                 unroll=True, one_pass=ctas, warpgroups=4)
    if st is None:  # the most tiles that fit, at most the CTA's steps
      st = 1
      while st < steps and _fits(kind, k, n, x_dtype,
                                 dataclasses.replace(cfg, stages=st + 1), values):
        st += 1
    cfg = dataclasses.replace(cfg, stages=min(st, steps))
    if _fits(kind, k, n, x_dtype, cfg, values) and cfg not in out:
      out.append(cfg)
  return out


def _bits_of(kind: str) -> int:
  if kind in ("mxfp4", "nvfp4") or kind.startswith(("fp4_", "int4_", "nf4_")):
    return 4
  if kind.startswith(("int3_", "int2_")):
    return int(kind[3])
  if kind.startswith("ternary"):
    return 2
  if kind.startswith("binary"):
    return 1
  return 6 if kind.startswith(("mxfp6_", "fp6_")) else 8


def _block_of(kind: str) -> int:
  """Rows per scale block (0: a scale given for the whole axis, or per row
  of the last axis)."""
  if kind.endswith(("_pc", "_pt", "_tok")):
    return 0
  if kind == "nvfp4":
    return 16
  if kind.startswith("mx"):
    return 32
  return int(kind.rsplit("_g", 1)[1])


def _units(bits: int) -> tuple:
  """(rows in, rows out) of one packing unit along axis 0 (``QArray``'s)."""
  return pack_unit(bits) if bits != 8 else (1, 1)


def _smem(block: int, bits: int, f32_scale: bool, x_dtype, cfg: Config,
          codes: bool, values: bool, mask: bool = False) -> int:
  """Shared memory one CTA uses."""
  xb = jnp.dtype(x_dtype).itemsize
  per = cfg.tile_k * cfg.tile_n * xb
  if codes:
    ui, uo = _units(bits)
    per += cfg.tile_k * uo // ui * cfg.tile_n
    if block:
      per += cfg.tile_k // block * cfg.tile_n * (4 if f32_scale else 1)
  if values:
    per += cfg.tile_k * cfg.tile_n * xb
  if mask:
    per += cfg.tile_k * cfg.tile_n
  given = 0 if block else cfg.tile_n * 4  # the scale row, read once
  if cfg.one_pass:
    # x: ``stages`` tiles; outputs: two; the amax, warpgroup and scale rows;
    # the barriers (8 bytes each: Mosaic GPU counted 232648 bytes for 12
    # stages of int8 fake_quant with two warpgroups, 200 past the estimate
    # without them)
    xt = cfg.tile_k * cfg.tile_n * xb
    return (cfg.stages * xt + 2 * (per - xt)
            + (2 + cfg.warpgroups) * cfg.tile_n * 4 + 8 * (2 * cfg.stages + 2)
            + 1024)
  return cfg.stages * per + given + 1024


def _row_smem(n: int, x_dtype, cfg: Config, codes: bool, values: bool) -> int:
  xb = jnp.dtype(x_dtype).itemsize
  per = cfg.tile_k * n * (xb + (1 if codes else 0) + (xb if values else 0))
  return cfg.stages * (per + cfg.tile_k * 4) + 1024


def _check_row_config(kd: _Kind, k: int, n: int, x_dtype, cfg: Config,
                      codes: bool, values: bool, mask: bool) -> None:
  """Per-row kinds: ``tile_k`` rows a step (each row whole, in chunks of
  ``_ROW_CHUNK`` columns), ``k_per_cta`` rows a CTA."""
  if mask:
    raise ValueError(f"{kd.kind} never clips: there is no clip mask to write")
  if n % _ROW_CHUNK:
    raise ValueError(f"rows of {n} elements: the per-row kernel needs a "
                     f"multiple of {_ROW_CHUNK}")
  if (not 4 <= cfg.tile_k <= 256 or cfg.tile_k % 4 or cfg.k_per_cta % cfg.tile_k
      or k % cfg.k_per_cta):
    raise ValueError(f"{k} rows do not fit the tiling {cfg}: rows a step "
                     "(tile_k, a multiple of 4 up to 256: the step's float32 "
                     "scales are one TMA box of at least 16 bytes) must divide "
                     "the rows a CTA (k_per_cta), which must divide the rows")
  if cfg.stages < 1:
    raise ValueError(f"stages must be at least 1, got {cfg.stages}")
  need = _row_smem(n, x_dtype, cfg, codes, values)
  if need > MAX_SMEM_BYTES:
    raise ValueError(f"the tiling {cfg} needs {need} bytes of shared memory "
                     f"for rows of {n}, more than {MAX_SMEM_BYTES}; lower "
                     "tile_k (rows a step) or stages")


_ROW_CHUNK = 256  # columns per TMA box of the per-row kernel


def _row_heuristic(kind: str, k: int, n: int, x_dtype, values: bool):
  """Per-row kinds: 4 rows a step through one stage, then as many rows a CTA
  as keep at least 4 CTAs per SM on 132 SMs.

  One stage of 4 rows leaves room for two or more CTAs an SM, whose loads
  overlap each other's arithmetic; two stages, or 8 rows a step, leave one.
  Measured on bf16 [8192, 8192]: on an H100 int8 per-token quantize took
  106.1 us through ``256:4:8:1`` against 156.4 through ``256:4:8:2``, and fp8
  e4m3 87.1 against 120.8
  (``benchmarks/kernels_h100_runs/gpu_quantize_h100_s41sweep.md``); the H200's
  table has fp8 e5m2 at 82.9 us through ``256:4:8:1``, where e4m3 took 116.8
  through ``256:4:8:2``."""
  kd = _kind_by_id(kind)
  cfg = Config(tile_n=_ROW_CHUNK, tile_k=4, k_per_cta=4, stages=1, unroll=False)
  try:
    _check_row_config(kd, k, n, x_dtype, cfg, not values, values, False)
  except ValueError:
    return None
  return dataclasses.replace(cfg, k_per_cta=4 * _steps_per_cta(k // 4, 1))


def _check_config(kd: _Kind, k: int, n: int, x_dtype, cfg: Config, codes: bool,
                  values: bool, mask: bool = False) -> None:
  if kd.scale == "row":
    _check_row_config(kd, k, n, x_dtype, cfg, codes, values, mask)
    return
  if cfg.tile_n not in (128, 256):
    raise ValueError(f"tile_n must be 128 or 256, got {cfg.tile_n}")
  if (kd.block and cfg.tile_k % kd.block) or cfg.tile_k > 256:
    raise ValueError(f"tile_k={cfg.tile_k} must be a multiple of the block "
                     f"{kd.block} and at most 256")
  if mask and _never_clips(kd):
    raise ValueError(f"{kd.kind} never clips (its scale holds the whole axis): "
                     "there is no clip mask to write")
  ui, _ = _units(kd.bits)
  if cfg.tile_k % ui:
    raise ValueError(f"tile_k={cfg.tile_k} must be a multiple of {ui}")
  if cfg.k_per_cta % cfg.tile_k or k % cfg.k_per_cta or n % cfg.tile_n:
    raise ValueError(f"[{k}, {n}] does not fit the tiling {cfg}: K must be a "
                     "multiple of k_per_cta (itself of tile_k) and N of tile_n")
  if cfg.stages < 1:
    raise ValueError(f"stages must be at least 1, got {cfg.stages}")
  if cfg.one_pass:
    if kd.kind not in one_pass_kinds():
      raise ValueError(f"one_pass computes per-channel scales of axis 0 from the "
                       f"amax ({one_pass_kinds()}), not {kd.kind}: use one_pass=0")
    if cfg.one_pass not in ONE_PASS_CTAS:
      raise ValueError(f"one_pass must be one of {ONE_PASS_CTAS} CTAs (a portable "
                       f"cluster holds at most 8, Hopper's non-portable one 16), "
                       f"got {cfg.one_pass}")
    if cfg.warpgroups not in (1, 2, 4) or cfg.tile_k % (cfg.warpgroups * ui):
      raise ValueError(f"warpgroups must be 1, 2 or 4 and divide tile_k={cfg.tile_k} "
                       f"into whole packing units of {ui} rows, got {cfg.warpgroups}")
    if cfg.tile_n != 128:
      raise ValueError(f"one_pass takes tile_n=128 (a column a thread in the "
                       f"cluster's amax exchange), got {cfg.tile_n}")
    if cfg.k_per_cta * cfg.one_pass != k:
      raise ValueError(f"one_pass={cfg.one_pass} splits K={k} over its CTAs: "
                       f"k_per_cta must be {k // cfg.one_pass}, got {cfg.k_per_cta}")
    if cfg.strips < 1 or n % (cfg.tile_n * cfg.strips):
      raise ValueError(f"strips={cfg.strips}: N={n} must be a multiple of "
                       f"tile_n * strips = {cfg.tile_n * max(cfg.strips, 1)}")
    if mask:
      raise ValueError(f"{kd.kind} never clips: there is no clip mask to write")
  if cfg.amax_kernel and (kd.kind not in amax_kernel_kinds() or cfg.one_pass):
    raise ValueError(f"amax_kernel reduces the absmax range of the symmetric "
                     f"per-channel and per-tensor formats, and NVFP4's tensor "
                     f"range ({amax_kernel_kinds()}) "
                     f"before the two-pass kernel, not {kd.kind}"
                     + (" with one_pass" if cfg.one_pass else "")
                     + ": use amax_kernel=False")
  if (cfg.warpgroups != 1 or cfg.strips != 1) and not cfg.one_pass:
    raise ValueError(f"warpgroups={cfg.warpgroups} and strips={cfg.strips} apply "
                     "to one_pass only")
  if cfg.lut and (kd.elem != "lookup" or len(kd.fmt.table) > _LUT_VALUES):
    raise ValueError(f"lut=True is NF4's codes (and values) by a binned "
                     f"table (a codebook of at most {_LUT_VALUES} values); "
                     f"{kd.kind} is computed otherwise: use lut=False")
  need = _smem(kd.block, kd.bits, kd.scale == "float32", x_dtype, cfg, codes,
               values, mask) + ((2 * 4 * _LUT_BINS + 4 * _LUT_VALUES) if cfg.lut else 0)
  if need > MAX_SMEM_BYTES:
    raise ValueError(f"the tiling {cfg} needs {need} bytes of shared memory, "
                     f"more than {MAX_SMEM_BYTES}; lower tile_k or stages")


# ---------------------------------------------------------------------------
# Row arithmetic (register vectors of tile_n columns)


def _div_full_regs(a, b, instr: str = "div.full.f32", addend=None):
  """Elementwise ``instr`` (``div.full.f32`` or ``div.rn.f32``) of two Mosaic
  GPU fragmented arrays (or of one and a Python float, held in a register),
  plus ``addend`` (a fragmented array) if given, with ``add.rn.f32`` in the
  same asm block: ptxas may not fuse the division's multiply into it (an
  ``add.f32`` it may contract, which rounds once where XLA's path rounds
  twice)."""
  _, fa, ir, _, llvm, _, _ = common._mlir()  # pylint: disable=protected-access
  f32 = ir.F32Type.get()
  i32 = ir.IntegerType.get_signless(32)
  new = np.empty_like(a.registers)
  for idx, reg in np.ndenumerate(a.registers):
    n_el = ir.VectorType(reg.type).shape[0]
    breg = None if isinstance(b, float) else b.registers[idx]
    creg = None if addend is None else addend.registers[idx]
    out = llvm.mlir_undef(reg.type)
    for j in range(n_el):
      pos = llvm.ConstantOp(i32, ir.IntegerAttr.get(i32, j)).result
      x = llvm.extractelement(reg, pos)
      if breg is None:  # the constant divisor in a register
        y = llvm.ConstantOp(f32, ir.FloatAttr.get(f32, b)).result
      else:
        y = llvm.extractelement(breg, pos)
      if creg is None:
        r = llvm.inline_asm(f32, [x, y], f"{instr} $0, $1, $2;", "=f,f,f")
      else:
        z = llvm.extractelement(creg, pos)
        r = llvm.inline_asm(
            f32, [x, y, z],
            f"{{ .reg .f32 t; {instr} t, $1, $2; add.rn.f32 $0, t, $3; }}",
            "=f,f,f,f")
      out = llvm.insertelement(out, r, pos)
    new[idx] = out
  return fa.FragmentedArray(_registers=new, _layout=a.layout, _is_signed=None)


# The division each context of the kernel emits on the GPU: "full"
# (``div.full.f32``) or "rn" (``div.rn.f32``, IEEE). ``scale``: a block's
# scale from its amax (``amax / 7``, NVFP4's two); ``data``: an element by its
# block's or channel's scale (core's ``_div_data``). The interpreter always
# divides exactly (IEEE), as the CPU reference does. Read at build time
# (``_build`` caches per tiling: ``_build.cache_clear()`` after a change).
DIVISION = {"scale": "full", "data": "full"}


def _div_full(a: jax.Array, b, interp: bool, tn: int,
              context: str = "scale", add=None) -> jax.Array:
  """``a / b`` for float32 rows, rounded as XLA's GPU division rounds.

  XLA's GPU backend emits ``div.full.f32`` for a float32 division (within 2
  ulp, not IEEE; seen in the PTX of XLA's deviceless compile of ``a / b``
  for an H200 target, jax 0.10.2); the kernel emits the same instruction
  through inline PTX, so ``amax / 7`` and ``x / scale`` are the XLA path's
  numbers. In the interpreter (CPU) it is an IEEE division behind an
  optimization barrier (XLA on CPU would turn a division by a constant into
  a multiplication by its rounded reciprocal), as the CPU reference divides.

  Args:
    a: float32 ``[tn]`` row.
    b: float32 ``[tn]`` row of the same layout, or a Python float.
    interp: interpreter (CPU) or GPU build.
    tn: the row length.
    context: "scale" or "data": which ``DIVISION`` entry picks the GPU
      instruction.
    add: a float32 ``[tn]`` row added to the quotient (rounded on its own,
      ``add.rn.f32``, as XLA's path adds), or None.

  Returns:
    The float32 ``[tn]`` quotient row.
  """
  instr = {"full": "div.full.f32", "rn": "div.rn.f32"}[DIVISION[context]]
  if interp:
    bb = jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape)
    q = lax.div(a, lax.optimization_barrier(bb))
    return q if add is None else q + add
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  lay = plgpu.Layout.WG_STRIDED((tn,), vec_size=tn // 128)
  ret = plgpu.ShapeDtypeStruct((tn,), jnp.float32, lay)
  if add is not None:
    if isinstance(b, (float, int, np.floating)):
      raise ValueError("an addend goes with a row divisor")

    @plgpu.inline_mgpu(arg_types=(lay, lay, lay), return_type=ret)
    def div_add(_, av, bv, cv):
      return _div_full_regs(av, bv, instr, cv)
    return div_add(a, b, add)
  if isinstance(b, (float, int, np.floating)):
    bf = float(b)

    @plgpu.inline_mgpu(arg_types=(lay,), return_type=ret)
    def div_c(_, av):
      return _div_full_regs(av, bf, instr)
    return div_c(a)

  @plgpu.inline_mgpu(arg_types=(lay, lay), return_type=ret)
  def div_v(_, av, bv):
    return _div_full_regs(av, bv, instr)
  return div_v(a, b)


def _rne_mantissa(v, man_bits: int):
  """Rounds finite normal float32 ``v`` to ``man_bits`` mantissa bits,
  half to even, on the bits (what ``lax.reduce_precision`` does there)."""
  u = lax.bitcast_convert_type(v, jnp.uint32)
  sh = 23 - man_bits
  lsb = (u >> np.uint32(sh)) & np.uint32(1)
  u = u + (np.uint32((1 << (sh - 1)) - 1) + lsb)
  u = u & np.uint32(~((1 << sh) - 1) & 0xFFFFFFFF)
  return lax.bitcast_convert_type(u, jnp.float32)


def _round_float_grid(y, fmt: FloatFormat):
  """``_cast._cast_float_rp`` of finite-or-NaN ``y`` without ReducePrecision:
  clamp to the format's max, round normals on the bits, subnormals on their
  fixed spacing with ``round`` (half to even)."""
  m = np.float32(fmt.max)
  c = jnp.clip(y, -m, m)
  k = fmt.bias - 1 + fmt.man_bits
  sub = jnp.round(c * np.float32(2.0 ** k)) * np.float32(2.0 ** -k)
  nrm = _rne_mantissa(c, fmt.man_bits)
  return jnp.where(jnp.abs(c) < np.float32(fmt.min_normal), sub, nrm)


@functools.lru_cache(maxsize=None)
def _float_code_consts(fmt: FloatFormat) -> tuple:
  """``_float_codes``'s constants for ``fmt``, checked once a format (the
  kernel body calls it once a row while it is traced): the sign's shift and
  bit, the mantissa rounding's shift, the bias folded into the rounding
  addition (``2**(sh-1) - 1 - ((127 - bias) << 23)`` modulo 2**32), the
  largest magnitude code, the subnormal spacing's inverse and mask."""
  e_, m_ = fmt.exp_bits, fmt.man_bits
  if fmt.special != "none" or e_ + m_ + 1 > 8:
    raise ValueError(f"_float_codes encodes narrow formats without inf/NaN "
                     f"codes (E2M1, E2M3, E3M2), not {fmt.name}")
  top = (1 << (e_ + m_)) - 1  # the largest magnitude code: the max
  if float(fmt.decode_table()[top]) != float(fmt.max):
    raise ValueError(f"_float_codes needs the max as the all-ones magnitude "
                     f"code, as E2M1/E2M3/E3M2 have it; {fmt.name} does not")
  sh = 23 - m_
  bias_off = ((1 << (sh - 1)) - 1 - ((127 - fmt.bias) << 23)) & 0xFFFFFFFF
  inv_step = np.float32(2.0 ** (fmt.bias - 1 + m_))  # a power of two: exact
  return (31 - e_ - m_, 1 << (e_ + m_), sh, bias_off, top, inv_step,
          (1 << (m_ + 1)) - 1)


def _float_codes(y, fmt: FloatFormat):
  """Codes (uint32) of finite float32 ``y`` in a float format without
  infinities or NaN (E2M1, E2M3, E3M2): ``_cast.encode_nearest`` of the
  values clamped to the format's max, from the float32 bits (about 14
  operations; E2M1's midpoint comparisons take 25, and rounding onto the grid
  and then encoding the grid value, FP6's path until session 39, about 27:
  the kernel is issue-bound on both).

  ``|y| >= min_normal``: rounding the mantissa to ``man_bits``, half to even,
  on the bits (``_rne_mantissa``'s addition) leaves the exponent and those
  bits in bits ``23 - man_bits`` and up, and the code is them less float32's
  bias over the format's (``(127 - bias) << man_bits``), folded into the same
  addition (exact modulo 2**32: the sum is at least that much for a normal,
  and below 2**32 for any ``|y|``, infinity included); a carry into the
  exponent is the next binade's code. Clamping to the max is an integer
  ``min`` with the largest magnitude code (these formats' max is the
  all-ones magnitude, and anything above it rounds to it or beyond), one
  operation where clipping ``y`` to ``+-max`` first took two. Below it: the code
  is ``|y|`` over the subnormal spacing ``2**(1 - bias - man_bits)`` rounded
  half to even, by adding 2**23 (whose float32 spacing is 1) and keeping the
  low bits; a rounding up to ``2**man_bits`` is the smallest normal's code.
  The sign is float32's, moved above the magnitude (so -0.0 and values
  rounding to zero from below keep it, as the reference's encoding does).

  A NaN ``y`` only occurs in a block whose scale is NaN (the block's amax
  marks it bad), which dequantizes to NaN whatever its codes: its codes are
  left to the arithmetic (``encode_nearest`` would give +NaN -> -0, -NaN ->
  +0; ``test_float_codes_and_grid_values_equal_the_reference_encoding``
  compares finite ``y`` and infinities).
  """
  sign_sh, sign_bit, sh, bias_off, top, inv_step, sub_mask = _float_code_consts(fmt)
  u = lax.bitcast_convert_type(y, jnp.uint32)
  sign = (u >> np.uint32(sign_sh)) & np.uint32(sign_bit)
  au = u & np.uint32(0x7FFFFFFF)
  af = lax.bitcast_convert_type(au, jnp.float32)
  lsb = (au >> np.uint32(sh)) & np.uint32(1)
  code_n = jnp.minimum((au + (lsb + np.uint32(bias_off))) >> np.uint32(sh),
                       np.uint32(top))
  code_s = lax.bitcast_convert_type(
      af * inv_step + np.float32(2.0 ** 23), jnp.uint32) & np.uint32(sub_mask)
  return sign | jnp.where(af >= np.float32(fmt.min_normal), code_n, code_s)


# ---------------------------------------------------------------------------
# The kernel


def _bad_to_inf(amax):
  """A block amax row with NaN (a block holding a NaN) made inf, as core's
  amax of such a block; ``_block_scale`` marks inf blocks bad."""
  return jnp.where(amax <= _F32_MAX, amax, np.float32(np.inf))


def _block_scale(kd: _Kind, amax, scal, interp: bool, tn: int):
  """Per-column scale of one block from its amax row (inf where the block
  holds a NaN or an inf).

  Returns:
    (stored scale row, ``to_grid(row) -> y``, ``from_grid(q) -> value``
    before the float32-max clamp, ``clipped(row, y) -> bool row``: where
    core's straight-through gradient is zero)
  """
  bad = amax == np.float32(np.inf)
  if kd.scale == "e8m0":
    e = _q._e8m0_exponent(amax, kd.fmt, kd.rounding)
    stored = jnp.where(bad, 255, e + 127).astype(jnp.uint8)
    i1, i2 = _q._pow2_pair(-e)  # pylint: disable=protected-access
    f1 = jnp.where(bad, np.float32(np.nan), i1)
    t1, t2 = _q._pow2_pair(e)  # pylint: disable=protected-access
    g1 = jnp.where(bad, np.float32(np.nan), t1)
    lim = np.float32(kd.fmt.max)
    return (stored, (lambda r: r * f1 * i2), (lambda q: q * g1 * t2),
            (lambda r, y: jnp.abs(y) > lim))
  if kd.scale == "float32":
    s = _div_full(amax, float(kd.fmt.max), interp, tn)
    s = jnp.where(amax > 0, jnp.maximum(s, np.float32(2.0 ** -126)), np.float32(1.0))
    s = jnp.where(bad, np.float32(np.nan), s)
    return (s, (lambda r: _div_full(r, s, interp, tn, "data")), (lambda q: q * s),
            (lambda r, y: jnp.abs(r) > amax))
  # NVFP4: scal = (tn, 2**-p, 2**p, 1 / tn, tensor scale invalid: 1.0 / 0.0,
  # tensor amax).
  tnorm, p_down, p_up, inv_t, t_bad, emax_t = scal
  bad = bad | ((t_bad > 0) & (amax > 0))
  a_n = amax * p_down
  zero = amax * np.float32(0.0)  # a row of zeros (inf: NaN, masked below)
  # One division by the rounded product, as core writes it (core once wrote
  # (a_n / 6) / tn, which XLA's simplifier rewrote to this where it could).
  s_raw = _div_full(a_n, zero + np.float32(6.0) * tnorm, interp, tn)
  s_raw = jnp.clip(s_raw, np.float32(2.0 ** -6), np.float32(_E4M3_MAX))
  s8 = s_raw.astype(jnp.float8_e4m3fn)
  s_val = jnp.where(bad, np.float32(np.nan), s8.astype(jnp.float32))
  # Stored as the E4M3 bits (uint8, bitcast back after the kernel): the NaN
  # code 0x7F is jnp's float8_e4m3fn NaN, as core's _mark_bad stores it.
  # (Selected in int32: Mosaic GPU has no 8-bit select.)
  bits8 = lax.bitcast_convert_type(s8, jnp.uint8).astype(jnp.int32)
  stored = jnp.where(bad, 0x7F, bits8).astype(jnp.uint8)
  mult = _div_full(jnp.where(bad, np.float32(np.nan), zero) + inv_t, s_val, interp, tn)
  tot = tnorm * s_val
  a_clip = jnp.minimum(amax, emax_t)
  return (stored, (lambda r: (r * p_down) * mult), (lambda q: (q * tot) * p_up),
          (lambda r, y: jnp.abs(r) > a_clip))


def _bisect_levels(n_thresholds: int) -> int:
  """L where ``n_thresholds == 2**L - 1`` and L >= 2 (a table of 2**L
  entries, e.g. NF4's 16), else 0: where ``_bisect_index`` applies."""
  levels = (n_thresholds + 1).bit_length() - 1
  return levels if levels >= 2 and n_thresholds == (1 << levels) - 1 else 0


def _bisect_index(y, thresholds) -> jax.Array:
  """The count of ``thresholds`` (sorted, ``2**L - 1`` of them) at or below
  ``y``, as uint32, by binary search (``_cast.bisect_bits``: L comparisons,
  each against a threshold chosen by the bits found so far), about 25
  operations for NF4 against the 45 of one comparison, conversion and
  addition per threshold. The same count as ``_cast._threshold_index`` for
  every float32 ``y`` (NaN compares false everywhere: 0).
  """
  levels = _bisect_levels(len(thresholds))
  if not levels:
    raise ValueError(f"{len(thresholds)} thresholds: need 2**L - 1 with L >= 2")
  return _cast.bits_value(_cast.bisect_bits(y, thresholds), np.uint32)


_LUT_BINS = 256  # bins of [-1, 1] (the scaled values of an absmax codebook)
_LUT_VALUES = 32  # the codebook's words in shared memory (16 used, 128 bytes)


@functools.lru_cache(maxsize=None)
def lut_bins(table: tuple) -> tuple:
  """(threshold, code below) per bin of ``Config.lut``'s NF4 encode: float32
  ``[256]`` and int32 ``[256]``, exact by construction.

  The kernel puts ``y`` in bin ``clip(floor(y * 128 + 128), 0, 255)`` (float32
  arithmetic: ``y * 128`` is exact and the addition rounds monotonically, so
  each bin is an interval of float32 values, here found by bisection over
  the float32 order with that same arithmetic). A bin's code below is the
  count of nearest-rounding thresholds (``_cast._nearest_thresholds``) at or
  below its smallest value, its threshold the one inside the bin (+inf where
  none is; no bin holds two: NF4's thresholds are at least 0.07 apart, the
  bins 1/128 wide), and the code of ``y`` is ``below + (y >= threshold)``:
  the count of thresholds at or below ``y``, as core's lookup rounding.
  """
  if not (-1.0 <= min(table) and max(table) <= 1.0):
    raise ValueError(f"the binned encode covers [-1, 1], the scaled values of "
                     f"an absmax codebook; this table spans [{min(table)}, "
                     f"{max(table)}]: use lut=False")
  thr = np.asarray(_cast._nearest_thresholds(table), np.float32)  # pylint: disable=protected-access
  half = np.float32(_LUT_BINS // 2)

  def bin_of(y):
    b = np.floor(np.float32(np.float32(y) * half) + half)
    return int(min(max(b, 0), _LUT_BINS - 1))

  order = lambda v: int(_cast._f32_order(np.float32(v)))  # pylint: disable=protected-access
  value = lambda o: np.float32(_cast._f32_from_order(o))  # pylint: disable=protected-access
  lo_o, hi_o = order(np.float32(-1.0)), order(np.float32(1.0))

  def first_of(b):
    """The float32 order of the smallest value in [-1, 1] with bin >= b."""
    if bin_of(value(lo_o)) >= b:
      return lo_o
    a, z = lo_o, hi_o + 1  # bin_of(a) < b <= bin_of(z); hi_o + 1: past 1.0
    while z - a > 1:
      mid = (a + z) // 2
      if bin_of(value(mid)) >= b:
        z = mid
      else:
        a = mid
    return z

  starts = [first_of(b) for b in range(_LUT_BINS)] + [hi_o + 1]
  out_t = np.full(_LUT_BINS, np.inf, np.float32)
  out_c = np.zeros(_LUT_BINS, np.int32)
  for b in range(_LUT_BINS):
    if starts[b + 1] <= starts[b]:
      raise ValueError(f"bin {b} holds no float32 value")
    lo_v, hi_v = value(starts[b]), value(starts[b + 1] - 1)
    out_c[b] = int(np.sum(thr <= lo_v))
    inside = thr[(thr > lo_v) & (thr <= hi_v)]
    if len(inside) > 1:
      raise ValueError(f"bin {b} of [{lo_v}, {hi_v}] holds {len(inside)} "
                       "thresholds: the table needs finer bins")
    if len(inside):
      out_t[b] = inside[0]
  return out_t, out_c


def _lut_codes(y, thr_ref, below_ref, interp: bool, tn: int):
  """NF4 codes (uint32) of a float32 ``[tn]`` row ``y`` by the binned table
  (``lut_bins``) in shared memory: a multiply-add, a clamp, a conversion, two
  shared-memory loads, a comparison and an addition an element, against the
  binary search's 4 comparisons and 11 selects. A NaN ``y`` (only in a
  NaN-scaled block) lands in some bin: its code is left to the arithmetic."""
  half = np.float32(_LUT_BINS // 2)
  # floor(t) clipped to the bins: the conversion truncates, which is floor on
  # the clipped t >= 0 (Mosaic GPU lowers no floor)
  bi = jnp.clip(y * half + half, np.float32(0.0),
                np.float32(_LUT_BINS - 1)).astype(jnp.int32)
  t = common.smem_gather(thr_ref, bi, jnp.float32, tn, interp)
  c = common.smem_gather(below_ref, bi, jnp.int32, tn, interp)
  return (c + (y >= t).astype(jnp.int32)).astype(jnp.uint32)


def _elem_codes_values(kd: _Kind, y, want_codes: bool, want_values: bool):
  """(codes, grid values) of scaled rows ``y`` (either may be None)."""
  fmt = kd.fmt
  codes = vals = None
  if kd.elem == "fp8":
    m = np.float32(fmt.max)
    c8 = jnp.clip(y, -m, m).astype(_code_dtype(kd))
    codes = c8
    if want_values:
      vals = c8.astype(jnp.float32)
  elif kd.elem in ("fp4", "fp6"):
    if want_codes:
      codes = _float_codes(y, fmt)
    if want_values:
      # Rounded onto the grid directly, also where codes are written (one
      # path, the one fake_quant runs): the values decode(encode_nearest)
      # gives for finite y (a NaN y sits in a block whose scale is NaN), in
      # about 14 operations against encoding and decoding (E2M1: 25 and 12).
      vals = _round_float_grid(y, fmt)
  elif kd.elem in ("lookup", "binary") and want_codes and not want_values and (
      _bisect_levels(len(fmt.table) - 1)):
    codes = _bisect_index(y, _cast._nearest_thresholds(fmt.table))  # pylint: disable=protected-access
  elif kd.elem in ("lookup", "binary"):
    # core's _cast_lookup: the index is the count of nearest-rounding
    # thresholds at or below y (_cast._threshold_index), the value the table
    # entry there (_table_at); each comparison serves both.
    t = [np.float32(v) for v in fmt.table]
    idx, v = None, None
    for i, c in enumerate(_cast._nearest_thresholds(fmt.table)):  # pylint: disable=protected-access
      up = y >= np.float32(c)
      if want_codes:
        b = up.astype(jnp.uint32)
        idx = b if idx is None else idx + b
      if want_values:
        v = (jnp.where(up, t[1], t[0]) if v is None
             else jnp.where(up, t[i + 1], v))
    codes = idx
    vals = v
  else:  # integers (int2..int8; MXINT8's int8 with 6 fraction bits; uint8)
    f = float(1 << fmt.frac_bits)
    lim = float(fmt.qmax)
    lo = np.float32(0.0 if kd.elem == "uint" else -lim)
    q = jnp.clip(jnp.round(y * np.float32(f)), lo, np.float32(lim))
    if want_codes:
      ci = jnp.where(jnp.isnan(q), np.float32(0.0), q).astype(jnp.int32)
      codes = ci.astype(_code_dtype(kd)) if kd.bits == 8 else (
          ci.astype(jnp.uint32) & np.uint32((1 << kd.bits) - 1))
    if want_values:
      vals = q * np.float32(1.0 / f)
  return codes, vals


def _pack_rows(kd: _Kind, codes: list) -> list:
  """Stored rows of one packing unit of code rows (``QArray``'s layout)."""
  if kd.bits == 8:
    return codes
  if kd.bits == 4:
    return [(codes[0] | (codes[1] << np.uint32(4))).astype(jnp.uint8)]
  # _qarray.pack's layout: a unit's codes little-endian in its bytes (6-bit:
  # four codes in three bytes; 3-bit: eight in three; 2-bit: four in one).
  n_codes, n_bytes = pack_unit(kd.bits)
  b = kd.bits
  out = []
  for j in range(n_bytes):
    acc = None
    for i in range(n_codes):
      lo = b * i - 8 * j
      if lo >= 8 or lo + b <= 0:
        continue
      term = codes[i] << np.uint32(lo) if lo >= 0 else codes[i] >> np.uint32(-lo)
      acc = term if acc is None else acc | term
    out.append((acc & np.uint32(0xFF)).astype(jnp.uint8))
  return out


def _code_dtype(kd: _Kind):
  if kd.elem == "fp8":
    return jnp.dtype(kd.fmt.ml_dtype)
  if kd.bits == 8 and kd.elem != "uint":
    return jnp.int8
  return jnp.uint8


def _scale_dtype(kd: _Kind):
  return jnp.float32 if kd.scale == "float32" else jnp.uint8


def _loop(lo: int, hi: int, body, init, unroll: bool):
  if unroll:
    c = init
    for i in range(lo, hi):
      c = body(i, c)
    return c
  return lax.fori_loop(lo, hi, body, init)


# The amax exchange of Config.one_pass, per thread (its column's value $1, its
# word's shared-memory address $2): store, a cluster barrier (arrive has
# release and wait acquire semantics, so every CTA's store is seen after it),
# the max over every CTA's word through distributed shared memory (mapa gives
# the peer's address of the same word), and a second barrier, so that no CTA
# leaves, freeing its shared memory, while a peer still reads it. Written as
# PTX: a peer view of a Pallas ref (plgpu.cluster_ref) did not lower on jax
# 0.11.2 (a memref offset mismatch in Mosaic GPU's dialect lowering).
_CLUSTER_MAX_PTX = """{{
.reg .b32 r;
.reg .f32 v;
mov.b32 $0, $1;
st.shared.f32 [$2], $0;
barrier.cluster.arrive.aligned;
barrier.cluster.wait.aligned;
{loads}
barrier.cluster.arrive.aligned;
barrier.cluster.wait.aligned;
}}"""
_CLUSTER_LOAD_PTX = ("mapa.shared::cluster.u32 r, $2, {j};\n"
                     "ld.shared::cluster.f32 v, [r];\n"
                     "max.f32 $0, $0, v;")


def _cluster_max_regs(mf, ref, ctas: int):
  """``_CLUSTER_MAX_PTX`` on a ``[128]`` float32 row in the warpgroup-strided
  layout (one element a thread) and a ``[128]`` float32 shared-memory ref."""
  _, fa, ir, arith, llvm, _, vector = common._mlir()  # pylint: disable=protected-access
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # pylint: disable=g-import-not-at-top
  f32 = ir.F32Type.get()
  i32 = ir.IntegerType.get_signless(32)
  if mf.registers.size != 1:
    raise NotImplementedError(f"one element a thread, got {mf.registers.shape}")
  base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref))
  # the thread's column: its index within its warpgroup (every warpgroup of
  # the CTA stores the same row to the same words)
  lane = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, 128))
  addr = arith.addi(base, arith.muli(lane, arith.constant(i32, 4)))
  loads = "\n".join(_CLUSTER_LOAD_PTX.format(j=j) for j in range(ctas))
  (idx, reg), = np.ndenumerate(mf.registers)
  val = llvm.inline_asm(f32, [llvm.extractelement(reg, arith.constant(i32, 0)), addr],
                        _CLUSTER_MAX_PTX.format(loads=loads), "=&f,f,r",
                        has_side_effects=True)
  new = mf.registers.copy()
  new[idx] = vector.broadcast(reg.type, val)
  return fa.FragmentedArray(_registers=new, _layout=mf.layout, _is_signed=None)


def _amax_of(rows, finite: bool = False):
  """Column amax of rows, as a tree: NaN where any is NaN (``jnp.maximum``
  propagates it: ``max.NaN``, one ``FMNMX.NAN`` with the absolute value
  folded in), else inf where any is inf. ``_bad_to_inf`` turns a NaN into
  inf once a block, where mapping each element took two more operations (a
  comparison and a select) in the amax pass. ``finite``: the amax of the
  finite values only (NaN and inf count as 0, NVFP4's tensor range), which
  does cost those two operations an element."""
  vals = [jnp.abs(xr) for xr in rows]
  if finite:  # NaN < inf is false: a NaN goes to 0 as well
    vals = [jnp.where(v < np.float32(np.inf), v, np.float32(0.0)) for v in vals]
  while len(vals) > 1:
    vals = [jnp.maximum(vals[i], vals[i + 1]) if i + 1 < len(vals)
            else vals[i] for i in range(0, len(vals), 2)]
  return vals[0]


def _rows_amax_fn(rch: int, unroll: bool, finite: bool = False):
  """``rows_amax(x_ref, r0, n_rows, m=None)``: the column amax (float32) of
  rows ``[r0, r0 + n_rows)`` of a shared-memory tile, ``rch`` rows at a
  time (every load of a chunk first), maxed into ``m`` (None: the carry
  starts as the first chunk's, in the layout a loop carry needs);
  ``finite``: of the finite values only (``_amax_of``)."""
  def row(ref, r):
    return ref[r].astype(jnp.float32)

  def rows_amax(x_ref, r0, n_rows, m=None):
    def chunk(c, m):
      rows = [row(x_ref, r0 + c * rch + j) for j in range(rch)]
      return jnp.maximum(m, _amax_of(rows, finite))
    if m is None:
      return _loop(1, n_rows // rch, chunk,
                   _amax_of([row(x_ref, r0 + j) for j in range(rch)], finite),
                   unroll)
    return _loop(0, n_rows // rch, chunk, m, unroll)
  return rows_amax


@functools.lru_cache(maxsize=None)
def _build_amax(k: int, n: int, x_dtype: str, cfg: Config, interpret,
                finite: bool = False):
  """``Config.amax_kernel``'s range pass: ``x [k, n] -> [k // k_per_cta, n]``
  float32, each CTA the column amax of its ``k_per_cta`` rows of ``tile_n``
  columns (inf where any is a NaN or an inf, as core's reduction; with
  ``finite``, of the finite values only, NaN and inf counting as 0, as
  NVFP4's tensor range), through a
  TMA pipeline of ``stages`` tiles of ``tile_k`` rows. The grid is the
  quantize kernel's, walked in the other order (``not cfg.reverse``), so
  that the tiles read last are the ones the quantize kernel reads first."""
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  interp = interpret is not None
  tn, tk, kc, st = cfg.tile_n, cfg.tile_k, cfg.k_per_cta, cfg.stages
  steps = kc // tk
  rch = math.gcd(cfg.rows or max(1, 16 * 128 // tn), tk)
  rows_amax = _rows_amax_fn(rch, cfg.unroll and not interp, finite)
  rev = not cfg.reverse

  def body(x_gmem, o_gmem, x_smem, o_smem, bar):
    ni = lax.axis_index("n")
    ki = lax.axis_index("k")
    if rev:
      ni = n // tn - 1 - ni
      ki = k // kc - 1 - ki
    col = pl.ds(pl.multiple_of(ni * tn, tn), tn)
    row0 = ki * kc

    def fetch(i):
      slot = lax.rem(i, st)
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(row0 + i * tk, tk), col],
                              x_smem.at[slot], bar.at[slot])

    for i in range(min(st, steps)):
      fetch(i)

    def step(i, m):
      slot = lax.rem(i, st)
      plgpu.barrier_wait(bar.at[slot])
      m = rows_amax(x_smem.at[slot], 0, tk, m)
      def refill():
        plgpu.commit_smem()  # this warpgroup's reads of the slot are done
        fetch(i + st)
      if isinstance(i, int):
        if i + st < steps:
          refill()
      elif st < steps:
        pl.when(i + st < steps)(refill)
      return m

    m = step(0, None)  # a carry of the loop's own layout
    m = lax.fori_loop(1, steps, step, m)
    o_smem[0] = m if finite else _bad_to_inf(m)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(ki, 1), col])
    plgpu.wait_smem_to_gmem(0)

  extra = {} if interpret is None else {"interpret": interpret}
  kern = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((k // kc, n), jnp.float32),
      scratch_types=[plgpu.SMEM((st, tk, tn), jnp.dtype(x_dtype)),
                     plgpu.SMEM((1, tn), jnp.float32),
                     plgpu.Barrier(num_arrivals=1, num_barriers=st)],
      grid=(n // tn, k // kc), grid_names=("n", "k"), **extra)
  call = jax.jit(kern)
  if interpret is None:
    return call
  return lambda x: common.run_interpreted(call, x)


@functools.lru_cache(maxsize=None)
def _build(kd: _Kind, k: int, n: int, x_dtype: str, want_codes: bool,
           want_values: bool, want_mask: bool, cfg: Config, interpret):
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  interp = interpret is not None
  xdt = jnp.dtype(x_dtype)
  tn, tk, kc, st = cfg.tile_n, cfg.tile_k, cfg.k_per_cta, cfg.stages
  given = kd.scale == "given"  # per channel / tensor: one tile is one "block"
  bs = kd.block or tk
  nb = tk // bs
  steps = kc // tk
  ui, uo = _units(kd.bits)
  crow = tk * uo // ui
  has_scal = kd.scale in ("nvfp4", "given")
  scale_out = want_codes and not given
  # (scale, zero point) rows; (scale, threshold) for ternary
  g_rows = 2 if kd.elem in ("uint", "ternary", "binary") else 1
  unroll = cfg.unroll and not interp

  def row(ref, r):
    return ref[r].astype(jnp.float32)

  # Rows per chunk (Config.rows): loads first, then arithmetic, then stores.
  rch = cfg.rows or max(1, 16 * 128 // tn)
  rch = math.gcd(rch, bs // (cfg.warpgroups if cfg.one_pass else 1))
  rch = rch * ui // math.gcd(rch, ui)  # ui divides bs, so rch still does

  rows_amax = _rows_amax_fn(rch, unroll)

  def do_block(x_ref, c_ref, s_ref, v_ref, m_ref, b, scal, luts=None,
               n_rows=None):
    r0 = b * bs
    blk = n_rows or bs  # rows of the refs this call computes

    if given and kd.elem == "uint":
      # Scale and zero-point rows from XLA (core's _grid_asym): y = x / s +
      # zp, values (q - zp) * s, clipped where y leaves [-0.5, max + 0.5].
      sv, zp = scal
      hi = np.float32(kd.fmt.qmax + 0.5)
      to_grid = lambda r: _div_full(r, sv, interp, tn, "data", add=zp)  # noqa: E731
      from_grid = lambda q: (q - zp) * sv  # noqa: E731
      clip = lambda r, y: (y < np.float32(-0.5)) | (y > hi)  # noqa: E731
    elif given and kd.elem == "ternary":
      # Scale and threshold rows from XLA (core's TWN): q = sign(x) where
      # |x| > threshold, else 0; values q * s; clipped where |x / s| > 1.
      sv, thr = scal
      to_grid = lambda r: _div_full(r, sv, interp, tn, "data")  # noqa: E731
      from_grid = lambda q: q * sv  # noqa: E731
      clip = lambda r, y: jnp.abs(y) > np.float32(1.0)  # noqa: E731
    elif given and kd.elem == "binary":
      # Divisor (1 where the scale is 0) and scale rows from XLA (core's
      # BWN): y = x / divisor, +-1 by x's sign bit where the scale is 0;
      # values q * s; clipped where |y| > 1.
      dv, sv = scal

      def to_grid(r):
        sign = lax.bitcast_convert_type(r, jnp.uint32) & np.uint32(0x80000000)
        one = lax.bitcast_convert_type(sign | np.uint32(0x3F800000), jnp.float32)
        return jnp.where(sv == np.float32(0.0), one, _div_full(r, dv, interp, tn, "data"))
      from_grid = lambda q: q * sv  # noqa: E731
      clip = lambda r, y: jnp.abs(y) > np.float32(1.0)  # noqa: E731
    elif given:
      # The scale row XLA computed (core's own code): y = x / s as core's
      # _div_data divides, values q * s as core's _values.
      to_grid = lambda r: _div_full(r, scal, interp, tn, "data")  # noqa: E731
      from_grid = lambda q: q * scal  # noqa: E731
      clip = None
    else:
      m = _bad_to_inf(rows_amax(x_ref, r0, blk))
      stored, to_grid, from_grid, clip = _block_scale(kd, m, scal, interp, tn)
      if want_codes:
        s_ref[b] = stored.astype(s_ref.dtype)

    def chunk_body(ci, carry):
      base = r0 + ci * rch
      xs = [row(x_ref, base + j) for j in range(rch)]
      stores = []  # (ref, row, value): after every load of the chunk
      for u in range(rch // ui):
        codes = []
        for j in range(ui):
          r = base + u * ui + j
          xr = xs[u * ui + j]
          y = to_grid(xr)
          if kd.elem == "ternary":
            q = jnp.where(jnp.abs(xr) > thr, jnp.sign(xr), np.float32(0.0))
            c = (q + np.float32(1.0)).astype(jnp.int32).astype(jnp.uint32)
            v = q
          elif luts is not None:  # Config.lut: NF4's codes by the binned table
            c, v = _lut_codes(y, luts[0], luts[1], interp, tn), None
            if want_values:  # the value of the code, from the codebook
              v = common.smem_gather(luts[2], c.astype(jnp.int32),
                                     jnp.float32, tn, interp)
          else:
            c, v = _elem_codes_values(kd, y, want_codes, want_values)
          if want_mask:
            stores.append((m_ref, r, clip(xr, y).astype(jnp.uint8)))
          if want_values:
            out = jnp.clip(from_grid(v), -_F32_MAX, _F32_MAX)
            stores.append((v_ref, r, out))
          codes.append(c)
        if want_codes:
          for j, pr in enumerate(_pack_rows(kd, codes)):
            stores.append((c_ref, (base // ui + u) * uo + j, pr))
      for ref, r, val in stores:
        ref[r] = val.astype(ref.dtype)
      return carry

    _loop(0, blk // rch, chunk_body, 0, unroll)

  def body(*refs):
    refs = list(refs)

    def outputs():
      """(codes, scales, values, mask) refs, None for those not produced."""
      c = s = v = None
      if want_codes:
        c = refs.pop(0)
        s = refs.pop(0) if scale_out else None
      if want_values:
        v = refs.pop(0)
      return c, s, v, (refs.pop(0) if want_mask else None)

    x_gmem = refs.pop(0)
    sc_gmem = refs.pop(0) if has_scal else None
    lut_gmem = (refs.pop(0), refs.pop(0), refs.pop(0)) if cfg.lut else None
    c_gmem, s_gmem, v_gmem, m_gmem = outputs()
    x_smem = refs.pop(0)
    c_smem, s_smem, v_smem, m_smem = outputs()
    bar = refs.pop(0)
    ni = lax.axis_index("n")
    ki = lax.axis_index("k")
    if cfg.reverse:
      ni = n // tn - 1 - ni
      ki = k // kc - 1 - ki
    col = pl.ds(pl.multiple_of(ni * tn, tn), tn)
    row0 = ki * kc
    scal = None
    if given:  # the scale row of this CTA's columns, read once
      sc_smem, sc_bar = refs.pop(0), refs.pop(0)
      plgpu.copy_gmem_to_smem(sc_gmem.at[pl.ds(0, g_rows), col], sc_smem,
                              sc_bar.at[0])
      plgpu.barrier_wait(sc_bar.at[0])
      scal = sc_smem[0] if g_rows == 1 else (sc_smem[0], sc_smem[1])
    elif has_scal:
      scal = tuple(sc_gmem[i] for i in range(6))
    luts = None
    if cfg.lut:  # the binned table, read once
      lut_smem = (refs.pop(0), refs.pop(0), refs.pop(0))
      lut_bar = refs.pop(0)
      for g, sm in zip(lut_gmem, lut_smem):
        plgpu.copy_gmem_to_smem(g, sm, lut_bar.at[0])
      plgpu.barrier_wait(lut_bar.at[0])
      luts = lut_smem

    def fetch(i, slot):
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(row0 + i * tk, tk), col],
                              x_smem.at[slot], bar.at[slot])

    def step(i, slot):
      xs = x_smem.at[slot]
      cs = c_smem.at[slot] if want_codes else None
      ss = s_smem.at[slot] if scale_out else None
      vs = v_smem.at[slot] if want_values else None
      ms = m_smem.at[slot] if want_mask else None

      def blk(b, carry):
        do_block(xs, cs, ss, vs, ms, b, scal, luts)
        return carry

      _loop(0, nb, blk, 0, unroll)
      plgpu.commit_smem()
      r = row0 + i * tk
      if want_codes:
        plgpu.copy_smem_to_gmem(
            cs, c_gmem.at[pl.ds(r // ui * uo, crow), col], commit_group=False)
      if scale_out:
        plgpu.copy_smem_to_gmem(
            ss, s_gmem.at[pl.ds(r // bs, nb), col], commit_group=False)
      if want_values:
        plgpu.copy_smem_to_gmem(vs, v_gmem.at[pl.ds(r, tk), col],
                                commit_group=False)
      if want_mask:
        plgpu.copy_smem_to_gmem(ms, m_gmem.at[pl.ds(r, tk), col],
                                commit_group=False)

    common.tma_stream(steps, st, bar, fetch, step)

  one = cfg.one_pass  # CTAs a column strip's rows are split over (0: two passes)
  if one:
    kc_rows = k // one
    n_steps = kc_rows // tk
    resident = min(n_steps, st)
    kd_amax = dataclasses.replace(kd, scale="float32")
    nwg = cfg.warpgroups
    rw = tk // nwg  # rows of a tile each warpgroup takes
    n_strips_cta = cfg.strips  # column strips each CTA walks
    n_groups = n // tn // n_strips_cta  # CTAs (clusters) side by side
    loads_per_strip = 2 * n_steps - st if n_steps > st else n_steps
    total_loads = n_strips_cta * loads_per_strip

  def cluster_amax(m, amax_ref):
    """The elementwise max of ``m`` (the column amax row, one column a
    thread) over the cluster's CTAs (``_CLUSTER_MAX_PTX``)."""
    strided = plgpu.Layout.WG_STRIDED((tn,), vec_size=1)

    @plgpu.inline_mgpu(arg_types=(strided, plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct((tn,), jnp.float32,
                                                          strided))
    def ex(_, mf, ref):
      return _cluster_max_regs(mf, ref, one)
    return ex(m, amax_ref)

  def body_one(*refs):
    """Config.one_pass: per column strip, the amax of the CTA's rows
    (cluster-wide through distributed shared memory), the scale, then the
    codes / values.

    The CTA walks ``Config.strips`` column strips in turn as one stream of
    TMA loads through a ring of ``stages`` slots: a strip's ``n_steps``
    tiles for the amax, then, where they did not all stay resident, its
    first ``n_steps - stages`` tiles again. Load ``j`` goes to slot ``j %
    stages`` and is issued once load ``j - stages`` has had its last use
    (last uses come in load order: a tile that does not stay is done after
    the amax pass, a resident one after its quantize), so the next strip's
    loads run under this strip's quantize. With ``Config.warpgroups`` = W,
    warpgroup w takes rows ``[w * tk / W, (w + 1) * tk / W)`` of every
    tile and stores its own rows of the outputs; warpgroup 0 issues the
    loads, each once every warpgroup has arrived on the slot's ``done``
    barrier."""
    refs = list(refs)
    x_gmem = refs.pop(0)
    c_gmem = refs.pop(0) if want_codes else None
    sr_gmem = refs.pop(0) if want_codes else None
    v_gmem = refs.pop(0) if want_values else None
    x_smem = refs.pop(0)
    c_smem = refs.pop(0) if want_codes else None
    v_smem = refs.pop(0) if want_values else None
    amax_smem = refs.pop(0)  # [tn] f32: this CTA's amax, read by the cluster
    wg_smem = refs.pop(0)  # [W, tn] f32: each warpgroup's amax
    scale_smem = refs.pop(0)  # [1, tn] f32: the scale row, stored by TMA
    bar = refs.pop(0)  # a slot's load arrived
    done = refs.pop(0)  # every warpgroup is done reading a slot
    wg_bar = refs.pop(0)  # [2]: every warpgroup wrote / read its amax row
    gi = lax.axis_index("n")
    ci = lax.axis_index("c") if one > 1 else 0
    wg = lax.axis_index("wg") if nwg > 1 else 0
    row0 = ci * kc_rows

    def strip_cols(t):
      """The columns of this CTA's ``t``-th strip (clusters side by side)."""
      return pl.ds(pl.multiple_of((gi + t * n_groups) * tn, tn), tn)

    def issue(j):
      """Load ``j`` of the stream into slot ``j % stages``."""
      t = j // loads_per_strip
      p = j % loads_per_strip
      d = p if loads_per_strip == n_steps else jnp.where(p < n_steps, p, p - n_steps)

      @pl.when(wg == 0)
      def _():
        plgpu.copy_gmem_to_smem(
            x_gmem.at[pl.ds(row0 + d * tk, tk), strip_cols(t)],
            x_smem.at[lax.rem(j, st)], bar.at[lax.rem(j, st)])

    def release(j, cond=True):
      """Load ``j`` had its last use: once every warpgroup is done reading
      its slot, issue load ``j + stages`` there (where there is one)."""
      @pl.when(jnp.logical_and(cond, j + st < total_loads))
      def _():
        plgpu.commit_smem()  # this warpgroup's reads are done
        if nwg > 1:
          slot = lax.rem(j, st)
          plgpu.barrier_arrive(done.at[slot])

          @pl.when(wg == 0)
          def _():
            plgpu.barrier_wait(done.at[slot])
        issue(j + st)

    def my_rows(ref, unit_in: int = 1, unit_out: int = 1):
      """This warpgroup's rows of a tile ref (``rw`` input rows, stored
      ``unit_out`` rows for every ``unit_in``)."""
      if nwg == 1:
        return ref
      n_rows = rw * unit_out // unit_in
      return ref.at[pl.ds(pl.multiple_of(wg * n_rows, n_rows), n_rows)]

    for j in range(min(st, total_loads)):
      issue(j)

    def strip(t, carry):
      base = t * loads_per_strip  # the stream index of the strip's first load
      cols = strip_cols(t)

      def pass1(i, m):
        j = base + i
        plgpu.barrier_wait(bar.at[lax.rem(j, st)])
        m = rows_amax(my_rows(x_smem.at[lax.rem(j, st)]), 0, rw, m)
        if n_steps > st:  # a tile that does not stay: done with it
          release(j, i < n_steps - st)
        return m

      m = pass1(0, None)  # step 0 outside: a carry of the loop's own layout
      m = lax.fori_loop(1, n_steps, pass1, m)
      # before the exchanges: _CLUSTER_MAX_PTX's max.f32 would drop a NaN
      m = _bad_to_inf(m)
      if nwg > 1:  # the CTA's amax from its warpgroups' rows
        wg_smem[wg] = m
        plgpu.commit_smem()
        plgpu.barrier_arrive(wg_bar.at[0])
        plgpu.barrier_wait(wg_bar.at[0])
        m = wg_smem[0]
        for w in range(1, nwg):
          m = jnp.maximum(m, wg_smem[w])
        # every warpgroup has read the rows before the next strip writes them
        plgpu.barrier_arrive(wg_bar.at[1])
        plgpu.barrier_wait(wg_bar.at[1])
      if one > 1:
        m = cluster_amax(m, amax_smem)
      stored, _, _, _ = _block_scale(kd_amax, m, None, interp, tn)
      if want_codes:
        @pl.when(jnp.logical_and(wg == 0, ci == 0))
        def _():
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last strip's
          scale_smem[0] = stored
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(scale_smem, sr_gmem.at[pl.ds(0, 1), cols])
      # core divides by the scale as stored (never 0: 1 where the amax is 0)
      scale = stored

      def pass2(d, j, o):
        """Quantizes this warpgroup's rows of data step ``d`` (load ``j``)
        into output slot ``o`` and stores them."""
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        xs = my_rows(x_smem.at[lax.rem(j, st)])
        cs = my_rows(c_smem.at[o], ui, uo) if want_codes else None
        vs = my_rows(v_smem.at[o]) if want_values else None
        do_block(xs, cs, None, vs, None, 0, scale, n_rows=rw)
        plgpu.commit_smem()
        r = row0 + d * tk + wg * rw
        if want_codes:
          plgpu.copy_smem_to_gmem(
              cs, c_gmem.at[pl.ds(r // ui * uo, rw * uo // ui), cols],
              commit_group=False)
        if want_values:
          plgpu.copy_smem_to_gmem(vs, v_gmem.at[pl.ds(r, rw), cols],
                                  commit_group=False)
        plgpu.commit_smem_to_gmem_group()

      # The tiles still in shared memory first (the last ``resident`` data
      # steps), then the first ones, read again.
      def resident_step(jj, carry):
        d = n_steps - resident + jj
        pass2(d, base + d, lax.rem(t * n_steps + jj, 2))
        release(base + d)
        return carry

      lax.fori_loop(0, resident, resident_step, 0)
      if n_steps > st:
        def refill_step(e, carry):
          j = base + n_steps + e
          plgpu.barrier_wait(bar.at[lax.rem(j, st)])
          pass2(e, j, lax.rem(t * n_steps + resident + e, 2))
          release(j)
          return carry
        lax.fori_loop(0, n_steps - st, refill_step, 0)
      return carry

    lax.fori_loop(0, n_strips_cta, strip, 0)
    plgpu.wait_smem_to_gmem(0)

  if one:
    out_types, scratch = [], [plgpu.SMEM((st, tk, tn), xdt)]
    if want_codes:
      out_types += [jax.ShapeDtypeStruct((k * uo // ui, n), _code_dtype(kd)),
                    jax.ShapeDtypeStruct((1, n), jnp.float32)]
      scratch.append(plgpu.SMEM((2, crow, tn), _code_dtype(kd)))
    if want_values:
      out_types.append(jax.ShapeDtypeStruct((k, n), xdt))
      scratch.append(plgpu.SMEM((2, tk, tn), xdt))
    scratch += [plgpu.SMEM((tn,), jnp.float32), plgpu.SMEM((nwg, tn), jnp.float32),
                plgpu.SMEM((1, tn), jnp.float32),
                plgpu.Barrier(num_arrivals=1, num_barriers=st),
                plgpu.Barrier(num_arrivals=nwg, num_barriers=st),
                plgpu.Barrier(num_arrivals=nwg, num_barriers=2)]
    extra = {} if interpret is None else {"interpret": interpret}
    if one > 1:
      extra.update(cluster=(one,), cluster_names=("c",))
    if nwg > 1:
      extra.update(num_threads=nwg, thread_name="wg")
    kern = plgpu.kernel(body_one, out_type=tuple(out_types),
                        scratch_types=scratch, grid=(n_groups,),
                        grid_names=("n",), **extra)
    call = jax.jit(lambda x, scal: kern(x))
    if interpret is None:
      return call
    return lambda x, scal: common.run_interpreted(call, x, scal)

  out_types, scratch = [], [plgpu.SMEM((st, tk, tn), xdt)]
  if want_codes:
    out_types.append(jax.ShapeDtypeStruct((k * uo // ui, n), _code_dtype(kd)))
    scratch.append(plgpu.SMEM((st, crow, tn), _code_dtype(kd)))
  if scale_out:
    out_types.append(jax.ShapeDtypeStruct((k // bs, n), _scale_dtype(kd)))
    scratch.append(plgpu.SMEM((st, nb, tn), _scale_dtype(kd)))
  if want_values:
    out_types.append(jax.ShapeDtypeStruct((k, n), xdt))
    scratch.append(plgpu.SMEM((st, tk, tn), xdt))
  if want_mask:
    out_types.append(jax.ShapeDtypeStruct((k, n), jnp.uint8))
    scratch.append(plgpu.SMEM((st, tk, tn), jnp.uint8))
  scratch.append(plgpu.Barrier(num_arrivals=1, num_barriers=st))
  if given:
    scratch += [plgpu.SMEM((g_rows, tn), jnp.float32),
                plgpu.Barrier(num_arrivals=1, num_barriers=1)]
  if cfg.lut:
    scratch += [plgpu.SMEM((_LUT_BINS,), jnp.float32),
                plgpu.SMEM((_LUT_BINS,), jnp.int32),
                plgpu.SMEM((_LUT_VALUES,), jnp.float32),
                plgpu.Barrier(num_arrivals=3, num_barriers=1)]
  extra = {} if interpret is None else {"interpret": interpret}
  kern = plgpu.kernel(body, out_type=tuple(out_types), scratch_types=scratch,
                      grid=(n // tn, k // kc), grid_names=("n", "k"), **extra)
  lut_args = ()
  if cfg.lut:
    thr, below = lut_bins(tuple(float(v) for v in kd.fmt.table))
    # the codebook, padded: a copy must move a multiple of 128 bytes
    vals = np.zeros(_LUT_VALUES, np.float32)
    vals[:len(kd.fmt.table)] = kd.fmt.table
    lut_args = (thr, below, vals)

  @jax.jit
  def call(x, scal):
    args = ((x,) if scal is None else (x, scal)) + tuple(
        jnp.asarray(a) for a in lut_args)
    return kern(*args)

  if interpret is None:
    return call
  return lambda x, scal: common.run_interpreted(call, x, scal)


@functools.lru_cache(maxsize=None)
def _build_rows(kd: _Kind, m: int, n: int, x_dtype: str, want_codes: bool,
                want_values: bool, cfg: Config, interpret):
  """The per-row kernel (``<format>_tok``): ``cfg.tile_k`` whole rows a step
  (TMA boxes of ``_ROW_CHUNK`` columns), each row's amax reduced across the
  warpgroup, its scale as the block path computes it (``_block_scale``),
  then the row scaled, rounded and written; one read of ``x``."""
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  interp = interpret is not None
  xdt = jnp.dtype(x_dtype)
  tn, rr, rc, st = _ROW_CHUNK, cfg.tile_k, cfg.k_per_cta, cfg.stages
  nc = n // tn
  steps = rc // rr
  kf = dataclasses.replace(kd, scale="float32")  # the block path's scale

  def body(*refs):
    refs = list(refs)
    x_gmem = refs.pop(0)
    c_gmem = refs.pop(0) if want_codes else None
    s_gmem = refs.pop(0) if want_codes else None
    v_gmem = refs.pop(0) if want_values else None
    x_smem = refs.pop(0)
    c_smem = refs.pop(0) if want_codes else None
    s_smem = refs.pop(0) if want_codes else None
    v_smem = refs.pop(0) if want_values else None
    bar = refs.pop(0)
    row0 = lax.axis_index("m") * rc

    def fetch(i, slot):
      for c in range(nc):
        plgpu.copy_gmem_to_smem(
            x_gmem.at[pl.ds(row0 + i * rr, rr), pl.ds(c * tn, tn)],
            x_smem.at[slot, c], bar.at[slot])

    def step(i, slot):
      def one_row(r, carry):
        rows = [x_smem[slot, c, r].astype(jnp.float32) for c in range(nc)]
        a = None
        for v in rows:  # inf where any element is NaN or inf, as core's
          av = jnp.abs(v)
          av = jnp.where(av <= _F32_MAX, av, np.float32(np.inf))
          a = av if a is None else jnp.maximum(a, av)
        amax = jnp.zeros_like(rows[0]) + jnp.max(a)
        if not interp:  # a splat otherwise; the inline division takes rows
          amax = plgpu.layout_cast(
              amax, plgpu.Layout.WG_STRIDED((tn,), vec_size=tn // 128))
        stored, to_grid, from_grid, _ = _block_scale(kf, amax, None, interp, tn)
        if want_codes:
          s_smem[slot, r] = jnp.max(stored)  # every lane holds the scale
        for c, v in enumerate(rows):
          y = to_grid(v)
          code, val = _elem_codes_values(kd, y, want_codes, want_values)
          if want_codes:
            c_smem[slot, c, r] = code.astype(c_smem.dtype)
          if want_values:
            out = jnp.clip(from_grid(val), -_F32_MAX, _F32_MAX)
            v_smem[slot, c, r] = out.astype(xdt)
        return carry

      lax.fori_loop(0, rr, one_row, 0)
      plgpu.commit_smem()
      rows_g = pl.ds(row0 + i * rr, rr)
      for c in range(nc):
        cols = pl.ds(c * tn, tn)
        if want_codes:
          plgpu.copy_smem_to_gmem(c_smem.at[slot, c], c_gmem.at[rows_g, cols],
                                  commit_group=False)
        if want_values:
          plgpu.copy_smem_to_gmem(v_smem.at[slot, c], v_gmem.at[rows_g, cols],
                                  commit_group=False)
      if want_codes:
        plgpu.copy_smem_to_gmem(s_smem.at[slot], s_gmem.at[rows_g],
                                commit_group=False)

    common.tma_stream(steps, st, bar, fetch, step)

  out_types, scratch = [], [plgpu.SMEM((st, nc, rr, tn), xdt)]
  if want_codes:
    out_types += [jax.ShapeDtypeStruct((m, n), _code_dtype(kd)),
                  jax.ShapeDtypeStruct((m,), jnp.float32)]
    scratch += [plgpu.SMEM((st, nc, rr, tn), _code_dtype(kd)),
                plgpu.SMEM((st, rr), jnp.float32)]
  if want_values:
    out_types.append(jax.ShapeDtypeStruct((m, n), xdt))
    scratch.append(plgpu.SMEM((st, nc, rr, tn), xdt))
  scratch.append(plgpu.Barrier(num_arrivals=nc, num_barriers=st))
  extra = {} if interpret is None else {"interpret": interpret}
  kern = plgpu.kernel(body, out_type=tuple(out_types), scratch_types=scratch,
                      grid=(m // rc,), grid_names=("m",), **extra)

  @jax.jit
  def call(x, scal):
    del scal
    return kern(x)

  if interpret is None:
    return call
  return lambda x, scal: common.run_interpreted(call, x, scal)


# ---------------------------------------------------------------------------
# NVFP4's tensor scale (XLA, before the kernel)


def _nvfp4_scalars(x2, tensor_amax, finite_amax=None):
  """(tensor scale, the kernel's float32[5] scalars) as core's ``_grid``
  derives them: ``t = max(amax / (6 * 448), 2**-126)`` (1 for a zero amax),
  split into ``tn * 2**p``, and ``1 / tn``; then a flag for an invalid static
  range (``tensor_amax <= 0`` or NaN), which turns blocks with data into NaN,
  and the tensor amax (the clip range of the straight-through gradient).
  ``finite_amax``: the amax of the finite values of ``x2``, already reduced
  (``Config.amax_kernel``; a max is exact in any order, so it is XLA's
  reduction's bit for bit)."""
  if tensor_amax is None:
    emax = finite_amax if finite_amax is not None else jnp.max(
        jnp.where(jnp.isfinite(x2), jnp.abs(x2),
                  jnp.zeros((), x2.dtype))).astype(jnp.float32)
    t_pos = emax > 0
    t_bad = jnp.float32(0.0)
  else:
    emax = jnp.asarray(tensor_amax, jnp.float32) * np.float32(1.0)
    t_pos = emax > 0
    t_bad = jnp.where(t_pos, np.float32(0.0), np.float32(1.0))
  t = _q._clamp_scale(_q._div(emax, np.float32(6.0 * _E4M3_MAX)), "float32")
  t = jnp.where(t_pos, t, np.float32(1.0))
  tnorm, p_down, p_up = _q._split_pow2(t)
  inv_t = _q._div(np.float32(1.0), tnorm)
  scal = jnp.stack([tnorm, p_down, p_up, inv_t, t_bad, emax]).astype(jnp.float32)
  return t, scal


# ---------------------------------------------------------------------------
# Per-channel and per-tensor scales (XLA, before the kernel)


def _given_scale(x, spec: QuantSpec, n: int, block_amax=None):
  """(stored scale, zero point or None, float32 ``[rows, n]`` kernel input)
  of a per-channel or per-tensor spec, from core's own ``_grid``: XLA keeps
  only its range reduction and scale arithmetic (the rest of ``_grid`` is
  unused and removed), so scale and zero point are the reference's bit for
  bit. The kernel input holds the scale row, and for asymmetric specs the
  zero point's row under it. ``n``: the columns of ``x`` flattened to
  ``[K, n]``. ``block_amax``: the range, already reduced (``Config.amax_kernel``),
  for ``_grid``'s arithmetic in place of its reduction."""
  xp, spec, bs, valid, _ = _q._prepare(x, spec)  # pylint: disable=protected-access
  _, total, stored, zp, _, _ = _q._grid(xp, spec, bs, valid, None, None, None,  # pylint: disable=protected-access
                                        for_codes=True, block_amax=block_amax)
  # core divides by where(s == 0, 1, s) (symmetric) or s; s is never 0 for
  # these formats (1 where the range is 0), kept for the same numbers.
  s = jnp.where(total == 0, np.float32(1.0), total)
  rows = [jnp.broadcast_to(s.reshape(1, -1), (1, n))]
  if zp is not None:
    rows.append(jnp.broadcast_to(zp.astype(jnp.float32).reshape(1, -1), (1, n)))
  fmt = spec.element
  if isinstance(fmt, LookupFormat) and fmt.scale_method == "mean_abs":
    # core divides by 1 where the scale is 0 and multiplies the values by 0
    rows.append(jnp.broadcast_to(total.reshape(1, -1), (1, n)))
  if isinstance(fmt, LookupFormat) and fmt.scale_method == "twn":
    # core's threshold, the same expression (_grid's twn branch)
    xb = _q._to_blocks(xp.astype(jnp.float32), bs)  # pylint: disable=protected-access
    red = _q._red_axes(xp.ndim)  # pylint: disable=protected-access
    vb = None if valid is None else _q._to_blocks(valid, bs)  # pylint: disable=protected-access
    thr = 0.7 * _q._mean_abs(jnp.abs(xb), red, vb, bs)  # pylint: disable=protected-access
    rows.append(jnp.broadcast_to(thr.reshape(1, -1), (1, n)))
  return stored, zp, jnp.concatenate(rows, axis=0)


# ---------------------------------------------------------------------------
# Public entry points


def _setup(x, spec, tensor_amax, config, values: bool):
  spec = as_spec(spec) if not isinstance(spec, QuantSpec) else spec
  x = jnp.asarray(x)
  kd = _kind(spec, x.ndim)
  if kd is None:
    raise ValueError(f"the one-pass quantizer takes block scales along axis 0 "
                     f"(MX, NVFP4, int8/int4/int3/int2/fp4/NF4 groups of {_GROUPS}), "
                     f"per-channel scales of axis 0 ({_GIVEN_INTS + _GIVEN_FP8 + _GIVEN_NARROW}"
                     f", uint8, ternary, binary), per-tensor 8-bit ones or "
                     f"per-row ones of the last axis ({_ROW_FORMATS}); got {spec}")
  if x.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    raise ValueError(f"the one-pass quantizer takes bfloat16 or float32 arrays, "
                     f"got {x.dtype}; use lowbit_jax.quantize")
  if tensor_amax is not None and kd.scale != "nvfp4":
    raise ValueError(f"tensor_amax applies to NVFP4 only, not {kd.kind}")
  ax = normalize_axis(spec.axis, x.ndim)
  if ax != spec.axis:
    spec = spec.replace(axis=ax)
  if kd.scale == "row":  # rows of the last axis
    k, n = math.prod(x.shape[:-1]), x.shape[-1]
  else:
    k, n = x.shape[0], math.prod(x.shape[1:])
  cfg = config or default_config(kd.kind, k, n, x.dtype, values)
  if cfg is None:
    raise ValueError(
        f"no tiling fits [{k}, {n}] (" + (
            f"rows of a multiple of {_ROW_CHUNK} elements, a multiple of 4 rows"
            if kd.scale == "row" else
            f"N must be a multiple of 128 and K of {max(kd.block, 32)}") + ")")
  return spec, x, kd, k, n, cfg


def _run(x, spec, tensor_amax, config, interpret, values: bool,
         codes: Optional[bool] = None, mask: bool = False):
  """The kernel's outputs in their final shapes: ``(codes, scale[, tensor
  scale])`` for quantize, then ``(values,)`` for fake_quant (``codes`` and
  ``values`` both: one kernel writing both, which the tests use).

  Under ``vmap`` (the kernel itself has no batching rule for a batch of
  more than one) the jnp path runs instead, vmapped: the same numbers.
  """
  params = common.interpret_params(interpret)
  codes = (not values) if codes is None else codes
  spec, x, kd, k, n, cfg = _setup(x, spec, tensor_amax, config, values)
  _check_config(kd, k, n, x.dtype, cfg, codes, values, mask)
  row = kd.scale == "row"
  if row:
    fn = _build_rows(kd, k, n, jnp.dtype(x.dtype).name, codes, values, cfg,
                     params)
  else:
    fn = _build(kd, k, n, jnp.dtype(x.dtype).name, codes, values, mask, cfg,
                params)
  ui, uo = _units(kd.bits)
  rest = x.shape[1:]
  nvfp4 = kd.scale == "nvfp4"
  given = kd.scale == "given"
  asym = kd.elem == "uint"

  amax_fn = None
  if cfg.amax_kernel and not (nvfp4 and tensor_amax is not None):
    amax_fn = _build_amax(k, n, jnp.dtype(x.dtype).name, cfg, params,
                          finite=nvfp4)

  def kernel(xa, *ta):
    x2 = xa.reshape(k, n)
    t = scal = stored = zp = None
    # Config.amax_kernel: the range from our kernel's per-CTA partials
    part = None if amax_fn is None else amax_fn(x2)
    if nvfp4:
      t, scal = _nvfp4_scalars(x2, ta[0] if ta else None,
                               None if part is None else jnp.max(part))
    if given and not cfg.one_pass:  # (one_pass: the kernel derives the scale)
      block_amax = None if part is None else (
          jnp.max(part) if kd.kind.endswith("_pt") else jnp.max(part, axis=0))
      stored, zp, scal = _given_scale(xa, spec, n, block_amax)
    outs = list(fn(x2, scal))
    if given and cfg.one_pass and codes:  # its scale row follows the codes
      stored = outs.pop(1).reshape((1,) + rest)
    res = ()
    if codes and row:
      res = (outs.pop(0).reshape(xa.shape),
             outs.pop(0).reshape(xa.shape[:-1] + (1,)))
    elif codes:
      c = outs.pop(0).reshape((k * uo // ui,) + rest)
      scale = stored if given else outs.pop(0).reshape((k // kd.block,) + rest)
      if nvfp4:
        res = (c, lax.bitcast_convert_type(scale, jnp.float8_e4m3fn), t)
      elif zp is not None:
        res = (c, scale, zp)
      else:
        res = (c, scale)
    if values:
      res += (outs.pop(0).reshape(xa.shape),)
    if mask:
      res += (outs.pop(0).reshape(xa.shape),)
    return res

  def reference(xa, *ta):
    t_amax = ta[0] if ta else None
    res = ()
    if codes:
      q = _q._quantize_jit(xa, spec, None, None, None, t_amax)  # pylint: disable=protected-access
      res = (q.codes, q.scale, q.tensor_scale) if nvfp4 else (
          (q.codes, q.scale, q.zero_point) if asym else (q.codes, q.scale))
    if values:
      v, clipped = _q._fake_quant_impl(xa, spec, None, None, None, t_amax)  # pylint: disable=protected-access
      res += (v,) + ((clipped.astype(jnp.uint8),) if mask else ())
    return res

  f = custom_batching.custom_vmap(kernel)

  @f.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    args = [a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
            for a, b in zip(args, in_batched)]
    out = jax.vmap(reference)(*args)
    return out, tuple([True] * len(out))

  extra = () if tensor_amax is None else (jnp.asarray(tensor_amax, jnp.float32),)
  return spec, x, kd, f(x, *extra)


def quantize(x: jax.Array, spec, *, tensor_amax: Optional[jax.Array] = None,
             config: Optional[Config] = None, interpret=False) -> QArray:
  """``lowbit_jax.quantize(x, spec)`` in one pass over ``x`` (same QArray).

  Args:
    x: bfloat16 or float32 array of rank >= 2 (dims after the first are
      flattened: ``[K, ...]`` is quantized as ``[K, prod(...)]``).
    spec: a QuantSpec with blocks along axis 0 (``kind_of(spec)`` not None).
    tensor_amax: NVFP4's static tensor range, as ``lowbit_jax.quantize``
      takes it (otherwise the amax of ``x`` over finite values, reduced by
      XLA before the kernel).
    config: tiling (default: ``default_config``).
    interpret: False (compile for a Hopper GPU), True or an
      ``InterpretGPUParams`` (the Mosaic GPU interpreter, on CPU).

  Returns:
    The QArray ``lowbit_jax.quantize`` returns: the same codes, scales and
    tensor scale, bit for bit (NaN codes of a block holding a NaN or an inf
    may differ in sign; that block's scale is NaN either way).

  Raises:
    ValueError: a spec, dtype or shape the kernel does not take, or a tiling
      that does not fit.
  """
  spec, x, kd, outs = _run(x, spec, tensor_amax, config, interpret, False)
  t = outs[2] if kd.scale == "nvfp4" else None
  zp = outs[2] if kd.elem == "uint" else None
  return QArray(codes=outs[0], scale=outs[1], zero_point=zp, tensor_scale=t,
                spec=spec, shape=tuple(x.shape), dtype=str(x.dtype),
                pack_axis=default_pack_axis(spec, x.ndim))


def _quantize_and_values(x, spec, *, tensor_amax=None, config=None, interpret=False):
  """(QArray, fake-quant values, clip mask) from one kernel that writes all
  three (tests; the per-channel and per-tensor formats, which never clip,
  write no mask: None)."""
  sp = as_spec(spec) if not isinstance(spec, QuantSpec) else spec
  kd = _kind(sp, jnp.ndim(x))
  mask = kd is None or not _never_clips(kd)
  spec, x, kd, outs = _run(x, spec, tensor_amax, config, interpret, True, True,
                           mask=mask)
  t = outs[2] if kd.scale == "nvfp4" else None
  zp = outs[2] if kd.elem == "uint" else None
  q = QArray(codes=outs[0], scale=outs[1], zero_point=zp, tensor_scale=t,
             spec=spec, shape=tuple(x.shape), dtype=str(x.dtype),
             pack_axis=default_pack_axis(spec, x.ndim))
  return (q, outs[-2], outs[-1]) if mask else (q, outs[-1], None)


def fake_quant_forward(x: jax.Array, spec, *, tensor_amax: Optional[jax.Array] = None,
                       config: Optional[Config] = None, interpret=False) -> jax.Array:
  """The value of ``lowbit_jax.fake_quant(x, spec)``: one read, one write.

  Quantizes and dequantizes in registers (no gradient rule: ``fake_quant``
  wraps this in its own straight-through VJP). Arguments as ``quantize``.

  Returns:
    An array of x's shape and dtype, equal to ``fake_quant``'s value bit for
    bit (NaN signs aside).
  """
  _, _, _, (vals,) = _run(x, spec, tensor_amax, config, interpret, True)
  return vals


def fake_quant_forward_with_mask(x: jax.Array, spec, *,
                                 tensor_amax: Optional[jax.Array] = None,
                                 config: Optional[Config] = None,
                                 interpret=False) -> tuple:
  """``fake_quant_forward`` and the straight-through gradient's clip mask.

  For ``fake_quant``'s forward pass under differentiation where the
  gradient needs a mask (E8M0 scales, whose floor rounding can saturate a
  block's largest elements; NVFP4, where values beyond the tensor range
  clip): one read of ``x``, the values and the mask written.

  Returns:
    ``(values, clipped)``: values as ``fake_quant_forward``; ``clipped`` a
    uint8 array of x's shape, 1 where core's ``fake_quant`` zeroes the
    gradient (its ``clipped`` mask, bit for bit).
  """
  _, _, _, (vals, mask) = _run(x, spec, tensor_amax, config, interpret, True,
                               mask=True)
  return vals, mask


# ---------------------------------------------------------------------------
# Dispatch from lowbit_jax.quantize / fake_quant

_forced = common.ForcedDispatch()


def forced(kinds, configs: Optional[dict] = None):
  """Within the block, dispatch sends ``kinds`` (an iterable of ids, e.g.
  ``supported_kinds()``, or ``()`` to keep every call on the XLA path) to the
  kernel for every operation, instead of ``ENABLED``; ``configs`` (``{kind:
  Config}``) replaces ``default_config``'s tiling for those kinds where it
  fits. For benchmarks and tests. Thread-local."""
  return _forced.forced(kinds, configs)


def _enabled_kinds(op: str) -> frozenset:
  """``ENABLED[op]`` (the shipped table's), or on a GPU with a table of its
  own (``table_for_device``) that table's, unless ``forced``."""
  t = _device_table(_current_device_kind())
  return _forced.kinds(ENABLED[op] if t is None else enabled_of(t)[op])


def _on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (where the kernel was timed)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  cc = getattr(dev, "compute_capability", None)
  return dev.platform == "gpu" and cc is not None and str(cc).startswith("9.")


def kernels_usable() -> bool:
  """A GPU backend, ``lowbit_jax.kernels`` enabled (``set_enabled``) and a
  Hopper device: where the dispatchers of this kernel and of
  ``gpu_dequantize`` may send a call to a kernel at all."""
  try:
    if jax.default_backend() != "gpu":
      return False
  except RuntimeError:
    return False
  from lowbit_jax import kernels  # pylint: disable=g-import-not-at-top
  return kernels._enabled and _on_hopper()  # pylint: disable=protected-access


def dispatch(x, spec: QuantSpec, *, values: bool = False, grad: bool = False,
             key=None, amax=None, amin=None, tensor_amax=None, scale=None,
             clip=None, zero_point=None) -> bool:
  """Whether ``lowbit_jax.quantize`` (``values=False``) or ``fake_quant``'s
  forward (``values=True``; ``grad=True`` under differentiation) should run
  the kernel.

  True only on a GPU backend, for a format enabled for that operation
  (``ENABLED["quantize" | "fake_quant" | "fake_quant_grad"]``), bfloat16 or
  float32 ``x`` of rank >= 2 whose shape fits ``default_config``, round to
  nearest, ``clip_ratio`` 1, no padding, and none of the range keywords
  (NVFP4 may take ``tensor_amax``).
  """
  if grad and not values:
    raise ValueError("dispatch: grad=True is fake_quant's forward under "
                     "differentiation; pass values=True with it")
  kinds = _enabled_kinds(
      "quantize" if not values else "fake_quant_grad" if grad else "fake_quant")
  if not kinds or not kernels_usable():
    return False
  if any(v is not None for v in (key, amax, amin, scale, clip, zero_point)):
    return False
  if spec.rounding != "nearest" or spec.clip_ratio != 1.0 or spec.pad:
    return False
  shape = tuple(jnp.shape(x))
  dt = jnp.result_type(x)
  if len(shape) < 2 or dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    return False
  kd = _kind(spec, len(shape))
  if kd is None or kd.kind not in kinds:
    return False
  if tensor_amax is not None and kd.scale != "nvfp4":
    return False
  if kd.scale == "row":
    k, n = math.prod(shape[:-1]), shape[-1]
  else:
    k, n = shape[0], math.prod(shape[1:])
  return default_config(kd.kind, k, n, dt, values) is not None

