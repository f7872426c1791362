"""The training loop: optimizer, loss, sharded step, data, evaluation, ``train``.

Pure pieces (``make_optimizer``, ``loss_fn``, ``train_step``,
``make_train_step``) and one loop, ``train(config, workdir)``, that adds data,
sharding over a ``"data"``/``"fsdp"``/``"tensor"`` mesh (``config.mesh``, rules
of ``lowbit_jax.train.sharding``), quantization-aware and low-bit training
(``config.quant``, see ``lowbit_jax.train.qat``), periodic held-out
evaluation, Orbax checkpoints (a killed run resumes from the latest one and
continues with the very batches, keys and state an uninterrupted run would
see) and a JSON-lines log ``workdir/log.jsonl``.

The optimizer is AdamW (Loshchilov & Hutter, 2019, "Decoupled Weight Decay
Regularization") with linear warmup and cosine decay, and global-norm gradient
clipping; its moments may be stored quantized (``config.optim.state_format``,
``lowbit_jax.optim``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging as py_logging
import math
import numbers
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from absl import logging
from jax.sharding import Mesh

from lowbit_jax import _io
from lowbit_jax.data import stdlib_corpus
from lowbit_jax.eval.perplexity import perplexity
from lowbit_jax.models.llama import Llama, LlamaConfig, num_params
from lowbit_jax.train import mesh as mesh_lib
from lowbit_jax.train import qat as qat_lib
from lowbit_jax.train import state as state_lib
from lowbit_jax.train.sharding import LLAMA_RULES, Layout
from lowbit_jax.train.state import TrainState

STATE_FORMATS = ("float32", "int8", "fp8_e4m3", "4bit")


# ---------------------------------------------------------------------------
# Optimizer


def _real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def make_schedule(lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then cosine decay to ``lr * min_lr_ratio``.

  Raises:
    ValueError: if the step counts or the ratio are out of range.
  """
  if not _real(lr) or not (math.isfinite(lr) and lr >= 0):
    raise ValueError(f"the learning rate must be a finite number >= 0, got {lr!r} "
                     "(--config.lr).")
  if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                     f"got warmup_steps={warmup_steps}, total_steps={total_steps} "
                     "(--config.warmup_steps, --config.steps).")
  if not 0.0 <= min_lr_ratio <= 1.0:
    raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
  if warmup_steps == total_steps:   # all warm-up: no decay phase is left
    return optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=lr * min_lr_ratio)


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float,
          eps: float, weight_decay: float, mask: Any = None,
          state_format: str = "float32") -> optax.GradientTransformation:
  """AdamW whose moments are float32 (optax) or quantized (``lowbit_jax.optim``).

  Args:
    learning_rate: a float or a schedule.
    b1, b2, eps, weight_decay, mask: as ``optax.adamw``.
    state_format: one of ``STATE_FORMATS``.

  Raises:
    ValueError: an unknown state format.
  """
  if state_format not in STATE_FORMATS:
    raise ValueError(f"optim.state_format must be one of {STATE_FORMATS}, got "
                     f"{state_format!r}.")
  for name, v, hi in (("b1", b1, 1.0), ("b2", b2, 1.0), ("eps", eps, math.inf),
                      ("weight_decay", weight_decay, math.inf)):
    # (optax takes any value: b1 = 1 or b2 = 1 divides by zero in the bias
    # correction, and a negative weight decay or eps trains something else)
    if not _real(v) or not 0 <= v < hi:
      raise ValueError(f"AdamW's {name} must be in [0, {hi:g}), got {v!r} "
                       f"(--config.{name}).")
  if state_format == "float32":
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay, mask=mask)
  from lowbit_jax import optim  # pylint: disable=g-import-not-at-top
  return optim.adamw(learning_rate, b1, b2, eps, weight_decay, mask,
                     state_format=state_format)


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, *,
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float = 1.0, state_format: str = "float32"
                   ) -> optax.GradientTransformation:
  """AdamW with warmup + cosine schedule and global-norm clipping.

  Weight decay applies to parameters with two or more axes (matrices,
  embeddings, expert kernels), not to norm scales.

  Args:
    lr: peak learning rate.
    warmup_steps: linear warmup length.
    total_steps: total steps (end of the cosine).
    min_lr_ratio: final learning rate as a fraction of ``lr``.
    weight_decay: decoupled weight decay coefficient.
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    clip_norm: global gradient-norm clip (0 disables clipping).
    state_format: how the moments are stored (``STATE_FORMATS``).

  Returns:
    An ``optax.GradientTransformation``.
  """
  if not _real(clip_norm) or not 0 <= clip_norm < math.inf:
    raise ValueError(f"clip_norm must be a finite number >= 0 (0 disables "
                     f"clipping), got {clip_norm!r} (--config.clip_norm).")
  schedule = make_schedule(lr, warmup_steps, total_steps, min_lr_ratio)
  opt = adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
              mask=_decay_mask, state_format=state_format)
  return optax.chain(qat_lib.global_norm_clip(clip_norm), opt)


