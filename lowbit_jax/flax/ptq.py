"""Apply a PTQ algorithm to an unmodified Flax Linen model: ``apply_ptq``.

``apply_ptq`` is the Linen front door of the one PTQ driver,
``lowbit_jax.ptq_params`` (docs/ptq_front_ends.md). Its arguments
(``weight_spec`` / ``layers``) choose a spec per Dense, conv and RaggedDense
layer, and

* "rtn" and "gptq" run ``ptq_params`` on those layers' sites
  (``capture_hessians`` through the rules machinery, then GPTQ/RTN per site as
  pure functions): the kernels and scales are the ones ``ptq_params`` gives a
  Linen model with the same rules, bit for bit (tests/flax/test_ptq_front_door.py);
* "quarot" and "spinquant" rotate with ``_ptq_rotation.rotate_checked`` (the
  rotation driver of ``ptq_params(..., method="quarot" | "spinquant")``), then
  round the rotated model the same way, captured under the online-Hadamard
  rules as ``ptq_params`` does;
* "awq", "smoothquant" and "rotation" stay a Linen-only extension (below:
  ``capture_dense_stats`` at call boundaries, folds checked numerically, with
  ``act_spec`` in AWQ's objective, ``quantizer="gptq"``, ``extra_folds``,
  ``unfoldable="simulate"``, per-expert folds and folds into conv producers),
  and "omniquant" the block-wise driver ``flax._omniquant``: ``ptq_params``
  finds its folds in the jaxpr instead, which folds in more places, so these
  methods give different kernels there (``apply_ptq``'s docstring says where).

The Linen-only extension

1. runs the model on calibration batches and collects, per ``nn.Dense``, input
   statistics (``capture_dense_stats``: Gram matrix, per-channel absmax and
   mean |x|, a retained sample of rows) and the structure seen at call
   boundaries (which layers read the same array; which norm or Dense produced
   it);
2. computes one transformation (SmoothQuant, AWQ, rotation) per group of
   layers reading the same input and folds it into
   the parameters where that is exact: the inverse scaling into the producing
   ``nn.LayerNorm`` / ``nn.RMSNorm`` (scale and bias) or ``nn.Dense`` (kernel
   columns and bias), the forward one into the consumers' kernel rows;
3. quantizes every selected Dense kernel with RTN or GPTQ (on the transformed
   kernel and the transformed Gram matrix) and returns float parameters whose
   kernels hold the fake-quantized values.

Foldability is checked, not assumed: a fold is applied only if a random
transformation of the same kind folded the same way leaves the float model's
output unchanged (relative error below ``fold_rtol``) on the first calibration
batch. That rejects, for example, a LayerNorm whose output also feeds a
residual connection (post-LN BERT: every LayerNorm), a rotation into a norm
(only diagonal scalings fold into a norm), or a producer whose output is also
read elsewhere. A group without an exact fold is skipped (its layers get the
plain quantizer) unless ``unfoldable="simulate"``: then the kernel is returned
as ``T^-1 Q(T w)``, which equals running the transformation online with
weight-only quantization, but is not on the spec's grid and is not valid with
activation quantization. Attention's value->output pair is linear per channel
but passes through an einsum, so it is not seen at call boundaries; declare it
with ``extra_folds={"…/out": "…/value"}`` (diagonal scalings fold exactly; a
rotation needs ``rotation_block_size`` = the head size).

Method ``"quarot"`` is QuaRot's whole-model rotation instead (Ashkboos et al.
2024, ``lowbit_jax.algorithms.rotate_model``): the residual stream is found in
the jaxpr of ``model.apply``, every RMS norm gain is fused into the layers that
read it, one randomized Hadamard is folded into every reader and writer of the
stream, and the kernels matching ``online`` (e.g. ``".*/down_proj/kernel"``)
are pre-rotated for an online Hadamard of their input. The float model with
``report["rotation"].rules()`` is checked to equal the original before any
quantization; inference must run with ``report["rotation"].rules(rules)``.

Method ``"spinquant"`` learns those rotations instead (Liu et al. 2024,
``lowbit_jax.algorithms.spinquant_model``): starting from QuaRot's, the
residual rotation (and with ``heads`` the per-head value/output rotations) are
optimised with Cayley SGD on the calibration batches to minimise the
quantized model's loss (``weight_spec`` RTN weights and ``act_spec``
activations, fake-quantized with straight-through gradients; next-token cross
entropy by default), then folded exactly as QuaRot folds them and checked the
same way; ``report["spinquant"]`` holds the quantized loss before and after.
Both rotations run in ``lowbit_jax._ptq_rotation.rotate_checked``; the
rotated model's Dense, expert and conv layers are then rounded by
``ptq_params`` (the shared path above).

MoE experts (``lowbit_jax.flax.RaggedDense``: a grouped matmul with a
``[G, K, N]`` kernel, e.g. the decoder's ``moe_impl="ragged"`` experts) are
quantized per expert: the capture builds expert ``g``'s Hessian (Gram matrix)
from only the tokens routed to it, GPTQ runs on each expert with its own
Hessian, RTN rounds each expert on its own grid (scales per expert and output
channel, or groups along K), and ``report["quant_scales"]`` carries the
``[G, ...]`` scale grid so real mode stores exactly those codes. An expert
that received no calibration token has no Hessian: it is rounded to nearest
and listed in its layer's ``report["layers"][path]["rtn_fallback"]`` (with
``calibration_tokens``, the tokens each expert saw). AWQ and SmoothQuant
transform experts in two exact folds, both checked numerically like every
other fold: (1) the experts whose input is a gather of a norm's output (the
gate and up projections) join the group of that norm's other readers (the
router): one scaling shared by all experts (a per-expert one has no exact
fold into the shared norm), searched with every expert's kernel, folded into
the norm gain, the router and every expert's input rows; (2) an expert
layer whose input is produced per expert by another expert layer of the same
module (the down projection, from the up projection across SwiGLU's
elementwise product) takes one scaling *per expert*, from only the tokens
routed to that expert (SmoothQuant: their absmax; AWQ: the grid search on
their retained rows), folded into that expert's producer columns; an expert
with no routed token keeps scale 1 (``unscaled_experts`` in the fold entry).
AWQ's clip search runs on each expert with only the retained rows routed to
it (``_experts.clip_experts``, as ``ptq_params`` does; an expert without such
rows is rounded unclipped and listed in ``clip_rtn_fallback``). The per-group
rotation method
("rotation") cannot fold into experts exactly: the gate/up experts read a
gather of a norm's output (a rotation does not fold into a norm's elementwise
gain) and the down experts read an elementwise product, which a rotation does
not commute with. With ``unfoldable="skip"`` they are left unrotated and
``report["folds"]`` says why; with ``unfoldable="simulate"`` each expert
layer's kernel ``[G, K, N]`` gets a randomized Hadamard ``R`` along K applied
to every expert on its own (the rotation acts on K, the same axis for each
expert, so the experts are independent): ``R Q(R^T w_e)``, quantized with
RTN or with GPTQ on the rotated per-expert Hessian ``R^T H_e R``, which equals
running ``x R`` online before a weight-only quantized expert (fold status
``"simulated"``; no stored scales, the kernel is off the spec's grid). QuaRot ("quarot") does: the residual stream is followed through the
gather of routed tokens into the experts, so its rotation folds into every
expert's gate/up (readers) and down (writers) kernels, and ``online`` puts
the Hadamard in front of each down expert (a ``ragged_dot`` site).

Convolutions (``nn.Conv`` and ``nn.ConvTranspose``; docs/ptq_convolutions.md)
are captured as the matmul their kernel performs (``capture_hessians`` on
the shared path, ``capture_dense_stats`` on the Linen-only one, with the same
rows: the im2col patches of the input, features in ``conv_matrix(kernel)``'s
``(*window, cin)`` order; a transposed conv's are the patches of the
input-dilated conv ``lax.conv_transpose`` lowers to, taken through its
``transpose_kernel`` flip and its CIRCULAR wrap, so the rows times the
kernel matrix are the layer's output). RTN and GPTQ run on that
``[prod(window)*cin, cout]`` kernel (GPTQ's Hessian is the patches' Gram
matrix) with the grid the conv rule uses in real mode (per output channel,
or groups along the input channels: ``group_size`` must divide ``cin``), and
the kernel is reshaped back; ``report["quant_scales"]`` holds the
kernel-shaped scale grid, so real mode (``quantize_linen``, which reaches
``nn.ConvTranspose`` through the same lowering) equals the PTQ result. Rules
from mixed precision (``weight_sensitivity`` on the kernel matrix and the
same Gram matrix) apply to convs as to Dense layers. AWQ and SmoothQuant
scale a conv's input channels: the convs reading one input share one
``s[cin]`` (their kernels' input-channel axis times ``s``, the patches
divided by ``s`` tiled over the window), folded into the module that
produced the input: a norm's scale and bias (LayerNorm, RMSNorm, BatchNorm,
GroupNorm), a Dense's output columns or a conv's output channels and bias,
taken either as the module that returned the input or, through elementwise
ops, as the latest one whose output has the input's shape; like every fold
it is kept only if a random positive scaling folded the same way leaves the
float output unchanged (a ReLU between passes; a GELU, a residual
connection, a conv whose input is the model's input do not: skipped, with
the reason in ``report["folds"]``, and quantized with ``quantizer`` alone;
``unfoldable="simulate"`` does not apply to convs).
SmoothQuant takes ``s`` from the per-channel absmax of the input and of the
kernels' rows; AWQ grid-searches ``alpha`` with the error summed over the
group's convs, each on its own patches, then runs its clip search on each
kernel matrix. The per-group rotation method does not transform convs
(reported); "quarot"/"spinquant" rotate no conv kernel (their rotation
folds into matmul readers and writers only) and RTN/GPTQ convs the same
way, also reported; "omniquant" leaves convs float. Grouped/depthwise
(``feature_group_count > 1``), masked and unshared convs are not captured:
they stay float, each listed in ``report["folds"]`` as skipped with the
reason (a depthwise conv can still be the producer a scaling folds into).

Calibration statistics come from one pass of the float model (all layers
calibrated in parallel, not sequentially on quantized predecessors).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.algorithms.awq import awq_clip_search, awq_scales, awq_search
from lowbit_jax.algorithms.gptq import gptq
from lowbit_jax.algorithms.rotation import R3_PATHS, random_hadamard
from lowbit_jax.algorithms.spinquant import SpinQuantConfig
from lowbit_jax.algorithms.smoothquant import smoothquant_scales
from lowbit_jax.algorithms.rtn import kernel_spec, rtn, rtn_scale, sqnr_db
from lowbit_jax._rules import QuantRule, _expand_grid, conv_weight_spec
from lowbit_jax.core import QuantSpec, as_spec, fake_quant, init_scale
from lowbit_jax.flax._capture import (Capture, DenseStats, ExpertStats,
                                     capture_dense_stats, conv_matrix, conv_unmatrix,
                                     split_batch)
from lowbit_jax.formats import Format
from lowbit_jax.algorithms._tree import with_leaves
from lowbit_jax._experts import clip_experts, expert_spec, quantize_experts
from lowbit_jax import _ptq, _ptq_rotation

METHODS = ("rtn", "gptq", "awq", "smoothquant", "rotation", "quarot", "spinquant",
           "omniquant")
_WHOLE_MODEL_ROTATIONS = _ptq_rotation.METHODS
# The methods apply_ptq runs through ptq_params (the shared driver), and those
# that stay Linen-only (apply_ptq's docstring says why).
SHARED_METHODS = ("rtn", "gptq") + _WHOLE_MODEL_ROTATIONS
_LINEN_METHODS = tuple(m for m in METHODS if m not in SHARED_METHODS)
# AWQ's clip search skips the query and key projections (their error passes
# through q.k and a softmax, which the layer-wise objective does not see; the
# paper's code does the same).
AWQ_CLIP_SKIP = r".*(q_proj|k_proj|query|key)"
QUANTIZERS = _ptq_rotation.QUANTIZERS
_HI = jax.lax.Precision.HIGHEST
WeightSpec = Union[None, QuantSpec, str, Format, Sequence[tuple]]


# ---------------------------------------------------------------------------
# Params trees


def _node(tree: Any, path: str) -> Any:
  node = tree
  for part in path.split("/") if path else []:
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


# ---------------------------------------------------------------------------
# Transformations: x' = x M, w' = M^-1 w


class _Transform:
  """A diagonal scaling (``x / s``, ``diag(s) w``) or a rotation (``x R``, ``R^T w``)."""

  def __init__(self, s: Optional[jax.Array] = None, r: Optional[jax.Array] = None):
    self.s, self.r = s, r

  @property
  def diagonal(self) -> bool:
    return self.s is not None

  def weight(self, w):
    w32 = w.astype(jnp.float32)
    if self.diagonal:
      return (w32 * self.s[:, None]).astype(w.dtype)
    return jnp.matmul(self.r.T, w32, precision=_HI).astype(w.dtype)

  def unweight(self, w):
    w32 = w.astype(jnp.float32)
    if self.diagonal:
      return (w32 / self.s[:, None]).astype(w.dtype)
    return jnp.matmul(self.r, w32, precision=_HI).astype(w.dtype)

  def inputs(self, x):
    if self.diagonal:
      return x / self.s
    return jnp.matmul(x, self.r, precision=_HI)

  def gram(self, g):
    if self.diagonal:
      return g / (self.s[:, None] * self.s[None, :])
    return jnp.matmul(jnp.matmul(self.r.T, g, precision=_HI), self.r, precision=_HI)

  def stats(self, st: DenseStats) -> DenseStats:
    sample = self.inputs(st.sample)
    if self.diagonal:
      absmax, abssum = st.absmax / self.s, st.abssum / self.s
    else:
      # Not determined by the untransformed statistics: from the sample.
      absmax = jnp.max(jnp.abs(sample), axis=0) if sample.shape[0] else st.absmax
      abssum = (jnp.mean(jnp.abs(sample), axis=0) * st.count if sample.shape[0]
                else st.abssum)
    return DenseStats(self.gram(st.gram), absmax, abssum, st.count, sample)

  def fold_into(self, params: dict, kind: str, path: str) -> dict:
    """Folds the input-side transformation into the producer at ``path``."""
    node = _node(params, path)
    if kind == "norm":
      new = {"scale": (node["scale"].astype(jnp.float32) / self.s).astype(
          node["scale"].dtype)}
      if "bias" in node:
        new["bias"] = (node["bias"].astype(jnp.float32) / self.s).astype(
            node["bias"].dtype)
      return with_leaves(params, path, **new)
    k = node["kernel"]
    if self.diagonal:
      new = {"kernel": (k.astype(jnp.float32) / self.s[None, :]).astype(k.dtype)}
      if "bias" in node:
        new["bias"] = (node["bias"].astype(jnp.float32) / self.s).astype(
            node["bias"].dtype)
    else:
      new = {"kernel": jnp.matmul(k.astype(jnp.float32), self.r,
                                  precision=_HI).astype(k.dtype)}
      if "bias" in node:
        new["bias"] = jnp.matmul(node["bias"].astype(jnp.float32), self.r,
                                 precision=_HI).astype(node["bias"].dtype)
    return with_leaves(params, path, **new)


def _foldable_kind(params: dict, kind: str, path: str, k: int, diagonal: bool):
  """None if a transformation of width k can fold into the producer, else why not."""
  node = _node(params, path)
  if node is None:
    return f"producer {path!r} has no parameters"
  if kind == "norm":
    if not diagonal:
      return "a rotation does not fold into a norm (only diagonal scalings do)"
    if "scale" not in node:
      return f"norm {path!r} has no scale parameter (use_scale=False)"
    if tuple(node["scale"].shape) != (k,):
      return f"norm {path!r} scale has shape {node['scale'].shape}, not ({k},)"
    return None
  if "kernel" not in node or node["kernel"].ndim != 2 or node["kernel"].shape[1] != k:
    return f"producer {path!r} is not a 2-d Dense with {k} outputs"
  return None


# ---------------------------------------------------------------------------
# Driver


def _rule_spec(weight_spec: WeightSpec, path: str) -> Optional[QuantSpec]:
  """The spec ``weight_spec`` gives the layer at ``path`` (first match), or None."""
  if weight_spec is None:
    return None
  if isinstance(weight_spec, (list, tuple)):
    for rule in weight_spec:
      if isinstance(rule, QuantRule):
        if rule.matches(path) or rule.matches(path + "/kernel"):
          return rule.weight
        continue
      regex, spec = rule
      if re.fullmatch(regex, path):
        return None if spec is None else as_spec(spec)
    return None
  return as_spec(weight_spec)


def _resolve_spec(weight_spec: WeightSpec, path: str) -> Optional[QuantSpec]:
  """``_rule_spec`` as the spec of a ``[K, N]`` kernel (``kernel_spec``)."""
  spec = _rule_spec(weight_spec, path)
  return None if spec is None else kernel_spec(spec)


def _outputs_close(ref, out, rtol: float) -> bool:
  ok = True
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.dtype.kind != "f":
      continue
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-6)
    if not np.all(np.isfinite(b)) or float(np.max(np.abs(a - b))) > rtol * scale:
      ok = False
  return ok


def apply_ptq(model: nn.Module, params: Any, calib_batches: Sequence[Any], method: str,
              weight_spec: WeightSpec, act_spec: Optional[Any] = None, *,
              quantizer: str = "rtn", layers: str = ".*", alpha: float = 0.5,
              n_grid: int = 20, blocksize: int = 128, percdamp: float = 0.01,
              act_order: bool = False, rotation_seed: int = 0,
              rotation_block_size: Optional[int] = None,
              extra_folds: Optional[Mapping[str, str]] = None,
              unfoldable: str = "skip", token_mask: Optional[Callable] = None,
              max_samples: int = 512, fold_rtol: float = 1e-3,
              apply_kwargs: Optional[Mapping[str, Any]] = None,
              other_variables: Optional[Mapping[str, Any]] = None,
              online: Optional[str] = None, heads: Optional[tuple] = None,
              spinquant: Optional[SpinQuantConfig] = None,
              awq_clip: bool = True, awq_clip_skip: Optional[str] = AWQ_CLIP_SKIP,
              omniquant: Optional[Any] = None,
              r3: Union[bool, tuple] = False) -> tuple[Any, dict]:
  """Runs a PTQ method on a Linen model's Dense, MoE expert and Conv layers.

  Methods: "rtn" (round to nearest), "gptq" (Frantar et al. 2023), "awq" (Lin
  et al. 2024: scale search, then by default its clip search), "smoothquant"
  (Xiao et al. 2023), "rotation" (randomized Hadamard, QuaRot: Ashkboos et al.
  2024), "quarot" (QuaRot's whole-model fold), "spinquant" (SpinQuant's
  learned rotations: Liu et al. 2024), "omniquant" (Shao et al. 2024: learnable
  weight clipping and equivalent transforms trained block by block; see
  ``lowbit_jax.flax._omniquant``). See the module docstring for how
  transformations are folded. ``nn.Conv`` and ``nn.ConvTranspose`` layers get
  RTN or GPTQ on their im2col-patch statistics (every method but
  "omniquant"); AWQ and SmoothQuant fold a scaling of their input channels
  into the producing conv, Dense or norm where that is exact, else skip them
  with a reason in ``report["folds"]`` (module docstring).

  The shared driver and the Linen-only extension. "rtn", "gptq", "quarot"
  and "spinquant" (``SHARED_METHODS``) translate ``weight_spec`` / ``layers``
  into per-site rules and run ``lowbit_jax.ptq_params`` (after
  ``rotate_checked`` for the rotations): the kernels and scales equal
  ``ptq_params``' on the same model and rules bit for bit (on the toy model
  of tests/_toy_models.py and the smoke Llama, RTN and GPTQ, QuaRot and
  SpinQuant with RTN or GPTQ). The treated layers are the sites whose
  parameter is a ``kernel``: 2-d matmul kernels (``nn.Dense``, and an
  ``nn.DenseGeneral`` over one axis: the same matmul), convs and
  ``RaggedDense`` experts; an ``nn.Einsum``, a DenseGeneral over several axes
  and an Embed's ``attend`` stay float, as before. These stay on the
  Linen-only extension, because ``ptq_params`` computes something else:

  * "awq", "smoothquant": ``ptq_params`` finds its folds in the jaxpr (a norm
    written as any module, attention's ``p @ v`` into value -> output, a
    gated product into up -> down), this path at call boundaries (Linen
    norms, Dense and conv producers, ``extra_folds``), checked numerically.
    Where both fold the same group (the smoke Llama's RMSNorm into gate/up)
    they agree to float tolerance (tests/test_ptq_scaling.py), but on the
    smoke Llama ``ptq_params`` also folds v/o and up/down (8 of its 14
    kernels differ) and on the toy model the custom norm into up. Only here:
    ``act_spec`` in AWQ's objective, ``quantizer="gptq"`` after the scaling,
    ``extra_folds``, ``unfoldable="simulate"``, the per-expert scaling of
    down experts folded into the up experts' columns, folds into BatchNorm,
    GroupNorm and conv producers.
  * "rotation": the same kernels where neither finds a fold (the toy model,
    the smoke Llama), but the folds are found differently (as above) and
    each group's ``R`` is keyed by its index in this path's groups; only
    here: ``unfoldable="simulate"`` (also on experts), ``quantizer="gptq"``,
    ``rotation_block_size`` for ``extra_folds``.
  * "omniquant": block-wise (LWC and LET with shifts, trained on each block's
    output, ``flax._omniquant``); ``ptq_params``' is layer-wise.

  Args:
    model: the Linen module (not modified).
    params: its params (``model.apply({"params": params}, ...)``).
    calib_batches: calibration batches; each is passed to ``model.apply`` as
      positional arguments (tuple/list), keyword arguments (dict) or one
      argument.
    method: one of ``METHODS``.
    weight_spec: the kernels' QuantSpec or format name (unset axis: the input
      features, i.e. per output channel or groups along K), or ordered
      ``(path_regex, spec or None)`` rules or ``QuantRule`` s (their weight
      spec; first full match wins; no match or None: the kernel stays float;
      e.g. ``assignment_to_rules`` output), or
      None to only fold the transformation (no weight quantization).
    act_spec: activation spec used at inference (applied by the caller, e.g. a
      quantization interceptor); here it enters AWQ's objective and the
      report's output SQNR. An unset axis means per token.
    quantizer: how transformed kernels are rounded for awq/smoothquant/
      rotation: "rtn" or "gptq".
    layers: regex of the Dense / RaggedDense / conv paths to treat; other layers are
      untouched. Experts are quantized per expert (module docstring).
    alpha: SmoothQuant migration strength.
    n_grid: AWQ grid size.
    blocksize, percdamp, act_order: GPTQ options (see ``algorithms.gptq``).
    rotation_seed: seed of the random rotations (one per group).
    rotation_block_size: block-diagonal rotations of this size (None: full).
    extra_folds: consumer Dense path -> producer Dense path, for linear
      per-channel links not visible at call boundaries (attention's value ->
      out); still checked numerically before folding.
    unfoldable: "skip" (no transformation where no exact fold exists) or
      "simulate" (``T^-1 Q(T w)``: weight-only simulation of an online
      transformation).
    token_mask: ``batch -> mask`` weighting calibration rows (padding: 0).
    max_samples: input rows retained per layer (AWQ search, report).
    fold_rtol: tolerance of the foldability check, relative to the largest
      model output.
    apply_kwargs: extra keyword arguments for ``model.apply`` (the
      Linen-only methods; ``ptq_params`` calls the model with each batch's
      arguments only).
    other_variables: non-param variable collections (e.g. batch_stats).
    online: methods "quarot"/"spinquant": regex of kernel paths that take an
      online Hadamard transform of their input (QuaRot's down projection:
      ``".*/down_proj/kernel"``); None: none.
    heads: methods "quarot"/"spinquant": ``(value_regex, out_regex,
      head_dim)``, a per-head Hadamard folded into value and output
      projections (see ``algorithms.rotate_model``; SpinQuant learns them);
      checked with the rest of the rotation.
    spinquant: method "spinquant": a ``SpinQuantConfig`` (steps, learning
      rate, which rotations, loss, seed of the Hadamard start; default
      ``SpinQuantConfig(seed=rotation_seed)``). The
      calibration batches must be positional arguments; the default loss
      (next-token cross entropy) needs tokens as the first.
    awq_clip: method "awq": after the scale search, clip each block of each
      kernel by AWQ's grid search (``algorithms.awq_clip_search``, on the
      scaled inputs); the quantizer then rounds the clipped kernel and the
      scales in ``quant_scales`` are the clipped ranges. On by default, as in
      the paper's recipe; False: scales only.
    awq_clip_skip: regex of Dense paths the clip search leaves alone (default
      ``AWQ_CLIP_SKIP``: query and key projections, as the paper's code);
      None: clip every layer.
    omniquant: method "omniquant": an ``algorithms.OmniQuantOptions`` (steps,
      learning rates, lwc / let on or off, the block regex, ...); None: its
      defaults.
    r3: methods "quarot"/"spinquant": SpinQuant's R3 (Liu et al. 2024, Sec. 3),
      an online Hadamard on queries and keys after the rotary embedding (no
      weight changes): True for the decoder's paths
      (``algorithms.rotation.R3_PATHS``: ``.*/attn/qk`` and
      ``.*/attn/cache/key``), or ``(qk_regex, cache_key_regex)`` (either
      None). ``report["rotation"].rules(rules)`` then adds it to the
      attention ``"act_matmul"`` rules, and ``.rules(cache_rules)`` to the KV
      cache rules (``algorithms.r3_rules``).

  Returns:
    ``(new_params, report)``: params of the same structure with each treated
    kernel replaced by its fake-quantized value (and folds applied), and a
    report dict: ``layers`` (layer path -> spec, transform, fold,
    weight_sqnr_db, output_sqnr_db (on the retained input rows), seconds; for
    an expert layer also ``experts``, ``calibration_tokens`` per expert and
    ``rtn_fallback``, the experts GPTQ rounded to nearest for want of
    calibration tokens; on the shared path also ``ptq_params``' ``error``,
    ``rtn_error``, ``error_vs_rtn`` and ``rows``; a layer the spec leaves
    float: its spec None), ``folds`` (one entry per group), ``method``,
    ``capture_seconds``, ``total_seconds``, ``quant_scales`` (the scale grid
    each quantized kernel was rounded with, for symmetric specs, nested as
    the ``"quant_scales"`` collection: ``{"layer": {"weight_scale": s}}``;
    pass ``{"params": new_params, "quant_scales": report["quant_scales"]}``
    to ``LinenQuantizer.quantize_params`` for real mode, whose codes then
    equal the PTQ result exactly: re-deriving a scale from a GPTQ kernel's
    amax changes some codes, since a group's final values need not reach the
    range it was rounded with); for "quarot" and "spinquant" also
    ``rotation`` (the ``RotatedModel``: run inference with
    ``rotation.rules(rules)``); for "spinquant" ``spinquant`` (the learning
    history of ``spinquant_model``: quantized loss before/after); for
    "awq" each clipped layer's entry has ``clip_mean_ratio`` and
    ``clip_error_vs_rtn`` (an expert layer: ``clip_mean_ratio`` over its
    clipped experts and ``clip_rtn_fallback``, those without retained rows);
    for "omniquant" also ``blocks`` (block path ->
    ``loss_rtn``, ``loss_init``, ``loss``: block output MSE with RTN, at the
    start and after training) and ``omniquant`` (the options used).

  Raises:
    ValueError: an unknown method/quantizer/unfoldable, an unusable spec (for
      a conv: an axis or tile set, or a group size not dividing its input
      channels), or no Dense layer matched.
  """
  t_start = time.perf_counter()
  _check_options(method, weight_spec, act_spec, quantizer=quantizer,
                 unfoldable=unfoldable, online=online, heads=heads, r3=r3,
                 spinquant=spinquant, awq_clip=awq_clip, awq_clip_skip=awq_clip_skip,
                 omniquant=omniquant, apply_kwargs=apply_kwargs)
  aspec = None
  if act_spec is not None:
    aspec = as_spec(act_spec)
    if aspec.axis is None and aspec.tile is None:
      aspec = aspec.replace(axis=-1)
  calib_batches = list(calib_batches)
  if not calib_batches:
    raise ValueError("calib_batches is empty; pass at least one batch")
  frozen = isinstance(params, flax.core.FrozenDict)
  cur = flax.core.unfreeze(params) if frozen else jax.tree.map(lambda a: a, params)
  if method in SHARED_METHODS:
    cur, report = _shared_ptq(
        model, cur, calib_batches, method, weight_spec, aspec, quantizer=quantizer,
        layers=layers, token_mask=token_mask, max_samples=max_samples,
        seed=rotation_seed, online=online, heads=heads, spinquant=spinquant, r3=r3,
        fold_rtol=fold_rtol, other_variables=other_variables,
        gptq_kw={"blocksize": blocksize, "percdamp": percdamp, "act_order": act_order})
  elif method == "omniquant":
    from lowbit_jax.flax import _omniquant  # pylint: disable=g-import-not-at-top
    cur, report = _omniquant.run(
        model, cur, calib_batches, weight_spec, aspec, layers=layers,
        extra_folds=dict(extra_folds or {}), token_mask=token_mask,
        max_samples=max_samples, fold_rtol=fold_rtol, apply_kwargs=apply_kwargs,
        other_variables=other_variables, options=omniquant)
  else:
    cur, report = _linen_ptq(
        model, cur, calib_batches, method, weight_spec, aspec, quantizer=quantizer,
        layers=layers, alpha=alpha, n_grid=n_grid, rotation_seed=rotation_seed,
        rotation_block_size=rotation_block_size, extra_folds=dict(extra_folds or {}),
        unfoldable=unfoldable, token_mask=token_mask, max_samples=max_samples,
        fold_rtol=fold_rtol, apply_kwargs=apply_kwargs, other_variables=other_variables,
        awq_clip=awq_clip, awq_clip_skip=awq_clip_skip,
        gptq_kw={"blocksize": blocksize, "percdamp": percdamp, "act_order": act_order})
  report["total_seconds"] = time.perf_counter() - t_start
  return (flax.core.freeze(cur) if frozen else cur), report


def _check_options(method: str, weight_spec, act_spec, *, quantizer: str,
                   unfoldable: str, online, heads, r3, spinquant, awq_clip: bool,
                   awq_clip_skip: Optional[str], omniquant, apply_kwargs) -> None:
  """Raises unless ``apply_ptq``'s options fit ``method`` (messages say how to fix)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if quantizer not in QUANTIZERS:
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
  if (online is not None or heads is not None) and method not in _WHOLE_MODEL_ROTATIONS:
    raise ValueError(f"online= and heads= apply to method='quarot' or 'spinquant', "
                     f"not {method!r}")
  if not isinstance(r3, bool) and not (isinstance(r3, tuple) and len(r3) == 2):
    raise TypeError(f"r3 must be True/False or a (qk_regex, cache_key_regex) pair, "
                    f"got {r3!r}")
  if r3 is not False and method not in _WHOLE_MODEL_ROTATIONS:
    raise ValueError(f"r3= applies to method='quarot' or 'spinquant', not {method!r}")
  if spinquant is not None and method != "spinquant":
    raise ValueError(f"spinquant= applies to method='spinquant', not {method!r}")
  if method in ("rtn", "gptq") and quantizer != "rtn":
    raise ValueError(f"quantizer={quantizer!r} applies to awq/smoothquant/rotation; "
                     f"method={method!r} is itself the quantizer")
  if unfoldable not in ("skip", "simulate"):
    raise ValueError(f"unfoldable must be 'skip' or 'simulate', got {unfoldable!r}")
  if unfoldable == "simulate" and act_spec is not None:
    raise ValueError("unfoldable='simulate' models an online transformation for "
                     "weight-only quantization; with act_spec use unfoldable='skip'")
  if method == "awq" and weight_spec is None:
    raise ValueError("awq searches scales against a weight format: give weight_spec")
  if not isinstance(awq_clip, bool):
    raise TypeError(f"awq_clip must be True or False, got {awq_clip!r}")
  if method != "awq" and not awq_clip:
    raise ValueError(f"awq_clip applies to method='awq', not {method!r}")
  if awq_clip_skip is not None:
    re.compile(awq_clip_skip)
  if omniquant is not None and method != "omniquant":
    raise ValueError(f"omniquant= options apply to method='omniquant', not {method!r}")
  if method == "omniquant" and (quantizer != "rtn" or unfoldable != "skip"):
    raise ValueError("omniquant learns its own rounding ranges: leave quantizer and "
                     "unfoldable at their defaults")
  if method in SHARED_METHODS and apply_kwargs:
    raise ValueError(f"apply_kwargs= applies to {_LINEN_METHODS}; {method!r} runs "
                     "through ptq_params, which calls model.apply with each batch's "
                     "arguments only: put them in the batches (a dict batch is "
                     "keyword arguments) or in the module's attributes")


# ---------------------------------------------------------------------------
# The shared path: ptq_params on the layers apply_ptq treats


def _shared_ptq(model: nn.Module, params: dict, batches: list, method: str,
                weight_spec: WeightSpec, aspec: Optional[QuantSpec], *, quantizer: str,
                layers: str, token_mask, max_samples: int, seed: int, online, heads,
                spinquant, r3, fold_rtol: float, other_variables, gptq_kw: dict):
  """``apply_ptq``'s rtn/gptq/quarot/spinquant: ``ptq_params`` on its layers.

  QuaRot/SpinQuant rotate first (``_ptq_rotation.rotate_checked``, as
  ``ptq_params`` does); then every Dense (2-d kernel), conv and RaggedDense
  layer ``layers`` selects is captured with ``capture_hessians`` (through the
  online-Hadamard rules after a rotation) and its ``weight_spec`` spec
  rounded by ``ptq_params(capture=...)``.

  Returns:
    ``(new params, apply_ptq's report)``.
  """
  quant = "gptq" if method == "gptq" else quantizer
  report: dict = {"method": method, "quantizer": quant, "folds": []}
  extra = dict(other_variables or {})
  select = [QuantRule(layers, weight=_CAPTURED)]
  if method in _WHOLE_MODEL_ROTATIONS:
    params, rotated, history = _ptq_rotation.rotate_checked(
        _linen_fn(model, None, other_variables), params, batches, method,
        rules=_loss_rules(weight_spec, aspec, layers) if method == "spinquant" else (),
        seed=seed, online=online, heads=heads, config=spinquant, rtol=fold_rtol,
        quantize=_ptq_rotation.quantizer_for("linen"))
    if r3 is not False:
      rotated = dataclasses.replace(rotated, r3=R3_PATHS if r3 is True else r3)
    report["rotation"] = rotated
    if history is not None:
      report["spinquant"] = history
    select = list(rotated.rules(select))
  t0 = time.perf_counter()
  cap = _capture_layers(model, {"params": params, **extra}, batches, select, layers,
                        token_mask=token_mask, max_samples=max_samples, seed=seed)
  report["capture_seconds"] = time.perf_counter() - t0
  specs = {p: _rule_spec(weight_spec, _layer(p)) for p in cap.stats}
  for p, st in cap.stats.items():
    if st.op == "conv" and specs[p] is not None:   # real mode's grid, or why not
      _conv_spec(kernel_spec(specs[p]), _layer(p), st.shape, (st.in_axis, st.out_axis))
  res = _ptq.ptq_params(model, {"params": params, **extra}, batches, [], method=quant,
                        capture=_with_specs(cap, specs), **gptq_kw)
  new = res.params["params"]
  report["folds"] = [{"layers": [_layer(p)], "producer": None, "status": "skipped",
                      "reason": f"conv not quantized by apply_ptq: {why}"}
                     for p, why in sorted(cap.skipped.items())]
  if method in _WHOLE_MODEL_ROTATIONS:
    report["folds"] += [
        {"layers": [_layer(p)], "producer": None, "status": "skipped", "conv": True,
         "reason": f"conv: {method} rotates the residual stream of matmul readers and "
                   f"writers only; quantized with {quant} unrotated"}
        for p, st in cap.stats.items() if st.op == "conv"]
  report["layers"] = {
      _layer(p): _layer_entry(st, specs[p], res.report["layers"].get(p, {}),
                              _node(params, p), _node(new, p), cap.inputs.get(p), aspec)
      for p, st in cap.stats.items()}
  report["quant_scales"] = _ptq.real_mode_kwargs(res, "linen")["quant_scales"]
  return new, report


# Any spec: it only marks the sites capture_hessians records (the capture does
# not depend on it); each layer's own spec comes from weight_spec.
_CAPTURED = "int8"
_NO_LAYER = ("no nn.Dense (or RaggedDense) layer whose path fully matches {!r} was "
             "called; check the regex against paths like 'layers_0/mlp/up'")


def _layer(param_path: str) -> str:
  return param_path[: -len("/kernel")]


def _is_linen_layer(path: str, st: _ptq.SiteStats, op: str) -> bool:
  """Whether a captured site is one ``apply_ptq`` treats: an nn.Dense (a 2-d
  kernel), a conv or a RaggedDense (not an Einsum, a DenseGeneral over several
  axes or an Embed's attend)."""
  if not path.endswith("/kernel"):
    return False
  return op in ("conv", "ragged_dot") or (op == "dot_general" and len(st.shape) == 2)


def _capture_layers(model, variables, batches, rules, layers: str, *, token_mask,
                    max_samples: int, seed: int) -> _ptq.Capture:
  """``capture_hessians`` of the Dense, conv and expert layers ``layers`` selects."""
  try:
    cap = _ptq.capture_hessians(model, variables, batches, rules, token_mask=token_mask,
                                max_samples=max_samples, seed=seed)
  except ValueError as e:
    if str(e).startswith("no weight site was captured"):
      raise ValueError(_NO_LAYER.format(layers)) from e
    raise
  keep = [p for p, st in cap.stats.items() if _is_linen_layer(p, st, cap.sites[p].op)]
  if not keep:
    raise ValueError(_NO_LAYER.format(layers))
  return cap._replace(stats={p: cap.stats[p] for p in keep},
                      sites={p: cap.sites[p] for p in keep},
                      inputs={p: v for p, v in cap.inputs.items() if p in keep},
                      skipped={p: w for p, w in cap.skipped.items()
                               if p.endswith("/kernel")})


def _with_specs(cap: _ptq.Capture, specs: Mapping[str, Optional[QuantSpec]]):
  """The capture of the quantized sites only, each with its own weight spec."""
  sites = {p: dataclasses.replace(cap.sites[p], rule=QuantRule(re.escape(p), weight=s))
           for p, s in specs.items() if s is not None}
  return cap._replace(stats={p: cap.stats[p] for p in sites}, sites=sites)


def _layer_entry(st: _ptq.SiteStats, spec: Optional[QuantSpec], shared: dict, w, wq,
                 inputs: Optional[_ptq.InputStats], aspec) -> dict:
  """``apply_ptq``'s report entry of one layer ``ptq_params`` rounded (or left
  float): spec name, SQNRs of the kernel and of the outputs on the retained
  input rows, and ``ptq_params``' own fields (errors, rows, experts)."""
  entry = {**shared, "spec": None if spec is None else _spec_name(kernel_spec(spec)),
           "transform": "none", "fold": "none"}
  if st.op == "conv":
    entry["conv"] = True
  if spec is None:
    return entry
  entry["weight_sqnr_db"] = sqnr_db(w, wq)
  if inputs is not None and inputs.sample.shape[0]:
    x = inputs.sample
    xq = fake_quant(x, aspec) if aspec is not None else x
    if st.op == "ragged_dot":
      sel = inputs.sample_group
      ref = jnp.einsum("sk,skn->sn", x, w[sel].astype(jnp.float32), precision=_HI)
      out = jnp.einsum("sk,skn->sn", xq, wq[sel].astype(jnp.float32), precision=_HI)
    else:
      ref = jnp.matmul(x, st.as_matrix(w).astype(jnp.float32), precision=_HI)
      out = jnp.matmul(xq, st.as_matrix(wq).astype(jnp.float32), precision=_HI)
    entry["output_sqnr_db"] = sqnr_db(ref, out)
  return entry


# ---------------------------------------------------------------------------
# The Linen-only path: transforms folded at call boundaries


def _linen_ptq(model: nn.Module, cur: dict, calib_batches: list, method: str,
               weight_spec: WeightSpec, aspec: Optional[QuantSpec], *, quantizer: str,
               layers: str, alpha: float, n_grid: int, rotation_seed: int,
               rotation_block_size: Optional[int], extra_folds: dict, unfoldable: str,
               token_mask, max_samples: int, fold_rtol: float, apply_kwargs,
               other_variables, awq_clip: bool, awq_clip_skip: Optional[str],
               gptq_kw: dict):
  """``apply_ptq``'s awq/smoothquant/rotation on ``capture_dense_stats``'s
  call-boundary capture (module docstring); returns ``(new params, report)``."""
  t0 = time.perf_counter()
  cap: Capture = capture_dense_stats(
      model, cur, calib_batches, layers=layers, token_mask=token_mask,
      max_samples=max_samples, apply_kwargs=apply_kwargs,
      other_variables=other_variables)
  capture_seconds = time.perf_counter() - t0
  stats = dict(cap.stats)
  selected = [p for p in cap.order
              if _node(cur, p) is not None and "kernel" in _node(cur, p)
              and _node(cur, p)["kernel"].ndim == 2
              and p not in cap.convs
              and not isinstance(stats[p], ExpertStats)]
  expert_layers = [p for p in cap.order if isinstance(stats[p], ExpertStats)]
  specs = {p: _resolve_spec(weight_spec, p) for p in selected}
  transforms: dict = {}   # path -> (_Transform, status)
  folds = []

  expert_done = set()   # expert layers an awq/smoothquant fold transformed
  conv_scalings: dict = {}   # conv path -> its folded input scaling s[cin]
  apply_kwargs_ = dict(apply_kwargs or {})
  variables_extra = dict(other_variables or {})
  args, kwargs = split_batch(calib_batches[0])

  @jax.jit
  def forward_(p):
    return model.apply({"params": p, **variables_extra}, *args, **kwargs,
                       **apply_kwargs_)

  def forward(p):
    # Full float32 matmuls, so that a fold's rounding stays far below the
    # tolerance on backends whose default is TF32/bf16 passes.
    with jax.default_matmul_precision("float32"):
      return forward_(p)

  ref_out = forward(cur)
  probe_key = jax.random.key(rotation_seed + 1)
  rot_key = jax.random.key(rotation_seed)
  cur = _conv_transforms(cur, cap, stats, method, weight_spec, aspec, forward,
                         ref_out, jax.random.fold_in(probe_key, 7919), fold_rtol,
                         alpha, n_grid, folds, conv_scalings)
  groups = _groups_with_extra(cap, extra_folds)
  # MoE experts reading the routed tokens of a norm's output (a gather):
  # a diagonal scaling shared by all experts folds into that norm.
  expert_down = ({} if method == "rotation" else
                 _expert_down_pairs(cur, stats, expert_layers, forward, ref_out,
                                    probe_key, fold_rtol))
  attached = ({} if method == "rotation" else
              _attach_expert_readers(cur, cap, groups, expert_layers,
                                     set(expert_down)))
  for gi, (members, producer) in enumerate(groups):
    members = [m for m in members if m in specs]
    experts_here = attached.get(gi, [])
    if not members:
      continue
    k = _node(cur, members[0])["kernel"].shape[0]
    diagonal = method != "rotation"
    why = "no norm or Dense produces this input directly" if producer is None else \
        _foldable_kind(cur, producer[0], producer[1], k, diagonal)
    if why is None:
      test = _probe_transform(jax.random.fold_in(probe_key, gi), k, diagonal,
                              rotation_block_size)
      trial = test.fold_into(cur, *producer)
      for m in members:
        trial = with_leaves(trial, m, kernel=test.weight(_node(trial, m)["kernel"]))
      for m in experts_here:
        trial = with_leaves(trial, m, kernel=_scale_rows(_node(trial, m)["kernel"],
                                                         test.s))
      if not _outputs_close(ref_out, forward(trial), fold_rtol):
        why = (f"folding into {producer[1]!r} changes the model output (its output "
               "is used elsewhere too, e.g. by a residual connection)")
    if why is not None:
      experts_here = []
    entry = {"layers": members + experts_here,
             "producer": None if producer is None else producer[1]}
    if method == "awq" and all(specs[m] is None for m in members) and not experts_here:
      folds.append({**entry, "status": "skipped",
                    "reason": "weight_spec leaves all these layers in float"})
      continue
    if why is not None and unfoldable == "skip":
      folds.append({**entry, "status": "skipped", "reason": why})
      continue
    st0 = stats[members[0]]
    kernels = [_node(cur, m)["kernel"] for m in members]
    kspecs = [specs[m] for m in members]
    for m in experts_here:   # every expert's kernel, searched on all tokens
      w = _node(cur, m)["kernel"]
      kernels += [w[e] for e in range(w.shape[0])]
      kspecs += [_resolve_spec(weight_spec, m)] * w.shape[0]
    if method == "smoothquant":
      tr = _Transform(s=smoothquant_scales(st0.absmax, kernels, alpha))
    elif method == "awq":
      res = awq_search(st0.sample, kernels, kspecs,
                       act_scale=st0.mean_abs, n_grid=n_grid, act_spec=aspec)
      tr = _Transform(s=res.scales)
      entry["alpha"] = float(res.alpha)
    else:
      tr = _Transform(r=random_hadamard(jax.random.fold_in(rot_key, gi), k,
                                        block_size=rotation_block_size))
    status = "folded" if why is None else "simulated"
    if why is None:
      cur = tr.fold_into(cur, *producer)
      for m in members:
        cur = with_leaves(cur, m, kernel=tr.weight(_node(cur, m)["kernel"]))
      for m in experts_here:
        cur = with_leaves(cur, m, kernel=_scale_rows(_node(cur, m)["kernel"], tr.s))
        stats[m] = _scale_expert_stats(stats[m], tr.s)
        expert_done.add(m)
    else:
      entry["reason"] = why
    for m in members:
      stats[m] = tr.stats(stats[m])
      transforms[m] = (tr, status)
    folds.append({**entry, "status": status})

  # Each expert's down projection: a scaling per expert, from the tokens
  # routed to it, folded into that expert's up-projection columns.
  for p, producer_p in expert_down.items():
    cur, stats[p], entry = _expert_down_transform(
        method, cur, stats[p], p, producer_p, _resolve_spec(weight_spec, p), aspec,
        alpha, n_grid)
    folds.append(entry)
    expert_done.add(p)

  report_layers = {}
  weight_scales = {}
  cur = _quantize_convs(cur, cap, stats, method, weight_spec, quantizer, aspec,
                        folds, report_layers, weight_scales, conv_scalings,
                        method == "awq" and awq_clip, awq_clip_skip,
                        **gptq_kw)
  for i, p in enumerate(expert_layers):
    sim = None   # "rotation" with unfoldable="simulate": R per expert layer
    if p not in expert_done:
      if method == "rotation" and unfoldable == "simulate":
        sim = random_hadamard(jax.random.fold_in(jax.random.key(rotation_seed + 2), i),
                              _node(cur, p)["kernel"].shape[1],
                              block_size=rotation_block_size)
      folds.append({"layers": [p], "producer": None,
                    "status": "skipped" if sim is None else "simulated",
                    "reason": _EXPERT_ROTATION_WHY if method == "rotation" else
                    ("no norm or expert layer produces these experts' input in a "
                     "way a scaling folds into exactly (checked numerically)")})
    spec = _resolve_spec(weight_spec, p)
    w, st = _node(cur, p)["kernel"], stats[p]
    if sim is not None:   # each expert's kernel in the rotated domain: R^T w_e
      w = jnp.einsum("kj,gkn->gjn", sim, w.astype(jnp.float32), precision=_HI)
      st = _rotate_expert_stats(st, sim)
    w_in, clip_entry = _awq_clip_experts(method == "awq" and awq_clip, awq_clip_skip,
                                         p, st, w, spec)
    new_w, entry, scale = _quantize_experts(
        w_in, st, spec, quantizer, aspec, ref=w,
        **gptq_kw)
    entry.update(clip_entry)
    if sim is not None:   # back: R Q(R^T w_e), off the spec's grid (no scale)
      new_w = jnp.einsum("jk,gkn->gjn", sim, new_w.astype(jnp.float32),
                         precision=_HI).astype(_node(cur, p)["kernel"].dtype)
      scale = None
      entry["fold"] = "simulated"
    cur = with_leaves(cur, p, kernel=new_w)
    if scale is not None:
      weight_scales[p] = scale
    entry["transform"] = method if (p in expert_done or sim is not None) else "none"
    report_layers[p] = entry
  for p in selected:
    spec = specs[p]
    t1 = time.perf_counter()
    tr, status = transforms.get(p, (None, "none"))
    simulated = status == "simulated"
    w = _node(cur, p)["kernel"]
    w_in = tr.weight(w) if simulated else w   # the kernel in the quantized domain
    w_ref = w_in   # before any clipping
    st = stats[p]
    scale = None
    if spec is None:
      w_q = w_in
    elif quantizer == "gptq":
      w_in, clip_entry = _awq_clip(method == "awq" and awq_clip, awq_clip_skip, p,
                                   st, w_in, spec)
      res = gptq(w_in, st.gram, spec, **gptq_kw)
      w_q = res.weight
      if spec.symmetric:   # the range each block was rounded with
        full = jnp.broadcast_to(_expand_grid(res.amax, w_in.shape), w_in.shape)
        scale = rtn_scale(full, spec)
    else:
      w_in, clip_entry = _awq_clip(method == "awq" and awq_clip, awq_clip_skip, p,
                                   st, w_in, spec)
      w_q = rtn(w_in, spec)
      if spec.symmetric:
        scale = rtn_scale(w_in, spec)
    if scale is not None and not simulated:
      weight_scales[p] = scale
    new_w = tr.unweight(w_q) if simulated else w_q
    cur = with_leaves(cur, p, kernel=new_w.astype(w.dtype))
    # Quality, measured in the domain the kernel was quantized in; the weight
    # SQNR maps rows back to the input's original scale.
    to_orig = (lambda a: a) if tr is None else tr.unweight
    entry = {"spec": None if spec is None else _spec_name(spec),
             "transform": method if tr is not None else "none", "fold": status,
             "weight_sqnr_db": sqnr_db(to_orig(w_ref), to_orig(w_q))}
    if spec is not None:
      entry.update(clip_entry)
    if st.sample.shape[0]:
      x = st.sample
      ref = jnp.matmul(x, w_ref.astype(jnp.float32), precision=_HI)
      xq = fake_quant(x, aspec) if aspec is not None else x
      out = jnp.matmul(xq, w_q.astype(jnp.float32), precision=_HI)
      entry["output_sqnr_db"] = sqnr_db(ref, out)
    entry["seconds"] = time.perf_counter() - t1
    report_layers[p] = entry

  return cur, {"method": method, "quantizer": quantizer, "layers": report_layers,
               "folds": folds, "capture_seconds": capture_seconds,
               "quant_scales": _nest({f"{p}/weight_scale": v
                                      for p, v in weight_scales.items()})}


_EXPERT_ROTATION_WHY = (
    "a rotation of an expert's input has no exact fold: the gate/up experts read "
    "a gather of a norm's output (a rotation does not fold into a norm's "
    "elementwise gain, and their group's router reads the same norm), and the "
    "down experts read silu(gate) * up (an elementwise product, which a rotation "
    "does not commute with); unfoldable='simulate' rotates each expert's kernel "
    "on its own (R Q(R^T w_e), weight-only); method='quarot' folds a residual "
    "rotation into every expert exactly")


def _conv_spec(spec: QuantSpec, path: str, shape: tuple, axes: tuple) -> QuantSpec:
  """The n-d spec real mode uses for a conv kernel whose ``[K, N]`` spec is ``spec``.

  Per output channel, or groups along the input channels (``conv_weight_spec``);
  groups along the flattened ``(*window, cin)`` K are the same groups only
  when ``group_size`` divides ``cin``. ``axes``: the kernel's
  ``(in_axis, out_axis)``.
  """
  if spec.tile is not None or spec.axis not in (0, (0,)):
    raise ValueError(f"conv {path!r}: only specs with an unset axis (per output "
                     f"channel, or groups along the input channels) apply to convs, "
                     f"got axis={spec.axis!r} tile={spec.tile!r}; give a rule "
                     "without axis/tile for this layer")
  in_axis, out_axis = axes
  cin = shape[in_axis]
  if spec.group_size is not None and cin % spec.group_size:
    raise ValueError(f"conv {path!r}: group_size {spec.group_size} does not divide its "
                     f"{cin} input channels (real mode groups along them); use a "
                     "group size dividing cin or a per-channel spec for this layer")
  return conv_weight_spec(spec.replace(axis=None), len(shape), out_axis, in_axis)


def _conv_axes(cap: Capture, path: str, ndim: int) -> tuple:
  return (cap.conv_axes or {}).get(path, (ndim - 2, ndim - 1))


def _scale_axis(w: jax.Array, s: jax.Array, axis: int, divide: bool) -> jax.Array:
  """``w`` with index ``j`` of ``axis`` times (or divided by) ``s[j]``."""
  shape = [1] * w.ndim
  shape[axis] = -1
  s = jnp.reshape(jnp.asarray(s, jnp.float32), shape)
  w32 = w.astype(jnp.float32)
  return (w32 / s if divide else w32 * s).astype(w.dtype)


def _conv_fold_why(params, cap: Capture, producer, cin: int) -> Optional[str]:
  """None if a scaling of ``cin`` channels can fold into ``producer``, else why not."""
  if producer is None:
    return ("no conv, Dense or norm produces this input (directly or through "
            "elementwise ops: none returned an array of its shape)")
  kind, path = producer
  if kind == "norm":
    return _foldable_kind(params, kind, path, cin, True)
  node = _node(params, path)
  if node is None or "kernel" not in node:
    return f"producer {path!r} has no kernel"
  k = node["kernel"]
  if kind == "dense":
    if k.ndim != 2 or k.shape[1] != cin:
      return f"producer {path!r} is not a 2-d Dense with {cin} outputs"
    return None
  out_axis = _conv_axes(cap, path, k.ndim)[1]
  if k.shape[out_axis] != cin:
    return f"producer conv {path!r} has {k.shape[out_axis]} output channels, not {cin}"
  return None


def _conv_fold(params, cap: Capture, producer, members, s) -> dict:
  """Divides ``producer``'s output channels by ``s``, multiplies the members' inputs."""
  kind, path = producer
  node = _node(params, path)
  new = {}
  if kind == "norm":
    new["scale"] = _scale_axis(node["scale"], s, 0, True)
  else:
    k = node["kernel"]
    out_axis = k.ndim - 1 if kind == "dense" else _conv_axes(cap, path, k.ndim)[1]
    new["kernel"] = _scale_axis(k, s, out_axis, True)
  if "bias" in node:
    new["bias"] = _scale_axis(node["bias"], s, 0, True)
  params = with_leaves(params, path, **new)
  for m in members:
    k = _node(params, m)["kernel"]
    params = with_leaves(params, m, kernel=_scale_axis(
        k, s, _conv_axes(cap, m, k.ndim)[0], False))
  return params


def _conv_transforms(cur, cap: Capture, stats: dict, method: str,
                     weight_spec: WeightSpec, aspec, forward, ref_out, key,
                     rtol: float, alpha: float, n_grid: int, folds: list,
                     scalings: dict):
  """AWQ / SmoothQuant scalings of conv inputs, folded exactly where they can be.

  A group of convs reading the same input takes one per-input-channel scaling
  ``s[cin]`` (the kernels' input-channel axis times ``s``, their im2col
  patches divided by ``s`` tiled over the window positions), folded into the
  module that produced the input: a norm's scale and bias (LayerNorm,
  RMSNorm, BatchNorm, GroupNorm), a Dense's output columns, or a conv's
  output channels (and bias), found through elementwise ops by shape
  (``Capture.convs``). The fold is checked as Dense folds are: a random
  positive scaling folded the same way must leave the float model's output
  unchanged (a ReLU between passes, a GELU or a residual connection does
  not). SmoothQuant's ``s`` comes from the per-channel absmax of the input
  and of the kernels' rows; AWQ's from the grid search of ``alpha`` with
  ``s = mean|x|^alpha`` (normalized), the error summed over the group's
  convs, each on its own retained patches. The rotation method does not
  transform convs (only diagonal scalings commute with ReLU and fold into a
  norm). Fills ``folds``, ``stats`` (transformed patches) and ``scalings``
  in place.

  Returns:
    The params with every exact fold applied.
  """
  convs = set(cap.convs)
  for members in cap.groups:
    here = [m for m in members if m in convs]
    if not here:
      continue
    others = [m for m in members if m not in convs]
    producer = cap.producers.get(here[0])
    entry = {"layers": here, "producer": None if producer is None else producer[1],
             "conv": True}
    specs = {m: _resolve_spec(weight_spec, m) for m in here}
    kernels = {m: _node(cur, m)["kernel"] for m in here}
    axes = {m: _conv_axes(cap, m, kernels[m].ndim) for m in here}
    cins = {kernels[m].shape[axes[m][0]] for m in here}
    why = None
    if method == "rotation":
      why = ("the rotation method does not transform convs: a rotation of a conv's "
             "input channels does not commute with the ReLU or fold into the norm "
             "that usually precedes it (only diagonal scalings do)")
    elif others:
      why = (f"this input is also read by non-conv layers {others}, which a conv "
             "fold would not scale")
    elif method == "awq" and all(specs[m] is None for m in here):
      why = "weight_spec leaves all these layers in float"
    elif len(cins) != 1:
      why = f"the convs reading this input disagree on its channels {sorted(cins)}"
    else:
      why = _conv_fold_why(cur, cap, producer, cins.pop())
    cin = kernels[here[0]].shape[axes[here[0]][0]]
    if why is None:
      probe = jnp.exp(jax.random.uniform(jax.random.fold_in(key, len(folds)), (cin,),
                                         jnp.float32, -0.7, 0.7))
      if not _outputs_close(ref_out, forward(_conv_fold(cur, cap, producer, here,
                                                        probe)), rtol):
        why = (f"folding into {producer[1]!r} changes the model output (its output "
               "is also used elsewhere, e.g. by a residual connection, or passes "
               "through an op a positive scaling does not commute with, e.g. GELU)")
    if why is not None:
      folds.append({**entry, "status": "skipped", "reason": why})
      continue
    mats = {m: conv_matrix(kernels[m], *axes[m]) for m in here}
    windows = {m: mats[m].shape[0] // cin for m in here}
    if method == "smoothquant":
      amax = functools.reduce(jnp.maximum, [
          jnp.max(stats[m].absmax.reshape(windows[m], cin), axis=0) for m in here])
      rows = [jnp.swapaxes(mats[m].reshape(windows[m], cin, -1), 0, 1).reshape(cin, -1)
              for m in here]
      scale = smoothquant_scales(amax, rows, alpha)
    else:
      m0 = here[0]
      act = jnp.mean(stats[m0].mean_abs.reshape(windows[m0], cin), axis=0)
      errors = 0.0
      for m in here:
        if specs[m] is None:
          continue
        if stats[m].sample.shape[0] == 0:
          raise ValueError(f"conv {m!r} kept no calibration rows for AWQ's search "
                           "(max_samples=0?); raise max_samples")
        errors = errors + awq_search(stats[m].sample, mats[m], specs[m],
                                     act_scale=jnp.tile(act, windows[m]),
                                     n_grid=n_grid, act_spec=aspec).errors
      best = float(jnp.linspace(0.0, 1.0, n_grid)[int(jnp.argmin(errors))])
      scale = awq_scales(act, best)
      entry["alpha"] = best
    cur = _conv_fold(cur, cap, producer, here, scale)
    for m in here:
      stats[m] = _Transform(s=jnp.tile(scale, windows[m])).stats(stats[m])
      scalings[m] = scale
    folds.append({**entry, "status": "folded"})
  return cur


def _quantize_convs(cur, cap: Capture, stats: dict, method: str,
                    weight_spec: WeightSpec, base_quant: str, aspec, folds: list,
                    report_layers: dict, weight_scales: dict, scalings: dict,
                    awq_clip: bool, awq_clip_skip: Optional[str], **gptq_kw):
  """RTN/GPTQ on the captured conv kernels as ``[prod(window)*cin, cout]`` matmuls.

  The kernel is reshaped to the matmul its im2col patches meet
  (``conv_matrix``: rows in ``(*window, cin)`` order, as the capture builds
  them; a ConvTranspose's is that of the conv it lowers to), quantized with
  the patches' Gram matrix as GPTQ's Hessian (after an AWQ/SmoothQuant fold:
  the scaled kernel and the scaled patches' statistics), and reshaped back.
  With ``awq_clip`` the AWQ clip search runs first (as for Dense). Fills
  ``folds``, ``report_layers`` and ``weight_scales`` (the n-d scale grid real
  mode stores) in place.

  Returns:
    The params with each conv kernel replaced by its fake-quantized value.
  """
  for p, why in sorted((cap.skipped or {}).items()):
    folds.append({"layers": [p], "producer": None, "status": "skipped",
                  "reason": f"conv not quantized by apply_ptq: {why}"})
  for p in cap.convs:
    node = _node(cur, p)
    if node is None or "kernel" not in node:
      continue
    t1 = time.perf_counter()
    w = node["kernel"]
    spec = _resolve_spec(weight_spec, p)
    folded = p in scalings
    if spec is None:
      report_layers[p] = {"spec": None, "transform": method if folded else "none",
                          "fold": "folded" if folded else "none", "conv": True}
      continue
    axes = _conv_axes(cap, p, w.ndim)
    spec_n = _conv_spec(spec, p, tuple(w.shape), axes)
    w2 = conv_matrix(w, *axes)
    st = stats[p]
    w_in, clip_entry = _awq_clip(awq_clip, awq_clip_skip, p, st, w2, spec)
    if base_quant == "gptq":
      res = gptq(w_in, st.gram, spec, **gptq_kw)
      w_q = res.weight
      full = jnp.broadcast_to(_expand_grid(res.amax, w2.shape), w2.shape)
    else:
      w_q = rtn(w_in, spec)
      full = w_in
    if spec.symmetric:
      weight_scales[p] = rtn_scale(conv_unmatrix(full, w.shape, *axes), spec_n)
    cur = with_leaves(cur, p, kernel=conv_unmatrix(w_q, w.shape, *axes).astype(w.dtype))
    # The weight SQNR with the rows at the input's original scale.
    s_rows = (jnp.tile(scalings[p], w2.shape[0] // scalings[p].shape[0])[:, None]
              if folded else 1.0)
    entry = {"spec": _spec_name(spec), "transform": method if folded else "none",
             "fold": "folded" if folded else "none", "conv": True,
             "weight_sqnr_db": sqnr_db(w2 / s_rows, w_q / s_rows), **clip_entry}
    if st.sample.shape[0]:
      x = st.sample
      ref = jnp.matmul(x, w2.astype(jnp.float32), precision=_HI)
      xq = fake_quant(x, aspec) if aspec is not None else x
      entry["output_sqnr_db"] = sqnr_db(
          ref, jnp.matmul(xq, w_q.astype(jnp.float32), precision=_HI))
    entry["seconds"] = time.perf_counter() - t1
    report_layers[p] = entry
  return cur


def _scale_rows(w: jax.Array, s: jax.Array) -> jax.Array:
  """An expert stack ``[G, K, N]`` with input row ``j`` times ``s[j]`` (or ``s[g, j]``)."""
  s = jnp.asarray(s, jnp.float32)
  s = s[None, :, None] if s.ndim == 1 else s[:, :, None]
  return (w.astype(jnp.float32) * s).astype(w.dtype)


def _scale_expert_stats(st: ExpertStats, s: jax.Array) -> ExpertStats:
  """Statistics of the inputs ``x / s`` (``s [K]`` shared, or ``[G, K]`` per expert)."""
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), st.absmax.shape)
  sample = st.sample
  if sample.shape[0]:
    sample = sample / s[jnp.clip(st.sample_group, 0, s.shape[0] - 1)]
  return st._replace(gram=st.gram / (s[:, :, None] * s[:, None, :]),
                     absmax=st.absmax / s, abssum=st.abssum / s, sample=sample)


def _rotate_expert_stats(st: ExpertStats, r: jax.Array) -> ExpertStats:
  """Statistics of the inputs ``x @ r`` of a grouped matmul (an online rotation)."""
  gram = jnp.einsum("ki,gkl,lj->gij", r, st.gram, r, precision=_HI)
  sample = jnp.matmul(st.sample, r, precision=_HI)
  absmax, abssum = st.absmax, st.abssum
  if sample.shape[0]:   # not determined by the unrotated statistics: from the sample
    onehot = jax.nn.one_hot(st.sample_group, st.count.shape[0], dtype=jnp.float32)
    absmax = jnp.max(onehot[:, :, None] * jnp.abs(sample)[:, None, :], axis=0)
    frac = st.count / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
    abssum = jnp.einsum("sg,sk->gk", onehot, jnp.abs(sample)) * frac[:, None]
  return st._replace(gram=gram, absmax=absmax, abssum=abssum, sample=sample)


def _parent(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else ""


def _expert_down_pairs(params, stats, expert_layers, forward, ref_out, key,
                       rtol: float) -> dict:
  """``{consumer expert layer: producer expert layer}`` with an exact per-expert fold.

  A consumer ``[G, K, N]`` pairs with a producer ``[G, *, K]`` of the same
  parent module when a random per-expert diagonal scaling, divided out of the
  producer's output columns and multiplied into the consumer's input rows,
  leaves the model output unchanged (SwiGLU: ``down`` with ``up``, not with
  ``gate``, whose output passes through the SiLU).
  """
  pairs = {}
  for i, p in enumerate(expert_layers):
    wp = _node(params, p)["kernel"]
    g, k = wp.shape[0], wp.shape[1]
    for q in expert_layers:
      wq = _node(params, q)["kernel"]
      if q == p or _parent(q) != _parent(p) or wq.shape[0] != g or wq.shape[2] != k:
        continue
      s = jnp.exp(jax.random.uniform(jax.random.fold_in(key, 1000 + i), (g, k),
                                     jnp.float32, -0.7, 0.7))
      trial = with_leaves(params, q, kernel=(wq.astype(jnp.float32)
                                             / s[:, None, :]).astype(wq.dtype))
      trial = with_leaves(trial, p, kernel=_scale_rows(wp, s))
      if _outputs_close(ref_out, forward(trial), rtol):
        pairs[p] = q
        break
  return pairs


def _attach_expert_readers(params, cap: Capture, groups, expert_layers,
                           consumers: set) -> dict:
  """``{group index: expert layers}``: experts that read the routed rows of a norm.

  An expert layer whose input has no producer (a gather of routed tokens)
  and that is not the consumer of a per-expert fold is attached to the
  norm-produced group of a Dense of the same parent module (the router);
  the fold is then checked numerically with the group's.
  """
  out: dict = {}
  for p in expert_layers:
    if p in consumers or cap.producers.get(p) is not None:
      continue
    k = _node(params, p)["kernel"].shape[1]
    for gi, (members, producer) in enumerate(groups):
      if (producer is not None and producer[0] == "norm"
          and any(_parent(m) == _parent(p) and m not in expert_layers
                  and _node(params, m)["kernel"].shape[0] == k for m in members)):
        out.setdefault(gi, []).append(p)
        break
  return out


def _expert_down_transform(method: str, params, st: ExpertStats, path: str,
                           producer: str, spec: Optional[QuantSpec],
                           aspec: Optional[QuantSpec], alpha: float, n_grid: int):
  """AWQ or SmoothQuant scales per expert of ``path``, folded into ``producer``.

  Expert ``g``'s scales come from the rows routed to it only (SmoothQuant: its
  activation absmax; AWQ: the grid search on its retained rows); an expert
  without calibration rows keeps scale 1.

  Returns:
    ``(params, transformed stats, fold report entry)``.
  """
  w = _node(params, path)["kernel"]
  g, k = w.shape[0], w.shape[1]
  counts = np.asarray(st.count)
  groups = np.asarray(st.sample_group)
  scales, unscaled = [], []
  for e in range(g):
    rows = st.sample[groups == e] if st.sample.shape[0] else st.sample
    if counts[e] == 0 or (method == "awq" and (rows.shape[0] == 0 or spec is None)):
      scales.append(jnp.ones((k,), jnp.float32))
      unscaled.append(e)
    elif method == "smoothquant":
      scales.append(smoothquant_scales(st.absmax[e], [w[e]], alpha))
    else:
      scales.append(awq_search(rows, [w[e]], [spec], act_scale=st.mean_abs[e],
                               n_grid=n_grid, act_spec=aspec).scales)
  s = jnp.stack(scales)
  wq = _node(params, producer)["kernel"]
  params = with_leaves(params, producer, kernel=(wq.astype(jnp.float32)
                                                 / s[:, None, :]).astype(wq.dtype))
  params = with_leaves(params, path, kernel=_scale_rows(w, s))
  entry = {"layers": [path], "producer": producer, "status": "folded",
           "per_expert": True, "unscaled_experts": unscaled}
  return params, _scale_expert_stats(st, s), entry


def _quantize_experts(w: jax.Array, st: ExpertStats, spec: Optional[QuantSpec],
                      quant: str, aspec: Optional[QuantSpec], *, blocksize: int,
                      percdamp: float, act_order: bool, ref: Optional[jax.Array] = None):
  """RTN or GPTQ of each expert of a ``[G, K, N]`` kernel, each on its own tokens.

  GPTQ takes expert ``g``'s Hessian from the tokens routed to it
  (``st.gram[g]``); an expert that received no calibration token has none
  and is rounded to nearest (listed in ``rtn_fallback``). ``ref``: the float
  kernel the SQNRs are measured against (``w`` before AWQ's clip search;
  None: ``w``).

  Returns:
    ``(new kernel, report entry, scale grid over [G, K, N] or None)``.
  """
  g = w.shape[0]
  counts = [int(c) for c in np.asarray(st.count)]
  entry = {"spec": None if spec is None else _spec_name(spec), "fold": "none",
           "experts": g, "calibration_tokens": counts, "rtn_fallback": []}
  t0 = time.perf_counter()
  if spec is None:
    entry.update(weight_sqnr_db=float("inf"), seconds=time.perf_counter() - t0)
    return w, entry, None
  w_q, amaxs, entry["rtn_fallback"] = quantize_experts(
      w, st.gram, st.count, spec, quant, blocksize=blocksize, percdamp=percdamp,
      act_order=act_order)
  w_q = w_q.astype(w.dtype)
  scale = None
  if spec.symmetric and spec.tile is None:
    # The range each block was rounded with (GPTQ's, or the weight's own).
    scale = init_scale(amaxs, expert_spec(spec), "amax")
  w = w if ref is None else ref
  entry["weight_sqnr_db"] = sqnr_db(w, w_q)
  if st.sample.shape[0]:
    x = st.sample
    sel = st.sample_group
    ref = jnp.einsum("sk,skn->sn", x, w[sel].astype(jnp.float32), precision=_HI)
    xq = fake_quant(x, aspec) if aspec is not None else x
    out = jnp.einsum("sk,skn->sn", xq, w_q[sel].astype(jnp.float32), precision=_HI)
    entry["output_sqnr_db"] = sqnr_db(ref, out)
  entry["seconds"] = time.perf_counter() - t0
  return w_q, entry, scale


def _awq_clip(on: bool, skip: Optional[str], path: str, st: DenseStats, w, spec):
  """(kernel to quantize, report entries): AWQ's clip search where it applies."""
  if not on or (skip is not None and re.fullmatch(skip, path)):
    return w, {}
  if st.sample.shape[0] == 0:
    raise ValueError(f"layer {path!r} kept no calibration rows for AWQ's clip "
                     "search (max_samples=0?); raise max_samples or pass "
                     "awq_clip=False")
  res = awq_clip_search(st.sample, w, spec)
  rtn_err = float(res.rtn_error)
  return res.clipped, {"clip_mean_ratio": float(jnp.mean(res.ratios)),
                       "clip_error_vs_rtn": (float(res.error) / rtn_err
                                             if rtn_err > 0 else 1.0)}


def _awq_clip_experts(on: bool, skip: Optional[str], path: str, st: ExpertStats, w,
                      spec: Optional[QuantSpec]):
  """(stack to quantize, report entries): AWQ's clip search on each expert, on
  the retained rows routed to it (``_experts.clip_experts``, as ``ptq_params``);
  an expert without such rows is listed in ``clip_rtn_fallback``."""
  if not on or spec is None or (skip is not None and re.fullmatch(skip, path)):
    return w, {}
  if st.sample.shape[0] == 0:
    raise ValueError(f"layer {path!r} kept no calibration rows for AWQ's clip "
                     "search (max_samples=0?); raise max_samples or pass "
                     "awq_clip=False")
  clipped, ratios, empty = clip_experts(w, st.sample, st.sample_group, spec)
  entry = {"clip_rtn_fallback": empty}
  if ratios:
    entry["clip_mean_ratio"] = float(np.mean(list(ratios.values())))
  return clipped, entry


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = v
  return out


def _linen_fn(model: nn.Module, apply_kwargs, other_variables) -> Callable:
  """The Linen model as ``fn(params, *args, **kwargs)`` (``apply_kwargs`` and
  the non-param collections bound)."""
  extra, more = dict(other_variables or {}), dict(apply_kwargs or {})

  def fn(p, *args, **kwargs):
    return model.apply({"params": p, **extra}, *args, **kwargs, **more)
  return fn


def _loss_rules(weight_spec: WeightSpec, aspec: Optional[QuantSpec], layers: str) -> list:
  """The rules SpinQuant's quantized loss runs with: weight_spec and act_spec."""
  def rx(path):
    return path if layers == ".*" else f"(?=(?:{layers})(?:/kernel)?$)(?:{path})"
  if weight_spec is None:
    return [] if aspec is None else [QuantRule(rx(".*"), activation=aspec)]
  if not isinstance(weight_spec, (list, tuple)):
    return [QuantRule(rx(".*"), weight=weight_spec, activation=aspec)]
  out = []
  for rule in weight_spec:
    if isinstance(rule, QuantRule) and rule.weight is None and rule.activation is None:
      out.append(dataclasses.replace(rule, path=rx(rule.path)))   # stays float
    elif isinstance(rule, QuantRule):
      out.append(dataclasses.replace(rule, path=rx(rule.path), activation=(
          rule.activation if rule.activation is not None else aspec)))
    else:
      regex, spec = rule
      out.append(QuantRule(rx(f"(?:{regex})(?:/kernel)?"), weight=spec,
                           activation=aspec))
  return out


def _spec_name(spec: QuantSpec) -> str:
  parts = [spec.format.name]
  if spec.tile is not None:
    parts.append(f"tile{spec.tile[0]}x{spec.tile[1]}")
  elif spec.group_size is not None:
    parts.append(f"g{spec.group_size}")
  elif spec.axis is not None:
    parts.append(f"axis{spec.axis}")
  if not spec.symmetric:
    parts.append("asym")
  return "_".join(parts)


def _probe_transform(key, k: int, diagonal: bool, block: Optional[int]) -> _Transform:
  if diagonal:
    return _Transform(s=jnp.exp(jax.random.uniform(key, (k,), jnp.float32, -0.7, 0.7)))
  return _Transform(r=random_hadamard(key, k, block_size=block))


def _groups_with_extra(cap: Capture, extra_folds: Mapping[str, str]) -> list:
  """``[(members, producer or None)]``: input groups, with declared producers."""
  out = []
  for members in cap.groups:
    declared = {extra_folds[m] for m in members if m in extra_folds}
    if len(declared) > 1:
      raise ValueError(f"layers {members} read the same input but extra_folds names "
                       f"different producers {sorted(declared)}")
    if declared:
      producer = ("dense", declared.pop())
    else:
      producer = cap.producers.get(next((m for m in members if m not in cap.convs),
                                        members[0]))
    out.append((members, producer))
  unknown = set(extra_folds) - {m for g in cap.groups for m in g}
  if unknown:
    raise ValueError(f"extra_folds names layers that were not called (or not "
                     f"selected by layers=): {sorted(unknown)}")
  return out
