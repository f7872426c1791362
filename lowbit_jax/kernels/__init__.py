"""Pallas low-bit matmul kernels and their dispatch.

Each kernel module exposes ``supports(problem)``, ``reference(operands, problem)``
and ``matmul(operands, problem)`` (contract: ``lowbit_jax.kernels._api``). The
quantized ``dot_general`` asks ``find(problem)`` for the first kernel that
supports a case; kernels can be forbidden or forced per call (``use_kernel``) or
globally with ``set_enabled``.
"""
from __future__ import annotations

import importlib
import threading
from typing import Optional

from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem

# Modules tried in order; a module that fails to import on this platform is
# recorded in ``unavailable()`` with the reason, never silently.
_KERNEL_MODULES = ("lowbit_jax.kernels.gpu_weight_only", "lowbit_jax.kernels.gpu_w8a8",
                   "lowbit_jax.kernels.tpu_matmul")
_lock = threading.Lock()
_loaded: Optional[list] = None
_errors: dict[str, str] = {}
_enabled = True


def _modules() -> list:
  global _loaded
  with _lock:
    if _loaded is None:
      _loaded = []
      for name in _KERNEL_MODULES:
        try:
          _loaded.append(importlib.import_module(name))
        except ImportError as e:  # optional backend pieces missing
          _errors[name] = f"{type(e).__name__}: {e}"
    return _loaded


def unavailable() -> dict[str, str]:
  """Kernel modules that could not be imported here, with the reason."""
  _modules()
  return dict(_errors)


def set_enabled(enabled: bool) -> None:
  """Globally allow (default) or forbid kernel dispatch."""
  global _enabled
  _enabled = bool(enabled)


def find(problem: MatmulProblem):
  """The first kernel module whose ``supports(problem)`` is true, or None."""
  if not _enabled:
    return None
  for mod in _modules():
    if mod.supports(problem):
      return mod
  return None


__all__ = ["MatmulProblem", "MatmulOperands", "find", "set_enabled", "unavailable"]
