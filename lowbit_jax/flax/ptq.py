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
* "awq", "smoothquant" and "rotation" stay a Linen-only extension
  (``flax._ptq_linen``: ``capture_dense_stats`` at call boundaries, folds
  checked numerically, with
  ``act_spec`` in AWQ's objective, ``quantizer="gptq"``, ``extra_folds``,
  ``unfoldable="simulate"``, per-expert folds and folds into conv producers),
  and "omniquant" the block-wise driver ``flax._omniquant``: ``ptq_params``
  finds its folds in the jaxpr instead, which folds in more places, so these
  methods give different kernels there (``apply_ptq``'s docstring says where).

Method ``"quarot"`` is QuaRot's whole-model rotation (Ashkboos et al.
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
``"simulated"``; no stored scales, the kernel is off the spec's grid).
QuaRot ("quarot") does: the residual stream is followed through the gather
of routed tokens into the experts, so its rotation folds into every expert's
gate/up (readers) and down (writers) kernels, and ``online`` puts the
Hadamard in front of each down expert (a ``ragged_dot`` site).

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
from flax.core import meta as flax_meta
import jax
import jax.numpy as jnp

from lowbit_jax import _ptq, _ptq_rotation, _ptq_scaling
from lowbit_jax._ptq_scaling import is_box
from lowbit_jax._rules import QuantRule, conv_weight_spec, path_str
from lowbit_jax.algorithms.rotation import R3_PATHS
from lowbit_jax.algorithms.rtn import kernel_spec, sqnr_db
from lowbit_jax.algorithms.spinquant import SpinQuantConfig
from lowbit_jax.core import QuantSpec, as_spec, fake_quant
from lowbit_jax.formats import Format

METHODS = ("rtn", "gptq", "awq", "smoothquant", "rotation", "quarot", "spinquant",
           "omniquant")
_WHOLE_MODEL_ROTATIONS = _ptq_rotation.METHODS
# The methods apply_ptq runs through ptq_params (the shared driver), and those
# that stay Linen-only (apply_ptq's docstring says why).
SHARED_METHODS = ("rtn", "gptq") + _WHOLE_MODEL_ROTATIONS
_LINEN_METHODS = tuple(m for m in METHODS if m not in SHARED_METHODS)
# AWQ's clip search skips the query and key projections (their error passes
# through q.k and a softmax, which the layer-wise objective does not see; the
# paper's code does the same): ptq_params' default.
AWQ_CLIP_SKIP = _ptq.AWQ_CLIP_SKIP
QUANTIZERS = _ptq.ROUNDING
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


def _keeps_boxes(fn):
  """``apply_ptq`` on params boxed by ``nn.with_partitioning`` (or any Flax
  metadata box): it runs on the unboxed values and returns the new ones in
  the same boxes."""
  @functools.wraps(fn)
  def wrapped(model, params, *args, **kwargs):
    if not any(is_box(x) for x in jax.tree.leaves(params, is_leaf=is_box)):
      return fn(model, params, *args, **kwargs)
    new, report = fn(model, flax_meta.unbox(params), *args, **kwargs)
    flat = {path_str(kp): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(new)[0]}
    return _ptq_scaling._put(params, flat), report   # pylint: disable=protected-access
  return wrapped


@_keeps_boxes
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
    smoke Llama ``ptq_params`` also folds v/o and up/down (8 of its 15
    kernels differ, benchmarks/ptq_front_door_cpu.md) and on the toy model
    the custom norm into up. Only here:
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
    range it was rounded with; an asymmetric kernel's entry is a ``(scale,
    zero point)`` pair, except plain RTN's, whose ranges real mode
    re-derives); for
    "quarot" and "spinquant" also
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
      channels; for GPTQ through ``ptq_params``: scales that would not
      reproduce its codes, e.g. a ``pad=True`` group size not dividing K),
      ``apply_kwargs`` with a shared method, or no Dense layer matched.
  """
  t_start = time.perf_counter()
  _check_options(method, weight_spec, act_spec, quantizer=quantizer,
                 unfoldable=unfoldable, online=online, heads=heads, r3=r3,
                 spinquant=spinquant, awq_clip=awq_clip, awq_clip_skip=awq_clip_skip,
                 omniquant=omniquant, apply_kwargs=apply_kwargs)
  _ptq._check_method_options(   # pylint: disable=protected-access
      method, quantizer, table=_APPLY_OPTIONS, quantizer_runs=quantizer != "rtn",
      alpha=alpha, n_grid=n_grid, blocksize=blocksize, percdamp=percdamp,
      act_order=act_order, rotation_seed=rotation_seed,
      rotation_block_size=rotation_block_size, extra_folds=extra_folds or None,
      fold_rtol=fold_rtol)
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
    from lowbit_jax.flax import _ptq_linen  # pylint: disable=g-import-not-at-top
    cur, report = _ptq_linen.linen_ptq(
        model, cur, calib_batches, method, weight_spec, aspec, quantizer=quantizer,
        layers=layers, alpha=alpha, n_grid=n_grid, rotation_seed=rotation_seed,
        rotation_block_size=rotation_block_size, extra_folds=dict(extra_folds or {}),
        unfoldable=unfoldable, token_mask=token_mask, max_samples=max_samples,
        fold_rtol=fold_rtol, apply_kwargs=apply_kwargs, other_variables=other_variables,
        awq_clip=awq_clip, awq_clip_skip=awq_clip_skip,
        gptq_kw={"blocksize": blocksize, "percdamp": percdamp, "act_order": act_order})
  report["total_seconds"] = time.perf_counter() - t_start
  return (flax.core.freeze(cur) if frozen else cur), report


_LINEN_SCALINGS = ("awq", "smoothquant", "rotation")
# apply_ptq's options -> (default, the methods or quantizers that read them):
# one set away from its default for a method that never reads it raises
# (``_ptq._check_method_options``), as ptq_params' do.
_APPLY_OPTIONS = {
    "alpha": (0.5, ("smoothquant",)), "n_grid": (20, ("awq",)),
    "blocksize": (128, ("gptq",)), "percdamp": (0.01, ("gptq",)),
    "act_order": (False, ("gptq",)),
    # (every method but omniquant draws its retained rows with it)
    "rotation_seed": (0, tuple(m for m in METHODS if m != "omniquant")),
    "rotation_block_size": (None, ("rotation",)),
    "extra_folds": (None, _LINEN_SCALINGS + ("omniquant",)),
    "fold_rtol": (1e-3, _LINEN_SCALINGS + ("omniquant", "quarot", "spinquant")),
}


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
  report: dict = {"method": method, "quantizer": quant}
  extra = dict(other_variables or {})
  select = [QuantRule(layers, weight=_CAPTURED)]
  if method in _WHOLE_MODEL_ROTATIONS:
    params, rotated, history = _ptq_rotation.rotate_checked(
        _linen_fn(model, other_variables), params, batches, method,
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
  rounded = [QuantRule(re.escape(p), weight=s) for p, s in specs.items() if s is not None]
  res = _ptq.ptq_params(model, {"params": params, **extra}, batches, rounded,
                        method=quant, capture=cap,
                        **(gptq_kw if quant == "gptq" else {}))
  new = res.params["params"]
  report["folds"] = _shared_folds(cap, method, quant)
  report["layers"] = {
      _layer(p): _layer_entry(st, specs[p], res.report["layers"].get(p, {}),
                              _node(params, p), _node(new, p), cap.inputs.get(p), aspec)
      for p, st in cap.stats.items()}
  report["quant_scales"] = _ptq.real_mode_kwargs(res, "linen")["quant_scales"]
  return new, report


def _shared_folds(cap: _ptq.Capture, method: str, quant: str) -> list:
  """``report["folds"]`` of the shared path: the convs left float (grouped,
  masked) and, after a whole-model rotation, the convs rounded unrotated."""
  folds = [{"layers": [_layer(p)], "producer": None, "status": "skipped",
            "reason": f"conv not quantized by apply_ptq: {why}"}
           for p, why in sorted(cap.skipped.items())]
  if method in _WHOLE_MODEL_ROTATIONS:
    folds += [{"layers": [_layer(p)], "producer": None, "status": "skipped",
               "conv": True,
               "reason": f"conv: {method} rotates the residual stream of matmul "
                         f"readers and writers only; quantized with {quant} unrotated"}
              for p, st in cap.stats.items() if st.op == "conv"]
  return folds


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
    raise ValueError(
        f"the layers {layers!r} selects ({sorted(cap.stats)[:4]}"
        f"{' ...' if len(cap.stats) > 4 else ''}) are none of the kinds apply_ptq "
        "treats (nn.Dense, convs, RaggedDense): Einsum layers, DenseGeneral over "
        "several axes (nn.MultiHeadDotProductAttention's) and Embed.attend stay "
        "float here; lowbit_jax.ptq_params quantizes those too")
  return cap._replace(stats={p: cap.stats[p] for p in keep},
                      sites={p: cap.sites[p] for p in keep},
                      inputs={p: v for p, v in cap.inputs.items() if p in keep},
                      skipped={p: w for p, w in cap.skipped.items()
                               if p.endswith("/kernel")})


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
    if st.op == "ragged_dot":
      entry["output_sqnr_db"] = output_sqnr(inputs.sample, w, wq, aspec,
                                            groups=inputs.sample_group)
    else:
      entry["output_sqnr_db"] = output_sqnr(inputs.sample, st.as_matrix(w),
                                            st.as_matrix(wq), aspec)
  return entry


def output_sqnr(x: jax.Array, w: jax.Array, w_q: jax.Array, aspec: Optional[QuantSpec],
                groups: Optional[jax.Array] = None) -> float:
  """SQNR (dB) of a layer's outputs on retained input rows ``x [S, K]``: ``x @ w``
  against ``fake_quant(x, aspec) @ w_q`` (``[K, N]`` kernels), or for an expert
  stack ``[E, K, N]`` each row against the kernel of its expert ``groups[s]``."""
  xq = fake_quant(x, aspec) if aspec is not None else x
  if groups is None:
    def mm(a, k):
      return jnp.matmul(a, k.astype(jnp.float32), precision=_HI)
  else:
    def mm(a, k):
      return jnp.einsum("sk,skn->sn", a, k[groups].astype(jnp.float32), precision=_HI)
  return sqnr_db(mm(x, w), mm(xq, w_q))


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


def _linen_fn(model: nn.Module, other_variables) -> Callable:
  """The Linen model as ``fn(params, *args, **kwargs)`` (the non-param
  collections bound)."""
  extra = dict(other_variables or {})

  def fn(p, *args, **kwargs):
    return model.apply({"params": p, **extra}, *args, **kwargs)
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
