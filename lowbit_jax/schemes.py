"""Named quantization schemes: a format plus its granularity, as data.

A scheme names what one sweep point quantizes with. ``rules(scheme, target)``
turns it into QuantRules: ``target="weights"`` quantizes weights only,
``target="weights+acts"`` quantizes activations too, dynamically, with the
scheme's activation spec: the weight's format (per token for per-channel
formats, groups/blocks along K otherwise), or int8 per token for the schemes
whose weights are too narrow for activations (``w4a8``, ``int2_g64``,
``ternary``).
Grouped specs zero-pad a contraction dim that is not a multiple of the group.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from lowbit_jax.core import QuantSpec


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One format + granularity. ``weight``/``activation`` None means float."""
  name: str
  weight: Optional[QuantSpec]
  activation: Optional[QuantSpec]

  @property
  def label(self) -> str:
    return self.name


def _s(fmt, **kw):
  # pad=True: a model dim that is not a multiple of the block (e.g. d_ff=176
  # with 32-element MX blocks) is zero-padded inside the quantizer; the padding
  # never changes a block's range and the result keeps the tensor's shape.
  return QuantSpec(fmt, pad=True, **kw)


SCHEMES = {
    "fp32": Scheme("fp32", None, None),
    "int8": Scheme("int8", _s("int8"), _s("int8")),
    "int4_g128": Scheme("int4_g128", _s("int4", group_size=128),
                        _s("int4", group_size=128)),
    "int4": Scheme("int4", _s("int4"), _s("int4")),
    "int3_g128": Scheme("int3_g128", _s("int3", group_size=128),
                        _s("int3", group_size=128)),
    "w4a8": Scheme("w4a8", _s("int4", group_size=128), _s("int8")),
    "uint4_g128": Scheme("uint4_g128", _s("uint4", group_size=128),
                         _s("uint4", group_size=128)),
    "nf4": Scheme("nf4", _s("nf4"), _s("nf4")),
    "fp8_e4m3": Scheme("fp8_e4m3", _s("fp8_e4m3"), _s("fp8_e4m3")),
    "fp8_e5m2": Scheme("fp8_e5m2", _s("fp8_e5m2"), _s("fp8_e5m2")),
    "mxfp8": Scheme("mxfp8", _s("mxfp8_e4m3"), _s("mxfp8_e4m3")),
    "mxfp6": Scheme("mxfp6", _s("mxfp6_e2m3"), _s("mxfp6_e2m3")),
    "mxfp4": Scheme("mxfp4", _s("mxfp4"), _s("mxfp4")),
    "mxint8": Scheme("mxint8", _s("mxint8"), _s("mxint8")),
    "nvfp4": Scheme("nvfp4", _s("nvfp4"), _s("nvfp4")),
    "int2_g64": Scheme("int2_g64", _s("int2", group_size=64), _s("int8")),
    "ternary": Scheme("ternary", _s("ternary"), _s("int8")),
}

TARGETS = ("weights", "weights+acts")


def get(name: str) -> Scheme:
  """A scheme by name (KeyError lists the known ones)."""
  try:
    return SCHEMES[name]
  except KeyError:
    raise KeyError(f"unknown scheme {name!r}; known: {', '.join(sorted(SCHEMES))}. "
                   "Add one to lowbit_jax.schemes.SCHEMES or pass specs directly"
                   ) from None


def weight_bits(scheme: Scheme, shape=(384, 1536)) -> float:
  """Storage bits per weight element (scales included) for a weight of ``shape``,
  quantized along its first (contraction) axis."""
  if scheme.weight is None:
    return 32.0
  return scheme.weight.with_axis(0).bits_per_element(tuple(shape))
