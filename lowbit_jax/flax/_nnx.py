"""Quantize an unmodified Flax NNX model by rules, by rewriting its module graph.

``quantize_nnx(model, rules, mode)`` walks the module graph
(``nnx.recursive_map``) and, in every ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Einsum``, ``nnx.Conv`` (or subclass) and ``NnxRaggedDense`` (grouped
matmuls of MoE experts) a rule matches, replaces the op attribute the layer
calls (``dot_general``, ``einsum_op``, ``conv_general_dilated``,
``ragged_dot_op``) by a ``QuantOp`` submodule running the quantized op of
``lowbit_jax.core.ops``. The layer keeps its own Variables (same objects, same
paths), so float checkpoints still load into the quantized model.

Paths are the graph paths joined by ``/`` (``layers/0/mlp/up``); a weight's path
adds ``/kernel``. A rule that matches another layer owning a ``kernel`` Param
(``nnx.ConvTranspose``, a custom layer) raises.

* ``"real"``: each matched kernel Variable's value becomes a ``QWeight`` in
  place, one at a time (2-D ``nnx.Linear`` kernels K-major). The Variables are
  shared with the input model, which then holds the QWeights too.
* ``"calibrate"``: static rules record activation statistics in a ``QuantStat``
  Variable of their QuantOp (``layers/0/mlp/up/dot_general/stats``). QuantStat
  is not an ``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
  ``nnx.grad`` (which differentiates Params) leave it alone. Then
  ``quantize_nnx(calibrated, rules, mode="fake"|"real")`` keeps the statistics
  and uses them.

QAT and low-bit training: rules that learn scales (``learn_weight``,
``learn_activation``) give their QuantOps ``QuantScale`` Variables (subclass
of ``nnx.Param``: trained by ``nnx.grad`` and ``nnx.Optimizer(...,
wrt=nnx.Param)``, filterable alone), set from data by ``init_quant_nnx(model,
*batch)``; delayed scaling gives them ``QuantHistory`` Variables, updated by
overwrite-with-gradient (``update_histories``); ``metrics=True`` adds
``QuantMetric`` s with the clipped fractions of the last call; stochastic
rounding draws keys from ``rngs=``. ``quantize_nnx(qat_model, rules,
mode="real")`` converts a trained model (learned weight scales into the
QWeights). Activation x activation matmuls (attention's q.k and p.v) are
reached where the model writes them with ``NnxActEinsum``, by rules listing
``"act_matmul"`` in their ``ops``, forward and backward, as in Linen.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graph

from lowbit_jax import _rules
from lowbit_jax._rules import QuantConfig, Site
from lowbit_jax.core import scaling
from lowbit_jax.core._qarray import QArray
from lowbit_jax.flax._linen import (own_op_error, promote_passing,
                                    quantized_under_float_rule_error)


class QuantStat(nnx.Variable):
  """Calibration statistics of one quantized op (an observer state or a range).

  Not an ``nnx.Param``: optimizers and gradients over Params never update it.
  """


class QuantScale(nnx.Param):
  """A learned LSQ scale or PACT clip of one quantized op (trainable).

  An ``nnx.Param``, so ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``
  train it with the weights; filter it alone with ``QuantScale``. None until
  ``init_quant_nnx`` sets it from data.
  """


class QuantHistory(nnx.Variable):
  """An amax history of delayed scaling (overwrite-with-gradient).

  Not an ``nnx.Param``: differentiate with respect to it explicitly
  (``nnx.DiffState(0, QuantHistory)``) and write the gradient back as its new
  value (``update_histories``).
  """


class QuantMetric(nnx.Variable):
  """The fraction of a site's weight or activation values clipped last call."""


_HOOKS = {"dot_general": "dot_general", "einsum": "einsum_op",
          "conv": "conv_general_dilated", "act_matmul": "einsum_op",
          "ragged_dot": "ragged_dot_op"}
_FLOAT_OPS = {"dot_general": jax.lax.dot_general, "einsum": jnp.einsum,
              "conv": jax.lax.conv_general_dilated, "act_matmul": jnp.einsum,
              "ragged_dot": jax.lax.ragged_dot}
# Rule op kinds a site matches: grouped matmuls also match "einsum" rules.
_KINDS = {"ragged_dot": ("ragged_dot", "einsum")}


