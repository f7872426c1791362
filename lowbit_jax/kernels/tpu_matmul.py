"""Low-bit matmul kernels for TPU, written with Pallas for Mosaic TPU.

Three kernels behind one entry point, following the contract in
``lowbit_jax/kernels/_api.py`` (weight stored K-major ``[N, K]``):

* W8A16: int8 weight codes x bfloat16 activations, one scale per output channel
  or per group of ``g`` along K.
* W4A16: int4 weight codes (two per byte along K, low nibble = even k, two's
  complement) x bfloat16 activations, per channel or groups of ``g`` along K.
* W8A8: int8 activation codes with per-token scales x int8 weight codes with
  per-channel scales; int8 x int8 products are accumulated in int32 on the MXU
  and both scales are applied once, in the epilogue.

All three run on a ``(M / bm, N / bn, K / bk)`` grid: M and N blocks are
"parallel", the K block is the innermost "arbitrary" (sequential) dimension and
accumulates into a VMEM scratch (float32 for weight-only, int32 for W8A8). The
output block is written once, after the last K step.

How the weight-only kernels keep the products exact. Integer codes are exactly
representable in bfloat16, so ``x_bf16 * code`` is exact in the MXU's float32
accumulator; scales are therefore never folded into the bfloat16 weight (which
would round every dequantized weight to 8 mantissa bits). Per-channel scales
multiply the finished accumulator. Group scales multiply a partial product per
group: for a group that spans whole 128-lane segments this is a dot over that
segment; for groups narrower than a lane tile (int8 groups of ``g < 128``
lanes, int4 groups, which cover ``g / 2`` bytes per nibble stream, of
``g < 256``) the 128-lane activation segment is replicated ``s = 128 / lanes``
times (int8 g=32: 4; int4 g=32: 8) along the sublane (M) axis with every copy
masked to one group, so that one MXU dot per segment yields every group's partial
product. The weight segment is pushed to the MXU once; the LHS grows by ``s``,
which costs little while ``bm * s <= 128`` (decode) and multiplies the MXU work
by ``s`` for large M (prefill), where this has not been measured.

int4 unpacking happens in the kernel with shifts on the bytes (viewed as int8
and sign-extended to int32): ``(b << 28) >> 28`` is the even-k nibble and
``b >> 4`` the odd-k one. Rather than interleaving the two nibble streams along
lanes (a costly relayout on TPU), the activation is split once, outside the
kernel, into its even and odd K columns, and the kernel adds the two dots.

Layout work done by XLA outside the kernel, per call: activations are padded to a
multiple of ``bm`` rows (and, for int4, split into even/odd columns); weight
scales are cast to float32 and, for groups, transposed to ``[K / g, N]`` so that
a group's scales form one row that broadcasts over the ``[bm, bn]`` partial
product. The packed weight itself is never copied.

Numerics: the result equals the float32 reference up to float32 rounding of the
accumulation order (bit-exact when every partial sum is representable, see the
tests); W8A8 accumulates exactly in int32 (for K < 2**17).

Only the interpret mode (``interpret=True``, Pallas' TPU interpreter, which
emulates TPU semantics on CPU) and lowering to Mosaic have been exercised: no
TPU was available when these kernels were written.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem

__all__ = ["supports", "unsupported_reason", "reference", "matmul",
           "default_blocks"]

_LANES = 128
# Rows of one native (sublane, lane) memory tile, by element size in bytes.
_SUBLANES = {4: 8, 2: 16, 1: 32}
_OUT_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32,
               "float16": jnp.float16}
_DEFAULT_BM = (256, 128)
_DEFAULT_BN = (512, 256, 128)
_DEFAULT_BK = (1024, 512, 256, 128)
_PART_BYTES = 2 * 2**20


def _kind(problem: MatmulProblem) -> Optional[str]:
  """Returns "w8a16", "w4a16" or "w8a8" for the formats handled here, else None."""
  if problem.x_format is None and problem.w_format == "int8":
    return "w8a16"
  if problem.x_format is None and problem.w_format == "int4":
    return "w4a16"
  if problem.x_format == "int8" and problem.w_format == "int8":
    return "w8a8"
  return None


def _k_quantum(problem: MatmulProblem) -> int:
  """The K block must be a multiple of this (lane tiling and whole groups)."""
  # int4: each K block holds bk / 2 bytes per row, which must fill lane tiles.
  quantum = 2 * _LANES if problem.w_format == "int4" else _LANES
  g = problem.w_block
  if isinstance(g, int):
    quantum = max(quantum, g)  # g and quantum are both powers of two.
  return quantum


def unsupported_reason(problem: MatmulProblem) -> Optional[str]:
  """Says why the TPU kernels do not handle ``problem``.

  Args:
    problem: the static description of the matmul.

  Returns:
    ``None`` when :func:`matmul` handles the problem, otherwise a sentence that
    names the first requirement it fails.
  """
  if problem.backend != "tpu":
    return (f"backend is {problem.backend!r}; these are Mosaic TPU kernels "
            "(backend='tpu')")
  if problem.w_order != "natural":
    return (f"weight codes in {problem.w_order!r} order (the Hopper kernel's); "
            "ops.set_code_order(params, 'natural') for these kernels")
  kind = _kind(problem)
  if kind is None:
    return (f"w_format={problem.w_format!r} with x_format={problem.x_format!r} "
            "is not handled; supported: int8 or int4 weights with bfloat16 "
            "activations, and int8 x int8 (W8A8)")
  if problem.out_dtype not in _OUT_DTYPES:
    return (f"out_dtype {problem.out_dtype!r} is not one of "
            f"{tuple(_OUT_DTYPES)}")
  if kind == "w8a8":
    if problem.x_dtype != "int8":
      return f"W8A8 needs int8 activation codes, got x_dtype={problem.x_dtype!r}"
    if problem.x_block is not None:
      return (f"W8A8 supports per-token activation scales only "
              f"(x_block=None), got x_block={problem.x_block!r}")
    if problem.w_block is not None:
      return (f"W8A8 supports per-channel weight scales only (w_block=None), "
              f"got w_block={problem.w_block!r}")
    if problem.k >= _W8A8_MAX_K:
      return (f"K={problem.k} could overflow W8A8's int32 accumulator (exact for "
              f"K < {_W8A8_MAX_K}: K products of at most 128 * 128)")
  else:
    if problem.x_dtype != "bfloat16":
      return (f"weight-only kernels take bfloat16 activations, got "
              f"x_dtype={problem.x_dtype!r}; cast x to bfloat16 first")
    g = problem.w_block
    if isinstance(g, tuple):
      return f"2-D weight scale tiles {g!r} are not supported; use w_block=g"
    if g is not None:
      if not isinstance(g, int) or g < 32 or g & (g - 1):
        return f"group size must be a power of two >= 32, got w_block={g!r}"
      if problem.k % g:
        return f"group size {g} does not divide K={problem.k}"
  if problem.n % _LANES:
    return f"N={problem.n} is not a multiple of {_LANES} (TPU lane tiling)"
  quantum = _k_quantum(problem)
  if problem.k % quantum:
    return (f"K={problem.k} is not a multiple of {quantum} (lane tiling of "
            f"{problem.w_format} codes and whole groups per K block)")
  return None


# W8A8 sums K int8 x int8 products (|p| <= 2**14) in int32: exact below 2**17.
_W8A8_MAX_K = 2 ** 17


def supports(problem: MatmulProblem) -> bool:
  """Whether :func:`matmul` handles ``problem``.

  True only for ``backend == "tpu"``, int8/int4 weight-only with bfloat16
  activations (per channel, or groups of a power of two >= 32 along K) and
  W8A8 int8 (per token x per channel), with N a multiple of 128 and K a
  multiple of 128 (int8) or 256 (int4) and of the group size. Any M is handled
  (rows are padded). :func:`unsupported_reason` says why a problem is refused.
  The claim is about the tiling the kernels handle; their speed has not been
  measured on a TPU.

  Args:
    problem: the static description of the matmul.

  Returns:
    True if the kernels handle the problem.
  """
  return unsupported_reason(problem) is None


def _splits(problem: MatmulProblem) -> int:
  """How many masked copies of a 128-lane activation segment a K step stacks."""
  g = problem.w_block
  if not isinstance(g, int):
    return 1
  group_lanes = g if problem.w_format == "int8" else g // 2
  return max(_LANES // group_lanes, 1)


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _x_sublanes(problem: MatmulProblem) -> int:
  return _SUBLANES[1] if _kind(problem) == "w8a8" else _SUBLANES[2]


def default_blocks(problem: MatmulProblem) -> tuple[int, int, int]:
  """The ``(block_m, block_n, block_k)`` that :func:`matmul` uses by default.

  Args:
    problem: a problem that :func:`supports` accepts.

  Returns:
    Block sizes: ``block_m`` the smallest multiple of the activation's row tile
    (16 for bfloat16, 32 for int8) covering M if M <= 256, else 256 or 128,
    whichever pads M less; ``block_n`` the largest of 512/256/128 dividing N,
    halved while the stacked group partial products of one segment
    (``block_m * 128 / g`` rows for ``g < 128``) would pass 2 MiB;
    ``block_k`` the largest of 1024/512/256/128 dividing K that holds whole
    groups and whole lane tiles.

  Raises:
    ValueError: if the problem is not supported.
  """
  reason = unsupported_reason(problem)
  if reason is not None:
    raise ValueError(f"tpu_matmul does not support this problem: {reason}")
  sub = _x_sublanes(problem)
  if problem.m <= _DEFAULT_BM[0]:
    bm = _round_up(problem.m, sub)
  else:
    bm = min(_DEFAULT_BM, key=lambda b: (_round_up(problem.m, b), -b))
  bn = next(b for b in _DEFAULT_BN if problem.n % b == 0)
  # Keep the stacked partial products of one segment (bm * splits rows) to
  # 2 MiB of float32, so that large M with small groups stays within VMEM.
  while bm * _splits(problem) * bn * 4 > _PART_BYTES and bn > _LANES:
    bn //= 2
  quantum = _k_quantum(problem)
  bk = next((b for b in _DEFAULT_BK if b % quantum == 0 and problem.k % b == 0),
            quantum)
  return bm, bn, bk


def _blocks(problem, block_m, block_n, block_k) -> tuple[int, int, int]:
  """Default blocks, overridden by and checked against the user's choice."""
  bm, bn, bk = default_blocks(problem)
  sub = _x_sublanes(problem)
  if block_m is not None:
    if block_m <= 0 or block_m % sub:
      raise ValueError(f"block_m={block_m} must be a positive multiple of {sub} "
                       f"(row tile of {problem.x_dtype} activations)")
    bm = block_m
  if block_n is not None:
    if block_n <= 0 or block_n % _LANES or problem.n % block_n:
      raise ValueError(f"block_n={block_n} must be a multiple of {_LANES} that "
                       f"divides N={problem.n}")
    bn = block_n
  if block_k is not None:
    quantum = _k_quantum(problem)
    if block_k <= 0 or block_k % quantum or problem.k % block_k:
      raise ValueError(f"block_k={block_k} must be a multiple of {quantum} that "
                       f"divides K={problem.k}")
    bk = block_k
  return bm, bn, bk


