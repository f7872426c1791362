"""Compatibility module: the training loop now lives in ``lowbit_jax.train``.

Everything ``lowbit_jax.train_lm`` used to define is re-exported from there
(``make_mesh(num_devices)`` keeps its data-parallel meaning; the mesh strings
of ``lowbit_jax.train.make_mesh`` are the general form).
"""
from lowbit_jax.train.loop import (LMData, evaluate, load_data, loss_fn, make_mesh,
                                   make_optimizer, make_schedule, make_train_step,
                                   model_config, replicate, shard_batch, train,
                                   train_step)
from lowbit_jax.train.mesh import DATA as DATA_AXIS
from lowbit_jax.train.state import (TrainState, abstract_state, checkpoint_manager,
                                    init_state, restore_checkpoint, save_checkpoint)

__all__ = ["DATA_AXIS", "TrainState", "make_schedule", "make_optimizer", "init_state",
           "loss_fn", "train_step", "make_mesh", "make_train_step", "shard_batch",
           "replicate", "model_config", "LMData", "load_data", "abstract_state",
           "checkpoint_manager", "save_checkpoint", "restore_checkpoint", "evaluate",
           "train"]
