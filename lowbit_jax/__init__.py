"""lowbit_jax: low-bit number formats, PTQ and QAT for JAX/Flax models.

>>> import lowbit_jax as lb
>>> y = lb.fake_quant(x, "int4", axis=-1, group_size=128)

Flax adapters live in ``lowbit_jax.flax`` and orbax checkpoints in
``lowbit_jax.checkpoint``, so that importing the core needs neither.
"""
from lowbit_jax import calibration
from lowbit_jax import formats
from lowbit_jax._fold import FoldPlan, ScalingFold, find_scaling_folds
from lowbit_jax._function import QuantizedFunction, quantize_function
from lowbit_jax._ptq import (Capture, InputStats, PTQResult, SiteResult, SiteStats,
                             capture_hessians, mixed_precision_rules, ptq_params,
                             quantize_site, real_mode_kwargs)
from lowbit_jax._rules import (QuantConfig, QuantRule, QWeight, WeightPlan, plan_weight,
                               quantize_params)
from lowbit_jax.core import (TENSOR, QArray, QuantSpec, cast, dequantize, fake_quant,
                             init_scale, ops, quantize, scale_shape, scaling)

__version__ = "0.1.0"

__all__ = ["formats", "calibration", "cast", "quantize", "dequantize", "fake_quant",
           "scale_shape", "init_scale", "scaling",
           "QArray", "QuantSpec", "TENSOR", "ops", "QuantRule", "QuantConfig",
           "QWeight", "WeightPlan", "plan_weight", "quantize_params",
           "quantize_function", "QuantizedFunction", "capture_hessians", "ptq_params",
           "quantize_site", "real_mode_kwargs", "mixed_precision_rules", "SiteStats",
           "Capture", "PTQResult", "SiteResult", "InputStats", "find_scaling_folds",
           "ScalingFold",
           "FoldPlan"]
