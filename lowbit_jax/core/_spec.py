"""QuantSpec: how a tensor is quantized (format, granularity, scales, rounding)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import numpy as np

from lowbit_jax.formats import BlockFormat, FloatFormat, Format, IntFormat, LookupFormat
from lowbit_jax.formats import SCALE_DTYPES
from lowbit_jax.formats import get as get_format

Axis = Union[None, int, tuple, str]
TENSOR = "tensor"
CALIBRATIONS = ("minmax", "absmax_ema", "percentile", "mse", "kl")


def _as_int(name: str, v) -> int:
  """``v`` as a Python int: ints and numpy integer scalars, never bools."""
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
    raise TypeError(f"QuantSpec field {name} takes ints, got {type(v).__name__} {v!r}")
  return int(v)


def _as_bool(name: str, v, none_ok: bool = False):
  """``v`` as a Python bool: True/False or a numpy bool only."""
  if v is None and none_ok:
    return None
  if not isinstance(v, (bool, np.bool_)):
    raise TypeError(f"QuantSpec field {name} must be True or False"
                    + (" (or None for the format's default)" if none_ok else "")
                    + f", got {type(v).__name__} {v!r}")
  return bool(v)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one tensor. Frozen and hashable: static under jit.

  Granularity: ``axis`` names the axis (or axes) whose elements share a scale:
  the reduction axis of the matmul that will use the tensor. For activations
  ``x[tokens, K]``, ``axis=-1`` is per-token; for a weight ``w[K, N]``, ``axis=0``
  is per-output-channel, and with ``group_size=128`` it is groups of 128 along K.
  ``axis="tensor"`` is one scale for the whole tensor. ``axis=None`` means
  "unset": a quantization rule fills in the op's contraction axis, and a direct
  call treats it as per-tensor (block formats need an explicit axis).
  ``tile=(a, b)`` gives one scale per a x b tile of the last two dims.

  Attributes:
    format: the element or block format (a name is looked up).
    axis: see above.
    group_size: elements per scale along ``axis`` (block formats default to the
      format's block size; NF4 to 64).
    tile: 2-D tiles over the last two dims, e.g. (128, 128).
    symmetric: symmetric (signed grid, no zero point) or asymmetric (unsigned
      grid of the same width with a zero point). Defaults from the format:
      ``uint*`` formats are asymmetric, everything else symmetric.
    scale_dtype: "float32", "bfloat16", "float16", "e8m0" (power of two) or
      "fp8_e4m3"; block formats default to their own.
    scale_rounding: how an e8m0 scale is chosen from the amax: "floor" (OCP MX),
      "ceil" (never saturates, as cuBLAS/torchao) or "nearest".
    rounding: element rounding, "nearest" (half to even) or "stochastic"
      (unbiased; ``quantize`` then needs a PRNG key).
    clip_ratio: the scale covers ``clip_ratio * amax`` (values beyond clip).
    pad: zero-pad an axis that is not a multiple of the group/tile size (the
      padding never changes a block's range); otherwise that is an error.
    calibration: observer a static-range calibration uses (see
      ``lowbit_jax.calibration``): one of ``CALIBRATIONS``.
  """
  format: Union[str, Format]
  axis: Axis = None
  group_size: Optional[int] = None
  tile: Optional[tuple] = None
  symmetric: Optional[bool] = None
  scale_dtype: Optional[str] = None
  scale_rounding: Optional[str] = None
  rounding: str = "nearest"
  clip_ratio: float = 1.0
  pad: bool = False
  calibration: str = "minmax"

  def __post_init__(self):
    for name in ("symmetric", "pad"):
      object.__setattr__(self, name, _as_bool(name, getattr(self, name),
                                              none_ok=name == "symmetric"))
    for name in ("scale_dtype", "scale_rounding", "rounding", "calibration"):
      v = getattr(self, name)
      if v is not None and not isinstance(v, str):
        raise TypeError(f"QuantSpec field {name} must be a str, got "
                        f"{type(v).__name__} {v!r}")
    if not isinstance(self.format, (str, Format)):
      raise TypeError(f"QuantSpec field format must be a format name or a Format, got "
                      f"{type(self.format).__name__} {self.format!r}")
    if isinstance(self.clip_ratio, (bool, np.bool_)) or not isinstance(
        self.clip_ratio, (int, float, np.integer, np.floating)):
      raise TypeError(f"QuantSpec field clip_ratio must be a number, got "
                      f"{type(self.clip_ratio).__name__} {self.clip_ratio!r}")
    if self.group_size is not None:
      object.__setattr__(self, "group_size", _as_int("group_size", self.group_size))
    ax = self.axis
    if isinstance(ax, (list, tuple)):
      object.__setattr__(self, "axis", tuple(_as_int("axis", a) for a in ax))
    elif ax is not None and not isinstance(ax, str):
      object.__setattr__(self, "axis", _as_int("axis", ax))
    if self.tile is not None:
      if not isinstance(self.tile, (list, tuple)):
        raise TypeError(f"QuantSpec field tile must be a pair of ints, got "
                        f"{type(self.tile).__name__} {self.tile!r}")
      object.__setattr__(self, "tile", tuple(_as_int("tile", v) for v in self.tile))
    try:
      fmt = get_format(self.format)
    except KeyError as e:
      raise ValueError(str(e).strip("'\"")) from None
    object.__setattr__(self, "format", fmt)
    ax = self.axis
    if isinstance(ax, list):
      ax = tuple(ax)
    if isinstance(ax, str) and ax != TENSOR:
      raise ValueError(f"axis must be an int, a tuple of ints, None or 'tensor'; got "
                       f"{ax!r}")
    if isinstance(ax, tuple):
      if not ax or not all(isinstance(a, int) for a in ax):
        raise ValueError(f"axis tuple must hold ints, got {ax!r}")
      if len(set(ax)) != len(ax):
        raise ValueError(f"axis tuple repeats an axis: {ax!r}")
    elif ax is not None and ax != TENSOR and not isinstance(ax, int):
      raise ValueError(f"axis must be an int, a tuple of ints, None or 'tensor'; got "
                       f"{ax!r}")
    object.__setattr__(self, "axis", ax)
    if self.tile is not None:
      t = tuple(self.tile)
      if len(t) != 2 or not all(isinstance(v, int) and v > 0 for v in t):
        raise ValueError(f"tile must be two positive ints (rows, cols), got {self.tile!r}")
      object.__setattr__(self, "tile", t)
      if self.group_size is not None:
        raise ValueError("give either group_size (1-D groups along axis) or tile "
                         "(2-D tiles of the last two dims), not both")
    gs = self.group_size
    if isinstance(fmt, BlockFormat) and (isinstance(ax, tuple) or ax == TENSOR):
      raise ValueError(f"{fmt.name!r} is a block format: its blocks of "
                       f"{fmt.block_size} run along one axis; give a single axis, "
                       f"e.g. axis=-1, not axis={ax!r}")
    if gs is None and self.tile is None:
      if isinstance(fmt, BlockFormat):
        gs = fmt.block_size
      elif (isinstance(fmt, LookupFormat) and fmt.default_block
            and not isinstance(ax, tuple) and ax != TENSOR):
        # A codebook's default block (NF4: 64) applies along a single axis; an
        # explicit per-tensor or multi-axis granularity overrides it.
        gs = fmt.default_block
    if gs is not None:
      if not isinstance(gs, int) or gs < 1:
        raise ValueError(f"group_size must be a positive int, got {gs!r}")
      if isinstance(ax, tuple) or ax == TENSOR:
        raise ValueError(f"group_size needs a single axis, got axis={ax!r}; e.g. "
                         "axis=-1, group_size=128")
    object.__setattr__(self, "group_size", gs)
    sym = self.symmetric
    if sym is None:
      sym = not (isinstance(fmt, IntFormat) and not fmt.signed)
    if not sym and not isinstance(fmt, IntFormat):
      raise ValueError(f"asymmetric quantization needs an integer format; "
                       f"{fmt.name!r} is not one (use symmetric=True or e.g. 'uint4')")
    if sym and isinstance(fmt, IntFormat) and not fmt.signed:
      raise ValueError(f"{fmt.name!r} is unsigned and quantizes asymmetrically; use "
                       f"symmetric=False or the signed format 'int{fmt.bits}'")
    object.__setattr__(self, "symmetric", sym)
    sd = self.scale_dtype
    if sd is None:
      sd = fmt.scale if isinstance(fmt, BlockFormat) else "float32"
    if sd == "fp32":
      sd = "float32"
    if sd == "bf16":
      sd = "bfloat16"
    if sd not in SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {sd!r}")
    if sd == "e8m0" and not sym:
      raise ValueError("power-of-two (e8m0) scales are symmetric only")
    if sd == "e8m0" and isinstance(fmt, BlockFormat) and fmt.tensor_scale:
      raise ValueError(f"{fmt.name!r} has a second-level tensor scale, which needs "
                       "float block scales (fp8_e4m3, float32, bfloat16, float16), "
                       "not scale_dtype='e8m0'")
    object.__setattr__(self, "scale_dtype", sd)
    sr = self.scale_rounding
    if sr is None:
      sr = fmt.scale_rounding if isinstance(fmt, BlockFormat) else "floor"
    elif sd != "e8m0" and sr != "floor":
      raise ValueError(f"scale_rounding applies to e8m0 scales; scale_dtype is {sd!r}")
    if sr not in ("floor", "ceil", "nearest"):
      raise ValueError(f"scale_rounding must be 'floor', 'ceil' or 'nearest', got {sr!r}")
    object.__setattr__(self, "scale_rounding", sr)
    if self.rounding not in ("nearest", "stochastic"):
      raise ValueError(f"rounding must be 'nearest' or 'stochastic', got "
                       f"{self.rounding!r}")
    el = self.element
    if (self.rounding == "stochastic" and isinstance(el, LookupFormat)
        and el.scale_method == "twn"):
      raise ValueError(f"{el.name!r} quantizes by a threshold (TWN: |x| > 0.7 "
                       "mean|x| -> +-1), not by rounding to a grid, so stochastic "
                       "rounding has no meaning for it; use rounding='nearest'")
    if not 0 < float(self.clip_ratio) <= 1:
      raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
    object.__setattr__(self, "clip_ratio", float(self.clip_ratio))
    if self.calibration not in CALIBRATIONS:
      raise ValueError(f"calibration must be one of {CALIBRATIONS}, got "
                       f"{self.calibration!r}")
    if isinstance(fmt, FloatFormat) and fmt.special == "e8m0":
      raise ValueError("e8m0 is a scale format (unsigned, no zero); use it as "
                       "scale_dtype='e8m0' or inside a BlockFormat")

  # -- derived ---------------------------------------------------------------

  @property
  def element(self) -> Format:
    """The element format (a block format's element, else the format)."""
    f = self.format
    return f.element if isinstance(f, BlockFormat) else f

  @property
  def tensor_scale(self) -> bool:
    """Whether a float32 per-tensor scale sits above the block scales (NVFP4)."""
    return isinstance(self.format, BlockFormat) and self.format.tensor_scale

  @property
  def storage_format(self) -> Format:
    """Element format codes are stored in (asymmetric: the unsigned integer
    grid ``[0, 2**bits - 1]`` in whole codes: the zero point and scale place
    it, so a fixed-point element's ``frac_bits``, a relabelling of codes, do
    not apply)."""
    e = self.element
    if isinstance(e, IntFormat) and not self.symmetric and (e.signed or e.frac_bits):
      return IntFormat(e.bits, signed=False)
    return e

  def with_axis(self, axis: Axis) -> "QuantSpec":
    """This spec with ``axis`` filled in if it was unset."""
    if self.axis is not None:
      return self
    return dataclasses.replace(self, axis=axis)

  def replace(self, **kw) -> "QuantSpec":
    return dataclasses.replace(self, **kw)

  def bits_per_element(self, shape: tuple) -> float:
    """Storage bits per element including scales and zero points, for ``shape``.

    What ``quantize(x, self)`` of that shape stores (``QArray.bits_per_element``:
    padded blocks and whole packing units included), counted from its shapes
    without computing it; for a spec that cannot quantize ``shape`` as given
    (an unset axis the ops fill in), the count from the blocks alone.
    """
    exact = _stored_bits(self, tuple(int(d) for d in shape))
    if exact is not None:
      return exact
    from lowbit_jax.core._qarray import block_shape, storage_bits  # pylint: disable=g-import-not-at-top
    import math
    n = math.prod(shape)
    bs = block_shape(self, tuple(shape))
    n_scales = math.prod(-(-d // b) for d, b in zip(shape, bs))
    scale_bits = {"float32": 32, "bfloat16": 16, "float16": 16, "e8m0": 8,
                  "fp8_e4m3": 8}[self.scale_dtype]
    # Zero points are stored as the codes are: uint8, or uint16 for codes of
    # 9 to 16 bits (core._quantize).
    zp_bits = 0 if self.symmetric else (8 if self.storage_format.bits <= 8 else 16)
    extra = 32 if self.tensor_scale else 0
    return storage_bits(self.storage_format) + (n_scales * (scale_bits + zp_bits)
                                                + extra) / n


@functools.lru_cache(maxsize=4096)
def _stored_bits(spec: QuantSpec, shape: tuple) -> Optional[float]:
  """Bits per element a QArray of ``shape`` quantized with ``spec`` stores, from
  ``jax.eval_shape`` of ``quantize`` (None where it cannot quantize it)."""
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core._quantize import quantize  # pylint: disable=g-import-not-at-top
  n = math.prod(shape)
  if n == 0:
    return None
  try:
    q = jax.eval_shape(lambda x: quantize(x, spec), jax.ShapeDtypeStruct(shape, jnp.float32))
  except (ValueError, TypeError):
    return None
  nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(q))
  return 8.0 * nbytes / n


def as_spec(spec: Union[QuantSpec, str, Format], **kwargs) -> QuantSpec:
  """A QuantSpec from a spec, or from a format name and QuantSpec keywords."""
  if isinstance(spec, QuantSpec):
    if kwargs:
      return dataclasses.replace(spec, **kwargs)
    return spec
  if isinstance(spec, (str, Format)):
    return QuantSpec(spec, **kwargs)
  raise TypeError(f"expected a QuantSpec or a format name, got {type(spec).__name__}")
