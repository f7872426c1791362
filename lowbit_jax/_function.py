"""Quantize any JAX function ``fn(params, *args)`` by rules, without editing it.

``quantize_function`` traces ``fn`` to a jaxpr with its parameter pytree
flattened with paths, follows the data flow from every parameter leaf, and
re-interprets the jaxpr: each ``dot_general`` (``x @ w``, ``jnp.einsum``,
``jnp.dot``, a Haiku/Equinox linear layer, ...), ``conv_general_dilated`` and
``jax.lax.ragged_dot`` (grouped matmuls of MoE experts, weight ``[G, K, N]``
quantized per group; matched by rules listing ``"ragged_dot"``,
``"dot_general"`` or ``"einsum"``) with an operand that flows from a parameter
leaf runs through
``lowbit_jax.core.ops`` instead, with the rule that matches that leaf's path.

Data flow from a parameter passes through views of it: ``transpose``,
``reshape``, ``convert_element_type``, ``broadcast_in_dim``, ``squeeze``,
``expand_dims``, ``slice``, ``dynamic_slice`` (e.g. ``w[i]`` of stacked layers),
``copy``, ``stop_gradient``, ``optimization_barrier`` and sharding
constraints; and into ``jit`` calls, ``custom_jvp`` / ``custom_vjp``
functions, ``jax.checkpoint``, ``lax.scan`` (stacked weights scanned over),
``lax.cond`` and ``lax.while_loop``. A ``gather`` by activations (an
embedding lookup) or arithmetic with an activation ends it: what comes out is
an activation. A value made from parameters and constants alone (a QKV weight
concatenated in the function; a padded, masked, scattered, scaled or
normalized weight; rows gathered with constant indices), also inside
checkpointed, scanned, conditional and custom-derivative functions, that a
matmul reads raises: the matmul would run on the float weight (compute it
outside and pass it as a parameter, or keep its leaves float with a float
rule). Values closed over from an enclosing trace count as activations. Nothing
inside a ``pallas_call`` is ever rewritten; a weight that a rule quantizes
entering another higher-order primitive (``shard_map``, ...) raises, since its
matmuls there would stay float (exclude it with a float rule, or quantize the
function inside).

Rewriting inside a custom_jvp/custom_vjp function drops its custom derivative
rule (the function is inlined; fake quantization brings its straight-through
gradient); calls that contain nothing to quantize keep their rules.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax import _rules
from lowbit_jax._rules import QWeight, Site, WeightPlan
from lowbit_jax.core._qarray import QArray

_Literal = jex.core.Literal
_DropVar = jex.core.DropVar

# Primitives whose output is a view of their first operand.
_VIEWS = frozenset({"transpose", "reshape", "convert_element_type", "broadcast_in_dim",
                    "squeeze", "expand_dims", "slice", "dynamic_slice", "copy",
                    "copy_p", "sharding_constraint", "reduce_precision",
                    "stop_gradient", "rev"})
# Views that a quantized leaf goes through without being dequantized.
_QVIEWS = frozenset({"transpose", "convert_element_type", "copy", "copy_p",
                     "sharding_constraint", "stop_gradient"})
# Primitives whose i-th output is their i-th operand, unchanged.
_PASS = frozenset({"optimization_barrier"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REMAT = frozenset({"remat2", "checkpoint", "remat"})
# Higher-order primitives the interpreter follows (when a site is inside).
_FOLLOWED = _CALLS | _CUSTOM | _REMAT | {"scan", "cond", "while"}
_DOT_KINDS = ("dot_general", "einsum")
_REMAT_REGION = "jax.checkpoint (remat)"
_RAGGED = "ragged_dot_general"
_RAGGED_KINDS = ("ragged_dot",) + _DOT_KINDS


class _Tag(collections.namedtuple("_Tag", ["path", "prequantized", "view", "via"],
                                  defaults=((), None))):
  """Marks a value that flows from the parameter leaf at ``path``.

  ``view`` maps the leaf's axes to the value's: ``()`` the leaf as stored
  (dtype casts and copies included), ``(1, 0)`` a 2-D transpose of it, None
  any other view (a reshape, slice or broadcast). A site's ``SiteCall``
  carries it (``weight_view``) so the PTQ capture records its input Hessian
  in the stored weight's layout.

  ``via``: None for the leaf and its views; else the primitive that made
  the value from parameters alone (``_derived_tags``: a concatenation of
  weights, a padded or scaled weight). A matmul reading such a value as its
  weight raises (``_Interpreter._site``): quantize_function quantizes the
  leaves a matmul reads, and the matmul would run on the float weight.
  """


def _view_after(view, eqn):
  """A float parameter's ``_Tag.view`` after the view ``eqn`` of it."""
  name = eqn.primitive.name
  if view is None:
    return None
  if name == "transpose":
    if tuple(eqn.params["permutation"]) == (1, 0):
      return () if view else (1, 0)
    return None
  if name in _QVIEWS or name == "reduce_precision":
    return view   # the same layout
  return None


class _QRef:
  """A quantized parameter leaf inside the interpreter (not a pytree)."""
  __slots__ = ("q",)

  def __init__(self, q: QArray):
    self.q = q if isinstance(q, QWeight) else _rules.as_qweight(q, False)

  def value(self) -> jax.Array:
    return self.q.logical()


def _mat(v):
  return v.value() if isinstance(v, _QRef) else v


_MATMULS = frozenset({"dot_general", "conv_general_dilated", _RAGGED})


def _sub_jaxprs(params) -> list:
  """The jaxprs in an equation's params (a higher-order primitive's bodies)."""
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jex.core.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jex.core.Jaxpr):
        out.append(x)
  return out


def _runs_matmul(params) -> bool:
  """Whether a higher-order primitive's bodies hold a matmul (at any depth);
  a scatter's or reduction's combining jaxpr holds none."""
  todo = _sub_jaxprs(params)
  while todo:
    j = todo.pop()
    for e in j.eqns:
      if e.primitive.name in _MATMULS:
        return True
      todo.extend(_sub_jaxprs(e.params))
  return False