# ---------------------------------------------------------------------------
# Loss and step


def _forward(model: Llama, params: Any, inputs: jax.Array, recipe, quant_scales,
             quant_state, key) -> tuple[jax.Array, dict]:
  """Logits and the collected collections (losses, quant_metrics)."""
  if recipe is None:
    return model.apply({"params": params}, inputs, mutable=["losses"])
  variables = {"params": params, **recipe.collections(quant_scales, quant_state)}
  return recipe.fake(model.apply)(variables, inputs, rngs={"quant": key},
                                  mutable=["losses", qat_lib.METRICS])


def loss_fn(params: Any, batch: jax.Array, *, model: Llama,
            moe_aux_weight: float = 0.01, recipe: "qat_lib.Recipe | None" = None,
            quant_scales: Any = None, quant_state: Any = None,
            key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
  """The training loss and its parts for one batch.

  Args:
    params: model parameters.
    batch: ``int32 [B, T + 1]``; inputs ``[:, :-1]``, targets ``[:, 1:]``.
    model: the model.
    moe_aux_weight: weight of the mean (over layers) MoE load-balancing loss;
      ignored for dense models.
    recipe: a QAT recipe (None: float forward pass).
    quant_scales, quant_state, key: the recipe's variables and the step's key.

  Returns:
    ``(total_loss, {"loss": mean token cross-entropy, "moe_aux_loss": ...,
    "quant_metrics": ... (QAT only)})``.
  """
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits, extra = _forward(model, params, inputs, recipe, quant_scales, quant_state,
                           key)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  aux_terms = jax.tree.leaves(extra.get("losses", {}))
  # Without MoE layers a numpy zero, known at trace time (split_constant_metrics).
  aux = (sum(aux_terms) / len(aux_terms)) if aux_terms else np.float32(0.0)
  parts = {"loss": ce, "moe_aux_loss": aux}
  if recipe is not None:
    parts["quant_metrics"] = extra.get(qat_lib.METRICS, {})
  return ce + moe_aux_weight * aux, parts


def _global_norm(tree: Any) -> jax.Array | np.float32:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return np.float32(0.0)  # known at trace time (split_constant_metrics)
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def train_step(state: TrainState, batch: jax.Array, *, model: Llama,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule | None = None,
               moe_aux_weight: float = 0.01,
               recipe: "qat_lib.Recipe | None" = None,
               quantized: bool = True) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step (pure; jit it, e.g. with ``make_train_step``).

  Float training (``recipe=None``) differentiates the loss with respect to
  the parameters. With a QAT recipe and ``quantized=True`` the forward pass is
  fake-quantized, the learned scales are trained with the parameters (the rules
  apply LSQ's gradient scale, ``QuantRule.lsq_grad_scale``), and the
  quantization state (amax histories) is overwritten by its gradient. With
  ``quantized=False`` (the float warm-up before ``quant.start_step``) the
  step is a float step that leaves scales, their optimizer state and the
  quantization state untouched.

  Args:
    state: the current state.
    batch: ``int32 [B, T + 1]`` token windows.
    model: the model.
    tx: the optimizer (of ``params``, or of ``recipe.trainable(...)``).
    schedule: the learning-rate schedule, only to report ``lr``.
    moe_aux_weight: see ``loss_fn``.
    recipe: the QAT recipe, or None.
    quantized: whether quantization is on at this step (static).

  Returns:
    ``(new_state, metrics)`` with metrics ``loss``, ``moe_aux_loss``,
    ``grad_norm`` (of the parameters, before clipping), ``lr`` (when
    ``schedule`` is given) and, when quantized, ``scale_grad_norm``,
    ``scale_stats`` (``{scale path: [mean, min, max]}``) and
    ``quant_metrics`` (the model's per-layer metrics, e.g. clipped fractions).
  """
  step_key = state.step_key()
  if recipe is not None and quantized:
    grad_fn = jax.value_and_grad(
        lambda p, s, q: loss_fn(p, batch, model=model, moe_aux_weight=moe_aux_weight,
                                recipe=recipe, quant_scales=s, quant_state=q,
                                key=step_key),
        argnums=(0, 1, 2), has_aux=True)
    (_, metrics), (g_params, g_scales, new_quant_state) = grad_fn(
        state.params, state.quant_scales, state.quant_state)
    trainable = recipe.trainable(state.params, state.quant_scales)
    grads = recipe.trainable(g_params, g_scales)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    params, quant_scales = recipe.split(new, state.quant_scales)
    metrics = dict(metrics, scale_grad_norm=_global_norm(g_scales),
                   scale_stats=qat_lib.scale_stats(quant_scales))
    quant_state = new_quant_state
  else:
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, moe_aux_weight=moe_aux_weight),
        has_aux=True)
    (_, metrics), g_params = grad_fn(state.params, batch)
    quant_scales, quant_state = state.quant_scales, state.quant_state
    if recipe is None:
      updates, opt_state = tx.update(g_params, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    else:
      trainable = recipe.trainable(state.params, state.quant_scales)
      zeros = jax.tree.map(jnp.zeros_like, state.quant_scales)
      updates, opt_state = tx.update(recipe.trainable(g_params, zeros),
                                     state.opt_state, trainable)
      params, _ = recipe.split(optax.apply_updates(trainable, updates),
                               state.quant_scales)
      opt_state = recipe.keep_scale_state(opt_state, state.opt_state)
  metrics = dict(metrics, grad_norm=_global_norm(g_params))
  if schedule is not None:
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            quant_scales=quant_scales, quant_state=quant_state)
  return new_state, metrics


def split_constant_metrics(step_fn: Callable) -> tuple[Callable, Callable]:
  """``step_fn`` with the metrics known at trace time kept out of its outputs.

  A quantized step's metrics hold constants (the clipped fraction of every
  dynamic-range site is zero by construction, a numpy value at trace time:
  ``_rules.clipped_fraction``). Returned from a jitted function, each becomes
  an output buffer the device copies the constant into, one op each (143
  ``copy`` ops in the base LM's QAT step against bf16's 2,
  ``benchmarks/qat_step_programs.md``).

  The constants of the last trace are the ones ``rebuild`` puts back, and a
  jitted function keeps the program of every trace (one per input shape):
  constants that depend on the inputs' shapes (say, a token count from
  ``batch.shape``) would come back from the last shape traced for a call of
  another. So a trace whose constants differ from the previous trace's
  raises instead; ``ShardedStep`` splits each batch shape on its own.

  Returns:
    ``(traced, rebuild)``: ``traced(state, batch)`` returns ``(new_state,
    [the metrics' other leaves])``, to jit; ``rebuild(leaves)`` puts the
    constants back and returns the metrics as ``step_fn`` returns them (valid
    once ``traced`` has been traced; each trace records the structure).

  Raises:
    ValueError: (at trace time) a trace's constant metrics differ from the
      previous trace's.
  """
  meta: dict = {}

  def traced(state, batch):
    new_state, metrics = step_fn(state, batch)
    leaves, treedef = jax.tree.flatten(metrics)
    consts = {i: v for i, v in enumerate(leaves)
              if isinstance(v, (np.ndarray, np.generic))}
    if "treedef" in meta:
      changed = _constants_changed(meta["treedef"], meta["consts"], treedef, consts)
      if changed:
        raise ValueError(
            "split_constant_metrics: this trace of the step returns other "
            f"trace-time metrics than the previous trace ({changed}); the "
            "jitted function keeps both programs, so the host could not tell "
            "whose constants a call's metrics take. Split each input shape "
            "separately (ShardedStep does, per batch shape) or return those "
            "metrics as arrays (jnp.asarray).")
    meta.update(treedef=treedef, consts=consts)
    return new_state, [v for i, v in enumerate(leaves) if i not in consts]

  def rebuild(dynamic):
    if "treedef" not in meta:
      raise RuntimeError("split_constant_metrics: rebuild before the step was traced")
    consts = meta["consts"]
    if len(dynamic) + len(consts) != meta["treedef"].num_leaves:
      # Every trace has the same metrics structure (``traced`` refuses
      # another), so this is a list the traced step did not return.
      raise RuntimeError(
          f"split_constant_metrics: {len(dynamic)} traced metrics, but the last "
          f"trace recorded {meta['treedef'].num_leaves - len(consts)}; pass "
          "rebuild the metrics list the traced step returned")
    it = iter(dynamic)
    leaves = [consts[i] if i in consts else next(it)
              for i in range(meta["treedef"].num_leaves)]
    return jax.tree.unflatten(meta["treedef"], leaves)

  return traced, rebuild


def _constants_changed(treedef_a, consts_a: dict, treedef_b, consts_b: dict
                       ) -> str:
  """What differs between two traces' constant metrics ('' if nothing)."""
  if treedef_a != treedef_b:
    return "another metrics structure"
  if consts_a.keys() != consts_b.keys():
    return "other leaves known at trace time"
  for i, a in consts_a.items():
    b, dt = consts_b[i], np.result_type(a)
    if (np.shape(a) != np.shape(b) or dt != np.result_type(b)
        or not np.array_equal(a, b, equal_nan=np.issubdtype(dt, np.inexact))):
      paths = jax.tree_util.tree_flatten_with_path(
          jax.tree.unflatten(treedef_a, list(range(treedef_a.num_leaves))))[0]
      return f"metrics{jax.tree_util.keystr(paths[i][0])}: {a!r} then {b!r}"
  return ""


class ShardedStep:
  """``train_step`` jitted on a mesh with the state laid out by rules.

  The state's shardings come from a ``Layout`` (the first call computes them
  from the state's structure); the batch is split over ``("data", "fsdp")``;
  metrics are replicated; the state argument is donated.
  """

  def __init__(self, step_fn: Callable, layout: Layout):
    self._fn = step_fn
    self.layout = layout
    self._jitted: dict = {}

  def shardings(self, state: TrainState) -> TrainState:
    """The NamedShardings of ``state`` under this step's layout."""
    return state_lib.state_shardings(state, self.layout)

  def _compiled(self, state: TrainState, batch: Any = None):
    # One program (and split_constant_metrics) per state structure and batch
    # shape: metrics known at trace time may depend on the batch's shape.
    key = (jax.tree.structure(state),
           tuple((np.shape(x), getattr(x, "dtype", type(x)))
                 for x in jax.tree.leaves(batch)))
    entry = self._jitted.get(key)
    if entry is None:
      shard = self.shardings(state)
      # Metrics known at trace time come back from the host, not the device.
      traced, rebuild = split_constant_metrics(self._fn)
      fn = jax.jit(traced,
                   in_shardings=(shard, mesh_lib.batch_sharding(self.layout.mesh)),
                   out_shardings=(shard, self.layout.replicated), donate_argnums=0)
      entry = self._jitted[key] = (fn, rebuild)
    return entry

  def __call__(self, state: TrainState, batch: jax.Array
               ) -> tuple[TrainState, dict[str, Any]]:
    fn, rebuild = self._compiled(state, batch)
    new_state, dynamic = fn(state, batch)
    return new_state, rebuild(dynamic)


def make_train_step(model: Llama, tx: optax.GradientTransformation,
                    mesh: Mesh | Layout, *, schedule: optax.Schedule | None = None,
                    moe_aux_weight: float = 0.01,
                    recipe: "qat_lib.Recipe | None" = None,
                    quantized: bool = True) -> ShardedStep:
  """``train_step`` jitted on ``mesh`` (a Mesh: ``LLAMA_RULES``; or a Layout).

  The batch is split along its first axis over ``("data", "fsdp")``;
  parameters, optimizer states and learned scales are laid out by the rules;
  the state argument is donated.
  """
  layout = mesh if isinstance(mesh, Layout) else Layout(mesh)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           moe_aux_weight=moe_aux_weight, recipe=recipe,
                           quantized=quantized)
  return ShardedStep(step, layout)


# Compatibility names of the data-parallel era.
shard_batch = mesh_lib.shard_batch


def make_mesh(num_devices: int = 0) -> Mesh:
  """A data-parallel mesh over the first ``num_devices`` devices (0: all)."""
  return mesh_lib.data_mesh(num_devices)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, mesh_lib.replicated(mesh))


def shard_state(state: TrainState, layout: Layout | Mesh) -> TrainState:
  """Places ``state`` on a mesh as a ``Layout`` (or ``LLAMA_RULES``) says."""
  layout = layout if isinstance(layout, Layout) else Layout(layout)
  return state_lib.place(state, state_lib.state_shardings(state, layout))


# ---------------------------------------------------------------------------
# Data and evaluation


def model_config(config: Mapping[str, Any] | Any) -> LlamaConfig:
  """Builds the ``LlamaConfig`` from ``config.model`` (a ConfigDict or mapping)."""
  fields = config["model"]
  fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
  return LlamaConfig(**fields)


@dataclasses.dataclass(frozen=True)
class LMData:
  """The tokenized corpus a run trains and evaluates on.

  Attributes:
    tokenizer: the byte-level BPE tokenizer.
    train_tokens: ``uint16`` training stream.
    heldout_tokens: ``uint16`` held-out stream.
    token_bytes: ``int64 [vocab]`` text bytes per token id.
  """
  tokenizer: tokenizers.Tokenizer
  train_tokens: np.ndarray
  heldout_tokens: np.ndarray
  token_bytes: np.ndarray

  def num_bytes(self, tokens: np.ndarray) -> int:
    """The UTF-8 size of the text that a token stream encodes."""
    return int(self.token_bytes[tokens].sum())


def load_data(vocab_size: int, cache_dir: str | None = None) -> LMData:
  """Loads (training and caching on first use) the tokenizer and both splits.

  Args:
    vocab_size: tokenizer vocabulary size (the model's ``vocab``).
    cache_dir: cache base directory; empty or None means the default.
  """
  cache = cache_dir or None
  tok = stdlib_corpus.get_tokenizer(vocab_size, cache_dir=cache)
  return LMData(tokenizer=tok,
                train_tokens=stdlib_corpus.token_stream("train", tok, cache_dir=cache),
                heldout_tokens=stdlib_corpus.token_stream("heldout", tok,
                                                          cache_dir=cache),
                token_bytes=stdlib_corpus.token_byte_lengths(tok))


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
             data: LMData, *, seq_len: int, batch: int, max_tokens: int = 0,
             mesh: Mesh | None = None) -> dict[str, float | int | None]:
  """Held-out loss, perplexity and bits/byte on the first ``max_tokens`` tokens.

  Args:
    apply_fn: ``apply_fn(params, tokens) -> logits``.
    params: whatever ``apply_fn`` takes first (e.g. sharded parameters).
    data: the corpus.
    seq_len: context length.
    batch: windows per forward pass.
    max_tokens: evaluate on this prefix of the held-out stream (0: all of it).
    mesh: if given and ``batch`` is a multiple of its data x fsdp size, each
      eval batch is split over those axes.

  Returns:
    ``perplexity(...)``'s dict; ``bits_per_byte`` is exact for the prefix.
  """
  if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
    raise ValueError(f"max_tokens must be an int >= 0 (0: the whole held-out "
                     f"split), got {max_tokens!r}")
  tokens = data.heldout_tokens
  if max_tokens:
    tokens = tokens[:max_tokens]
  sharding = None
  if mesh is not None and batch % mesh_lib.batch_size_multiple(mesh) == 0:
    sharding = mesh_lib.batch_sharding(mesh)
  # The first token is never scored: it carries no bytes (it is EOS).
  return perplexity(apply_fn, params, tokens, seq_len, batch,
                    num_bytes=data.num_bytes(tokens[1:]), batch_sharding=sharding)


