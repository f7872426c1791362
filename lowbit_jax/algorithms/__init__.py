"""PTQ algorithms as pure functions over weights and calibration statistics.

Every function takes Flax Dense kernels ``w[K, N]`` (K inputs, the contraction
axis; ``y = x @ w``) and statistics of the layer's inputs, and never touches a
model; ``lowbit_jax.flax.ptq.apply_ptq`` collects the statistics from a Linen
model and folds the results back into its parameters.

* ``rtn``: round to nearest (baseline).
* ``gptq``: GPTQ (Frantar et al. 2023).
* ``awq_search`` / ``awq_clip_search``: AWQ's scale and clip searches (Lin et
  al. 2024).
* ``smoothquant_scales``: SmoothQuant (Xiao et al. 2023).
* ``random_hadamard`` / ``rotate_weights``: QuaRot-style rotations (Ashkboos et
  al. 2024); ``rotate_model``: the whole QuaRot fold on any pre-norm model
  (residual stream found from its jaxpr, online Hadamard sites); ``r3_rules``:
  SpinQuant's online Hadamard on queries and keys (R3).
* ``spinquant_model`` / ``cayley_sgd``: SpinQuant's learned rotations (Liu et
  al. 2024), optimised with Cayley SGD (Li et al. 2020) and folded as QuaRot.
* ``omniquant_block`` / ``OmniQuantOptions``: OmniQuant's learnable weight
  clipping and equivalent transforms on one block (Shao et al. 2024);
  ``lwc_quant`` / ``let_fold`` its two parts.
* ``allocate_bits``: per-layer format choice under a bits-per-weight budget.
"""
from lowbit_jax.algorithms.awq import (AWQClipResult, AWQResult, awq_clip_search,
                                       awq_scales, awq_search, clip_ratios)
from lowbit_jax.algorithms.gptq import GPTQResult, gptq, gram
from lowbit_jax.algorithms.mixed_precision import (Allocation, allocate_bits,
                                                   assignment_to_rules, rules_bits,
                                                   spec_bits, weight_sensitivity)
from lowbit_jax.algorithms.omniquant import (LETGroup, OmniQuantBlockResult,
                                             OmniQuantOptions, let_fold, let_init,
                                             lwc_init, lwc_quant, lwc_step,
                                             omniquant_block)
from lowbit_jax.algorithms.rotation import (R3_PATHS, RotatedModel, fuse_gains,
                                            hadamard_matrix, r3_rules,
                                            head_pairs, random_hadamard,
                                            random_orthogonal, rotate_heads,
                                            rotate_inputs, rotate_model,
                                            rotate_residual, rotate_weights,
                                            walsh_hadamard_transform)
from lowbit_jax.algorithms.spinquant import (CayleySGDState, SpinQuantConfig,
                                             cayley_sgd, cayley_step, next_token_loss,
                                             orthogonality_error, spinquant_model)
from lowbit_jax.algorithms.rtn import (hessian_error, kernel_spec, output_error, rtn,
                                       rtn_scale, rtn_scales, sqnr_db)
from lowbit_jax.algorithms.smoothquant import (smooth_inputs, smooth_weights,
                                               smoothquant_scales)

__all__ = [
    "rtn", "rtn_scale", "rtn_scales", "kernel_spec", "sqnr_db", "output_error",
    "hessian_error",
    "gptq", "GPTQResult", "gram",
    "awq_search", "awq_scales", "AWQResult", "awq_clip_search", "AWQClipResult",
    "clip_ratios",
    "smoothquant_scales", "smooth_weights", "smooth_inputs",
    "omniquant_block", "OmniQuantOptions", "OmniQuantBlockResult", "LETGroup",
    "lwc_init", "lwc_step", "lwc_quant", "let_init", "let_fold",
    "hadamard_matrix", "walsh_hadamard_transform", "random_orthogonal",
    "random_hadamard", "rotate_weights", "rotate_inputs", "rotate_model",
    "rotate_residual", "RotatedModel", "r3_rules", "R3_PATHS", "fuse_gains",
    "head_pairs", "rotate_heads",
    "spinquant_model", "SpinQuantConfig", "cayley_sgd", "cayley_step",
    "CayleySGDState", "next_token_loss", "orthogonality_error",
    "allocate_bits", "Allocation", "assignment_to_rules", "rules_bits", "spec_bits",
    "weight_sensitivity",
]