def _bind(eqn, invals):
  """Binds an equation unchanged (quantized leaves dequantized first)."""
  bp = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bp, tuple):  # older jax: (subfuns, params)
    subfuns, params = bp
  else:
    subfuns, params = (), bp
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    out = eqn.primitive.bind(*subfuns, *[_mat(v) for v in invals], **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _ragged_layout_problem(params, n_in: int) -> Optional[str]:
  """None if a ragged_dot_general is ``lax.ragged_dot``'s layout, else why not."""
  rdn = params["ragged_dot_dimension_numbers"]
  if n_in != 3 or params.get("group_offset") is not None:
    return "it has a group offset"
  if (tuple(map(tuple, rdn.dot_dimension_numbers[0])) != ((1,), (1,))
      or any(rdn.dot_dimension_numbers[1])
      or tuple(rdn.lhs_ragged_dimensions) != (0,)
      or tuple(rdn.rhs_group_dimensions) != (0,)):
    return f"its dimension numbers are {rdn}"
  return None


def _closed(j):
  """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
  if isinstance(j, jex.core.ClosedJaxpr) or (hasattr(j, "consts")
                                              and hasattr(j, "jaxpr")):
    return j.jaxpr, j.consts
  return j, ()


def _scan_counts(params) -> tuple:
  """(number of consts, number of carries) of a scan equation."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  ft = params["ft_in"]  # newer jax: a flat tree (consts, carry, xs)
  groups = ft.unpack() if hasattr(ft, "unpack") else ft
  return len(groups[0]), len(groups[1])


def _is_static(x) -> bool:
  """Whether a call argument is Python configuration rather than array data."""
  if isinstance(x, bool) or isinstance(x, str):
    return True
  return not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex,
                            jax.ShapeDtypeStruct))


def _const_vars(jaxpr, arg_const=None, consts=None) -> set:
  """The variables of ``jaxpr`` known to be constants: its closed-over
  constants (not those bound to an enclosing trace's tracers, which
  ``jax.make_jaxpr`` under an outer jit or grad makes constants: they may be
  activations) and the inputs a caller passed constants to (``arg_const``);
  ``_note_const`` adds what equations compute from constants alone."""
  if consts is None:
    out = set(jaxpr.constvars)
  else:
    out = {v for v, c in zip(jaxpr.constvars, consts)
           if not isinstance(c, jax.core.Tracer)}
  out.update(v for v, c in zip(jaxpr.invars, arg_const or ()) if c)
  return out


def _note_const(eqn, cset: set) -> None:
  """Adds ``eqn``'s outputs to ``cset`` when its operands are all constants
  (literals or members): a call, loop or plain primitive of constants."""
  if all(isinstance(v, _Literal) or v in cset for v in eqn.invars):
    cset.update(v for v in eqn.outvars if not isinstance(v, _DropVar))


def _body_const(eqn, cset: set, which: str = "body") -> list:
  """Per input of a higher-order equation's body (``which``: "body", or a
  while loop's "cond"): whether it is a constant. Loop carries and scanned
  slices count as varying."""
  c = _operands_const(eqn, cset)
  name, p = eqn.primitive.name, eqn.params
  if name == "scan":
    nc, ncar = _scan_counts(p)
    return c[:nc] + [False] * (len(c) - nc)
  if name == "cond":
    return c[1:]
  if name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    ncarry = len(c) - cn - bn
    return (c[:cn] if which == "cond" else c[cn:cn + bn]) + [False] * ncarry
  return c


def _derived_only(tags) -> list:
  """The derived tags (``_Tag.via``) of a body's outputs; None for the rest."""
  return [t if t is not None and t.via is not None else None for t in tags]


def _operands_const(eqn, cset: set) -> list:
  """Per operand of ``eqn``: whether it is a constant (a literal or in ``cset``)."""
  return [isinstance(v, _Literal) or v in cset for v in eqn.invars]


def _custom_jaxpr(params):
  for k in ("call_jaxpr", "fun_jaxpr"):
    if k in params:
      return params[k]
  return None


