"""Train a Llama-style decoder LM on the Python standard library sources.

Run (variants: smoke, small, base; every field can be overridden):

  python -m experiments.train_lm --config configs/train_lm.py:smoke --workdir /tmp/lm
  python -m experiments.train_lm --config configs/train_lm.py:small \
      --workdir /tmp/lm_small --config.steps=2000
  python -m experiments.train_lm --config configs/train_lm.py:base \
      --workdir /tmp/lm_base --config.model.n_experts=4

Sharded (fake CPU devices work too: XLA_FLAGS=--xla_force_host_platform_device_count=8):

  python -m experiments.train_lm --config configs/train_lm.py:smoke --workdir /tmp/lm8 \
      --config.mesh=data:2,fsdp:2,tensor:2 --config.optim.state_format=4bit

``smoke`` trains in seconds on CPU; ``small`` (7.1M parameters) learns the
corpus in about ten minutes on 2 CPU cores; ``base`` (56M parameters, bfloat16
compute) is for a GPU. Re-running with the same workdir resumes from the latest
checkpoint.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from lowbit_jax.models.llama import LlamaConfig

_VARIANTS = ("smoke", "small", "base")


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
  """Returns the config of one variant: ``"smoke"``, ``"small"`` or ``"base"``.

  Raises:
    ValueError: for an unknown variant.
  """
  variant = arg or "smoke"
  if variant not in _VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; use one of {_VARIANTS}, e.g. "
                     "--config configs/train_lm.py:small")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.model = ml_collections.ConfigDict(
      dataclasses.asdict(getattr(LlamaConfig, variant)()))

  # Data.
  c.seq_len = 128
  c.batch_size = 16
  c.data_seed = 0
  c.cache_dir = ""  # empty: $LOWBIT_JAX_CACHE or ~/.cache/lowbit_jax

  # Optimisation.
  c.steps = 1000
  c.lr = 3e-3
  c.min_lr_ratio = 0.1
  c.warmup_steps = 100
  c.weight_decay = 0.1
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.clip_norm = 1.0
  c.moe_aux_weight = 0.01
  c.seed = 0
  c.optim = ml_collections.ConfigDict()
  c.optim.state_format = "float32"  # or "int8", "fp8_e4m3", "4bit" (quantized moments)

  # Devices: a mesh string over the axes data / fsdp / tensor, e.g.
  # "data:2,fsdp:2,tensor:2" (the product is the number of devices used);
  # "" = num_devices (0: all) data parallel.
  c.mesh = ""
  c.num_devices = 0
  c.sharding = ml_collections.ConfigDict()
  c.sharding.on_indivisible = "error"  # or "replicate" that dim
  c.sharding.on_block_split = "error"  # quantized moments: or "replicate" that dim
  c.init_from = ""  # workdir of a previous float run to start from

  # Logging, evaluation, checkpoints.
  c.log_every = 10
  c.eval_every = 200
  c.eval_tokens = 32768  # held-out prefix for periodic evals
  c.eval_batch = 16
  c.final_eval_full = True  # final eval on the whole held-out split
  c.ckpt_every = 200
  c.keep_checkpoints = 2

  if variant == "smoke":
    c.seq_len = 64
    c.batch_size = 8
    c.steps = 60
    c.lr = 1e-2
    c.warmup_steps = 10
    c.log_every = 10
    c.eval_every = 30
    c.eval_tokens = 4096
    c.final_eval_full = False
    c.ckpt_every = 30
  elif variant == "small":
    c.seq_len = 128
    c.batch_size = 16
    c.steps = 800
    c.lr = 3e-3
    c.warmup_steps = 80
  elif variant == "base":
    c.seq_len = 512
    c.batch_size = 64
    c.steps = 5000
    c.lr = 1e-3
    c.warmup_steps = 300
    c.eval_every = 500
    c.eval_tokens = 65536
    c.eval_batch = 32
    c.ckpt_every = 1000
  return c
