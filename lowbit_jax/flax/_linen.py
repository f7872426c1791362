"""Quantize an unmodified Flax Linen model by rules, through method interception.

``quantize_linen(rules, mode)`` intercepts (``flax.linen.intercept_methods``,
no patching) the calls of ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``,
``nn.ConvTranspose``, ``nn.Einsum`` (and their subclasses), ``nn.Embed.attend``
and this package's ``RaggedDense`` (grouped matmuls of MoE experts,
``jax.lax.ragged_dot``). A matched layer runs its own code bound to its own
scope (``module.clone(parent=scope, ...)``) with its op attribute
(``dot_general`` / ``conv_general_dilated``) set to the quantized op of
``lowbit_jax.core.ops``; ``nn.Einsum``, ``nn.ConvTranspose`` and
``RaggedDense`` (which have no op attribute) and ``Embed.attend`` are evaluated
by the interceptor with the same parameters (a transposed conv as the
input-dilated conv ``lax.conv_transpose`` lowers to, ``conv_transpose_lowering``;
its kernel keeps its own layout, per output channel = per ``features``). A
re-entrancy guard keeps the clone from being intercepted again.

Paths: a layer's path is ``'/'.join(module.path)`` (``layers_0/mlp/up``), its
weight's path that plus ``/kernel`` (``/embedding`` for ``attend``). A rule that
matches a layer of any other type owning a ``kernel`` (``nn.ConvLocal``, a
custom layer) raises: quantize_linen cannot reach its matmul; so does a
masked ``nn.ConvTranspose``.

Modes:

* ``"fake"``: weights and activations fake-quantized (differentiable, STE).
* ``"real"``: the matmul runs on packed weights. ``q.quantize_params(model,
  variables, *example_args)`` replaces each matched kernel by a ``QWeight``
  (leaf by leaf); call the model through ``q(model.apply)``, which presents the
  QWeights to the layers. Float params also work (quantized on every call).
* ``"calibrate"``: the model runs in float while static rules record activation
  statistics in the ``quant_stats`` collection
  (``q(model.apply)(variables, x, mutable=["quant_stats"])``); pass them back
  with the variables in later calls.

QAT and low-bit training (rule fields ``learn_weight``, ``learn_activation``,
``grad``, ``scaling="delayed"``) keep their variables in the matched layer's
scope, in their own collections:

* ``"quant_scales"``: learned LSQ scales (``weight_scale``, ``act_scale``;
  ``lhs_scale``/``rhs_scale`` at an ``ActEinsum``) and PACT clips
  (``act_clip``). Trainable: differentiate the loss with respect to them as
  with params. Created by ``q(model.init)`` or by an apply with the collection
  mutable (``q.init_quant_vars(model, variables, x)`` does that and returns
  them, e.g. to start QAT from a float checkpoint).
* ``"quant_state"``: amax histories of delayed scaling (``act_history``,
  ``weight_history``, ``grad_history``; ``lhs_history``/``rhs_history`` at an
  ``ActEinsum``). Overwrite-with-gradient: the gradient of the loss with
  respect to this collection *is* its next value; write it back instead of
  applying an optimizer to it. (A layer called twice in one step would sum
  two updated histories: give each call its own layer.)
* ``"quant_metrics"``: when mutable, each site sows the fraction of its weight
  and activation values clipped (``weight_clipped``, ``act_clipped``).

Stochastic rounding in any spec draws its keys from the rng stream ``"quant"``
(``apply(..., rngs={"quant": key})``; ``init`` falls back to ``"params"``), a
different key at every site and call.

Real-mode conversion of a QAT model: ``q_real.quantize_params(model,
variables, x)`` stores each learned ``weight_scale`` in its kernel's QWeight
(and drops it from ``quant_scales``); learned activation scales and clips act
as static ranges, so the real model computes the fake-quant forward pass.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import warnings
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.core import meta
from flax.linen import linear as flax_linear
from flax.linen import module as linen_module

from lowbit_jax import _rules
from lowbit_jax._rules import QWeight, Site
from lowbit_jax.core._qarray import QArray

STATS = "quant_stats"
SCALES = _rules.SCALES
STATE = _rules.STATE
METRICS = _rules.METRICS
RNG = "quant"
_STAT_NAME = "act"


class QuantizedParam:
  """What a layer's ``self.param`` returns for a quantized weight (not a pytree).

  It carries the ``QWeight`` through the layer's dtype promotion to the
  quantized op; ``shape``/``dtype`` are the weight's logical ones so Flax's
  parameter shape check passes.
  """
  __slots__ = ("q", "shape", "dtype", "ndim")

  def __init__(self, q: QArray):
    self.q = q
    self.shape = _rules.logical_shape(q)
    self.dtype = jnp.dtype(q.dtype)
    self.ndim = len(self.shape)

  @property
  def T(self):  # noqa: N802  (mirrors Array.T for Embed.attend)
    q = self.q if isinstance(self.q, QWeight) else _rules.as_qweight(self.q)
    if q.ndim != 2:
      raise ValueError("only 2-d quantized weights can be transposed")
    return QuantizedParam(dataclasses.replace(q, transposed=not q.transposed))


class QBox(struct.PyTreeNode, meta.AxisMetadata):
  """Boxes a QArray in a Linen variable tree; unboxes to a QuantizedParam."""
  value: Any

  def unbox(self) -> QuantizedParam:
    return QuantizedParam(self.value)

  def replace_boxed(self, val):
    return self.replace(value=val)

  def add_axis(self, index, params):
    del index, params
    raise ValueError("quantized (real-mode) parameters cannot cross nn.scan/nn.vmap; "
                     "use mode='fake' for such models, or unroll the layers (a "
                     "Python loop) to store them quantized")

  def remove_axis(self, index, params):
    return self.add_axis(index, params)


def box_qarrays(variables):
  """Wraps every QArray leaf of a variable tree in a ``QBox``."""
  return jax.tree.map(lambda x: QBox(x) if isinstance(x, QArray) else x, variables,
                      is_leaf=_rules.is_qarray)


def _unwrap(x):
  return x.q if isinstance(x, QuantizedParam) else x


# A layer's own op (nn.Dense(dot_general=...)): quantize_linen replaces the op
# with the quantized one, which would drop what the layer's op does.
_OWN_OPS = {"dense": (("dot_general", "dot_general_cls"), (None, jax.lax.dot_general)),
            "conv": (("conv_general_dilated", "conv_general_dilated_cls"),
                     (None, jax.lax.conv_general_dilated))}


def own_op_error(path: str, rule, layer: str, op: str, front: str) -> ValueError:
  """The error of a layer built with its own op that a rule matches (Linen
  and NNX): quantizing computes the layer through the quantized op."""
  return ValueError(
      f"{path}: rule {rule.path!r} matches this {layer}, built with its own "
      f"{op}; {front} computes the layer through the quantized op instead, "
      f"which would drop what that op does. Exclude it with a float rule, "
      f"QuantRule({path!r}), or quantize the model's forward function with "
      "lowbit_jax.quantize_function")


def quantized_under_float_rule_error(wpath: str, w: QArray) -> ValueError:
  """The error of a layer the rules leave float whose weight is stored
  quantized (Linen and NNX)."""
  return ValueError(
      f"{wpath}: the rules leave this layer float, but its weight is stored "
      f"quantized ({w.spec.format.name}); give it a rule with that weight spec, "
      "or dequantize the stored weight (lowbit_jax.dequantize) first")


def _check_own_op(mod, kind: str, path: str, rule) -> None:
  names, plain = _OWN_OPS.get(kind, ((), ()))
  own = [n for n in names if all(getattr(mod, n, None) is not p for p in plain)]
  if own:
    raise own_op_error(path, rule, type(mod).__name__, own[0], "quantize_linen")


def _check_float_weight(mod, wname: str, wpath: str) -> None:
  """Raises when a layer the rules leave float holds a quantized weight."""
  try:
    if not mod.has_variable("params", wname):
      return
    w = mod.get_variable("params", wname)
  except Exception:  # pylint: disable=broad-except
    return
  w = _unwrap(w.value if isinstance(w, QBox) else w)
  if isinstance(w, QArray):
    raise quantized_under_float_rule_error(wpath, w)


def promote_passing(orig: Callable, args: tuple, dtype=None, **kw) -> list:
  """Runs a layer's ``promote_dtype`` on ``args``, passing quantized ones through."""
  qpos = [i for i, a in enumerate(args) if isinstance(a, (QuantizedParam, QArray))]
  if not qpos:
    return list(orig(*args, dtype=dtype, **kw))
  rest = [a for i, a in enumerate(args) if i not in qpos]
  if dtype is None:
    dts = [jnp.asarray(a).dtype for a in rest if a is not None]
    dts += [jnp.dtype(args[i].dtype) for i in qpos]
    dtype = jnp.result_type(*dts)
  done = iter(orig(*rest, dtype=dtype, **kw) if rest else [])
  # A quantized weight is promoted as the float one is: it dequantizes into
  # the layer's compute dtype (a bf16 weight in a float32 layer to float32,
  # as fake mode quantizes the promoted float32 weight), not its stored one.
  return [_as_dtype(args[i], dtype) if i in qpos else next(done)
          for i in range(len(args))]


