"""Dequantize of QArrays with codes packed along axis 0, in Mosaic GPU (issue 12).

``lowbit_jax.dequantize(q)`` of a ``[K, ...]`` QArray whose codes are packed
along axis 0 and whose scales are shared along axis 0 (blocks of 16..128 rows,
MX and NVFP4 blocks, NF4's blocks, per-channel and per-tensor scales) is, on
XLA's GPU path, one or two fusions that write the float array at 53-76% of the
memory roofline on the H200 (``benchmarks/primitives_h200_s25.md``: MXFP4 93 us
and int4 per channel 81 us for bf16 8192x8192, where ``x * 2`` takes 81). The
kernel here reads each ``[tile_k, tile_n]`` tile's codes once (TMA into shared
memory, ``Config.stages`` in flight) with the scales of the CTA's rows, and for
each chunk of rows (``Config.rows``; every load of a chunk before any
arithmetic or store, as in ``gpu_quantize``):

1. unpacks the codes (``QArray``'s layout: a packing unit's codes little-endian
   in its bytes, e.g. two int4 rows to a byte, eight int3 rows to three);
2. decodes them to float32 with ``decode_codes`` (integers by sign extension,
   8-bit floats by the hardware convert of their float8 storage, narrower
   floats from their sign / exponent / mantissa fields, binary and ternary
   by a tree of selects; with ``Config.lut``, formats of 8 to 32 codes (NF4,
   E2M1, 5-bit floats) by one load an element from their value table in
   shared memory, copied in with the scales: ``_lut_decode``);
3. subtracts the zero point and multiplies by the scale exactly as core's
   ``dequantize`` does (E8M0 scales as two power-of-two factors, a tensor scale
   split as ``_split_pow2`` splits it), saturates at the float32 range, and
   writes the original dtype through TMA.

Per-row scales of the last axis (``<format>_row``, 8-bit codes: int8, fp8
e4m3/e5m2, uint8 without a zero point) are the layout of the real-mode
matmul's weights (``ops.prepare_weight``: ``[N, K]``, one scale per output
channel, shared along K), which XLA's path dequantizes in a fusion of its own
before the GEMM at large M. There the CTA's scales come in as one float per
row (1-D TMA copies of up to 256) and each row is multiplied by its own scalar,
loaded from shared memory.

The output equals ``lowbit_jax.dequantize(q)`` bit for bit (NaN payloads
aside); ``decode_codes`` (core's ``_cast.decode_arith``) is checked against
each format's own table on every code of every registered format, and the kernel against the jnp path in the Mosaic GPU
interpreter (tests/kernels/test_gpu_dequantize.py) and on the GPU.

``dispatch(q)`` is what ``lowbit_jax.dequantize`` asks on every call: the
kernel runs only on a Hopper GPU, for a format ``ENABLED`` lists (those an H200
run of ``experiments/bench_gpu_dequantize.py --write_configs`` measured bit-exact
and at least 2% faster than XLA's path), where the shape fits the tiling. The
jnp path stays the reference and is what runs on CPU and TPU.
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
from lowbit_jax.core._qarray import QArray, code_dtype, pack_unit
from lowbit_jax.formats import BlockFormat, FloatFormat, IntFormat, LookupFormat
from lowbit_jax.kernels import _gpu_common as common
from lowbit_jax.kernels import gpu_quantize

_F32_MAX = np.float32(np.finfo(np.float32).max)
MAX_SMEM_BYTES = 227 * 1024  # what one Hopper CTA may use
_OUT_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of the dequantizer.

  Attributes:
    tile_n: columns per tile (128 or 256; a TMA box is at most 256 wide and a
      row splits evenly over the warpgroup's 128 threads).
    tile_k: output rows per pipeline step (a multiple of the packing unit and
      of the scale block, or a divisor of the block; at most 256).
    k_per_cta: rows each CTA walks (a multiple of ``tile_k``; the scale block
      divides it or it divides the block). The grid is ``(N / tile_n, K /
      k_per_cta)``.
    stages: code tiles in flight (TMA loads ahead of the compute), and output
      tiles in flight to global memory.
    rows: output rows decoded per chunk (loads of the chunk first; 0: as many
      as give each thread 16 elements), cut to a divisor of the rows a scale
      row covers within a step and a multiple of the packing unit.
    lut: decode each code by one load from the format's value table in shared
      memory (``_lut_decode``; formats of 8 to 32 codes: ``lut_applies``)
      instead of arithmetic.
  """
  tile_n: int = 256
  tile_k: int = 64
  k_per_cta: int = 512
  stages: int = 2
  rows: int = 0
  lut: bool = False


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the kernel computes for one QArray layout (static)."""
  kind: str          # the id, e.g. "int4_g128", "mxfp4", "int8_pc", "nf4_g64"
  fmt: object        # the element (storage) Format
  bits: int          # stored bits per code
  code_dtype: str    # dtype of q.codes
  scale: str         # "float" | "e8m0"
  scale_dtype: str   # dtype of q.scale
  block: int         # rows per scale block (K for per-channel / per-tensor)
  zp_dtype: Optional[str]  # dtype of q.zero_point, None when symmetric
  has_t: bool        # a tensor scale above the block scales
  out_dtype: str     # what the kernel writes
  val_dtype: str     # q.dtype: values round to it first (dequantize's result)
  row_scale: bool = False  # one scale per row of the last axis ("_row")


def _kn(plan: _Plan, shape) -> tuple[int, int]:
  """The ``[k, n]`` the kernel sees: rows along which scales are shared (or,
  per row, every axis but the last) by the flattened rest."""
  if plan.row_scale:
    return math.prod(shape[:-1]), shape[-1]
  return shape[0], math.prod(shape[1:])


# ---------------------------------------------------------------------------
# Code -> value: core's gather-free decoder (``_cast.decode_arith``), which a
# kernel body can run (it can neither gather nor capture array constants).

decode_codes = _cast.decode_arith


def _decode_row(plan: _Plan, raw):
  """float32 values of one stored row (8-bit codes in their storage dtype)."""
  dt = jnp.dtype(plan.code_dtype)
  if jnp.issubdtype(dt, jnp.floating):  # float8 storage: the hardware convert
    return raw.astype(jnp.float32)
  # int8 storage sign-extends; decode_codes' sign test then leaves it alone.
  return decode_codes(raw.astype(jnp.int32), plan.fmt)


_LUT_WORDS = 32  # Config.lut's table: 32 float32, 128 bytes


def _lut_table(plan: _Plan) -> Optional[np.ndarray]:
  """float32 values of every code of a format of 8 to 32 codes (NF4's 16
  codebook entries, E2M1's 16 floats, E3M1 / E2M2's 32), padded to 32 with the
  last (core's decode clamps a code past a short codebook to its last entry):
  the table ``Config.lut`` decodes from; None for other formats. Decoding
  NF4 arithmetically takes 15 selects and 4 bit tests an element (the kernel
  at 55% of the roofline, 0.90x XLA's gather, in
  benchmarks/gpu_dequantize_h200_s29a.md) and E2M1 about 10 operations; a
  load from 32 words has no bank conflicts (each word its own bank), and 32
  float32 are the 128 bytes Mosaic GPU copies at least (one per thread)."""
  fmt = plan.fmt
  if isinstance(fmt, LookupFormat) and 8 <= len(fmt.table) <= _LUT_WORDS:
    vals = np.asarray(fmt.table, np.float32)
  elif isinstance(fmt, FloatFormat) and 3 <= fmt.bits <= 5:
    vals = np.asarray(fmt.decode_table(), np.float32)
  else:
    return None
  out = np.full(_LUT_WORDS, vals[-1], np.float32)
  out[:len(vals)] = vals
  return out


def lut_applies(plan: _Plan) -> bool:
  """Whether ``Config.lut`` can decode ``plan``'s format."""
  return _lut_table(plan) is not None


def _lut_decode(raw, lut_ref, tn: int, interp: bool):
  """``table[raw]`` for a uint32 ``[tn]`` row of codes (in range) with the
  table in shared memory ``lut_ref``: one shared-memory load an element."""
  return common.smem_gather(lut_ref, raw.astype(jnp.int32), jnp.float32, tn,
                            interp)


# ---------------------------------------------------------------------------
# Which QArrays the kernel takes


def _kind_name(q: QArray) -> str:
  spec = q.spec
  name = spec.format.name
  if isinstance(spec.format, BlockFormat):
    return name
  if spec.group_size is not None:
    return f"{name}_g{spec.group_size}"
  if getattr(spec.format, "default_block", None):
    return f"{name}_g{spec.format.default_block}"
  return f"{name}_pt" if spec.axis is None else f"{name}_pc"


def plan_of(q: QArray) -> tuple[Optional[_Plan], str]:
  """``(plan, "")`` where the kernel computes ``dequantize(q)`` exactly,
  else ``(None, why not)``."""
  if not isinstance(q, QArray):
    return None, f"not a QArray: {type(q).__name__}"
  spec = q.spec
  if len(q.shape) < 2:
    return None, "rank below 2"
  if spec.tile is not None:
    return None, "tiled scales"
  if q.dtype not in _OUT_DTYPES:
    return None, f"output dtype {q.dtype}"
  fmt = spec.storage_format
  if not isinstance(fmt, (IntFormat, FloatFormat, LookupFormat)) or fmt.bits > 8:
    return None, f"element format {fmt.name}"
  if q.code_order != "natural":
    return None, f"codes in {q.code_order!r} order"
  if q.pack_axis != 0 and fmt.bits != 8:  # 8-bit codes are not packed
    return None, f"codes packed along axis {q.pack_axis}, not 0"
  if isinstance(fmt, FloatFormat) and fmt.special == "e8m0":
    return None, "E8M0 elements"
  uc, ub = pack_unit(fmt.bits)
  want = jnp.dtype(code_dtype(fmt)) if uc == 1 else jnp.dtype(jnp.uint8)
  if jnp.dtype(q.codes.dtype) != want:
    return None, f"codes stored as {q.codes.dtype}, not {want.name}"
  k = q.shape[0]
  if k % uc or q.codes.shape != (k // uc * ub,) + tuple(q.shape[1:]):
    return None, "padded codes"
  sd = jnp.dtype(q.scale.dtype)
  if spec.scale_dtype == "e8m0":
    if sd != jnp.dtype(jnp.uint8):
      return None, f"E8M0 scales stored as {sd}"
    scale = "e8m0"
  elif sd.name in ("float32", "bfloat16", "float16", "float8_e4m3fn",
                   "float8_e5m2"):
    scale = "float"
  else:
    return None, f"scale dtype {sd}"
  if q.scale.size == 1:  # per tensor
    srows = 1
  elif (q.scale.ndim == len(q.shape)
        and tuple(q.scale.shape[1:]) == tuple(q.shape[1:])):
    srows = q.scale.shape[0]
  elif (q.scale.ndim == len(q.shape) and q.scale.shape[-1] == 1
        and tuple(q.scale.shape[:-1]) == tuple(q.shape[:-1])):
    return _row_plan(q, fmt, scale, sd)
  else:
    return None, (f"scale shape {tuple(q.scale.shape)}: blocked along more "
                  "than axis 0, and not one scale per row of the last axis")
  if k % srows:
    return None, "scale blocks do not tile axis 0"
  zp = q.zero_point
  if zp is not None and zp.shape != q.scale.shape:
    return None, f"zero point shape {zp.shape}"
  if q.tensor_scale is not None and q.tensor_scale.size != 1:
    return None, "tensor scale not a scalar"
  return _Plan(kind=_kind_name(q), fmt=fmt, bits=fmt.bits,
               code_dtype=jnp.dtype(q.codes.dtype).name, scale=scale,
               scale_dtype=sd.name, block=k // srows,
               zp_dtype=None if zp is None else jnp.dtype(zp.dtype).name,
               has_t=q.tensor_scale is not None, out_dtype=q.dtype,
               val_dtype=q.dtype), ""


def _row_plan(q: QArray, fmt, scale: str, sd) -> tuple[Optional[_Plan], str]:
  """The per-row plan (one scale per row of the last axis), or why not."""
  if fmt.bits != 8:
    return None, (f"per-row scales of {fmt.bits}-bit codes (the per-row "
                  "kernel takes 8-bit codes, which are not packed)")
  if scale != "float":
    return None, "per-row E8M0 scales"
  if q.zero_point is not None:
    return None, "per-row scales with a zero point"
  if q.tensor_scale is not None:
    return None, "per-row scales under a tensor scale"
  return _Plan(kind=f"{fmt.name}_row", fmt=fmt, bits=8,
               code_dtype=jnp.dtype(q.codes.dtype).name, scale=scale,
               scale_dtype=sd.name, block=1, zp_dtype=None, has_t=False,
               out_dtype=q.dtype, val_dtype=q.dtype, row_scale=True), ""


def supports(q: QArray) -> bool:
  """Whether the kernel computes ``dequantize(q)`` exactly (any backend; the
  dispatcher adds the device and the measured table: ``dispatch``)."""
  return plan_of(q)[0] is not None


def reference(q: QArray, dtype=None) -> jax.Array:
  """The pure-jnp reference: core's ``dequantize`` path (in ``dtype``)."""
  out = _q.dequantize_jnp(q)
  return out if dtype is None else out.astype(dtype)


def kind_of(q: QArray) -> Optional[str]:
  """The kernel's id for ``q`` (e.g. "int4_g128", "mxfp4", "int8_pc"), or
  None where the kernel does not take it."""
  p, _ = plan_of(q)
  return None if p is None else p.kind


# ---------------------------------------------------------------------------
# Tiling


TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "gpu_dequantize_configs.json")


@functools.lru_cache(maxsize=None)
def _table() -> dict:
  """The measured tilings and the enabled formats
  (``gpu_dequantize_configs.json`` beside this file, written by
  ``experiments/bench_gpu_dequantize.py --write_configs``); empty where there
  is none."""
  if not os.path.exists(TABLE_PATH):
    return {}
  with open(TABLE_PATH) as f:
    return json.load(f)


def _smem(plan: _Plan, n_srows: int, cfg: Config) -> int:
  uc, ub = pack_unit(plan.bits)
  out_b = jnp.dtype(plan.out_dtype).itemsize
  per = cfg.tile_k // uc * ub * cfg.tile_n + cfg.tile_k * cfg.tile_n * out_b
  if plan.row_scale:  # one float per row
    return cfg.stages * per + cfg.k_per_cta * jnp.dtype(plan.scale_dtype).itemsize + 1024
  side = n_srows * cfg.tile_n * jnp.dtype(plan.scale_dtype).itemsize
  if plan.zp_dtype is not None:
    side += n_srows * cfg.tile_n * jnp.dtype(plan.zp_dtype).itemsize
  if cfg.lut:
    side += 4 * _LUT_WORDS
  return cfg.stages * per + side + 1024


def _scale_rows(plan: _Plan, cfg: Config) -> int:
  """Scale rows one CTA holds."""
  return max(1, cfg.k_per_cta // plan.block)


def check_config(plan: _Plan, k: int, n: int, cfg: Config) -> None:
  """Raises ValueError where ``cfg`` does not tile ``[k, n]`` for ``plan``."""
  uc, _ = pack_unit(plan.bits)
  bs = plan.block
  if cfg.tile_n not in (128, 256):
    raise ValueError(f"tile_n must be 128 or 256, got {cfg.tile_n}")
  if cfg.tile_k > 256 or cfg.tile_k % max(uc, 8):
    raise ValueError(f"tile_k={cfg.tile_k} must be at most 256 and a multiple "
                     f"of {max(uc, 8)}")
  if cfg.tile_k % bs and bs % cfg.tile_k:
    raise ValueError(f"tile_k={cfg.tile_k} and the scale block {bs} must "
                     "divide one another")
  if cfg.k_per_cta % cfg.tile_k or k % cfg.k_per_cta or n % cfg.tile_n:
    raise ValueError(f"[{k}, {n}] does not fit the tiling {cfg}: K must be a "
                     "multiple of k_per_cta (itself of tile_k) and N of tile_n")
  if cfg.k_per_cta % bs and bs % cfg.k_per_cta:
    raise ValueError(f"k_per_cta={cfg.k_per_cta} and the scale block {bs} must "
                     "divide one another")
  if not plan.row_scale and _scale_rows(plan, cfg) > 256:
    raise ValueError(f"k_per_cta={cfg.k_per_cta} spans more than 256 scale "
                     "rows (a TMA box); lower it")
  if cfg.stages < 1:
    raise ValueError(f"stages must be at least 1, got {cfg.stages}")
  if cfg.lut and not lut_applies(plan):
    raise ValueError(f"lut=True decodes formats of 8 to 32 codes from a table; "
                     f"{plan.kind} has {2 ** plan.bits} codes: use lut=False")
  need = _smem(plan, _scale_rows(plan, cfg), cfg)
  if need > MAX_SMEM_BYTES:
    raise ValueError(f"the tiling {cfg} needs {need} bytes of shared memory, "
                     f"more than {MAX_SMEM_BYTES}; lower tile_k or stages")


def _fits(plan: _Plan, k: int, n: int, cfg: Config) -> bool:
  try:
    check_config(plan, k, n, cfg)
  except ValueError:
    return False
  return True


def heuristic_config(plan: _Plan, k: int, n: int) -> Optional[Config]:
  """A tiling from the kernel's limits alone (None where none fits): 64 rows
  a step (the block where that is longer, up to 128), 256 columns (128 where
  that does not fit), two stages, and as many steps per CTA as keep at least
  4 CTAs per SM on 132 SMs."""
  uc, _ = pack_unit(plan.bits)
  bs = plan.block
  for tk in (64, 128, 32, 16, 256):
    if (tk % bs == 0 or bs % tk == 0) and tk % max(uc, 8) == 0 and k % tk == 0:
      break
  else:
    return None
  for tn in (256, 128):
    if n % tn:
      continue
    cfg = Config(tile_n=tn, tile_k=tk, k_per_cta=tk, stages=2)
    if _fits(plan, k, n, cfg):
      break
  else:
    return None
  trial = dataclasses.replace(
      cfg, k_per_cta=tk * gpu_quantize._steps_per_cta(k // tk, n // tn))  # pylint: disable=protected-access
  return trial if _fits(plan, k, n, trial) else cfg


def candidate_configs(plan: _Plan, k: int, n: int, limit: int = 4) -> list:
  """Tilings worth timing (the heuristic's first): the table's entry, three
  stages, twice the rows a step, one stage, the other ``tile_n``, longer
  row chunks; only those that fit."""
  base = heuristic_config(plan, k, n)
  if base is None:
    return []
  out = [base]
  rep = dataclasses.replace
  more = [_table_config(plan, k, n)]
  if lut_applies(plan):  # the table decode against the arithmetic one
    more.append(rep(base, lut=not base.lut))
  more += [rep(base, stages=3),
           rep(base, tile_k=2 * base.tile_k, k_per_cta=2 * base.k_per_cta),
           rep(base, stages=1), rep(base, tile_n=384 - base.tile_n),
           rep(base, rows=2 * (base.rows or 8))]
  for c in more:
    if len(out) >= limit:
      break
    if c is not None and c not in out and _fits(plan, k, n, c):
      out.append(c)
  return out


def _table_config(plan: _Plan, k: int, n: int) -> Optional[Config]:
  ent = _table().get("entries", {}).get(plan.kind)
  if not ent:
    return None
  cfg = common.config_from_entry(Config, ent)
  return cfg if _fits(plan, k, n, cfg) else None


def default_config(plan: _Plan, k: int, n: int) -> Optional[Config]:
  """The forced tiling (``forced``), else the table's, else the heuristic's."""
  forced_cfg = _forced.config(plan.kind)
  if forced_cfg is not None and _fits(plan, k, n, forced_cfg):
    return forced_cfg
  return _table_config(plan, k, n) or heuristic_config(plan, k, n)


# ---------------------------------------------------------------------------
# The kernel


@functools.lru_cache(maxsize=None)
def _build(plan: _Plan, k: int, n: int, cfg: Config, interpret):
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  tn, tk, kc, st = cfg.tile_n, cfg.tile_k, cfg.k_per_cta, cfg.stages
  uc, ub = pack_unit(plan.bits)
  bs = plan.block
  crow = tk // uc * ub              # stored code rows a step
  steps = kc // tk
  n_sr = _scale_rows(plan, cfg)     # scale rows a CTA holds
  span = min(bs, tk)                # output rows one scale row covers in a step
  nb = tk // span                   # scale rows a step uses
  rch = cfg.rows or max(1, 16 * 128 // tn)
  rch = math.gcd(rch, span)
  rch = rch * uc // math.gcd(rch, uc)  # uc divides span, so rch still does
  out_dt = jnp.dtype(plan.out_dtype)
  val_dt = jnp.dtype(plan.val_dtype)
  has_zp = plan.zp_dtype is not None
  mask = np.uint32((1 << plan.bits) - 1)
  interp = interpret is not None

  def scale_factors(s_smem, z_smem, scal, r):
    """(zero point, f1, f2) of scale row ``r`` (f2 None: one factor)."""
    zp = z_smem[r].astype(jnp.float32) if has_zp else None
    raw = s_smem[r]
    if plan.scale == "e8m0":
      code = raw.astype(jnp.int32)
      f1, f2 = _q._pow2_pair(code - 127)  # pylint: disable=protected-access
      if plan.has_t:
        f1 = scal[0] * f1
      f1 = jnp.where(code == 255, np.float32(np.nan), f1)
      return zp, f1, f2
    s = raw.astype(jnp.float32)
    if plan.has_t:  # core: (tn * s) then 2**p (_split_pow2)
      return zp, scal[1] * s, jnp.full(s.shape, scal[2])
    return zp, s, None

  def unpack(c_smem, u):
    """The uc code rows of packing unit ``u`` (stored rows, then uint32)."""
    if uc == 1:
      return [c_smem[u]]
    word = None
    for j in range(ub):
      b = c_smem[u * ub + j].astype(jnp.uint32)
      b = b if j == 0 else b << np.uint32(8 * j)
      word = b if word is None else word | b
    return [(word >> np.uint32(plan.bits * i)) & mask if i else word & mask
            for i in range(uc)]

  def do_span(c_smem, v_smem, r0, n_rows, factors, lut_smem=None):
    """Rows ``r0 .. r0 + n_rows`` of a step: ``factors`` is (zero point, f1,
    f2) for all of them, or per row (per-row scales) a function of the row
    within the step; every load of a chunk comes before its stores."""

    def chunk(ci, carry):
      base = r0 + ci * rch
      raws = []
      for u in range(rch // uc):
        raws += unpack(c_smem, (base // uc) + u)
      outs = []
      for j, raw in enumerate(raws):
        zp, f1, f2 = factors(base + j) if callable(factors) else factors
        v = (_lut_decode(raw, lut_smem, tn, interp) if cfg.lut
             else _decode_row(plan, raw))
        if zp is not None:
          v = v - zp
        v = v * f1
        if f2 is not None:
          v = v * f2
        o = jnp.clip(v, -_F32_MAX, _F32_MAX).astype(val_dt)
        outs.append(o if val_dt == out_dt else o.astype(out_dt))
      for j, o in enumerate(outs):
        v_smem[base + j] = o
      return carry

    lax.fori_loop(0, n_rows // rch, chunk, 0)

  def body(*refs):
    refs = list(refs)
    c_gmem, s_gmem = refs.pop(0), refs.pop(0)
    z_gmem = refs.pop(0) if has_zp else None
    t_gmem = refs.pop(0) if plan.has_t else None
    lut_gmem = refs.pop(0) if cfg.lut else None
    o_gmem = refs.pop(0)
    c_smem, v_smem, s_smem = refs.pop(0), refs.pop(0), refs.pop(0)
    z_smem = refs.pop(0) if has_zp else None
    lut_smem = refs.pop(0) if cfg.lut else None
    bar, s_bar = refs.pop(0), refs.pop(0)
    ni = lax.axis_index("n")
    ki = lax.axis_index("k")
    col = pl.ds(pl.multiple_of(ni * tn, tn), tn)
    row0 = ki * kc
    srow0 = row0 // bs
    if plan.row_scale:  # the CTA's kc scales, in 1-D boxes of at most 256
      for c0 in range(0, kc, 256):
        w = min(256, kc - c0)
        plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(row0 + c0, w)],
                                s_smem.at[pl.ds(c0, w)], s_bar.at[0])
    else:
      plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(srow0, n_sr), col], s_smem,
                              s_bar.at[0])
    if has_zp:
      plgpu.copy_gmem_to_smem(z_gmem.at[pl.ds(srow0, n_sr), col], z_smem,
                              s_bar.at[0])
    if cfg.lut:  # the value table, waited for with the scales
      plgpu.copy_gmem_to_smem(lut_gmem, lut_smem, s_bar.at[0])
    scal = None
    if plan.has_t:
      scal = tuple(t_gmem[i] for i in range(3))

    def fetch(i, slot):
      plgpu.copy_gmem_to_smem(
          c_gmem.at[pl.ds((row0 + i * tk) // uc * ub, crow), col],
          c_smem.at[slot], bar.at[slot])

    def step(i, slot):
      @pl.when(i == 0)
      def _():
        plgpu.barrier_wait(s_bar.at[0])  # the scale rows
      cs, vs = c_smem.at[slot], v_smem.at[slot]
      if plan.row_scale:  # row r of the step times the scale of its row
        do_span(cs, vs, 0, tk, lambda r: (
            None, s_smem[i * tk + r].astype(jnp.float32), None))
      for b in range(0 if plan.row_scale else nb):
        r = (i * tk + b * span) // bs  # the scale row, relative to the CTA's
        do_span(cs, vs, b * span, span, scale_factors(s_smem, z_smem, scal, r),
                lut_smem)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(vs, o_gmem.at[pl.ds(row0 + i * tk, tk), col],
                              commit_group=False)

    common.tma_stream(steps, st, bar, fetch, step)

  s_shape = (kc,) if plan.row_scale else (n_sr, tn)
  s_copies = (-(-kc // 256) if plan.row_scale else 1 + has_zp) + cfg.lut
  scratch = [plgpu.SMEM((st, crow, tn), jnp.dtype(plan.code_dtype)),
             plgpu.SMEM((st, tk, tn), out_dt),
             plgpu.SMEM(s_shape, jnp.dtype(plan.scale_dtype))]
  if has_zp:
    scratch.append(plgpu.SMEM((n_sr, tn), jnp.dtype(plan.zp_dtype)))
  if cfg.lut:
    scratch.append(plgpu.SMEM((_LUT_WORDS,), jnp.float32))
  scratch += [plgpu.Barrier(num_arrivals=1, num_barriers=st),
              plgpu.Barrier(num_arrivals=s_copies, num_barriers=1)]
  extra = {} if interpret is None else {"interpret": interpret}
  kern = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((k, n), out_dt),
                      scratch_types=scratch, grid=(n // tn, k // kc),
                      grid_names=("n", "k"), **extra)
  return kern


def _tensor_scalars(t):
  """float32[3]: the tensor scale, then core's ``_split_pow2`` of it (``tn``
  and ``2**p``)."""
  t = jnp.asarray(t, jnp.float32).reshape(())
  tn, _, up = _q._split_pow2(t)  # pylint: disable=protected-access
  return jnp.stack([t, tn, up])


def dequantize(q: QArray, *, dtype=None, config: Optional[Config] = None,
               interpret=False) -> jax.Array:
  """``lowbit_jax.dequantize(q)`` in one pass over the codes (same array).

  Args:
    q: a QArray with codes packed along axis 0 and scales shared along axis 0
      (rank >= 2, dims after the first flattened), or with 8-bit codes and
      one scale per row of the last axis (dims before it flattened);
      ``plan_of(q)`` says which.
    dtype: what to write (bfloat16, float16 or float32; default ``q.dtype``):
      ``dequantize(q).astype(dtype)`` bit for bit, in one pass (the real-mode
      matmul asks for its compute dtype, e.g. a float32-weight QArray in a
      bf16 model, instead of writing float32 and converting).
    config: tiling (default: ``default_config``).
    interpret: False (compile for a Hopper GPU), True or an
      ``InterpretGPUParams`` (the Mosaic GPU interpreter, on CPU).

  Returns:
    The float array ``lowbit_jax.dequantize(q)`` returns, bit for bit.

  Raises:
    ValueError: a QArray the kernel does not take, or a tiling that does not
      fit; the message says which.
  """
  params = common.interpret_params(interpret)
  plan, why = plan_of(q)
  if plan is None:
    raise ValueError(f"the GPU dequantizer does not take this QArray ({why}): "
                     f"{q!r}; use lowbit_jax.dequantize")
  if dtype is not None:
    name = jnp.dtype(dtype).name
    if name not in _OUT_DTYPES:
      raise ValueError(f"dtype must be one of {_OUT_DTYPES}, got {name}")
    plan = dataclasses.replace(plan, out_dtype=name)
  k, n = _kn(plan, q.shape)
  cfg = config or default_config(plan, k, n)
  if cfg is None:
    raise ValueError(f"no tiling fits [{k}, {n}] for {plan.kind} (N must be a "
                     "multiple of 128)")
  check_config(plan, k, n, cfg)
  kern = _build(plan, k, n, cfg, params)
  uc, ub = pack_unit(plan.bits)
  srows = k // plan.block
  out_dt = jnp.dtype(plan.out_dtype)

  def rows(a):  # scales / zero points as [scale rows, n] (per row: [k])
    if plan.row_scale:
      return a.reshape(k)
    return jnp.broadcast_to(a.reshape(1, 1), (1, n)) if a.size == 1 else (
        a.reshape(srows, n))

  def kernel(qq):
    args = [qq.codes.reshape(k // uc * ub, n), rows(qq.scale)]
    if plan.zp_dtype is not None:
      args.append(rows(qq.zero_point))
    if plan.has_t:
      args.append(_tensor_scalars(qq.tensor_scale))
    if cfg.lut:
      args.append(jnp.asarray(_lut_table(plan)))
    out = kern(*args) if params is None else common.run_interpreted(kern, *args)
    return out.reshape(qq.shape)

  # Under vmap (the kernel has no batching rule) the jnp path runs, vmapped:
  # the same numbers.
  leaves, tree = jax.tree.flatten(q)
  f = custom_batching.custom_vmap(
      lambda *ls: kernel(jax.tree.unflatten(tree, ls)))

  @f.def_vmap
  def _vmap_rule(axis_size, in_batched, *ls):
    ls = [a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
          for a, b in zip(ls, in_batched)]
    ref = lambda *xs: reference(jax.tree.unflatten(tree, xs), out_dt)  # noqa: E731
    return jax.vmap(ref)(*ls), True

  return f(*leaves)


# ---------------------------------------------------------------------------
# Dispatch from lowbit_jax.dequantize

_forced = common.ForcedDispatch()


def forced(kinds, configs: Optional[dict] = None):
  """Within the block, dispatch sends ``kinds`` (ids, or ``()`` for none) to
  the kernel instead of ``ENABLED``; ``configs`` (``{kind: Config}``) replaces
  ``default_config``'s tiling where it fits. For benchmarks and tests.
  Thread-local."""
  return _forced.forced(kinds, configs)


def _enabled_of(table: dict) -> frozenset:
  e = table.get("enabled", ())
  if not isinstance(e, (list, tuple)):
    raise ValueError(f"{TABLE_PATH}: 'enabled' must be a list of format ids, "
                     f"got {type(e).__name__}")
  return frozenset(e)


# The formats an H200 run measured bit-exact and at least 2% faster than
# XLA's path (``gpu_dequantize_configs.json``; BUILD.md has the runs).
ENABLED: frozenset = _enabled_of(_table())


def dispatch(q: QArray) -> bool:
  """Whether ``lowbit_jax.dequantize(q)`` should run the kernel: on a Hopper
  GPU, for a format enabled (``ENABLED`` or ``forced``) whose shape fits a
  tiling."""
  kinds = _forced.kinds(ENABLED)
  if not kinds or not gpu_quantize.kernels_usable():
    return False
  plan, _ = plan_of(q)
  if plan is None or plan.kind not in kinds:
    return False
  return default_config(plan, *_kn(plan, q.shape)) is not None
