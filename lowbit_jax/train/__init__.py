"""Training: mesh + sharding rules as data, QAT / low-bit recipes, exact resume.

>>> from lowbit_jax import train
>>> mesh = train.make_mesh("data:2,fsdp:2,tensor:2")
>>> layout = train.Layout(mesh)              # train.LLAMA_RULES by default
>>> step = train.make_train_step(model, tx, layout)
>>> result = train.train(config, workdir)    # configs/train_lm.py, train_qat.py

``mesh`` parses mesh strings, ``sharding`` turns rules into NamedShardings
(parameters, optimizer states with quantized moments, learned scales,
real-quantized weights), ``state`` holds the ``TrainState`` and its Orbax
checkpoints, ``qat`` the quantization recipes and ``loop`` the step and
``train``.
"""
from lowbit_jax.train.mesh import (AXES, BATCH_AXES, DATA, FSDP, TENSOR,
                                   batch_sharding, batch_size_multiple, data_mesh,
                                   make_mesh, mesh_string, parse_mesh, replicated,
                                   shard_batch)
from lowbit_jax.train.sharding import LLAMA_RULES, Layout, as_rules
from lowbit_jax.train.state import (TrainState, abstract_like, abstract_state,
                                    checkpoint_manager, init_params, init_state,
                                    place, read_run_config, restore_checkpoint,
                                    save_checkpoint, state_shardings)
from lowbit_jax.train.qat import (SCHEMES, Recipe, load_quantized, make_rules,
                                  recipe_from_config, recipe_from_meta, scale_stats)
from lowbit_jax.train.loop import (STATE_FORMATS, LMData, ShardedStep, adamw,
                                   evaluate, load_data, loss_fn, make_optimizer,
                                   make_schedule, make_train_step, model_config,
                                   run_layout, run_mesh, run_optimizer, shard_state,
                                   split_constant_metrics, train, train_step)

__all__ = ["AXES", "BATCH_AXES", "DATA", "FSDP", "TENSOR", "batch_sharding",
           "batch_size_multiple", "data_mesh", "make_mesh", "mesh_string",
           "parse_mesh", "replicated", "shard_batch", "LLAMA_RULES", "Layout",
           "as_rules", "TrainState", "abstract_like", "abstract_state",
           "checkpoint_manager", "init_params", "init_state", "place",
           "read_run_config", "restore_checkpoint", "save_checkpoint",
           "state_shardings", "SCHEMES", "Recipe", "load_quantized", "make_rules",
           "recipe_from_config", "recipe_from_meta", "scale_stats", "STATE_FORMATS",
           "LMData", "ShardedStep", "adamw", "evaluate", "load_data", "loss_fn",
           "make_optimizer", "make_schedule", "make_train_step", "model_config",
           "run_layout", "run_mesh", "run_optimizer", "shard_state",
           "split_constant_metrics", "train", "train_step"]
