"""Find a pre-norm transformer's residual stream in the jaxpr of its apply function.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated
LLMs") rotates the residual stream ``x -> x Q`` of a pre-norm transformer by an
orthogonal ``Q`` and folds ``Q`` into every parameter that writes into the
stream or reads from it, which leaves the float function unchanged because
every operation on the stream commutes with ``Q``: additions, RMS
normalization without its gain (``||x Q|| = ||x||``), and matmuls with a
parameter that contracts the stream's feature axis. A norm's gain ``g`` does
not commute with ``Q``; it is first fused into the parameters that read the
normalized value (``W -> diag(g) W``) and set to one.

``find_residual_stream(fn, params, *args)`` traces ``fn(params, *args)`` to a
jaxpr (as ``quantize_function`` does), follows the data flow from every
embedding lookup (a ``gather`` from a 2-d parameter) and checks that each
operation the stream reaches is one of those. It returns the structure as
data: which parameter axes must be multiplied by ``Q`` and which gains fuse
into which kernels. Anything else the stream meets (a LayerNorm's mean
subtraction, a gain that also feeds a residual, a post-norm block, the stream
returned as an output, a ``lax.scan`` over layers) raises an error that names
the primitive and the module (its name stack) or the last parameter seen.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import jax.extend as jex
import numpy as np

from lowbit_jax import _rules

_Literal = jex.core.Literal
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2",
                    "checkpoint", "remat"})
_SAME = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                   "sharding_constraint", "optimization_barrier", "neg"})
_STREAMY = ("stream", "gained", "square")


@dataclasses.dataclass(frozen=True)
class GainFusion:
  """A norm gain fused into the kernels that read the normalized stream.

  Attributes:
    gain: the gain's parameter path (set to ones after the fusion).
    readers: ``(kernel path, axis)`` pairs; each kernel is multiplied by the
      gain along that axis.
  """
  gain: str
  readers: tuple


@dataclasses.dataclass(frozen=True)
class ResidualStream:
  """Where a pre-norm model's residual stream is written and read (data).

  Attributes:
    width: the stream's feature width d.
    rotate: ``(parameter path, axis)`` pairs whose axis (of length d) a
      rotation multiplies by ``Q``: embedding tables and writers' outputs
      (``E Q``, ``W Q``, ``b Q``) and readers' inputs (``Q^T W``) alike.
    fusions: the norm gains to fuse first (``GainFusion``).
    readers: kernel paths that read the stream (after a norm).
    writers: kernel or parameter paths that write into it.
    biases: ``(kernel path, bias path, bias axis)`` for every parameter added
      to a parameter matmul's output anywhere in the function (a projection's
      bias), so a fold into that output's axis (``rotate_heads``) can fold
      into its bias too.
  """
  width: int
  rotate: tuple
  fusions: tuple
  readers: tuple
  writers: tuple
  biases: tuple = ()


def param_path(keypath) -> str:
  """A parameter's path as rules see it (``_rules.path_str``; NNX's ``/value`` dropped)."""
  p = _rules.path_str(keypath)
  if keypath and str(getattr(keypath[-1], "name", getattr(keypath[-1], "key", ""))) \
      == "value" and "/" in p:
    p = p[: -len("/value")]
  return p


class _Unsupported(ValueError):
  pass


_RAGGED = frozenset({"ragged_dot_general", "ragged_dot"})


def _ragged_dims(eqn):
  """``((lhs contracting, rhs contracting), (lhs batch, rhs batch))`` of a ragged dot."""
  dn = eqn.params.get("ragged_dot_dimension_numbers")
  if dn is not None:
    return dn.dot_dimension_numbers
  return (((1,), (1,)), ((), ()))   # jax.lax.ragged_dot: [M, K] x [G, K, N]


def _row_gather(eqn) -> bool:
  """Whether a gather takes whole last-axis slices, kept last (a row selection)."""
  dn = eqn.params["dimension_numbers"]
  nd_in = len(eqn.invars[0].aval.shape)
  nd_out = len(eqn.outvars[0].aval.shape)
  sizes = eqn.params["slice_sizes"]
  return (sizes[-1] == eqn.invars[0].aval.shape[-1]
          and nd_in - 1 not in dn.collapsed_slice_dims
          and nd_in - 1 not in dn.start_index_map
          and tuple(dn.offset_dims)[-1:] == (nd_out - 1,))


def _row_scatter(eqn) -> bool:
  """Whether a scatter-add adds whole last-axis rows of its updates, kept last."""
  dn = eqn.params["dimension_numbers"]
  nd_op = len(eqn.invars[0].aval.shape)
  nd_up = len(eqn.invars[2].aval.shape)
  return (eqn.invars[0].aval.shape[-1] == eqn.invars[2].aval.shape[-1]
          and nd_op - 1 not in dn.inserted_window_dims
          and nd_op - 1 not in dn.scatter_dims_to_operand_dims
          and tuple(dn.update_window_dims)[-1:] == (nd_up - 1,))


class _VDict(dict):
  """A dict keyed by jaxpr variables (literals are never in it)."""

  def __contains__(self, v):
    return not isinstance(v, _Literal) and dict.__contains__(self, v)


class _VSet(set):
  """A set of jaxpr variables (literals are never in it)."""

  def __contains__(self, v):
    return not isinstance(v, _Literal) and set.__contains__(self, v)


def _axis_map_reshape(in_shape, out_shape, amap):
  """The parameter axis of each output axis of a reshape (None where merged/split)."""
  out = []
  pre_in = [math.prod(in_shape[:i]) for i in range(len(in_shape))]
  for j, n in enumerate(out_shape):
    pre = math.prod(out_shape[:j])
    hit = None
    for i, m in enumerate(in_shape):
      if m == n and pre_in[i] == pre and (n > 1):
        hit = amap[i]
    out.append(hit)
  return tuple(out)


def _walk(jaxpr, consts_vals, env_in):
  """Yields ``(eqn, invars, outvars)`` with nested calls inlined (canonical vars)."""
  alias = dict(env_in)

  def canon(v):
    if isinstance(v, _Literal):
      return v
    return alias.get(v, v)

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    sub = None
    if name in _CALLS:
      for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if k in eqn.params:
          sub = eqn.params[k]
          break
    if sub is not None:
      inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
      n_in = len(inner.invars)
      ins = [canon(v) for v in eqn.invars][-n_in:] if n_in else []
      env = dict(zip(inner.invars, ins))
      inner_alias = {}
      for item in _walk(inner, (), env):
        if item[0] == "__alias__":
          inner_alias.update(item[1])
          continue
        yield item
      res = {}
      for o_outer, o_inner in zip(eqn.outvars, inner.outvars):
        if isinstance(o_inner, _Literal):
          continue
        tgt = inner_alias.get(o_inner, env.get(o_inner, o_inner))
        res[o_outer] = tgt
      alias.update(res)
      continue
    yield eqn, [canon(v) for v in eqn.invars], list(eqn.outvars)
  yield "__alias__", {v: canon(v) for v in jaxpr.outvars if not isinstance(v, _Literal)}


def _walk_top(jaxpr, consts_vals, aliases: Optional[dict] = None):
  """``_walk`` of a top-level jaxpr: yields ``(eqn, invars, outvars)``; once the
  walk ends, ``aliases`` (when given) maps each output var to its canonical var."""
  for item in _walk(jaxpr, consts_vals, {}):
    if item[0] == "__alias__":
      if aliases is not None:
        aliases.update(item[1])
      continue
    yield item


def find_residual_stream(fn: Callable, params: Any, *args, **kwargs) -> ResidualStream:
  """Traces ``fn(params, *args, **kwargs)`` and returns its residual stream's structure.

  Args:
    fn: the model's apply function of a parameter pytree (for Linen,
      ``lambda p, x: model.apply({"params": p}, x)``).
    params: the parameter pytree (float arrays).
    *args, **kwargs: example inputs (shapes matter, values do not).

  Returns:
    The ``ResidualStream``.

  Raises:
    ValueError: no embedding lookup starts a stream, or the stream reaches an
      operation a rotation does not commute with (the message names the
      primitive and where it is).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [param_path(kp) for kp, _ in flat]
  closed = jax.make_jaxpr(lambda p: fn(p, *args, **kwargs))(params)
  jaxpr = closed.jaxpr
  st = _VDict()       # var -> state: "stream" | ("gained", g) | "square" | "inv"
  pview = _VDict()    # var -> (path, axis map)
  gainf = _VDict()    # var -> (gain path, axis): gain x (per-token uniform)
  uniform = _VSet()   # vars constant along their last axis
  zero = _VSet()      # vars known to be all zeros
  rotate: dict = {}      # (path, axis) -> {roles}
  fusion: dict = {}      # gain path -> {(kernel, axis)}
  readers, writers = [], []
  width = [None]
  last_param = ["(no parameter yet)"]
  used_gain_elsewhere: dict = {}   # gain path -> where it is used off the norm
  param_used: dict = {}            # param path -> where it meets a non-view op
  offstream_reads: dict = {}       # (path, axis) contracted with a non-stream value
  biases: set = set()              # (kernel, bias, bias axis): biases of matmul outputs

  for v, p, (_, leaf) in zip(jaxpr.invars, paths, flat):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      pview[v] = (p, tuple(range(np.ndim(leaf))))

  def state(v):
    return None if isinstance(v, _Literal) else st.get(v)

  def is_zero(v):
    if isinstance(v, _Literal):
      return np.all(np.asarray(v.val) == 0)
    return v in zero

  def is_uniform(v):
    if isinstance(v, _Literal):
      return True
    shape = v.aval.shape
    return not shape or shape[-1] == 1 or v in uniform

  def where(eqn):
    ns = str(getattr(eqn.source_info, "name_stack", "")) if hasattr(
        eqn, "source_info") else ""
    return (f"in {ns!r}" if ns else "") + f" (after parameter {last_param[0]!r})"

  def fail(eqn, why):
    raise _Unsupported(
        f"rotation of the residual stream: the stream reaches "
        f"`{eqn.primitive.name}` {where(eqn)}: {why}. QuaRot's fold needs a pre-norm "
        "model whose residual stream only meets additions, RMS norms (with a gain "
        "read by matmuls with parameters) and such matmuls; keep this model out of "
        "the rotation or rotate it by hand")

  def set_width(eqn, d):
    if width[0] is None:
      width[0] = d
    elif width[0] != d:
      fail(eqn, f"a second stream of width {d} (the first has width {width[0]})")

  def note_other_uses(eqn, ins, outs):
    """Records gains and parameters that reach an op other than a view of
    themselves or a gain factor (e.g. a gain applied to a non-stream value):
    a fused gain must be used by its norm only."""
    for v in ins:
      if isinstance(v, _Literal):
        continue
      if v in gainf and not any(o in gainf and gainf[o][0] == gainf[v][0]
                                for o in outs):
        used_gain_elsewhere.setdefault(gainf[v][0], where(eqn))
      if v in pview:
        path = pview[v][0]
        if not any((o in pview and pview[o][0] == path)
                   or (o in gainf and gainf[o][0] == path) for o in outs):
          param_used.setdefault(path, where(eqn))

  def note_offstream_read(eqn, path, axes):
    for ax in axes:
      if ax is not None:
        offstream_reads.setdefault((path, ax), where(eqn))

  def add_rotate(path, axis, role):
    # A parameter axis can be both written and read (a tied embedding and
    # head): the roles are kept as a set, so the tie check below sees both.
    rotate.setdefault((path, axis), set()).add(role)

  def writer_of(v, eqn):
    """Records the parameters behind ``v`` (added to the stream) as writers."""
    if v in pview:
      path, amap = pview[v]
      ax = amap[-1]
      if ax is None:
        fail(eqn, f"parameter {path!r} is added to the stream but its last axis is "
             "not one of its own axes")
      add_rotate(path, ax, "writer")
      writers.append(path)
      return
    if v in lin:
      for path, ax in lin[v]:
        add_rotate(path, ax, "writer")
        writers.append(path)
      return
    fail(eqn, "a value that is neither the stream, a parameter nor a matmul with a "
         "parameter (plus a bias) is added to it")

  lin = _VDict()   # var -> [(path, axis)] params whose last axis makes its last axis

  top_alias = {}
  for eqn, ins, outs in _walk_top(jaxpr, closed.consts, top_alias):
    name = eqn.primitive.name
    states = [state(v) for v in ins]
    out = outs[0] if outs else None
    # Parameter views.
    if name in _SAME and ins and ins[0] in pview and name != "neg":
      pview[out] = pview[ins[0]]
    elif name == "reshape" and ins[0] in pview:
      path, amap = pview[ins[0]]
      pview[out] = (path, _axis_map_reshape(ins[0].aval.shape, out.aval.shape, amap))
    elif name == "transpose" and ins[0] in pview:
      path, amap = pview[ins[0]]
      pview[out] = (path, tuple(amap[i] for i in eqn.params["permutation"]))
    elif name == "broadcast_in_dim" and ins[0] in pview:
      path, amap = pview[ins[0]]
      m = [None] * len(out.aval.shape)
      for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if ins[0].aval.shape[i] == out.aval.shape[d]:
          m[d] = amap[i]
      pview[out] = (path, tuple(m))
    for v in ins:
      if v in pview and not isinstance(v, _Literal):
        last_param[0] = pview[v][0]
    # Zeros and uniform values (constant along the last axis).
    if name == "broadcast_in_dim":
      if is_zero(ins[0]):
        zero.add(out)
      dims = eqn.params["broadcast_dimensions"]
      nd = len(out.aval.shape)
      src_last = [i for i, d in enumerate(dims) if d == nd - 1]
      if not src_last or ins[0].aval.shape[src_last[0]] == 1 or is_uniform(ins[0]):
        uniform.add(out)
    elif (name in _SAME or name in ("reshape", "transpose", "squeeze",
                                    "expand_dims")) and ins and is_zero(ins[0]):
      zero.add(out)   # (nnx.RMSNorm subtracts a reshaped broadcast zero)
    if (out is not None and name not in ("broadcast_in_dim", "reshape")
        and not eqn.primitive.multiple_results and ins
        and all(is_uniform(v) for v in ins)
        and all(getattr(v, "aval", None) is None or not v.aval.shape
                or v.aval.shape == out.aval.shape or v.aval.shape[-1] == 1
                for v in ins if not isinstance(v, _Literal))
        and out.aval.shape and name not in ("dot_general", "gather",
                                            "conv_general_dilated")):
      uniform.add(out)

    tainted = [s for s in states if s in _STREAMY or isinstance(s, tuple)]
    # Gain factors: gain parameter x (per-token) uniform values.
    if name == "mul" and not tainted:
      a, b = ins
      for g, o in ((a, b), (b, a)):
        if g in pview and pview[g][1] and pview[g][1][-1] is not None and (
            is_uniform(o)) and all(
                ax is None for ax in pview[g][1][:-1]):
          gainf[out] = (pview[g][0], pview[g][1][-1])
        elif g in gainf and is_uniform(o):
          gainf[out] = gainf[g]
    elif name in _SAME and ins and ins[0] in gainf:
      gainf[out] = gainf[ins[0]]
    elif name == "broadcast_in_dim" and ins[0] in gainf:
      gainf[out] = gainf[ins[0]]
    # The embedding lookup starts a stream.
    if name == "gather" and ins[0] in pview and len(ins[0].aval.shape) == 2 and (
        jnp.issubdtype(ins[0].aval.dtype, jnp.floating)) and not tainted:
      path, amap = pview[ins[0]]
      if amap[1] is None:
        fail(eqn, f"embedding {path!r} is looked up through a reshape")
      set_width(eqn, ins[0].aval.shape[1])
      add_rotate(path, amap[1], "embedding")
      writers.append(path)
      st[out] = "stream"
      continue
    # Grouped matmuls (MoE experts, ``ragged_dot``): rows of the stream (a
    # gather of routed tokens) times one [G, K, N] parameter per group.
    if name in _RAGGED:
      x, w = ins[0], ins[1]
      (lc, rc), _ = _ragged_dims(eqn)
      sx = state(x)
      if w not in pview or state(w) is not None:
        if sx is None and state(w) is None:
          continue
        fail(eqn, "a grouped matmul of the stream whose weight is not a parameter")
      path, amap = pview[w]
      free = [i for i in range(len(w.aval.shape)) if i not in rc and i != 0]
      if sx is None:
        note_offstream_read(eqn, path, [amap[i] for i in rc])
        if free and amap[free[-1]] is not None:
          lin[out] = [(path, amap[free[-1]])]
        continue
      if sx != "stream" and not (isinstance(sx, tuple) and sx[0] == "gained"):
        fail(eqn, "a grouped matmul of a value derived from the stream")
      if list(lc) != [len(x.aval.shape) - 1] or amap[rc[0]] is None:
        fail(eqn, f"the grouped matmul with {path!r} does not contract (only) the "
             "stream's feature axis")
      add_rotate(path, amap[rc[0]], "reader")
      readers.append(path)
      if isinstance(sx, tuple):
        fusion.setdefault(sx[1], set()).add((path, amap[rc[0]]))
      if free and amap[free[-1]] is not None:
        lin[out] = [(path, amap[free[-1]])]
      continue
    # Matmuls with a parameter: readers of the stream, or linear outputs.
    if name in ("dot_general", "conv_general_dilated"):
      x, w = ins[0], ins[1]
      if states[1] is not None and states[0] is None and name == "dot_general":
        x, w = ins[1], ins[0]
      sx = state(x)
      if name == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        if x is ins[1]:
          lc, rc = rc, lc
      if sx is None and state(w) is None:
        note_other_uses(eqn, ins, outs)
        for v, c in zip(ins[:2], eqn.params["dimension_numbers"][0]
                        if name == "dot_general" else ((), ())):
          if not isinstance(v, _Literal) and v in pview:
            note_offstream_read(eqn, pview[v][0], [pview[v][1][i] for i in c])
        if w in pview and name == "dot_general":
          path, amap = pview[w]
          (lc0, rc0), (lb0, rb0) = eqn.params["dimension_numbers"]
          wc, wb = (rc0, rb0) if w is ins[1] else (lc0, lb0)
          free = [i for i in range(len(w.aval.shape)) if i not in wc and i not in wb]
          if free and w is ins[1] and amap[free[-1]] is not None:
            lin[out] = [(path, amap[free[-1]])]
        elif w in pview and name == "conv_general_dilated":
          dn = eqn.params["dimension_numbers"]
          if dn.out_spec[1] == len(out.aval.shape) - 1:
            path, amap = pview[w]
            if amap[dn.rhs_spec[0]] is not None:
              lin[out] = [(path, amap[dn.rhs_spec[0]])]
        if any(s == "inv" for s in states):
          st[out] = "inv"
        continue
      if sx not in ("stream",) and not (isinstance(sx, tuple) and sx[0] == "gained"):
        fail(eqn, "a matmul of the stream in a form other than stream x parameter")
      if w not in pview:
        fail(eqn, "the stream is multiplied by something that is not a parameter "
             "(e.g. attention on the raw stream)")
      path, amap = pview[w]
      nd = len(x.aval.shape)
      if name == "dot_general":
        if list(lc) != [nd - 1]:
          fail(eqn, f"the matmul with {path!r} does not contract (only) the "
               "stream's feature axis")
        wax = amap[rc[0]]
      else:
        dn = eqn.params["dimension_numbers"]
        if dn.lhs_spec[1] != nd - 1:
          fail(eqn, f"convolution {path!r} does not take the stream's features on "
               "its last axis")
        wax = amap[dn.rhs_spec[1]]
      if wax is None:
        fail(eqn, f"kernel {path!r} reaches the matmul through a reshape that "
             "merges its input axis")
      add_rotate(path, wax, "reader")
      readers.append(path)
      if isinstance(sx, tuple):
        fusion.setdefault(sx[1], set()).add((path, wax))
      # (A reader's output is a linear output too: it may be added to a stream.)
      if name == "dot_general" and x is ins[0]:
        (lc0, rc0), (lb0, rb0) = eqn.params["dimension_numbers"]
        free = [i for i in range(len(w.aval.shape)) if i not in rc0 and i not in rb0]
        if free and amap[free[-1]] is not None:
          lin[out] = [(path, amap[free[-1]])]
      continue
    if not tainted:
      # Linear outputs through views and bias additions.
      if name in _SAME and ins and ins[0] in lin:
        lin[out] = lin[ins[0]]
      elif name == "reshape" and ins[0] in lin and (
          ins[0].aval.shape[-1] == out.aval.shape[-1]):
        lin[out] = lin[ins[0]]
      elif name == "mul" and any(v in lin for v in ins):
        # Rows of a linear output weighted per row (MoE routing weights).
        l_, o = (ins[0], ins[1]) if ins[0] in lin else (ins[1], ins[0])
        if is_uniform(o) and o not in lin:
          lin[out] = lin[l_]
      elif name == "scatter-add" and len(ins) == 3 and ins[2] in lin and (
          is_zero(ins[0]) and _row_scatter(eqn)):
        # Rows of a linear output added into zeros (an MoE combine).
        lin[out] = lin[ins[2]]
      elif name == "add":
        a, b = ins
        for l_, o in ((a, b), (b, a)):
          if l_ in lin and not isinstance(o, _Literal) and o in pview and (
              pview[o][1] and pview[o][1][-1] is not None):
            lin[out] = lin[l_] + [(pview[o][0], pview[o][1][-1])]
            biases.add((lin[l_][0][0], pview[o][0], pview[o][1][-1]))
      if any(s == "inv" for s in states) and out is not None:
        for o in outs:
          st[o] = "inv"
      note_other_uses(eqn, ins, outs)
      continue
    # Operations on the stream.
    s0 = states[0] if states else None
    if name == "select_n":
      # select_n(predicate, *cases): the stream's state is its cases'.
      s0 = next((s for s in states[1:] if s is not None), None)
    if name in _SAME:
      st[out] = s0
    elif name in ("add", "sub"):
      a, b = ins
      sa, sb = states
      if sa == "stream" and sb == "stream":
        st[out] = "stream"
      elif "stream" in (sa, sb):
        other = b if sa == "stream" else a
        if name == "sub" and is_zero(other):
          st[out] = "stream"
        elif name == "sub" and other is a:
          fail(eqn, "the stream is subtracted from another value")
        else:
          if state(other) is not None:
            fail(eqn, f"the stream is added to a {state(other)} value")
          writer_of(other, eqn)
          st[out] = "stream"
      elif any(isinstance(s, tuple) for s in (sa, sb)):
        g = sa[1] if isinstance(sa, tuple) else sb[1]
        fail(eqn, f"a value is added to the output of the norm with gain {g!r} (a "
             "LayerNorm bias, or a post-norm residual)")
      else:
        fail(eqn, f"{sa} {name} {sb}")
    elif name == "mul":
      a, b = ins
      sa, sb = states
      if sa == "stream" and sb == "stream":
        st[out] = "square"
      elif "stream" in (sa, sb):
        other = b if sa == "stream" else a
        if state(other) not in (None, "inv"):
          fail(eqn, f"the stream is multiplied by a {state(other)} value")
        if other in gainf:
          st[out] = ("gained", gainf[other][0])
          fusion.setdefault(gainf[other][0], set())
        elif other in pview and pview[other][1] and pview[other][1][-1] is not None:
          st[out] = ("gained", pview[other][0])
          gainf[other] = (pview[other][0], pview[other][1][-1])
          fusion.setdefault(pview[other][0], set())
        elif is_uniform(other):
          st[out] = "stream"
        else:
          fail(eqn, "the stream is multiplied by a value that varies along its "
               "features but is not a norm gain parameter")
      elif any(isinstance(s, tuple) for s in (sa, sb)):
        other = b if isinstance(sa, tuple) else a
        if is_uniform(other) and state(other) in (None, "inv"):
          st[out] = sa if isinstance(sa, tuple) else sb
        else:
          fail(eqn, "a norm's output is multiplied by a second gain")
      else:
        fail(eqn, f"{sa} x {sb}")
    elif name == "div":
      if s0 in ("stream",) or isinstance(s0, tuple):
        if state(ins[1]) not in (None, "inv") or not is_uniform(ins[1]):
          fail(eqn, "the stream is divided by a value that varies along its features")
        st[out] = s0
      else:
        fail(eqn, "something is divided by the stream")
    elif name == "gather":
      if s0 == "square" or states[1] is not None or not _row_gather(eqn):
        fail(eqn, "a gather that is not a selection of whole rows of the stream")
      st[out] = s0
    elif name in ("square", "integer_pow"):
      if s0 != "stream" or (name == "integer_pow" and eqn.params["y"] != 2):
        fail(eqn, "a power of the stream other than its square")
      st[out] = "square"
    elif name == "reduce_sum":
      nd = len(ins[0].aval.shape)
      if s0 == "square" and nd - 1 in eqn.params["axes"]:
        st[out] = "inv"
      else:
        fail(eqn, "a sum over the stream's features that is not a sum of squares "
             "(e.g. a LayerNorm's mean subtraction)")
    elif name in ("reshape", "broadcast_in_dim", "squeeze", "expand_dims",
                  "transpose", "pad", "slice", "select_n", "concatenate",
                  "dynamic_slice", "dynamic_update_slice"):
      if s0 == "square":
        fail(eqn, "a view of the stream's square")
      nd_out = len(out.aval.shape)
      keeps = out.aval.shape and out.aval.shape[-1] == width[0]
      if name == "transpose":
        keeps = keeps and eqn.params["permutation"][-1] == nd_out - 1
      if name == "pad":
        keeps = keeps and tuple(eqn.params["padding_config"][-1][:2]) == (0, 0) and (
            is_zero(ins[1]))
      if name == "slice":
        keeps = keeps and ins[0].aval.shape[-1] == out.aval.shape[-1]
      if name == "broadcast_in_dim":
        keeps = keeps and eqn.params["broadcast_dimensions"][-1] == nd_out - 1
      if name == "select_n":
        # A choice per token (a padding mask) commutes with the rotation; a
        # choice that varies along the features does not.
        keeps = keeps and states[0] is None and is_uniform(ins[0]) and all(
            s == s0 or (s is None and is_zero(v)) for s, v in zip(states[1:], ins[1:]))
      if name == "concatenate":
        keeps = keeps and eqn.params["dimension"] != nd_out - 1 and all(
            s == s0 for s in states)
      if name in ("dynamic_slice", "dynamic_update_slice"):
        keeps = False
      if not keeps:
        fail(eqn, "a reshape/slice/pad that mixes the stream's feature axis")
      st[out] = s0
    else:
      fail(eqn, "an operation that does not commute with a rotation")

  for v in jaxpr.outvars:
    v = v if isinstance(v, _Literal) else top_alias.get(v, v)
    if not isinstance(v, _Literal) and state(v) is not None and state(v) != "inv":
      raise ValueError("rotation of the residual stream: the function returns the "
                       "stream (or a norm of it) itself, so a rotation would change "
                       "its output; rotate a function that ends in a head (logits)")
  if width[0] is None:
    raise ValueError("rotation of the residual stream: no embedding lookup (a "
                     "gather from a 2-d float parameter) was found in the function, "
                     "so there is no residual stream to rotate")
  fusions = []
  for (p, ax), at in sorted(offstream_reads.items()):
    if (p, ax) in rotate:
      raise ValueError(
          f"rotation of the residual stream: {p!r} (axis {ax}) is part of the "
          f"stream's rotation but is also contracted with a value that is not the "
          f"stream {at.strip()}, which a rotation of that axis would change; give that "
          "second use a parameter of its own")
  for g, rs in sorted(fusion.items()):
    at = used_gain_elsewhere.get(g, param_used.get(g))
    if at is not None:
      raise ValueError(f"rotation of the residual stream: norm gain {g!r} is also "
                       f"used outside the norm {at.strip()}, so it cannot be fused into the "
                       "layers that read the norm; give that use a parameter of "
                       "its own")
    if (g, 0) in rotate or any(p == g for p, _ in rotate):
      raise ValueError(f"rotation of the residual stream: norm gain {g!r} is also "
                       "read or written as a stream parameter")
    for kp, ax in rs:
      if rotate.get((kp, ax), set()) & {"writer", "embedding"}:
        raise ValueError(f"rotation of the residual stream: {kp!r} reads norm gain "
                         f"{g!r} but also writes into the stream (a tied embedding "
                         "and output head after a norm with a gain): fusing the gain "
                         "would rescale the embedding lookups. Untie them: give the "
                         "head a kernel of its own (for lowbit_jax.models.llama.Llama, "
                         "tie_embeddings=False with lm_head/kernel = "
                         "embed/embedding.T)")
    fusions.append(GainFusion(g, tuple(sorted(rs))))
  fused = {}
  for f in fusions:
    for r in f.readers:
      if r in fused and fused[r] != f.gain:
        raise ValueError(f"rotation of the residual stream: {r[0]!r} reads two "
                         f"norms ({fused[r]!r} and {f.gain!r})")
      fused[r] = f.gain
  tables = {kp for (kp, _), roles in rotate.items() if "embedding" in roles}
  if writers and set(writers) <= tables:
    raise ValueError(
        "rotation of the residual stream: nothing but the embedding writes into "
        "the stream (no residual addition); its readers "
        f"({list(dict.fromkeys(readers))}) project it away, so a residual stream "
        "that starts after them (x = E[t] @ w_in, or rms(E[t]) @ w_in) would stay "
        "unrotated. Fold such a projection into the table first (E @ w_in as the "
        "embedding); a model without residual additions is not one QuaRot rotates")
  return ResidualStream(width[0], tuple(sorted(rotate)), tuple(fusions),
                        tuple(dict.fromkeys(readers)), tuple(dict.fromkeys(writers)),
                        tuple(sorted(biases)))