def _as_dtype(a, dtype):
  """A quantized argument whose logical dtype is ``dtype``."""
  dtype = jnp.dtype(dtype)
  if jnp.dtype(a.dtype) == dtype or not jnp.issubdtype(dtype, jnp.floating):
    return a
  if isinstance(a, QuantizedParam):
    return QuantizedParam(dataclasses.replace(a.q, dtype=dtype.name))
  return dataclasses.replace(a, dtype=dtype.name)


@dataclasses.dataclass(frozen=True)
class _LinenPromote:
  """``promote_dtype`` for a Linen layer that lets quantized weights through."""
  orig: Callable

  def __call__(self, *args, dtype=None, **kw):
    return promote_passing(self.orig, args, dtype=dtype, **kw)



class ConvTransposeLowering(NamedTuple):
  """An ``nn.ConvTranspose`` call as one ``lax.conv_general_dilated`` on its own kernel.

  The layer's output is ``finish(post(lax.conv_general_dilated(lhs, kernel,
  **conv_args)))``. The conv is the input-dilated conv that
  ``lax.conv_transpose`` lowers to (unit window strides, ``lhs_dilation`` =
  the layer's strides, the padding jax computes for it), run on the kernel as
  stored: ``(*window, cin, features)``, or ``(*window, features, cin)`` with
  ``transpose_kernel`` (then the conv reads the kernel's channel axes swapped
  through ``dimension_numbers``, and its spatial flip is moved onto the input
  and the output: a conv with a flipped kernel is the flipped conv of the
  flipped input, with the padding mirrored).

  Attributes:
    lhs: the conv input ``[N, *spatial, cin]`` (batch dims flattened, dtype
      promoted, spatially flipped with ``transpose_kernel``).
    kernel: the layer's kernel (after dtype promotion; a quantized weight
      passes through).
    conv_args: ``window_strides``, ``padding``, ``lhs_dilation``,
      ``rhs_dilation``, ``dimension_numbers`` of the conv.
    post: a linear map acting on the spatial axes only (the flip back with
      ``transpose_kernel``, the periodic wrap of ``padding="CIRCULAR"``); it
      applies to the conv output and equally to its im2col patches.
    finish: adds the bias and restores the input's batch dims.
    in_axis, out_axis: the kernel's input- and output-channel axes.
  """
  lhs: jax.Array
  kernel: Any
  conv_args: dict
  post: Callable
  finish: Callable
  in_axis: int
  out_axis: int


def _as_tuple(v, n: int) -> tuple:
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(v)


@functools.lru_cache(maxsize=256)
def _conv_transpose_conv(lhs_shape, rhs_shape, dtype, strides, padding, rhs_dilation):
  """The ``lax.conv_general_dilated`` parameters ``lax.conv_transpose`` lowers to."""
  jaxpr = jax.make_jaxpr(lambda l, r: jax.lax.conv_transpose(
      l, r, strides, padding, rhs_dilation=rhs_dilation))(
          jax.ShapeDtypeStruct(lhs_shape, dtype), jax.ShapeDtypeStruct(rhs_shape, dtype))
  eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  if len(eqns) != 1:
    raise ValueError("lax.conv_transpose did not lower to one conv_general_dilated; "
                     "this jax version is not supported by the ConvTranspose lowering")
  p = eqns[0].params
  if tuple(p["window_strides"]) != (1,) * len(strides):
    raise ValueError("lax.conv_transpose lowered to a strided conv; this jax version "
                     "is not supported by the ConvTranspose lowering")
  return (tuple(tuple(int(a) for a in pad) for pad in p["padding"]),
          tuple(p["lhs_dilation"]), tuple(p["rhs_dilation"]))


