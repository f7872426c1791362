"""Quantized optimizer states: 8-bit and 4-bit Adam/AdamW as optax transformations.

>>> import lowbit_jax.optim  # needs optax; ``import lowbit_jax`` does not load it
>>> tx = lowbit_jax.optim.adamw(1e-3, state_format="8bit")  # Dettmers et al. 2022
>>> opt_state = tx.init(params)
>>> lowbit_jax.optim.state_nbytes(opt_state)  # packed codes + scales + float leaves

``adamw`` explains the ``state_format`` names and how to give learned
quantization scales their own learning rate with ``optax.multi_transform``.
"""
from lowbit_jax.optim._adam import (PRESETS, QuantizedAdamState, adamw, scale_by_adam,
                                    state_nbytes)

__all__ = ["adamw", "scale_by_adam", "state_nbytes", "QuantizedAdamState", "PRESETS"]
