"""The QAT training steps that experiments/bench_qat.py times (and
experiments/gpu_fusion_survey.py compiles for a GPU target): one place for the
variants, their configs and how a step and its state are built."""
from __future__ import annotations

import functools

# name: (scheme of lowbit_jax.train.qat.SCHEMES, overrides of config.quant)
OURS = {
    "int8 W+A (STE)": ("w8a8", dict(learn_weight="none", learn_activation="none")),
    "int8 W+A (LSQ)": ("w8a8", {}),
    "W4A8 int4 g128 (LSQ)": ("w4a8", dict(group_size=128)),
    "fp8 W+A": ("fp8", dict(grad="none")),
    "fp8 training (e5m2 grads)": ("fp8", {}),
    "fp8 training, delayed scaling": ("fp8_delayed", {}),
    "MXFP8 training": ("mxfp8", {}),
    "MXFP4 W+A": ("w4a4_mxfp4", {}),
    "NVFP4 W+A": ("w4a4_nvfp4", {}),
    "MXFP4 W (weight-only)": ("w4a4_mxfp4", dict(activation="none")),
}
BASELINE = "bf16 (no quantization)"
TARGET = {"int8 W+A (STE)": 1.15, "int8 W+A (LSQ)": 1.15, "fp8 W+A": 1.15,
          "fp8 training (e5m2 grads)": 1.15, "fp8 training, delayed scaling": 1.15,
          "MXFP4 W+A": 1.3, "NVFP4 W+A": 1.3}
DENSE_RE = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def variant(name: str) -> tuple:
  """``(scheme, overrides)`` of a variant name (``BASELINE``: no quantization)."""
  if name == BASELINE:
    return "none", {}
  if name not in OURS:
    raise ValueError(f"unknown QAT variant {name!r}; known: {[BASELINE, *OURS]}")
  return OURS[name]


def run_config(scheme: str, overrides: dict):
  """The training config of a variant (lowbit_jax.train's fields)."""
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  c = ConfigDict(dict(lr=1e-3, warmup_steps=10, steps=1000, min_lr_ratio=0.1,
                      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
                      quant=dict(rules=scheme, weight="", activation="", grad="",
                                 group_size=0, grad_stochastic=False, scaling="",
                                 amax_history_len=16, learn_weight="",
                                 learn_activation="", scale_lr_mult=1.0,
                                 freeze_scales=False, lsq_grad_scale=True,
                                 start_step=0, layers=DENSE_RE, exclude=""),
                      optim=dict(state_format="float32")))
  for k, v in overrides.items():
    c.quant[k] = v
  return c


def make_step(model, params, batch, scheme: str, overrides: dict, *,
              init_from_data: bool = True):
  """``(step, state)``: ``lowbit_jax.train.loop.train_step`` of the variant
  (not jitted; call ``step(state, batch)``) and its initial state.

  ``init_from_data``: initialise the learned scales and histories from the
  batch (what training does); off, they are zeros of the right structure
  (enough to compile the step).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax.train import loop, qat, state as state_lib  # pylint: disable=g-import-not-at-top
  c = run_config(scheme, overrides)
  recipe = qat.recipe_from_config(c) if scheme != "none" else None
  tx, schedule = loop.run_optimizer(c, recipe)
  if recipe is None:
    state = state_lib.init_state(model, tx, jax.random.key(1), params=params)
  else:
    scales, qstate = recipe.placeholder_vars(model, params)
    state = state_lib.init_state(model, tx, jax.random.key(1), params=params,
                                 quant_scales=scales, quant_state=qstate,
                                 trainable=recipe.trainable)
    if init_from_data:
      layout = loop.run_layout(c, loop.make_mesh(1))
      state = recipe.init_from_data(model, state, batch[:, :-1], layout)
  step = functools.partial(loop.train_step, model=model, tx=tx,
                           schedule=schedule, recipe=recipe)
  return step, state
