"""Quantization-aware and low-bit training recipes: config -> rules -> step pieces.

A ``Recipe`` turns ``config.quant`` into ``QuantRule`` s for
``lowbit_jax.flax.quantize_linen`` and supplies what the training step needs
around them:

* the variables the quantizer reads (``"quant_scales"``: learned LSQ step
  sizes, Esser et al. 2020, "Learned Step Size Quantization", and PACT clips,
  Choi et al. 2018; ``"quant_state"``: amax histories of delayed scaling,
  Micikevicius et al. 2022, "FP8 Formats for Deep Learning"), initialised from
  the data when quantization switches on (``quant.start_step``);
* the optimizer: ``optax.multi_transform`` with the parameters' AdamW and an
  Adam of the learned scales at ``scale_lr_mult`` times the learning rate (or
  frozen scales), without weight decay;
* LSQ's gradient scale ``g = 1 / sqrt(N * Qp)`` on the step-size gradients
  (``N``: elements per weight scale, or the layer's input features for an
  activation step size; ``Qp``: the format's largest level), applied by the
  rules (``QuantRule.lsq_grad_scale``; ``quant.lsq_grad_scale=False`` gives
  the plain LSQ gradient of eq. 3);
* statistics to log (scale mean/min/max per layer; clipped fractions come
  from the quantizer's ``"quant_metrics"``);
* the export: real-mode conversion with the learned scales, held-out
  perplexity of the packed model, and a ``lowbit_jax.checkpoint`` that
  ``experiments/evaluate.py`` reads.

Schemes (``quant.rules``; ``weight``/``activation``/``grad``/``group_size``/
``scaling`` override their fields):

==============  ==========  ===========  ===========  =========  ================
name            weight      activation   grad         scaling    learned (default)
==============  ==========  ===========  ===========  =========  ================
none            -           -            -            -          -
w4a8            int4        int8         -            current    lsq / lsq
w8a8            int8        int8         -            current    lsq / lsq
w4a4_mxfp4      mxfp4       mxfp4        -            current    - / -
w4a4_nvfp4      nvfp4       nvfp4        -            current    - / -
fp8             fp8_e4m3    fp8_e4m3     fp8_e5m2     current    - / -
fp8_delayed     fp8_e4m3    fp8_e4m3     fp8_e5m2     delayed    - / -
mxfp8           mxfp8_e4m3  mxfp8_e4m3   mxfp8_e5m2   current    - / -
mxfp4           mxfp4       mxfp4        mxfp8_e5m2   current    - / -
==============  ==========  ===========  ===========  =========  ================
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax._rules import QuantRule, path_str
from lowbit_jax.core import QuantSpec
from lowbit_jax.formats import BlockFormat

SCALES = "quant_scales"
STATE = "quant_state"
METRICS = "quant_metrics"
LEARN = ("lsq", "pact", "none")
META_FILE = "lowbit_train.json"


@dataclasses.dataclass(frozen=True)
class Scheme:
  """A named training scheme: formats, scaling and default learned ranges."""
  weight: str | None
  activation: str | None
  grad: str | None = None
  scaling: str = "current"
  learn_weight: str = "none"
  learn_activation: str = "none"


SCHEMES: dict[str, Scheme] = {
    "none": Scheme(None, None),
    "w4a8": Scheme("int4", "int8", learn_weight="lsq", learn_activation="lsq"),
    "w8a8": Scheme("int8", "int8", learn_weight="lsq", learn_activation="lsq"),
    "w4a4_mxfp4": Scheme("mxfp4", "mxfp4"),
    "w4a4_nvfp4": Scheme("nvfp4", "nvfp4"),
    "fp8": Scheme("fp8_e4m3", "fp8_e4m3", "fp8_e5m2"),
    "fp8_delayed": Scheme("fp8_e4m3", "fp8_e4m3", "fp8_e5m2", scaling="delayed"),
    "mxfp8": Scheme("mxfp8_e4m3", "mxfp8_e4m3", "mxfp8_e5m2"),
    "mxfp4": Scheme("mxfp4", "mxfp4", "mxfp8_e5m2"),
}


def _get(node: Any, key: str, default: Any) -> Any:
  try:
    value = node[key]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def _learn(value: str, field: str) -> str | None:
  if value not in LEARN:
    raise ValueError(f"config.quant.{field} must be one of {LEARN} (or '' for the "
                     f"scheme's default), got {value!r}.")
  return None if value == "none" else value


def _spec(name: str, group_size: int, *, stochastic: bool = False
          ) -> QuantSpec | None:
  if not name:
    return None
  kw: dict[str, Any] = {"pad": True}
  if group_size:
    kw["group_size"] = group_size
  if stochastic:
    kw["rounding"] = "stochastic"
  spec = QuantSpec(name, **kw)
  if group_size and isinstance(spec.format, BlockFormat):
    raise ValueError(f"config.quant.group_size={group_size} applies to scalar "
                     f"formats; {name!r} is a block format with blocks of "
                     f"{spec.format.block_size}. Set --config.quant.group_size=0.")
  return spec


def make_rules(quant: Mapping[str, Any] | Any) -> list[QuantRule]:
  """The QuantRules ``config.quant`` describes (``[]`` for ``rules="none"``).

  Fields read (all optional but ``rules``): ``rules`` (a name from
  ``SCHEMES``), ``weight``/``activation``/``grad`` (format names overriding
  the scheme's; ``"none"`` drops one), ``group_size`` (0: per channel /
  the format's blocks; weights only), ``grad_stochastic`` (stochastic rounding of the
  gradient), ``scaling``, ``amax_history_len``, ``learn_weight`` /
  ``learn_activation`` (``"lsq"``, ``"pact"``, ``"none"``; ``""``: the
  scheme's default), ``scale_init`` (how LSQ step sizes start: ``"lsq"``,
  the paper's ``2 mean|x| / sqrt(Qp)``, or ``"amax"``, the fixed-amax scale,
  so QAT from a trained model starts from its PTQ quantization), ``layers`` (regex of the layers to quantize) and
  ``exclude`` (regex of layers kept in float).

  Raises:
    ValueError: an unknown scheme or option, or options the rules reject.
  """
  name = _get(quant, "rules", "none")
  if name not in SCHEMES:
    raise ValueError(f"config.quant.rules={name!r} is not a scheme; use one of "
                     f"{sorted(SCHEMES)} (and override formats with "
                     "--config.quant.weight/activation/grad).")
  scheme = SCHEMES[name]

  def fmt(field):
    v = _get(quant, field, "") or getattr(scheme, field)
    return None if v in (None, "none") else v

  weight, act, grad = fmt("weight"), fmt("activation"), fmt("grad")
  if weight is None and act is None and grad is None:
    return []
  gs = int(_get(quant, "group_size", 0))
  lw = _learn(_get(quant, "learn_weight", "") or scheme.learn_weight, "learn_weight")
  la = _learn(_get(quant, "learn_activation", "") or scheme.learn_activation,
              "learn_activation")
  if lw == "pact":
    raise ValueError("config.quant.learn_weight='pact' is not a thing: PACT learns "
                     "an activation clip. Use 'lsq' or 'none'.")
  scaling = _get(quant, "scaling", "") or scheme.scaling
  scale_init = _get(quant, "scale_init", "") or "lsq"
  if "lsq" not in (lw if weight else None, la if act else None):
    scale_init = "lsq"  # nothing is an LSQ step size: the option has no subject
  rule = QuantRule(
      _get(quant, "layers", ".*"),
      weight=_spec(weight, gs),
      activation=_spec(act, 0),
      grad=_spec(grad, 0, stochastic=bool(_get(quant, "grad_stochastic", False))),
      learn_weight=lw if weight else None,
      learn_activation=la if act else None,
      scaling=scaling,
      amax_history_len=int(_get(quant, "amax_history_len", 16)),
      scale_init=scale_init,
      lsq_grad_scale=bool(_get(quant, "lsq_grad_scale", True)),
      ops=("dot_general", "einsum"))
  exclude = _get(quant, "exclude", "")
  return ([QuantRule(exclude)] if exclude else []) + [rule]


def recipe_from_config(config: Any) -> "Recipe | None":
  """The run's recipe, or None when ``config.quant`` is missing or ``"none"``."""
  quant = _get(config, "quant", None)
  if quant is None:
    return None
  rules = make_rules(quant)
  if not rules:
    return None
  return Recipe(
      rules=tuple(rules),
      start_step=int(_get(quant, "start_step", 0)),
      scale_lr_mult=float(_get(quant, "scale_lr_mult", 1.0)),
      freeze_scales=bool(_get(quant, "freeze_scales", False)),
      lsq_grad_scale=bool(_get(quant, "lsq_grad_scale", True)),
      settings=dict(quant.to_dict() if hasattr(quant, "to_dict") else quant))