class _Interpreter:
  """Evaluates a jaxpr, quantizing the sites that a rule matches."""

  def __init__(self, qf: "QuantizedFunction", stats_in: Optional[dict],
               scales_in: Optional[dict] = None, state_in: Optional[dict] = None,
               rng=None, init: bool = False, metrics: bool = False):
    self.qf = qf
    self.config = qf.config
    self.stats_in = dict(stats_in or {})
    self.stats_out = dict(self.stats_in)
    self.scales_in = dict(scales_in or {})
    self.state_in = dict(state_in or {})
    self.rng = rng
    self.init = init
    self.metrics = metrics
    self.new_scales: dict = {}
    self.new_state: dict = {}
    self.metrics_out: dict = {}
    self._keys: dict[tuple, str] = {}
    self._index: dict[str, int] = {}
    self._count: collections.Counter = collections.Counter()
    # The equations being evaluated, outermost first: a site's key is its
    # equation in this context, since jax reuses one inner jaxpr for every
    # call of a jitted (or checkpointed) function with the same shapes.
    self._stack: list = []
    # The traced bodies (scan, cond, while, jax.checkpoint) being evaluated.
    self._regions: list[str] = []
    # The constant variables (``_const_vars``) of each jaxpr being evaluated,
    # innermost last.
    self._csets: list[set] = []

  # -- analysis ---------------------------------------------------------------

  def _rule(self, tag: _Tag, kinds) -> Optional[_rules.QuantRule]:
    i = self.config.find(_rules.candidates(tag.path), kinds)
    if i is None:
      return None
    r = self.config.rules[i]
    return None if r.is_float else r

  def has_sites(self, jaxpr, tags, arg_const=None) -> bool:
    """Whether a quantized site is reachable from the tagged inputs."""
    return self._flow(jaxpr, tags, arg_const)[0]

  def _flow(self, jaxpr, tags, arg_const=None):
    """(whether a quantized site is reachable, the output tags) of ``jaxpr``
    given its inputs' tags and which inputs are constants (``arg_const``)."""
    env = {v: t for v, t in zip(jaxpr.invars, tags) if t is not None}
    cset = _const_vars(jaxpr, arg_const)
    found = False
    for eqn in jaxpr.eqns:
      it = [None if isinstance(v, _Literal) else env.get(v) for v in eqn.invars]
      if not any(it):
        _note_const(eqn, cset)
        continue
      name = eqn.primitive.name
      outs = [None] * len(eqn.outvars)
      if name in _VIEWS:
        outs[0] = it[0]
      elif name in _PASS:
        outs = list(it)
      elif name == "dot_general":
        t = it[1] or it[0]
        found = found or self._rule(t, _DOT_KINDS) is not None
      elif name == "conv_general_dilated":
        found = found or (it[1] is not None
                          and self._rule(it[1], ("conv",)) is not None)
      elif name == _RAGGED:
        found = found or (it[1] is not None
                          and self._rule(it[1], _RAGGED_KINDS) is not None)
      elif name == "pallas_call":
        pass
      elif name in _CALLS:
        f, outs = self._flow(_closed(eqn.params["jaxpr"])[0], it,
                             _operands_const(eqn, cset))
        found = found or f
      elif name in _CUSTOM and _custom_jaxpr(eqn.params) is not None:
        f, o = self._flow(_closed(_custom_jaxpr(eqn.params))[0], it,
                          _body_const(eqn, cset))
        found, outs = found or f, _derived_only(o)
      elif name in _REMAT:
        f, o = self._flow(_closed(eqn.params["jaxpr"])[0], it, _body_const(eqn, cset))
        found, outs = found or f, _derived_only(o)
      elif name == "scan":
        nc, ncar = _scan_counts(eqn.params)
        inner = it[:nc] + [None] * ncar + it[nc + ncar:]
        found = found or self._flow(_closed(eqn.params["jaxpr"])[0], inner,
                                    _body_const(eqn, cset))[0]
      elif name == "cond":
        flags = _body_const(eqn, cset)
        found = found or any(self._flow(_closed(b)[0], it[1:], flags)[0]
                             for b in eqn.params["branches"])
      elif name == "while":
        found = found or self._flow_while(eqn, it, cset)
      else:
        self._check_unfollowed(eqn, it)
        outs = self._derived_tags(eqn, it, cset)
      for v, t in zip(eqn.outvars, outs):
        if t is not None and not isinstance(v, _DropVar):
          env[v] = t
    out_tags = [None if isinstance(v, _Literal) else env.get(v) for v in jaxpr.outvars]
    return found, out_tags

  # -- evaluation -------------------------------------------------------------

  def eval(self, jaxpr, consts, args, tags, arg_const=None):
    env, tenv = {}, {}
    cset = _const_vars(jaxpr, arg_const, consts)

    def read(v):
      return v.val if isinstance(v, _Literal) else env[v]

    def rtag(v):
      return None if isinstance(v, _Literal) else tenv.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a, t in zip(jaxpr.invars, args, tags):
      env[v] = a
      if t is not None:
        tenv[v] = t
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      intags = [rtag(v) for v in eqn.invars]
      if not any(intags):
        _note_const(eqn, cset)
      self._csets.append(cset)
      try:
        outs, otags = self.eqn(eqn, invals, intags)
      finally:
        self._csets.pop()
      for v, o, t in zip(eqn.outvars, outs, otags):
        if isinstance(v, _DropVar):
          continue
        env[v] = o
        if t is not None:
          tenv[v] = t
    return [read(v) for v in jaxpr.outvars], [rtag(v) for v in jaxpr.outvars]

  def eqn(self, eqn, invals, intags):
    if not any(intags):
      return _bind(eqn, invals), [None] * len(eqn.outvars)
    self._stack.append(id(eqn))
    try:
      return self._eqn(eqn, invals, intags)
    finally:
      self._stack.pop()

  def _eqn(self, eqn, invals, intags):
    none = [None] * len(eqn.outvars)
    name = eqn.primitive.name
    if name in _VIEWS:
      return self._view(eqn, invals, intags)
    if name == "dot_general":
      return self._dot(eqn, invals, intags), none
    if name == "conv_general_dilated":
      return self._conv(eqn, invals, intags), none
    if name == _RAGGED:
      return self._ragged(eqn, invals, intags), none
    if name == "pallas_call":
      return _bind(eqn, invals), none
    cset = self._csets[-1]
    if name in _CALLS:
      j, consts = _closed(eqn.params["jaxpr"])
      return self.eval(j, consts, invals, intags, _operands_const(eqn, cset))
    if name in _CUSTOM and _custom_jaxpr(eqn.params) is not None:
      j, consts = _closed(_custom_jaxpr(eqn.params))
      flags = _body_const(eqn, cset)
      found, otags = self._flow(j, intags, flags)
      if found:
        return self.eval(j, consts, invals, intags, flags)[0], none
      # (a weight made in it, e.g. jax.nn.relu of a weight, stays derived)
      return _bind(eqn, invals), _derived_only(otags)
    if name in _REMAT:
      found, otags = self._flow(_closed(eqn.params["jaxpr"])[0], intags,
                                _body_const(eqn, cset))
      if found:
        return self._remat(eqn, invals, intags), none
      return _bind(eqn, invals), _derived_only(otags)
    if name == "scan" and self.has_sites(_closed(eqn.params["jaxpr"])[0],
                                         self._scan_tags(eqn, intags),
                                         _body_const(eqn, cset)):
      return self._scan(eqn, invals, intags), none
    if name == "cond":
      flags = _body_const(eqn, cset)
      if any(self.has_sites(_closed(b)[0], intags[1:], flags)
             for b in eqn.params["branches"]):
        return self._cond(eqn, invals, intags), none
    if name == "while" and self._flow_while(eqn, intags, cset):
      return self._while(eqn, invals, intags), none
    if name in _PASS:
      # Quantized leaves pass as they are; the rest through the primitive.
      rest = [i for i, v in enumerate(invals) if not isinstance(v, _QRef)]
      outs = list(invals)
      if rest:
        bound = eqn.primitive.bind(*[invals[i] for i in rest], **eqn.params)
        for i, o in zip(rest, bound):
          outs[i] = o
      return outs, list(intags)
    if name not in _FOLLOWED:
      self._check_unfollowed(eqn, intags)
      return _bind(eqn, invals), self._derived_tags(eqn, intags, cset)
    return _bind(eqn, invals), none

  def _derived_tags(self, eqn, tags, cset) -> list:
    """Output tags of a primitive the interpreter does not follow (arithmetic,
    ``concatenate``, ``pad``, ...): ``_Tag.via`` marks what it made from
    parameters and constants alone (every operand not a constant, ``cset``
    or a literal, flows from a parameter, one of them a leaf a rule
    quantizes); anything with an activation among its operands is an
    activation (None)."""
    none = [None] * len(eqn.outvars)
    if _runs_matmul(eqn.params):
      return none  # a higher-order primitive: _check_unfollowed's concern
    it = [t for v, t in zip(eqn.invars, tags)
          if not isinstance(v, _Literal) and v not in cset]
    if not it or any(t is None for t in it):
      return none
    kinds = _DOT_KINDS + ("conv",) + _RAGGED_KINDS
    t = next((t for t in it if self._rule(t, kinds) is not None), None)
    if t is None:
      return none
    return [t._replace(view=None, via=t.via or eqn.primitive.name)] * len(eqn.outvars)

  def _check_unfollowed(self, eqn, tags) -> None:
    """Raises when a weight a rule would quantize enters a higher-order
    primitive the interpreter does not rewrite (``shard_map``, ...): its
    matmuls inside would silently stay float."""
    if eqn.primitive.name == "pallas_call" or not _runs_matmul(eqn.params):
      return
    kinds = _DOT_KINDS + ("conv",) + _RAGGED_KINDS
    bodies = [b for b in _sub_jaxprs(eqn.params) if len(b.invars) == len(tags)]
    for i, t in enumerate(tags):
      if t is None or self._rule(t, kinds) is None:
        continue
      if bodies:
        # A body whose inputs are the operands (shard_map's): whether this
        # parameter reaches a site there, by the same data flow as elsewhere.
        one = [None] * len(tags)
        one[i] = t
        if not any(self._flow(b, one)[0] for b in bodies):
          continue
      raise ValueError(
          f"the weight {t.path!r}, which a rule quantizes, enters "
          f"`{eqn.primitive.name}`, which quantize_function does not rewrite: "
          "its matmuls there would stay float. Quantize inside it (apply "
          "quantize_function to the function that primitive runs), or exclude "
          f"the weight with a float rule (QuantRule({t.path!r}) before the "
          "others)")

  def _view(self, eqn, invals, intags):
    name = eqn.primitive.name
    x, tag = invals[0], intags[0]
    if tag is None:
      return _bind(eqn, invals), [None]
    if isinstance(x, _QRef) and name in _QVIEWS:
      q = x.q
      if name == "transpose":
        if q.ndim == 2 and tuple(eqn.params["permutation"]) == (1, 0):
          return [_QRef(dataclasses.replace(q, transposed=not q.transposed))], [tag]
      elif name == "convert_element_type":
        return [_QRef(dataclasses.replace(
            q, dtype=str(jnp.dtype(eqn.params["new_dtype"]))))], [tag]
      else:
        return [x], [tag]
    return _bind(eqn, invals), [tag._replace(view=_view_after(tag.view, eqn))]

  def _key(self, path: str) -> str:
    """The site's key: its path, ``#n`` for the n-th other use of the leaf
    (one per equation in its context of enclosing calls: ``_stack``, which
    ends with the site's own equation)."""
    ctx = (tuple(self._stack), path)
    k = self._keys.get(ctx)
    if k is None:
      n = self._count[path]
      self._count[path] += 1
      k = path if n == 0 else f"{path}#{n}"
      self._keys[ctx] = k
    return k

  def _site(self, tag: _Tag, kinds, op: str, weight):
    if tag.via is not None:
      rule = self._rule(tag, kinds)
      if rule is None:
        return None, None
      raise ValueError(
          f"the weight {tag.path!r}, which a rule quantizes, reaches a {op} only "
          f"through `{tag.via}` (a value made from parameters alone, not a view "
          "of the weight): quantize_function quantizes the parameters a matmul "
          "reads, so this matmul would run on the float weight. Compute the "
          "combined weight outside the function and pass it as a parameter (the "
          f"rule then matches it), or exclude the weight with a float rule "
          f"(QuantRule({tag.path!r}) before the others) to keep it float")
    rule = self.config.match(_rules.candidates(tag.path), kinds)
    if rule is None or rule.is_float:
      return None, None
    if tag.prequantized and not isinstance(weight, _QRef):
      # Dequantized on the way (a view a QArray cannot take): do not
      # quantize it a second time.
      rule = dataclasses.replace(rule, weight=None)
    site = Site(tag.path, op, rule, self.qf.mode, self.qf.use_kernel)
    key = self._key(tag.path)
    self.config.record_site(key, site)
    return site, key

  def _stats(self, site: Site, key: str):
    if site.collects_stats:
      if self._regions:
        raise ValueError(
            f"cannot calibrate {site.path!r}: it runs inside {self._regions[-1]}, "
            "whose body cannot hand statistics back. Calibrate a version of the "
            f"function {self._way_out()}, or use a dynamic activation rule "
            "(static=False) there")
      return None  # SiteCall.observe folds the op's activation in
    if site.needs_stats:
      return self.stats_in.get(key)
    return None

  def _call(self, site: Site, key: str, view=()) -> _rules.SiteCall:
    """The SiteCall of a site: its entries of the dicts passed in, its key
    (``view``: the weight's ``_Tag.view``)."""
    stats = self._stats(site, key)
    if stats is None and site.rule.learn_activation == "pact":
      stats = self.stats_in.get(key)  # a calibrated range starts the clip
    # Learned scales are only read after initialization; a checkpointed
    # body (no loop: one scale per use) reads them as any other input.
    in_loop = any(r != _REMAT_REGION for r in self._regions)
    if self._regions and ((in_loop and site.scale_names()) or site.history_names()
                          or self.metrics):
      raise ValueError(
          f"{site.path!r} runs inside {self._regions[-1]}, whose body cannot hand "
          "learned scales, amax histories or metrics back; call the function "
          f"{self._way_out()}, or use rules without learn_*, scaling='delayed' "
          "and quant_metrics there")
    rng = None
    if site.stochastic and self.rng is not None:
      idx = self._index.setdefault(key, len(self._index))
      rng = jax.random.fold_in(self.rng, idx)  # its own key per site
    call = _rules.SiteCall(scales=self.scales_in.get(key), state=self.state_in.get(key),
                           key=rng, stats=stats, init=self.init, metrics=self.metrics,
                           weight_view=view)
    if site.collects_stats:
      def fold(x):
        self.stats_out[key] = _rules.observe(site, self.stats_out.get(key), x)
      call.observe = fold
    return call

  def _finish(self, key: str, call: _rules.SiteCall) -> None:
    if call.new_scales:
      self.new_scales.setdefault(key, {}).update(call.new_scales)
    if call.new_state:
      self.new_state.setdefault(key, {}).update(call.new_state)
    if call.recorded:
      self.metrics_out.setdefault(key, {}).update(call.recorded)

  def _dot(self, eqn, invals, intags):
    lhs, rhs = invals
    lt, rt = intags
    # The weight: a parameter (or a view of one) on either side, the rhs
    # first; else a value made from parameters (``_Tag.via``: _site raises).
    if lt is not None and lt.via is None and (rt is None or rt.via is not None):
      side, tag = "lhs", lt
    else:
      side, tag = ("rhs", rt) if rt is not None else ("lhs", lt)
    weight = rhs if side == "rhs" else lhs
    site, key = self._site(tag, _DOT_KINDS, "dot_general", weight)
    if site is None:
      return _bind(eqn, invals)
    w = weight.q if isinstance(weight, _QRef) else weight
    act = _mat(lhs if side == "rhs" else rhs)
    lhs2, rhs2 = (act, w) if side == "rhs" else (w, act)
    call = self._call(site, key, tag.view)
    p = eqn.params
    out = _rules.site_dot_general(site, lhs2, rhs2, p["dimension_numbers"],
                                  p.get("precision"), p.get("preferred_element_type"),
                                  weight_side=side, call=call)
    self._finish(key, call)
    return [out]

  def _conv(self, eqn, invals, intags):
    lhs, rhs = invals
    if intags[1] is None:
      return _bind(eqn, invals)
    site, key = self._site(intags[1], ("conv",), "conv", rhs)
    if site is None:
      return _bind(eqn, invals)
    w = rhs.q if isinstance(rhs, _QRef) else rhs
    act = _mat(lhs)
    call = self._call(site, key, intags[1].view)
    p = eqn.params
    out = _rules.site_conv(site, act, w, p["window_strides"], p["padding"],
                           p["lhs_dilation"], p["rhs_dilation"],
                           p["dimension_numbers"], p["feature_group_count"],
                           p["batch_group_count"], p.get("precision"),
                           p.get("preferred_element_type"), call=call)
    self._finish(key, call)
    return [out]

  def _ragged(self, eqn, invals, intags):
    """``jax.lax.ragged_dot`` with a weight ``[G, K, N]`` (MoE experts)."""
    lhs, rhs, group_sizes = invals[:3]
    # a parameter on the lhs: not lax.ragged_dot's activation-by-experts
    # shape; a value made from parameters there is an input like any other
    if intags[1] is None or (intags[0] is not None and intags[0].via is None):
      return _bind(eqn, invals)
    site, key = self._site(intags[1], _RAGGED_KINDS, "ragged_dot", rhs)
    if site is None:
      return _bind(eqn, invals)
    p = eqn.params
    why = _ragged_layout_problem(p, len(invals))
    if why is not None:
      raise ValueError(f"{site.path}: a ragged_dot_general reading this weight is "
                       f"not jax.lax.ragged_dot(x [M, K], w [G, K, N], group_sizes) "
                       f"({why}); exclude the weight with a float rule")
    w = rhs.q if isinstance(rhs, _QRef) else rhs
    act = _mat(lhs)
    call = self._call(site, key, intags[1].view)
    out = _rules.site_ragged_dot(site, act, w, group_sizes, p.get("precision"),
                                 p.get("preferred_element_type"), call=call)
    self._finish(key, call)
    return [out]

  @contextlib.contextmanager
  def _region(self, kind: str):
    self._regions.append(kind)
    try:
      yield
    finally:
      self._regions.pop()

  def _way_out(self) -> str:
    if self._regions[-1] == _REMAT_REGION:
      return "without jax.checkpoint (rematerialization changes no value)"
    return "with the loop unrolled (a Python loop)"

  def _scan_tags(self, eqn, intags):
    nc, ncar = _scan_counts(eqn.params)
    return intags[:nc] + [None] * ncar + intags[nc + ncar:]

  def _scan(self, eqn, invals, intags):
    flags = _body_const(eqn, self._csets[-1])
    p = eqn.params
    nc, ncar = _scan_counts(p)
    j, jc = _closed(p["jaxpr"])
    consts = invals[:nc]
    init = [_mat(v) for v in invals[nc:nc + ncar]]
    xs = [_mat(v) for v in invals[nc + ncar:]]
    tags = self._scan_tags(eqn, intags)

    outer = self.rng
    xs = xs + [jnp.arange(p["length"])]

    def body(carry, x):
      if outer is not None:  # stochastic rounding: new noise every iteration
        self.rng = jax.random.fold_in(outer, x[-1])
      try:
        with self._region("lax.scan"):
          outs, _ = self.eval(j, jc, list(consts) + list(carry) + list(x[:-1]), tags,
                              flags)
      finally:
        self.rng = outer
      outs = [_mat(o) for o in outs]
      return outs[:ncar], outs[ncar:]

    carry, ys = lax.scan(body, init, xs, length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"])
    return list(carry) + list(ys)

  def _cond(self, eqn, invals, intags):
    flags = _body_const(eqn, self._csets[-1])
    index, operands = invals[0], invals[1:]

    def branch(b):
      j, jc = _closed(b)

      def run():
        with self._region("lax.cond"):
          outs, _ = self.eval(j, jc, operands, intags[1:], flags)
        return [_mat(o) for o in outs]
      return run

    return list(lax.switch(index, [branch(b) for b in eqn.params["branches"]]))

  def _flow_while(self, eqn, intags, cset):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    ncarry = len(intags) - cn - bn
    return (self.has_sites(_closed(p["cond_jaxpr"])[0],
                           intags[:cn] + [None] * ncarry,
                           _body_const(eqn, cset, "cond"))
            or self.has_sites(_closed(p["body_jaxpr"])[0],
                              intags[cn:cn + bn] + [None] * ncarry,
                              _body_const(eqn, cset)))

  def _while(self, eqn, invals, intags):
    flags = _body_const(eqn, self._csets[-1])
    cflags = _body_const(eqn, self._csets[-1], "cond")
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
    ctags, btags = intags[:cn], intags[cn:cn + bn]
    init = [_mat(v) for v in invals[cn + bn:]]
    cj, cjc = _closed(p["cond_jaxpr"])
    bj, bjc = _closed(p["body_jaxpr"])
    blank = [None] * len(init)

    outer = self.rng

    def cond_fun(c):
      with self._region("lax.while_loop"):
        return self.eval(cj, cjc, list(cconsts) + list(c[:-1]), ctags + blank,
                         cflags)[0][0]

    def body_fun(c):
      if outer is not None:  # stochastic rounding: new noise every iteration
        self.rng = jax.random.fold_in(outer, c[-1])
      try:
        with self._region("lax.while_loop"):
          outs, _ = self.eval(bj, bjc, list(bconsts) + list(c[:-1]), btags + blank,
                              flags)
      finally:
        self.rng = outer
      return [_mat(o) for o in outs] + [c[-1] + 1]

    return list(lax.while_loop(cond_fun, body_fun, init + [jnp.int32(0)]))[:-1]

  def _remat(self, eqn, invals, intags):
    flags = _body_const(eqn, self._csets[-1])
    p = eqn.params
    j, jc = _closed(p["jaxpr"])
    if self.qf.mode == "calibrate" or self.init:
      # Statistics and initial scales cannot leave a checkpointed trace;
      # calibration and initialization need no rematerialization (it changes
      # no value), so run the body inline.
      return [_mat(o) for o in self.eval(j, jc, invals, intags, flags)[0]]
    arr_pos = [i for i, v in enumerate(invals) if not isinstance(v, _QRef)]

    def body(*arrs):
      vals = list(invals)
      for i, a in zip(arr_pos, arrs):
        vals[i] = a
      with self._region(_REMAT_REGION):
        outs, _ = self.eval(j, jc, vals, intags, flags)
      return [_mat(o) for o in outs]

    ck = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True),
                        policy=p.get("policy"))
    return list(ck(*[invals[i] for i in arr_pos]))


