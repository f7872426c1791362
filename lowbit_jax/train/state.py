"""The training state (a pytree), its placement on a mesh, and Orbax checkpoints.

``TrainState`` holds everything a run carries from step to step: the step,
parameters, optimizer state, learned quantization scales (``quant_scales``),
quantization state such as amax histories (``quant_state``) and the raw data
of a PRNG key (stochastic rounding takes ``fold_in(key, step)``). A checkpoint
is the whole state, so a resumed run continues bit for bit; it restores onto
any mesh (``abstract_state(..., layout=)`` gives the target placement).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lowbit_jax import _io
from lowbit_jax.train.sharding import Layout


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (a pytree).

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: model parameters.
    opt_state: optimizer state (of ``params``, or of ``{"params",
      "quant_scales"}`` when scales are learned).
    quant_scales: learned quantization scales (``{}`` in float training).
    quant_state: non-trainable quantization state, e.g. amax histories of
      delayed scaling (``{}`` when there is none).
    rng: ``uint32`` raw key data (``jax.random.key_data``); the key of step
      ``s`` is ``fold_in(wrap_key_data(rng), s)``.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  quant_scales: Any = dataclasses.field(default_factory=dict)
  quant_state: Any = dataclasses.field(default_factory=dict)
  rng: Any = None

  def step_key(self) -> jax.Array:
    """The PRNG key of the current step (for stochastic rounding)."""
    if self.rng is None:
      raise ValueError("this TrainState has no rng; build it with init_state")
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def init_params(model: Any, rng: jax.Array, seq_len: int | None = None) -> Any:
  """Initialises a model's parameters on a dummy ``[1, T]`` token batch."""
  t = min(8, model.config.max_len) if seq_len is None else seq_len
  return model.init(rng, jnp.zeros((1, t), jnp.int32))["params"]


def init_state(model: Any, tx: optax.GradientTransformation, rng: jax.Array, *,
               params: Any = None, quant_scales: Any = None,
               quant_state: Any = None,
               trainable: Callable[[Any, Any], Any] | None = None) -> TrainState:
  """A fresh ``TrainState`` at step 0.

  Args:
    model: the model (``model.init(rng, tokens)``).
    tx: the optimizer.
    rng: a PRNG key: the parameters are initialised with it, the state's own
      key is ``fold_in(rng, 1)``.
    params: parameters to start from (default: initialised from ``rng``).
    quant_scales: learned scales (default ``{}``).
    quant_state: quantization state (default ``{}``).
    trainable: ``trainable(params, quant_scales)`` -> the tree ``tx``
      optimizes (default: ``params``).

  Returns:
    The state (not placed on any mesh).
  """
  if params is None:
    params = init_params(model, rng)
  quant_scales = {} if quant_scales is None else quant_scales
  quant_state = {} if quant_state is None else quant_state
  target = params if trainable is None else trainable(params, quant_scales)
  key = jax.random.key_data(jax.random.fold_in(rng, 1))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(target), quant_scales=quant_scales,
                    quant_state=quant_state, rng=key)


def state_shardings(state: TrainState, layout: Layout | Mesh) -> TrainState:
  """The ``TrainState`` of NamedShardings ``layout`` gives ``state``.

  Parameters follow the rules; optimizer leaves follow their parameter
  (quantized moments block-wise); learned scales follow their weight;
  the step, quantization state and key are replicated. A ``Mesh`` stands for
  ``Layout(mesh)`` (``LLAMA_RULES``), as in ``shard_state``.
  """
  if isinstance(layout, Mesh):
    layout = Layout(layout)
  elif not isinstance(layout, Layout):
    raise TypeError(f"layout must be a train.Layout or a jax Mesh, got "
                    f"{type(layout).__name__}")
  rep = layout.replicated
  owners = layout.owners(state.params, state.quant_scales)
  return TrainState(
      step=rep,
      params=layout.params(state.params),
      opt_state=layout.like(state.opt_state, owners),
      quant_scales=layout.scales(state.quant_scales, state.params),
      quant_state=jax.tree.map(lambda _: rep, state.quant_state),
      rng=None if state.rng is None else rep)


def place(state: Any, shardings: Any) -> Any:
  """``jax.device_put`` of a state onto its shardings (QArray-aware)."""
  return jax.device_put(state, shardings)