def conv_transpose_lowering(mod: nn.ConvTranspose, inputs,
                            params: Optional[dict] = None) -> ConvTransposeLowering:
  """The conv an ``nn.ConvTranspose`` call computes (see ``ConvTransposeLowering``).

  Args:
    mod: the bound layer.
    inputs: its call's input.
    params: ``{"kernel": ..., "bias": ...}`` to use; None: read (or create)
      them through ``mod.param`` (from an interceptor of its ``__call__``,
      in place of the layer's own call).

  Raises:
    ValueError: a masked layer (its kernel is ``kernel * mask``).
  """
  if mod.mask is not None:
    raise ValueError(f"{'/'.join(map(str, mod.path))}: a masked nn.ConvTranspose "
                     "(mask=...) is not supported; exclude it with a float rule")
  ks = ((mod.kernel_size,) if isinstance(mod.kernel_size, int)
        else tuple(mod.kernel_size))
  n = len(ks)
  nb = inputs.ndim - (n + 1)
  batch_shape = inputs.shape[:nb]
  if nb != 1:
    inputs = jnp.reshape(inputs, (-1,) + inputs.shape[nb:])
  strides = _as_tuple(mod.strides, n)
  kdil = _as_tuple(mod.kernel_dilation, n)
  cin = inputs.shape[-1]
  tk = bool(mod.transpose_kernel)
  kshape = ks + ((mod.features, cin) if tk else (cin, mod.features))
  if params is None:
    kernel = mod.param("kernel", mod.kernel_init, kshape, mod.param_dtype)
    bias = (mod.param("bias", mod.bias_init, (mod.features,), mod.param_dtype)
            if mod.use_bias else None)
  else:
    kernel, bias = params["kernel"], params.get("bias") if mod.use_bias else None
  circular = isinstance(mod.padding, str) and mod.padding == "CIRCULAR"
  padding = "VALID" if circular else flax_linear.canonicalize_padding(mod.padding, n)
  inputs, kernel, bias = promote_passing(mod.promote_dtype, (inputs, kernel, bias),
                                         dtype=mod.dtype)
  if not isinstance(padding, str):
    padding = tuple(tuple(int(a) for a in pad) for pad in padding)
  pads, lhs_dil, rhs_dil = _conv_transpose_conv(
      tuple(inputs.shape), ks + (cin, mod.features), jnp.dtype(jnp.float32).name,
      strides, padding, kdil)
  spatial = tuple(range(1, n + 1))
  in_axis, out_axis = (n + 1, n) if tk else (n, n + 1)
  if tk:   # conv(x, flip(k), (a, b)) = flip(conv(flip(x), k, (b, a)))
    inputs = jnp.flip(inputs, axis=spatial)
    pads = tuple((b, a) for a, b in pads)
  dn = jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, n + 1) + spatial, rhs_spec=(out_axis, in_axis) + tuple(range(n)),
      out_spec=(0, n + 1) + spatial)
  periods = tuple(d * s for d, s in zip(inputs.shape[1:-1], strides))

  def post(y):
    if tk:
      y = jnp.flip(y, axis=spatial)
    if circular:
      # Pad each spatial dim to a whole number of periods (the input placed at
      # a period boundary) and sum the periods: the periodic wrap.
      pad = [(0, 0)]
      for size, per in zip(y.shape[1:-1], periods):
        d = (per - size) % (2 * per)
        pad.append((d // 2, d - d // 2) if tk else (d - d // 2, d // 2))
      y = jnp.pad(y, pad + [(0, 0)])
      for i, per in zip(spatial, periods):
        y = jnp.sum(y.reshape(y.shape[:i] + (-1, per) + y.shape[i + 1:]), axis=i)
    return y

  def finish(y):
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if nb != 1:
      y = jnp.reshape(y, batch_shape + y.shape[1:])
    return y

  conv_args = {"window_strides": (1,) * n, "padding": pads, "lhs_dilation": lhs_dil,
               "rhs_dilation": rhs_dil, "dimension_numbers": dn}
  return ConvTransposeLowering(inputs, kernel, conv_args, post, finish,
                               in_axis, out_axis)


class ActEinsum(nn.Module):
  """``jnp.einsum`` of two activations, as a named layer rules can reach.

  A model that writes its activation x activation matmuls (attention's q.k
  and p.v) with this module gives them a path (``layers_0/attn/qk``) that
  ``quantize_linen`` matches against rules listing ``"act_matmul"`` in their
  ``ops``; both operands then take the rule's ``activation`` spec and the
  output cotangent its ``grad`` spec. Unquantized, it is exactly
  ``jnp.einsum`` (no parameters, no variables).

  Attributes:
    einsum_str: the two-operand equation, e.g. ``"bqhd,bkhd->bhqk"``.
    precision: as ``jnp.einsum``.
    preferred_element_type: as ``jnp.einsum``.
    operands_rotated: the caller already multiplied both operands by a
      Hadamard matrix along the contraction axis (a KV cache that stores
      rotated keys, SpinQuant's R3), so a rule's ``input_rotation`` does not
      rotate them again.
  """
  einsum_str: str
  precision: Any = None
  preferred_element_type: Any = None
  operands_rotated: bool = False

  def __call__(self, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """``jnp.einsum(einsum_str, lhs, rhs)``."""
    return jnp.einsum(self.einsum_str, lhs, rhs, precision=self.precision,
                      preferred_element_type=self.preferred_element_type)


_EXPERT_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=-2, out_axis=-1,
                                                batch_axis=(0,))


class RaggedDense(nn.Module):
  """One ``[K, N]`` weight per group of rows: ``jax.lax.ragged_dot`` (MoE experts).

  ``__call__(x [M, K], group_sizes [G])`` multiplies the rows of group ``g``
  (rows sorted by group: the first ``group_sizes[0]`` rows are group 0, ...)
  by ``kernel[g]`` (``kernel [G, K, N]``); rows past ``sum(group_sizes)``
  give zeros. Compared with an einsum of every group on every row, it does
  ``1/G`` of the work. ``quantize_linen`` reaches it as a ``"ragged_dot"``
  site (rules listing ``"ragged_dot"`` or ``"einsum"`` in their ``ops``): the
  weight is quantized per group (scales per group and output channel, or
  groups along K), activations per row; real mode stores the kernel packed.

  Attributes:
    num_groups: G, the number of weights (experts).
    features: N, the output width.
    dtype: compute dtype (None: from the inputs).
    param_dtype: the kernel's dtype.
    precision: as ``jax.lax.ragged_dot``.
    kernel_init: initializer of the ``[G, K, N]`` kernel (fan-in scaled per
      group by default).
    promote_dtype: as ``nn.Dense``'s.
  """
  num_groups: int
  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = _EXPERT_INIT
  promote_dtype: Callable = nn.dtypes.promote_dtype

  @nn.compact
  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot(x, kernel, group_sizes)``, in ``dtype``."""
    kernel = self.param("kernel", self.kernel_init,
                        (self.num_groups, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = self.promote_dtype(x, kernel, dtype=self.dtype)
    return jax.lax.ragged_dot(x, kernel, group_sizes, precision=self.precision)


def _layer_kind(mod, method: str) -> Optional[str]:
  if method == "__call__":
    if isinstance(mod, ActEinsum):
      return "act_einsum"
    if isinstance(mod, (nn.Dense, nn.DenseGeneral)):
      return "dense"
    if isinstance(mod, nn.Conv):
      return "conv"
    if isinstance(mod, nn.ConvTranspose):
      return "conv_transpose"
    if isinstance(mod, nn.Einsum):
      return "einsum"
    if isinstance(mod, RaggedDense):
      return "ragged"
  elif method == "attend" and isinstance(mod, nn.Embed):
    return "attend"
  return None


_OP = {"dense": "dot_general", "attend": "dot_general", "einsum": "einsum",
       "conv": "conv", "conv_transpose": "conv", "act_einsum": "act_matmul",
       "ragged": "ragged_dot"}
# The op kinds a layer's site matches in rules' ``ops``: grouped matmuls also
# match "einsum" rules (MoE experts were einsums before they were ragged).
_KINDS = {"ragged": ("ragged_dot", "einsum")}


def _record(plan: dict, path: str, shape, weight_plan) -> None:
  """Notes a planned kernel with the shape its layer saw it in."""
  plan.setdefault(path, []).append((weight_plan, tuple(shape)))


class _SiteOp:
  """The quantized op a matched Linen layer calls (or the interceptor runs)."""

  def __init__(self, quantizer: "LinenQuantizer", mod, site: Site):
    self.quantizer = quantizer
    self.mod = mod
    self.site = site
    self.calls = 0  # how often the layer reached this op (0: it went around it)

  def _check_lifted(self, collection: str, named: bool = False) -> None:
    """Raises when ``collection`` is mutable in the apply but not in this
    layer's scope: a lifted transform (nn.scan, nn.vmap, ...) around it does
    not pass the collection through. ``named``: only where the apply names
    the collection (``mutable=True`` asks for no metrics in particular)."""
    mod = self.mod
    if mod.is_mutable_collection(collection):
      return
    # (A lifted transform's scopes do not link to the outer ones: the apply's
    # own mutable= says whether the collection was asked for.)
    top = getattr(self.quantizer._local, "mutable", None)  # pylint: disable=protected-access
    if (top is True and not named) or top == collection or (
        isinstance(top, (list, tuple, set, frozenset)) and collection in top):
      raise ValueError(
          f"layer {'/'.join(mod.path) or mod.name!r} runs inside a lifted transform "
          f"(nn.scan, nn.vmap, ...) that does not pass the {collection!r} "
          f"collection through: add {collection!r} to that transform's "
          f"variable_axes (e.g. variable_axes={{'params': 0, {collection!r}: 0}}), "
          "so each step has its own quantization variables")

  def _stats(self):
    site, mod = self.site, self.mod
    if site.collects_stats:
      self._check_lifted(STATS)
      if not mod.is_mutable_collection(STATS):
        raise ValueError(f"mode='calibrate' records statistics in the {STATS!r} "
                         f"collection: call apply(..., mutable=[{STATS!r}])")
      return None  # SiteCall.observe folds the op's activation in
    if site.needs_stats or site.rule.learn_activation == "pact":
      # (A PACT clip starts at the calibrated range when there is one.)
      if mod.has_variable(STATS, _STAT_NAME):
        return mod.get_variable(STATS, _STAT_NAME)
      return None
    return None

  def _call(self) -> _rules.SiteCall:
    """The SiteCall of this call: variables from the layer's scope, its key."""
    site, mod = self.site, self.mod
    stats = self._stats()
    scales = {n: mod.get_variable(SCALES, n) for n in site.scale_names()
              if mod.has_variable(SCALES, n)}
    state = {n: mod.get_variable(STATE, n) for n in site.history_names()
             if mod.has_variable(STATE, n)}
    key = None
    if site.stochastic and (mod.scope.has_rng(RNG) or mod.scope.has_rng("params")):
      key = mod.make_rng(RNG)  # own key per site and call (path, counter)
    call = _rules.SiteCall(scales=scales, state=state, key=key, stats=stats,
                           metrics=(mod.is_mutable_collection(METRICS)
                                    and not mod.is_initializing()))
    for coll, names, have in ((SCALES, site.scale_names(), scales),
                              (STATE, site.history_names(), state)):
      if names and len(have) < len(names):
        self._check_lifted(coll)
    if not mod.is_initializing():   # metrics asked for must not drop layers
      self._check_lifted(METRICS, named=True)
    call.init_scales = mod.is_mutable_collection(SCALES)
    call.init_state = mod.is_mutable_collection(STATE)
    if site.collects_stats:
      def fold(x):
        state = (mod.get_variable(STATS, _STAT_NAME)
                 if mod.has_variable(STATS, _STAT_NAME) else None)
        mod.put_variable(STATS, _STAT_NAME, _rules.observe(site, state, x))
      call.observe = fold
    return call

  def _finish(self, call: _rules.SiteCall) -> None:
    mod = self.mod
    for n, v in call.new_scales.items():
      mod.put_variable(SCALES, n, v)
    for n, v in call.new_state.items():
      mod.put_variable(STATE, n, v)
    for n, v in call.recorded.items():
      mod.sow(METRICS, n, v)

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, *, weight_view=(), **kw):
    """The layer's ``dot_general`` (``weight_view``: ``SiteCall.weight_view``,
    ``(1, 0)`` for ``Embed.attend``'s transposed table)."""
    self.calls += 1
    if kw.get("out_sharding") is not None:
      raise ValueError("quantized layers do not take out_sharding; shard the output "
                       "with jax.lax.with_sharding_constraint instead")
    rhs = _unwrap(rhs)
    plan = self.quantizer._planning  # pylint: disable=protected-access
    if plan is not None:
      (_, rc), (_, rb) = dimension_numbers
      if not isinstance(rhs, QArray) and self.site.weight is not None:
        _record(plan, self.site.path, rhs.shape, _rules.plan_weight(
            self.site.weight, tuple(rhs.shape), self.site.op, contracting=rc,
            batch=rb, compute_dtype=rhs.dtype))
      return jax.lax.dot_general(lhs, _rules.logical_value(rhs), dimension_numbers,
                                 precision, preferred_element_type)
    call = self._call()
    call.weight_view = weight_view
    y = _rules.site_dot_general(self.site, lhs, rhs, dimension_numbers, precision,
                                preferred_element_type, call=call)
    self._finish(call)
    return y

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None,
                           feature_group_count=1, batch_group_count=1,
                           precision=None, preferred_element_type=None, **kw):
    self.calls += 1
    if kw.get("out_sharding") is not None:
      raise ValueError("quantized layers do not take out_sharding")
    rhs = _unwrap(rhs)
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    plan = self.quantizer._planning  # pylint: disable=protected-access
    if plan is not None:
      if not isinstance(rhs, QArray) and self.site.weight is not None:
        dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        _record(plan, self.site.path, rhs.shape, _rules.plan_weight(
            self.site.weight, tuple(rhs.shape), "conv", out_axis=dn.rhs_spec[0],
            in_axis=dn.rhs_spec[1], compute_dtype=rhs.dtype))
      return jax.lax.conv_general_dilated(lhs, _rules.logical_value(rhs), *args)
    call = self._call()
    y = _rules.site_conv(self.site, lhs, rhs, *args, call=call)
    self._finish(call)
    return y

  def einsum(self, subscripts, lhs, rhs, precision=None, preferred_element_type=None):
    rhs = _unwrap(rhs)
    plan = self.quantizer._planning  # pylint: disable=protected-access
    if plan is not None:
      if not isinstance(rhs, QArray) and self.site.weight is not None:
        _, dn, _ = _rules.einsum_dims(subscripts, lhs.shape, rhs.shape)
        (_, rc), (_, rb) = dn
        _record(plan, self.site.path, rhs.shape, _rules.plan_weight(
            self.site.weight, tuple(rhs.shape), "einsum", contracting=rc, batch=rb,
            compute_dtype=rhs.dtype))
      return jnp.einsum(subscripts, lhs, _rules.logical_value(rhs), precision=precision,
                        preferred_element_type=preferred_element_type)
    call = self._call()
    y = _rules.site_einsum(self.site, subscripts, lhs, rhs, precision=precision,
                           preferred_element_type=preferred_element_type, call=call)
    self._finish(call)
    return y

  def ragged_dot(self, lhs, rhs, group_sizes, precision=None):
    rhs = _unwrap(rhs)
    plan = self.quantizer._planning  # pylint: disable=protected-access
    if plan is not None:
      if not isinstance(rhs, QArray) and self.site.weight is not None:
        _record(plan, self.site.path, rhs.shape, _rules.plan_weight(
            self.site.weight, tuple(rhs.shape), "ragged_dot", contracting=(1,),
            compute_dtype=rhs.dtype))
      return jax.lax.ragged_dot(lhs, _rules.logical_value(rhs).astype(lhs.dtype),
                                group_sizes, precision=precision)
    call = self._call()
    y = _rules.site_ragged_dot(self.site, lhs, rhs, group_sizes, precision, call=call)
    self._finish(call)
    return y

  def act_einsum(self, subscripts, lhs, rhs, precision=None,
                 preferred_element_type=None):
    if self.quantizer._planning is not None:  # pylint: disable=protected-access
      return jnp.einsum(subscripts, lhs, rhs, precision=precision,
                        preferred_element_type=preferred_element_type)
    call = self._call()
    y = _rules.site_einsum(self.site, subscripts, lhs, rhs, precision=precision,
                           preferred_element_type=preferred_element_type, call=call)
    self._finish(call)
    return y


