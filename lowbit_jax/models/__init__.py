"""Reference models for experiments (Flax Linen modules with real weights).

Submodules are imported on use, so importing this package loads nothing heavy:
``from lowbit_jax.models import minilm``.
"""
