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

Weights of real quantization are ``QWeight`` s: QArrays that also record
whether they hold the *transpose* of the layer's weight. A 2-D weight ``W[K, N]``
contracted on its first axis (``x @ W``, ``nn.Dense``) is stored K-major, as the
QArray of ``W.T`` (``[N, K]``, ``ops.prepare_weight``), the layout the Pallas
kernels read; everything else keeps its own layout. ``quantize_params`` turns a
float parameter pytree into one with QWeights leaf by leaf, so the model is
never held twice.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
from opt_einsum.parser import parse_einsum_input

from lowbit_jax import calibration
from lowbit_jax.core import ops
from lowbit_jax.core._qarray import QArray
from lowbit_jax.core._quantize import dequantize, fake_quant, quantize
from lowbit_jax.core._spec import TENSOR, QuantSpec, as_spec

OPS = ("dot_general", "einsum", "conv")
MODES = ("fake", "real", "calibrate")
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
      "conv")``. ``quantize_function`` sees einsums as ``dot_general``, so there
      a rule with either name applies to every matmul.
    static: quantize activations with a static range from calibration (run the
      model once in mode ``"calibrate"`` first) instead of per call. For a
      two-level block format (NVFP4) the range fixes the tensor scale and the
      block scales stay dynamic; for other block formats every block takes it.

  A rule with neither ``weight`` nor ``activation`` keeps the ops it matches in
  float; put it first to exclude a layer from a later catch-all rule.

  Raises:
    ValueError: a bad regex, an unknown format name, an unknown op, or
      ``static=True`` without an activation spec.
  """
  path: str
  weight: SpecLike = None
  activation: SpecLike = None
  ops: tuple = OPS
  static: bool = False

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
    op_list = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
    bad = [o for o in op_list if o not in OPS]
    if bad or not op_list:
      raise ValueError(f"QuantRule({self.path!r}): ops must be a non-empty subset of "
                       f"{OPS}, got {self.ops!r}")
    object.__setattr__(self, "ops", op_list)
    if not isinstance(self.static, bool):
      raise TypeError(f"QuantRule({self.path!r}): static must be a bool, got "
                      f"{self.static!r}")
    if self.static and self.activation is None:
      raise ValueError(f"QuantRule({self.path!r}): static=True quantizes activations "
                       "with calibrated ranges, so it needs an activation spec, e.g. "
                       "activation='int8'")
    sa = self.static_activation
    if sa is not None and sa.tensor_scale and sa.calibration in ("mse", "kl"):
      raise ValueError(
          f"QuantRule({self.path!r}): a static {sa.format.name} activation "
          "calibrates only its tensor scale (its block scales stay dynamic), and "
          f"calibration={sa.calibration!r} scores a per-element quantizer that this "
          "two-level format does not use; use calibration='minmax', 'absmax_ema' "
          "or 'percentile'")

  def matches(self, path: str) -> bool:
    """Whether the regex fully matches ``path``."""
    return _compiled(self.path).fullmatch(path) is not None

  @property
  def is_float(self) -> bool:
    """Whether this rule keeps what it matches in float."""
    return self.weight is None and self.activation is None

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
    op: "dot_general", "einsum" or "conv".
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

  @property
  def weight(self) -> Optional[QuantSpec]:
    return self.rule.weight

  @property
  def activation(self) -> Optional[QuantSpec]:
    return self.rule.activation

  @property
  def static(self) -> bool:
    return self.rule.static

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
    if key not in self._hits[i]:
      self._hits[i].append(key)
    return self.rules[i]

  def record_site(self, key: str, site: Site) -> None:
    """Remembers a quantized site under ``key``."""
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
    """Forgets all recorded matches."""
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
    meta_fields=["spec", "shape", "dtype", "pack_axis", "transposed"])


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


def _transpose_spec(spec: QuantSpec) -> QuantSpec:
  """The spec of a 2-D weight's transpose (axes and tiles swapped)."""
  ax = spec.axis
  if isinstance(ax, int):
    spec = spec.replace(axis=1 - ax % 2)
  elif isinstance(ax, tuple):
    spec = spec.replace(axis=tuple(1 - a % 2 for a in ax))
  if spec.tile is not None:
    spec = spec.replace(tile=spec.tile[::-1])
  return spec