class QuantizedFunction:
  """``fn(params, *args, **kwargs)`` with its weight matmuls quantized by rules.

  Call it like ``fn``; it is jitted: array arguments are traced, while bools,
  strings and other non-numeric Python objects (``train=False``, a callable)
  are static, as if named in ``static_argnames`` (Python ints and floats are
  traced, as ``jax.jit`` traces them: bind those with ``functools.partial``
  when they are configuration). It works under ``jax.jit``, ``jax.grad``
  (fake mode: straight-through gradients) and ``jax.vmap``.

  Keyword-only extra arguments:

  * ``quant_stats``: the statistics of static rules (from a ``"calibrate"``
    run). In mode ``"calibrate"`` the call returns ``(output, quant_stats)``
    with the statistics updated; pass them back in on the next calibration
    call, then to the fake/real function.
  * ``quant_scales``: learned LSQ scales and PACT clips
    (``{site: {"weight_scale" | "act_scale" | "act_clip": array}}``, from
    ``init_quant_vars``); differentiate with respect to them as with params.
  * ``quant_state``: amax histories of delayed scaling (``{site:
    {"act_history" | "weight_history" | "grad_history": float32[L]}}``);
    the gradient ``jax.grad`` returns for them is their next value
    (overwrite-with-gradient): write it back instead of applying it.
  * ``rng``: PRNG key for stochastic rounding (a rule spec with
    ``rounding="stochastic"``); each site folds in its own index (and, inside
    ``lax.scan`` / ``while_loop``, the iteration).
  * ``quant_metrics=True``: also return ``{site: {"weight_clipped",
    "act_clipped": fraction}}``, the fraction of values each site clipped;
    the call then returns ``(output, metrics)`` (``(output, quant_stats,
    metrics)`` when calibrating).

  Sites are keyed by the weight's parameter path (``#n`` added for its n-th
  further use; a jitted or checkpointed function called twice gives each
  call's sites their own keys). Learned scales, histories and metrics are not
  available to sites inside ``lax.scan`` / ``lax.cond`` / ``lax.while_loop``
  (unroll the loop); inside ``jax.checkpoint`` learned scales are (their
  initialization and calibration run the body without it), histories and
  metrics are not (call the function without it there). Only matmuls with a weight are reached: activation x activation
  matmuls (attention's q.k and p.v) have no parameter path to match, so
  rules of kind ``"act_matmul"`` reach them through the Flax front ends
  (``lowbit_jax.flax.ActEinsum`` in Linen, ``NnxActEinsum`` in NNX).

  Attributes:
    fn: the wrapped function.
    mode: "fake", "real" or "calibrate".
    config: the QuantConfig recording which rule matched which site.
    use_kernel: kernel dispatch of the real-mode matmul.
  """

  def __init__(self, fn: Callable, rules, mode: str = "fake", *, strict: bool = False,
               use_kernel: str = "auto"):
    if not callable(fn):
      raise TypeError(f"quantize_function takes a function, got {type(fn).__name__}")
    self.fn = fn
    self.mode = _rules.check_mode(mode)
    self.config = _rules.as_config(rules, strict)
    self.use_kernel = _rules.check_use_kernel(use_kernel)
    functools.update_wrapper(self, fn)
    self._jits: dict = {}
    self._logs: dict = {}

  def __call__(self, params, *args, quant_stats: Optional[dict] = None,
               quant_scales: Optional[dict] = None, quant_state: Optional[dict] = None,
               rng: Optional[jax.Array] = None, quant_metrics: bool = False, **kwargs):
    extras = {"stats": quant_stats, "scales": quant_scales, "state": quant_state,
              "rng": rng}
    out, aux = self._dispatch(params, args, kwargs, extras, False,
                              bool(quant_metrics))
    self.config.check()
    if self.mode != "calibrate" and isinstance(quant_stats, dict):
      # Calibrated ranges are checked here, on concrete values (inside the
      # trace they are not): a range of 0 or below names its layer.
      for key, st in quant_stats.items():
        site = self.config.sites.get(key)
        if site is not None and site.static and _rules.is_range(st):
          _rules.static_range(site, st)
    res = (out,)
    if self.mode == "calibrate":
      res += (aux["stats"],)
    if quant_metrics:
      res += (aux["metrics"],)
    return res[0] if len(res) == 1 else res

  def init_quant_vars(self, params, *args, quant_stats: Optional[dict] = None,
                      rng: Optional[jax.Array] = None, **kwargs) -> dict:
    """The learned scales and amax histories of the function, from one batch.

    Runs the function once: LSQ scales start from the weights and this batch
    (the rule's ``scale_init``), PACT clips from the activation's amax (or its
    calibrated range in ``quant_stats``), amax histories empty.

    Args:
      params, *args, **kwargs: as for the function (a real batch).
      quant_stats: calibration statistics (static rules; PACT initialisation).
      rng: key for stochastic rounding, if a rule uses it.

    Returns:
      ``{"quant_scales": {site: {name: array}}, "quant_state": {site: {name:
      float32[L]}}}``, sites keyed as ``quant_stats`` (the weight's path, with
      ``#n`` for its n-th further use); pass them back with
      ``qfn(params, ..., quant_scales=..., quant_state=...)``.
    """
    extras = {"stats": quant_stats, "scales": None, "state": None, "rng": rng}
    _, aux = self._dispatch(params, args, kwargs, extras, True, False)
    self.config.check()
    return {_rules.SCALES: aux["scales"], _rules.STATE: aux["state"]}

  def _dispatch(self, params, args, kwargs, extras, init: bool, metrics: bool):
    leaves, tdef = jax.tree.flatten((args, kwargs))
    static = tuple(i for i, l in enumerate(leaves) if _is_static(l))
    key = (tdef, static, tuple(leaves[i] for i in static), init, metrics)
    fn = self._jits.get(key)
    if fn is None:
      fn = self._jits[key] = jax.jit(functools.partial(
          self._run_static, tdef, dict(zip(static, key[2])), init, metrics))
    dyn = [l for i, l in enumerate(leaves) if i not in static]
    # What this trace matched, replayed on a cache hit (which traces nothing)
    # so unused_rules() is right after config.reset().
    sig = (key, jax.tree.structure((params, dyn, extras)),
           tuple((jnp.shape(l), jnp.result_type(l)) for l in
                 jax.tree.leaves((params, dyn, extras))))
    self.config.begin_log()
    try:
      out = fn(params, dyn, extras)
    finally:
      log = self.config.end_log()
    if log:
      self._logs[sig] = log
    else:
      self.config.replay(self._logs.get(sig, []))
    return out

  def unused_rules(self) -> list:
    """Rules that matched no site in the calls so far."""
    return self.config.unused_rules()

  # -- tracing ----------------------------------------------------------------

  def _trace(self, params, args, kwargs):
    """(jaxpr, output shape, param leaves, input tags, dynamic arg leaves)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params,
                                                         is_leaf=_rules.is_qarray)
    paths = [_rules.path_str(kp) for kp, _ in flat]
    leaves = [leaf for _, leaf in flat]
    rest, rdef = jax.tree.flatten((args, kwargs))
    static = {i: l for i, l in enumerate(rest) if _is_static(l)}
    dyn = [l for i, l in enumerate(rest) if i not in static]

    def abstract(leaf):
      if isinstance(leaf, QArray):
        return jax.ShapeDtypeStruct(_rules.logical_shape(leaf), jnp.dtype(leaf.dtype))
      return leaf

    def flat_fn(pleaves, dleaves):
      it = iter(dleaves)
      a, k = jax.tree.unflatten(rdef, [static[i] if i in static else next(it)
                                       for i in range(len(rest))])
      return self.fn(jax.tree_util.tree_unflatten(treedef, pleaves), *a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
        [abstract(l) for l in leaves], dyn)
    tags = []
    for p, leaf in zip(paths, leaves):
      dt = jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else None
      is_float = isinstance(leaf, QArray) or (
          dt is not None and jnp.issubdtype(dt, jnp.inexact))
      tags.append(_Tag(p, isinstance(leaf, QArray)) if is_float else None)
    return closed, out_shape, leaves, tags + [None] * len(dyn), dyn

  def _run_static(self, tdef, static: dict, init: bool, metrics: bool, params, dyn,
                  extras):
    it = iter(dyn)
    leaves = [static[i] if i in static else next(it) for i in range(tdef.num_leaves)]
    args, kwargs = jax.tree.unflatten(tdef, leaves)
    return self._run(params, args, kwargs, extras, init, metrics)

  def _run(self, params, args, kwargs, extras, init: bool = False,
           metrics: bool = False):
    closed, out_shape, leaves, tags, dyn = self._trace(params, args, kwargs)
    vals = [_QRef(l) if isinstance(l, QArray) else l for l in leaves] + dyn
    interp = _Interpreter(self, extras["stats"], extras["scales"], extras["state"],
                          extras["rng"], init, metrics)
    outs, _ = interp.eval(closed.jaxpr, closed.consts, vals, tags)
    out = jax.tree_util.tree_unflatten(jax.tree.structure(out_shape),
                                       [_mat(o) for o in outs])
    aux = {"stats": interp.stats_out if self.mode == "calibrate" else None,
           "scales": interp.new_scales, "state": interp.new_state,
           "metrics": interp.metrics_out}
    return out, aux

  # -- real quantization ahead of time -----------------------------------------

  def plan(self, params, *args, **kwargs) -> dict:
    """``{parameter path: WeightPlan}`` of the weights to store quantized.

    A leaf is planned when every use of it is a quantized matmul or conv site
    (through ``convert_element_type``, a 2-D ``transpose`` or a ``jit`` call);
    a leaf with any other use (an embedding table that is also gathered, a
    reshaped or sliced weight) stays in float and is quantized per call.

    Args:
      params, *args, **kwargs: as for the function (arrays or
        ``jax.ShapeDtypeStruct`` s; nothing is computed).
    """
    closed, _, leaves, tags, _ = self._trace(params, args, kwargs)
    uses: dict[str, list] = collections.defaultdict(list)
    jaxpr = closed.jaxpr
    for i, t in enumerate(tags[:len(leaves)]):
      if t is not None:
        self._collect_uses(jaxpr, jaxpr.invars[i], (), tuple(leaves[i].shape)
                           if not isinstance(leaves[i], QArray) else
                           _rules.logical_shape(leaves[i]), t.path, uses)
    plan = {}
    for path, us in uses.items():
      if any(u is None for u in us):
        continue
      if len(set(us)) == 1:
        plan[path] = us[0]
    return plan

  def _collect_uses(self, jaxpr, var, perm, shape, path, uses):
    """Appends a WeightPlan (or None: another use) for each use of ``var``."""
    if var in jaxpr.outvars:
      uses[path].append(None)
    for eqn in jaxpr.eqns:
      for pos, v in enumerate(eqn.invars):
        if v is not var:
          continue
        name = eqn.primitive.name
        out = eqn.outvars[0] if eqn.outvars else None
        if name in ("convert_element_type", "copy", "copy_p") and pos == 0:
          self._collect_uses(jaxpr, out, perm, shape, path, uses)
        elif (name == "transpose" and len(shape) == 2
              and tuple(eqn.params["permutation"]) == (1, 0)):
          self._collect_uses(jaxpr, out, (1, 0) if not perm else (), shape, path,
                             uses)
        elif name in _CALLS:
          inner = _closed(eqn.params["jaxpr"])[0]
          self._collect_uses(inner, inner.invars[pos], perm, shape, path, uses)
        elif name == "dot_general":
          uses[path].append(self._dot_plan(eqn, pos, perm, shape, path))
        elif name == _RAGGED and pos == 1 and not perm:
          rule = self._plan_rule(path, _RAGGED_KINDS)
          ok = _ragged_layout_problem(eqn.params, len(eqn.invars)) is None
          uses[path].append(None if rule is None or not ok else _rules.plan_weight(
              rule.weight_spec, shape, "ragged_dot", contracting=(1,),
              compute_dtype=eqn.invars[1].aval.dtype))
        elif name == "conv_general_dilated" and pos == 1 and not perm:
          rule = self._plan_rule(path, ("conv",))
          if rule is None:
            uses[path].append(None)
          else:
            dn = eqn.params["dimension_numbers"]
            uses[path].append(_rules.plan_weight(rule.weight_spec, shape, "conv",
                                                 out_axis=dn.rhs_spec[0],
                                                 in_axis=dn.rhs_spec[1],
                                                 compute_dtype=eqn.invars[1].aval.dtype))
        else:
          uses[path].append(None)

  def _plan_rule(self, path, kinds):
    i = self.config.find(_rules.candidates(path), kinds)
    if i is None:
      return None
    r = self.config.rules[i]
    return r if r.weight is not None else None  # (its weight_spec is planned)

  def _dot_plan(self, eqn, pos, perm, shape, path) -> Optional[WeightPlan]:
    rule = self._plan_rule(path, _DOT_KINDS)
    if rule is None:
      return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    other = eqn.invars[1 - pos]
    if not isinstance(other, _Literal) and other is eqn.invars[pos]:
      return None
    contract, batch = (rc, rb) if pos == 1 else (lc, lb)
    spec = rule.weight_spec
    if perm:
      contract = tuple(perm[c] for c in contract)
      batch = tuple(perm[b] for b in batch)
      # An explicit axis names the op's view of the weight (as fake mode reads
      # it): the stored weight's axis is perm of it. Real mode applied it to
      # the stored layout, quantizing another axis than fake mode did. A tile
      # is left to the op (the leaf is not planned; it is quantized per call).
      if spec.tile is not None:
        return None
      if isinstance(spec.axis, (int, tuple)):
        axes = spec.axis if isinstance(spec.axis, tuple) else (spec.axis,)
        mapped = tuple(perm[a % len(perm)] for a in axes)
        spec = spec.replace(axis=mapped if isinstance(spec.axis, tuple) else mapped[0])
    return _rules.plan_weight(spec, shape, "dot_general",
                              contracting=tuple(contract), batch=tuple(batch),
                              compute_dtype=eqn.invars[pos].aval.dtype)

  def quantize_params(self, params, *args, donate: bool = False,
                      on_step: Optional[Callable] = None,
                      quant_scales: Optional[dict] = None,
                      quant_state: Optional[dict] = None, **kwargs):
    """``params`` with every planned weight replaced by a QWeight, leaf by leaf.

    Args:
      params, *args, **kwargs: as for the function (example arguments; only
        their shapes are used).
      donate: delete each float leaf once it is quantized (see
        ``lowbit_jax.quantize_params``).
      on_step: ``on_step(path, qweight)`` after each leaf.
      quant_scales: a QAT run's learned scales, or a PTQ result's
        (``real_mode_kwargs``): a planned weight with a ``weight_scale`` is
        stored with exactly that scale (and a two-level spec's under its
        ``weight_tensor_scale`` where given). Keep passing
        ``quant_scales`` to the real-mode function (activation scales and
        PACT clips act as static ranges there; weight scales of QWeights are
        not read).
      quant_state: a delayed-scaling run's amax histories: a planned weight
        with a ``weight_history`` is stored with the range it gives (the one
        fake mode quantized it with), not its current amax.

    Returns:
      The parameter pytree for mode ``"real"``.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        if isinstance(x, jax.Array) else x, params)
    plan = self.plan(abstract, *args, **kwargs)
    learned = tensor = None
    if quant_scales is not None:
      learned, tensor = {}, {}
      for path in plan:
        entry = quant_scales.get(path) or {}
        if entry.get("weight_scale") is not None:
          learned[path] = entry["weight_scale"]
        if entry.get("weight_tensor_scale") is not None:
          tensor[path] = entry["weight_tensor_scale"]
    histories = {}
    for path in plan:
      h = (quant_state or {}).get(path, {}).get("weight_history")
      rule = None if h is None else self._plan_rule(path, _RAGGED_KINDS + ("conv",))
      if rule is not None and rule.delayed:
        histories[path] = (rule, h)
    return _rules.quantize_params(params, plan, donate=donate, on_step=on_step,
                                  scales=learned, tensor_scales=tensor,
                                  histories=histories)

  def finalize_stats(self, quant_stats: dict) -> dict:
    """Observer states turned into ranges ``{"amax", "amin"}`` (done once).

    Static rules accept either; finalized ranges skip the observer's finalize
    (a histogram search for percentile/mse/kl) on every call.
    """
    items = []
    for key, st in quant_stats.items():
      site = self.config.sites.get(key)
      if site is None:
        raise ValueError(f"no site {key!r} was calibrated by this function; known: "
                         f"{sorted(self.config.sites)}")
      items.append((key, site, st))
    return _rules.finalize_ranges(items)


