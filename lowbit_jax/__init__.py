"""lowbit_jax: low-bit number formats, PTQ and QAT for JAX/Flax models."""
from lowbit_jax import formats

__version__ = "0.1.0"