class LinenQuantizer:
  """Quantizes Flax Linen models by rules (see the module docstring).

  Use as a wrapper of ``apply`` (``q(model.apply)(variables, x)``, the only
  form that takes quantized params) or as a context manager around Linen calls
  with float params (``with q: model.apply(variables, x)``).

  Attributes:
    config: the QuantConfig (``unused_rules()``, ``sites``, ``report()``).
    mode: "fake", "real" or "calibrate".
    use_kernel: real-mode kernel dispatch.
  """

  def __init__(self, rules, mode: str = "fake", *, strict: bool = False,
               use_kernel: str = "auto"):
    self.mode = _rules.check_mode(mode)
    self.config = _rules.as_config(rules, strict)
    self.use_kernel = _rules.check_use_kernel(use_kernel)
    self._local = threading.local()
    self._planning: Optional[dict] = None
    self._cms: list = []
    self._intercepted = 0   # interceptor calls (`with` warns while it is 0)

  # -- entry points -------------------------------------------------------------

  def __call__(self, apply_fn: Callable) -> Callable:
    """Wraps ``model.apply`` (or any function of ``variables`` first)."""

    @functools.wraps(apply_fn)
    def wrapped(variables, *args, **kwargs):
      self._local.delayed = collections.Counter()
      self._local.mutable = kwargs.get("mutable")
      try:
        with nn.intercept_methods(self._intercept):
          out = apply_fn(box_qarrays(variables), *args, **kwargs)
        shared = sorted({p for (p, _), n in self._local.delayed.items() if n > 1})
      finally:
        self._local.delayed = None
        self._local.mutable = None
      if shared:
        # Each call returns its new history as the history's gradient, and
        # autodiff sums the gradients of a value used twice (core.ops).
        warnings.warn(
            f"{shared}: a delayed-scaling layer called more than once in one apply "
            "shares its amax histories; differentiated, their gradient (the new "
            "history) is the sum of the calls' new histories, a range too wide. "
            "Use current scaling (scaling='current') for shared layers",
            UserWarning, stacklevel=2)
      self.config.check()
      return out

    return wrapped

  def apply(self, model: nn.Module, variables, *args, **kwargs):
    """``model.apply(variables, *args, **kwargs)`` with quantization."""
    return self(model.apply)(variables, *args, **kwargs)

  def __enter__(self) -> "LinenQuantizer":
    cm = nn.intercept_methods(self._intercept)
    cm.__enter__()
    self._cms.append(cm)
    return self

  def __exit__(self, *exc):
    cm = self._cms.pop()
    cm.__exit__(*exc)
    if exc[0] is None:
      if not self._intercepted:
        # The interceptor acts while a module traces: a function jitted and
        # traced before the block runs its cached (float) program. (Once any
        # module has run under this quantizer, a block without one may be a
        # program it traced before, quantized: no warning then.)
        warnings.warn(
            "no Flax module method has run under this quantizer, so nothing was "
            "quantized: a jax.jit-ed apply traced before the `with` block runs "
            "its cached float program. Trace it inside the block (a fresh "
            "jax.jit) or wrap it: quantizer(model.apply)", UserWarning, stacklevel=2)
      self.config.check()
    return False

  def unused_rules(self) -> list:
    """Rules that matched no layer so far."""
    return self.config.unused_rules()

  # -- real quantization ahead of time -----------------------------------------

  def plan(self, model: nn.Module, variables, *args, **kwargs) -> dict:
    """``{parameter path: WeightPlan}`` of the kernels to store quantized.

    Traces ``model.apply`` abstractly (nothing is computed). A kernel is
    planned when its layer is matched by a rule with a weight spec; a shared
    layer called with different contraction layouts is left in float.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        if isinstance(x, jax.Array) else x, variables)
    self._planning = {}
    try:
      with nn.intercept_methods(self._intercept):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), abstract)
      found = self._planning
    finally:
      self._planning = None
    stored = {_rules.path_str(kp): tuple(x.shape) for kp, x in
              jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]}
    plan = {}
    for path, ps in found.items():
      seen = sorted({shape for _, shape in ps})
      if path in stored and any(shape != stored[path] for shape in seen):
        raise ValueError(
            f"{path}: its layer sees the kernel as {seen[0]} but the params store "
            f"{stored[path]}: a layer under nn.scan or nn.vmap sees one slice of a "
            "stacked kernel, and real mode stores whole kernels only. Quantize it "
            "in mode='fake', exclude it with a float rule, or unroll the layers (a "
            "Python loop) to store them quantized (lowbit_jax.quantize_function "
            "runs a scanned model in real mode, but keeps the stacked kernels in "
            "float and rounds them per call)")
      plans = {p for p, _ in ps}
      if len(plans) == 1:
        plan[path] = ps[0][0]
    return plan

  def quantize_params(self, model: nn.Module, variables, *args, donate: bool = False,
                      on_step: Optional[Callable] = None, **kwargs):
    """``variables`` with each matched kernel replaced by a QWeight, leaf by leaf.

    Args:
      model: the Linen module.
      variables: its variables (``{"params": ...}``, other collections kept).
      *args, **kwargs: example inputs of ``model.apply`` (only shapes are used).
      donate: delete each float kernel once quantized (``variables`` is then
        unusable); the peak is then the float params plus one quantized leaf.
      on_step: ``on_step(path, qweight)`` after each leaf.

    Returns:
      The variables for mode "real". Partitioning boxes (``nn.Partitioned``
      of ``nn.with_partitioning``) come back unboxed: the quantized codes and
      scales do not take the float kernel's partition metadata.
    """
    # The plan and the leaves are read from the plain arrays (a boxed leaf's
    # path has an extra "/value" and would not match its kernel's).
    variables = meta.unbox(variables)
    plan = self.plan(model, variables, *args, **kwargs)
    out = dict(variables)
    scales, tensor, rest = _split_weight_scales(variables.get(SCALES), plan)
    out["params"] = _rules.quantize_params(
        variables["params"], plan, donate=donate, on_step=on_step, scales=scales,
        tensor_scales=tensor,
        histories=_weight_histories(variables.get(STATE), plan, self.config))
    if SCALES in variables:
      out[SCALES] = rest
    return out

  def init_quant_vars(self, model: nn.Module, variables, *args, **kwargs) -> dict:
    """The ``"quant_scales"`` and ``"quant_state"`` of a model, from one batch.

    Runs ``model.apply`` once with those collections mutable: missing learned
    scales start from this batch and the weights (``scale_init``), PACT clips
    from the activation's amax (or its calibrated range, when ``variables``
    holds ``quant_stats``), amax histories empty. Parameters are not touched
    (e.g. QAT starting from a float checkpoint). Entries already in
    ``variables`` are kept.

    Args:
      model: the Linen module.
      variables: its variables (``{"params": ...}``, optionally with
        ``quant_stats`` / ``quant_scales`` / ``quant_state``).
      *args, **kwargs: a batch for ``model.apply`` (pass ``rngs={"quant":
        key}`` in kwargs when a rule rounds stochastically).

    Returns:
      ``{"quant_scales": ..., "quant_state": ...}`` (empty dicts where no
      rule learns scales or keeps histories); merge it into ``variables``.
    """
    kwargs = dict(kwargs)
    if "mutable" in kwargs:
      raise ValueError("init_quant_vars sets mutable itself; do not pass it")
    _, new = self(model.apply)(variables, *args, mutable=[SCALES, STATE], **kwargs)
    return {SCALES: _plain(new.get(SCALES, {})), STATE: _plain(new.get(STATE, {}))}

  def finalize_stats(self, quant_stats):
    """Observer states in a ``quant_stats`` tree turned into ranges, once.

    Static rules accept either; finalized ranges skip the observer's finalize
    (a histogram search for percentile/mse/kl) on every call.
    """
    items = []

    def collect(node, prefix):
      if not isinstance(node, dict) and not hasattr(node, "items"):
        return
      for k, v in node.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if k == _STAT_NAME:
          items.append((p, self._site_for_stats(prefix), v))
        else:
          collect(v, p)
    collect(quant_stats, "")
    ranges = _rules.finalize_ranges(items)  # every empty layer named at once

    def walk(node, prefix):
      if not isinstance(node, dict) and not hasattr(node, "items"):
        return node
      out = {}
      for k, v in node.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        out[k] = ranges[p] if k == _STAT_NAME else walk(v, p)
      return out
    return walk(quant_stats, "")

  def _site_for_stats(self, module_path: str) -> Site:
    for key, site in self.config.sites.items():
      if _rules.candidates(key)[0] == module_path:
        return site
    raise ValueError(f"no calibrated layer at {module_path!r}; run the model in "
                     "mode='calibrate' with this quantizer first")

  # -- interception -------------------------------------------------------------

  def _busy(self) -> set:
    b = getattr(self._local, "busy", None)
    if b is None:
      b = self._local.busy = set()
    return b

  def _intercept(self, next_fun, args, kwargs, context):
    self._intercepted += 1
    mod = context.module
    busy = self._busy()
    if id(mod) in busy:
      return next_fun(*args, **kwargs)
    kind = _layer_kind(mod, context.method_name)
    if kind is None:
      if context.method_name == "__call__":
        self._check_unsupported(mod)
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in mod.path)
    if kind == "act_einsum":
      rule = self.config.match((path,), (_OP[kind],))
      if rule is None or (rule.activation is None and rule.grad is None):
        return next_fun(*args, **kwargs)
      if rule.input_rotation is not None and mod.operands_rotated:
        rule = dataclasses.replace(rule, input_rotation=None)
      site = Site(path, _OP[kind], rule, self.mode, self.use_kernel)
      self.config.record_site(path, site)
      return self._act_einsum(mod, _SiteOp(self, mod, site), *args, **kwargs)
    wname = "embedding" if kind == "attend" else "kernel"
    wpath = f"{path}/{wname}" if path else wname
    rule = self.config.match((path, wpath), _KINDS.get(kind, (_OP[kind],)))
    if rule is None or rule.is_float:
      _check_float_weight(mod, wname, wpath)
      return next_fun(*args, **kwargs)
    _check_own_op(mod, kind, path, rule)
    site = Site(wpath, _OP[kind], rule, self.mode, self.use_kernel)
    self.config.record_site(wpath, site)
    counts = getattr(self._local, "delayed", None)
    if counts is not None and rule.delayed and self.mode == "fake":
      # Per JAX trace of the kernel: a lifted transform (nn.scan) may trace
      # its body more than once, each time with the kernel a value of that
      # trace, which is not a second use of the histories; two calls of a
      # shared layer read one kernel value (under jax.grad too, where the
      # calls' inputs live in different traces).
      kv = (mod.get_variable("params", wname)
            if mod.has_variable("params", wname) else None)
      counts[(wpath, id(getattr(kv, "_trace", None)))] += 1
    op = _SiteOp(self, mod, site)
    if kind == "einsum":
      return self._einsum(mod, op, *args, **kwargs)
    if kind == "ragged":
      return self._ragged(mod, op, *args, **kwargs)
    if kind == "attend":
      return self._attend(mod, op, *args, **kwargs)
    if kind == "conv_transpose":
      return self._conv_transpose(mod, op, *args, **kwargs)
    if (mod.has_variable("params", "kernel")
        and isinstance(mod.get_variable("params", "kernel"), QArray)):
      raise ValueError("quantized params reach the layers only through the wrapped "
                       "apply: use q(model.apply)(variables, ...) instead of the "
                       "context manager")
    if kind == "conv" and getattr(mod, "mask", None) is not None:
      if self.mode == "real" or self._planning is not None:
        raise ValueError(f"{path}: nn.Conv with a mask cannot use a real-mode "
                         "quantized kernel; use mode='fake' or exclude the layer")
    if kind == "dense":
      over = {"dot_general": op.dot_general, "dot_general_cls": None}
    else:
      over = {"conv_general_dilated": op.conv_general_dilated,
              "conv_general_dilated_cls": None}
    over["promote_dtype"] = _LinenPromote(mod.promote_dtype)
    clone = mod.clone(parent=mod.scope, **over)
    busy.add(id(clone))
    try:
      out = getattr(clone, context.method_name)(*args, **kwargs)
    finally:
      busy.discard(id(clone))
    if op.calls == 0:  # e.g. a subclass whose __call__ multiplies by itself
      fn = "dot_general" if kind == "dense" else "conv_general_dilated"
      raise ValueError(
          f"{path}: rule {rule.path!r} matches this {type(mod).__name__}, but its "
          f"{context.method_name} never called self.{fn}, so its kernel would stay "
          "in float: a subclass overriding __call__ must compute through "
          f"self.{fn} (or super().__call__). Exclude it with a float rule, "
          f"QuantRule({path!r}), or quantize the whole apply function with "
          "lowbit_jax.quantize_function")
    return out

  def _check_unsupported(self, mod) -> None:
    if mod.scope is None:
      return
    try:
      owns = mod.has_variable("params", "kernel")
    except Exception:  # pylint: disable=broad-except
      return
    if not owns:
      return
    path = "/".join(str(p) for p in mod.path)
    rule = self.config.match((path, f"{path}/kernel" if path else "kernel"),
                             _rules.OPS)
    if rule is None or rule.is_float:
      return
    raise ValueError(
        f"rule {rule.path!r} matches {path!r}, a "
        f"{type(mod).__name__} layer that quantize_linen cannot quantize (it reaches "
        "nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose, their "
        "subclasses and "
        f"nn.Embed.attend). Put a float rule first to exclude it, "
        f"QuantRule({path!r}), or quantize the whole apply function with "
        "lowbit_jax.quantize_function")

  def _einsum(self, mod, op: _SiteOp, inputs, einsum_str=None):
    """nn.Einsum.__call__ with the quantized einsum (Einsum has no op hook)."""
    if type(mod).__call__ is not nn.Einsum.__call__:
      raise ValueError(f"{type(mod).__name__} overrides nn.Einsum.__call__, so its "
                       "einsum cannot be reached; exclude it with a float rule or use "
                       "lowbit_jax.quantize_function")
    einsum_str = linen_module.merge_param("einsum_str", mod.einsum_str, einsum_str)
    einsum_str = einsum_str.replace(" ", "")
    if "->" not in einsum_str:
      raise ValueError('`einsum_str` equation must be explicit and include "->".')
    if einsum_str.count(",") != 1:
      raise ValueError("`einsum_str` equation must have exactly two operands and "
                       "therefore, exactly one comma character, instead of "
                       f"{einsum_str.count(',')}")
    kernel = mod.param("kernel", mod.kernel_init, mod.shape, mod.param_dtype)
    bias = None
    if mod.use_bias:
      bias_shape, bshape = mod._get_bias_shape(  # pylint: disable=protected-access
          einsum_str, inputs, jax.ShapeDtypeStruct(tuple(kernel.shape), kernel.dtype))
      bias = mod.param("bias", mod.bias_init, bias_shape, mod.param_dtype)
    inputs, kernel, bias = promote_passing(mod.promote_dtype, (inputs, kernel, bias),
                                           dtype=mod.dtype)
    y = op.einsum(einsum_str, inputs, kernel, precision=mod.precision,
                  preferred_element_type=getattr(mod, "preferred_element_type", None))
    if bias is not None:
      y += jnp.reshape(bias, bshape)
    return y

  def _conv_transpose(self, mod, op: _SiteOp, inputs):
    """nn.ConvTranspose.__call__ with the quantized conv it lowers to."""
    if type(mod).__call__ is not nn.ConvTranspose.__call__:
      raise ValueError(f"{type(mod).__name__} overrides nn.ConvTranspose.__call__, so "
                       "its conv cannot be reached; exclude it with a float rule or use "
                       "lowbit_jax.quantize_function")
    low = conv_transpose_lowering(mod, inputs)
    y = op.conv_general_dilated(low.lhs, low.kernel, **low.conv_args,
                                precision=mod.precision,
                                preferred_element_type=mod.preferred_element_type)
    return low.finish(low.post(y))

  def _ragged(self, mod, op: _SiteOp, x, group_sizes):
    """RaggedDense.__call__ with the quantized grouped matmul."""
    if type(mod).__call__ is not RaggedDense.__call__:
      raise ValueError(f"{type(mod).__name__} overrides RaggedDense.__call__, so its "
                       "matmul cannot be reached; exclude it with a float rule")
    kernel = mod.param("kernel", mod.kernel_init,
                       (mod.num_groups, x.shape[-1], mod.features), mod.param_dtype)
    x, kernel = promote_passing(mod.promote_dtype, (x, kernel), dtype=mod.dtype)
    return op.ragged_dot(x, kernel, group_sizes, precision=mod.precision)

  def _act_einsum(self, mod, op: _SiteOp, lhs, rhs):
    """ActEinsum.__call__ with the quantized einsum of two activations."""
    if type(mod).__call__ is not ActEinsum.__call__:
      raise ValueError(f"{type(mod).__name__} overrides ActEinsum.__call__, so its "
                       "einsum cannot be reached; exclude it with a float rule")
    return op.act_einsum(mod.einsum_str, lhs, rhs, precision=mod.precision,
                         preferred_element_type=mod.preferred_element_type)

  def _attend(self, mod, op: _SiteOp, query):
    """nn.Embed.attend with the quantized matmul."""
    if type(mod).attend is not nn.Embed.attend:
      raise ValueError(f"{type(mod).__name__} overrides nn.Embed.attend, so its "
                       "logits cannot be reached (they would lose what the override "
                       "adds); exclude it with a float rule or use "
                       "lowbit_jax.quantize_function")
    query, embedding = promote_passing(mod.promote_dtype, (query, mod.embedding),
                                       dtype=mod.dtype)
    if op.quantizer._planning is not None:  # pylint: disable=protected-access
      # The table is also gathered by __call__: it stays in float.
      return jnp.dot(query, _rules.logical_value(_unwrap(embedding)).T)
    return op.dot_general(query, embedding.T,
                          (((query.ndim - 1,), (0,)), ((), ())), weight_view=(1, 0))


def _plain(tree):
  """Nested FrozenDicts as dicts."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _weight_histories(state, plan: dict, config) -> dict:
  """``{weight path: (rule, weight_history)}`` of the planned delayed-scaling
  kernels with a history in ``"quant_state"`` (real mode stores each with
  its history's range, the one fake mode quantized it with)."""
  out = {}
  if not state:
    return out
  state = _plain(state)
  for wpath in plan:
    site = config.sites.get(wpath)
    if site is None or not site.rule.delayed:
      continue
    node = _layer_node(state, wpath)
    if "weight_history" in node:
      out[wpath] = (site.rule, node["weight_history"])
  return out