@dataclasses.dataclass(frozen=True)
class WeightPlan:
  """How ``quantize_params`` stores one weight.

  Attributes:
    spec: the weight spec with the op's axis filled in, in the weight's own
      (logical) layout.
    transpose: store the 2-D weight K-major (the QArray of its transpose).
  """
  spec: QuantSpec
  transpose: bool = False


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
                in_axis: Optional[int] = None) -> WeightPlan:
  """The WeightPlan of a weight of ``shape`` used by one op.

  Args:
    spec: the rule's weight spec.
    shape: the weight's (logical) shape.
    op: "dot_general", "einsum" or "conv".
    contracting: the weight's contraction axes (matmuls).
    batch: the weight's batch axes (matmuls).
    out_axis, in_axis: the kernel's output- and input-feature axes (conv).

  Returns:
    The plan; its spec fills an unset axis exactly as ``lowbit_jax.core.ops``
    does for a float weight, so real quantization equals fake quantization.
  """
  ndim = len(shape)
  if op == "conv":
    return WeightPlan(conv_weight_spec(spec, ndim, out_axis, in_axis), False)
  contracting = tuple(sorted(c % ndim for c in contracting))
  filled = ops._spec_for(spec, contracting, ndim)  # pylint: disable=protected-access
  kmajor = ndim == 2 and not batch and contracting == (0,)
  return WeightPlan(filled, kmajor)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_leaf(w: jax.Array, plan: WeightPlan) -> QWeight:
  if plan.transpose:
    q = ops.prepare_weight(w, _transpose_spec(plan.spec), contracting=0)
    return as_qweight(q, transposed=True)
  return as_qweight(quantize(w, plan.spec), transposed=False)


def quantize_weight(w: jax.Array, plan: WeightPlan) -> QWeight:
  """Quantizes one float weight as ``plan`` says (jitted per shape and plan)."""
  if isinstance(w, QArray):
    raise TypeError("this weight is already quantized")
  return _quantize_leaf(w, plan)


def quantize_params(params: Any, plan: Mapping[str, WeightPlan], *,
                    donate: bool = False,
                    on_step: Optional[Callable[[str, QWeight], None]] = None) -> Any:
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

  Returns:
    ``params`` with the planned leaves replaced.

  Raises:
    ValueError: a planned path is not a float leaf of ``params``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
  paths = [path_str(kp) for kp, _ in flat]
  missing = sorted(set(plan) - set(paths))
  if missing:
    raise ValueError(f"planned weights {missing} are not leaves of params (its "
                     f"leaves include {paths[:6]}); build the plan from the same "
                     "parameter pytree")
  leaves = [leaf for _, leaf in flat]
  del flat
  for i, p in enumerate(paths):
    if p not in plan:
      continue
    leaf = leaves[i]
    if isinstance(leaf, QArray):
      raise ValueError(f"{p} is already quantized")
    q = quantize_weight(leaf, plan[p])
    leaves[i] = q
    if on_step is not None:
      on_step(p, q)
    if donate and isinstance(leaf, jax.Array):
      leaf.delete()
    del leaf
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------
# Calibration statistics


def observer_for(spec: QuantSpec) -> calibration.Observer:
  """The observer a static activation spec calibrates with."""
  return calibration.get(spec.calibration)


def observe(site: Site, state, x: jax.Array):
  """Folds one activation batch into ``state`` (None: start a new state)."""
  spec = site.rule.static_activation
  obs = observer_for(spec)
  if state is None:
    state = obs.init(x, spec)
  return obs.update(state, x)


def is_range(stats) -> bool:
  """Whether ``stats`` is a finalized range (``{"amax": ...}``)."""
  return isinstance(stats, Mapping) and "amax" in stats


def static_range(site: Site, stats) -> dict:
  """``{"amax", "amin"}`` for a static site from an observer state or a range.

  Raises:
    ValueError: no statistics were recorded for the site.
  """
  if stats is None:
    raise ValueError(
        f"rule {site.rule.path!r} is static but there are no calibration statistics "
        f"for {site.path!r}: run the model with mode='calibrate' over some batches "
        "first and pass the statistics it recorded")
  if is_range(stats):
    return {"amax": stats["amax"], "amin": stats.get("amin")}
  spec = site.rule.static_activation
  return observer_for(spec).finalize(stats, spec)


def finalize_range(site: Site, stats) -> dict:
  """The finalized range of an observer state (kept as is if already one)."""
  if is_range(stats):
    return dict(stats)
  r = static_range(site, stats)
  return {k: v for k, v in r.items() if v is not None}


# ---------------------------------------------------------------------------
# The quantized ops of a site


def check_use_kernel(use_kernel: str) -> str:
  """Validates a kernel-dispatch choice."""
  if use_kernel not in _KERNEL_CHOICES:
    raise ValueError(f"use_kernel must be one of {_KERNEL_CHOICES}, got "
                     f"{use_kernel!r}")
  return use_kernel


def _act(site: Site, x, rng: Optional[dict]):
  """Activation operand and its static range for ops.

  Returns:
    ``(x, lhs_spec, {"lhs_amax" or "lhs_tensor_amax": range})``. A two-level
    block format (NVFP4) takes its static range as the tensor scale's, its
    block scales staying dynamic; other specs take it as every block's range.
  """
  spec = site.activation
  if spec is None or site.mode == "calibrate":
    return x, None, {}
  if not site.static:
    return x, spec, {}
  rng = static_range(site, rng)
  spec = site.rule.static_activation
  if spec.tensor_scale:
    return x, spec, {"lhs_tensor_amax": rng["amax"]}
  if spec.symmetric:
    return x, spec, {"lhs_amax": rng["amax"]}
  # ops take only a static amax: quantize asymmetric ranges here (core calls).
  if site.mode == "fake":
    return fake_quant(x, spec, amax=rng["amax"], amin=rng["amin"]), None, {}
  return quantize(x, spec, amax=rng["amax"], amin=rng["amin"]), None, {}


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
  """Prefixes a site's ValueErrors with its path, so they name the layer."""

  @functools.wraps(fn)
  def wrapped(site, *args, **kwargs):
    try:
      return fn(site, *args, **kwargs)
    except ValueError as e:
      msg = str(e)
      prefix = f"{site.path}: "
      if msg.startswith(prefix):
        raise
      raise ValueError(f"{prefix}{msg}") from e
  return wrapped


