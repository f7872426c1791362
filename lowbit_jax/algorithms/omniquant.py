"""OmniQuant: learnable weight clipping and equivalent transforms, block by block.

Shao, Chen, Zhang, Xu, Zhao, Li, Zhang, Gao, Qiao & Luo, "OmniQuant:
Omnidirectionally Calibrated Quantization for Large Language Models", ICLR
2024.

Two sets of parameters are learned for each transformer block, with the
block's own weights frozen, by minimising the squared error between the
quantized block's output (on the quantized model's inputs to it) and the
float block's output (on the float model's inputs), with AdamW:

* **LWC** (learnable weight clipping): per block of the weight's scale grid
  (an output channel, or a group of inputs of one), clipping strengths
  ``sigmoid(gamma)`` and ``sigmoid(beta)`` on its max and min. Asymmetric
  integer specs use both: ``h = (sigmoid(gamma) max - sigmoid(beta) min) /
  (2**b - 1)``, zero point ``-sigmoid(beta) min / h`` (eq. 2-3). Symmetric
  specs have one range, ``[-a, a]``, so one strength: the step is
  ``sigmoid(gamma)`` times RTN's (``rtn_scale``: ``a / element max``). MX
  formats store the step as a power of two (E8M0), so there LWC can only
  keep RTN's step (strength above 1/2) or halve it (see ``lwc_step``). Rounding is straight-through, the step gets the LSQ gradient
  (``core.fake_quant(scale=...)``). gamma and beta start at 4 (strength 0.98),
  as the paper's code.
* **LET** (learnable equivalent transformation): for a group of linear layers
  reading one activation produced by a norm or a linear layer, a per-channel
  scale ``s`` and (where biases exist on both sides) shift ``delta``:
  ``x' = (x - delta) / s`` is folded into the producer's scale / kernel and
  bias, ``diag(s) w`` into the readers' kernels and ``delta @ w`` into their
  biases, an identity of the float model, exactly SmoothQuant's fold with the
  scales learned. ``s`` starts from SmoothQuant's ``max|x|^0.5 /
  max|w|^0.5``, ``delta`` from the channel's mid-range (the paper's code).
  Norms without a bias (RMSNorm) take no shift, as the paper does for LLaMA.

``omniquant_block`` is the algorithm on one block, a pure function of the
block's apply function, its float parameters, its calibration inputs and
targets, and the specs; ``lowbit_jax.flax.apply_ptq(..., "omniquant")``
drives it over a Linen model's blocks in sequence; ``ptq_params(...,
method="omniquant")`` (``lowbit_jax._ptq_omni``) uses ``lwc_init`` /
``lwc_quant`` / ``lwc_step`` layer-wise on any front end. The final kernels are
``fake_quant(w', spec, scale=step)`` with the learned step returned too, so
``quantize(kernel, spec, scale=step)`` stores them exactly (real mode equals
fake mode; asymmetric specs take their zero point back from the kernel).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax.algorithms.rtn import kernel_spec, rtn_scale
from lowbit_jax.core import QuantSpec, fake_quant, scale_shape
from lowbit_jax.core._qarray import block_shape
from lowbit_jax.core._quantize import _grid_bounds
from lowbit_jax.algorithms._tree import with_leaves

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class OmniQuantOptions:
  """Options of OmniQuant (validated here, not inside the training trace).

  Attributes:
    steps: AdamW steps per block (the paper: 20 epochs over 128 samples, at
      batch size 1).
    batch_size: calibration sequences per step (capped at the number given).
    lwc: learn weight clipping.
    let: learn equivalent transforms; None: on with activation quantization
      and off for weight-only quantization (the paper's recipe: W4A16 uses
      LWC alone, W4A4 and W6A6 both).
    lwc_lr: AdamW learning rate of the clipping logits (paper: 1e-2).
    let_lr: AdamW learning rate of the LET scales and shifts (paper: 5e-3).
    weight_decay: AdamW weight decay (paper: 0).
    lwc_init: initial clipping logit (paper's code: 4, sigmoid 0.982).
    let_alpha: SmoothQuant migration strength of the LET scales' start.
    blocks: regex of the module paths trained as blocks, in call order, each
      block's first argument being the previous block's output (the Llama
      decoder: ``layers_0``, ``layers_1``, ...).
    seed: seed of the minibatch order.
  """
  steps: int = 200
  batch_size: int = 4
  lwc: bool = True
  let: Optional[bool] = None
  lwc_lr: float = 1e-2
  let_lr: float = 5e-3
  weight_decay: float = 0.0
  lwc_init: float = 4.0
  let_alpha: float = 0.5
  blocks: str = r"layers_\d+"
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size", "seed"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name != "batch_size"
                                                               else 1):
        raise ValueError(f"OmniQuantOptions.{name} must be a "
                         f"{'positive' if name == 'batch_size' else 'non-negative'} "
                         f"int, got {v!r}")
    for name in ("lwc",):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"OmniQuantOptions.{name} must be True or False, got "
                        f"{getattr(self, name)!r}")
    if self.let is not None and not isinstance(self.let, bool):
      raise TypeError(f"OmniQuantOptions.let must be True, False or None (auto), got "
                      f"{self.let!r}")
    for name in ("lwc_lr", "let_lr"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"OmniQuantOptions.{name} must be a positive float, got {v!r}")
    if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
      raise ValueError(f"OmniQuantOptions.weight_decay must be >= 0, got "
                       f"{self.weight_decay!r}")
    if not (isinstance(self.lwc_init, (int, float)) and math.isfinite(self.lwc_init)):
      raise ValueError(f"OmniQuantOptions.lwc_init must be a finite float, got "
                       f"{self.lwc_init!r}")
    if not 0.0 <= float(self.let_alpha) <= 1.0:
      raise ValueError(f"OmniQuantOptions.let_alpha must be in [0, 1], got "
                       f"{self.let_alpha!r}")
    if not isinstance(self.blocks, str) or not self.blocks:
      raise ValueError(f"OmniQuantOptions.blocks must be a regex of block module "
                       f"paths, got {self.blocks!r}")

  def uses_let(self, with_activations: bool) -> bool:
    """Whether LET is learned (``let``, or by default with activations)."""
    return with_activations if self.let is None else self.let

  def replace(self, **changes) -> "OmniQuantOptions":
    """A copy with ``changes`` (validated again)."""
    return dataclasses.replace(self, **changes)


class LETGroup(NamedTuple):
  """Linear layers reading one activation, and the module that produces it.

  Paths are relative to the block's parameters (``"attn/q_proj"``).

  Attributes:
    producer: ``(kind, path)``: kind "norm" (a ``scale`` and maybe ``bias``)
      or "dense" (a 2-d ``kernel`` and maybe ``bias``).
    consumers: paths of the Dense layers (a 2-d ``kernel``) reading it.
    absmax: ``[K]`` max |x| per channel (the scales' SmoothQuant start).
    shift: ``[K]`` the shift's start (the channel mid-range) where producer
      and every consumer have a bias; None: scale only.
  """
  producer: tuple
  consumers: tuple
  absmax: jax.Array
  shift: Optional[jax.Array] = None


class OmniQuantBlockResult(NamedTuple):
  """What ``omniquant_block`` returns.

  Attributes:
    params: the block's parameters with LET folded and every quantized kernel
      replaced by its fake-quantized value (float, same structure).
    folded: the block's float parameters with LET folded (no quantization):
      the same float block.
    scales: ``{consumer path: step grid}`` for ``quantize(..., scale=)``.
    clip: ``{path: mean clipping strength}`` (1 = no clipping).
    let_scales: ``{producer path: learned s}``.
    loss_rtn: block output MSE of RTN (no LWC, no LET) on all inputs.
    loss_init: the same at the start of training (LET start, strength 0.98).
    loss: the same after training (it can end above ``loss_rtn``: training
      starts from LET's 0.98 strength, not from RTN; ``apply_ptq`` then rounds
      that block to nearest and reports ``rtn_fallback``).
    losses: ``[steps]`` the training minibatch losses.
  """
  params: Any
  folded: Any
  scales: dict
  clip: dict
  let_scales: dict
  loss_rtn: float
  loss_init: float
  loss: float
  losses: np.ndarray


# ---------------------------------------------------------------------------
# Params trees (nested mappings, copy on write)


def _get(tree, path: str):
  node = tree
  for part in path.split("/"):
    node = node[part]
  return node


# ---------------------------------------------------------------------------
# LWC


def _grid_layout(spec: QuantSpec, shape: tuple):
  bs = block_shape(spec, shape)
  grid = scale_shape(shape, spec)
  if spec.tile is not None or (bs[1] != 1 and tuple(bs) != tuple(shape)):
    raise ValueError(f"learnable weight clipping needs blocks along the input axis "
                     f"K of a [K, N] kernel (per output channel, groups, MX/NV "
                     f"blocks) or one per tensor; this spec's blocks are {bs}: use "
                     "axis=0 (or leave it unset)")
  if len(grid) != 2:
    grid = (1, 1)
  return tuple(bs), tuple(grid)


def _block_reduce(w, bs, grid, fn, fill):
  (bk, bn), (nk, nn) = bs, grid
  pad = [(0, nk * bk - w.shape[0]), (0, nn * bn - w.shape[1])]
  wb = jnp.pad(w, pad, constant_values=fill).reshape(nk, bk, nn, bn)
  return fn(wb, axis=(1, 3))


def lwc_init(w: jax.Array, spec, value: float = 4.0) -> dict:
  """Initial LWC logits of a kernel: ``{"gamma"[, "beta"]}`` on its scale grid.

  Args:
    w: float kernel ``[K, N]``.
    spec: weight QuantSpec or format name (unset axis: K).
    value: the start (sigmoid(4) = 0.982, as the paper's code).

  Returns:
    float32 arrays shaped ``scale_shape(w.shape, spec)`` (``beta`` for
    asymmetric specs only).
  """
  spec = kernel_spec(spec)
  _, grid = _grid_layout(spec, tuple(w.shape))
  out = {"gamma": jnp.full(grid, value, jnp.float32)}
  if not spec.symmetric:
    out["beta"] = jnp.full(grid, value, jnp.float32)
  return out


def lwc_step(w: jax.Array, spec, logits: Mapping[str, jax.Array]):
  """The quantization step (and zero point) LWC's logits give a kernel.

  Differentiable in ``w`` (through its range) and in the logits.

  Args:
    w: float kernel ``[K, N]``.
    spec: weight QuantSpec or format name (unset axis: K).
    logits: ``lwc_init``'s dict.

  Returns:
    ``(scale, zero_point or None)`` on the scale grid.
  """
  spec = kernel_spec(spec)
  bs, grid = _grid_layout(spec, tuple(w.shape))
  wf = w.astype(jnp.float32)
  g = jax.nn.sigmoid(logits["gamma"])
  if spec.symmetric:
    if spec.scale_dtype == "e8m0":
      # Powers of two: the step is stored rounded (floor: down), so the
      # strength scales twice RTN's step there; a strength above 1/2 keeps
      # RTN's power of two and one at or below 1/2 halves it.
      base = jax.lax.stop_gradient(rtn_scale(wf, spec)).reshape(grid)
      if spec.scale_rounding == "floor":
        base = 2.0 * base
        # A strength of exactly 1 (a sigmoid saturated in float32) would make
        # the step 2 * base itself, a power of two the floor keeps: twice
        # RTN's. Just below 1 it floors to RTN's step.
        g = jnp.minimum(g, np.float32(1.0 - 2.0 ** -24))
    else:
      amax = _block_reduce(jnp.abs(wf), bs, grid, jnp.max, 0.0)
      base = amax * np.float32(spec.clip_ratio) / np.float32(spec.element.max)
    s = g * base
    return jnp.where(s > 0, s, 1.0), None
  lo_b, hi_b = _grid_bounds(spec)
  hi = jnp.maximum(_block_reduce(wf, bs, grid, jnp.max, -jnp.inf), 0.0)
  lo = jnp.minimum(_block_reduce(wf, bs, grid, jnp.min, jnp.inf), 0.0)
  b = jax.nn.sigmoid(logits["beta"])
  s = (g * hi - b * lo) * np.float32(spec.clip_ratio) / np.float32(hi_b - lo_b)
  s = jnp.where(s > 0, s, 1.0)
  return s, -b * lo / s


def lwc_quant(w: jax.Array, spec, logits: Mapping[str, jax.Array]):
  """LWC's fake quantization of a kernel: ``(values, step)``.

  Straight-through rounding; the step (and asymmetric zero point) carry the
  LSQ / LSQ+ gradients into the logits (see ``core.fake_quant``).
  """
  spec = kernel_spec(spec)
  s, z = lwc_step(w, spec, logits)
  return fake_quant(w, spec, scale=s, zero_point=z), s


# ---------------------------------------------------------------------------
# LET


def let_init(params, group: LETGroup, alpha: float = 0.5) -> dict:
  """The LET parameters' start: ``{"scale": s[, "shift": delta]}``.

  ``s = max|x|^alpha / max|w|^(1 - alpha)`` (SmoothQuant, over all readers'
  kernels; both maxima floored at 1e-5), ``delta`` the mid-range given in the
  group.
  """
  wmax = None
  for c in group.consumers:
    m = jnp.max(jnp.abs(_get(params, c)["kernel"].astype(jnp.float32)), axis=1)
    wmax = m if wmax is None else jnp.maximum(wmax, m)
  a = jnp.maximum(jnp.asarray(group.absmax, jnp.float32), 1e-5)
  if group.shift is not None:   # the range after the shift
    a = jnp.maximum(a - jnp.abs(jnp.asarray(group.shift, jnp.float32)), 1e-5)
  s = jnp.power(a, alpha) / jnp.power(jnp.maximum(wmax, 1e-5), 1.0 - alpha)
  out = {"scale": s}
  if group.shift is not None:
    out["shift"] = jnp.asarray(group.shift, jnp.float32)
  return out


def let_fold(params, groups: Sequence[LETGroup], let: Sequence[Mapping]) -> Any:
  """Folds LET scales and shifts into a block's parameters (an identity).

  Producer: ``x' = (x - delta) / s`` (a norm's scale and bias, or a Dense
  kernel's columns and bias); readers: ``diag(s) w`` and bias ``+ delta @
  w``. Groups are folded in order, each into the parameters the previous
  ones left, so a layer may read one group and produce another. ``s`` is
  floored at 1e-5 (as the paper's code).

  Args:
    params: the block's parameters (nested mappings).
    groups: the ``LETGroup`` s.
    let: one ``let_init``-style dict per group.

  Returns:
    The transformed parameters (same structure).
  """
  for group, tp in zip(groups, let):
    s = jnp.maximum(tp["scale"], 1e-5)
    d = tp.get("shift")
    kind, path = group.producer
    node = _get(params, path)
    new = {}
    if kind == "norm":
      new["scale"] = node["scale"] / s
    else:
      new["kernel"] = node["kernel"] / s[None, :]
    if "bias" in node:
      new["bias"] = (node["bias"] - (0.0 if d is None else d)) / s
    elif d is not None:
      raise ValueError(f"a LET shift needs a bias on the producer {path!r}")
    params = with_leaves(params, path, **new)
    for c in group.consumers:
      node = _get(params, c)
      k = node["kernel"]
      new = {"kernel": k * s[:, None]}
      if d is not None:
        if "bias" not in node:
          raise ValueError(f"a LET shift needs a bias on the reader {c!r}")
        new["bias"] = node["bias"] + jnp.matmul(d, k, precision=_HI)
      params = with_leaves(params, c, **new)
  return params


# ---------------------------------------------------------------------------
# The block


def _quantize_kernels(params, specs, logits):
  scales = {}
  for path, spec in specs.items():
    k = _get(params, path)["kernel"]
    if logits is None:
      q = fake_quant(k, spec)
      s = None
    else:
      q, s = lwc_quant(k, spec, logits[path])
    params = with_leaves(params, path, kernel=q.astype(k.dtype))
    scales[path] = s
  return params, scales


@functools.lru_cache(maxsize=16)
def _compiled(apply_fn, spec_key: tuple, group_key: tuple, opts: OmniQuantOptions,
              n: int, bsz: int):
  """The jitted pieces of ``omniquant_block`` for one block structure.

  Cached, so that blocks of one shape (the layers of a decoder) compile once.
  """
  specs = dict(spec_key)
  lwc = opts.lwc

  def groups_of(garrs):
    return [LETGroup(prod, cons, a, sh) for (prod, cons, _), (a, sh)
            in zip(group_key, garrs)]

  def init(params, garrs):
    return {"lwc": ({p: lwc_init(_get(params, p)["kernel"], s, opts.lwc_init)
                     for p, s in specs.items()} if lwc else {}),
            "let": [let_init(params, g, opts.let_alpha) for g in groups_of(garrs)]}

  def loss_fn(th, params, garrs, x, y, rtn=False):
    p = params if rtn else let_fold(params, groups_of(garrs), th["let"])
    p, _ = _quantize_kernels(p, specs, None if (rtn or not lwc) else th["lwc"])
    d = apply_fn(p, x).astype(jnp.float32) - y.astype(jnp.float32)
    return jnp.mean(d * d)

  def take(inputs, idx):
    return jax.tree.map(lambda a: a[idx], inputs)

  def full_loss(th, params, inputs, targets, garrs, rtn):
    tot = jnp.float32(0)
    for i in range(0, n, bsz):
      m = min(bsz, n - i)
      tot = tot + m * loss_fn(th, params, garrs, take(inputs, slice(i, i + m)),
                              targets[i:i + m], rtn)
    return tot / n

  def losses0(params, inputs, targets, garrs, th):
    return (full_loss(th, params, inputs, targets, garrs, True),
            full_loss(th, params, inputs, targets, garrs, False))

  tx = optax.multi_transform(
      {"lwc": optax.adamw(opts.lwc_lr, weight_decay=opts.weight_decay),
       "let": optax.adamw(opts.let_lr, weight_decay=opts.weight_decay)},
      {"lwc": "lwc", "let": "let"})

  def step(params, inputs, targets, garrs, th, st, idx):
    loss, grads = jax.value_and_grad(loss_fn)(th, params, garrs, take(inputs, idx),
                                              targets[idx])
    upd, st = tx.update(grads, st, th)
    return optax.apply_updates(th, upd), st, loss

  def finalize(params, inputs, targets, garrs, th):
    p = folded = let_fold(params, groups_of(garrs), th["let"])
    scales, clip = {}, {}
    for path, spec in specs.items():
      k = _get(p, path)["kernel"]
      if lwc:
        s, z = lwc_step(k, spec, th["lwc"][path])
        clip[path] = jnp.mean(jax.nn.sigmoid(th["lwc"][path]["gamma"]))
      else:
        s, z = rtn_scale(k, spec), None
        clip[path] = jnp.float32(1.0)
      q = fake_quant(k, spec, scale=s, zero_point=z)
      p = with_leaves(p, path, kernel=q.astype(k.dtype))
      scales[path] = s
    return p, folded, scales, clip, full_loss(th, params, inputs, targets, garrs, False)

  return (jax.jit(init), jax.jit(losses0), jax.jit(step), jax.jit(finalize), tx)


def omniquant_block(apply_fn: Callable, params: Any, inputs: jax.Array,
                    targets: jax.Array, specs: Mapping[str, Any], *,
                    groups: Sequence[LETGroup] = (),
                    options: Optional[OmniQuantOptions] = None,
                    with_activations: bool = False) -> OmniQuantBlockResult:
  """Learns LWC and LET for one block and returns its quantized parameters.

  Minimises ``mean((apply_fn(Q(T(params)), inputs) - targets)^2)`` over the
  clipping logits of every kernel in ``specs`` (LWC) and the scales/shifts
  of ``groups`` (LET), with the block's weights frozen, using AdamW on
  minibatches of ``inputs`` (Shao et al. 2024, OmniQuant, Algorithm 1).

  Args:
    apply_fn: ``(params, x) -> y``, the block (with any activation
      quantization inside it); ``x`` is a minibatch of ``inputs``.
    params: the block's float parameters (nested mappings).
    inputs: ``[B, ...]`` the block's inputs in the quantized model, or a
      pytree of such arrays (all with the same ``B``; minibatches index every
      leaf), passed to ``apply_fn`` as it is.
    targets: ``[B, ...]`` the float block's outputs on the float model's
      inputs.
    specs: ``{Dense path: weight spec}`` of the kernels to quantize (paths
      relative to ``params``; unset axis: K).
    groups: LET groups (used when ``options.uses_let(with_activations)``).
    options: ``OmniQuantOptions`` (None: defaults).
    with_activations: whether ``apply_fn`` quantizes activations (LET's
      default).

  Returns:
    ``OmniQuantBlockResult``.

  Raises:
    ValueError: no kernel to quantize, inputs and targets disagree, a spec
      LWC cannot clip, or the loss became non-finite (lower the rates).
  """
  opts = options or OmniQuantOptions()
  specs = {p: kernel_spec(s) for p, s in specs.items()}
  if not specs:
    raise ValueError("specs is empty: give the block's kernels to quantize")
  inputs = jax.tree.map(jnp.asarray, inputs)
  targets = jnp.asarray(targets)
  rows = {int(a.shape[0]) if a.ndim else -1 for a in jax.tree.leaves(inputs)}
  if rows != {targets.shape[0]} or targets.shape[0] == 0:
    raise ValueError(f"every leaf of inputs and targets needs the same, non-zero "
                     f"number of rows, got {sorted(rows)} and {targets.shape}")
  for p, spec in specs.items():
    _grid_layout(spec, tuple(_get(params, p)["kernel"].shape))
  groups = tuple(groups) if opts.uses_let(with_activations) else ()
  lwc = opts.lwc
  n = targets.shape[0]
  bsz = min(opts.batch_size, n)
  spec_key = tuple(specs.items())
  group_key = tuple((g.producer, tuple(g.consumers), g.shift is not None) for g in groups)
  garrs = [(jnp.asarray(g.absmax, jnp.float32),
            None if g.shift is None else jnp.asarray(g.shift, jnp.float32))
           for g in groups]
  init_fn, losses0_fn, step_fn, finalize_fn, tx = _compiled(
      apply_fn, spec_key, group_key, opts, n, bsz)
  theta = init_fn(params, garrs)
  loss_rtn, loss_init = (float(v) for v in losses0_fn(params, inputs, targets, garrs,
                                                       theta))
  state = tx.init(theta)
  losses = []
  if opts.steps and (lwc or groups):
    rng = np.random.default_rng(opts.seed)
    order = np.zeros((0,), np.int32)
    for _ in range(opts.steps):
      if order.size < bsz:
        order = np.concatenate([order, rng.permutation(n).astype(np.int32)])
      idx, order = order[:bsz], order[bsz:]
      theta, state, loss = step_fn(params, inputs, targets, garrs, theta, state,
                                   jnp.asarray(idx))
      losses.append(loss)
    losses = np.asarray(jax.device_get(losses), np.float32)
    if not np.all(np.isfinite(losses)):
      raise ValueError(f"OmniQuant's block loss became non-finite (first at step "
                       f"{int(np.argmin(np.isfinite(losses)))}); lower lwc_lr / "
                       "let_lr")

  # The result: LET folded, kernels on LWC's grid, and their steps.
  p, folded, scales, clip, loss = finalize_fn(params, inputs, targets, garrs, theta)
  loss = float(loss)
  clip = {k: float(v) for k, v in clip.items()}
  let_scales = {g.producer[1]: jnp.maximum(tp["scale"], 1e-5)
                for g, tp in zip(groups, theta["let"])}
  return OmniQuantBlockResult(p, folded, scales, clip, let_scales, loss_rtn, loss_init,
                              loss, np.asarray(losses, np.float32))
