"""Reference models for experiments (Flax Linen modules with real weights).

Submodules are imported on use, so importing this package loads nothing heavy:
``from lowbit_jax.models import minilm``. ``llama`` is the decoder LM,
``kv_cache`` its (optionally quantized, by rules) key/value cache and
``decode`` the jitted prefill/generate loop (docs/kv_cache.md).
"""