def _layer_node(tree: dict, wpath: str) -> dict:
  """The dict of ``tree`` at the layer owning weight ``wpath`` ({} if none)."""
  node = tree
  for p in wpath.split("/")[:-1]:
    node = node.get(p) if isinstance(node, dict) else None
    if node is None:
      return {}
  return node if isinstance(node, dict) else {}


def _split_weight_scales(scales, plan: dict):
  """(``{weight path: learned scale}`` and ``{weight path: tensor scale}`` of
  planned weights, the other scales).

  A learned (or PTQ) ``weight_scale`` of a planned kernel, and a two-level
  spec's ``weight_tensor_scale`` beside it, go into its QWeight (so they
  leave ``quant_scales``); the rest (activation scales, clips, weight scales
  of kernels that stay float) stays.
  """
  if scales is None:
    return None, None, None
  rest = _plain(scales)
  found, tensor = {}, {}
  for wpath in plan:
    node = _layer_node(rest, wpath)   # popped in place: they leave ``rest``
    if "weight_scale" in node:
      found[wpath] = node.pop("weight_scale")
    if "weight_tensor_scale" in node:
      tensor[wpath] = node.pop("weight_tensor_scale")
  return found, tensor, rest


def quantize_linen(rules, mode: str = "fake", *, strict: bool = False,
                   use_kernel: str = "auto") -> LinenQuantizer:
  """A quantizer for Flax Linen models (see ``LinenQuantizer``).

  >>> q = lowbit_jax.flax.quantize_linen([QuantRule(".*", weight="int4")])
  >>> y = q(model.apply)(variables, x)           # fake quantization
  >>> q.unused_rules()

  Args:
    rules: a QuantRule or a sequence of them (first full match wins).
    mode: "fake", "real" or "calibrate".
    strict: raise after a call if some rule matched nothing.
    use_kernel: real-mode kernel dispatch ("auto", "never", "always").

  Returns:
    A LinenQuantizer.
  """
  return LinenQuantizer(rules, mode, strict=strict, use_kernel=use_kernel)


__all__ = ["quantize_linen", "LinenQuantizer", "QBox", "QuantizedParam", "STATS",
           "SCALES", "STATE", "METRICS", "RNG", "ActEinsum", "RaggedDense"]
