"""Pure numerics: cast, quantize/dequantize/fake_quant, QArray, quantized ops."""
from lowbit_jax.core import ops
from lowbit_jax.core._cast import cast, decode, encode
from lowbit_jax.core._qarray import QArray
from lowbit_jax.core._quantize import dequantize, fake_quant, quantize
from lowbit_jax.core._spec import TENSOR, QuantSpec, as_spec

__all__ = ["cast", "encode", "decode", "QArray", "QuantSpec", "TENSOR", "as_spec",
           "quantize", "dequantize", "fake_quant", "ops"]
