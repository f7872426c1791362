"""Flax adapters: quantize Linen and NNX models by rules, without editing them.

The only package of lowbit_jax (besides the reference models) that imports
flax. Linen models are reached by method interception (``quantize_linen``),
NNX models by rewriting their module graph (``quantize_nnx``); both match the
same ``lowbit_jax.QuantRule`` s on the same paths as ``quantize_function``.
``ActEinsum`` (Linen) and ``NnxActEinsum`` (NNX) name an activation x
activation einsum (attention's q.k and p.v) so that rules listing
``"act_matmul"`` reach it; ``RaggedDense`` (Linen) and ``NnxRaggedDense``
(NNX) are grouped matmuls (MoE experts, ``jax.lax.ragged_dot``) that rules
reach as ``"ragged_dot"`` sites.
"""
from lowbit_jax.flax._linen import (METRICS, RNG, SCALES, STATE, STATS, ActEinsum,
                                    LinenQuantizer, QBox, QuantizedParam,
                                    RaggedDense, quantize_linen)
from lowbit_jax.flax._capture import (Capture, DenseStats, ExpertStats,
                                     capture_dense_stats)
from lowbit_jax.flax.ptq import apply_ptq
from lowbit_jax.flax._nnx import (NnxActEinsum, NnxRaggedDense, QuantHistory, QuantMetric, QuantOp,
                                  QuantScale,
                                  QuantStat, dequantize_nnx, finalize_nnx,
                                  init_quant_nnx, nnx_stats, quantize_nnx,
                                  update_histories)

from lowbit_jax.flax import _serialization  # noqa: F401  (flax.serialization of QArrays)

__all__ = ["quantize_linen", "LinenQuantizer", "QBox", "QuantizedParam", "STATS",
           "SCALES", "STATE", "METRICS", "RNG", "ActEinsum",
           "RaggedDense", "apply_ptq", "capture_dense_stats", "Capture", "DenseStats", "ExpertStats",
           "quantize_nnx", "QuantOp", "QuantStat", "QuantScale", "QuantHistory",
           "QuantMetric", "finalize_nnx", "nnx_stats", "dequantize_nnx",
           "init_quant_nnx", "update_histories", "NnxActEinsum", "NnxRaggedDense"]
