"""Quantization rules: which matmuls and convolutions of a model are quantized, how.

Rules are data. A ``QuantRule`` pairs a regular expression on a path with the
weight and activation QuantSpecs to use there; an ordered list of rules is
matched first-full-match-wins. Every way of reaching a model (the Linen
interceptor and NNX graph rewrite in ``lowbit_jax.flax``, and
``quantize_function`` for any JAX function) matches the same rules on the same
paths and runs the same quantized ops from ``lowbit_jax.core.ops``:

* A *site* is one matmul (``dot_general``/``einsum``) or convolution with a
  weight. Its candidate paths are the weight's parameter path (pytree keys
  joined by ``/``, e.g. ``layers_0/mlp/up/kernel``) and the path of the layer
  that owns it (``layers_0/mlp/up``); a rule applies when it fully matches
  either and lists the site's op in ``ops``.
* A ``QuantConfig`` holds the rules and records which rule matched which site,
  so ``unused_rules()`` lists the rules that matched nothing (a typo in a path
  never silently quantizes nothing) and ``strict=True`` raises on them.
* Modes: ``"fake"`` (fake quantization, straight-through gradients),
  ``"real"`` (weights as packed QArrays, see ``QWeight``; the matmul runs on
  them) and ``"calibrate"`` (the op runs in float while an observer from
  ``lowbit_jax.calibration`` records the activation statistics that static
  rules need).

QAT and low-bit training use the same rules, sites and ops: a rule's
``learn_weight`` / ``learn_activation`` (LSQ scales, PACT clips), ``grad``
(the output cotangent's format) and ``scaling="delayed"`` (amax histories)
make a site read variables that the front end keeps in the ``"quant_scales"``
and ``"quant_state"`` collections and hands to ``site_*`` in a ``SiteCall``,
with the site's PRNG key and a request for clipped-fraction metrics
(``"quant_metrics"``). Activation x activation matmuls (``op="act_matmul"``)
are sites too, reached by rules that name that op.

Weights of real quantization are ``QWeight`` s: QArrays that also record
whether they hold the *transpose* of the layer's weight. A 2-D weight ``W[K, N]``
contracted on its first axis (``x @ W``, ``nn.Dense``) is stored K-major, as the
QArray of ``W.T`` (``[N, K]``, ``ops.prepare_weight``), the layout the Pallas
kernels read; everything else keeps its own layout. ``quantize_params`` turns a
float parameter pytree into one with QWeights leaf by leaf, so the model is
never held twice.
"""
from __future__ import annotations

import contextlib
import collections
import dataclasses
import functools
import re
import threading
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify
from opt_einsum.parser import parse_einsum_input

from lowbit_jax import calibration
from lowbit_jax.core import ops, scaling
from lowbit_jax.core._cast import astype_holding, round_to_dtype
from lowbit_jax.core._hadamard import hadamard_transform
from lowbit_jax.core._qarray import QArray, block_shape
from lowbit_jax.core._qarray import expand_grid as _expand_grid
from lowbit_jax.core._quantize import (check_static_range, dequantize, fake_quant,
                                       init_scale, quantize,
                                       scale_shape)
from lowbit_jax.core._spec import TENSOR, QuantSpec, as_spec
from lowbit_jax.formats import BlockFormat, LookupFormat

OPS = ("dot_general", "einsum", "conv", "ragged_dot")  # ops with a weight (default)
ACT_OPS = ("act_matmul",)                    # activation x activation matmuls
CACHE_OPS = ("kv_cache",)                    # a decoder's key/value cache
ALL_OPS = OPS + ACT_OPS + CACHE_OPS
MODES = ("fake", "real", "calibrate")
LEARN_WEIGHT = (None, "lsq")
LEARN_ACTIVATION = (None, "lsq", "pact")
SCALE_INITS = ("lsq", "amax")
SCALINGS = ("current", "delayed")
INPUT_ROTATIONS = (None, "hadamard")
AMAX_REDUCES = ("max", "most_recent")
SCALES = "quant_scales"    # collection of learned scales and clips (trainable)
STATE = "quant_state"      # collection of amax histories (overwrite-with-gradient)
METRICS = "quant_metrics"  # collection of per-site clipped fractions
_KERNEL_CHOICES = ("auto", "never", "always")

SpecLike = Union[None, str, QuantSpec]


