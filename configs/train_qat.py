"""Quantization-aware / low-bit training of the Llama-style LM (stdlib corpus).

Run (variants: smoke, small, base as in configs/train_lm.py; every field can be
overridden, e.g. --config.quant.rules=fp8_delayed):

  python -m experiments.train_qat --config configs/train_qat.py:smoke --workdir /tmp/qat
  python -m experiments.train_qat --config configs/train_qat.py:smoke \
      --workdir /tmp/qat_mx --config.quant.rules=w4a4_mxfp4
  # QAT from a trained float model, sharded over 8 (fake CPU) devices:
  python -m experiments.train_lm --config configs/train_lm.py:small --workdir /tmp/lm_small
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.train_qat \
      --config configs/train_qat.py:small --workdir /tmp/qat_small \
      --config.init_from=/tmp/lm_small --config.mesh=data:2,fsdp:2,tensor:2 \
      --config.quant.start_step=0 --config.optim.state_format=4bit
  # The exported real-quantized model, evaluated on its own:
  python -m experiments.evaluate --config configs/evaluate.py \
      --config.checkpoint=/tmp/qat/quantized

``smoke`` runs in seconds on CPU. The run logs loss, learned-scale statistics
(``scales``: mean/min/max per layer) and clipped fractions (``quant_metrics``)
to ``workdir/log.jsonl``, checkpoints params, learned scales, amax histories,
optimizer state, key and step (resuming is exact), and ends with held-out
perplexity in fake mode and after real-mode conversion, writing the packed
model to ``workdir/quantized``.

Quantization fields (``config.quant``):

* ``rules``: a scheme of ``lowbit_jax.train.qat.SCHEMES``: none, w4a8, w8a8,
  w4a4_mxfp4, w4a4_nvfp4, fp8, fp8_delayed, mxfp8, mxfp4.
* ``weight`` / ``activation`` / ``grad``: format names overriding the
  scheme's ("" keeps it, "none" drops it); ``group_size`` (weights; 0: per
  output channel or the format's blocks); ``grad_stochastic`` (stochastic
  rounding of gradients); ``scaling`` ("" / "current" / "delayed");
  ``amax_history_len``.
* ``learn_weight`` ("lsq", "none") / ``learn_activation`` ("lsq", "pact",
  "none"); "" = the scheme's default.
* ``scale_init``: how LSQ step sizes start, "lsq" (2 mean|x| / sqrt(Qp), the
  paper's) or "amax" (the fixed-amax scale: QAT from a trained model then
  starts exactly at its PTQ quantization).
* ``scale_lr_mult``, ``freeze_scales``, ``lsq_grad_scale`` (LSQ's
  ``1/sqrt(N Qp)`` on step-size gradients, applied by the rules; False
  divides it out).
* ``start_step``: float warm-up steps; scales are initialised from the data
  when quantization switches on.
* ``layers`` / ``exclude``: regexes of the layers quantized / kept in float.
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def _train_lm_config(variant: str) -> ml_collections.ConfigDict:
  path = pathlib.Path(__file__).with_name("train_lm.py")
  spec = importlib.util.spec_from_file_location("_train_lm_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
  """The config of one variant: ``"smoke"``, ``"small"`` or ``"base"``.

  Raises:
    ValueError: for an unknown variant.
  """
  c = _train_lm_config(arg or "smoke")
  q = ml_collections.ConfigDict()
  q.rules = "w4a8"
  q.weight = ""
  q.activation = ""
  q.grad = ""
  q.group_size = 0
  q.grad_stochastic = False
  q.scaling = ""
  q.amax_history_len = 16
  q.learn_weight = ""
  q.learn_activation = ""
  q.scale_init = "lsq"  # "amax": LSQ step sizes start at the PTQ scales
  q.scale_lr_mult = 0.1  # Adam on scales: see configs/qat_study.py
  q.freeze_scales = False
  q.lsq_grad_scale = True
  q.start_step = 0
  q.layers = ".*"
  q.exclude = "lm_head"  # the output head stays in float, as is usual for QAT
  c.quant = q
  c.save_quantized = True  # real-mode conversion, eval and export at the end

  if c.variant == "smoke":
    c.steps = 40
    c.quant.start_step = 10
    c.eval_every = 20
    c.ckpt_every = 20
  elif c.variant == "small":
    c.steps = 400
    c.lr = 1e-3
    c.warmup_steps = 40
    c.quant.start_step = 100
  elif c.variant == "base":
    c.steps = 2000
    c.quant.start_step = 200
  return c
