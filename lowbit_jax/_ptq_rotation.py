"""QuaRot and SpinQuant on every front end: rotate the whole model, check it, round.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated
LLMs") and SpinQuant (Liu et al. 2024, "SpinQuant: LLM Quantization with
Learned Rotations") rotate a pre-norm model's residual stream: the stream is
found in the jaxpr of the model as a function of its parameter tree
(``_residual``), every RMS norm gain is fused into the layers that read it,
one orthogonal ``Q`` (a randomized Hadamard, or SpinQuant's learned one) is
folded into every reader and writer, the kernels matching ``online`` are
pre-rotated for an online Hadamard of their input, and with ``heads`` a
per-head rotation is folded into each value/output pair
(``algorithms.rotate_model`` / ``spinquant_model``).

``rotate_checked`` does that on any ``fn(params, *args, **kwargs)`` and checks
the rotated float model (run with the online-Hadamard rules) against the
original on the first batch: the one rotation driver of ``ptq_params`` (every
front end, through ``_ptq_scaling.as_function``) and so of the Linen
``apply_ptq``. ``rotation_ptq`` then rounds every rule-matched weight of the
rotated model with GPTQ or RTN through ``ptq_params``'s per-site machinery,
the rules carrying the online Hadamards, so that the captured Hessians are of
the inputs each op really sees and real mode stores exactly those codes.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from lowbit_jax import _rules
from lowbit_jax.algorithms.rotation import rotate_model
from lowbit_jax.algorithms.spinquant import SpinQuantConfig, spinquant_model

METHODS = ("quarot", "spinquant")
_NAMES = {"quarot": "QuaRot", "spinquant": "SpinQuant"}
# A model computing in a 16-bit float dtype rounds rotated activations
# differently from the original ones, by a few of that dtype's epsilons
# relative to the largest output; a wrong fold changes the output by order one.
_LOW_PRECISION_ULPS = 8


def compute_eps(fn, params, args) -> float:
  """Machine epsilon of the lowest-precision float dtype any matmul of ``fn``
  takes, or of the dtype most of its float parameters are stored in (a bf16
  checkpoint computed in float32: the folded parameters are written back in
  bf16, so the fold's float change is bf16 rounding; one bf16 scalar in a
  float32 model does not widen the check)."""
  closed = jax.make_jaxpr(fn)(params, *args)
  sizes: dict = {}
  for leaf in jax.tree.leaves(params):
    dt = getattr(leaf, "dtype", None)
    if dt is not None and jnp.issubdtype(dt, jnp.floating):
      sizes[jnp.dtype(dt)] = sizes.get(jnp.dtype(dt), 0) + int(np.size(leaf))
  eps = float(jnp.finfo(max(sizes, key=sizes.get)).eps) if sizes else 0.0

  def walk(jaxpr):
    nonlocal eps
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated", "ragged_dot"):
        for v in eqn.invars:
          dt = getattr(getattr(v, "aval", None), "dtype", None)
          if dt is not None and jnp.issubdtype(dt, jnp.floating):
            eps = max(eps, float(jnp.finfo(dt).eps))
      for val in eqn.params.values():
        for sub in (val if isinstance(val, (tuple, list)) else (val,)):
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub)

  walk(closed.jaxpr)
  return eps


def float_check_rtol(fn, params, args, rtol: float) -> tuple[float, str]:
  """``(tolerance, note)`` for checking that a fold or rotation keeps ``fn``'s
  float output: ``rtol``, widened to ``_LOW_PRECISION_ULPS`` epsilons of the
  model's compute dtype where it is narrower than float32 (a float32 model
  keeps the ``rtol`` asked for, 0 included); ``note`` says so for errors."""
  eps = compute_eps(fn, params, args)
  if eps <= float(jnp.finfo(jnp.float32).eps):
    return rtol, ""
  tol = max(rtol, _LOW_PRECISION_ULPS * eps)
  return tol, (f" (widened from fold_rtol={rtol} for the model's {eps:.3g}-epsilon "
               "compute dtype)" if tol > rtol else "")


def quantizer_for(front: str) -> Callable:
  """``quantize(fn, rules)``: the front end's fake-mode quantizer of a function
  of the parameter tree (Linen: its interceptor; otherwise ``quantize_function``)."""
  if front == "linen":
    from lowbit_jax.flax import quantize_linen   # pylint: disable=g-import-not-at-top
    return lambda f, r: quantize_linen(r)(f)
  from lowbit_jax._function import quantize_function   # pylint: disable=g-import-not-at-top
  return quantize_function


def rotate_checked(fn: Callable, params: Any, batches: Sequence[Any], method: str, *,
                   rules, seed: int, online: Optional[str], heads: Optional[tuple],
                   config: Optional[SpinQuantConfig], rtol: float,
                   quantize: Callable) -> tuple:
  """QuaRot's or SpinQuant's rotation of ``fn``, checked against its float output.

  Args:
    fn: the model as ``fn(params, *args, **kwargs)``.
    params: its parameter tree (float).
    batches: calibration batches (a tuple/list: positional arguments, a dict:
      keyword arguments, else one argument); the check runs on the first,
      SpinQuant learns on all (positional arguments only).
    method: "quarot" or "spinquant".
    rules: the rules SpinQuant's quantized loss runs with (unused by QuaRot).
    seed: the random Hadamard's seed (SpinQuant: its default config's).
    online, heads: as ``algorithms.rotate_model``.
    config: SpinQuant's ``SpinQuantConfig`` (None: ``SpinQuantConfig(seed=seed)``).
    rtol: the largest change of the float output relative to its largest
      entry, widened to a few epsilons of a 16-bit compute dtype.
    quantize: ``quantize(fn, rules)``, the front end's fake-mode quantizer.

  Returns:
    ``(new_params, RotatedModel, history)``; ``history`` is SpinQuant's
    (``spinquant_model``), None for QuaRot.

  Raises:
    ValueError: the rotation changes the float output (the model's structure
      is not what the rotation assumes), everything ``rotate_model`` raises
      (naming the layer whose use of the stream it cannot rotate), or
      SpinQuant batches of keyword arguments.
  """
  from lowbit_jax import _ptq   # pylint: disable=g-import-not-at-top
  from lowbit_jax._ptq_scaling import _close   # pylint: disable=g-import-not-at-top,protected-access
  split = [_ptq._split_batch(b) for b in batches]   # pylint: disable=protected-access
  args, kwargs = split[0]
  if method == "spinquant" and any(kw for _, kw in split):
    raise ValueError("method='spinquant' needs calibration batches of positional "
                     "arguments (a tuple or one array), not keyword arguments")

  def bound(p, *a):
    return fn(p, *a, **kwargs)

  history = None
  with jax.default_matmul_precision("float32"):
    ref = jax.jit(bound)(params, *args)
    if method == "quarot":
      new, rotated = rotate_model(bound, params, *args, key=jax.random.key(seed),
                                  online=online, heads=heads)
    else:
      new, rotated, history = spinquant_model(
          bound, params, [a for a, _ in split], rules,
          config=config or SpinQuantConfig(seed=seed), online=online, heads=heads,
          quantize=quantize)
    out = jax.jit(quantize(bound, rotated.rules()))(new, *args)
  tol, note = float_check_rtol(bound, params, args, rtol)
  if not _close(ref, out, tol):
    hint = ("; with heads=, a value projection's bias must be added to its "
            "kernel's output before the heads are split (x @ w_v + b_v), where "
            "the fold finds it" if heads is not None else "")
    raise ValueError(
        f"the {_NAMES[method]} rotation changed the float model's output beyond "
        f"rtol={tol}{note}; the model's structure is not what the rotation assumes "
        f"(report this model){hint}")
  return new, rotated, history


def _by_path(tree) -> dict:
  return {_rules.path_str(kp): v for kp, v in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=_rules.is_qarray)[0]}


def rotation_ptq(model, params, batches: list, rules, *, front: str, method: str,
                 quantizer: str, seed: int, online: Optional[str],
                 heads: Optional[tuple], config: Optional[SpinQuantConfig],
                 fold_rtol: float, token_mask: Optional[Callable], blocksize: int,
                 percdamp: float, act_order: bool):
  """``ptq_params``'s "quarot" / "spinquant": rotate, check, then round.

  The model is rotated as a function of its parameter tree
  (``rotate_checked``), the rotated parameters written back in the front
  end's structure (an NNX model: into a clone, the model's own Params being
  updated only once the rounding is done too), and every weight site the
  rules match rounded by ``ptq_params(method=quantizer)`` under
  ``RotatedModel.rules(rules)``.

  Args:
    model, params, batches, rules, front: as ``ptq_params`` has them.
    method: "quarot" or "spinquant".
    quantizer: "rtn" or "gptq".
    seed, online, heads, config, fold_rtol: the rotation's (``rotate_checked``).
    token_mask, blocksize, percdamp, act_order: the rounding's (``ptq_params``).

  Returns:
    A ``PTQResult`` whose ``rules`` are those inference runs with; its report
    adds ``"quantizer"``, ``"rotation"`` (the ``RotatedModel``) and, for
    SpinQuant, ``"spinquant"`` (the learning history).
  """
  from lowbit_jax import _ptq, _ptq_scaling   # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  base = rules.rules if isinstance(rules, _rules.QuantConfig) else rules
  fn, tree = _ptq_scaling.as_function(model, params, front)
  new, rotated, history = rotate_checked(
      fn, tree, batches, method, rules=base, seed=seed, online=online, heads=heads,
      config=config, rtol=fold_rtol, quantize=quantizer_for(front))
  target = model
  if front == "nnx":
    from flax import nnx   # pylint: disable=g-import-not-at-top
    target = nnx.clone(model)
  write_back = _ptq._write_back   # pylint: disable=protected-access
  rotated_params = write_back(target, params, front, _by_path(new))
  run_rules = rotated.rules(base)
  res = _ptq.ptq_params(target, None if front == "nnx" else rotated_params, batches,
                        run_rules, method=quantizer, token_mask=token_mask,
                        **({"blocksize": blocksize, "percdamp": percdamp,
                            "act_order": act_order} if quantizer == "gptq" else {}))
  out = res.params
  if front == "nnx":
    out = write_back(model, None, front, _by_path(nnx.to_pure_dict(out)))
  report = {**res.report, "method": method, "quantizer": quantizer,
            "rotation": rotated, "seconds": time.perf_counter() - t0}
  if history is not None:
    report["spinquant"] = history
  return res._replace(params=out, report=report, rules=run_rules)