def global_norm_clip(clip_norm: float) -> optax.GradientTransformation:
  """Global-norm clipping at ``clip_norm``, or identity at 0. Chained first
  either way, so that an optimizer's state has one structure whatever
  ``clip_norm`` is (a run resumed with clipping switched on or off restores)."""
  return optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity()


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
  """A QAT / low-bit training recipe (see the module docstring).

  Attributes:
    rules: the QuantRules.
    start_step: float warm-up steps before quantization switches on.
    scale_lr_mult: learning-rate multiplier of the learned scales.
    freeze_scales: keep learned scales at their data-initialised values.
    lsq_grad_scale: scale LSQ step-size gradients by ``1 / sqrt(N * Qp)``.
    settings: the ``config.quant`` fields (logged and exported).
  """
  rules: tuple
  start_step: int = 0
  scale_lr_mult: float = 1.0
  freeze_scales: bool = False
  lsq_grad_scale: bool = True
  settings: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.start_step < 0:
      raise ValueError(f"config.quant.start_step must be >= 0, got {self.start_step}.")
    if self.scale_lr_mult < 0:
      raise ValueError("config.quant.scale_lr_mult must be >= 0, got "
                       f"{self.scale_lr_mult}.")

  # -- quantizers ---------------------------------------------------------------

  @functools.cached_property
  def fake(self):
    """The fake-mode Linen quantizer (``q(model.apply)``)."""
    from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
    return quantize_linen(list(self.rules), mode="fake")

  def real(self, use_kernel: str = "auto"):
    """A real-mode Linen quantizer of the same rules."""
    from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
    return quantize_linen(list(self.rules), mode="real", use_kernel=use_kernel)

  @property
  def stochastic(self) -> bool:
    """Whether some spec rounds stochastically (the forward needs a key)."""
    return any(s is not None and s.rounding == "stochastic"
               for r in self.rules for s in (r.weight, r.activation, r.grad))

  def describe(self) -> dict:
    """JSON-able description for logs: settings and the rules' specs."""
    def spec(s):
      if s is None:
        return None
      out = s.format.name
      if s.group_size is not None and not isinstance(s.format, BlockFormat):
        out += f"_g{s.group_size}"
      return out + ("_sr" if s.rounding == "stochastic" else "")
    return {"settings": _jsonable(self.settings),
            "rules": [{"path": r.path, "weight": spec(r.weight),
                       "activation": spec(r.activation), "grad": spec(r.grad),
                       "learn_weight": r.learn_weight,
                       "learn_activation": r.learn_activation,
                       "scaling": r.scaling} for r in self.rules]}

  @staticmethod
  def collections(quant_scales: Any, quant_state: Any) -> dict:
    """The variable collections the quantizer reads (empty ones left out)."""
    out = {}
    if jax.tree.leaves(quant_scales):
      out[SCALES] = quant_scales
    if jax.tree.leaves(quant_state):
      out[STATE] = quant_state
    return out

  # -- variables ----------------------------------------------------------------

  def _init_vars(self, model, params, inputs) -> tuple[Any, Any]:
    kw = {"rngs": {"quant": jax.random.key(0)}} if self.stochastic else {}
    out = self.fake.init_quant_vars(model, {"params": params}, inputs, **kw)
    self._check_rules_matched(params)
    return dict(out.get(SCALES, {})), dict(out.get(STATE, {}))

  def _check_rules_matched(self, params) -> None:
    """Raises when a rule matched no layer: a ``config.quant.layers`` that
    matches nothing would train (and export) a float model, silently."""
    unused = self.fake.unused_rules()
    if not unused:
      return
    layers = sorted({path_str(kp[:-1])
                     for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                     if path_str(kp[-1:]) == "kernel"})
    raise ValueError(
        "config.quant: the layer regex "
        + ", ".join(repr(r.path) for r in unused)
        + " matched no layer of the model (as config.quant.layers it would "
        "quantize nothing and train a float model; as config.quant.exclude it "
        "excludes nothing). A regex must match a whole layer path, e.g. "
        + ", ".join(repr(p) for p in layers[:4])
        + (f" ({len(layers)} layers)" if len(layers) > 4 else "")
        + "; use '.*' around a fragment ('.*q_proj').")

  def placeholder_vars(self, model, params) -> tuple[Any, Any]:
    """``quant_scales``/``quant_state`` of the right structure, without data:
    NaN learned scales and zero histories. ``init_from_data`` must replace
    them before a quantized step: a step on the placeholders gives a NaN loss
    (zero scales gave zero gradients, and the scales never moved)."""
    t = min(8, model.config.max_len)
    scales, qstate = jax.eval_shape(
        lambda p: self._init_vars(model, p, jnp.zeros((1, t), jnp.int32)), params)
    return (jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), scales),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), qstate))

  def init_from_data(self, model, state, inputs: jax.Array, layout):
    """``state`` with scales and histories initialised from a batch's inputs.

    Runs sharded: the result is laid out like the state's own.
    """
    from lowbit_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
    shard = state_lib.state_shardings(state, layout)
    fn = jax.jit(functools.partial(self._init_vars, model),
                 out_shardings=(shard.quant_scales, shard.quant_state))
    scales, qstate = fn(state.params, inputs)
    if jax.tree.structure(scales) != jax.tree.structure(state.quant_scales):
      raise ValueError("the quantizer's learned scales do not have the structure "
                       "the state was built with; the model or rules changed.")
    return state.replace(quant_scales=scales, quant_state=qstate)

  # -- optimizer ----------------------------------------------------------------

  @staticmethod
  def trainable(params: Any, quant_scales: Any) -> dict:
    """The tree the optimizer sees: ``{"params": ..., "quant_scales": ...}``."""
    return {"params": params, SCALES: quant_scales}

  @staticmethod
  def split(tree: Mapping[str, Any], quant_scales: Any) -> tuple[Any, Any]:
    """``(params, quant_scales)`` back from a ``trainable`` tree."""
    del quant_scales
    return tree["params"], tree[SCALES]

  def optimizer(self, params_tx: optax.GradientTransformation,
                schedule: optax.Schedule, *, b1: float, b2: float, eps: float,
                clip_norm: float) -> optax.GradientTransformation:
    """``multi_transform``: ``params_tx`` on params, Adam on the scales.

    The scales' learning rate is ``scale_lr_mult * schedule(step)``, without
    weight decay, with its own global-norm clip; ``freeze_scales`` zeroes
    their updates. ``step`` is the training step: the scales' Adam counts only
    its own updates, which start at ``start_step`` (``keep_scale_state`` holds
    its state through the float warm-up), so its count is offset by it.
    """
    if self.freeze_scales:
      scale_tx = optax.set_to_zero()
    else:
      mult, start = self.scale_lr_mult, self.start_step
      scale_tx = optax.adam(lambda s: mult * schedule(s + start), b1=b1, b2=b2,
                            eps=eps)
      scale_tx = optax.chain(global_norm_clip(clip_norm), scale_tx)

    def labels(tree):
      return {"params": jax.tree.map(lambda _: "params", tree["params"]),
              SCALES: jax.tree.map(lambda _: "scales", tree[SCALES])}

    return optax.multi_transform({"params": params_tx, "scales": scale_tx}, labels)

  @staticmethod
  def keep_scale_state(new: Any, old: Any) -> Any:
    """``new`` multi_transform state with the scales' inner state from ``old``."""
    inner = dict(new.inner_states)
    inner["scales"] = old.inner_states["scales"]
    return new._replace(inner_states=inner)


  # -- evaluation and export ----------------------------------------------------

  def eval_apply(self, model):
    """``apply(variables, tokens) -> logits`` in fake mode (cached per model)."""
    cache = self.__dict__.setdefault("_eval_apply", {})
    if model not in cache:
      q = self.fake
      stochastic = self.stochastic

      def apply(variables, tokens):
        rngs = {"quant": jax.random.key(0)} if stochastic else None
        return q(model.apply)(variables, tokens, rngs=rngs)

      cache[model] = apply
    return cache[model]

  def export(self, model, state, config, directory: str | os.PathLike[str], *,
             data, mesh, layout, max_tokens: int = 0) -> dict:
    """Real-quantizes the state, evaluates it and saves it to ``directory``.

    The packed parameters (``QWeight`` s made with the learned scales), the
    learned scales and the quantization state are written with
    ``lowbit_jax.checkpoint.save``, and ``META_FILE`` beside them records the
    model and quantization config (``experiments/evaluate.py`` reads both).

    Returns:
      the real-mode held-out metrics (``perplexity``'s dict) plus
      ``param_bytes`` (packed) and ``float_param_bytes``.
    """
    from lowbit_jax import checkpoint  # pylint: disable=g-import-not-at-top
    from lowbit_jax.train import loop  # pylint: disable=g-import-not-at-top
    directory = pathlib.Path(directory)
    variables = {"params": state.params,
                 **self.collections(state.quant_scales, state.quant_state)}
    q = self.real()
    example = jnp.zeros((1, config.seq_len), jnp.int32)
    qvars = q.quantize_params(model, variables, example)
    # Packed weights follow the rules where whole scale blocks land on each
    # device; a dim whose split would break blocks (per-channel scales over
    # an FSDP-split K) stays whole here instead of failing the export.
    packed = dataclasses.replace(layout, on_block_split="replicate")
    qvars = jax.device_put(qvars, {**jax.tree.map(lambda _: layout.replicated,
                                                  {k: v for k, v in qvars.items()
                                                   if k != "params"}),
                                   "params": packed.params(qvars["params"])})
    apply = q(lambda v, x: model.apply(v, x))
    metrics = loop.evaluate(apply, qvars, data, seq_len=config.seq_len,
                            batch=config.eval_batch, max_tokens=max_tokens,
                            mesh=mesh)
    metrics["param_bytes"] = _nbytes(qvars["params"])
    metrics["float_param_bytes"] = _nbytes(state.params)
    host = jax.device_get(_plain(qvars))
    meta = {"kind": "llama_qat", "model": dataclasses.asdict(model.config),
            "quant": _jsonable(self.settings), "seq_len": int(config.seq_len),
            "vocab": int(model.config.vocab),
            "cache_dir": str(_get(config, "cache_dir", "")),
            "train_metrics": {k: v for k, v in metrics.items()
                              if isinstance(v, (int, float))}}
    # META_FILE goes in with the arrays, in save's one atomic replacement: a
    # crash never leaves a new export without it, nor the old one without its.
    checkpoint.save(str(directory), host, force=True,
                    extra_files={META_FILE: json.dumps(meta, indent=1)})
    return metrics