# ---------------------------------------------------------------------------
# The loop


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  """Keeps Orbax's INFO records out of absl's log (for the experiment mains)."""
  logging.get_absl_handler().addFilter(_QuietOrbax())


class _JsonlLog:
  """Appends one JSON object per line to a file."""

  def __init__(self, path: pathlib.Path):
    self._f = open(path, "a", encoding="utf-8")

  def write(self, record: Mapping[str, Any]) -> None:
    self._f.write(json.dumps(dict(record)) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _get(config: Any, dotted: str, default: Any) -> Any:
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      return default
  return node


def run_mesh(config: Any) -> Mesh:
  """The mesh of a run: ``config.mesh``, else ``config.num_devices`` data-parallel."""
  spec = _get(config, "mesh", "")
  if spec:
    return mesh_lib.make_mesh(spec)
  return make_mesh(_get(config, "num_devices", 0))


def run_layout(config: Any, mesh: Mesh) -> Layout:
  """The ``Layout`` of a run from ``config.sharding`` (defaults: Llama rules)."""
  rules = _get(config, "sharding.rules", None) or LLAMA_RULES
  return Layout(mesh, rules=tuple(tuple(r) for r in rules),
                on_indivisible=_get(config, "sharding.on_indivisible", "error"),
                on_block_split=_get(config, "sharding.on_block_split", "error"))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _check_finite_state(state: TrainState, done: int, manager, *,
                        scales: bool) -> None:
  """Raises before a save of parameters (or, ``scales``, learned scales) that
  are not finite."""
  if not bool(_all_finite((state.params, state.quant_scales if scales else {}))):
    manager.wait_until_finished()
    kept = manager.latest_step()
    raise FloatingPointError(
        f"non-finite parameters after step {done}; not saved, so the last "
        + (f"checkpoint (step {kept}) is kept" if kept is not None else
           "checkpoint is kept (there is none yet)")
        + "; lower config.lr or config.clip_norm and resume.")


def _validate(config: Any, cfg: LlamaConfig, mesh: Mesh) -> None:
  if config.seq_len > cfg.max_len:
    raise ValueError(f"config.seq_len={config.seq_len} exceeds model.max_len="
                     f"{cfg.max_len}.")
  m = mesh_lib.batch_size_multiple(mesh)
  if config.batch_size % m:
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"the number of devices the batch is split over ({m}, the data "
                     f"x fsdp axes of mesh {mesh_lib.mesh_string(mesh)!r}); change "
                     "--config.mesh / --config.num_devices or the batch size.")
  if config.steps < 1:
    raise ValueError(f"config.steps must be >= 1, got {config.steps}.")
  v = _get(config, "data_seed", 0)   # numpy's generator takes no negative seed
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise ValueError(f"config.data_seed must be an int >= 0, got {v!r}.")
  if config.log_every < 1:
    raise ValueError(f"config.log_every must be >= 1, got {config.log_every}.")
  if config.ckpt_every < 0:
    raise ValueError(f"config.ckpt_every must be >= 0 (0: only the final "
                     f"checkpoint), got {config.ckpt_every}.")
  keep = _get(config, "keep_checkpoints", 1)
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"config.keep_checkpoints must be an int >= 1 (the newest "
                     f"checkpoints kept; Orbax keeps none at 0), got {keep!r}.")