class NnxActEinsum(nnx.Module):
  """``jnp.einsum`` of two activations, as an NNX layer rules can reach.

  The NNX counterpart of ``lowbit_jax.flax.ActEinsum``: a model that writes
  attention's q.k and p.v with it gives them a graph path
  (``layers/0/attn/qk``) that ``quantize_nnx`` matches against rules listing
  ``"act_matmul"`` in their ``ops``; both operands then take the rule's
  ``activation`` spec and the output cotangent its ``grad`` spec. Unquantized
  it is exactly ``jnp.einsum`` and holds no Variables.

  Attributes:
    einsum_str: the two-operand equation, e.g. ``"bqhd,bkhd->bhqk"``.
    precision: as ``jnp.einsum``.
    preferred_element_type: as ``jnp.einsum``.
    operands_rotated: the caller already multiplied both operands by a
      Hadamard matrix along the contraction axis (a KV cache that stores
      rotated keys, SpinQuant's R3), so a rule's ``input_rotation`` does not
      rotate them again. ``__call__(..., operands_rotated=)`` overrides it
      per call (a layer used both with and without a rotated cache), as
      Linen's ``ActEinsum(operands_rotated=)`` is set per call.
    einsum_op: the op called (``jnp.einsum``; a ``QuantOp`` once quantized).
  """

  def __init__(self, einsum_str: str, *, precision=None,
               preferred_element_type=None, operands_rotated: bool = False):
    if not isinstance(einsum_str, str) or einsum_str.count(",") != 1 or "->" not in einsum_str:
      raise ValueError(f"NnxActEinsum takes a two-operand equation with '->', e.g. "
                       f"'bqhd,bkhd->bhqk', got {einsum_str!r}")
    self.einsum_str = einsum_str
    self.precision = precision
    self.preferred_element_type = preferred_element_type
    self.operands_rotated = bool(operands_rotated)
    self.einsum_op = _static(jnp.einsum)

  def __call__(self, lhs: jax.Array, rhs: jax.Array, *,
               operands_rotated: Optional[bool] = None) -> jax.Array:
    """``einsum_op(einsum_str, lhs, rhs)``.

    Args:
      lhs: first operand.
      rhs: second operand.
      operands_rotated: this call's operands are already rotated (None: the
        ``operands_rotated`` attribute); a quantized op then skips its rule's
        ``input_rotation``. A float op ignores it.
    """
    rotated = self.operands_rotated if operands_rotated is None else bool(
        operands_rotated)
    kw = {"operands_rotated": True} if (
        rotated and isinstance(self.einsum_op, QuantOp)) else {}
    return self.einsum_op(self.einsum_str, lhs, rhs, precision=self.precision,
                          preferred_element_type=self.preferred_element_type, **kw)


_static = getattr(nnx, "static", lambda x: x)