def matmul_input_axes(fn: Callable, params: Any, *args, **kwargs) -> dict:
  """Parameter path -> the set of its axes that matmuls (and convolutions) contract.

  Args:
    fn, params, args, kwargs: as ``find_residual_stream``.

  Returns:
    ``{path: {axis, ...}}`` for each float parameter used as a ``dot_general``
    operand (axes of the parameter itself, through views), or ``None`` in the
    set where the contracted axis is a merge of several parameter axes.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [param_path(kp) for kp, _ in flat]
  closed = jax.make_jaxpr(lambda p: fn(p, *args, **kwargs))(params)
  pview = _VDict()
  for v, p, (_, leaf) in zip(closed.jaxpr.invars, paths, flat):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      pview[v] = (p, tuple(range(np.ndim(leaf))))
  found: dict = {}
  for eqn, ins, outs in _walk_top(closed.jaxpr, closed.consts):
    name = eqn.primitive.name
    if name in _SAME and ins and ins[0] in pview and name != "neg":
      pview[outs[0]] = pview[ins[0]]
    elif name == "reshape" and ins[0] in pview:
      path, amap = pview[ins[0]]
      pview[outs[0]] = (path, _axis_map_reshape(ins[0].aval.shape,
                                                outs[0].aval.shape, amap))
    elif name == "transpose" and ins[0] in pview:
      path, amap = pview[ins[0]]
      pview[outs[0]] = (path, tuple(amap[i] for i in eqn.params["permutation"]))
    elif name == "dot_general" or name in _RAGGED:
      (lc, rc), _ = (eqn.params["dimension_numbers"] if name == "dot_general"
                     else _ragged_dims(eqn))
      for v, c in ((ins[0], lc), (ins[1], rc)):
        if not isinstance(v, _Literal) and v in pview:
          path, amap = pview[v]
          found.setdefault(path, set()).add(
              amap[c[0]] if len(c) == 1 else None)
  return found