def load_quantized(directory: str | os.PathLike[str]) -> tuple[Any, dict, Any]:
  """Reads what ``Recipe.export`` wrote.

  Returns:
    ``(model, meta, variables)``: the ``Llama`` model, the metadata dict and
    the real-quantized variables (QWeights, learned scales, state).

  Raises:
    FileNotFoundError: ``directory`` was not written by a QAT run.
  """
  from lowbit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  meta_path = directory / META_FILE
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} does not exist.")
  if not meta_path.exists():
    raise FileNotFoundError(f"{meta_path} is missing: {directory} was not written by "
                            "a QAT run (experiments/train_qat.py).")
  # Read with the arrays: a concurrent export cannot pair one run's metadata
  # with another's weights.
  params, extra = checkpoint.restore(str(directory), files=(META_FILE,))
  meta = json.loads(extra[META_FILE])
  model = Llama(LlamaConfig(**meta["model"]))
  return model, meta, params


def recipe_from_meta(meta: Mapping[str, Any]) -> Recipe:
  """The recipe ``Recipe.export`` recorded in its metadata."""
  recipe = recipe_from_config({"quant": meta["quant"]})
  if recipe is None:
    raise ValueError("the exported run has no quantization rules")
  return recipe


def evaluate_exported(directory: str | os.PathLike[str], *, max_tokens: int = 0,
                      batch: int = 8, use_kernel: str = "auto", data: Any = None
                      ) -> dict:
  """Held-out metrics of a model ``Recipe.export`` wrote, run in real mode.

  Args:
    directory: the export directory (``<workdir>/quantized``).
    max_tokens: evaluate on this prefix of the held-out stream (0: all).
    batch: windows per forward pass.
    use_kernel: real-mode kernel dispatch ("auto", "never", "always").
    data: the corpus (default: loaded for the model's vocabulary).

  Returns:
    ``perplexity``'s dict plus ``param_bytes`` and the export's metadata
    (``scheme``, ``model``).
  """
  from lowbit_jax.train import loop  # pylint: disable=g-import-not-at-top
  model, meta, variables = load_quantized(directory)
  recipe = recipe_from_meta(meta)
  if data is None:
    data = loop.load_data(meta["vocab"], meta.get("cache_dir") or None)
  q = recipe.real(use_kernel=use_kernel)
  out = loop.evaluate(q(lambda v, x: model.apply(v, x)), variables, data,
                      seq_len=meta["seq_len"], batch=batch, max_tokens=max_tokens)
  out["param_bytes"] = _nbytes(variables["params"])
  out["scheme"] = meta["quant"].get("rules")
  out["model"] = meta["model"]
  return out


def scale_stats(quant_scales: Any) -> dict:
  """``{scale path: float32[3] (mean, min, max)}`` of every learned scale."""
  out = {}
  for kp, x in jax.tree_util.tree_flatten_with_path(quant_scales)[0]:
    x = jnp.asarray(x, jnp.float32)
    out[path_str(kp)] = jnp.stack([jnp.mean(x), jnp.min(x), jnp.max(x)])
  return out


def _nbytes(tree: Any) -> int:
  from lowbit_jax.core import QArray  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)):
    if isinstance(leaf, QArray):
      total += leaf.nbytes
    else:
      total += int(np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape))
  return total


def _plain(tree: Any) -> Any:
  """Nested plain dicts (Flax FrozenDicts and Mappings unwrapped)."""
  from lowbit_jax.core import QArray  # pylint: disable=g-import-not-at-top
  if isinstance(tree, QArray):
    return tree
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _jsonable(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, (str, int, float, bool)) or tree is None:
    return tree
  return str(tree)


__all__ = ["SCHEMES", "Scheme", "Recipe", "make_rules", "recipe_from_config",
           "recipe_from_meta", "load_quantized", "evaluate_exported", "scale_stats", "SCALES", "STATE",
           "METRICS", "META_FILE"]