class NnxRaggedDense(nnx.Module):
  """One ``[K, N]`` weight per group of rows (``jax.lax.ragged_dot``), for NNX.

  The NNX counterpart of ``lowbit_jax.flax.RaggedDense`` (MoE experts):
  ``__call__(x [M, K], group_sizes [G])`` multiplies the rows of group ``g``
  (rows sorted by group) by ``kernel[g]``. ``quantize_nnx`` reaches it as a
  ``"ragged_dot"`` site (rules listing ``"ragged_dot"`` or ``"einsum"``):
  weight quantized per group and output channel (or groups along K),
  activations per row; real mode stores the kernel as a packed QWeight.

  Attributes:
    kernel: ``nnx.Param`` ``[G, K, N]``.
    precision: as ``jax.lax.ragged_dot``.
    dtype: compute dtype (None: from the inputs).
    ragged_dot_op: the op called (``jax.lax.ragged_dot``; a ``QuantOp`` once
      quantized).
  """

  def __init__(self, num_groups: int, in_features: int, out_features: int, *,
               dtype=None, param_dtype=jnp.float32, precision=None,
               kernel_init: Optional[Callable] = None, rngs: nnx.Rngs):
    init = kernel_init or jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.kernel = nnx.Param(init(rngs.params(), (num_groups, in_features,
                                                 out_features), param_dtype))
    self.dtype = dtype
    self.precision = precision
    self.promote_dtype = nnx.nn.dtypes.promote_dtype
    self.ragged_dot_op = _static(jax.lax.ragged_dot)

  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``ragged_dot_op(x, kernel, group_sizes)``."""
    x, kernel = self.promote_dtype((x, self.kernel[...]), dtype=self.dtype)
    return self.ragged_dot_op(x, kernel, group_sizes, precision=self.precision)



# The layers quantize_nnx reaches, most specific first: (class, op).
_LAYERS = ((NnxActEinsum, "act_matmul"), (NnxRaggedDense, "ragged_dot"),
           (nnx.Linear, "dot_general"), (nnx.LinearGeneral, "dot_general"),
           (nnx.Einsum, "einsum"), (nnx.Conv, "conv"))


def _layer(node) -> tuple[Optional[type], Optional[str]]:
  """``(layer class, op)`` of a node quantize_nnx reaches, else (None, None)."""
  for base, op in _LAYERS:
    if isinstance(node, base):
      return base, op
  return None, None


@dataclasses.dataclass(frozen=True)
class _NNXPromote:
  """``promote_dtype`` for an NNX layer that lets quantized weights through."""
  orig: Callable

  def __call__(self, args, /, *, dtype=None, **kw):
    def orig(*a, **k):
      return self.orig(tuple(a), **k)
    return tuple(promote_passing(orig, tuple(args), dtype=dtype, **kw))


_METRIC_NAMES = {False: ("weight_clipped", "act_clipped"),
                 True: ("lhs_clipped", "rhs_clipped")}


class QuantOp(nnx.Module):
  """The quantized op a matched NNX layer calls instead of its lax/jnp op.

  Attributes:
    site: the matched ``Site`` (static).
    stats: ``QuantStat`` for static rules (None until calibrated), else None.
    weight_scale, act_scale, act_clip: ``QuantScale`` s of rules that learn
      them (see ``Site.scale_names``).
    weight_history, act_history, grad_history: ``QuantHistory`` s of delayed
      scaling (see ``Site.history_names``).
    weight_clipped, act_clipped: ``QuantMetric`` s (``metrics=True``).
    rngs: the ``nnx.RngStream`` stochastic rounding draws keys from, or None.
  """

  def __init__(self, site: Site, stats: Optional[QuantStat] = None,
               old: Optional["QuantOp"] = None, rngs=None, metrics: bool = False,
               stack: tuple = ()):
    # stack: the leading dims of a layer stacked by nnx.vmap (its kernel's
    # extra axes): one history and one metric per layer, so nnx.scan slices
    # them with the layer's other Variables.
    self.site = site
    if site.rule.static or (site.rule.learn_activation == "pact"
                            and stats is not None):
      self.stats = stats if stats is not None else QuantStat(None)
    else:
      self.stats = None
    self._init = False
    for n in site.scale_names():
      prev = getattr(old, n, None) if old is not None else None
      setattr(self, n, prev if isinstance(prev, QuantScale) else QuantScale(None))
    for n in site.history_names():
      prev = getattr(old, n, None) if old is not None else None
      fresh = scaling.init_history(site.rule.amax_history_len)
      setattr(self, n, prev if isinstance(prev, QuantHistory) else
              QuantHistory(jnp.broadcast_to(fresh, tuple(stack) + fresh.shape)))
    self._metrics = bool(metrics)
    if metrics:
      for n in _METRIC_NAMES[site.is_act]:
        setattr(self, n, QuantMetric(jnp.zeros(tuple(stack), jnp.float32)))
    self.rngs = rngs

  def _stats(self):
    site = self.site
    if site.collects_stats:
      return None  # SiteCall.observe folds the op's activation in
    if site.needs_stats or (site.rule.learn_activation == "pact"
                            and self.stats is not None):
      return self.stats.get_value()
    return None

  def _call(self) -> _rules.SiteCall:
    site = self.site
    # (A converted model's weight_scale lives in its QWeight.)
    scales = {n: getattr(self, n).get_value() for n in site.scale_names()
              if hasattr(self, n)}
    state = {n: getattr(self, n).get_value() for n in site.history_names()}
    key = self.rngs() if (site.stochastic and self.rngs is not None) else None
    call = _rules.SiteCall(scales=scales, state=state, key=key,
                           stats=self._stats(), init=self._init,
                           metrics=self._metrics)
    if site.collects_stats:
      def fold(x):
        self.stats.set_value(_rules.observe(site, self.stats.get_value(), x))
      call.observe = fold
    return call

  def _finish(self, call: _rules.SiteCall) -> None:
    for n, v in list(call.new_scales.items()) + list(call.new_state.items()):
      getattr(self, n).set_value(v)
    for n, v in call.recorded.items():
      if hasattr(self, n):
        getattr(self, n).set_value(jnp.asarray(v))  # a Variable holds arrays

  def __call__(self, *args, **kwargs):
    if kwargs.pop("out_sharding", None) is not None:
      raise ValueError("quantized layers do not take out_sharding; shard the output "
                       "with jax.lax.with_sharding_constraint instead")
    op = self.site.op
    if op == "dot_general":
      return self._dot(*args, **kwargs)
    if op in ("einsum", "act_matmul"):
      return self._einsum(*args, **kwargs)
    if op == "ragged_dot":
      return self._ragged(*args, **kwargs)
    return self._conv(*args, **kwargs)

  def _ragged(self, lhs, rhs, group_sizes, precision=None,
              preferred_element_type=None):
    call = self._call()
    y = _rules.site_ragged_dot(self.site, lhs, rhs, group_sizes, precision,
                               preferred_element_type, call=call)
    self._finish(call)
    return y

  def _dot(self, lhs, rhs, dimension_numbers, precision=None,
           preferred_element_type=None):
    call = self._call()
    y = _rules.site_dot_general(self.site, lhs, rhs, dimension_numbers, precision,
                                preferred_element_type, call=call)
    self._finish(call)
    return y

  def _einsum(self, subscripts, lhs, rhs, precision=None,
              preferred_element_type=None, operands_rotated=False):
    site = self.site
    if operands_rotated and site.rule.input_rotation is not None:
      # The caller rotated both operands (NnxActEinsum, R3): not again here.
      site = dataclasses.replace(
          site, rule=dataclasses.replace(site.rule, input_rotation=None))
    call = self._call()
    y = _rules.site_einsum(site, subscripts, lhs, rhs, precision=precision,
                           preferred_element_type=preferred_element_type, call=call)
    self._finish(call)
    return y

  def _conv(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
            rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
            batch_group_count=1, precision=None, preferred_element_type=None):
    call = self._call()
    y = _rules.site_conv(self.site, lhs, rhs, window_strides, padding,
                         lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count, batch_group_count, precision,
                         preferred_element_type, call=call)
    self._finish(call)
    return y


def _own_ndim(node) -> Optional[int]:
  """The number of dims of a layer's own kernel (None: not known)."""
  if isinstance(node, NnxRaggedDense):
    return 3
  if isinstance(node, nnx.Linear):
    return 2
  if isinstance(node, nnx.LinearGeneral):
    feats = node.out_features
    nf = len(feats) if isinstance(feats, (tuple, list)) else 1
    return len(node.batch_axis) + len(node.axis) + nf
  if isinstance(node, nnx.Conv):
    ks = node.kernel_size
    return (len(ks) if isinstance(ks, (tuple, list)) else 1) + 2
  if isinstance(node, nnx.Einsum) and node.einsum_str is not None:
    ins = node.einsum_str.replace(" ", "").split("->")[0].split(",")
    return None if "..." in ins[1] else len(ins[1])
  return None


