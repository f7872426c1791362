"""Evaluation of (quantized) models."""
from lowbit_jax.eval.perplexity import perplexity

__all__ = ["perplexity"]