# What a resumed run's checkpoints were laid out by (a change here cannot
# restore them, or restores a different run) and what its data stream and
# start were: a resumed run keeps them. The schedule, optimizer
# hyperparameters, mesh, logging and evaluation may change; each change is
# recorded in the log's "start" event.
_RESUME_FIELDS = ("model", "quant", "optim", "data", "seq_len", "batch_size",
                  "data_seed", "seed", "init_from")


def _check_resume(workdir: pathlib.Path, config: Any, manager) -> list:
  """Raises when ``workdir`` holds checkpoints of a run made with another
  model, quantization, optimizer state or data than ``config`` asks for, or
  one already past ``config.steps`` (before its ``config.json`` is
  overwritten). Returns the fields that do change (``field=old (asked:
  new)``), for the log."""
  latest = manager.latest_step()
  if latest is None:
    return []
  if config.steps < latest:
    raise ValueError(
        f"{workdir} holds a run at step {latest}, past config.steps={config.steps}: "
        "nothing would train and its final evaluation would not be redone. Ask for "
        f"--config.steps >= {latest} to continue it, or use another --workdir.")
  if not (workdir / "config.json").exists():
    # Orbax checks shapes and dtypes only: moments of another state format
    # (int8 and fp8_e4m3 have the same) or another model would restore as
    # wrong numbers, so checkpoints whose run config is gone are not resumed.
    raise ValueError(
        f"{workdir} holds checkpoints (latest step {latest}) but not the "
        "config.json of the run that wrote them, so they cannot be checked "
        "against this config (orbax checks only shapes and dtypes: another "
        "optimizer state format restores as wrong numbers). Put the run's "
        "config.json back, or use another --workdir.")
  diff = state_lib.run_config_mismatch(workdir, config, only=_RESUME_FIELDS)
  # A recipe on one side only (a float run has no quant fields to compare).
  was = qat_lib.recipe_from_config(state_lib.read_run_config(workdir)) is not None
  now = qat_lib.recipe_from_config(config) is not None
  if was != now:
    diff = ", ".join(filter(None, [
        f"quantization-aware training {'on' if was else 'off'} "
        f"(asked: {'on' if now else 'off'})", diff]))
  if diff:
    raise ValueError(
        f"{workdir} holds checkpoints of a run with another config: {diff}. It "
        "cannot resume from them: use another --workdir, or delete this one to "
        "start over (steps, the schedule, optimizer hyperparameters, the mesh, "
        "logging and evaluation may change on resume).")
  return state_lib.config_differences(state_lib.read_run_config(workdir), config)


