"""Where a per-input-channel scaling folds exactly, found from a model's jaxpr.

AWQ (Lin et al. 2024) and SmoothQuant (Xiao et al. 2023) rescale a linear
layer's input, ``x @ W == (x / s) @ (diag(s) W)``, and need the division by
``s`` folded into whatever produced ``x`` so the float model is unchanged.
``find_scaling_folds(fn, params, *args)`` traces ``fn(params, *args)`` to a
jaxpr (as ``quantize_function`` and the QuaRot stream finder do) and follows
every value from two kinds of *producers*:

* a linear layer: a ``dot_general`` (or conv) of a parameter kernel, whose
  output features are the kernel's free axes (``W[:, j] / s_j`` and a bias
  ``b_j / s_j`` added to its output);
* a gain: a ``mul`` by a 1-d parameter along one axis (an RMSNorm/LayerNorm
  scale, ``g_j / s_j``; a LayerNorm bias added after it, ``b_j / s_j``).

A value derived from a producer's output stays *scaled by* ``1/s`` through
operations that commute with a per-feature scaling, each feature's scale
following the value's axes as data (per axis, mixed-radix ``(size, stride)``
digits of the feature index): views (convert, reshape, transpose, broadcast),
``neg``, ``mul``/``div`` by a value independent of the producer (e.g.
``act(gate) * up``), the addition of a bias parameter or of another value
scaled the same way, and a ``dot_general`` with a value independent of the
producer that contracts none of the features (attention probabilities times
values, heads kept or grouped as in GQA). Where such a value meets a matmul or
conv with a parameter that contracts all of its features, that kernel is a
*reader*: its input rows take ``s``. Anything else the scaled value meets (a
nonlinearity, a residual addition, the model's output, a matmul that contracts
the features against something that is not a parameter, a parameter used
twice) makes the producer unfoldable, with the primitive and module named; its
readers are reported skipped with that reason.

MoE experts: a ``gather`` that picks whole rows (the tokens routed to the
experts) passes the scaling on, and a grouped matmul
(``jax.lax.ragged_dot(x [M, K], w [E, K, N], group_sizes)``) whose input
features are scaled is a reader: its kernel's rows ``w[:, k, :]`` take
``s_k`` for every expert (one scale per input channel shared by all experts,
the only fold that is exact when every expert reads rows of the same
producer). A grouped matmul is never a producer (each expert's output would
need its own scaling).

An orthogonal ``R`` over the features (the per-layer rotation) folds in a
subset of those places: into a linear producer (never a gain) whose output
reaches its readers only through views, zero padding, negation and bias or
same-rotated additions (``ScalingFold.rotation_why`` says why not otherwise);
``rotate_param`` applies it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax._residual import (_CALLS, _RAGGED, _SAME, _VDict, _axis_map_reshape,
                                  _ragged_dims, _walk_top, _Literal, param_path)

_VIEWS = frozenset(_SAME - {"neg"}) | {"reshape", "transpose", "broadcast_in_dim"}
_HIGHER = frozenset({"scan", "while", "cond"}) | _CALLS


@dataclasses.dataclass(frozen=True)
class ScalingFold:
  """One producer whose output features can take ``1/s`` exactly, and its readers.

  A *layout* gives, per parameter axis, the mixed-radix digits ``((size,
  stride), ...)`` of the feature index (``scaling_for`` turns it into the array
  of each element's feature): ``s`` of shape ``[size]`` becomes
  ``s[feature(element)]``.

  Attributes:
    producer: the producing parameter's path (a kernel or a gain).
    kind: "linear" or "gain".
    size: the number of features (the length of ``s``).
    divide: ``(parameter path, layout)`` pairs divided by ``s`` (the producer,
      its bias).
    readers: ``(kernel path, layout)`` pairs multiplied by ``s`` along their
      input rows.
    rotation_why: None if an orthogonal ``R`` over the features folds too
      (``x -> x R``: a linear producer whose output reaches its readers only
      through views, zero padding, negation and bias or same-scaled
      additions; parameters ``P -> P R`` over their features, see
      ``rotate_param``), else why not.
  """
  producer: str
  kind: str
  size: int
  divide: tuple
  readers: tuple
  rotation_why: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class FoldPlan:
  """What ``find_scaling_folds`` returns.

  Attributes:
    folds: producer path -> ``ScalingFold`` (foldable producers with readers).
    reader_of: kernel path -> the producer path whose fold it reads.
    skipped: kernel path -> why its input has no exact scaling fold.
  """
  folds: dict
  reader_of: dict
  skipped: dict


def _zero(shape) -> tuple:
  return tuple(((n, 0),) if n > 1 else () for n in shape)


def _nonzero(ax) -> bool:
  return any(st != 0 for _, st in ax)


def _regroup(layout, shape) -> Optional[tuple]:
  """The layout after a row-major reshape to ``shape`` (None: not representable)."""
  subs = [d for ax in layout for d in ax if d[0] > 1]
  out = []
  for n in shape:
    ax, need = [], n
    while need > 1:
      if not subs:
        return None
      size, st = subs.pop(0)
      if size <= need:
        if need % size:
          return None
        ax.append((size, st))
        need //= size
      else:
        if size % need:
          return None
        ax.append((need, st * (size // need)))
        subs.insert(0, (size // need, st))
        need = 1
    out.append(tuple(ax))
  return None if subs else tuple(out)


def feature_index(shape, layout) -> np.ndarray:
  """The feature index of every element of an array of ``shape`` under ``layout``."""
  total = np.zeros(tuple(shape), np.int64)
  for a, (n, ax) in enumerate(zip(shape, layout)):
    v = np.zeros(n, np.int64)
    inner = n
    for size, st in ax:
      inner //= size
      v += (np.arange(n) // inner) % size * st
    total = total + v.reshape((1,) * a + (n,) + (1,) * (len(shape) - a - 1))
  return total


def scaling_for(shape, layout, s: jax.Array) -> jax.Array:
  """``s`` laid out over an array of ``shape`` (``s[feature(element)]``)."""
  return jnp.asarray(s)[feature_index(shape, layout)]


class _Src:
  def __init__(self, path, kind, size, divide):
    self.path, self.kind, self.size = path, kind, size
    self.divide, self.readers, self.why = [divide], [], None
    self.rot_why = ("a rotation does not fold into a norm's elementwise gain"
                    if kind == "gain" else None)


def find_scaling_folds(fn: Callable, params: Any, *args, **kwargs) -> FoldPlan:
  """Traces ``fn(params, *args, **kwargs)`` and finds every exact scaling fold.

  Args:
    fn: the model as a function of its parameter pytree.
    params: the parameter pytree (its paths as rules see them).
    *args, **kwargs: example inputs (shapes matter).

  Returns:
    A ``FoldPlan``: the foldable producers with their readers, and for every
    kernel read through something a scaling does not commute with, the reason.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [param_path(kp) for kp, _ in flat]
  closed = jax.make_jaxpr(lambda p: fn(p, *args, **kwargs))(params)
  jaxpr = closed.jaxpr
  pview = _VDict()   # var -> (param path, view axis -> param axis or None)
  pshape = {}
  for v, p, (_, leaf) in zip(jaxpr.invars, paths, flat):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      pview[v] = (p, tuple(range(np.ndim(leaf))))
      pshape[p] = tuple(np.shape(leaf))
  dep = _VDict()     # var -> {producer: layout or None}
  srcs: dict = {}
  uses: dict = {}
  read_by: dict = {}   # kernel path -> producer
  skipped: dict = {}
  last_param = ["(none)"]
  unread: dict = {}   # kernel path -> (its input var, the op) of every matmul kernel
  zeros = set()       # vars known to be all zeros
  blocked = _VDict()  # var -> why the scalings that reached it stopped there
  killed: list = []   # (producer, why) made unfoldable by the current equation

  def is_zero(v):
    if isinstance(v, _Literal):
      return bool(np.all(np.asarray(v.val) == 0))
    return v in zeros

  def where(eqn):
    ns = str(getattr(getattr(eqn, "source_info", None), "name_stack", "") or "")
    return (f" in {ns!r}" if ns else "") + f" (after parameter {last_param[0]!r})"

  def bad(sid, why):
    killed.append((sid, why))
    if srcs[sid].why is None:
      srcs[sid].why = why

  def deps(v):
    return {} if isinstance(v, _Literal) else dep.get(v, {})

  def to_param(view, layout_view):
    """A view's layout as its parameter's layout (None: a merged axis carries it)."""
    path, amap = pview[view]
    out = list(_zero(pshape[path]))
    for i, ax in enumerate(layout_view):
      if not _nonzero(ax):
        continue
      if amap[i] is None:
        return None
      out[amap[i]] = ax
    return tuple(out)

  def new_source(path, kind, size, layout_param, eqn):
    if path in srcs:
      bad(path, f"parameter {path!r} is used by a second operation{where(eqn)}")
      return False
    srcs[path] = _Src(path, kind, size, (path, layout_param))
    return True

  def no_rot(sid, why, eqn):
    if srcs[sid].rot_why is None:
      srcs[sid].rot_why = f"{why}{where(eqn)}"

  def poison(eqn, d, why):
    for sid, lay in d.items():
      if lay is not None:
        bad(sid, f"its output reaches `{eqn.primitive.name}`{where(eqn)}: {why}")

  def merged(*ds):
    out = {}
    for d in ds:
      for k, lay in d.items():
        out[k] = lay if k not in out or out[k] == lay else None
    return out

  def reader(eqn, sid, w, lay_w):
    """Records kernel view ``w`` (layout over its view axes) as a reader of ``sid``."""
    path = pview[w][0]
    if srcs[sid].why is not None:   # already unfoldable: not a reader of it
      return
    lay_p = to_param(w, lay_w)
    if lay_p is None:
      bad(sid, f"kernel {path!r} reaches its op through a reshape that merges the "
          "axes that read the scaled features")
      return
    srcs[sid].readers.append((path, lay_p))
    if path in read_by and read_by[path] != sid:
      bad(sid, f"kernel {path!r} is read a second time{where(eqn)}")
    read_by[path] = sid

  def _visit(eqn, ins, outs, name, out):
    """Follows the scalings through one equation (fills ``dep``, ``srcs``)."""
    for v in ins:
      if v in pview:
        last_param[0] = pview[v][0]
    # Parameter views, and the uses of each parameter.
    if name in _VIEWS and ins[0] in pview:
      path, amap = pview[ins[0]]
      if name == "reshape":
        amap = _axis_map_reshape(ins[0].aval.shape, out.aval.shape, amap)
      elif name == "transpose":
        amap = tuple(amap[i] for i in eqn.params["permutation"])
      elif name == "broadcast_in_dim":
        m = [None] * len(out.aval.shape)
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
          if ins[0].aval.shape[i] == out.aval.shape[d]:
            m[d] = amap[i]
        amap = tuple(m)
      pview[out] = (path, amap)
      return
    for v in ins:
      if v in pview:
        uses[pview[v][0]] = uses.get(pview[v][0], 0) + 1
    ds = [deps(v) for v in ins]
    if not any(ds) and name not in ("dot_general", "conv_general_dilated", "mul"):
      return
    if name in _SAME or name == "neg":
      dep[out] = dict(ds[0])
    elif name == "reshape":
      d = {}
      for sid, lay in ds[0].items():
        d[sid] = None if lay is None else _regroup(lay, out.aval.shape)
        if lay is not None and d[sid] is None:
          bad(sid, f"a reshape{where(eqn)} splits its features unevenly")
        elif d[sid] is not None and any(_nonzero(ax) and any(
            st == 0 and n > 1 for n, st in ax) for ax in d[sid]):
          no_rot(sid, "a reshape merges repeated copies of the features (GQA)", eqn)
      dep[out] = d
    elif name == "transpose":
      perm = eqn.params["permutation"]
      dep[out] = {k: None if lay is None else tuple(lay[i] for i in perm)
                  for k, lay in ds[0].items()}
    elif name == "squeeze":
      dims = set(a % ins[0].aval.ndim for a in eqn.params["dimensions"])
      dep[out] = {k: None if lay is None else tuple(
          ax for i, ax in enumerate(lay) if i not in dims) for k, lay in ds[0].items()}
    elif name == "broadcast_in_dim":
      bd = eqn.params["broadcast_dimensions"]
      shp = out.aval.shape
      d = {}
      for k, lay in ds[0].items():
        if lay is None:
          d[k] = None
          continue
        new = list(_zero(shp))
        for i, dd in enumerate(bd):
          if ins[0].aval.shape[i] == shp[dd]:
            new[dd] = lay[i]
        d[k] = tuple(new)
      dep[out] = d
    elif name == "pad":
      cfg = eqn.params["padding_config"]
      zero_pad = is_zero(ins[1])
      d = {}
      for k, lay in ds[0].items():
        if lay is None:
          d[k] = None
        elif zero_pad and not deps(ins[1]) and all(
            not _nonzero(ax) or tuple(c) == (0, 0, 0) for ax, c in zip(lay, cfg)):
          d[k] = tuple(ax if _nonzero(ax) else _zero((n,))[0]
                       for ax, n in zip(lay, out.aval.shape))
        else:
          d[k] = None
          bad(k, f"a pad{where(eqn)} that is not zero padding of non-feature axes")
      dep[out] = d
    elif name in ("mul", "div"):
      a, b = ins
      da, db = ds
      d = {}
      for k in dict.fromkeys([*da, *db]):
        if k in da and k in db:
          d[k] = None
          poison(eqn, {k: da[k]}, "it is multiplied by a value scaled with it")
        elif k in db and name == "div":
          d[k] = None
          poison(eqn, {k: db[k]}, "something is divided by it")
        else:
          d[k] = da.get(k, db.get(k))
          other = b if k in da else a
          if not isinstance(other, _Literal) and other.aval.shape:
            no_rot(k, "an elementwise product does not commute with a rotation", eqn)
      # A 1-d parameter times a value: a gain (RMSNorm/LayerNorm scale).
      for g, o in ((b, a), (a, b)):
        if name != "mul" or g not in pview or deps(g) or o in pview:
          continue
        path, amap = pview[g]
        hits = [i for i, ax in enumerate(amap) if ax is not None]
        if len(pshape[path]) == 1 and len(hits) == 1 and pshape[path][0] > 1:
          lay = list(_zero(out.aval.shape))
          lay[hits[0]] = ((pshape[path][0], 1),)
          if new_source(path, "gain", pshape[path][0],
                        (((pshape[path][0], 1),),), eqn):
            d[path] = tuple(lay)
          break
      dep[out] = d
    elif name in ("add", "sub", "add_any"):
      a, b = ins
      da, db = ds
      d = {}
      for k in dict.fromkeys([*da, *db]):
        la, lb_ = da.get(k, "absent"), db.get(k, "absent")
        if la == lb_:
          d[k] = la
          continue
        if la is None or lb_ is None:
          d[k] = None
          continue
        lay, other = (la, b) if lb_ == "absent" else (lb_, a)
        if la != "absent" and lb_ != "absent":
          d[k] = None
          bad(k, f"two differently scaled copies of its output are added{where(eqn)}")
          continue
        if isinstance(other, _Literal) and np.all(np.asarray(other.val) == 0):
          d[k] = lay
        elif other in pview and not deps(other):
          lay_p = to_param(other, lay)
          if lay_p is None:
            d[k] = None
            bad(k, f"a parameter added to its output{where(eqn)} merges its features")
          else:
            srcs[k].divide.append((pview[other][0], lay_p))
            d[k] = lay
        else:
          d[k] = None
          bad(k, f"its output is added to a value that does not scale with it (a "
              f"residual connection?){where(eqn)}")
      dep[out] = d
    elif name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      a, b = ins
      da, db = ds
      for w, x in ((b, a), (a, b)):
        if w in pview and not deps(w):
          unread.setdefault(pview[w][0], (x, eqn))
      nfree_a = [i for i in range(a.aval.ndim) if i not in lc and i not in lb]
      nfree_b = [i for i in range(b.aval.ndim) if i not in rc and i not in rb]
      d = {}
      for k in dict.fromkeys([*da, *db]):
        if k in da and k in db:
          d[k] = None
          poison(eqn, {k: da[k]}, "a product of two values scaled with it")
          continue
        x, w, lay = (a, b, da[k]) if k in da else (b, a, db[k])
        xc, xb, wc = (lc, lb, rc) if x is a else (rc, rb, lc)
        if lay is None:
          d[k] = None
          continue
        hot = [i for i, ax in enumerate(lay) if _nonzero(ax)]
        if hot and all(i in xc for i in hot):
          if w in pview and not deps(w):
            lay_w = list(_zero(w.aval.shape))
            for i, j in zip(xc, wc):
              lay_w[j] = lay[i]
            reader(eqn, k, w, lay_w)
          else:
            bad(k, f"its output is contracted against a value that is not a "
                f"parameter{where(eqn)}")
          continue
        if any(i in xc for i in hot):
          d[k] = None
          bad(k, f"a matmul{where(eqn)} contracts only part of its features")
          continue
        no_rot(k, "a matmul that keeps the features (attention's p @ v) commutes "
               "with a rotation only within each of its batch slices", eqn)
        zb = _zero(b.aval.shape) if x is a else _zero(a.aval.shape)
        if x is a:
          d[k] = (tuple(lay[i] for i in lb) + tuple(lay[i] for i in nfree_a)
                  + tuple(zb[i] for i in nfree_b))
        else:
          d[k] = (tuple(lay[i] for i in rb) + tuple(zb[i] for i in nfree_a)
                  + tuple(lay[i] for i in nfree_b))
      # A matmul of a parameter kernel: a linear producer.
      for w, free, wb, first in ((b, nfree_b, rb, False), (a, nfree_a, lb, True)):
        other = a if w is b else b
        if not (w in pview and not deps(w) and other not in pview and not wb and free):
          continue
        path, amap = pview[w]
        sizes = [w.aval.shape[i] for i in free]
        n = math.prod(sizes)
        strides = [math.prod(sizes[j + 1:]) for j in range(len(sizes))]
        lay_w = list(_zero(w.aval.shape))
        for i, sz, st in zip(free, sizes, strides):
          lay_w[i] = ((sz, st),) if sz > 1 else ()
        lay_p = to_param(w, lay_w)
        nb = len(lb)
        pos = (range(nb, nb + len(nfree_a)) if first else
               range(nb + len(nfree_a), out.aval.ndim))
        lay_o = list(_zero(out.aval.shape))
        for p_, sz, st in zip(pos, sizes, strides):
          lay_o[p_] = ((sz, st),) if sz > 1 else ()
        if n > 1 and new_source(path, "linear", n, lay_p, eqn):
          if lay_p is None:
            bad(path, "its kernel reaches the matmul through a reshape")
          d[path] = tuple(lay_o)
        break
      dep[out] = d
    elif name == "conv_general_dilated":
      x, w = ins
      if w in pview and not deps(w):
        unread.setdefault(pview[w][0], (x, eqn))
      dn = eqn.params["dimension_numbers"]
      d = {}
      for k, lay in deps(x).items():
        if lay is None:
          continue
        hot = [i for i, ax in enumerate(lay) if _nonzero(ax)]
        if (hot == [dn.lhs_spec[1]] and w in pview and not deps(w)
            and eqn.params["feature_group_count"] == 1
            and eqn.params["batch_group_count"] == 1):
          lay_w = list(_zero(w.aval.shape))
          lay_w[dn.rhs_spec[1]] = lay[dn.lhs_spec[1]]
          reader(eqn, k, w, lay_w)
        else:
          bad(k, f"it reaches a convolution{where(eqn)} other than as its input "
              "features with a parameter kernel")
      if deps(w):
        poison(eqn, deps(w), "it is a convolution's kernel")
      if w in pview and not deps(w) and x not in pview:
        path, _ = pview[w]
        cout = w.aval.shape[dn.rhs_spec[0]]
        lay_w = list(_zero(w.aval.shape))
        lay_w[dn.rhs_spec[0]] = ((cout, 1),)
        lay_p = to_param(w, lay_w)
        lay_o = list(_zero(out.aval.shape))
        lay_o[dn.out_spec[1]] = ((cout, 1),)
        if cout > 1 and new_source(path, "linear", cout, lay_p, eqn):
          if lay_p is None:
            bad(path, "its kernel reaches the convolution through a reshape")
          if (eqn.params["feature_group_count"] != 1
              or eqn.params["batch_group_count"] != 1):
            # Each output channel reads its own group's inputs: scaling an
            # output channel folds, mixing channels (a rotation) does not.
            no_rot(path, "a grouped or depthwise convolution's output channels "
                   "each read only their own group's inputs", eqn)
          d[path] = tuple(lay_o)
      dep[out] = d
    elif name == "gather" and not deps(ins[1]):
      # Rows picked by index (MoE: the tokens routed to the experts): the
      # features ride along when every feature axis is kept whole.
      gdn, sizes, opnd = eqn.params["dimension_numbers"], eqn.params["slice_sizes"], ins[0]
      drop = set(gdn.collapsed_slice_dims) | set(gdn.operand_batching_dims)
      kept = [i for i in range(opnd.aval.ndim) if i not in drop]
      d = {}
      for k, lay in ds[0].items():
        hot = [] if lay is None else [i for i, ax in enumerate(lay) if _nonzero(ax)]
        if lay is not None and all(i in kept and i not in gdn.start_index_map
                                   and sizes[i] == opnd.aval.shape[i] for i in hot):
          new = list(_zero(out.aval.shape))
          for i, od in zip(kept, gdn.offset_dims):
            new[od] = lay[i]
          d[k] = tuple(new)
        else:
          d[k] = None
          if lay is not None:
            bad(k, f"a gather{where(eqn)} that selects among its features")
      dep[out] = d
    elif name in _RAGGED:
      # A grouped matmul (MoE experts): an [E, K, N] kernel whose rows read
      # the scaled features is a reader (one scale per feature, all experts).
      x, w = ins[0], ins[1]
      rdn = eqn.params.get("ragged_dot_dimension_numbers")
      (rc, rb) = _ragged_dims(eqn)
      plain = (tuple(map(tuple, rc)) == ((1,), (1,)) and not any(rb)
               and x.aval.ndim == 2 and w.aval.ndim == 3
               and (rdn is None or (tuple(rdn.lhs_ragged_dimensions) == (0,)
                                    and tuple(rdn.rhs_group_dimensions) == (0,))))
      if w in pview and not deps(w):
        unread.setdefault(pview[w][0], (x, eqn))
      for k, lay in deps(x).items():
        if lay is None:
          continue
        hot = [i for i, ax in enumerate(lay) if _nonzero(ax)]
        if plain and hot == [1] and w in pview and not deps(w):
          lay_w = list(_zero(w.aval.shape))
          lay_w[1] = lay[1]
          reader(eqn, k, w, lay_w)
        else:
          bad(k, f"it reaches a grouped matmul{where(eqn)} other than as the input "
              "features of a parameter kernel")
      for v in ins[1:]:
        poison(eqn, deps(v), "it is a grouped matmul's kernel or group sizes")
      dep[out] = {}
      blocked[out] = (f"the grouped matmul{where(eqn)}: its experts' outputs would "
                      "each need their own scaling, which is not folded here")
    else:
      d = merged(*ds)
      poison(eqn, d, "an operation that does not commute with a per-channel "
             "scaling" + (" (a loop or branch body)" if name in _HIGHER else ""))
      for o in outs:
        dep[o] = {k: None for k in d}

  top_alias = {}
  for eqn, ins, outs in _walk_top(jaxpr, closed.consts, top_alias):
    name = eqn.primitive.name
    out = outs[0] if outs else None
    killed.clear()
    if name in _SAME | {"broadcast_in_dim"} and ins and is_zero(ins[0]):
      zeros.add(out)
    _visit(eqn, ins, outs, name, out)
    for o in outs:
      live = {k: lay for k, lay in dep.get(o, {}).items() if lay is not None}
      if live:
        dep[o] = live
        continue
      dep.pop(o, None)
      if killed:
        blocked[o] = f"{killed[0][0]!r}: {killed[0][1]}"
      else:
        why = next((blocked[v] for v in ins if v in blocked), None)
        if why is not None:
          blocked[o] = why

  for v in jaxpr.outvars:
    v = v if isinstance(v, _Literal) else top_alias.get(v, v)
    for k, lay in deps(v).items():
      if lay is not None:
        bad(k, "its scaled output is returned by the model")
  folds, reader_of = {}, {}
  for sid, src in srcs.items():
    if not src.readers:
      continue
    why = src.why
    if why is None:
      for path, lay in src.divide + src.readers:
        if uses.get(path, 0) != 1:
          why = f"parameter {path!r} is used by {uses.get(path, 0)} operations"
          break
        idx = np.unique(feature_index(pshape[path], lay))
        if not np.array_equal(idx, np.arange(src.size)):
          why = (f"parameter {path!r} does not cover the {src.size} features "
                 "exactly once per row")
          break
    if why is not None:
      for path, _ in src.readers:
        skipped[path] = f"its input's producer {sid!r} cannot take the scaling: {why}"
      continue
    rot_why = src.rot_why
    for path, lay in src.divide + src.readers:
      if rot_why is None and any(n > 1 and st == 0 for ax in lay if _nonzero(ax)
                                 for n, st in ax):
        rot_why = f"parameter {path!r} repeats features along an axis"
    folds[sid] = ScalingFold(sid, src.kind, src.size, tuple(src.divide),
                             tuple(src.readers), rot_why)
    for path, _ in src.readers:
      reader_of[path] = sid
  for path, (x, eqn) in unread.items():
    if path in reader_of or path in skipped:
      continue
    through = [k for k in deps(x) if srcs[k].why is not None]
    if through:
      skipped[path] = "; ".join(
          f"its input's producer {k!r} cannot take the scaling: {srcs[k].why}"
          for k in through)
    elif x in blocked:
      skipped[path] = (f"its input comes through an operation a per-channel "
                       f"scaling does not commute with ({blocked[x]})")
    else:
      skipped[path] = ("no linear layer or gain parameter produces its input (it "
                       "reads the embedding, the residual stream or a model input)")
  return FoldPlan(folds, reader_of, skipped)


def apply_scaling(tree: Any, fold: ScalingFold, s: jax.Array, get, put) -> Any:
  """``tree`` with ``fold``'s producer parameters divided by ``s`` and readers times it.

  Args:
    tree: the parameter pytree.
    fold: a ``ScalingFold``.
    s: ``[fold.size]`` positive scales.
    get, put: ``get(tree, path)`` and ``put(tree, {path: value})``.

  Returns:
    The new pytree (the float function unchanged in exact arithmetic).
  """
  s = np.asarray(s, np.float32)   # host arithmetic: no compile per shape
  new = {}
  for path, lay in fold.divide:
    w = get(tree, path)
    v = np.asarray(w, np.float32) / s[feature_index(w.shape, lay)]
    new[path] = jnp.asarray(v).astype(w.dtype)
  for path, lay in fold.readers:
    w = get(tree, path)
    v = np.asarray(w, np.float32) * s[feature_index(w.shape, lay)]
    new[path] = jnp.asarray(v).astype(w.dtype)
  return put(tree, new)


def rotate_param(w: jax.Array, layout, r: jax.Array) -> jax.Array:
  """``w`` with its features rotated, ``P -> P R`` in ``[other, feature]`` form.

  For a producer (``x @ W``, a bias) this is ``W R``; for a reader it is
  ``R^T W`` (its features are its rows), so the float function is unchanged
  when both are applied with the same orthogonal ``R``.

  Args:
    w: a parameter whose feature axes cover the features once per slice.
    layout: its layout (``ScalingFold.divide`` / ``readers``).
    r: ``[n, n]`` orthogonal.

  Returns:
    The rotated parameter (dtype kept).
  """
  hot = [i for i, ax in enumerate(layout) if _nonzero(ax)]
  cold = [i for i in range(w.ndim) if i not in hot]
  idx = feature_index(w.shape, layout).transpose(cold + hot)
  n = r.shape[0]
  idx = idx.reshape(-1, n)
  order = idx[0]
  t = np.asarray(w, np.float32).transpose(cold + hot).reshape(-1, n)
  inv = np.argsort(order)
  t = (t[:, inv] @ np.asarray(r, np.float32))[:, order]
  shape = [w.shape[i] for i in cold + hot]
  out = t.reshape(shape).transpose(np.argsort(cold + hot))
  return jnp.asarray(out).astype(w.dtype)


__all__ = ["ScalingFold", "FoldPlan", "find_scaling_folds", "apply_scaling", "rotate_param",
           "feature_index", "scaling_for"]
