"""QArray: packed codes + scales + zero points, a pytree that works under jit.

Storage (``QArray.codes``), along ``pack_axis`` (the spec's axis, else the last):

* 8-bit formats: one code per byte, as ``int8`` (signed ints), ``uint8``
  (unsigned ints, lookup formats, fp6 codes would not land here) or the
  jax float8 dtype of the format (fp8 formats, so XLA and kernels read them
  natively).
* 1, 2 and 4-bit codes: 8, 4 and 2 codes per byte (``uint8``), element ``i`` of a
  byte in bits ``[b*i, b*(i+1))``: the first element in the low bits.
* 3-bit codes: 8 codes in 3 bytes; 6-bit codes (FP6): 4 codes in 3 bytes; the
  same little-endian bit order across the 24-bit word.
* 5 and 7-bit codes: one per byte; 9 to 16-bit codes: one ``uint16`` each.

``QArray.code_order`` says how the packed bytes are ordered along the pack
axis: ``"natural"`` (the layout above) or, for 4-bit codes packed along the
last axis in runs of 32, ``"wgmma"``: the bytes of every 16-byte run
transposed as a 4 x 4 grid (``wgmma_byte_order``), the order in which the
Hopper weight-only kernel's threads load their WGMMA fragments with no
shuffles (``lowbit_jax.kernels.gpu_weight_only``), or, for E2M1 codes (fp4,
MXFP4, NVFP4), ``"wgmma_e2m1"``: the ``"wgmma"`` bytes with the 32 bits of
every 4-byte word then permuted (``split_bits``) so that the kernel
turns each pair of codes into its bf16 pair with a rotate and a mask
instead of table lookups, and for signed int4 codes ``"wgmma_int4"``: each
code pair in nibbles ``i`` and ``i + 4`` of its word (``INT4_SPLIT_POS``), a
shift from the conversion's input. ``dequantize`` and every non-kernel path
read any order; ``ops.set_code_order`` converts.

Scales have one entry per block (``[d0 / b0, d1 / b1, ...]``): float32, bfloat16,
float16, ``float8_e4m3fn``, or E8M0 as ``uint8`` biased exponents (255 = NaN).
Zero points (asymmetric) are ``uint8`` (``uint16`` above 8 bits) codes on the
same grid as the elements.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax.core._spec import TENSOR, QuantSpec
from lowbit_jax.formats import FloatFormat, Format, IntFormat

_PACK = {1: (8, 1), 2: (4, 1), 3: (8, 3), 4: (2, 1), 6: (4, 3)}  # bits: (codes, bytes)


def storage_bits(fmt: Format) -> int:
  """Bits one element occupies in a QArray."""
  b = fmt.bits
  if b in _PACK or b == 8:
    return b
  return 8 if b < 8 else 16


def pack_unit(bits: int) -> tuple[int, int]:
  """(codes, bytes) of one packing unit for ``bits``-wide codes."""
  if bits in _PACK:
    return _PACK[bits]
  return (1, 1) if bits <= 8 else (1, 2)


def codes_unit(bits: int) -> tuple[int, int]:
  """(codes, codes-array elements) of one packing unit: ``pack_unit``'s bytes
  for packed codes, one element a code otherwise (uint8 up to 8 bits, one
  uint16 from 9 to 16: ``pack_unit`` counts those as 2 bytes)."""
  n_codes, n_bytes = pack_unit(bits)
  return (n_codes, n_bytes) if n_codes > 1 else (1, 1)


def normalize_axis(axis, ndim: int):
  """Non-negative axis (or tuple); 'tensor' and None pass through."""
  if axis is None or axis == TENSOR:
    return axis
  axes = axis if isinstance(axis, tuple) else (axis,)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for a {ndim}-d array")
    out.append(a % ndim)
  return tuple(out) if isinstance(axis, tuple) else out[0]


def block_shape(spec: QuantSpec, shape: tuple) -> tuple:
  """Elements per scale along each dim (a dim's full length where it is shared)."""
  ndim = len(shape)
  if spec.tile is not None:
    if ndim < 2:
      raise ValueError(f"tile={spec.tile} needs at least 2 dims, got shape {shape}")
    return (1,) * (ndim - 2) + spec.tile
  ax = normalize_axis(spec.axis, ndim)
  if ax is None or ax == TENSOR:
    return tuple(shape)
  if isinstance(ax, tuple):
    return tuple(d if i in ax else 1 for i, d in enumerate(shape))
  b = [1] * ndim
  b[ax] = spec.group_size if spec.group_size is not None else shape[ax]
  return tuple(b)


def expand_grid(s, shape: tuple, block: tuple) -> jax.Array:
  """A per-block array broadcast to ``shape``: along each dim its entry i
  covers elements ``[i * b, (i + 1) * b)`` for that dim's block size ``b``
  (``block``, from ``block_shape``; a padded last block is cut short). The
  block sizes must be given: ``ceil(d / n)`` is not the group size when the
  last group is padded (176 rows in groups of 128 are 128 + 48, not 88 + 88).
  """
  s = jnp.asarray(s, jnp.float32)
  if s.ndim == 0:
    return s
  for i, (n, d, b) in enumerate(zip(s.shape, shape, block)):
    if n not in (1, d):
      s = jnp.repeat(s, b, axis=i)
      s = lax.slice_in_dim(s, 0, d, axis=i)
  return s


def default_pack_axis(spec: QuantSpec, ndim: int) -> int:
  ax = normalize_axis(spec.axis, ndim)
  if isinstance(ax, int) and spec.tile is None:
    return ax
  return ndim - 1


def code_dtype(fmt: Format, symmetric: bool = True):
  """dtype of unpacked one-code-per-element storage (8-bit and wider formats)."""
  del symmetric
  if isinstance(fmt, FloatFormat) and fmt.bits == 8 and fmt.ml_dtype is not None:
    return jnp.dtype(fmt.ml_dtype)
  if isinstance(fmt, IntFormat) and fmt.bits == 8:
    return jnp.int8 if fmt.signed else jnp.uint8
  return jnp.uint8 if fmt.bits <= 8 else jnp.uint16


def pack(codes: jax.Array, fmt: Format, axis: int) -> jax.Array:
  """Packs uint32 codes (already padded to whole units along ``axis``)."""
  bits = fmt.bits
  n_codes, n_bytes = pack_unit(bits)
  if n_codes == 1:
    dt = code_dtype(fmt)
    if bits == 8:
      return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), dt)
    return codes.astype(dt)
  # Along the axis in place (a reshape, no transpose): [.., L, ..] ->
  # [.., L / n, n, ..] -> words -> [.., L / n, n_bytes, ..] -> [.., L / n * n_bytes, ..].
  axis = axis % codes.ndim
  shp = codes.shape
  c = codes.reshape(shp[:axis] + (shp[axis] // n_codes, n_codes) + shp[axis + 1:])
  # An OR of shifted slices, not a sum over the unit axis: elementwise, so XLA
  # emits a loop fusion (a reduce fusion of the whole quantizer runs many
  # times slower on CPU). The codes are < 2**bits, so OR and sum agree.
  # Each byte is built from the codes that overlap it only (the bytes of the
  # word ``OR_i c_i << bits * i``): XLA fuses the quantizer into every byte's
  # expression, so a byte taken from the whole word would compute all the
  # unit's codes once per byte (3x the work for 6- and 3-bit codes, which
  # made FP6 quantize twice as slow on CPU).
  cs = [lax.index_in_dim(c, i, axis + 1, keepdims=False).astype(jnp.uint32)
        for i in range(n_codes)]
  planes = []
  for j in range(n_bytes):
    acc = None
    for i in range(n_codes):
      lo = bits * i - 8 * j  # code i's lowest bit, relative to byte j
      if lo >= 8 or lo + bits <= 0:
        continue
      term = cs[i] << lo if lo >= 0 else cs[i] >> -lo
      acc = term if acc is None else acc | term
    planes.append(acc & 0xFF)
  byts = jnp.stack(planes, axis=axis + 1)
  out_len = (shp[axis] // n_codes) * n_bytes
  return byts.reshape(shp[:axis] + (out_len,) + shp[axis + 1:]).astype(jnp.uint8)


def unpack(packed: jax.Array, fmt: Format, axis: int) -> jax.Array:
  """Inverse of ``pack``: uint32 codes."""
  bits = fmt.bits
  n_codes, n_bytes = pack_unit(bits)
  if n_codes == 1:
    if packed.dtype.itemsize == 1:
      return jax.lax.bitcast_convert_type(packed, jnp.uint8).astype(jnp.uint32)
    return packed.astype(jnp.uint32)
  axis = axis % packed.ndim
  shp = packed.shape
  p = packed.astype(jnp.uint32).reshape(
      shp[:axis] + (shp[axis] // n_bytes, n_bytes) + shp[axis + 1:])
  word = jnp.zeros(p.shape[:axis + 1] + p.shape[axis + 2:], jnp.uint32)
  for j in range(n_bytes):
    word = word | (lax.index_in_dim(p, j, axis + 1, keepdims=False) << (8 * j))
  sh_shape = [1] * p.ndim
  sh_shape[axis + 1] = n_codes
  shifts = (jnp.arange(n_codes, dtype=jnp.uint32) * bits).reshape(sh_shape)
  c = (jnp.expand_dims(word, axis + 1) >> shifts) & ((1 << bits) - 1)
  return c.reshape(shp[:axis] + (shp[axis] // n_bytes * n_codes,) + shp[axis + 1:])


CODE_ORDERS = ("natural", "wgmma", "wgmma_e2m1", "wgmma_int4")
WGMMA_RUN_BYTES = 16  # the "wgmma" orders move bytes within runs of this many


def wgmma_byte_order(codes: jax.Array, axis: int = -1) -> jax.Array:
  """Natural <-> ``"wgmma"`` order of packed bytes along ``axis``.

  Transposes the bytes of every 16-byte run as a 4 x 4 grid: byte ``4q + i``
  of a run goes to ``4i + q``. It is its own inverse. For 4-bit codes, byte
  ``4q + i`` of the result holds elements ``8i + 2q`` and ``8i + 2q + 1`` of
  the run's 32, so a 32-bit word ``q`` holds the four element pairs a
  WGMMA A fragment's thread ``q`` of a row quad takes from 32 columns. A
  byte may be any unit: ``axis`` need not be the last (e.g. ``[rows, K // 2,
  2]`` nibbles, ``axis=1``).

  Raises:
    ValueError: ``axis`` is not a multiple of 16 long.
  """
  ax = axis % codes.ndim if codes.ndim else 0
  if codes.ndim < 1 or codes.shape[ax] % WGMMA_RUN_BYTES:
    raise ValueError(f"the wgmma code order works on runs of 16 bytes (32 "
                     f"4-bit codes) along axis {axis}, whose length must be a "
                     f"multiple of 16; got codes of shape {tuple(codes.shape)}")
  shp = codes.shape
  runs = codes.reshape(shp[:ax] + (shp[ax] // WGMMA_RUN_BYTES, 4, 4) + shp[ax + 1:])
  return jnp.swapaxes(runs, ax + 1, ax + 2).reshape(shp)


# The "wgmma_e2m1" order: where each bit of a "wgmma" word goes.
#
# A 32-bit word of "wgmma"-ordered codes holds four code pairs, pair i in
# byte i (its low nibble the pair's first code), and the kernel makes one
# bf16 pair of each. An E2M1 code ``s e1 e0 m`` read with ``e1 e0`` as the
# low two bits of a bf16 exponent field and ``m`` as the top mantissa bit
# (bits 8, 7, 6 of a 16-bit lane, the sign in bit 15) is the bf16 of its
# value times 2**-126, the code 0.5 (``e = 0, m = 1``) included, which lands on
# the bf16 subnormal 2**-127; one exact multiply by 2**126 restores the value.
# ``E2M1_SPLIT_POS[i][lane][b]`` is the position of bit ``b`` (m, e0, e1, s)
# of pair ``i``'s code ``lane`` in the permuted word, chosen so that pair 0 is
# ``word & 0x81C081C0``, pairs 1 and 2 the same mask after a rotation right
# by 6 and 12 bits, and pair 3 ``rotr(word, 2) & 0x81808180 | rotr(word, 10) &
# 0x00400040`` (no four rotations of the mask tile the 32 bits, an
# exhaustive search found, so the last pair takes two): nine integer
# instructions for eight codes, against about seventeen for the table decode
# of the "wgmma" order (benchmarks/decode_sass.md).
E2M1_SPLIT_POS = (((6, 7, 8, 15), (22, 23, 24, 31)),
                  ((12, 13, 14, 21), (28, 29, 30, 5)),
                  ((18, 19, 20, 27), (2, 3, 4, 11)),
                  ((16, 9, 10, 17), (0, 25, 26, 1)))
E2M1_SPLIT_MASK = 0x81C081C0  # the bits of a bf16 pair an E2M1 pair sets
# The "wgmma_int4" order: the "wgmma" word's code pair i in nibbles i and
# i + 4 (bits 4i..4i+3 of each 16-bit lane), so that one shift right by 4i
# puts both codes of the pair in their lanes' low bits, where the int4
# conversion's mask and magic number take them (no byte permute).
INT4_SPLIT_POS = tuple(tuple(tuple(4 * (i + 4 * lane) + b for b in range(4))
                             for lane in range(2)) for i in range(4))
_SPLIT_POS = {"wgmma_e2m1": E2M1_SPLIT_POS, "wgmma_int4": INT4_SPLIT_POS}
# The orders whose words' bits are permuted (``split_bits``) on top of the
# "wgmma" byte order.
SPLIT_ORDERS = tuple(_SPLIT_POS)


def _split_moves(pos, inverse: bool) -> dict:
  """``{shift: [(source bit, destination bit), ...]}`` of the bit permutation
  ``pos`` (or its inverse), grouped by the left shift that moves each bit."""
  moves = {}
  for i, lanes in enumerate(pos):
    for lane, bits in enumerate(lanes):
      for b, p in enumerate(bits):
        src, dst = 8 * i + 4 * lane + b, p
        if inverse:
          src, dst = dst, src
        moves.setdefault(dst - src, []).append((src, dst))
  return moves


def _permute_words(w: jax.Array, pos, inverse: bool) -> jax.Array:
  """The permutation ``pos`` (``E2M1_SPLIT_POS`` or ``INT4_SPLIT_POS``) of
  every uint32 in ``w``: one mask and shift per distinct distance a bit
  moves."""
  out = jnp.zeros_like(w)
  for shift, pairs in sorted(_split_moves(pos, inverse).items()):
    mask = np.uint32(sum(1 << s for s, _ in pairs))
    part = w & mask
    out = out | (part << np.uint32(shift) if shift >= 0
                 else part >> np.uint32(-shift))
  return out


def split_bits(codes: jax.Array, order: str, axis: int = -1, *,
               inverse: bool = False) -> jax.Array:
  """``"wgmma"`` -> ``order`` (``"wgmma_e2m1"`` or ``"wgmma_int4"``) of packed
  bytes along ``axis`` (``inverse``: back): the order's permutation of the
  bits of every 4 consecutive bytes, read as a little-endian 32-bit word.

  Raises:
    ValueError: ``axis`` is not a multiple of 4 bytes long.
  """
  pos = _SPLIT_POS[order]
  ax = axis % codes.ndim if codes.ndim else 0
  if codes.ndim < 1 or codes.shape[ax] % 4:
    raise ValueError(f"the {order} code order permutes the bits of 4-byte "
                     f"words along axis {axis}, whose length must be a multiple "
                     f"of 4; got codes of shape {tuple(codes.shape)}")
  shp = codes.shape
  c = jnp.moveaxis(codes, ax, -1).astype(jnp.uint32)
  c = c.reshape(c.shape[:-1] + (c.shape[-1] // 4, 4))
  words = (c[..., 0] | c[..., 1] << 8 | c[..., 2] << 16 | c[..., 3] << 24)
  words = _permute_words(words, pos, inverse)
  byts = jnp.stack([(words >> np.uint32(8 * j)) & 0xFF for j in range(4)],
                   axis=-1).astype(jnp.uint8)
  byts = byts.reshape(byts.shape[:-2] + (byts.shape[-2] * 4,))
  return jnp.moveaxis(byts, -1, ax).reshape(shp)


def to_code_order(codes: jax.Array, order: str, axis: int = -1) -> jax.Array:
  """Packed 4-bit codes in natural order -> ``order`` (``CODE_ORDERS``)."""
  if order == "natural":
    return codes
  out = wgmma_byte_order(codes, axis)
  if order in _SPLIT_POS:
    out = split_bits(out, order, axis)
  elif order != "wgmma":
    raise ValueError(f"code order must be one of {CODE_ORDERS}, got {order!r}")
  return out


def from_code_order(codes: jax.Array, order: str, axis: int = -1) -> jax.Array:
  """Packed 4-bit codes in ``order`` -> natural order (``to_code_order``'s
  inverse)."""
  if order == "natural":
    return codes
  if order in _SPLIT_POS:
    codes = split_bits(codes, order, axis, inverse=True)
  elif order != "wgmma":
    raise ValueError(f"code order must be one of {CODE_ORDERS}, got {order!r}")
  return wgmma_byte_order(codes, axis)


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: packed codes, scales, zero points and the static spec.

  Attributes:
    codes: packed element codes (see the module docstring).
    scale: one scale per block (its dtype is the spec's scale dtype; E8M0 as
      uint8 exponents).
    zero_point: asymmetric zero points (None when symmetric).
    tensor_scale: float32 scalar above the block scales (NVFP4), else None.
    spec: the QuantSpec (axis normalized to non-negative).
    shape: logical shape (before padding).
    dtype: name of the original dtype, which ``dequantize`` returns.
    pack_axis: the axis codes are packed along.
    code_order: ``"natural"``, ``"wgmma"``, ``"wgmma_e2m1"`` or
      ``"wgmma_int4"`` (see the module docstring).
  """
  codes: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array]
  tensor_scale: Optional[jax.Array]
  spec: QuantSpec
  shape: tuple
  dtype: str
  pack_axis: int
  code_order: str = "natural"

  def __post_init__(self):
    if self.code_order not in CODE_ORDERS:
      raise ValueError(f"QArray code_order must be one of {CODE_ORDERS}, got "
                       f"{self.code_order!r}")

  def natural_codes(self) -> jax.Array:
    """The packed codes in natural order (``codes`` itself unless reordered)."""
    return from_code_order(self.codes, self.code_order)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """True storage size in bytes: codes + scales + zero points + tensor scale."""
    leaves = [self.codes, self.scale, self.zero_point, self.tensor_scale]
    return int(sum(np.dtype(l.dtype).itemsize * math.prod(l.shape)
                   for l in leaves if l is not None))

  @property
  def bits_per_element(self) -> float:
    return 8.0 * self.nbytes / self.size

  def dequantize(self) -> jax.Array:
    from lowbit_jax.core._quantize import dequantize  # pylint: disable=g-import-not-at-top
    return dequantize(self)

  def __repr__(self) -> str:
    order = "" if self.code_order == "natural" else f", code_order={self.code_order}"
    def leaf(a):   # (a tree.map may have put anything in a data field)
      if hasattr(a, "dtype") and hasattr(a, "shape"):
        return f"{a.dtype}{list(a.shape)}"
      return repr(a)
    return (f"QArray(shape={self.shape}, dtype={self.dtype}, format="
            f"{self.spec.format.name}, codes={leaf(self.codes)}"
            f", scale={leaf(self.scale)}{order})")


# The array fields of a QArray (its pytree children), in order.
FIELDS = ("codes", "scale", "zero_point", "tensor_scale")

jax.tree_util.register_dataclass(
    QArray, data_fields=list(FIELDS),
    meta_fields=["spec", "shape", "dtype", "pack_axis", "code_order"])
