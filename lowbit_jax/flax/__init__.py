"""Flax adapters: quantize Linen and NNX models by rules, without editing them.

The only package of lowbit_jax (besides the reference models) that imports
flax. Linen models are reached by method interception (``quantize_linen``),
NNX models by rewriting their module graph (``quantize_nnx``); both match the
same ``lowbit_jax.QuantRule`` s on the same paths as ``quantize_function``.
"""
from lowbit_jax.flax._linen import (STATS, LinenQuantizer, QBox, QuantizedParam,
                                    quantize_linen)
from lowbit_jax.flax._capture import Capture, DenseStats, capture_dense_stats
from lowbit_jax.flax.ptq import apply_ptq
from lowbit_jax.flax._nnx import (QuantOp, QuantStat, dequantize_nnx, finalize_nnx,
                                  nnx_stats, quantize_nnx)

__all__ = ["quantize_linen", "LinenQuantizer", "QBox", "QuantizedParam", "STATS",
           "apply_ptq", "capture_dense_stats", "Capture", "DenseStats",
           "quantize_nnx", "QuantOp", "QuantStat", "finalize_nnx", "nnx_stats",
           "dequantize_nnx"]