def abstract_like(state: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` s of ``state`` carrying ``shardings``."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
      shardings)


def abstract_state(model: Any, tx: optax.GradientTransformation,
                   mesh_or_layout: Mesh | Layout, *,
                   init: Callable[[jax.Array], TrainState] | None = None
                   ) -> TrainState:
  """The ``TrainState`` of ``jax.ShapeDtypeStruct`` (with shardings).

  It is the target ``restore_checkpoint`` restores into; nothing is computed.

  Args:
    model: the model.
    tx: the optimizer.
    mesh_or_layout: a Mesh (float layout by ``LLAMA_RULES``) or a Layout.
    init: ``init(rng) -> TrainState`` building the run's state (default:
      ``init_state(model, tx, rng)``); pass the same one the run uses.
  """
  layout = (mesh_or_layout if isinstance(mesh_or_layout, Layout)
            else Layout(mesh_or_layout))
  init = init or functools.partial(init_state, model, tx)
  shapes = jax.eval_shape(init, jax.random.key(0))
  return abstract_like(shapes, state_shardings(shapes, layout))


def checkpoint_manager(directory: str | os.PathLike[str], *,
                       keep: int = 2) -> ocp.CheckpointManager:
  """An Orbax ``CheckpointManager`` keeping the ``keep`` latest checkpoints.

  Raises:
    ValueError: ``directory`` holds ``[...]`` or a backslash, under which
      orbax writes checkpoints that cannot be restored (a run could not resume).
  """
  _io.check_orbax_path(directory, "training checkpoints in")
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
      giving the structure and placement to restore into; its mesh may differ
      from the one the checkpoint was saved from. Orbax checks only shapes and
      dtypes: it must come from the optimizer that wrote the checkpoint (a
      quantized moment's format is not stored: int8 and fp8_e4m3 moments
      have the same arrays). ``train`` checks this against the run's
      ``config.json``.
    step: the step to restore; None for the latest.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def read_run_config(workdir: str | os.PathLike[str]) -> dict:
  """The ``config.json`` a training run wrote into ``workdir``.

  Raises:
    FileNotFoundError: ``workdir`` holds no training run.
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: {workdir} is not the workdir of a "
                            "lowbit_jax training run (experiments/train_lm.py).")
  return read_json(path)


# Config fields that change how a run is driven, not what it computes: a
# finished run is reused (a sweep, a study) whatever they are.
RUN_ONLY_FIELDS = ("cache_dir", "mesh", "num_devices", "sharding", "log_every",
                   "eval_every", "eval_tokens", "eval_batch", "final_eval_full",
                   "ckpt_every", "keep_checkpoints")


def run_fingerprint(workdir: str | os.PathLike[str]) -> str:
  """12 hex digits identifying the finished run in ``workdir`` (its
  ``config.json`` and ``final_eval.json``): what was trained from it, or
  measured on it, records it, so a run retrained there since is noticed."""
  h = hashlib.sha1()
  for name in ("config.json", "final_eval.json"):
    h.update((pathlib.Path(workdir) / name).read_bytes())
  return h.hexdigest()[:12]


def read_json(path: str | os.PathLike[str]) -> Any:
  """A JSON file a run wrote; one that does not parse raises naming it.

  Raises:
    ValueError: the file is not valid JSON (written by hand, or torn by a
      version that did not write atomically): the message names it.
  """
  text = pathlib.Path(path).read_text()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): it was cut short or edited. "
                     "Restore it (a run's checkpoints are resumed only when its "
                     "config.json says what wrote them)") from e


def _flat(d: Any, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(stored: dict, asked: Any, *, only: tuple = (),
                       ignore: tuple = ()) -> list:
  """``["field=stored (asked: new)", ...]``: where a run's ``config.json``
  (``stored``) and a config differ, by dotted field name.

  Args:
    stored: the JSON dict a run wrote (``read_run_config``).
    asked: a config (``ml_collections.ConfigDict`` or a dict).
    only: compare only fields under these top-level names (empty: all).
    ignore: top-level names never compared.

  Fields only one side has (an option added since the run) are not compared.
  """
  asked = json.loads(asked.to_json()) if hasattr(asked, "to_json") else dict(asked)
  a, b = _flat(stored), _flat(asked)
  keys = sorted(k for k in a.keys() & b.keys()
                if (not only or k.split(".")[0] in only)
                and k.split(".")[0] not in ignore and a[k] != b[k])
  return [f"{k}={a[k]!r} (asked: {b[k]!r})" for k in keys]


def run_config_mismatch(workdir: str | os.PathLike[str], config: Any, *,
                        only: tuple = (), ignore: tuple = ()) -> str | None:
  """How the run in ``workdir`` (its ``config.json``) differs from ``config``
  (``config_differences``, at most 8 named), or None: no difference, or no
  run there."""
  if not (pathlib.Path(workdir) / "config.json").exists():
    return None
  diff = config_differences(read_run_config(workdir), config, only=only,
                            ignore=ignore)
  if not diff:
    return None
  return ", ".join(diff[:8]) + ("" if len(diff) <= 8 else f" and {len(diff) - 8} more")


__all__ = ["TrainState", "init_params", "init_state", "state_shardings", "place",
           "abstract_like", "abstract_state", "checkpoint_manager",
           "save_checkpoint", "restore_checkpoint", "read_run_config",
           "config_differences", "run_config_mismatch", "read_json",
           "run_fingerprint", "RUN_ONLY_FIELDS"]
