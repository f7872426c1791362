"""The format registry: every format by name, plus bare ``eXmY`` names on demand."""
from __future__ import annotations

import re
import statistics
import threading

import numpy as np

from lowbit_jax.formats._formats import (BlockFormat, FloatFormat, Format, IntFormat,
                                         LookupFormat)

_LOCK = threading.Lock()
_REGISTRY: dict[str, Format] = {}
_ALIASES: dict[str, str] = {}
_BARE = re.compile(r"^e(\d)m(\d{1,2})$")


def _nf4_table() -> tuple:
  """QLoRA's NormalFloat-4 levels, built from normal quantiles.

  Dettmers et al. 2023 (QLoRA), Appendix E: 8 positive quantiles and 7 negative
  ones of N(0, 1), taken at evenly spaced probabilities from 0.5 to
  ``offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2``, an exact zero, all scaled so
  the extremes are +-1. Computed as the reference implementation
  (bitsandbytes) computes them, so that codes read back bit for bit the
  float32 levels its checkpoints hold: the offset to the 7 digits it uses
  (0.9677083), the probabilities in float32 (a linspace stepping from both
  ends), the quantiles in float64 rounded to float32, scaled in float32.
  """
  f32 = np.float32
  offset = f32(0.9677083)
  nd = statistics.NormalDist()

  def lin(a, b, n):   # float32, the first half stepped from a, the rest from b
    step = f32((f32(b) - a) / f32(n - 1))
    return [a + step * f32(i) if i < n // 2 else f32(b) - step * f32(n - 1 - i)
            for i in range(n)]

  pos = [nd.inv_cdf(float(p)) for p in lin(offset, 0.5, 9)[:-1]]
  neg = [-nd.inv_cdf(float(p)) for p in lin(offset, 0.5, 8)[:-1]]
  vals = np.array(sorted(pos + neg + [0.0]), np.float32)
  return tuple(float(v) for v in vals / np.max(np.abs(vals)))


def _dynamic_table(bits: int, signed: bool) -> tuple:
  """Dettmers' dynamic (tree) quantization map with ``bits``-bit codes.

  Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
  Section 2 and Appendix F: after the sign bit (signed maps only) a code is a
  run of ``e`` zero bits (the decimal exponent), a one (the indicator) and the
  remaining bits as a linear fraction. With ``n = bits - 1`` non-sign bits,
  ``e`` runs over ``0 .. n-1`` and a code's magnitude is ``10**-e`` times the
  midpoint of one of ``2**f`` equal bins of ``[0.1, 1]``, where ``f = n - 1 -
  e`` for a signed map. An unsigned map keeps the same decades and uses the
  freed sign bit as one more fraction bit (``f = n - e``). Zero and +1.0 (so
  that a block's positive absmax is coded exactly; as in the paper there is no
  -1.0) complete the map: ``2**bits`` values either way.

  Args:
    bits: code width (8 in the paper; 4 gives Li et al.'s "DE" map).
    signed: a map for signed data (first moment) or non-negative data.

  Returns:
    The sorted values, zero included.
  """
  n = bits - 1
  mags = []
  for e in range(n):
    f = n - 1 - e if signed else n - e
    bins = 1 << f
    width = 0.9 / bins
    mags += [10.0 ** -e * (0.1 + width * (i + 0.5)) for i in range(bins)]
  vals = mags + [0.0, 1.0] + ([-m for m in mags] if signed else [])
  return tuple(sorted(vals))


def _without_zero(table: tuple) -> tuple:
  """A map with its zero code removed, for the second moment of Adam.

  Li et al. 2023, "Memory Efficient Optimizers with 4-bit States", Section 4.1:
  a second-moment entry that rounds to zero turns ``m / (sqrt(v) + eps)`` into
  ``m / eps``, so the map for ``v`` must not contain zero ("DE-0"). A block
  that is entirely zero still reads back as zero (its scale is 0).
  """
  return tuple(v for v in table if v != 0.0)


