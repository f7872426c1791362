"""Pure numerics: cast, quantize/dequantize/fake_quant, QArray, quantized ops."""
from lowbit_jax.core import ops
from lowbit_jax.core import scaling
from lowbit_jax.core._cast import cast, decode, encode
from lowbit_jax.core._hadamard import hadamard, hadamard_factors, hadamard_transform
from lowbit_jax.core._qarray import QArray
from lowbit_jax.core._quantize import (dequantize, fake_quant, init_scale, quantize,
                                       scale_shape)
from lowbit_jax.core._spec import TENSOR, QuantSpec, as_spec

__all__ = ["cast", "encode", "decode", "QArray", "QuantSpec", "TENSOR", "as_spec",
           "quantize", "dequantize", "fake_quant", "scale_shape", "init_scale", "ops",
           "scaling", "hadamard", "hadamard_factors", "hadamard_transform"]