def _stack_dims(node) -> tuple:
  """The leading dims of a kernel with more dims than its layer's own (layers
  stacked by nnx.vmap / nnx.scan hold one kernel per layer along a leading
  axis), else ()."""
  kernel = getattr(node, "kernel", None)
  if kernel is None or not hasattr(kernel, "get_value"):
    return ()
  shape = tuple(jnp.shape(kernel.get_value()))
  own = _own_ndim(node)
  return shape[:len(shape) - own] if own is not None and len(shape) > own else ()


def _plan(node, op: str, spec, path: str = "") -> _rules.WeightPlan:
  """The WeightPlan of a layer's kernel, from the layer's attributes."""
  shape = tuple(node.kernel.get_value().shape)
  if _stack_dims(node):
    raise ValueError(
        f"{path or 'a layer'}: this {type(node).__name__} holds a kernel of shape "
        f"{shape}, more dims than "
        "the layer's own: layers stacked by nnx.vmap / nnx.scan, and real mode "
        "quantizes whole per-layer kernels only (one scale grid per layer would "
        "be shared across them). Quantize it in mode='fake', exclude it with a "
        "float rule, or unroll the layers (a Python loop) to store them quantized "
        "(lowbit_jax.quantize_function runs a scanned model in real mode, but "
        "keeps the stacked kernels in float and rounds them per call)")
  # The layer promotes its kernel to its dtype before the op (fake mode
  # quantizes those values); None: the kernel reaches the op as stored.
  cd = getattr(node, "dtype", None)
  if op == "conv":
    if getattr(node, "mask", None) is not None:
      raise ValueError("nnx.Conv with a mask cannot hold a real-mode quantized "
                       "kernel; use mode='fake' or exclude the layer")
    return _rules.plan_weight(spec, shape, "conv", out_axis=len(shape) - 1,
                              in_axis=len(shape) - 2, compute_dtype=cd)
  if isinstance(node, nnx.Linear):
    return _rules.plan_weight(spec, shape, "dot_general", contracting=(0,),
                              compute_dtype=cd)
  if isinstance(node, NnxRaggedDense):
    return _rules.plan_weight(spec, shape, "ragged_dot", contracting=(1,),
                              compute_dtype=cd)
  if isinstance(node, nnx.LinearGeneral):
    nb = len(node.batch_axis)
    na = len(node.axis)
    return _rules.plan_weight(spec, shape, "dot_general",
                              contracting=tuple(range(nb, nb + na)),
                              batch=tuple(range(nb)), compute_dtype=cd)
  # Einsum
  eq = node.einsum_str
  if eq is None or "..." in eq:
    raise ValueError("real-mode quantization of an nnx.Einsum needs its einsum_str "
                     "at construction, without '...'; use mode='fake' otherwise")
  ins = eq.split("->")[0].split(",")
  lhs_shape = tuple(shape[ins[1].index(c)] if c in ins[1] else 1 for c in ins[0])
  _, dn, _ = _rules.einsum_dims(eq, lhs_shape, shape)
  (_, rc), (_, rb) = dn
  return _rules.plan_weight(spec, shape, "einsum", contracting=rc, batch=rb,
                            compute_dtype=cd)