def _linear_unsigned_table(bits: int) -> tuple:
  """Li et al. 2023's zero-point-free linear map: ``(i + 1) / 2**bits``.

  "Memory Efficient Optimizers with 4-bit States", Section 4.2 (the "Linear"
  mapping they pair with rank-1 normalization): ``2**bits`` evenly spaced
  levels whose smallest is ``1 / 2**bits`` of the block's absmax, never zero.
  """
  n = 1 << bits
  return tuple((i + 1) / n for i in range(n))


def register(fmt: Format, name: str | None = None, *, overwrite: bool = False) -> Format:
  """Registers a format so that ``get(name)`` and every spec can use it.

  Args:
    fmt: the format (IntFormat, FloatFormat, LookupFormat or BlockFormat).
    name: the name to register under; defaults to ``fmt.name``.
    overwrite: allow replacing an existing name.

  Returns:
    The format.

  Raises:
    ValueError: the name is taken (pass overwrite=True) or malformed.
    TypeError: fmt is not a Format.
  """
  if not isinstance(fmt, Format):
    raise TypeError(f"register() takes a Format, got {type(fmt).__name__}")
  name = name or fmt.name
  if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
    raise ValueError(f"format names use letters, digits, '_', '.', '-'; got {name!r}")
  with _LOCK:
    if not overwrite and (name in _REGISTRY or name in _ALIASES):
      raise ValueError(f"format {name!r} is already registered; pass overwrite=True "
                       "to replace it")
    _REGISTRY[name] = fmt
  return fmt


def names() -> list[str]:
  """All registered format names, with the short ``eXmY`` aliases.

  The aliases (``e4m3``, ``e5m2``, ``e3m4``, ``e2m1``, ``e2m3``, ``e3m2``) name the
  same formats as their ``fp*_`` names. Any other bare ``eXmY`` name also works
  with ``get``; so do ml_dtypes' type names (``float8_e4m3fn`` ...).
  """
  return sorted(set(_REGISTRY) | {a for a in _ALIASES if _BARE.match(a)})


def get(name: str | Format) -> Format:
  """Looks up a format by name (a Format passes through unchanged).

  Bare ``eXmY`` names build a float format: names ml_dtypes has (e4m3, e5m2,
  e3m4, e2m1, e2m3, e3m2, e8m0) mean the registered type; others follow the OCP
  FP6/FP4 convention (bias 2**(X-1) - 1, subnormals, no inf or NaN, saturating).

  Raises:
    KeyError: unknown name (the message lists the known ones).
    ValueError: a bare ``eXmY`` name whose format cannot exist (e.g. ``e8m1``,
      whose largest value overflows float32).
  """
  if isinstance(name, Format):
    return name
  if not isinstance(name, str):
    raise TypeError(f"a format is named by a string, got {type(name).__name__}")
  if name in _REGISTRY:
    return _REGISTRY[name]
  if name in _ALIASES:
    return _REGISTRY[_ALIASES[name]]
  m = _BARE.match(name)
  if m:
    x, y = int(m.group(1)), int(m.group(2))
    try:
      return FloatFormat(x, y, name=name)
    except ValueError as e:
      raise ValueError(f"bare float name {name!r} is not a valid format: {e}. Build "
                       f"it with lowbit_jax.formats.FloatFormat({x}, {y}, bias=...) "
                       "and register it under a name") from None
  raise KeyError(f"unknown format {name!r}. Known: {', '.join(names())}. Bare eXmY "
                 "names such as 'e3m3' are built on demand; register your own with "
                 "lowbit_jax.formats.register(...)")


def _alias(alias: str, target: str) -> None:
  _ALIASES[alias] = target