def quantize_function(fn: Callable, rules, mode: str = "fake", *,
                      strict: bool = False, use_kernel: str = "auto"
                      ) -> QuantizedFunction:
  """Quantizes the weight matmuls and convolutions of any JAX function.

  >>> qf = lowbit_jax.quantize_function(apply, [QuantRule(".*", weight="int4")])
  >>> y = qf(params, x)              # same signature as apply(params, x)
  >>> qf.unused_rules()              # [] if every rule matched something

  Args:
    fn: ``fn(params, *args, **kwargs)`` with the parameter pytree first.
    rules: a QuantRule or a sequence of them, matched on parameter paths
      (pytree keys joined by ``/``) and their parent paths; first match wins.
    mode: "fake" (simulated, differentiable), "real" (quantized weights: pass
      ``qf.quantize_params(params, *args)``, or float params to quantize them on
      every call) or "calibrate" (returns ``(output, quant_stats)``).
    strict: raise after a call if a rule matched nothing.
    use_kernel: real-mode kernel dispatch ("auto", "never", "always").

  Returns:
    A ``QuantizedFunction`` with fn's signature (see its docstring).

  Raises:
    ValueError: an unknown mode; at call time, a static rule without
      statistics, or (strict) an unused rule.
  """
  return QuantizedFunction(fn, rules, mode, strict=strict, use_kernel=use_kernel)


__all__ = ["quantize_function", "QuantizedFunction"]
