"""Training library for the Llama-style decoder LM on the stdlib corpus.

Pure pieces (``make_optimizer``, ``init_state``, ``loss_fn``, ``train_step``,
``make_train_step``) and one loop, ``train(config, workdir)``, that adds data,
data-parallel sharding over a ``jax.sharding.Mesh``, periodic held-out
evaluation, Orbax checkpoints (a killed run resumes from the latest one and
continues with the very batches an uninterrupted run would see) and a JSON-lines
log ``workdir/log.jsonl``.

The optimizer is AdamW (Loshchilov & Hutter, 2019, "Decoupled Weight Decay
Regularization") with linear warmup and cosine decay, and global-norm gradient
clipping.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tokenizers
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowbit_jax.data import stdlib_corpus
from lowbit_jax.eval.perplexity import perplexity
from lowbit_jax.models.llama import Llama, LlamaConfig, num_params

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (a pytree).

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: model parameters.
    opt_state: optimizer state.
  """
  step: jax.Array
  params: Any
  opt_state: Any


def make_schedule(lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Returns linear warmup from 0 to ``lr``, then cosine decay to ``lr * min_lr_ratio``.

  Raises:
    ValueError: if the step counts or the ratio are out of range.
  """
  if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                     f"got warmup_steps={warmup_steps}, total_steps={total_steps}.")
  if not 0.0 <= min_lr_ratio <= 1.0:
    raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=lr * min_lr_ratio)


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, *,
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
  """Returns AdamW with warmup + cosine schedule and global-norm clipping.

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

  Returns:
    An ``optax.GradientTransformation``.
  """
  schedule = make_schedule(lr, warmup_steps, total_steps, min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=decay_mask)
  if clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
  return adamw


def init_state(model: Llama, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """Initialises parameters and optimizer state at step 0.

  Args:
    model: the model.
    tx: the optimizer.
    rng: a PRNG key for the parameter initialisation.

  Returns:
    A fresh ``TrainState``.
  """
  tokens = jnp.zeros((1, min(8, model.config.max_len)), jnp.int32)
  params = model.init(rng, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))


def loss_fn(params: Any, batch: jax.Array, *, model: Llama,
            moe_aux_weight: float = 0.01) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns the training loss and its parts for one batch.

  Args:
    params: model parameters.
    batch: ``int32 [B, T + 1]``; inputs ``[:, :-1]``, targets ``[:, 1:]``.
    model: the model.
    moe_aux_weight: weight of the mean (over layers) MoE load-balancing loss;
      ignored for dense models.

  Returns:
    ``(total_loss, {"loss": mean token cross-entropy, "moe_aux_loss": ...})``.
  """
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits, extra = model.apply({"params": params}, inputs, mutable=["losses"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  aux_terms = jax.tree.leaves(extra.get("losses", {}))
  aux = (sum(aux_terms) / len(aux_terms)) if aux_terms else jnp.zeros((), jnp.float32)
  return ce + moe_aux_weight * aux, {"loss": ce, "moe_aux_loss": aux}


def train_step(state: TrainState, batch: jax.Array, *, model: Llama,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule | None = None,
               moe_aux_weight: float = 0.01) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step (pure; jit it, e.g. with ``make_train_step``).

  Args:
    state: the current state.
    batch: ``int32 [B, T + 1]`` token windows.
    model: the model.
    tx: the optimizer.
    schedule: the learning-rate schedule, only to report ``lr``.
    moe_aux_weight: see ``loss_fn``.

  Returns:
    ``(new_state, metrics)`` with metrics ``loss``, ``moe_aux_loss``,
    ``grad_norm`` (before clipping) and ``lr`` (when ``schedule`` is given).
  """
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, moe_aux_weight=moe_aux_weight),
      has_aux=True)
  (_, metrics), grads = grad_fn(state.params, batch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                           for g in jax.tree.leaves(grads)))
  metrics = dict(metrics, grad_norm=grad_norm)
  if schedule is not None:
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_mesh(num_devices: int = 0) -> Mesh:
  """Returns a 1-D data-parallel mesh (axis ``"data"``) over the first devices.

  Args:
    num_devices: how many of ``jax.devices()`` to use; 0 means all.

  Raises:
    ValueError: if more devices are asked for than exist.
  """
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f"num_devices must be in [0, {len(devices)}] (0 = all), got "
                     f"{num_devices}.")
  n = num_devices or len(devices)
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def make_train_step(model: Llama, tx: optax.GradientTransformation, mesh: Mesh, *,
                    schedule: optax.Schedule | None = None,
                    moe_aux_weight: float = 0.01
                    ) -> Callable[[TrainState, jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Returns ``train_step`` jitted for data parallelism on ``mesh``.

  The state is replicated, the batch is split along its first axis over the
  ``"data"`` axis; the state argument is donated.
  """
  replicated = NamedSharding(mesh, P())
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           moe_aux_weight=moe_aux_weight)
  return jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """Places a host batch on ``mesh``, split along its first axis.

  Raises:
    ValueError: if the batch size is not a multiple of the mesh size.
  """
  if batch.shape[0] % mesh.size:
    raise ValueError(f"batch size {batch.shape[0]} must be a multiple of the "
                     f"number of devices {mesh.size}.")
  return jax.device_put(batch, NamedSharding(mesh, P(DATA_AXIS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


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
    """Returns the UTF-8 size of the text that a token stream encodes."""
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


def abstract_state(model: Llama, tx: optax.GradientTransformation,
                   mesh: Mesh) -> TrainState:
  """Returns the ``TrainState`` of ``jax.ShapeDtypeStruct`` (replicated on ``mesh``).

  It is the target ``restore_checkpoint`` restores into; nothing is computed.
  """
  shapes = jax.eval_shape(functools.partial(init_state, model, tx),
                          jax.random.key(0))
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def checkpoint_manager(directory: str | os.PathLike[str], *,
                       keep: int = 2) -> ocp.CheckpointManager:
  """Returns an Orbax ``CheckpointManager`` keeping the ``keep`` latest checkpoints."""
  return ocp.CheckpointManager(
      pathlib.Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState) -> None:
  """Saves ``state`` (asynchronously) under its step number."""
  manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, abstract: TrainState,
                       step: int | None = None) -> TrainState | None:
  """Restores the state at ``step`` (default: latest) or returns None if none.

  Args:
    manager: the checkpoint manager.
    abstract: a ``TrainState`` of ``jax.ShapeDtypeStruct`` (with shardings)
      giving the structure and placement to restore into.
    step: the step to restore; None for the latest.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


class _JsonlLog:
  """Appends one JSON object per line to a file."""

  def __init__(self, path: pathlib.Path):
    self._f = open(path, "a", encoding="utf-8")

  def write(self, record: Mapping[str, Any]) -> None:
    self._f.write(json.dumps(dict(record)) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _validate(config: Any, cfg: LlamaConfig, mesh: Mesh) -> None:
  if config.seq_len > cfg.max_len:
    raise ValueError(f"config.seq_len={config.seq_len} exceeds model.max_len="
                     f"{cfg.max_len}.")
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"the number of devices ({mesh.size}); set "
                     "--config.num_devices or change the batch size.")
  if config.steps < 1:
    raise ValueError(f"config.steps must be >= 1, got {config.steps}.")


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
             data: LMData, *, seq_len: int, batch: int, max_tokens: int = 0,
             mesh: Mesh | None = None) -> dict[str, float | int | None]:
  """Held-out loss, perplexity and bits/byte on the first ``max_tokens`` tokens.

  Args:
    apply_fn: ``apply_fn(params, tokens) -> logits``.
    params: the parameters.
    data: the corpus.
    seq_len: context length.
    batch: windows per forward pass.
    max_tokens: evaluate on this prefix of the held-out stream (0: all of it).
    mesh: if given and ``batch`` is a multiple of its size, each eval batch is
      split over its ``"data"`` axis.

  Returns:
    ``perplexity(...)``'s dict; ``bits_per_byte`` is exact for the prefix.
  """
  tokens = data.heldout_tokens
  if max_tokens:
    tokens = tokens[:max_tokens]
  sharding = None
  if mesh is not None and batch % mesh.size == 0:
    sharding = NamedSharding(mesh, P(DATA_AXIS))
  # The first token is never scored: it carries no bytes (it is EOS).
  return perplexity(apply_fn, params, tokens, seq_len, batch,
                    num_bytes=data.num_bytes(tokens[1:]), batch_sharding=sharding)


def train(config: Any, workdir: str | os.PathLike[str], *,
          data: LMData | None = None, stop_at: int | None = None
          ) -> dict[str, Any]:
  """Trains (or resumes training) a ``Llama`` LM on the stdlib corpus.

  Writes ``workdir/config.json``, ``workdir/log.jsonl`` (one record per log,
  eval and final-eval event), ``workdir/checkpoints/<step>`` and, at the end,
  ``workdir/final_eval.json``. If checkpoints exist the run resumes from the
  latest one; records between that checkpoint and a kill are logged again.

  Args:
    config: an ``ml_collections.ConfigDict`` as made by ``configs/train_lm.py``.
    workdir: output directory.
    data: the corpus (default: ``load_data(config.model.vocab, config.cache_dir)``).
    stop_at: stop after this step as if the run were killed (no final
      checkpoint or evaluation unless it is a checkpoint step).

  Returns:
    ``{"step", "last_metrics", "final_eval" (None if stopped early),
    "num_params"}``.

  Raises:
    ValueError: for inconsistent config values.
  """
  cfg = model_config(config)
  mesh = make_mesh(config.num_devices)
  _validate(config, cfg, mesh)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if data is None:
    data = load_data(cfg.vocab, config.cache_dir)
  if data.tokenizer.get_vocab_size() > cfg.vocab:
    raise ValueError(f"the tokenizer has {data.tokenizer.get_vocab_size()} tokens, "
                     f"more than model.vocab={cfg.vocab}.")

  model = Llama(cfg)
  schedule = make_schedule(config.lr, config.warmup_steps, config.steps,
                           config.min_lr_ratio)
  tx = make_optimizer(config.lr, config.warmup_steps, config.steps,
                      min_lr_ratio=config.min_lr_ratio,
                      weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
                      eps=config.eps, clip_norm=config.clip_norm)
  step_fn = make_train_step(model, tx, mesh, schedule=schedule,
                            moe_aux_weight=config.moe_aux_weight)
  apply_fn = lambda p, x: model.apply({"params": p}, x)

  (workdir / "config.json").write_text(config.to_json(indent=1)
                                       if hasattr(config, "to_json")
                                       else json.dumps(dict(config), indent=1))
  manager = checkpoint_manager(workdir / "checkpoints",
                               keep=config.keep_checkpoints)
  log = _JsonlLog(workdir / "log.jsonl")
  try:
    state = restore_checkpoint(manager, abstract_state(model, tx, mesh))
    if state is None:
      state = replicate(init_state(model, tx, jax.random.key(config.seed)), mesh)
      resumed_from = None
    else:
      resumed_from = int(state.step)
    start = int(state.step)
    log.write({"event": "start", "step": start, "resumed_from": resumed_from,
               "num_params": num_params(state.params), "devices": mesh.size,
               "backend": jax.default_backend(),
               "train_tokens": int(data.train_tokens.size),
               "heldout_tokens": int(data.heldout_tokens.size)})
    last = stop_at if stop_at is not None else config.steps
    last = min(last, config.steps)
    metrics: dict[str, Any] = {}
    t0, tokens_since, step = time.perf_counter(), 0, start
    for step in range(start, last):
      batch = stdlib_corpus.batch_at(data.train_tokens, step, config.batch_size,
                                     config.seq_len, config.data_seed)
      state, metrics = step_fn(state, shard_batch(batch, mesh))
      tokens_since += config.batch_size * config.seq_len
      done = step + 1
      if done % config.log_every == 0 or done == last:
        metrics = {k: float(v) for k, v in metrics.items()}
        elapsed = time.perf_counter() - t0
        record = {"event": "train", "step": done, **metrics,
                  "tokens_per_s": tokens_since / elapsed}
        log.write(record)
        logging.info("%s", record)
        if not math.isfinite(metrics["loss"]):
          raise FloatingPointError(f"non-finite loss {metrics['loss']} at step "
                                   f"{done}; lower config.lr.")
        t0, tokens_since = time.perf_counter(), 0
      if config.eval_every and done % config.eval_every == 0 and done < config.steps:
        ev = evaluate(apply_fn, state.params, data, seq_len=config.seq_len,
                      batch=config.eval_batch, max_tokens=config.eval_tokens,
                      mesh=mesh)
        log.write({"event": "eval", "step": done, **ev})
        logging.info("eval at step %d: %s", done, ev)
        t0, tokens_since = time.perf_counter(), 0
      if done % config.ckpt_every == 0 or done == config.steps:
        save_checkpoint(manager, state)
    final = None
    if int(state.step) == config.steps:
      final = evaluate(apply_fn, state.params, data, seq_len=config.seq_len,
                       batch=config.eval_batch, mesh=mesh,
                       max_tokens=0 if config.final_eval_full else config.eval_tokens)
      log.write({"event": "final_eval", "step": config.steps, **final})
      logging.info("final eval: %s", final)
      (workdir / "final_eval.json").write_text(json.dumps(
          {"step": config.steps, **final}, indent=1))
    manager.wait_until_finished()
    return {"step": int(state.step), "last_metrics": metrics, "final_eval": final,
            "num_params": num_params(state.params)}
  finally:
    manager.close()
    log.close()