def _check_unsupported(node, path: str, config: QuantConfig) -> None:
  kernel = getattr(node, "kernel", None)
  if not isinstance(kernel, nnx.Param):
    return
  rule = config.match((path, f"{path}/kernel" if path else "kernel"), _rules.OPS)
  if rule is None or rule.is_float:
    return
  raise ValueError(
      f"rule {rule.path!r} matches {path!r}, a {type(node).__name__} "
      "layer that quantize_nnx cannot quantize (it reaches nnx.Linear, "
      "nnx.LinearGeneral, nnx.Einsum, nnx.Conv, their subclasses and NnxRaggedDense). Put a float "
      f"rule first to exclude it, QuantRule({path!r}), or quantize a pure function "
      "of the model's state with lowbit_jax.quantize_function")


def _module_paths(model) -> dict:
  """``{path: [every path of the module there]}``: a shared module is reached
  at several paths, and the graph walk visits it at one (keyed by path: the
  walk may rebuild the nodes)."""
  paths: dict = {}

  def visit(node, path, stack):
    if id(node) in stack or not graph.is_graph_node(node):
      return
    if isinstance(node, nnx.Module):
      paths.setdefault(id(node), []).append("/".join(str(k) for k in path))
    impl = graph.get_node_impl(node)
    if impl is None or isinstance(node, nnx.Variable):
      return
    for k, v in impl.node_dict(node).items():
      if not (isinstance(k, str) and k.startswith("_")):
        visit(v, path + (k,), stack | {id(node)})
  visit(model, (), frozenset())
  return {p: ps for ps in paths.values() for p in ps}


def _shared_rule(config: QuantConfig, node, p: str, rule, others, act: bool, kinds):
  """Raises unless every other path of a shared layer gets ``rule`` too."""
  for a in others:
    r = config.match((a,) if act else (a, f"{a}/kernel" if a else "kernel"), kinds)
    r = None if r is None or r.is_float else r
    # The same settings under another regex quantize the layer the same way.
    same = (r is None and rule is None) or (
        r is not None and rule is not None
        and dataclasses.replace(r, path=rule.path) == rule)
    if not same:
      name = lambda x: "float" if x is None else repr(x.path)  # noqa: E731
      raise ValueError(
          f"{p!r} and {a!r} are one shared {type(node).__name__}, but the rules "
          f"treat them differently ({name(rule)} at {p!r}, {name(r)} at {a!r}); "
          "one layer has one quantization: make the rules agree for both paths")


def _walk(fn, model):
  if hasattr(nnx, "recursive_map"):
    return nnx.recursive_map(fn, model)
  # Older flax: rewrite the graph in place.
  for path, node in list(nnx.iter_graph(model)):
    fn(path, node)
  return model


def _rng_stream(rngs):
  """An nnx.RngStream from an nnx.Rngs (stream "quant", else "default"), a
  stream, a key, or None."""
  if rngs is None or isinstance(rngs, nnx.RngStream):
    return rngs
  if isinstance(rngs, nnx.Rngs):
    for name in ("quant", "default"):
      try:
        return rngs[name]
      except (KeyError, AttributeError):
        continue
    raise ValueError("quantize_nnx(rngs=...) draws stochastic-rounding keys from "
                     "the stream 'quant' (or 'default'): pass nnx.Rngs(quant=0)")
  if isinstance(rngs, (jax.Array, int)):
    return nnx.Rngs(quant=rngs)["quant"]
  raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream, a PRNG key or an "
                  f"int seed, got {type(rngs).__name__}")