def _expand_scale(scale: jax.Array, block, rows: int, cols: int) -> jax.Array:
  """Broadcasts per-row / per-group / per-tile scales to ``[rows, cols]``."""
  scale = scale.astype(jnp.float32)
  if block is None:
    return jnp.broadcast_to(scale.reshape(rows, 1), (rows, cols))
  if isinstance(block, int):
    return jnp.repeat(scale, block, axis=1, total_repeat_length=cols)
  tr, tc = block
  return jnp.repeat(jnp.repeat(scale, tr, axis=0, total_repeat_length=rows),
                    tc, axis=1, total_repeat_length=cols)


def reference(operands: MatmulOperands, problem: MatmulProblem) -> jax.Array:
  """The pure-jnp definition of the quantized matmul, independent of the kernels.

  Decodes the weight codes to float32 (int4 nibbles by masking and a
  two's-complement fix-up, interleaved back to K order), multiplies by the
  broadcast scales, does the same for W8A8 activations, and contracts in float32
  at HIGHEST precision. Handles int8/int4 weights with per-channel, group or
  2-D tile scales, and int8 activations with per-token or 1 x g scales, on any
  backend.

  Args:
    operands: the arrays, laid out as ``lowbit_jax/kernels/_api.py`` describes.
    problem: the static description of the matmul.

  Returns:
    ``y[M, N] = x @ W.T`` in ``problem.out_dtype``.

  Raises:
    ValueError: for weight or activation formats other than int8/int4/int8.
  """
  if problem.w_format not in ("int8", "int4"):
    raise ValueError(f"tpu_matmul.reference handles int8/int4 weights, got "
                     f"w_format={problem.w_format!r}")
  if problem.x_format not in (None, "int8"):
    raise ValueError(f"tpu_matmul.reference handles weight-only or int8 "
                     f"activations, got x_format={problem.x_format!r}")
  _check_operands(operands, problem)
  m, n, k = problem.m, problem.n, problem.k
  if problem.w_format == "int4":
    packed = operands.w_codes.astype(jnp.int32)
    nibbles = jnp.stack([packed & 0xF, (packed >> 4) & 0xF], axis=-1)
    nibbles = nibbles.reshape(n, k)
    w = jnp.where(nibbles >= 8, nibbles - 16, nibbles).astype(jnp.float32)
  else:
    w = operands.w_codes.astype(jnp.float32)
  w = w * _expand_scale(operands.w_scale, problem.w_block, n, k)
  x = operands.x.astype(jnp.float32)
  if problem.x_format == "int8":
    x = x * _expand_scale(operands.x_scale, problem.x_block, m, k)
  y = jnp.matmul(x, w.T, precision=lax.Precision.HIGHEST)
  return y.astype(_OUT_DTYPES.get(problem.out_dtype, problem.out_dtype))


