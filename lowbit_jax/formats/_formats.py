"""Number formats as frozen, hashable data.

A format says how ONE element is coded; scales, grouping and rounding live in
``lowbit_jax.QuantSpec``. Four element families cover every format we know of:

* ``IntFormat``: two's complement or unsigned integers, optionally read as fixed
  point (MXINT8 elements are int8 with 6 fraction bits).
* ``FloatFormat``: any ExMy float. One generic emulation (``lowbit_jax.cast``) agrees
  bit for bit with every ml_dtypes type and also covers formats ml_dtypes lacks.
* ``LookupFormat``: a sorted codebook of up to 256 values (NF4, binary, ternary,
  or any list a user gives).
* ``BlockFormat``: an element format, a scale format and a block size (MX, NVFP4,
  or any user-defined block format).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import ml_dtypes
import numpy as np

# The special-value conventions a float format may follow.
#   "ieee": the all-ones exponent codes inf (mantissa 0) and NaN (others).
#   "fn":   finite only; the single all-ones code (per sign) is NaN (float8_e4m3fn).
#   "fnuz": finite only, no negative zero; the code 0b1000...0 is the only NaN.
#   "none": every code is a finite number; no inf, no NaN (OCP FP6/FP4).
#   "e8m0": unsigned exponent-only scale: 2**(code - bias), 0xFF is NaN, no zero.
FLOAT_SPECIALS = ("ieee", "fn", "fnuz", "none", "e8m0")


class Format:
  """Base class of element formats (every subclass is a frozen dataclass)."""

  name: str
  bits: int
  signed: bool

  @property
  def max(self) -> float:
    """Largest finite value."""
    raise NotImplementedError

  def values(self) -> np.ndarray:
    """All finite values the format can code, sorted, as float64."""
    raise NotImplementedError

  @property
  def emax(self) -> int:
    """Exponent of the largest value, floor(log2(max)), as the OCP MX scale
    rule uses it (MXINT8's fixed-point int8 has emax 0)."""
    return math.floor(math.log2(self.max))

  def __str__(self) -> str:
    return self.name


@dataclasses.dataclass(frozen=True)
class IntFormat(Format):
  """An integer element format.

  A symmetric quantizer uses the restricted range ``[-(2**(bits-1) - 1),
  2**(bits-1) - 1]`` (so int2 is {-1, 0, 1}); ``lowbit_jax.cast`` uses the full
  two's complement range. Unsigned formats quantize asymmetrically with a zero
  point. ``frac_bits`` reads the code as fixed point: value = code / 2**frac_bits.

  Attributes:
    bits: code width, 1 to 16 (1 is only valid unsigned).
    signed: two's complement (True) or unsigned.
    frac_bits: fixed-point fraction bits (0 for plain integers).
    name: registry name; derived when empty.
  """
  bits: int
  signed: bool = True
  frac_bits: int = 0
  name: str = ""

  def __post_init__(self):
    if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
      raise ValueError(f"IntFormat bits must be an int in [1, 16], got {self.bits!r}")
    if self.signed and self.bits < 2:
      raise ValueError("a signed IntFormat needs at least 2 bits; use "
                       "formats.get('binary') for sign-only codes")
    if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits < 32:
      raise ValueError(f"frac_bits must be an int in [0, 32), got {self.frac_bits!r}")
    if not self.name:
      base = f"{'int' if self.signed else 'uint'}{self.bits}"
      object.__setattr__(self, "name",
                         base if not self.frac_bits else f"{base}_f{self.frac_bits}")

  @property
  def qmin(self) -> int:
    """Smallest code of the full range (what ``cast`` clamps to)."""
    return -(1 << (self.bits - 1)) if self.signed else 0

  @property
  def qmax(self) -> int:
    """Largest code."""
    return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

  @property
  def max(self) -> float:
    """Largest value a symmetric quantizer uses (qmax / 2**frac_bits)."""
    return self.qmax / (1 << self.frac_bits)

  def values(self) -> np.ndarray:
    return np.arange(self.qmin, self.qmax + 1, dtype=np.float64) / (1 << self.frac_bits)


@dataclasses.dataclass(frozen=True)
class FloatFormat(Format):
  """A sign / exponent / mantissa float format (``eXmY``).

  Attributes:
    exp_bits: exponent field width X (1 to 8).
    man_bits: mantissa field width Y (0 to 14; a code, sign included, has at
      most 16 bits: QArrays store codes in uint8 or uint16).
    bias: exponent bias; default ``2**(X-1) - 1``.
    special: how inf and NaN are coded, one of ``FLOAT_SPECIALS``.
    name: registry name; derived when empty.
  """
  exp_bits: int
  man_bits: int
  bias: Optional[int] = None
  special: str = "none"
  name: str = ""

  def __post_init__(self):
    x, y = self.exp_bits, self.man_bits
    if not isinstance(x, int) or not 1 <= x <= 8:
      raise ValueError(f"exp_bits must be an int in [1, 8], got {x!r} (float32 "
                       "arithmetic emulates the format, so wider exponents cannot "
                       "be represented)")
    if not isinstance(y, int) or not 0 <= y <= 22:
      raise ValueError(f"man_bits must be an int in [0, 22], got {y!r}")
    n_bits = x + y + (0 if self.special == "e8m0" else 1)
    if n_bits > 16:
      raise ValueError(
          f"e{x}m{y} codes take {n_bits} bits (sign, exponent and mantissa); a "
          "format's codes are stored in at most 16 bits (uint16), so at most "
          f"{15 - x} mantissa bits with {x} exponent bits. To emulate a wider "
          "float (TF32, say) on values, round with a 16-bit-or-narrower format's "
          "mantissa or keep that computation in float32")
    if self.special not in FLOAT_SPECIALS:
      raise ValueError(f"special must be one of {FLOAT_SPECIALS}, got "
                       f"{self.special!r}")
    if self.special == "e8m0" and y != 0:
      raise ValueError("special='e8m0' is an exponent-only format: man_bits=0")
    if self.special == "fn" and y == 0:
      raise ValueError("special='fn' needs man_bits >= 1 (the all-ones code is NaN)")
    if self.special == "ieee" and y == 0:
      raise ValueError("special='ieee' needs man_bits >= 1 (its top exponent holds "
                       "inf and NaN, and with no mantissa bit there is no NaN code); "
                       "use special='none' for a power-of-two format")
    if self.bias is None:
      object.__setattr__(self, "bias", (1 << (x - 1)) - 1)
    if self.min_exponent - y < -149:
      raise ValueError(f"e{x}m{y} with bias {self.bias} has values below float32's "
                       "smallest subnormal; raise the bias or shorten the mantissa")
    if self.max_exponent > 127:
      raise ValueError(f"e{x}m{y} with bias {self.bias} has values above float32's "
                       f"range (largest exponent {self.max_exponent}); use a larger "
                       "bias")
    if not self.name:
      object.__setattr__(self, "name", f"e{x}m{y}" + (
          "" if self.special == "none" and self.bias == (1 << (x - 1)) - 1
          else f"_b{self.bias}_{self.special}"))

  @property
  def bits(self) -> int:  # type: ignore[override]
    return self.exp_bits + self.man_bits + (0 if self.special == "e8m0" else 1)

  @property
  def signed(self) -> bool:
    return self.special != "e8m0"

  @property
  def min_exponent(self) -> int:
    """Exponent of the smallest normal (exponent field 1; field 0 for e8m0)."""
    return (0 if self.special == "e8m0" else 1) - self.bias

  @property
  def max_exponent(self) -> int:
    """Exponent of the largest finite value."""
    top = (1 << self.exp_bits) - 1
    if self.special == "ieee":
      top -= 1
    if self.special == "e8m0":
      top -= 1
    return top - self.bias

  @property
  def max(self) -> float:
    y = self.man_bits
    if self.special == "fn":
      frac = 2.0 - 2.0 ** (1 - y)
    else:
      frac = 2.0 - 2.0 ** -y
    return frac * 2.0 ** self.max_exponent

  @property
  def min_normal(self) -> float:
    return 2.0 ** self.min_exponent

  @property
  def min_subnormal(self) -> float:
    if self.special == "e8m0":
      return 2.0 ** self.min_exponent
    return 2.0 ** (self.min_exponent - self.man_bits)

  @property
  def has_inf(self) -> bool:
    return self.special == "ieee"

  @property
  def has_nan(self) -> bool:
    return self.special != "none"

  @property
  def emax(self) -> int:
    """Exponent of the largest normal, as the OCP MX spec uses it."""
    return self.max_exponent

  @property
  def ml_dtype(self):
    """The ml_dtypes type with exactly these semantics, or None."""
    return _ML_DTYPE_BY_KEY.get((self.exp_bits, self.man_bits, self.bias, self.special))

  def decode_table(self) -> np.ndarray:
    """float32 value of every code 0 .. 2**bits - 1 (NaN where the code is NaN)."""
    return _float_decode_table(self)

  def values(self) -> np.ndarray:
    t = self.decode_table().astype(np.float64)
    t = t[np.isfinite(t)]
    return np.unique(t)


@dataclasses.dataclass(frozen=True)
class LookupFormat(Format):
  """A codebook format: each element is the index of one of ``table``'s values.

  Rounding picks the entry at the smaller float32 distance ``|x - t|`` (ties
  to the even index), as the reference, the CPU path and the GPU kernels all
  compute it. Within an ulp of the midpoint of two entries of different
  magnitudes (entries either side of 0, or far apart) the two distances can
  round to the same float32, and the tie rule may then pick the entry that is
  farther in exact arithmetic; the built-in codebooks have no such case.

  Attributes:
    table: sorted, distinct values (2 to 256 of them).
    name: registry name.
    scale_method: how a quantizer chooses the scale of a block: "absmax"
      (scale = amax / max|table|), "mean_abs" (binary weights, BWN:
      scale = mean |x|; Rastegari et al. 2016) or "twn" (ternary weights:
      threshold 0.7 * mean |x|, scale = mean |x| above it; Li & Liu 2016).
    default_block: block size a spec uses when it names none (NF4: 64), a
      positive int, or None (a spec naming no block quantizes per row).
  """
  table: tuple
  name: str
  scale_method: str = "absmax"
  default_block: Optional[int] = None

  def __post_init__(self):
    t = tuple(float(v) for v in self.table)
    if not 2 <= len(t) <= 256:
      raise ValueError(f"a LookupFormat needs 2 to 256 values, got {len(t)}")
    if any(not math.isfinite(v) for v in t):
      raise ValueError("LookupFormat values must be finite")
    if any(b <= a for a, b in zip(t, t[1:])):
      raise ValueError("LookupFormat values must be sorted ascending and distinct, "
                       f"got {t}")
    f32_max = float(np.finfo(np.float32).max)
    if any(abs(v) > f32_max for v in t):
      raise ValueError(f"LookupFormat values must lie within float32's range "
                       f"(+-{f32_max:.4g}): codes are decoded in float32; got {t}")
    t32 = [float(np.float32(v)) for v in t]
    if any(b <= a for a, b in zip(t32, t32[1:])):
      raise ValueError("LookupFormat values must stay distinct in float32 (the "
                       "arithmetic quantization runs in); got values that round to "
                       f"the same float32 in {t}")
    if self.scale_method not in ("absmax", "mean_abs", "twn"):
      raise ValueError("scale_method must be 'absmax', 'mean_abs' or 'twn', got "
                       f"{self.scale_method!r}")
    if self.scale_method == "twn" and t != (-1.0, 0.0, 1.0):
      raise ValueError("scale_method='twn' is ternary weight quantization: it "
                       "codes each element as -1, 0 or +1 times the block's scale, "
                       f"so its table must be (-1.0, 0.0, 1.0), got {t}; use "
                       "scale_method='absmax' for another codebook")
    b = self.default_block
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
      raise ValueError(f"default_block must be a positive int or None, got {b!r}")
    object.__setattr__(self, "table", t)

  @property
  def bits(self) -> int:  # type: ignore[override]
    return max(1, math.ceil(math.log2(len(self.table))))

  @property
  def max(self) -> float:
    return max(abs(self.table[0]), abs(self.table[-1]))

  @property
  def signed(self) -> bool:
    return self.table[0] < 0

  def values(self) -> np.ndarray:
    return np.asarray(self.table, np.float64)


SCALE_DTYPES = ("float32", "bfloat16", "float16", "e8m0", "fp8_e4m3")


@dataclasses.dataclass(frozen=True)
class BlockFormat(Format):
  """Block-scaled format: ``block_size`` elements share one scale.

  Attributes:
    element: the element format.
    scale: scale dtype name, one of ``SCALE_DTYPES`` (MX: "e8m0"; NVFP4:
      "fp8_e4m3").
    block_size: elements per scale, along the quantization axis.
    tensor_scale: a float32 per-tensor scale above the block scales (NVFP4).
    scale_rounding: how a power-of-two (e8m0) scale is chosen: "floor"
      (OCP MX: 2**(floor(log2 amax) - emax)), "ceil" (2**ceil(log2(amax /
      element max)), never saturates) or "nearest".
    name: registry name.
  """
  element: Format
  scale: str
  block_size: int
  tensor_scale: bool = False
  scale_rounding: str = "floor"
  name: str = ""

  def __post_init__(self):
    if isinstance(self.element, BlockFormat):
      raise ValueError("a BlockFormat's element must be an element format, not a "
                       "BlockFormat")
    if not isinstance(self.element, Format):
      raise TypeError(f"element must be a Format, got {type(self.element).__name__}")
    if self.scale not in SCALE_DTYPES:
      raise ValueError(f"scale must be one of {SCALE_DTYPES}, got {self.scale!r}")
    if not isinstance(self.block_size, int) or self.block_size < 1:
      raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
    if self.scale_rounding not in ("floor", "ceil", "nearest"):
      raise ValueError("scale_rounding must be 'floor', 'ceil' or 'nearest', got "
                       f"{self.scale_rounding!r}")
    if isinstance(self.element, IntFormat) and not self.element.signed:
      raise ValueError("block formats use symmetric (signed) elements")
    if isinstance(self.element, FloatFormat) and self.element.special == "e8m0":
      raise ValueError("e8m0 (unsigned, no zero) is a block scale, not an element: "
                       "BlockFormat(element, 'e8m0', block_size), e.g. with "
                       "get('fp8_e4m3') as the element (MXFP8)")
    if self.tensor_scale and self.scale == "e8m0":
      raise ValueError("a second-level tensor scale needs a float block scale "
                       "(fp8_e4m3 as NVFP4, or float32/bfloat16/float16), not e8m0: "
                       "a power-of-two block scale takes no tensor scale")
    if not self.name:
      object.__setattr__(self, "name", f"{self.element.name}_{self.scale}"
                         f"_b{self.block_size}" + ("_ts" if self.tensor_scale else ""))

  @property
  def bits(self) -> int:  # type: ignore[override]
    return self.element.bits

  @property
  def max(self) -> float:
    return self.element.max

  @property
  def signed(self) -> bool:
    return self.element.signed

  @property
  def bits_per_element(self) -> float:
    """Storage bits per element including the block scale (not the tensor scale)."""
    scale_bits = {"float32": 32, "bfloat16": 16, "float16": 16, "e8m0": 8,
                  "fp8_e4m3": 8}[self.scale]
    return self.element.bits + scale_bits / self.block_size

  def values(self) -> np.ndarray:
    return self.element.values()


def _float_decode_table(f: FloatFormat) -> np.ndarray:
  x, y, bias = f.exp_bits, f.man_bits, f.bias
  n = 1 << f.bits
  codes = np.arange(n, dtype=np.int64)
  if f.special == "e8m0":
    vals = np.ldexp(1.0, (codes - bias).astype(np.int32))
    vals[codes == 0xFF] = np.nan
    return vals.astype(np.float32)
  sign = (codes >> (x + y)) & 1
  e = (codes >> y) & ((1 << x) - 1)
  m = codes & ((1 << y) - 1)
  sub = e == 0
  mag = np.where(sub, np.ldexp(m.astype(np.float64), (1 - bias - y)),
                 np.ldexp((m + (1 << y)).astype(np.float64),
                          (e - bias - y).astype(np.int32)))
  vals = np.where(sign == 1, -mag, mag)
  all_e = (1 << x) - 1
  if f.special == "ieee":
    vals = np.where((e == all_e) & (m == 0), np.where(sign == 1, -np.inf, np.inf), vals)
    vals = np.where((e == all_e) & (m != 0), np.nan, vals)
  elif f.special == "fn":
    vals = np.where((e == all_e) & (m == (1 << y) - 1), np.nan, vals)
  elif f.special == "fnuz":
    vals = np.where(codes == (1 << (x + y)), np.nan, vals)
  return vals.astype(np.float32)


_ML_DTYPE_BY_KEY = {
    (4, 3, 7, "fn"): ml_dtypes.float8_e4m3fn,
    (5, 2, 15, "ieee"): ml_dtypes.float8_e5m2,
    (4, 3, 8, "fnuz"): ml_dtypes.float8_e4m3fnuz,
    (5, 2, 16, "fnuz"): ml_dtypes.float8_e5m2fnuz,
    (4, 3, 11, "fnuz"): ml_dtypes.float8_e4m3b11fnuz,
    (3, 4, 3, "ieee"): ml_dtypes.float8_e3m4,
    (4, 3, 7, "ieee"): ml_dtypes.float8_e4m3,
    (2, 3, 1, "none"): ml_dtypes.float6_e2m3fn,
    (3, 2, 3, "none"): ml_dtypes.float6_e3m2fn,
    (2, 1, 1, "none"): ml_dtypes.float4_e2m1fn,
    (8, 0, 127, "e8m0"): ml_dtypes.float8_e8m0fnu,
}