def quantize_nnx(model: nnx.Module, rules, mode: str = "fake", *, strict: bool = False,
                 use_kernel: str = "auto", donate: bool = False,
                 on_step: Optional[Callable] = None, rngs=None,
                 metrics: bool = False,
                 weight_scales: Optional[Mapping[str, jax.Array]] = None,
                 weight_tensor_scales: Optional[Mapping[str, jax.Array]] = None
                 ) -> nnx.Module:
  """Returns ``model`` with its matched layers running quantized ops.

  >>> qmodel = lowbit_jax.flax.quantize_nnx(model, [QuantRule(".*", weight="int4")])
  >>> y = qmodel(x)

  Matching happens here. To list the rules that matched nothing, pass a
  ``QuantConfig`` as ``rules`` and read ``config.unused_rules()`` afterwards.
  Re-quantizing an already quantized model (e.g. after calibration) replaces
  its QuantOps and keeps their statistics.

  Args:
    model: an NNX module (not modified, except that real mode quantizes the
      Variables it shares with the result).
    rules: a QuantRule, a sequence of them (first full match wins), or a
      QuantConfig (which then records the matches).
    mode: "fake", "real" or "calibrate".
    strict: raise if some rule matched nothing.
    use_kernel: real-mode kernel dispatch ("auto", "never", "always").
    donate: real mode: delete each float kernel once quantized (assigned as
      it goes, for memory; without donate the quantized kernels are assigned
      only once every layer has quantized, so a failure changes nothing).
    on_step: real mode: ``on_step(path, qweight)`` after each kernel.
    rngs: where stochastic rounding (``rounding="stochastic"`` in a weight,
      activation or grad spec) draws keys: an ``nnx.Rngs`` (its ``"quant"``
      stream, else ``"default"``), an ``nnx.RngStream``, or a key / int seed.
      Every QuantOp shares the stream, so each site and call gets its own
      key. Re-quantizing keeps the old stream unless a new one is given.
    metrics: give every QuantOp ``QuantMetric`` s recording the fraction of
      its weight and activation values clipped in the last call.
    weight_scales: real mode: ``{kernel path: scale grid}`` a PTQ algorithm
      rounded those kernels with (``lowbit_jax.ptq_params``'s
      ``weight_scales``); each is stored with exactly that scale, so the codes
      equal the PTQ result's.
    weight_tensor_scales: real mode, with ``weight_scales``: ``{kernel path:
      float32 tensor scale}`` of two-level (NVFP4) kernels (a PTQ result's
      ``weight_tensor_scales``); their block scales are stored under exactly
      that tensor scale (``lowbit_jax.real_mode_kwargs`` gives both).

  QAT and low-bit training: rules that learn scales give their QuantOps
  ``QuantScale`` Params (``weight_scale``, ``act_scale``, ``act_clip``), None
  until ``init_quant_nnx(model, *batch)`` sets them from data; delayed
  scaling gives them ``QuantHistory`` s (``act_history``, ``weight_history``,
  ``grad_history``), created empty here. Re-quantizing keeps both, so a QAT
  model converts with ``quantize_nnx(model, rules, mode="real")``: each
  learned ``weight_scale`` goes into its kernel's QWeight (and the QuantScale
  is dropped), learned activation scales and clips stay as static ranges.

  Returns:
    The rewritten model (a new graph sharing the Variables).

  Raises:
    ValueError: an unsupported layer matched, a bad mode, or (strict) unused
      rules.
  """
  _rules.check_mode(mode)
  _rules.check_use_kernel(use_kernel)
  config = _rules.as_config(rules, strict)
  stream_in = _rng_stream(rngs)
  _rules.check_tensor_scales_paired(
      weight_tensor_scales, weight_scales,
      "weight_scales= and weight_tensor_scales= from the PTQ result "
      "(lowbit_jax.real_mode_kwargs(result, 'nnx'))")

  # donate: an array several Variables hold (one array assigned to two
  # layers) is deleted once the last of them is quantized, never while an
  # unquantized Variable still holds it.
  holders = collections.Counter(
      id(a) for a in jax.tree.leaves(nnx.state(model))) if donate else None

  def fn(path, node):
    if not isinstance(node, nnx.Module) or isinstance(node, QuantOp):
      return node
    p = "/".join(str(k) for k in path)
    base, op = _layer(node)
    if op is None:
      _check_unsupported(node, p, config)
      return node
    act = op == "act_matmul"  # no kernel: the site is the layer itself
    wpath = p if act else (f"{p}/kernel" if p else "kernel")
    hook = _HOOKS[op]
    old = getattr(node, hook, None)
    old_op = old if isinstance(old, QuantOp) else None
    old_stats = old_op.stats if old_op is not None else None
    rule = config.match((p,) if act else (p, wpath), _KINDS.get(op, (op,)))
    others = [a for a in all_paths.get(p, [p]) if a != p]
    _shared_rule(config, node, p, None if rule is None or rule.is_float else rule,
                 others, act, _KINDS.get(op, (op,)))
    kvar = None if act else getattr(node, "kernel", None)
    if not isinstance(kvar, nnx.Variable):
      kvar = None
    if kvar is not None:
      kernels.setdefault(id(kvar), []).append(
          (p, None if rule is None or rule.is_float or rule.weight is None
           else rule.weight_spec))
    if rule is None or rule.is_float:
      if kvar is not None and isinstance(kvar.get_value(), QArray):
        raise quantized_under_float_rule_error(wpath, kvar.get_value())
      if isinstance(old, QuantOp):  # quantized before: back to the float op
        setattr(node, hook, _static(_FLOAT_OPS[op]))
        if isinstance(getattr(node, "promote_dtype", None), _NNXPromote):
          node.promote_dtype = node.promote_dtype.orig
      return node
    # The interceptor swaps the layer's op; a subclass's own __call__ may
    # compute without it and leave the kernel in float, reported quantized.
    if type(node).__call__ is not base.__call__:
      raise ValueError(
          f"{p}: rule {rule.path!r} matches this {type(node).__name__}, which "
          f"overrides {'nnx.' if base.__module__.startswith('flax') else ''}"
          f"{base.__name__}.__call__; "
          f"whether its __call__ reaches self.{_HOOKS[op]} (which quantize_nnx "
          "replaces) cannot be checked, and if it does not, its kernel stays in "
          f"float. Exclude it with a float rule, QuantRule({p!r}), or quantize the "
          "model's forward function with lowbit_jax.quantize_function")
    if (old is not None and not isinstance(old, QuantOp)
        and getattr(old, "__wrapped__", old) is not _FLOAT_OPS[op]):
      raise own_op_error(p, rule, type(node).__name__, hook, "quantize_nnx")
    site = Site(wpath, op, rule, mode, use_kernel)
    config.record_site(wpath, site)
    learned = None
    if mode == "real" and rule.learn_weight and old_op is not None:
      ws = getattr(old_op, "weight_scale", None)
      learned = ws.get_value() if isinstance(ws, QuantScale) else None
    stream = stream_in if stream_in is not None else (
        old_op.rngs if old_op is not None else None)
    tensor = history = None
    if mode == "real" and weight_scales is not None and wpath in weight_scales:
      learned = weight_scales[wpath]
      tensor = (weight_tensor_scales or {}).get(wpath)
    if mode == "real" and rule.delayed and old_op is not None and learned is None:
      # Stored with the range its amax history gives, as fake mode used it.
      wh = getattr(old_op, "weight_history", None)
      history = wh.get_value() if isinstance(wh, QuantHistory) else None
    stack = _stack_dims(node)
    if stack and site.stochastic:
      raise ValueError(
          f"{wpath}: stochastic rounding on layers stacked by nnx.vmap (kernel "
          f"stack {stack}) would draw every layer's noise from one unsplit rng "
          "stream inside nnx.scan; use rounding='nearest' for these layers, or "
          "lowbit_jax.quantize_function(fn, rules, rng=key) on the scanned forward "
          "function (a key per site and call)")
    qop = QuantOp(site, old_stats, old_op, stream, metrics, stack)
    setattr(node, hook, nnx.data(qop))
    if op == "dot_general" and hasattr(node, "dot_general_cls"):
      node.dot_general_cls = None
    if act:
      return node
    if not isinstance(node.promote_dtype, _NNXPromote):
      node.promote_dtype = _NNXPromote(node.promote_dtype)
    if mode == "real" and rule.weight is not None:
      var = node.kernel
      w = var.get_value()
      if not isinstance(w, QArray):
        try:
          q = _rules.quantize_weight(w, _plan(node, op, rule.weight_spec, p), learned,
                                     tensor, None if history is None else (rule, history))
        except ValueError as e:
          raise ValueError(f"{wpath}: {e}") from None
        if donate:
          var.set_value(q)   # at once: the float kernel's memory goes now
        else:
          # Assigned once every layer has quantized: a failure leaves the
          # model's Variables (shared with the result) as they were.
          pending.append((var, q))
        if learned is not None and hasattr(qop, "weight_scale"):  # now in the QWeight
          del qop.weight_scale
        if on_step is not None:
          on_step(wpath, q)
        if donate and isinstance(w, jax.Array):
          holders[id(w)] -= 1
          if holders[id(w)] <= 0:
            w.delete()
        del w
    return node

  all_paths = _module_paths(model)
  kernels: dict = {}
  pending: list = []
  out = _walk(fn, model)
  for holders_of in kernels.values():
    if len({spec for _, spec in holders_of}) > 1:
      raise ValueError(
          "one kernel Variable is held by layers the rules quantize differently: "
          + ", ".join(f"{p!r} ({'float' if sp is None else sp.format.name})"
                      for p, sp in holders_of)
          + "; a shared kernel has one storage: make the rules agree for all of "
          "its layers")
  config.check()
  for var, q in pending:
    var.set_value(q)
  if weight_scales is not None:
    used = {p for p, st in config.sites.items()
            if mode == "real" and st.weight is not None}
    extra = sorted(set(weight_scales) - used)
    if extra:
      raise ValueError(f"weight_scales for {extra} match no kernel quantized in real "
                       "mode here; pass mode='real' and rules with a weight spec "
                       "for those layers")
  return out