@_with_path
def site_dot_general(site: Site, lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None, *, weight_side: str = "rhs",
                     stats=None):
  """``lax.dot_general`` of one site through ``ops.dot_general``.

  Args:
    site: the matched site.
    lhs, rhs: the operands; the weight one may be a float array, a QArray or a
      QWeight (in its stored layout).
    dimension_numbers, precision, preferred_element_type: as lax.dot_general,
      in the operands' logical layout.
    weight_side: "rhs" or "lhs": which operand is the weight.
    stats: the site's calibration state or range (static rules).

  Returns:
    The product, laid out as ``lax.dot_general`` lays it out.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if weight_side == "lhs":
    # ops quantize the activation as lhs: swap, then restore the output order.
    out = site_dot_general(site, rhs, lhs, ((rc, lc), (rb, lb)), precision,
                           preferred_element_type, weight_side="rhs", stats=stats)
    nb = len(lb)
    nl = len(lhs.shape if not isinstance(lhs, QWeight) else lhs.logical_shape) \
        - len(lc) - nb
    nr = out.ndim - nb - nl
    perm = (tuple(range(nb)) + tuple(range(nb + nr, nb + nr + nl))
            + tuple(range(nb, nb + nr)))
    return jnp.transpose(out, perm)
  if site.mode == "calibrate":
    return lax.dot_general(_float(lhs), _float(rhs).astype(_float(lhs).dtype),
                           dimension_numbers, precision, preferred_element_type)
  # Contraction pairs in weight-axis order: the result does not depend on it,
  # but a group_size spec groups along the last one (jnp.einsum orders them by
  # label letter), so groups run along the weight's last contraction axis.
  pairs = sorted(zip(lc, rc), key=lambda p: p[1])
  lc, rc = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
  x, lspec, static = _act(site, lhs, stats)
  w, rc2, rb2 = _weight_dot(rhs, tuple(rc), tuple(rb))
  return ops.dot_general(x, w, ((tuple(lc), rc2), (tuple(lb), rb2)), precision,
                         preferred_element_type, lhs_spec=lspec,
                         rhs_spec=None if isinstance(w, QArray) else site.weight,
                         mode=site.mode, use_kernel=check_use_kernel(site.use_kernel),
                         **static)


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
                preferred_element_type=None, stats=None):
  """Two-operand ``jnp.einsum`` (weight = rhs) of one site.

  The einsum is lowered to one ``ops.dot_general`` with the weight as rhs (so
  each spec meets its own operand and 2-D weights can reach a kernel), then
  transposed to the output order.
  """
  lhs_sum, dn, perm = einsum_dims(subscripts, lhs.shape, logical_shape(rhs))
  if lhs_sum:
    lhs = jnp.sum(_float(lhs), axis=lhs_sum)
  y = site_dot_general(site, lhs, rhs, dn, precision, preferred_element_type,
                       stats=stats)
  return y if perm == tuple(range(len(perm))) else jnp.transpose(y, perm)


@_with_path
def site_conv(site: Site, lhs, rhs, window_strides, padding, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
              batch_group_count=1, precision=None, preferred_element_type=None, *,
              stats=None):
  """``lax.conv_general_dilated`` (weight = rhs) of one site via ``ops``."""
  rhs = logical_value(rhs) if isinstance(rhs, QWeight) and rhs.transposed else rhs
  if site.mode == "calibrate":
    x = _float(lhs)
    return lax.conv_general_dilated(x, _float(rhs).astype(x.dtype), window_strides,
                                    padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count,
                                    batch_group_count, precision,
                                    preferred_element_type)
  x, lspec, static = _act(site, lhs, stats)
  wspec = None
  if site.weight is not None and not isinstance(rhs, QArray):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    wspec = conv_weight_spec(site.weight, rhs.ndim, dn.rhs_spec[0], dn.rhs_spec[1])
  return ops.conv_general_dilated(
      x, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type, lhs_spec=lspec, rhs_spec=wspec, mode=site.mode,
      **static)


__all__ = ["QuantRule", "QuantConfig", "Site", "QWeight", "WeightPlan", "OPS",
           "MODES", "as_config", "as_qweight", "candidates", "path_str",
           "plan_weight", "conv_weight_spec", "quantize_weight", "quantize_params",
           "logical_shape", "logical_value", "einsum_dims", "site_dot_general",
           "site_einsum", "site_conv", "observe", "static_range", "finalize_range",
           "check_mode", "check_use_kernel"]
