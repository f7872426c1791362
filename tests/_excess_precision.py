"""Runs a function as XLA on a GPU computes it, on CPU: convert pairs dropped.

XLA on a GPU allows excess precision (``xla_allow_excess_precision``, on by
default): a float value narrowed (float32 -> bf16, float16 or a float8) and
converted straight on (back to its own type, or to another float type) is
not rounded to the narrow type there (the SimplifyFPConversions pass turns
A -> narrow -> C into A -> C). XLA's CPU backend keeps the
pair, so CPU tests cannot see a result that relied on it. ``as_gpu_xla(fn)``
evaluates ``fn``'s jaxpr on the current backend with every such pair
replaced by the unrounded value, across jit and custom_jvp/custom_vjp
boundaries (which XLA inlines before the pass); a scan, cond or while body
is bound as it is (no pair inside one is dropped). Narrow values used any
other way (stored, returned, fed to arithmetic) are the real narrow values,
as on the GPU. Not modelled: XLA on a GPU also computes bf16 / float16
elementwise arithmetic in float32 inside a fusion without rounding between
operations (the same excess precision); a test that needs it narrows with
an explicit convert.
"""
from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp

_INLINED = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "remat",
            "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def _narrower_float(src, dst) -> bool:
  src, dst = jnp.dtype(src), jnp.dtype(dst)
  return (jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(dst, jnp.floating)
          and dst.itemsize < src.itemsize)


def _inner(eqn):
  for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(k)
    if j is not None:
      return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())
  return None


class Counter:
  """How many convert pairs the last evaluation dropped."""
  dropped = 0


def _eval(jaxpr, consts, args, counter, arg_wide=None):
  """(outputs, their unrounded values or None) of ``jaxpr``."""
  env = {}    # var -> value
  wide = {}   # var -> the unrounded value a narrowing convert made it from

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, w in zip(jaxpr.invars, args, arg_wide or [None] * len(args)):
    env[v] = a
    if w is not None:
      wide[v] = w
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    inner = _inner(eqn) if name in _INLINED else None
    if inner is not None:
      n_in = len(inner[0].invars)
      ins = eqn.invars[len(eqn.invars) - n_in:]
      outs, out_wide = _eval(
          inner[0], inner[1], invals[len(invals) - n_in:], counter,
          [None if isinstance(v, jex.core.Literal) else wide.get(v) for v in ins])
      for v, w in zip(eqn.outvars, out_wide):
        if w is not None:
          wide[v] = w
    elif name == "convert_element_type":
      x, = invals
      src_var = eqn.invars[0]
      new = jnp.dtype(eqn.params["new_dtype"])
      orig = (None if isinstance(src_var, jex.core.Literal) else wide.get(src_var))
      if orig is not None and jnp.issubdtype(new, jnp.floating):
        # A -> narrow -> C becomes A -> C (C = A: the value itself)
        outs = [orig if jnp.dtype(orig.dtype) == new
                else eqn.primitive.bind(orig, **eqn.params)]
        counter.dropped += 1
        wide[eqn.outvars[0]] = orig
      else:
        outs = [eqn.primitive.bind(x, **eqn.params)]
        if _narrower_float(x.dtype, new):
          wide[eqn.outvars[0]] = x
    else:
      bp = eqn.primitive.get_bind_params(eqn.params)
      subfuns, params = bp if isinstance(bp, tuple) else ((), bp)
      out = eqn.primitive.bind(*subfuns, *invals, **params)
      outs = list(out) if eqn.primitive.multiple_results else [out]
    for v, o in zip(eqn.outvars, outs):
      if not isinstance(v, jex.core.DropVar):
        env[v] = o
  return ([read(v) for v in jaxpr.outvars],
          [None if isinstance(v, jex.core.Literal) else wide.get(v)
           for v in jaxpr.outvars])


def as_gpu_xla(fn, counter: Counter | None = None):
  """``fn`` evaluated with XLA-on-GPU's convert-pair elision (see module)."""
  counter = counter if counter is not None else Counter()

  def run(*args):
    closed, out_tree = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = jax.tree_util.tree_leaves(args)
    outs, _ = _eval(closed.jaxpr, closed.consts, flat, counter)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_tree), outs)
  return run