def finalize_nnx(model: nnx.Module) -> nnx.Module:
  """Turns every QuantStat's observer state into a range ``{"amax", "amin"}``.

  Static rules accept either; finalized ranges skip the observer's finalize (a
  histogram search for percentile/mse/kl) on every call. In place.
  """
  nodes = [node for _, node in nnx.iter_graph(model)
           if isinstance(node, QuantOp) and node.stats is not None
           and node.stats.get_value() is not None]
  ranges = _rules.finalize_ranges(  # every empty layer named at once
      (i, node.site, node.stats.get_value()) for i, node in enumerate(nodes))
  for i, node in enumerate(nodes):
    node.stats.set_value(ranges[i])
  return model


def nnx_stats(model: nnx.Module) -> dict:
  """``{weight path: statistics}`` of a model's QuantOps (a plain dict)."""
  out = {}
  for _, node in nnx.iter_graph(model):
    if isinstance(node, QuantOp) and node.stats is not None:
      out[node.site.path] = node.stats.get_value()
  return out


def init_quant_nnx(model: nnx.Module, *args, **kwargs) -> nnx.Module:
  """Sets the model's missing learned scales from one forward pass.

  Runs ``model(*args, **kwargs)`` once (eagerly) with every QuantOp creating
  what it lacks: LSQ scales from the weights and this batch (the rule's
  ``scale_init``), PACT clips from the activation's amax (or the calibrated
  range, where a QuantOp holds calibration statistics). Call it before
  building the optimizer, so that it sees the QuantScale Params. In place.

  Returns:
    ``model``.
  """
  qops = [n for _, n in nnx.iter_graph(model) if isinstance(n, QuantOp)]
  for q in qops:
    q._init = True  # pylint: disable=protected-access
  try:
    model(*args, **kwargs)
  finally:
    for q in qops:
      q._init = False  # pylint: disable=protected-access
  return model


def update_histories(model: nnx.Module, grads):
  """Writes the QuantHistory gradients into ``model``; returns the others.

  Delayed scaling's convention: the gradient of the loss with respect to an
  amax history is the updated history. Differentiate with respect to Params
  and histories, then::

      grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Any(nnx.Param,
                                                              QuantHistory)))(model)
      grads = update_histories(model, grads)   # histories written back
      optimizer.update(model, grads)           # Params (and QuantScales) only

  Args:
    model: the quantized model.
    grads: an ``nnx.State`` of gradients that may hold QuantHistory leaves.

  Returns:
    ``grads`` without the QuantHistory leaves.
  """
  hist, rest = nnx.split_state(grads, QuantHistory, ...)
  nnx.update(model, hist)
  return rest


def dequantize_nnx(model: nnx.Module) -> nnx.Module:
  """Replaces every QWeight kernel value by its float weight (in place)."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      v = node.get_value()
      if isinstance(v, QArray):
        node.set_value(_rules.logical_value(v))
  return model


__all__ = ["quantize_nnx", "QuantOp", "QuantStat", "QuantScale", "QuantHistory",
           "QuantMetric", "finalize_nnx", "nnx_stats", "dequantize_nnx",
           "init_quant_nnx", "update_histories"]