def _register_builtins() -> None:
  for b in (8, 4, 3, 2):
    register(IntFormat(b, signed=True))
  for b in (8, 4):
    register(IntFormat(b, signed=False))
  register(LookupFormat((-1.0, 1.0), name="binary", scale_method="mean_abs"))
  register(LookupFormat((-1.0, 0.0, 1.0), name="ternary", scale_method="twn"))
  register(LookupFormat(_nf4_table(), name="nf4", default_block=64))
  # Optimizer-state maps (lowbit_jax.optim): Dettmers et al. 2022's dynamic
  # maps and Li et al. 2023's 4-bit maps. The unsigned ones, meant for Adam's
  # second moment, contain no zero, so a positive value never codes as 0.
  register(LookupFormat(_dynamic_table(8, signed=True), name="dynamic8"))
  register(LookupFormat(_without_zero(_dynamic_table(8, signed=False)),
                        name="dynamic8_unsigned"))
  register(LookupFormat(_dynamic_table(4, signed=True), name="dynamic4"))
  register(LookupFormat(_without_zero(_dynamic_table(4, signed=False)),
                        name="dynamic4_unsigned"))
  register(LookupFormat(_linear_unsigned_table(4), name="linear4_unsigned"))

  floats = {
      "fp8_e4m3": FloatFormat(4, 3, 7, "fn", name="fp8_e4m3"),
      "fp8_e5m2": FloatFormat(5, 2, 15, "ieee", name="fp8_e5m2"),
      "fp8_e4m3fnuz": FloatFormat(4, 3, 8, "fnuz", name="fp8_e4m3fnuz"),
      "fp8_e5m2fnuz": FloatFormat(5, 2, 16, "fnuz", name="fp8_e5m2fnuz"),
      "fp8_e4m3b11fnuz": FloatFormat(4, 3, 11, "fnuz", name="fp8_e4m3b11fnuz"),
      "fp8_e3m4": FloatFormat(3, 4, 3, "ieee", name="fp8_e3m4"),
      "fp8_e4m3ieee": FloatFormat(4, 3, 7, "ieee", name="fp8_e4m3ieee"),
      "fp6_e2m3": FloatFormat(2, 3, 1, "none", name="fp6_e2m3"),
      "fp6_e3m2": FloatFormat(3, 2, 3, "none", name="fp6_e3m2"),
      "fp4_e2m1": FloatFormat(2, 1, 1, "none", name="fp4_e2m1"),
      "e8m0": FloatFormat(8, 0, 127, "e8m0", name="e8m0"),
  }
  for n, f in floats.items():
    register(f, n)
  # Bare eXmY formats ml_dtypes lacks, named in the format table (any other
  # bare name is built on demand by get()).
  for n in ("e3m3", "e2m2", "e5m3"):
    register(FloatFormat(int(n[1]), int(n[3]), name=n))
  for bare, full in (("e4m3", "fp8_e4m3"), ("e5m2", "fp8_e5m2"), ("e3m4", "fp8_e3m4"),
                     ("e2m1", "fp4_e2m1"), ("e2m3", "fp6_e2m3"), ("e3m2", "fp6_e3m2")):
    _alias(bare, full)
  # ml_dtypes' own names.
  for n, f in floats.items():
    if f.ml_dtype is not None:
      _alias(f.ml_dtype.__name__, n)

  register(BlockFormat(floats["fp8_e4m3"], "e8m0", 32, name="mxfp8_e4m3"))
  register(BlockFormat(floats["fp8_e5m2"], "e8m0", 32, name="mxfp8_e5m2"))
  register(BlockFormat(floats["fp6_e2m3"], "e8m0", 32, name="mxfp6_e2m3"))
  register(BlockFormat(floats["fp6_e3m2"], "e8m0", 32, name="mxfp6_e3m2"))
  register(BlockFormat(floats["fp4_e2m1"], "e8m0", 32, name="mxfp4"))
  register(BlockFormat(IntFormat(8, True, frac_bits=6, name="int8_fixed6"), "e8m0", 32,
                       name="mxint8"))
  register(BlockFormat(floats["fp4_e2m1"], "fp8_e4m3", 16, tensor_scale=True,
                       name="nvfp4"))


_register_builtins()
