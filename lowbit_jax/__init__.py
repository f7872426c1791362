"""lowbit_jax: low-bit number formats, PTQ and QAT for JAX/Flax models.

>>> import lowbit_jax as lb
>>> y = lb.fake_quant(x, "int4", axis=-1, group_size=128)
"""
from lowbit_jax import formats
from lowbit_jax.core import (TENSOR, QArray, QuantSpec, cast, dequantize, fake_quant,
                             ops, quantize)

__version__ = "0.1.0"

__all__ = ["formats", "cast", "quantize", "dequantize", "fake_quant", "QArray",
           "QuantSpec", "TENSOR", "ops"]
