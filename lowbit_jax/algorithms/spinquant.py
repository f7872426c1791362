"""SpinQuant: rotations learned on the orthogonal group with Cayley SGD.

Liu, Zhao, Fedorov, Soran, Choudhary, Krishnamoorthi, Chandra, Tian &
Blankevoort, "SpinQuant: LLM Quantization with Learned Rotations", 2024. A
rotation folded into a pre-norm model leaves the float function unchanged
(QuaRot, Ashkboos et al. 2024, ``lowbit_jax.algorithms.rotate_model``), but
rotations differ widely in how well the rotated weights and activations
quantize. SpinQuant starts from QuaRot's randomized Hadamard and optimises the
residual rotation ``R1`` (``[d, d]``, folded into every reader and writer of
the residual stream) and the per-head rotations ``R2`` (``[head_dim,
head_dim]`` per layer, folded into the value projection's output and the
output projection's input) to minimise the loss of the *quantized* network
(next-token cross entropy for a decoder LM, with straight-through gradients
through the fake-quantized weights and activations) on calibration data; the
weights themselves are held fixed. The online Hadamards (e.g. in front of the
down projection, ``R4``) stay fixed Hadamards, as in the paper.

The optimiser is Cayley SGD (Li, Fuxin & Todorovic, "Efficient Riemannian
Optimization on the Stiefel Manifold via the Cayley Transform", ICLR 2020),
as SpinQuant uses: ``cayley_sgd`` is an optax ``GradientTransformation``
whose updates keep every matrix orthogonal. ``spinquant_model`` learns the
rotations of any model given as a function of its parameters and folds them
with QuaRot's code path (``rotate_model(..., rotation=, head_rotations=)``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax._function import quantize_function
from lowbit_jax._residual import find_residual_stream
from lowbit_jax.algorithms.rotation import (head_pairs, random_hadamard, rotate_heads,
                                            rotate_model, rotate_residual)
from lowbit_jax.core._hadamard import hadamard

_HI = jax.lax.Precision.HIGHEST
LEARNABLE = ("residual", "heads")
LOSSES = ("next_token",)


def _mT(x):
  return jnp.swapaxes(x, -1, -2)


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HI)


class CayleySGDState(NamedTuple):
  """State of ``cayley_sgd``: the momentum (a tangent vector per matrix), a step count."""
  momentum: Any
  count: jax.Array


def cayley_step(x: jax.Array, m: jax.Array, lr: Union[float, jax.Array], *,
                max_angle: float = 0.5, eps: float = 1e-8) -> tuple:
  """One Cayley SGD step (Li et al. 2020, Algorithm 1) on orthogonal matrices.

  With the ambient momentum ``m`` (already ``beta m - grad``), forms the
  skew-symmetric ``W = W^ - W^T``, ``W^ = m x^T - 1/2 x (x^T m x^T)``, and
  moves along the Cayley curve ``Y(a) = (I - a/2 W)^-1 (I + a/2 W) x`` with the
  step ``a = min(lr, 2 max_angle / (||W||_F + eps))``. The Cayley transform is
  solved exactly (a linear solve, not the paper's fixed-point iteration), and
  one Newton-Schulz step ``Y (3 I - Y^T Y) / 2`` removes float32 rounding, so
  ``Y`` stays orthogonal to float precision over any number of steps.

  Args:
    x: ``[..., n, n]`` orthogonal matrices (leading axes: a batch of them).
    m: the momentum-accumulated negative gradient, same shape.
    lr: the learning rate (the largest step along the curve).
    max_angle: ``q`` of Li et al.: bounds the step to ``2 q / ||W||``.
    eps: avoids a division by zero at ``W = 0``.

  Returns:
    ``(y, tangent_momentum)``: the new matrices and ``W x`` (the momentum
    projected on the tangent space, carried to the next step).
  """
  x = x.astype(jnp.float32)
  m = m.astype(jnp.float32)
  w_hat = _mm(m, _mT(x)) - 0.5 * _mm(x, _mm(_mm(_mT(x), m), _mT(x)))
  w = w_hat - _mT(w_hat)
  tangent = _mm(w, x)
  norm = jnp.sqrt(jnp.sum(w * w, axis=(-2, -1), keepdims=True))
  a = jnp.minimum(lr, 2.0 * max_angle / (norm + eps))
  eye = jnp.eye(x.shape[-1], dtype=jnp.float32)
  y = jnp.linalg.solve(eye - 0.5 * a * w, x + 0.5 * a * _mm(w, x))
  y = 0.5 * _mm(y, 3.0 * eye - _mm(_mT(y), y))
  return y, tangent


def cayley_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.0, *,
               max_angle: float = 0.5, eps: float = 1e-8
               ) -> optax.GradientTransformation:
  """Cayley SGD with momentum on the orthogonal group (Li, Fuxin & Todorovic 2020).

  The optimiser SpinQuant (Liu et al. 2024) learns its rotations with. Every
  parameter leaf must be an orthogonal ``[..., n, n]`` matrix (leading axes
  batch independent matrices); ``optax.apply_updates(params, updates)`` then
  gives the next orthogonal iterate (``cayley_step``). ``update`` needs
  ``params``.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    momentum: ``beta`` of Li et al.'s momentum (0: plain Cayley SGD).
    max_angle: ``q``: each step is at most ``2 q / ||W||`` along the curve.
    eps: numerical guard of the step bound.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: at ``update``, params were not given or a leaf is not a
      (batch of) square matrix.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
  if max_angle <= 0:
    raise ValueError(f"max_angle must be > 0, got {max_angle!r}")

  def init_fn(params):
    for leaf in jax.tree.leaves(params):
      if leaf.ndim < 2 or leaf.shape[-1] != leaf.shape[-2]:
        raise ValueError("cayley_sgd optimises orthogonal matrices: every leaf must "
                         f"be [..., n, n], got shape {tuple(leaf.shape)}")
    return CayleySGDState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                                       params), jnp.zeros((), jnp.int32))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("cayley_sgd needs the current matrices: call "
                       "update(grads, state, params)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    moms = jax.tree.map(lambda m, g: momentum * m - g.astype(jnp.float32),
                        state.momentum, grads)
    steps = jax.tree.map(
        lambda x, m: cayley_step(x, m, lr, max_angle=max_angle, eps=eps),
        params, moms)
    treedef = jax.tree.structure(params)
    flat = treedef.flatten_up_to(steps)
    ys = treedef.unflatten([y for y, _ in flat])
    new_m = treedef.unflatten([t for _, t in flat])
    updates = jax.tree.map(lambda y, x: (y - x).astype(x.dtype), ys, params)
    return updates, CayleySGDState(new_m, state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonality_error(r: jax.Array) -> float:
  """``max |R^T R - I|`` over a (batch of) square matrices (in float64)."""
  r = np.asarray(r, np.float64)
  eye = np.eye(r.shape[-1])
  return float(np.max(np.abs(np.swapaxes(r, -1, -2) @ r - eye)))


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross entropy of ``logits[:, t]`` predicting ``tokens[:, t + 1]``.

  Args:
    logits: ``[B, T, V]``.
    tokens: ``[B, T]`` int.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: the shapes do not fit a decoder LM.
  """
  if logits.ndim != 3 or tokens.shape != logits.shape[:2] or tokens.shape[1] < 2:
    raise ValueError("loss='next_token' needs the model to map int tokens [B, T] "
                     f"(T >= 2, its first argument) to logits [B, T, V]; got tokens "
                     f"{tuple(tokens.shape)} and output {tuple(logits.shape)}. Pass "
                     "loss=callable(output, args) for another model")
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(lp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)
  return jnp.mean(nll)


@dataclasses.dataclass(frozen=True)
class SpinQuantConfig:
  """Options of SpinQuant's rotation learning (data).

  Attributes:
    steps: Cayley SGD steps (one calibration batch each, cycling).
    learning_rate: Cayley SGD learning rate, decayed linearly to 0 over the
      steps (the paper: 1.5, 100 steps).
    momentum: Cayley SGD momentum.
    learn: which rotations are learned: ``"residual"`` (R1) and/or
      ``"heads"`` (R2, one per value/output pair; needs ``heads``); the
      others stay at QuaRot's start. None: R1, and R2 where ``heads`` is
      given.
    loss: ``"next_token"`` (cross entropy of the output logits against the
      first argument's tokens shifted by one) or ``loss(output, args) ->
      scalar``.
    seed: PRNG seed of the randomized Hadamard start.
    select_every: every this many steps (and after the last), the mean
      quantized loss over all calibration batches is measured and the
      rotations with the lowest one (the start included) are kept: the STE
      loss is noisy on small models, and this never returns rotations worse
      than the start on the calibration data. 0: keep the last iterate (the
      paper's choice).
  """
  steps: int = 100
  learning_rate: float = 1.5
  momentum: float = 0.0
  learn: Optional[tuple] = None
  loss: Union[str, Callable] = "next_token"
  seed: int = 0
  select_every: int = 10

  def __post_init__(self):
    if not isinstance(self.steps, int) or self.steps < 0:
      raise ValueError(f"SpinQuantConfig.steps must be an int >= 0, got {self.steps!r}")
    if not self.learning_rate > 0:
      raise ValueError("SpinQuantConfig.learning_rate must be > 0, got "
                       f"{self.learning_rate!r}")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"SpinQuantConfig.momentum must be in [0, 1), got "
                       f"{self.momentum!r}")
    if self.learn is not None:
      learn = (self.learn,) if isinstance(self.learn, str) else tuple(self.learn)
      bad = [x for x in learn if x not in LEARNABLE]
      if bad or not learn:
        raise ValueError(f"SpinQuantConfig.learn must be None or a non-empty subset "
                         f"of {LEARNABLE}, got {self.learn!r}")
      object.__setattr__(self, "learn", learn)
    if not isinstance(self.select_every, int) or self.select_every < 0:
      raise ValueError("SpinQuantConfig.select_every must be an int >= 0, got "
                       f"{self.select_every!r}")
    if not callable(self.loss) and self.loss not in LOSSES:
      raise ValueError(f"SpinQuantConfig.loss must be one of {LOSSES} or a callable "
                       f"loss(output, args), got {self.loss!r}")


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def spinquant_model(fn: Callable, params: Any, batches: Sequence[Any], rules: Any, *,
                    config: SpinQuantConfig = SpinQuantConfig(),
                    online: Optional[str] = None, heads: Optional[tuple] = None,
                    quantize: Optional[Callable] = None,
                    eval_batches: Sequence[Any] = ()) -> tuple:
  """Learns SpinQuant's rotations (Liu et al. 2024) and folds them as QuaRot does.

  1. Fuses the norm gains and pre-rotates the ``online`` kernels (QuaRot's
     fold with an identity residual rotation).
  2. Starts from QuaRot's rotations: ``R1 = random_hadamard(seed, d)`` and,
     with ``heads``, ``R2 = hadamard(head_dim)`` for every value/output pair.
  3. Runs ``config.steps`` Cayley SGD steps on the loss of the quantized
     model ``quantize(fn, rules')`` (``rules'``: ``rules`` with the online
     Hadamard sites, ``RotatedModel.rules``) at the parameters with R1/R2
     folded in (differentiably): fake-quantized weights and activations,
     straight-through gradients, the weights held fixed.
  4. Folds the learned rotations into ``params`` with
     ``rotate_model(..., rotation=R1, head_rotations=R2)`` (float64 on the
     host), the same code path as QuaRot. On MoE layers R1 folds into the
     router and into every expert's kernels (``[E, d, F]`` readers along d,
     ``[E, F, d]`` writers along d), in the traced loss as in the final fold,
     so the loss learned on is the folded model's.

  Args:
    fn: the model as a function of its parameter pytree, ``fn(params, *args)``.
    params: the float parameters.
    batches: calibration batches; each is ``fn``'s positional arguments after
      the params (a tuple/list) or the single argument.
    rules: the QuantRules (anything ``QuantConfig`` accepts) the model will be
      quantized with; the quantized loss uses them (fake mode).
    config: the ``SpinQuantConfig``.
    online: regex of kernels with an online Hadamard (as ``rotate_model``).
    heads: ``(value_regex, out_regex, head_dim)`` (as ``rotate_model``);
      needed to learn ``"heads"``.
    quantize: ``quantize(fn, rules) -> quantized fn`` of the same signature;
      default ``lowbit_jax.quantize_function`` (any function, including a
      Linen ``apply`` closure). For Linen: ``lambda f, r: quantize_linen(r)(f)``.
    eval_batches: held-out batches: the report gives the quantized loss on
      them before and after learning.

  Returns:
    ``(new_params, RotatedModel, history)``: the folded float params, what
    was folded (the learned ``rotation`` and ``head_rotations``; run the
    model with ``RotatedModel.rules(rules)``), and a dict: ``loss`` (per
    step), ``selected`` (``(step, mean calibration loss)`` at each
    selection point), ``best_step`` (the step whose rotations were kept; 0:
    the start), ``calib_before`` / ``calib_after`` (mean quantized loss
    over ``batches`` at the start rotations and the returned ones),
    ``eval_before`` / ``eval_after`` (over ``eval_batches``, if any),
    ``seconds``.

  Raises:
    ValueError: no calibration batches; ``"heads"`` learned without
      ``heads``; and everything ``rotate_model`` raises (a model whose
      residual stream cannot be rotated: the message names the layer).
  """
  if quantize is None:
    quantize = quantize_function
  batches = [_as_args(b) for b in batches]
  eval_batches = [_as_args(b) for b in eval_batches]
  if not batches:
    raise ValueError("spinquant_model needs at least one calibration batch")
  learn_which = config.learn if config.learn is not None else (
      ("residual",) if heads is None else LEARNABLE)
  if "heads" in learn_which and heads is None:
    raise ValueError("learning the per-head rotations needs heads=(value_regex, "
                     "out_regex, head_dim); or SpinQuantConfig(learn=('residual',))")
  t0 = time.perf_counter()
  ex = batches[0]
  # (1) gains fused, online kernels pre-rotated; the residual rotation is I.
  width = find_residual_stream(fn, params, *ex).width
  base, rot0 = rotate_model(fn, params, *ex, online=online,
                            rotation=np.eye(width, dtype=np.float32))
  stream = rot0.stream
  d = stream.width
  # (2) QuaRot's start.
  rots = {"residual": random_hadamard(jax.random.key(config.seed), d)}
  pairs, head_dim = (), None
  if heads is not None:
    head_dim = int(heads[2])
    pairs = head_pairs(base, heads)
    rots["heads"] = jnp.broadcast_to(jnp.asarray(hadamard(head_dim)),
                                     (len(pairs), head_dim, head_dim))
  learned = {k: v for k, v in rots.items() if k in learn_which}
  fixed = {k: v for k, v in rots.items() if k not in learn_which}
  qfn_rules = rot0.rules(rules)
  qfn = quantize(fn, qfn_rules)
  loss_of = config.loss if callable(config.loss) else (
      lambda out, args: next_token_loss(out, args[0]))

  def objective(learn, p_base, args):
    r = {**fixed, **learn}
    p = rotate_residual(p_base, stream, r["residual"], fuse=False, traceable=True)
    if heads is not None:
      p = rotate_heads(p, pairs, head_dim, r["heads"], traceable=True,
                       biases=stream.biases)
    return loss_of(qfn(p, *args), args)

  steps = config.steps
  sched = optax.linear_schedule(config.learning_rate, 0.0, max(steps, 1))
  opt = cayley_sgd(sched, config.momentum)
  opt_state = opt.init(learned)

  # One compiled program of the quantized model (loss and gradient), used for
  # the steps and for the loss evaluations alike; the update is tiny.
  value_and_grad = jax.jit(jax.value_and_grad(objective))

  @jax.jit
  def update(learn, state, grads):
    upd, state = opt.update(grads, state, learn)
    return optax.apply_updates(learn, upd), state

  def step(learn, state, p_base, args):
    val, grads = value_and_grad(learn, p_base, args)
    learn, state = update(learn, state, grads)
    return learn, state, val

  def mean_loss(learn, bs):
    if not bs:
      return None
    return float(np.mean([float(value_and_grad(learn, base, a)[0]) for a in bs]))

  history = {"calib_before": mean_loss(learned, batches),
             "eval_before": mean_loss(learned, eval_batches)}
  # An online Hadamard rule that reached no op would leave its pre-rotated
  # kernel without the transform: a wrong model, not a worse one.
  unused = getattr(qfn, "unused_rules", None)
  if unused is not None:
    n_online = len(rot0.online)
    missed = [r.path for r in unused() if any(
        r == h for h in qfn_rules[:n_online])]
    if missed:
      raise ValueError(f"the online Hadamard rules {missed} reached no matmul of the "
                       "quantized function (its parameter paths differ from "
                       "rotate_model's); pass quantize= for this front end")
  best, best_loss, best_step = learned, history["calib_before"], 0
  losses, selected = [], []
  for i in range(steps):
    learned, opt_state, val = step(learned, opt_state, base, batches[i % len(batches)])
    losses.append(float(val))
    if config.select_every and ((i + 1) % config.select_every == 0 or i + 1 == steps):
      cur = mean_loss(learned, batches)
      selected.append((i + 1, cur))
      if cur < best_loss:
        best, best_loss, best_step = learned, cur, i + 1
  if config.select_every:
    learned = best
  history.update(loss=losses, selected=selected,
                 best_step=best_step if config.select_every else steps,
                 calib_after=mean_loss(learned, batches),
                 eval_after=mean_loss(learned, eval_batches))
  # (4) The fold of the learned rotations, QuaRot's code path.
  r = {**fixed, **learned}
  new, rotated = rotate_model(fn, params, *ex, online=online, heads=heads,
                              rotation=r["residual"],
                              head_rotations=r.get("heads"))
  history["seconds"] = time.perf_counter() - t0
  return new, rotated, history