def run_optimizer(config: Any, recipe: "qat_lib.Recipe | None"
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optimizer (QAT: with the learned scales' own group) and schedule."""
  schedule = make_schedule(config.lr, config.warmup_steps, config.steps,
                           config.min_lr_ratio)
  kw = dict(min_lr_ratio=config.min_lr_ratio, weight_decay=config.weight_decay,
            b1=config.b1, b2=config.b2, eps=config.eps, clip_norm=config.clip_norm,
            state_format=_get(config, "optim.state_format", "float32"))
  tx = make_optimizer(config.lr, config.warmup_steps, config.steps, **kw)
  if recipe is not None:
    tx = recipe.optimizer(tx, schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                          clip_norm=config.clip_norm)
  return tx, schedule


def _init_from(config: Any, model: Llama, mesh: Mesh) -> Any:
  """Parameters of the float run in ``config.init_from`` (its latest checkpoint)."""
  src = pathlib.Path(config.init_from)
  src_config = state_lib.read_run_config(src)
  src_model = LlamaConfig(**src_config["model"])
  if src_model != model.config:
    raise ValueError(f"config.init_from={str(src)!r} trained a different model "
                     f"({src_model}); this run's model is {model.config}. Set "
                     "--config.model.* to match it.")
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  src_cfg = ConfigDict(src_config)
  src_recipe = qat_lib.recipe_from_config(src_cfg)
  src_tx, _ = run_optimizer(src_cfg, src_recipe)
  layout = run_layout(config, mesh)
  manager = state_lib.checkpoint_manager(src / "checkpoints")
  try:
    if manager.latest_step() is None:
      raise FileNotFoundError(f"config.init_from={str(src)!r} holds no checkpoint.")
    init = functools.partial(_fresh_state, model, src_tx, src_recipe, None)
    abstract = state_lib.abstract_state(model, src_tx, layout, init=init)
    restored = state_lib.restore_checkpoint(manager, abstract)
  finally:
    manager.close()
  return restored.params


def _fresh_state(model: Llama, tx: optax.GradientTransformation,
                 recipe: "qat_lib.Recipe | None", params: Any, rng: jax.Array
                 ) -> TrainState:
  if recipe is None:
    return state_lib.init_state(model, tx, rng, params=params)
  params = state_lib.init_params(model, rng) if params is None else params
  scales, qstate = recipe.placeholder_vars(model, params)
  return state_lib.init_state(model, tx, rng, params=params, quant_scales=scales,
                              quant_state=qstate, trainable=recipe.trainable)


def _floats(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _floats(v) for k, v in tree.items()}
  if isinstance(tree, (tuple, list)) and len(tree) == 1:  # a sown value
    tree = tree[0]
  arr = np.asarray(tree, np.float64)
  return float(arr) if arr.ndim == 0 else [float(v) for v in arr.reshape(-1)]


def train(config: Any, workdir: str | os.PathLike[str], *,
          data: LMData | None = None, stop_at: int | None = None
          ) -> dict[str, Any]:
  """Trains (or resumes training) a ``Llama`` LM on the stdlib corpus.

  Writes ``workdir/config.json``, ``workdir/log.jsonl`` (one record per log,
  eval and final-eval event), ``workdir/checkpoints/<step>`` and, at the end,
  ``workdir/final_eval.json``. With quantization (``config.quant.rules`` not
  ``"none"``) it also evaluates the real-quantized model and saves it to
  ``workdir/quantized`` (``lowbit_jax.checkpoint``; ``experiments/evaluate.py``
  reads it). If checkpoints exist the run resumes from the latest one; records
  between that checkpoint and a kill are logged again.

  Args:
    config: an ``ml_collections.ConfigDict`` as made by ``configs/train_lm.py``
      or ``configs/train_qat.py``.
    workdir: output directory.
    data: the corpus (default: ``load_data(config.model.vocab, config.cache_dir)``).
    stop_at: stop after this step as if the run were killed (no final
      checkpoint or evaluation unless it is a checkpoint step).

  Returns:
    ``{"step", "last_metrics", "final_eval" (None if stopped early),
    "num_params"}`` and, with quantization, ``"final_eval_real"`` and
    ``"quantized_dir"``.

  Raises:
    ValueError: for inconsistent config values (a bad mesh string, a layout
      the model does not divide, ...).
  """
  cfg = model_config(config)
  mesh = run_mesh(config)
  _validate(config, cfg, mesh)
  layout = run_layout(config, mesh)
  recipe = qat_lib.recipe_from_config(config)
  if recipe is not None and recipe.start_step >= config.steps:
    raise ValueError(
        f"config.quant.start_step={recipe.start_step} is not below config.steps="
        f"{config.steps}: quantization would never switch on, and the exported "
        "model would carry its learned scales' zero placeholders. Lower "
        "--config.quant.start_step or raise --config.steps.")
  model = Llama(cfg)
  tx, schedule = run_optimizer(config, recipe)
  # Lay the model out once, abstractly: a layout that does not fit fails here.
  init = functools.partial(_fresh_state, model, tx, recipe, None)
  abstract = state_lib.abstract_state(model, tx, layout, init=init)

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if data is None:
    data = load_data(cfg.vocab, config.cache_dir)
  if data.tokenizer.get_vocab_size() > cfg.vocab:
    raise ValueError(f"the tokenizer has {data.tokenizer.get_vocab_size()} tokens, "
                     f"more than model.vocab={cfg.vocab}.")

  common = dict(schedule=schedule, moe_aux_weight=config.moe_aux_weight,
                recipe=recipe)
  step_fn = make_train_step(model, tx, layout, **common)
  warm_fn = (make_train_step(model, tx, layout, quantized=False, **common)
             if recipe is not None else step_fn)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  start_step = recipe.start_step if recipe is not None else 0

  manager = state_lib.checkpoint_manager(workdir / "checkpoints",
                                         keep=config.keep_checkpoints)
  try:
    changes = _check_resume(workdir, config, manager)
  except ValueError:
    manager.close()
    raise
  log = _JsonlLog(workdir / "log.jsonl")

  def batch_at(step):
    return mesh_lib.shard_batch(
        stdlib_corpus.batch_at(data.train_tokens, step, config.batch_size,
                               config.seq_len, config.data_seed), mesh)

  try:
    state = state_lib.restore_checkpoint(manager, abstract)
    if state is None:
      params = None
      if _get(config, "init_from", ""):
        params = _init_from(config, model, mesh)
      state = _fresh_state(model, tx, recipe, params, jax.random.key(config.seed))
      state = state_lib.place(state, step_fn.shardings(state))
      if recipe is not None and start_step == 0:
        state = recipe.init_from_data(model, state, batch_at(0)[:, :-1], layout)
      resumed_from = None
    else:
      resumed_from = int(state.step)
    # Written once the state is in hand: a failed restore leaves the run's
    # own config (init_from and resume read it).
    _io.write_atomic(workdir / "config.json",
                     config.to_json(indent=1) if hasattr(config, "to_json")
                     else json.dumps(dict(config), indent=1))
    start = int(state.step)
    log.write({"event": "start", "step": start, "resumed_from": resumed_from,
               **({"config_changes": changes} if resumed_from is not None and changes
                  else {}),
               "num_params": num_params(state.params), "devices": mesh.size,
               "mesh": mesh_lib.mesh_string(mesh),
               "backend": jax.default_backend(),
               "quant": None if recipe is None else recipe.describe(),
               "train_tokens": int(data.train_tokens.size),
               "heldout_tokens": int(data.heldout_tokens.size)})
    last = stop_at if stop_at is not None else config.steps
    last = min(last, config.steps)
    metrics: dict[str, Any] = {}
    t0, tokens_since, step = time.perf_counter(), 0, start
    for step in range(start, last):
      batch = batch_at(step)
      if recipe is not None and step == start_step and step > 0:
        state = recipe.init_from_data(model, state, batch[:, :-1], layout)
      fn = step_fn if (recipe is None or step >= start_step) else warm_fn
      state, metrics = fn(state, batch)
      tokens_since += config.batch_size * config.seq_len
      done = step + 1
      if done % config.log_every == 0 or done == last:
        metrics = _floats(metrics)
        elapsed = time.perf_counter() - t0
        record = {"event": "train", "step": done, **metrics,
                  "tokens_per_s": tokens_since / elapsed}
        log.write(record)
        logging.info("step %d: loss %.4f", done, metrics["loss"])
        if not math.isfinite(metrics["loss"]):
          raise FloatingPointError(f"non-finite loss {metrics['loss']} at step "
                                   f"{done}; lower config.lr.")
        t0, tokens_since = time.perf_counter(), 0
      if config.eval_every and done % config.eval_every == 0 and done < config.steps:
        ev = _eval_fake(recipe, model, apply_fn, state, data, config, mesh,
                        config.eval_tokens, quantized=done > start_step)
        log.write({"event": "eval", "step": done, **ev})
        logging.info("eval at step %d: %s", done, ev)
        t0, tokens_since = time.perf_counter(), 0
      if (config.ckpt_every and done % config.ckpt_every == 0) or done == config.steps:
        # The loss is checked every log_every steps only: a state gone
        # non-finite in between must not replace the last good checkpoint.
        # (Learned scales are placeholders, NaN, until quantization starts.)
        _check_finite_state(state, done, manager,
                            scales=recipe is not None and done > start_step)
        state_lib.save_checkpoint(manager, state)
    final, final_real, qdir = None, None, None
    if int(state.step) == config.steps:
      max_tokens = 0 if config.final_eval_full else config.eval_tokens
      final = _eval_fake(recipe, model, apply_fn, state, data, config, mesh,
                         max_tokens, quantized=config.steps > start_step)
      log.write({"event": "final_eval", "step": config.steps, **final})
      logging.info("final eval: %s", final)
      if recipe is not None and _get(config, "save_quantized", True):
        qdir = workdir / "quantized"
        final_real = recipe.export(model, state, config, qdir, data=data,
                                   mesh=mesh, layout=layout, max_tokens=max_tokens)
        log.write({"event": "final_eval_real", "step": config.steps, **final_real})
        logging.info("final eval (real-quantized): %s", final_real)
      out = {"step": config.steps, **final}
      if final_real is not None:
        out["real"] = final_real
      _io.write_atomic(workdir / "final_eval.json", json.dumps(out, indent=1))
    manager.wait_until_finished()
    result = {"step": int(state.step), "last_metrics": metrics, "final_eval": final,
              "num_params": num_params(state.params)}
    if recipe is not None:
      result.update(final_eval_real=final_real,
                    quantized_dir=None if qdir is None else str(qdir))
    return result
  finally:
    manager.close()
    log.close()


def _eval_fake(recipe, model, apply_fn, state, data, config, mesh, max_tokens, *,
               quantized: bool):
  """Held-out metrics of the state (fake-quantized once quantization is on)."""
  if recipe is None or not quantized:
    return evaluate(apply_fn, state.params, data, seq_len=config.seq_len,
                    batch=config.eval_batch, max_tokens=max_tokens, mesh=mesh)
  variables = {"params": state.params,
               **recipe.collections(state.quant_scales, state.quant_state)}
  return evaluate(recipe.eval_apply(model), variables, data, seq_len=config.seq_len,
                  batch=config.eval_batch, max_tokens=max_tokens, mesh=mesh)


__all__ = ["STATE_FORMATS", "make_schedule", "adamw", "make_optimizer", "loss_fn",
           "train_step", "ShardedStep", "make_train_step", "split_constant_metrics",
           "shard_batch",
           "make_mesh", "replicate", "shard_state", "model_config", "LMData",
           "load_data", "evaluate", "run_mesh", "run_layout", "run_optimizer",
           "train"]