def _to_spec(value: SpecLike, field: str, path: str) -> Optional[QuantSpec]:
  if value is None:
    return None
  try:
    return as_spec(value)
  except (ValueError, TypeError) as e:
    raise type(e)(f"QuantRule({path!r}): {field}={value!r} is not a usable spec: "
                  f"{e}. Pass a QuantSpec or a format name from "
                  "lowbit_jax.formats.names(), e.g. weight='int8'") from None


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One quantization rule: where (a path regex), which ops, and how.

  Attributes:
    path: a regular expression that must fully match the weight's parameter
      path (``layers_0/mlp/up/kernel``) or the path of the layer owning it
      (``layers_0/mlp/up``). Parameter paths are the pytree keys joined by
      ``/``.
    weight: QuantSpec or format name for the weight, or None to keep it in
      float. An unset ``axis`` means the op's contraction axis: per output
      channel, or groups of ``group_size`` along K.
    activation: QuantSpec or format name for the activation (the op's other
      operand), or None (weight-only). An unset ``axis`` means per token
      (dynamic) or per tensor (static).
    ops: the ops the rule applies to, a subset of ``("dot_general", "einsum",
      "conv", "ragged_dot", "act_matmul", "kv_cache")``; the default is the
      four weight ops. ``"ragged_dot"`` is a grouped matmul (MoE experts,
      ``jax.lax.ragged_dot``); a rule listing ``"einsum"`` also applies to it
      (experts were einsums before). ``"kv_cache"`` rules choose how a decoder's key/value cache is
      stored (``lowbit_jax.models.kv_cache``; paths
      ``layers_0/attn/cache/key`` and ``.../value``, the ``activation`` spec).
      ``quantize_function`` sees einsums as ``dot_general``, so there a rule
      with either name applies to every matmul with a weight.
    static: quantize activations with a static range from calibration (run the
      model once in mode ``"calibrate"`` first) instead of per call. For a
      two-level block format (NVFP4) the range fixes the tensor scale and the
      block scales stay dynamic; for other block formats every block takes it.

    grad: QuantSpec or format name for the *output cotangent* of the matched
      ops (low-bit training, e.g. ``weight="fp8_e4m3", activation="fp8_e4m3",
      grad="fp8_e5m2"``): it is quantized before both backward matmuls; the
      forward pass is unchanged. A stochastic spec needs a key (see below).
      An unset axis means per tensor for convolutions. Block or grouped grad
      formats need a matmul's contraction axis, so such a rule must leave
      ``"conv"`` out of ``ops``.
    learn_weight: ``"lsq"``: the weight's scales (one per block of the weight
      spec's grid) are trainable variables, with the LSQ gradient (Esser et
      al. 2020, "Learned Step Size Quantization", eq. 3, times its gradient
      scale ``1 / sqrt(n * Qp)``, n = elements per scale); None keeps
      scales from each call's amax. Block formats store the learned scale
      rounded to their scale format (E8M0, NVFP4's two levels), see
      ``lowbit_jax.fake_quant``; an asymmetric spec learns the scale while
      its zero point follows the data.
    learn_activation: ``"lsq"`` (a learned per-tensor step size, Esser et al.
      2020, gradient scale ``1 / sqrt(n * Qp)`` with n the activation's
      feature width) or ``"pact"`` (a learned per-tensor clipping value, Choi
      et al. 2018, "PACT: Parameterized Clipping Activation"; an asymmetric
      spec clips to ``[0, alpha]`` as the paper); None keeps dynamic (or
      ``static`` calibrated) ranges. Needs a per-tensor, non-block
      activation spec (an unset axis becomes ``"tensor"``).
    lsq_grad_scale: multiply learned LSQ step sizes' gradients by LSQ's
      gradient scale ``1 / sqrt(n * Qp)`` (True, the paper's recipe) or leave
      the plain eq. 3 gradient (False).
    scale_init: how LSQ scales start: ``"lsq"`` (``2 mean|x| / sqrt(Qp)``, as
      the paper) or ``"amax"`` (``amax / Qp``: the scale of fixed-amax
      quantization, so QAT starts from the PTQ model). A PACT clip starts at
      the activation's amax, or at its calibrated range when the front end
      has ``quant_stats`` for the site.
    scaling: ``"current"`` (scales from the tensor being quantized) or
      ``"delayed"`` (Transformer Engine's FP8 recipe, Micikevicius et al.
      2022, "FP8 Formats for Deep Learning"): each quantized operand (and the
      cotangent) takes its per-tensor range from a history of the amaxes of
      earlier steps, kept in the ``"quant_state"`` collection. Needs specs
      with a per-tensor range (an unset axis becomes ``"tensor"``; NVFP4's
      tensor scale also qualifies) and runs on matmuls only.
    amax_history_len: length of each amax history (delayed scaling).
    amax_reduce: how the history becomes a range: ``"max"`` or
      ``"most_recent"``.
    input_rotation: ``"hadamard"``: an online Hadamard transform (QuaRot,
      Ashkboos et al. 2024) of the activation along the op's (single)
      contraction axis, ``x -> x @ H`` with ``H = core.hadamard(K)``, before
      it is quantized; the weight must hold ``H^T W`` (the rotation pass,
      ``lowbit_jax.algorithms.rotate_model``, writes it), so the float
      product is unchanged while the quantized operands have no outlier
      channels. K must be an order ``core.hadamard`` builds (2^k or b * 2^k,
      b in 12, 20, 28, 44, ...). A rule with only ``input_rotation`` runs the
      op in float with the transform. At an activation matmul
      (``"act_matmul"``) *both* operands are rotated along their contraction
      axis, which leaves the product unchanged with no weight to pre-rotate:
      on attention's q.k (``.*/attn/qk``, after the rotary embedding) this is
      SpinQuant's R3 (Liu et al. 2024, Sec. 3), so quantized queries and
      keys see no outlier channels. On a ``"kv_cache"`` rule it stores that
      cached tensor in the Hadamard domain over ``head_dim`` (see
      ``lowbit_jax.models.kv_cache``; keys: R3). Not convolutions.

  Learned scales and PACT clips live in the ``"quant_scales"`` collection
  (train them like parameters); amax histories live in ``"quant_state"``:
  the gradient ``jax.grad`` returns for a history *is* the updated history
  (overwrite-with-gradient), which the training step writes back in place
  of applying it; a layer applied twice in one step sums its two new
  histories (``core.ops``' module docstring: use current scaling for shared
  layers). Stochastic rounding (``rounding="stochastic"`` in any of
  the specs) takes a key from the front end (Linen: the ``"quant"`` rng
  stream; NNX: ``quantize_nnx(..., rngs=)``; ``quantize_function``:
  ``rng=``), a different one for every site.

  Activation x activation matmuls (attention's q.k and p.v, reached through
  ``lowbit_jax.flax.ActEinsum``) are ops of kind ``"act_matmul"``, which a
  rule reaches only when its ``ops`` name it (the default ``ops`` are the
  weight ops, so catch-all rules keep attention in float). There both
  operands take the ``activation`` spec (``weight`` is not used), the
  cotangent ``grad``; ``learn_activation="lsq"`` learns one step size per
  operand.

  A rule with neither ``weight``, ``activation`` nor ``grad`` keeps the ops it
  matches in float; put it first to exclude a layer from a later catch-all
  rule.

  Raises:
    ValueError: a bad regex, an unknown format name, an unknown op, or
      options that do not fit together (``static=True`` or a learned
      activation without an activation spec, a learned weight without a
      weight spec, a learned activation range that is not per tensor, a block
      grad format on a rule that reaches convolutions, delayed scaling with a
      grouped spec that has no per-tensor range, or with learned or static
      ranges).
  """
  path: str
  weight: SpecLike = None
  activation: SpecLike = None
  ops: tuple = OPS
  static: bool = False
  grad: SpecLike = None
  learn_weight: Optional[str] = None
  learn_activation: Optional[str] = None
  scale_init: str = "lsq"
  lsq_grad_scale: bool = True
  scaling: str = "current"
  amax_history_len: int = 16
  amax_reduce: str = "max"
  input_rotation: Optional[str] = None

  def __post_init__(self):
    if not isinstance(self.path, str):
      raise TypeError(f"QuantRule path must be a regex string, got "
                      f"{type(self.path).__name__}")
    try:
      re.compile(self.path)
    except re.error as e:
      raise ValueError(f"QuantRule path {self.path!r} is not a valid regular "
                       f"expression: {e}") from None
    object.__setattr__(self, "weight", _to_spec(self.weight, "weight", self.path))
    object.__setattr__(self, "activation",
                       _to_spec(self.activation, "activation", self.path))
    object.__setattr__(self, "grad", _to_spec(self.grad, "grad", self.path))
    op_list = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
    bad = [o for o in op_list if o not in ALL_OPS]
    if bad or not op_list:
      raise ValueError(f"QuantRule({self.path!r}): ops must be a non-empty subset of "
                       f"{ALL_OPS}, got {self.ops!r}")
    object.__setattr__(self, "ops", op_list)
    if not isinstance(self.static, bool):
      raise TypeError(f"QuantRule({self.path!r}): static must be a bool, got "
                      f"{self.static!r}")
    if self.static and self.activation is None:
      raise ValueError(f"QuantRule({self.path!r}): static=True quantizes activations "
                       "with calibrated ranges, so it needs an activation spec, e.g. "
                       "activation='int8'")
    self._check_training_options()
    sa = self.static_activation
    if sa is not None and sa.tensor_scale and sa.calibration in ("mse", "kl"):
      raise ValueError(
          f"QuantRule({self.path!r}): a static {sa.format.name} activation "
          "calibrates only its tensor scale (its block scales stay dynamic), and "
          f"calibration={sa.calibration!r} scores a per-element quantizer that this "
          "two-level format does not use; use calibration='minmax', 'absmax_ema' "
          "or 'percentile'")

  def _check_training_options(self) -> None:
    """Validates grad, learn_*, scale_init and the delayed-scaling options."""
    name = f"QuantRule({self.path!r})"
    if self.learn_weight not in LEARN_WEIGHT:
      raise ValueError(f"{name}: learn_weight must be one of {LEARN_WEIGHT}, got "
                       f"{self.learn_weight!r}")
    if self.learn_activation not in LEARN_ACTIVATION:
      raise ValueError(f"{name}: learn_activation must be one of "
                       f"{LEARN_ACTIVATION}, got {self.learn_activation!r}")
    if self.scale_init not in SCALE_INITS:
      raise ValueError(f"{name}: scale_init must be one of {SCALE_INITS}, got "
                       f"{self.scale_init!r}")
    if self.scaling not in SCALINGS:
      raise ValueError(f"{name}: scaling must be one of {SCALINGS}, got "
                       f"{self.scaling!r}")
    if self.amax_reduce not in AMAX_REDUCES:
      raise ValueError(f"{name}: amax_reduce must be one of {AMAX_REDUCES}, got "
                       f"{self.amax_reduce!r}")
    if self.input_rotation not in INPUT_ROTATIONS:
      raise ValueError(f"{name}: input_rotation must be one of {INPUT_ROTATIONS}, "
                       f"got {self.input_rotation!r}")
    n = self.amax_history_len
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"{name}: amax_history_len must be a positive int, got {n!r}")
    if self.learn_weight is not None:
      if self.weight is None:
        raise ValueError(f"{name}: learn_weight={self.learn_weight!r} learns the "
                         "weight's scales, so it needs a weight spec, e.g. "
                         "weight='int4'")
      _check_learnable(self.weight, name, "learn_weight", per_tensor=False)
    if self.learn_activation is not None:
      if self.activation is None:
        raise ValueError(f"{name}: learn_activation={self.learn_activation!r} "
                         "learns the activation's range, so it needs an activation "
                         "spec, e.g. activation='int8'")
      if self.static:
        raise ValueError(f"{name}: learn_activation replaces static calibrated "
                         "ranges (a calibrated range, when present, initialises "
                         "the learned one); drop static=True")
      _check_learnable(self.activation, name, "learn_activation", per_tensor=True)
    if self.scale_init != "lsq" and "lsq" not in (self.learn_weight,
                                                  self.learn_activation):
      raise ValueError(f"{name}: scale_init={self.scale_init!r} chooses how LSQ "
                       "scales start, but the rule learns none; set "
                       "learn_weight='lsq' or learn_activation='lsq', or drop it")
    g = self.grad
    if g is not None and "conv" in self.ops and (
        isinstance(g.format, BlockFormat) or g.group_size is not None
        or g.tile is not None):
      raise ValueError(f"{name}: grad={g.format.name!r} is a block/grouped format, "
                       "whose blocks must run along a matmul's contraction axis; "
                       "a convolution's two backward ops contract different "
                       "axes. Leave conv out: ops=('dot_general', 'einsum'), or "
                       "use a per-tensor grad format such as 'fp8_e5m2'")
    if self.scaling == "delayed":
      if self.weight is None and self.activation is None and g is None:
        raise ValueError(f"{name}: scaling='delayed' needs something to quantize "
                         "(weight, activation or grad)")
      if self.static:
        raise ValueError(f"{name}: scaling='delayed' takes the activation range "
                         "from an amax history; static=True takes it from "
                         "calibration. Use one")
      if self.learn_weight is not None or self.learn_activation is not None:
        raise ValueError(f"{name}: scaling='delayed' takes ranges from amax "
                         "histories; learned scales (learn_weight / "
                         "learn_activation) replace them. Use one")
      for field, spec in (("weight", self.weight), ("activation", self.activation),
                          ("grad", g)):
        if spec is not None and not _has_tensor_range(spec):
          raise ValueError(
              f"{name}: scaling='delayed' keeps one amax history per tensor, but "
              f"{field}={spec.format.name!r} (axis={spec.axis!r}, group_size="
              f"{spec.group_size!r}, tile={spec.tile!r}) has no per-tensor "
              "range; use a per-tensor spec (leave axis unset or 'tensor') or "
              "scaling='current'")

  def matches(self, path: str) -> bool:
    """Whether the regex fully matches ``path``."""
    return _compiled(self.path).fullmatch(path) is not None

  @property
  def is_float(self) -> bool:
    """Whether this rule leaves what it matches untouched (float, no rotation)."""
    return (self.weight is None and self.activation is None and self.grad is None
            and self.input_rotation is None)

  @property
  def delayed(self) -> bool:
    """Whether ranges come from amax histories (``scaling="delayed"``)."""
    return self.scaling == "delayed"

  @property
  def weight_spec(self) -> Optional[QuantSpec]:
    """The weight spec as sites use it (delayed scaling: per tensor if unset)."""
    return _tensor_if_unset(self.weight) if self.delayed else self.weight

  @property
  def activation_spec(self) -> Optional[QuantSpec]:
    """The activation spec as sites use it.

    Static, learned and delayed ranges are per tensor: an unset axis becomes
    ``"tensor"``; otherwise the spec is the rule's own.
    """
    if self.static:
      return self.static_activation
    if self.learn_activation is not None or self.delayed:
      return _tensor_if_unset(self.activation)
    return self.activation

  @property
  def grad_spec(self) -> Optional[QuantSpec]:
    """The cotangent spec as sites use it (delayed scaling: per tensor)."""
    return _tensor_if_unset(self.grad) if self.delayed else self.grad

  @property
  def static_activation(self) -> Optional[QuantSpec]:
    """The activation spec a static rule calibrates and quantizes with.

    An unset axis becomes ``"tensor"`` (one range), since a static range cannot
    follow each call's tokens.
    """
    a = self.activation
    if a is None or not self.static:
      return None
    if a.axis is None and a.tile is None and a.group_size is None:
      return a.replace(axis=TENSOR)
    return a


def _tensor_if_unset(spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
  if spec is None or spec.axis is not None or spec.tile is not None:
    return spec
  if spec.group_size is not None:  # block formats: blocks along an op axis
    return spec
  return spec.replace(axis=TENSOR)


def _has_tensor_range(spec: QuantSpec) -> bool:
  """Whether a spec's range is one per tensor (or has a per-tensor scale)."""
  if spec.tensor_scale:
    return True
  if spec.tile is not None or spec.group_size is not None:
    return False
  return spec.axis is None or spec.axis == TENSOR


def _check_learnable(spec: QuantSpec, name: str, field: str, per_tensor: bool):
  if isinstance(spec.format, LookupFormat) and spec.format.scale_method != "absmax":
    raise ValueError(f"{name}: {field} cannot learn the scale of "
                     f"{spec.format.name!r}, whose scale is a statistic of the "
                     f"data ({spec.format.scale_method})")
  if per_tensor and (isinstance(spec.format, BlockFormat) or not (
      spec.axis in (None, TENSOR) and spec.group_size is None
      and spec.tile is None)):
    raise ValueError(f"{name}: {field} learns one range per tensor (a per-token "
                     "range would change with every batch); leave the activation "
                     f"axis unset or 'tensor', got axis={spec.axis!r}, "
                     f"group_size={spec.group_size!r}, tile={spec.tile!r}")


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern:
  return re.compile(pattern)


def as_rules(rules) -> tuple:
  """A tuple of QuantRules from a rule or a sequence of rules."""
  if isinstance(rules, QuantRule):
    return (rules,)
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
    raise TypeError(f"rules must be a QuantRule or a sequence of QuantRules, got "
                    f"{type(rules).__name__}")
  rules = tuple(rules)
  for r in rules:
    if not isinstance(r, QuantRule):
      raise TypeError(f"rules must be QuantRules, got {type(r).__name__}: {r!r}; "
                      "build them with lowbit_jax.QuantRule(path, weight=..., ...)")
  return rules


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  return mode


@dataclasses.dataclass(frozen=True)
class Site:
  """One matched op: where it is, which rule won, and how to run it.

  Attributes:
    path: the weight's parameter path (the key its statistics are stored under
      where a front end keeps them flat).
    op: "dot_general", "einsum", "conv", "ragged_dot" or "act_matmul".
    rule: the rule that matched.
    mode: "fake", "real" or "calibrate".
    use_kernel: kernel dispatch of ``ops.dot_general`` ("auto", "never",
      "always").
  """
  path: str
  op: str
  rule: QuantRule
  mode: str
  use_kernel: str = "auto"

  def __post_init__(self):
    r = self.rule
    if self.op == "act_matmul" and r.static and r.activation is not None:
      raise ValueError(f"{self.path}: rule {r.path!r} is static, but activation x "
                       "activation matmuls take dynamic, delayed or LSQ ranges (a "
                       "static range per operand is not supported); drop "
                       "static=True or keep 'act_matmul' out of the rule's ops")
    if self.op == "conv" and r.input_rotation is not None:
      raise ValueError(f"{self.path}: rule {r.path!r} has input_rotation="
                       f"{r.input_rotation!r}, which applies to matmuls, not to a "
                       "conv; narrow the rule's ops to ('dot_general', 'einsum', "
                       "'act_matmul') or its path")
    if self.op == "act_matmul" and r.learn_activation == "pact":
      raise ValueError(f"{self.path}: rule {r.path!r} learns a PACT clip, which "
                       "activation x activation matmuls do not take; use "
                       "learn_activation='lsq' or keep 'act_matmul' out of its ops")

  @property
  def is_act(self) -> bool:
    """Whether this is an activation x activation matmul (no weight)."""
    return self.op == "act_matmul"

  @property
  def weight(self) -> Optional[QuantSpec]:
    """The weight spec (``rule.weight_spec``); None at activation matmuls."""
    return None if self.is_act else self.rule.weight_spec

  @property
  def activation(self) -> Optional[QuantSpec]:
    """The activation spec as the site uses it (``rule.activation_spec``)."""
    return self.rule.activation_spec

  @property
  def grad(self) -> Optional[QuantSpec]:
    """The output-cotangent spec (``rule.grad_spec``)."""
    return self.rule.grad_spec

  @property
  def static(self) -> bool:
    return self.rule.static

  @property
  def stochastic(self) -> bool:
    """Whether some spec of the site rounds stochastically (needs a key)."""
    specs = (self.weight, self.activation, self.grad)
    return self.mode != "calibrate" and any(
        s is not None and s.rounding == "stochastic" for s in specs)

  def scale_names(self) -> tuple:
    """Names of the site's learned variables in ``"quant_scales"``."""
    r = self.rule
    if self.mode == "calibrate":
      return ()
    names = []
    if self.is_act:
      if r.learn_activation == "lsq" and r.activation is not None:
        names += ["lhs_scale", "rhs_scale"]
      return tuple(names)
    if r.learn_weight and r.weight is not None:
      names.append("weight_scale")
    if r.learn_activation == "lsq":
      names.append("act_scale")
    elif r.learn_activation == "pact":
      names.append("act_clip")
    return tuple(names)

  def history_names(self) -> dict:
    """``{name in "quant_state": ops' history key}`` (delayed scaling)."""
    r = self.rule
    if not r.delayed or self.mode == "calibrate":
      return {}
    out = {}
    if self.is_act:
      if r.activation is not None:
        out["lhs_history"] = "lhs"
        out["rhs_history"] = "rhs"
    else:
      if r.activation is not None:
        out["act_history"] = "lhs"
      if r.weight is not None:
        out["weight_history"] = "rhs"
    if r.grad is not None:
      out["grad_history"] = "grad"
    return out

  @property
  def collects_stats(self) -> bool:
    """Whether this site records activation statistics (calibrate + static)."""
    return self.mode == "calibrate" and self.rule.static

  @property
  def needs_stats(self) -> bool:
    """Whether this site reads calibrated ranges (static, not calibrating)."""
    return self.mode != "calibrate" and self.rule.static


class QuantConfig:
  """An ordered list of QuantRules plus a record of which sites each matched.

  Front ends call ``match`` once per site as they trace a model; afterwards
  ``unused_rules()`` lists rules that matched nothing and ``sites`` maps every
  quantized site to its ``Site``.

  Args:
    rules: a QuantRule or a sequence of them (first full match wins).
    strict: make ``check()`` raise when a rule matched nothing.
  """

  def __init__(self, rules, *, strict: bool = False):
    self.rules = as_rules(rules)
    self.strict = bool(strict)
    self._hits: dict[int, list[str]] = {i: [] for i in range(len(self.rules))}
    self.sites: dict[str, Site] = {}
    self._log: Optional[list] = None

  def begin_log(self) -> None:
    """Starts logging matches and sites (``end_log`` returns them)."""
    self._log = []

  def end_log(self) -> list:
    """The matches and sites recorded since ``begin_log``."""
    log, self._log = self._log or [], None
    return log

  def replay(self, log: list) -> None:
    """Records again what a trace recorded (a jit cache hit traces nothing)."""
    for kind, a, b in log:
      if kind == "match":
        if b not in self._hits[a]:
          self._hits[a].append(b)
      else:
        self.sites[a] = b

  def find(self, candidates: Sequence[str], op_kinds: Iterable[str]) -> Optional[int]:
    """Index of the first rule that applies, without recording anything."""
    kinds = set(op_kinds)
    for i, r in enumerate(self.rules):
      if kinds.isdisjoint(r.ops):
        continue
      if any(r.matches(c) for c in candidates):
        return i
    return None

  def match(self, candidates: Sequence[str], op_kinds: Iterable[str]
            ) -> Optional[QuantRule]:
    """The first rule applying to a site with these paths and op kinds.

    Records the match (for ``unused_rules``) under the first candidate that
    is not already recorded for that rule.
    """
    i = self.find(candidates, op_kinds)
    if i is None:
      return None
    key = candidates[-1]
    if self._log is not None:
      self._log.append(("match", i, key))
    if key not in self._hits[i]:
      self._hits[i].append(key)
    return self.rules[i]

  def record_site(self, key: str, site: Site) -> None:
    """Remembers a quantized site under ``key``."""
    if self._log is not None:
      self._log.append(("site", key, site))
    self.sites[key] = site

  def matched(self) -> dict:
    """``{rule: [paths it matched]}`` for the rules that matched something."""
    return {self.rules[i]: list(p) for i, p in self._hits.items() if p}

  def unused_rules(self) -> list:
    """The rules that matched no site so far (in rule order)."""
    return [self.rules[i] for i, p in self._hits.items() if not p]

  def check(self) -> None:
    """Raises if ``strict`` and some rule matched nothing.

    Raises:
      ValueError: naming the unused rules.
    """
    unused = self.unused_rules()
    if self.strict and unused:
      raise ValueError(
          "these quantization rules matched no layer or parameter path: "
          + ", ".join(repr(r.path) for r in unused)
          + ". Paths are pytree keys joined by '/', e.g. 'layers_0/mlp/up/kernel'; "
          "the regex must match a whole path (use '.*' around fragments). Pass "
          "strict=False to allow unused rules")

  def reset(self) -> None:
    """Forgets all recorded matches.

    ``quantize_function`` replays the matches of its cached traces on every
    call, so its report is right after a reset whether or not it retraces; a
    function the caller jitted records its matches only when it is traced.
    """
    self._hits = {i: [] for i in range(len(self.rules))}
    self.sites = {}

  def report(self) -> str:
    """A human-readable table: each rule and the paths it matched."""
    lines = []
    for i, r in enumerate(self.rules):
      hits = self._hits[i]
      what = (f"{len(hits)} site(s): " + ", ".join(hits[:8])
              + (" ..." if len(hits) > 8 else "")) if hits else "UNUSED"
      lines.append(f"[{i}] {r.path!r}: {what}")
    return "\n".join(lines)


def as_config(rules, strict: bool = False) -> QuantConfig:
  """``rules`` if it is a QuantConfig (``strict`` added), else a new one."""
  if isinstance(rules, QuantConfig):
    if strict:
      rules.strict = True
    return rules
  return QuantConfig(rules, strict=strict)


def candidates(param_path: str) -> tuple:
  """Candidate paths of a weight: its parent (layer) path, then its own."""
  parent = param_path.rsplit("/", 1)[0] if "/" in param_path else ""
  return (parent, param_path)


# ---------------------------------------------------------------------------
# Paths


def path_str(keypath) -> str:
  """A pytree key path as ``a/0/b`` (dict keys, sequence indices, attributes)."""
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


# ---------------------------------------------------------------------------
# Quantized weights


@dataclasses.dataclass(frozen=True, repr=False)
class QWeight(QArray):
  """A quantized weight as real quantization stores it in a parameter pytree.

  A QArray (codes, scales, spec, ...) plus ``transposed``: whether it holds the
  transpose of the layer's weight. 2-D weights contracted on their first axis
  (``x @ W`` with ``W[K, N]``) are stored K-major as the QArray of ``W.T``
  (``[N, K]``, quantized along K, ``ops.prepare_weight``), the layout kernels
  read; ``logical_shape`` is then ``(K, N)``. ``w[...]`` returns the QWeight
  itself, so NNX Variables can hold it.
  """
  transposed: bool = False

  @property
  def logical_shape(self) -> tuple:
    """Shape of the weight the layer sees."""
    return tuple(self.shape[::-1]) if self.transposed else tuple(self.shape)

  def logical(self) -> jax.Array:
    """The dequantized weight in the layer's layout."""
    v = dequantize(self)
    return v.T if self.transposed else v

  def __getitem__(self, idx):
    if idx is Ellipsis:
      return self
    raise TypeError("a QWeight cannot be indexed; dequantize it first "
                    "(w.logical()[...])")

  def __repr__(self) -> str:
    return super().__repr__()[:-1] + f", transposed={self.transposed})"


jax.tree_util.register_dataclass(
    QWeight, data_fields=["codes", "scale", "zero_point", "tensor_scale"],
    meta_fields=["spec", "shape", "dtype", "pack_axis", "code_order",
                 "transposed"])


def as_qweight(q: QArray, transposed: bool = False) -> QWeight:
  """A QWeight with the fields of ``q``."""
  fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(QArray)}
  return QWeight(**fields, transposed=transposed)


def logical_shape(x) -> tuple:
  """The layer-side shape of a weight leaf (a QWeight's logical shape)."""
  if isinstance(x, QWeight):
    return x.logical_shape
  return tuple(x.shape)


def logical_value(x) -> jax.Array:
  """A weight leaf as a float array in the layer's layout."""
  if isinstance(x, QWeight):
    return x.logical()
  if isinstance(x, QArray):
    return dequantize(x)
  return x


@dataclasses.dataclass(frozen=True)
class WeightPlan:
  """How ``quantize_params`` stores one weight.

  Attributes:
    spec: the weight spec with the op's axis filled in, in the weight's own
      (logical) layout.
    transpose: store the 2-D weight K-major (the QArray of its transpose).
    compute_dtype: the dtype the op sees the weight in when that is narrower
      than the stored parameter (a Linen/NNX layer with ``dtype=bfloat16``
      promotes its float32 kernel before the matmul): fake mode quantizes
      those rounded values, so real mode rounds the weight to this dtype
      before quantizing it too (the QWeight keeps the parameter's dtype).
      None: the weight is quantized as stored.
  """
  spec: QuantSpec
  transpose: bool = False
  compute_dtype: Optional[str] = None


def conv_weight_spec(spec: QuantSpec, ndim: int, out_axis: int,
                     in_axis: int) -> QuantSpec:
  """A conv kernel's spec with an unset axis filled in.

  Per output channel (every kernel dim but the output-feature one shares a
  scale), as ``ops.conv_general_dilated`` fills it; with a ``group_size``,
  groups run along the input-feature axis.
  """
  if spec.axis is None and spec.tile is None:
    if spec.group_size is not None:
      return spec.replace(axis=in_axis % ndim)
    return spec.replace(axis=tuple(i for i in range(ndim) if i != out_axis % ndim))
  return spec


def plan_weight(spec: QuantSpec, shape: tuple, op: str, *, contracting=(),
                batch=(), out_axis: Optional[int] = None,
                in_axis: Optional[int] = None, compute_dtype=None) -> WeightPlan:
  """The WeightPlan of a weight of ``shape`` used by one op.

  Args:
    spec: the rule's weight spec.
    shape: the weight's (logical) shape.
    op: "dot_general", "einsum", "ragged_dot" or "conv".
    contracting: the weight's contraction axes (matmuls; 1 for ragged_dot's
      ``[G, K, N]`` weight: one scale per group and output channel).
    batch: the weight's batch axes (matmuls).
    out_axis, in_axis: the kernel's output- and input-feature axes (conv).
    compute_dtype: the dtype of the weight as the op receives it (after the
      layer's dtype promotion), or None (as stored).

  Returns:
    The plan; its spec fills an unset axis exactly as ``lowbit_jax.core.ops``
    does for a float weight, so real quantization equals fake quantization.
  """
  ndim = len(shape)
  cd = None if compute_dtype is None else jnp.dtype(compute_dtype).name
  if op == "conv":
    return WeightPlan(conv_weight_spec(spec, ndim, out_axis, in_axis), False, cd)
  contracting = tuple(sorted(c % ndim for c in contracting))
  filled = ops.operand_spec(spec, contracting, ndim)
  kmajor = ndim == 2 and not batch and contracting == (0,)
  return WeightPlan(filled, kmajor, cd)


def _as_op_sees(w: jax.Array, plan: WeightPlan) -> jax.Array:
  """``w`` rounded to the dtype its op computes in (``plan.compute_dtype``),
  with ``round_to_dtype``: an astype pair would be dropped by XLA on a GPU,
  and the quantizer would see the unrounded weight there."""
  cd = plan.compute_dtype
  if (cd is None or not jnp.issubdtype(w.dtype, jnp.floating)
      or jnp.dtype(cd).itemsize >= jnp.dtype(w.dtype).itemsize):
    return w
  return round_to_dtype(w, cd)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_leaf(w: jax.Array, plan: WeightPlan) -> QWeight:
  w = _as_op_sees(w, plan)
  if plan.transpose:
    q = ops.prepare_weight(w, plan.spec, contracting=0)
    return as_qweight(q, transposed=True)
  return as_qweight(quantize(w, plan.spec), transposed=False)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_leaf_given(w: jax.Array, plan: WeightPlan, scale=None, tensor_scale=None,
                         amax=None, zero_point=None) -> QWeight:
  """``_quantize_leaf`` with a given scale grid (and tensor scale, or an
  asymmetric spec's zero point) or a static per-tensor range (NVFP4: its
  tensor range)."""
  w = _as_op_sees(w, plan)
  if amax is not None:
    kw = {"tensor_amax" if plan.spec.tensor_scale else "amax": amax}
  else:
    t = jnp.transpose if plan.transpose else (lambda a: a)
    kw = {"scale": t(scale), "tensor_scale": tensor_scale}
    if zero_point is not None:
      kw["zero_point"] = t(zero_point)
  if plan.transpose:
    return as_qweight(quantize(w.T, ops.transpose_spec(plan.spec), **kw), transposed=True)
  return as_qweight(quantize(w, plan.spec, **kw), transposed=False)


def check_tensor_scales_paired(tensor_scales, scales, hint: str) -> None:
  """Refuses tensor scales (of two-level weights) given without the block
  scales they go with (``hint``: where both come from)."""
  lone = sorted(set(tensor_scales or {}) - set(scales or {}))
  if lone:
    raise ValueError(f"tensor scales for {lone} come without their block scales; "
                     f"pass both: {hint}")


def delayed_range(rule: "QuantRule", history, w) -> jax.Array:
  """The range a delayed-scaling weight is quantized with: its amax history
  reduced by the rule's ``amax_reduce``, or the weight's own amax where the
  history is all zero (never trained), as the fake ops take it. Real mode
  stores the weight with it, so the exported model is the one trained."""
  a = scaling.amax_from_history(jnp.asarray(history, jnp.float32), rule.amax_reduce)
  return jnp.where(a > 0, a, scaling.current_amax(_float(w)))


def quantize_weight(w: jax.Array, plan: WeightPlan, scale=None,
                    tensor_scale=None, history: Optional[tuple] = None) -> QWeight:
  """Quantizes one float weight as ``plan`` says (jitted per shape and plan).

  Args:
    w: the float weight, in the layer's layout.
    plan: its WeightPlan.
    scale: a learned (LSQ) scale grid of ``plan.spec`` over ``w`` (the
      ``weight_scale`` a QAT run trained, or a PTQ result's): the QWeight
      then holds exactly these scales; for an asymmetric spec a ``(scale,
      zero point)`` pair (a GPTQ result's). None: scales from the weight's
      amax.
    tensor_scale: with ``scale``, a two-level (NVFP4) spec's float32 tensor
      scale the block scales were chosen under (a PTQ result's
      ``weight_tensor_scales``; ``quantize``'s keyword). None: rebuilt from
      the largest block scale.
    history: ``(QuantRule, weight_history)`` of a delayed-scaling weight: it
      is stored with the per-tensor range the history gives
      (``delayed_range``; NVFP4: its tensor range), the one fake mode
      quantized it with. Not with ``scale``.
  """
  if isinstance(w, QArray):
    raise TypeError("this weight is already quantized")
  if history is not None:
    if scale is not None:
      raise ValueError("a weight takes a learned scale or an amax history, not both")
    rule, h = history
    return _quantize_leaf_given(w, plan,
                                amax=delayed_range(rule, h, _as_op_sees(w, plan)))
  if scale is None:
    if tensor_scale is not None:
      raise ValueError("a tensor scale is given without the block scales it goes "
                       "with; pass scale= too (a PTQ result's weight_scales and "
                       "weight_tensor_scales come together)")
    return _quantize_leaf(w, plan)
  zero_point = None
  if isinstance(scale, (tuple, list)):   # an asymmetric spec's (scale, zero point)
    if len(scale) != 2 or plan.spec.symmetric:
      raise ValueError("a (scale, zero point) pair is for an asymmetric spec; "
                       f"{plan.spec} takes a scale grid")
    scale, zero_point = scale
  if plan.transpose and jnp.ndim(scale) != 2:
    raise ValueError(f"a K-major weight takes a 2-d scale grid, got shape "
                     f"{jnp.shape(scale)}")
  return _quantize_leaf_given(
      w, plan, jnp.asarray(scale, jnp.float32),
      None if tensor_scale is None else jnp.asarray(tensor_scale, jnp.float32),
      zero_point=zero_point)


def quantize_params(params: Any, plan: Mapping[str, WeightPlan], *,
                    donate: bool = False,
                    on_step: Optional[Callable[[str, QWeight], None]] = None,
                    scales: Optional[Mapping[str, jax.Array]] = None,
                    tensor_scales: Optional[Mapping[str, jax.Array]] = None,
                    histories: Optional[Mapping[str, tuple]] = None) -> Any:
  """Replaces the planned float leaves of ``params`` by QWeights, one at a time.

  Only one leaf is in flight at a time, so the peak memory is the float
  parameters plus one quantized leaf (with ``donate=True``; XLA temporaries of
  quantizing that one leaf come on top): the model is never held twice.

  Args:
    params: a parameter pytree.
    plan: ``{parameter path: WeightPlan}``; the front ends build it
      (``LinenQuantizer.plan``, ``QuantizedFunction.plan``).
    donate: delete each float leaf once its QWeight exists (the caller's
      ``params`` is unusable afterwards). Without it the caller still holds
      the float leaves, so the peak is float + quantized.
    on_step: called as ``on_step(path, qweight)`` after each leaf is quantized
      and before its float leaf is deleted (e.g. to measure memory).
    scales: ``{parameter path: learned scale grid}`` (QAT with
      ``learn_weight="lsq"``): those leaves are quantized with exactly these
      scales (``quantize(..., scale=)``).
    tensor_scales: ``{parameter path: float32 tensor scale}`` of two-level
      (NVFP4) weights in ``scales`` (a PTQ result's ``weight_tensor_scales``):
      their block scales are stored under exactly that tensor scale.
    histories: ``{parameter path: (QuantRule, amax history)}`` of
      delayed-scaling weights (their ``weight_history``): each is stored with
      the range its history gives (``delayed_range``), the range fake
      mode quantized it with, not its current amax.

  Returns:
    ``params`` with the planned leaves replaced.

  Raises:
    ValueError: a planned path is not a float leaf of ``params``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
  paths = [path_str(kp) for kp, _ in flat]
  missing = sorted(set(plan) - set(paths))
  extra = sorted(set(scales or {}) - set(plan))
  if extra:
    raise ValueError(f"learned scales for {extra} have no planned weight; plan "
                     "those weights (a rule with a weight spec must match them)")
  check_tensor_scales_paired(tensor_scales, scales,
                             "a PTQ result's weight_scales and weight_tensor_scales "
                             "(lowbit_jax.real_mode_kwargs)")
  if missing:
    raise ValueError(f"planned weights {missing} are not leaves of params (its "
                     f"leaves include {paths[:6]}); build the plan from the same "
                     "parameter pytree")
  leaves = [leaf for _, leaf in flat]
  del flat
  # donate: an array at several paths (tied weights) is deleted only once no
  # planned path still has it to quantize, and never while an unplanned path
  # holds it.
  holders = collections.Counter(id(leaf) for leaf in leaves)
  for i, p in enumerate(paths):
    if p not in plan:
      continue
    leaf = leaves[i]
    if isinstance(leaf, QArray):
      raise ValueError(f"{p} is already quantized")
    try:
      q = quantize_weight(leaf, plan[p], None if scales is None else scales.get(p),
                          None if tensor_scales is None else tensor_scales.get(p),
                          None if histories is None else histories.get(p))
    except ValueError as e:   # (e.g. a spec whose blocks do not divide its axis)
      raise ValueError(f"{p}: {e}") from e
    leaves[i] = q
    if on_step is not None:
      on_step(p, q)
    holders[id(leaf)] -= 1
    if donate and isinstance(leaf, jax.Array) and not holders[id(leaf)]:
      leaf.delete()
    del leaf
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------
# Calibration statistics


def observer_for(spec: QuantSpec) -> calibration.Observer:
  """The observer a static activation spec calibrates with."""
  return calibration.get(spec.calibration)


def observe(site: Site, state, x: jax.Array):
  """Folds one activation batch into ``state`` (None: start a new state).

  ``x`` is the activation as the site's op quantizes it: ``site_dot_general``
  and its kin hand it to ``SiteCall.observe`` after an ``input_rotation``
  (along the op's own contraction axis) and an einsum's lhs-only sums.
  """
  spec = site.rule.static_activation
  obs = observer_for(spec)
  if state is None:
    state = obs.init(x, spec)
  return obs.update(state, x)   # (an empty batch leaves the state as it is)


def is_range(stats) -> bool:
  """Whether ``stats`` is a finalized range (``{"amax": ...}``)."""
  return isinstance(stats, Mapping) and "amax" in stats


def static_range(site: Site, stats) -> dict:
  """``{"amax", "amin"}`` for a static site from an observer state or a range.

  A concrete range of 0 or below, or not finite, raises here, naming the
  layer. A traced one (ranges or observer states passed as arguments into a
  jitted function) cannot be checked while tracing: the quantizer turns every
  block it would get wrong into NaN (``quantize``'s rule for static ranges),
  so the layer's output is NaN, never silently wrong; and a
  ``jax.experimental.checkify`` check names the layer when the call runs under
  ``checkify.checkify`` (e.g. ``err, y = checkify.checkify(jax.jit(f))(...)``;
  ``err.throw()``). Outside checkify that check costs nothing.

  Raises:
    ValueError: no statistics were recorded for the site, or a concrete range
      is not positive and finite (naming the layer).
  """
  if stats is None:
    raise ValueError(
        f"rule {site.rule.path!r} is static but there are no calibration statistics "
        f"for {site.path!r}: run the model with mode='calibrate' over some batches "
        "first and pass the statistics it recorded")
  spec = site.rule.static_activation
  where = f"layer {site.path!r} (rule {site.rule.path!r}): "
  if is_range(stats):
    r = {"amax": stats["amax"], "amin": stats.get("amin")}
  else:
    obs = observer_for(spec)
    calibration.check_state(obs, stats, spec, where)
    r = obs.finalize(stats, spec)
  check_static_range(r["amax"], r.get("amin"), symmetric=spec.symmetric, where=where)
  _check_traced_range(r, spec, where)
  return r


def _check_traced_range(r: dict, spec: QuantSpec, where: str) -> None:
  """A checkify check (named for the layer) that a traced range is usable."""
  amax, amin = r["amax"], r.get("amin")
  if not any(isinstance(v, jax.core.Tracer) for v in (amax, amin)):
    return
  hi = jnp.asarray(amax, jnp.float32)
  width = hi if spec.symmetric or amin is None else hi - jnp.asarray(amin, jnp.float32)
  checkify.debug_check(
      jnp.all(jnp.isfinite(width) & (width > 0)),
      where.replace("{", "{{").replace("}", "}}") + "the static range (amax"
      + ("" if spec.symmetric or amin is None else " - amin") + ") must be positive "
      "and finite, got {} somewhere (the observer saw no data, or only zeros, NaN "
      "or inf); where it cannot scale the data the output is NaN. Calibrate on "
      "batches that reach this layer, or leave it dynamic", jnp.min(width))


def finalize_range(site: Site, stats) -> dict:
  """The finalized range of an observer state (kept as is if already one).

  Raises:
    ValueError: the range is 0 or below somewhere (the layer saw no data, or
      only zeros or non-finite values), naming the layer.
  """
  r = static_range(site, stats)
  if is_range(stats):
    return dict(stats)
  return {k: v for k, v in r.items() if v is not None}


def finalize_ranges(items) -> dict:
  """``finalize_range`` over ``(key, site, stats)`` triples, all at once.

  Returns:
    ``{key: range}``.

  Raises:
    ValueError: listing every layer whose calibrated range is 0 or below or
      not finite (it saw no data, or only zeros, NaN or inf).
  """
  out, bad = {}, []
  for key, site, st in items:
    try:
      out[key] = finalize_range(site, st)
    except ValueError as e:
      if "must be positive and finite" not in str(e):
        raise
      bad.append(site.path)
  if bad:
    raise ValueError(f"{len(bad)} layer(s) have no usable calibrated range (the "
                     f"observer saw no data there, or only zeros, NaN or inf): "
                     f"{sorted(bad)}. Calibrate on batches that reach them, or "
                     "exclude them from the static rule")
  return out


# ---------------------------------------------------------------------------
# Input recording (PTQ statistics on every front end)

_RECORDING = threading.local()


def input_recorder() -> Optional[Callable]:
  """The active input recorder of calibrate mode, or None.

  ``lowbit_jax.ptq.capture_hessians`` sets one (``recording_inputs``) while
  it runs a model in calibrate mode; every weight site then calls it as
  ``rec(site, op, activation, weight, op_params)`` before running its float op,
  on Linen, NNX and ``quantize_function`` alike.
  """
  return getattr(_RECORDING, "fn", None)


@contextlib.contextmanager
def recording_inputs(fn: Callable):
  """Makes ``fn`` the input recorder of calibrate-mode sites in this thread."""
  prev = input_recorder()
  _RECORDING.fn = fn
  try:
    yield
  finally:
    _RECORDING.fn = prev


# ---------------------------------------------------------------------------
# The quantized ops of a site


def check_use_kernel(use_kernel: str) -> str:
  """Validates a kernel-dispatch choice."""
  if use_kernel not in _KERNEL_CHOICES:
    raise ValueError(f"use_kernel must be one of {_KERNEL_CHOICES}, got "
                     f"{use_kernel!r}")
  return use_kernel


class SiteCall:
  """What one call of a site reads, creates and records (built by a front end).

  The front end fills it from its own storage (a Linen scope, NNX Variables,
  the dicts passed to a ``QuantizedFunction``), passes it to ``site_*`` and
  writes back what the call created and recorded.

  Attributes:
    scales: the site's ``"quant_scales"`` entries ``{name: array}`` (see
      ``Site.scale_names``).
    state: the site's ``"quant_state"`` entries ``{name: float32[L]}`` (see
      ``Site.history_names``).
    key: PRNG key for stochastic rounding (this site's own), or None.
    stats: calibration statistics or range (static rules; they also start a
      PACT clip).
    init: create missing scales and histories from this call's data (sets
      both ``init_scales`` and ``init_state``, which front ends may set
      apart: a Linen collection is created only where it is mutable).
    metrics: record the fraction of weight and activation values clipped.
    observe: (calibrating a static rule) called with the activation as the
      op would quantize it (rotated, summed), to fold into the statistics.
    weight_view: how the weight operand is laid out against the stored
      parameter: ``()`` as stored, ``(1, 0)`` a 2-D transpose of it (``x @
      w.T``, ``Embed.attend``), None another view (a reshape, slice or
      broadcast). The PTQ capture reads it to record the input Hessian in the
      stored weight's layout.
    new_scales, new_state: what the call created (``init``).
    recorded: ``{name: scalar}`` clipped fractions (``metrics``), e.g.
      ``{"weight_clipped": ..., "act_clipped": ...}``.
  """

  def __init__(self, *, scales=None, state=None, key=None, stats=None,
               init: bool = False, metrics: bool = False, weight_view=()):
    self.scales = dict(scales or {})
    self.weight_view = weight_view
    self.state = dict(state or {})
    self.key = key
    self.stats = stats
    self.init_scales = self.init_state = bool(init)
    self.metrics = bool(metrics)
    self.observe: Optional[Callable[[jax.Array], None]] = None
    self.new_scales: dict = {}
    self.new_state: dict = {}
    self.recorded: dict = {}

  def _missing(self, site: Site, what: str, name: str):
    raise ValueError(
        f"rule {site.rule.path!r} {what} here ({name!r}), but no value was passed. "
        "Create the quantization variables first: Linen "
        "q.init_quant_vars(model, variables, *args) (or apply(..., mutable="
        f"[{SCALES!r}, {STATE!r}])), NNX lowbit_jax.flax.init_quant_nnx(model, "
        "*args), quantize_function qfn.init_quant_vars(params, *args)")

  def scale(self, site: Site, name: str, make: Callable[[], jax.Array]):
    """The learned scale ``name``, created by ``make()`` when missing (init)."""
    v = self.scales.get(name)
    if v is not None:
      return v
    if not self.init_scales:
      self._missing(site, "learns a scale", name)
    v = lax.stop_gradient(jnp.asarray(make(), jnp.float32))
    self.scales[name] = self.new_scales[name] = v
    return v

  def history(self, site: Site, name: str):
    """The amax history ``name``, created empty when missing (init)."""
    v = self.state.get(name)
    if v is not None:
      return v
    if not self.init_state:
      self._missing(site, "keeps an amax history (scaling='delayed')", name)
    v = scaling.init_history(site.rule.amax_history_len)
    self.state[name] = self.new_state[name] = v
    return v

  def record(self, name: str, value) -> None:
    if self.metrics:
      # A value known at trace time (a dynamic range's clipped fraction, zero
      # by construction) stays a numpy constant: a jitted training step then
      # returns it from the host instead of copying a constant into an output
      # buffer on the device (``train.loop.split_constant_metrics``).
      self.recorded[name] = (value if isinstance(value, (np.ndarray, np.generic))
                             else lax.stop_gradient(value))


def site_key(site: Site, call: SiteCall):
  """The PRNG key of a site that rounds stochastically (None otherwise).

  Raises:
    ValueError: the site needs a key and none was supplied.
  """
  if not site.stochastic:
    return None
  if call.key is None:
    raise ValueError(
        f"rule {site.rule.path!r} rounds stochastically (rounding='stochastic' in "
        "its weight, activation or grad spec) and needs a PRNG key: Linen "
        "apply(..., rngs={'quant': key}); NNX quantize_nnx(..., rngs=nnx.Rngs("
        "quant=0)); quantize_function qfn(..., rng=key)")
  return call.key


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_grad(x, factor: float):
  return x


def _sg_fwd(x, factor):
  del factor
  return x, None


def _sg_bwd(factor, res, g):
  del res
  return (g * np.float32(factor),)


_scale_grad.defvjp(_sg_fwd, _sg_bwd)


def _qp(spec: QuantSpec) -> float:
  """The grid's largest element Qp (LSQ's positive bound)."""
  fmt = spec.element
  if not spec.symmetric:
    return float(spec.storage_format.qmax)
  if isinstance(fmt, LookupFormat):
    return float(fmt.table[-1])
  return float(fmt.qmax) if hasattr(fmt, "qmax") else float(fmt.max)


def _learned_scale(site: Site, call: SiteCall, name: str, x, spec: QuantSpec,
                   per_tensor: bool, contract=()):
  """A learned LSQ scale, shaped like ``spec``'s scale grid over ``x``.

  The gradient reaching the stored scale is multiplied by LSQ's gradient
  scale ``1 / sqrt(n * Qp)`` (Esser et al. 2020): n is the number of elements
  per scale (weights) or the activation's feature width (the product of its
  contraction dims).
  """
  shape = tuple(x.shape)
  grid = tuple(scale_shape(shape, spec))

  def make():
    v = init_scale(lax.stop_gradient(_float(x)), spec, method=site.rule.scale_init)
    return jnp.reshape(v, ()) if per_tensor else jnp.reshape(v, grid)
  s = call.scale(site, name, make)
  if per_tensor:
    n = int(np.prod([shape[c] for c in contract])) if contract else 1
  else:
    n = max(1, int(np.prod(shape)) // max(1, int(np.prod(grid))))
  s = jnp.asarray(s, jnp.float32)
  if site.rule.lsq_grad_scale:
    s = _scale_grad(s, 1.0 / float(np.sqrt(n * _qp(spec))))
  return jnp.reshape(s, grid)


def _pact_clip(site: Site, call: SiteCall, x):
  """A learned PACT clip (a scalar), started at the calibrated or data amax."""
  def make():
    st = call.stats
    if st is not None:
      if is_range(st):
        return jnp.reshape(jnp.asarray(st["amax"], jnp.float32), ())
      spec = site.activation
      obs = observer_for(spec)
      calibration.check_state(obs, st, spec, f"layer {site.path!r}: ")
      return jnp.reshape(obs.finalize(st, spec)["amax"], ())
    return jnp.max(jnp.abs(lax.stop_gradient(_float(x)).astype(jnp.float32)))
  return call.scale(site, "act_clip", make)


def _block_amax(x, spec: QuantSpec):
  """Per-block max |x| broadcast back to x's shape."""
  bs = block_shape(spec, tuple(x.shape))
  ax = jnp.abs(x.astype(jnp.float32))
  padded = tuple(-(-d // b) * b for d, b in zip(x.shape, bs))
  if padded != tuple(x.shape):
    ax = jnp.pad(ax, [(0, p - d) for d, p in zip(x.shape, padded)])
  new = []
  for d, b in zip(padded, bs):
    new += [d // b, b]
  m = jnp.max(ax.reshape(new), axis=tuple(range(1, len(new), 2)))
  return _expand_grid(m, tuple(x.shape), bs)


def clipped_fraction(x, spec: QuantSpec, *, amax=None, tensor_amax=None, scale=None,
                     clip=None) -> jax.Array:
  """The fraction of ``x``'s values a quantizer clips (beyond its range).

  Args:
    x: the operand.
    spec: its spec with the axis filled in (``ops.operand_spec``).
    amax: a static or delayed range (scalar or per block).
    tensor_amax: a static per-tensor range of a two-level format (NVFP4).
    scale: a learned (LSQ) scale grid: the range is ``scale * Qp`` (for an
      asymmetric spec this ignores the zero point's shift of the range).
    clip: a learned PACT clip.

  Returns:
    A float32 scalar in [0, 1] (a numpy constant where it is zero by
    construction, else a jax array). Dynamic ranges clip only with a
    ``clip_ratio`` below 1 (and MX's E8M0 floor scales may saturate the
    largest elements of a block, which this does not count).
  """
  if (clip is None and scale is None and amax is None and tensor_amax is None
      and spec.clip_ratio >= 1.0):
    # A dynamic range holds its whole block: nothing to count (and no second
    # pass over x to find that out). A numpy zero, known at trace time
    # (``SiteCall.record``).
    return np.float32(0.0)
  xs = _float(x).astype(jnp.float32)
  xf = jnp.abs(xs)
  bs = block_shape(spec, tuple(x.shape))
  if clip is not None:
    thr = jnp.asarray(clip, jnp.float32)
    if not spec.symmetric:  # PACT's unsigned range [0, alpha]
      return jnp.mean(((xs < 0) | (xs > thr)).astype(jnp.float32))
  elif scale is not None:
    thr = _expand_grid(scale, tuple(x.shape), bs) * np.float32(_qp(spec))
  else:
    if amax is not None:
      a = _expand_grid(amax, tuple(x.shape), bs)
    else:
      a = _block_amax(x, spec)
    if tensor_amax is not None:
      a = jnp.minimum(a, jnp.asarray(tensor_amax, jnp.float32))
    thr = a * np.float32(spec.clip_ratio)
  return jnp.mean((xf > thr).astype(jnp.float32))


def _fill(spec: QuantSpec, contract, ndim: int) -> QuantSpec:
  """An operand's spec with an unset axis filled as the ops fill it."""
  if not contract and spec.axis is None and spec.tile is None:
    return spec if spec.group_size is not None else spec.replace(axis=TENSOR)
  return ops.operand_spec(spec, contract, ndim)


def _history_amax(site: Site, h):
  return scaling.amax_from_history(h, site.rule.amax_reduce)


def _act(site: Site, x, stats, call: Optional[SiteCall] = None, contract=(),
         name: str = "act"):
  """An activation operand, its spec, and the ops keywords for its range.

  Returns:
    ``(x, lhs_spec, kwargs)``, kwargs among ``lhs_amax`` / ``lhs_tensor_amax``
    (static ranges: a two-level block format (NVFP4) takes its static range
    as the tensor scale's, its block scales staying dynamic; other specs take
    it as every block's range), ``lhs_scale`` (LSQ) and ``lhs_clip`` (PACT).
  """
  spec = site.activation
  if spec is None or site.mode == "calibrate":
    return x, None, {}
  call = call if call is not None else SiteCall(stats=stats)
  rule = site.rule
  filled = _fill(spec, contract, len(x.shape))
  if rule.learn_activation == "lsq":
    sname = "act_scale" if name == "act" else f"{name}_scale"
    s = _learned_scale(site, call, sname, x, filled, per_tensor=True,
                       contract=tuple(c % len(x.shape) for c in contract))
    if call.metrics:
      call.record(f"{name}_clipped", clipped_fraction(x, filled, scale=s))
    return x, spec, {"scale": s}
  if rule.learn_activation == "pact":
    c = _pact_clip(site, call, x)
    if call.metrics:
      call.record(f"{name}_clipped", clipped_fraction(x, filled, clip=c))
    return x, spec, {"clip": c}
  if not site.static:
    if call.metrics and not rule.delayed:
      call.record(f"{name}_clipped", clipped_fraction(x, filled))
    return x, spec, {}
  rng = static_range(site, stats)
  if call.metrics:
    if spec.tensor_scale:
      call.record(f"{name}_clipped", clipped_fraction(x, filled,
                                                      tensor_amax=rng["amax"]))
    elif spec.symmetric:
      call.record(f"{name}_clipped", clipped_fraction(x, filled, amax=rng["amax"]))
  if spec.tensor_scale:
    return x, spec, {"tensor_amax": rng["amax"]}
  if spec.symmetric:
    return x, spec, {"amax": rng["amax"]}
  if call.metrics:
    xf = _float(x)
    call.record(f"{name}_clipped", jnp.mean(
        ((xf > rng["amax"]) | (xf < rng["amin"])).astype(jnp.float32)))
  # ops take only a static amax: quantize asymmetric ranges here (core calls).
  if site.mode == "fake":
    return fake_quant(x, filled, amax=rng["amax"], amin=rng["amin"]), None, {}
  return quantize(x, filled, amax=rng["amax"], amin=rng["amin"]), None, {}


def _check_stored_weight(site: Site, w: QArray) -> None:
  """Raises when a weight stored quantized is not in the format its rule
  names (params quantized under other rules would run as they are, and the
  site report would name the rule's format)."""
  want = as_spec(site.weight)
  if isinstance(w, QWeight) and w.transposed and w.ndim == 2:
    want = ops.transpose_spec(want)   # the stored K-major layout's spec
  got = w.spec
  diffs = [f"{f} {getattr(got, f)!r} (the rule: {getattr(want, f)!r})"
           for f in ("group_size", "tile", "scale_dtype", "symmetric")
           if getattr(got, f) != getattr(want, f)]
  if got.format.name != want.format.name:
    diffs.insert(0, f"format {got.format.name!r} (the rule: {want.format.name!r})")
  if diffs:
    raise ValueError(
        f"{site.path}: the weight is stored quantized with {', '.join(diffs)}; "
        "quantize the params with these rules (quantize_params / "
        "real_mode_kwargs), or apply the rules they were quantized with")


def _weight(site: Site, w, call: SiteCall, contract, conv_spec=None):
  """The weight spec and ops keywords (``scale``) of a float weight operand."""
  if isinstance(w, QArray) and site.weight is not None:
    _check_stored_weight(site, w)
  if isinstance(w, QArray) or site.weight is None:
    return None, {}
  spec = site.weight if conv_spec is None else conv_spec
  filled = spec if conv_spec is not None else _fill(spec, contract, len(w.shape))
  if site.rule.learn_weight == "lsq":
    s = _learned_scale(site, call, "weight_scale", w, filled, per_tensor=False)
    if call.metrics:
      call.record("weight_clipped", clipped_fraction(w, filled, scale=s))
    return spec, {"scale": s}
  if call.metrics and not site.rule.delayed:
    call.record("weight_clipped", clipped_fraction(w, filled))
  return spec, {}


def _history_grad_key(site: Site, call: Optional[SiteCall], operands: dict, x, lspec,
                      w, wspec, kw: dict):
  """The amax histories, gradient spec and PRNG key of one matmul site's call.

  Adds the op keywords to ``kw`` (``amax_history``/``history_reduce`` in fake
  mode; in real mode the histories' ranges act as static ranges, which may
  replace the operands and specs) and returns ``(x, lspec, w, wspec)``.
  """
  hist = _histories(site, call, operands)
  if hist and site.mode == "real":
    x, lspec, w, wspec, more = _delayed_as_static(site, hist, operands, x, lspec, w,
                                                  wspec)
    kw.update(more)
  elif hist:
    kw["amax_history"] = hist
    kw["history_reduce"] = site.rule.amax_reduce
  if site.grad is not None and site.mode == "fake":
    kw["grad_spec"] = site.grad
  key = site_key(site, call)
  if key is not None:
    kw["key"] = key
  return x, lspec, w, wspec


def _delayed_as_static(site: Site, hist: dict, operands: dict, x, lspec, w, wspec):
  """Real mode of a delayed site: each history's range as a static range.

  An all-zero history (never trained) falls back to the operand's own amax,
  as the fake ops do on their first step. The activation's range goes to ops
  as ``lhs_amax`` (``lhs_tensor_amax`` for NVFP4); a second activation (an
  activation matmul) is quantized here, and so is a weight that reaches real
  mode in float (one ``quantize_params`` leaves float: a tied embedding the
  lookup also reads, or params never stored): with its history's range, the
  one fake mode quantized it with (its current amax gave other codes).
  Weights stored ahead of time carry that range already (``quantize_params``'
  ``histories``).

  Args:
    operands: ``_histories``' operands (their specs filled for each layout).

  Returns:
    ``(x, lspec, w, wspec, ops keywords)``.
  """
  kw = {}
  if "lhs" in hist and lspec is not None:
    a = delayed_range(site.rule, hist["lhs"], x)
    kw["lhs_tensor_amax" if lspec.tensor_scale else "lhs_amax"] = a
  if "rhs" in hist:   # (a float operand: a stored weight has no history here)
    a = delayed_range(site.rule, hist["rhs"], w)
    k = "tensor_amax" if wspec.tensor_scale else "amax"
    w = quantize(w, operands["rhs"][2], **{k: a})
    wspec = None
  return x, lspec, w, wspec, kw


def _histories(site: Site, call: SiteCall, operands: dict) -> dict:
  """``{"lhs"|"rhs"|"grad": history}`` of a delayed site (and its metrics).

  Args:
    operands: ``{ops key: (metric name, operand, filled spec)}`` of the
      quantized operands, for the clipped fractions.
  """
  out = {}
  for name, k in site.history_names().items():
    if k != "grad" and k not in operands:  # e.g. a weight quantized ahead of time
      continue
    if k == "grad" and site.mode != "fake":
      continue
    h = call.history(site, name)
    out[k] = h
    if call.metrics and k in operands:
      mname, x, spec = operands[k]
      call.record(f"{mname}_clipped",
                  clipped_fraction(x, spec, amax=_history_amax(site, h)))
  return out


def _weight_dot(w, contract, batch):
  """A weight operand for ``ops.dot_general`` with its dims in storage layout."""
  if isinstance(w, QWeight) and w.transposed:
    if w.ndim == 2 and len(contract) == 1 and not batch:
      return w, (1 - contract[0] % 2,), batch
    return w.logical(), contract, batch
  return w, contract, batch


def _float(x):
  return logical_value(x) if isinstance(x, QArray) else x


def _with_path(fn):
  """Prefixes a site's ValueErrors and TypeErrors with its path, so they name
  the layer."""

  @functools.wraps(fn)
  def wrapped(site, *args, **kwargs):
    try:
      return fn(site, *args, **kwargs)
    except (ValueError, TypeError) as e:
      msg = str(e)
      prefix = f"{site.path}: "
      if msg.startswith(prefix) or type(e) not in (ValueError, TypeError):
        raise
      raise type(e)(f"{prefix}{msg}") from e
  return wrapped


@_with_path
def site_dot_general(site: Site, lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None, *, weight_side: str = "rhs",
                     stats=None, call: Optional[SiteCall] = None):
  """``lax.dot_general`` of one site through ``ops.dot_general``.

  Args:
    site: the matched site.
    lhs, rhs: the operands; the weight one may be a float array, a QArray or a
      QWeight (in its stored layout). At an activation matmul
      (``site.is_act``) both are activations.
    dimension_numbers, precision, preferred_element_type: as lax.dot_general,
      in the operands' logical layout.
    weight_side: "rhs" or "lhs": which operand is the weight.
    stats: the site's calibration state or range (static rules), when no
      ``call`` is given.
    call: the ``SiteCall`` with the site's learned scales, amax histories,
      key and calibration statistics (QAT and low-bit training).

  Returns:
    The product, laid out as ``lax.dot_general`` lays it out.
  """
  call = call if call is not None else SiteCall(stats=stats)
  (lc, rc), (lb, rb) = dimension_numbers
  if weight_side == "lhs" and not site.is_act:
    # ops quantize the activation as lhs: swap, then restore the output order.
    out = site_dot_general(site, rhs, lhs, ((rc, lc), (rb, lb)), precision,
                           preferred_element_type, weight_side="rhs", call=call)
    nb = len(lb)
    nl = len(lhs.shape if not isinstance(lhs, QWeight) else lhs.logical_shape) \
        - len(lc) - nb
    nr = out.ndim - nb - nl
    perm = (tuple(range(nb)) + tuple(range(nb + nr, nb + nr + nl))
            + tuple(range(nb, nb + nr)))
    return jnp.transpose(out, perm)
  if site.rule.input_rotation is not None:
    if len(lc) != 1:
      raise ValueError(f"rule {site.rule.path!r}: input_rotation rotates one "
                       f"contraction axis, but this op contracts {len(lc)} axes of "
                       "the activation")
    lhs = hadamard_transform(_float(lhs), lc[0])
    if site.is_act:   # both operands: (x H)(y H)^T = x y^T (SpinQuant's R3 on q.k)
      rhs = hadamard_transform(_float(rhs), rc[0])
  if site.mode == "calibrate":
    if call.observe is not None:
      call.observe(_float(lhs))
    rec = input_recorder()
    if rec is not None and not site.is_act:
      rec(site, "dot_general", _float(lhs), rhs, {"dimension_numbers": (
          (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))),
          "weight_view": call.weight_view})
    return lax.dot_general(_float(lhs), astype_holding(_float(rhs), _float(lhs).dtype),
                           dimension_numbers, precision, preferred_element_type)
  # Contraction pairs in weight-axis order: the result does not depend on it,
  # but a group_size spec groups along the last one (jnp.einsum orders them by
  # label letter), so groups run along the weight's last contraction axis.
  pairs = sorted(zip(lc, rc), key=lambda p: p[1])
  lc, rc = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
  if site.is_act:
    x, lspec, lkw = _act(site, lhs, call.stats, call, lc, name="lhs")
    w, wspec, wkw = _act(site, rhs, call.stats, call, rc, name="rhs")
    rc2, rb2 = rc, tuple(rb)
  else:
    x, lspec, lkw = _act(site, lhs, call.stats, call, lc)
    w, rc2, rb2 = _weight_dot(rhs, tuple(rc), tuple(rb))
    wspec, wkw = _weight(site, w, call, rc2)
  kw = {f"lhs_{k}": v for k, v in lkw.items()}
  kw.update({f"rhs_{k}": v for k, v in wkw.items()})
  if "rhs_clip" in kw or "rhs_amax" in kw or "rhs_tensor_amax" in kw:
    raise ValueError(f"rule {site.rule.path!r}: activation matmuls take dynamic, "
                     "delayed or LSQ ranges; static ranges and PACT clips are for "
                     "matmuls with a weight")
  operands = {}
  if lspec is not None:
    operands["lhs"] = ("lhs" if site.is_act else "act", x,
                       _fill(lspec, lc, len(x.shape)))
  if wspec is not None:
    operands["rhs"] = ("rhs" if site.is_act else "weight", w,
                       _fill(wspec, rc2, len(w.shape)))
  x, lspec, w, wspec = _history_grad_key(site, call, operands, x, lspec, w, wspec, kw)
  return ops.dot_general(x, w, ((tuple(lc), rc2), (tuple(lb), rb2)), precision,
                         preferred_element_type, lhs_spec=lspec, rhs_spec=wspec,
                         mode=site.mode, use_kernel=check_use_kernel(site.use_kernel),
                         **kw)


def einsum_dims(subscripts: str, lhs_shape: tuple, rhs_shape: tuple):
  """Lowers a two-operand einsum to one ``dot_general`` plus a transpose.

  Args:
    subscripts: the einsum equation (``...`` allowed; implicit output too).
    lhs_shape, rhs_shape: operand shapes.

  Returns:
    ``(lhs_sum_axes, dimension_numbers, perm)``: axes of lhs to sum out first
    (labels only lhs has and the output drops), the dot_general dimension
    numbers (batch labels in output order, contraction labels in rhs order),
    and the permutation from the dot_general output to the einsum output.

  Raises:
    ValueError: a label repeated within one operand, or summed inside rhs
      alone (the weight), which one quantized dot_general cannot express.
  """
  ins, out, _ = parse_einsum_input(
      (subscripts, jax.ShapeDtypeStruct(tuple(lhs_shape), jnp.float32),
       jax.ShapeDtypeStruct(tuple(rhs_shape), jnp.float32)))
  names = ins.split(",")
  if len(names) != 2:
    raise ValueError(f"quantized einsum takes exactly two operands, got {subscripts!r}")
  ln, rn = names
  for n in (ln, rn):
    if len(set(n)) != len(n):
      raise ValueError(f"einsum {subscripts!r} repeats a label within one operand "
                       "(a diagonal); a quantized einsum cannot express it")
  bad = [c for c in rn if c not in ln and c not in out]
  if bad:
    raise ValueError(f"einsum {subscripts!r} sums label(s) {bad} inside the second "
                     "operand (the weight) alone; sum the weight first")
  lhs_sum = tuple(i for i, c in enumerate(ln) if c not in rn and c not in out)
  ln2 = "".join(c for c in ln if c in rn or c in out)
  batch = [c for c in out if c in ln2 and c in rn]
  contract = [c for c in rn if c in ln2 and c not in out]
  lfree = [c for c in ln2 if c not in rn]
  rfree = [c for c in rn if c not in ln2]
  dn = ((tuple(ln2.index(c) for c in contract), tuple(rn.index(c) for c in contract)),
        (tuple(ln2.index(c) for c in batch), tuple(rn.index(c) for c in batch)))
  res = batch + lfree + rfree
  perm = tuple(res.index(c) for c in out)
  return lhs_sum, dn, perm


@_with_path
def site_einsum(site: Site, subscripts: str, lhs, rhs, *, precision=None,
                preferred_element_type=None, stats=None,
                call: Optional[SiteCall] = None):
  """Two-operand ``jnp.einsum`` (weight = rhs) of one site.

  The einsum is lowered to one ``ops.dot_general`` with the weight as rhs (so
  each spec meets its own operand and 2-D weights can reach a kernel), then
  transposed to the output order. An activation matmul (``site.is_act``)
  takes two activations.
  """
  call = call if call is not None else SiteCall(stats=stats)
  lhs_sum, dn, perm = einsum_dims(subscripts, lhs.shape, logical_shape(rhs))
  if lhs_sum:
    lhs = jnp.sum(_float(lhs), axis=lhs_sum)
  y = site_dot_general(site, lhs, rhs, dn, precision, preferred_element_type,
                       call=call)
  return y if perm == tuple(range(len(perm))) else jnp.transpose(y, perm)


@_with_path
def site_ragged_dot(site: Site, lhs, rhs, group_sizes, precision=None,
                    preferred_element_type=None, *, stats=None,
                    call: Optional[SiteCall] = None):
  """``jax.lax.ragged_dot`` (weight = rhs ``[G, K, N]``) of one site via ``ops``.

  The weight is quantized per group (``ops.ragged_dot``: its spec's unset
  axis becomes K), the activation ``[M, K]`` per row; learned scales, PACT
  clips, static ranges, amax histories and ``grad`` specs as at a
  ``dot_general`` site (a static range is one range over all groups' rows).
  """
  call = call if call is not None else SiteCall(stats=stats)
  if isinstance(rhs, QWeight) and rhs.transposed:
    rhs = rhs.logical()
  if site.rule.input_rotation is not None:
    lhs = hadamard_transform(_float(lhs), 1)
  if site.mode == "calibrate":
    x = _float(lhs)
    if call.observe is not None:
      # Rows of no group are NaN, which observers skip (zeros would enter a
      # min or a percentile).
      call.observe(ops.routed_rows_only(x, group_sizes, fill=jnp.nan))
    rec = input_recorder()
    if rec is not None:
      rec(site, "ragged_dot", x, rhs, {"group_sizes": group_sizes,
                                       "weight_view": call.weight_view})
    return lax.ragged_dot(x, astype_holding(_float(rhs), x.dtype), group_sizes,
                          precision=precision,
                          preferred_element_type=preferred_element_type)
  x, lspec, lkw = _act(site, lhs, call.stats, call, (1,))
  wspec, wkw = _weight(site, rhs, call, (1,))
  kw = {f"lhs_{k}": v for k, v in lkw.items()}
  kw.update({f"rhs_{k}": v for k, v in wkw.items()})
  operands = {}
  if lspec is not None:
    operands["lhs"] = ("act", x, _fill(lspec, (1,), 2))
  if wspec is not None:
    operands["rhs"] = ("weight", rhs, _fill(wspec, (1,), 3))
  x, lspec, rhs, wspec = _history_grad_key(site, call, operands, x, lspec, rhs, wspec,
                                           kw)
  return ops.ragged_dot(x, rhs, group_sizes, precision, preferred_element_type,
                        lhs_spec=lspec, rhs_spec=wspec, mode=site.mode, **kw)


@_with_path
def site_conv(site: Site, lhs, rhs, window_strides, padding, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
              batch_group_count=1, precision=None, preferred_element_type=None, *,
              stats=None, call: Optional[SiteCall] = None):
  """``lax.conv_general_dilated`` (weight = rhs) of one site via ``ops``.

  Learned scales and clips quantize their operand here (``fake_quant`` /
  ``quantize`` with ``scale=`` / ``clip=``) before ``ops.conv_general_dilated``
  runs; a ``grad`` spec quantizes the output cotangent per tensor (ops).
  Delayed scaling runs on matmuls only.
  """
  call = call if call is not None else SiteCall(stats=stats)
  rhs = logical_value(rhs) if isinstance(rhs, QWeight) and rhs.transposed else rhs
  if site.mode == "calibrate":
    x = _float(lhs)
    if call.observe is not None:
      call.observe(x)
    rec = input_recorder()
    if rec is not None:
      rec(site, "conv", x, rhs, {
          "window_strides": window_strides, "padding": padding,
          "lhs_dilation": lhs_dilation, "rhs_dilation": rhs_dilation,
          "dimension_numbers": dimension_numbers,
          "feature_group_count": feature_group_count,
          "batch_group_count": batch_group_count, "weight_view": call.weight_view})
    return lax.conv_general_dilated(x, astype_holding(_float(rhs), x.dtype), window_strides,
                                    padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count,
                                    batch_group_count, precision,
                                    preferred_element_type)
  if site.rule.delayed:
    raise ValueError(f"rule {site.rule.path!r}: scaling='delayed' runs on matmuls "
                     "only; leave conv out of the rule's ops, e.g. ops=("
                     "'dot_general', 'einsum')")
  dn = lax.conv_dimension_numbers(lhs.shape, logical_shape(rhs), dimension_numbers)
  key = site_key(site, call)
  k_l = k_r = k_ops = None
  if key is not None:
    k_l, k_r, k_ops = jax.random.split(key, 3)
  x, lspec, static = _act(site, lhs, call.stats, call, (dn.lhs_spec[1],))
  if lspec is not None and ("scale" in static or "clip" in static):
    x = _quantize_operand(site, x, lspec, static, k_l)
    lspec, static = None, {}
  wspec = None
  if site.weight is not None and not isinstance(rhs, QArray):
    wspec = conv_weight_spec(site.weight, rhs.ndim, dn.rhs_spec[0], dn.rhs_spec[1])
    wspec, wkw = _weight(site, rhs, call, (), conv_spec=wspec)
    if wkw:
      rhs = _quantize_operand(site, rhs, wspec, wkw, k_r)
      wspec = None
  kw = {f"lhs_{k}": v for k, v in static.items()}
  if site.grad is not None and site.mode == "fake":
    kw["grad_spec"] = site.grad
  if k_ops is not None:
    kw["key"] = k_ops
  return ops.conv_general_dilated(
      x, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type, lhs_spec=lspec, rhs_spec=wspec, mode=site.mode, **kw)


def _quantize_operand(site: Site, x, spec: QuantSpec, kw: dict, key):
  """An operand quantized here with a learned scale or clip (conv sites)."""
  k = key if spec.rounding == "stochastic" else None
  if site.mode == "fake":
    return fake_quant(x, spec, key=k, **kw)
  return quantize(x, spec, key=k, **kw)


__all__ = ["QuantRule", "QuantConfig", "Site", "SiteCall", "QWeight", "WeightPlan",
           "OPS", "ACT_OPS", "CACHE_OPS", "ALL_OPS", "MODES", "SCALES", "STATE", "METRICS",
           "as_config", "as_qweight", "candidates", "path_str",
           "plan_weight", "conv_weight_spec", "quantize_weight", "quantize_params",
           "logical_shape", "logical_value", "einsum_dims", "site_dot_general",
           "site_einsum", "site_conv", "site_ragged_dot", "site_key",
           "clipped_fraction", "observe", "static_range", "finalize_range", "finalize_ranges",
           "check_mode", "check_use_kernel"]