def _expect(name: str, array, shape, dtypes) -> None:
  if array is None:
    raise ValueError(f"operands.{name} is missing; expected shape {shape}")
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f"operands.{name} has shape {tuple(array.shape)}, "
                     f"expected {tuple(shape)}")
  if jnp.dtype(array.dtype) not in [jnp.dtype(d) for d in dtypes]:
    raise TypeError(f"operands.{name} has dtype {array.dtype}, expected one of "
                    f"{[jnp.dtype(d).name for d in dtypes]}")


def _scale_shape(block, rows: int, cols: int) -> tuple[int, int]:
  if block is None:
    return (rows, 1)
  if isinstance(block, int):
    if cols % block:
      raise ValueError(f"group size {block} does not divide {cols}")
    return (rows, cols // block)
  tr, tc = block
  if rows % tr or cols % tc:
    raise ValueError(f"tile {block} does not divide the shape {(rows, cols)}")
  return (rows // tr, cols // tc)


def _check_operands(operands: MatmulOperands, problem: MatmulProblem) -> None:
  """Checks shapes and dtypes of the operands against the problem."""
  m, n, k = problem.m, problem.n, problem.k
  scale_dtypes = (jnp.float32, jnp.bfloat16)
  if problem.w_format == "int4":
    if k % 2:
      raise ValueError(f"int4 weights need an even K, got K={k}")
    _expect("w_codes", operands.w_codes, (n, k // 2), (jnp.uint8,))
  else:
    _expect("w_codes", operands.w_codes, (n, k), (jnp.int8,))
  _expect("w_scale", operands.w_scale, _scale_shape(problem.w_block, n, k),
          scale_dtypes)
  if problem.x_format == "int8":
    _expect("x", operands.x, (m, k), (jnp.int8,))
    _expect("x_scale", operands.x_scale, _scale_shape(problem.x_block, m, k),
            scale_dtypes)
  else:
    _expect("x", operands.x, (m, k), (problem.x_dtype,))


def _dot_nt(a: jax.Array, b: jax.Array, acc_dtype) -> jax.Array:
  """``a[m, c] @ b[n, c].T``: contracts the last axes, as the MXU takes K-major."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=acc_dtype)


def _unpack_int4(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Signed nibbles of int8-viewed bytes: (even-k low nibbles, odd-k high)."""
  wide = packed.astype(jnp.int32)  # Sign-extends the byte.
  low = jnp.right_shift(jnp.left_shift(wide, 28), 28)
  high = jnp.right_shift(wide, 4)
  return low, high


def _weight_only_kernel(*refs, bits: int, group_lanes: Optional[int],
                        segment: int, splits: int, bm: int):
  """One (i, j, k) grid step of the W8A16 / W4A16 kernel.

  Refs: activations (one stream for int8; even-k and odd-k columns for int4),
  weight codes, scales (``[1, bn]`` per channel or ``[groups_per_block, bn]``),
  output, float32 accumulator scratch.
  """
  if bits == 8:
    x_refs, (w_ref, s_ref, o_ref, acc_ref) = refs[:1], refs[1:]
  else:
    x_refs, (w_ref, s_ref, o_ref, acc_ref) = refs[:2], refs[2:]
  k_step = pl.program_id(2)

  @pl.when(k_step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def weight_streams(lanes: slice) -> list[jax.Array]:
    """bfloat16 weight codes of the columns ``lanes``, one per x stream."""
    codes = w_ref[:, lanes]
    if bits == 8:
      return [codes.astype(jnp.bfloat16)]
    return [c.astype(jnp.bfloat16) for c in _unpack_int4(codes)]

  width = w_ref.shape[1]
  if group_lanes is None:
    # Per channel: one dot per stream; the scale multiplies the final sum.
    ws = weight_streams(slice(0, width))
    part = _dot_nt(x_refs[0][...], ws[0], jnp.float32)
    if bits == 4:
      part += _dot_nt(x_refs[1][...], ws[1], jnp.float32)
    acc_ref[...] += part
  else:
    total = None
    for t in range(width // segment):
      lanes = slice(t * segment, (t + 1) * segment)
      ws = weight_streams(lanes)
      part = None
      for x_ref, w in zip(x_refs, ws):
        xt = x_ref[:, lanes]
        if splits > 1:
          # One masked copy of the segment per group, stacked along M.
          xt = xt.astype(jnp.float32)
          group = jnp.right_shift(lax.broadcasted_iota(jnp.int32, xt.shape, 1),
                                  group_lanes.bit_length() - 1)
          xt = jnp.concatenate(
              [jnp.where(group == q, xt, 0.0) for q in range(splits)],
              axis=0).astype(jnp.bfloat16)
        p = _dot_nt(xt, w, jnp.float32)
        part = p if part is None else part + p
      for q in range(splits):
        row = t * splits + q
        term = part[q * bm:(q + 1) * bm] * s_ref[row:row + 1, :]
        total = term if total is None else total + term
    acc_ref[...] += total

  @pl.when(k_step == pl.num_programs(2) - 1)
  def _store():
    acc = acc_ref[...]
    if group_lanes is None:
      acc = acc * s_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


def _w8a8_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, acc_ref):
  """One (i, j, k) grid step of the W8A8 kernel (int32 MXU accumulation)."""
  k_step = pl.program_id(2)

  @pl.when(k_step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += _dot_nt(x_ref[...], w_ref[...], jnp.int32)

  @pl.when(k_step == pl.num_programs(2) - 1)
  def _store():
    y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


def _interpret_arg(interpret: bool):
  """Pallas' TPU interpreter where this jax has one, else the generic one."""
  if not interpret:
    return False
  params = getattr(pltpu, "InterpretParams", None)
  return params() if params is not None else True


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnames=("problem", "blocks", "interpret"))
def _matmul(operands: MatmulOperands, problem: MatmulProblem,
            blocks: tuple[int, int, int], interpret: bool) -> jax.Array:
  """Builds and runs the pallas_call (shapes already checked)."""
  bm, bn, bk = blocks
  m, n, k = problem.m, problem.n, problem.k
  mp = _round_up(m, bm)
  grid = (mp // bm, n // bn, k // bk)
  out_dtype = _OUT_DTYPES[problem.out_dtype]
  out_shape = jax.ShapeDtypeStruct((mp, n), out_dtype)
  out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
  x = operands.x
  if mp != m:
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
  kind = _kind(problem)
  out_bytes = mp * n * jnp.dtype(out_dtype).itemsize
  common = dict(
      out_shape=out_shape, grid=grid, out_specs=out_spec,
      compiler_params=_compiler_params(),
      interpret=_interpret_arg(interpret))

  if kind == "w8a8":
    x_scale = operands.x_scale.astype(jnp.float32)
    if mp != m:
      x_scale = jnp.pad(x_scale, ((0, mp - m), (0, 0)))
    w_scale = operands.w_scale.astype(jnp.float32).reshape(1, n)
    call = pl.pallas_call(
        _w8a8_kernel,
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
            pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
        ],
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * n * k, transcendentals=0,
            bytes_accessed=mp * k * grid[1] + n * k * grid[0] + out_bytes),
        **common)
    y = call(x, operands.w_codes, x_scale, w_scale)
    return y[:m] if mp != m else y

  bits = 8 if kind == "w8a16" else 4
  kw = bk if bits == 8 else bk // 2  # columns of the stored weight per K block
  x_spec = pl.BlockSpec((bm, kw), lambda i, j, kk: (i, kk))
  if bits == 8:
    xs = [x]
    codes = operands.w_codes
  else:
    xs = [x[:, 0::2], x[:, 1::2]]
    codes = lax.bitcast_convert_type(operands.w_codes, jnp.int8)
  g = problem.w_block
  if g is None:
    scale = operands.w_scale.astype(jnp.float32).reshape(1, n)
    s_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
    group_lanes, segment, splits = None, kw, 1
  else:
    groups_per_block = bk // g
    # [N, K/g] -> [K/bk, groups per K block, N]: a group's scales form a row.
    scale = operands.w_scale.astype(jnp.float32).T.reshape(
        k // bk, groups_per_block, n)
    s_spec = pl.BlockSpec((pl.squeezed, groups_per_block, bn),
                          lambda i, j, kk: (kk, 0, j))
    group_lanes = g if bits == 8 else g // 2
    segment = max(group_lanes, _LANES)
    splits = _splits(problem)  # At most 8 (int4, g = 32).
  kernel = functools.partial(_weight_only_kernel, bits=bits,
                             group_lanes=group_lanes, segment=segment,
                             splits=splits, bm=bm)
  call = pl.pallas_call(
      kernel,
      in_specs=[x_spec] * len(xs) + [
          pl.BlockSpec((bn, kw), lambda i, j, kk: (j, kk)), s_spec],
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      cost_estimate=pl.CostEstimate(
          flops=2 * mp * n * k * splits, transcendentals=0,
          bytes_accessed=(2 * mp * k * grid[1] + n * kw * grid[0]
                          + 4 * scale.size * grid[0] + out_bytes)),
      **common)
  y = call(*xs, codes, scale)
  return y[:m] if mp != m else y


def matmul(operands: MatmulOperands, problem: MatmulProblem, *,
           interpret: bool = False, block_m: Optional[int] = None,
           block_n: Optional[int] = None,
           block_k: Optional[int] = None) -> jax.Array:
  """Runs the TPU kernel for ``problem``: ``y[M, N] = x @ W.T`` with scales.

  Args:
    operands: the arrays, laid out as ``lowbit_jax/kernels/_api.py`` describes
      (int8 ``[N, K]`` or packed uint8 ``[N, K // 2]`` codes, float32 or
      bfloat16 scales ``[N, 1]`` / ``[N, K // g]``; W8A8: int8 ``x`` and
      ``x_scale [M, 1]``).
    problem: the static description; must satisfy :func:`supports`.
    interpret: run Pallas' TPU interpreter (``pltpu.InterpretParams()``)
      instead of compiling with Mosaic; this works on CPU and emulates TPU
      semantics (block tiling, VMEM scratch, sequential K steps).
    block_m: rows per block; a multiple of 16 (bfloat16 activations) or 32
      (int8); M is padded up to a multiple of it.
    block_n: output columns per block; a multiple of 128 dividing N.
    block_k: contraction length per grid step; divides K, a multiple of 128
      (int8) or 256 (int4) and of the group size.

  Returns:
    ``[M, N]`` array of ``problem.out_dtype``.

  Raises:
    ValueError: if the problem is not supported (the message says why), the
      operand shapes do not match it, or a block size is invalid.
    TypeError: if an operand has the wrong dtype.
  """
  reason = unsupported_reason(problem)
  if reason is not None:
    raise ValueError(f"tpu_matmul does not support this problem: {reason}. "
                     "Check supports(problem) and use reference() otherwise.")
  _check_operands(operands, problem)
  blocks = _blocks(problem, block_m, block_n, block_k)
  return _matmul(operands, problem=problem, blocks=blocks,
                 interpret=bool(interpret))
