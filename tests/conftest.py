"""Shared test setup.

Multi-device tests use fake CPU devices, and the Mosaic GPU interpreter tests
need a CPU scheduler flag: XLA flags must be set before jax is imported
anywhere, so they are set here, at collection time. Slow tests run only
with --runslow; GPU/TPU tests skip unless such a backend is present.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The Mosaic GPU interpreter runs each warpgroup as its own CPU computation;
# without this, XLA's CPU runtime can deadlock on multi-warpgroup kernels
# (lowbit_jax.kernels._gpu_common.INTERPRETER_XLA_FLAG says why).
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run tests marked slow")


def _backend() -> str:
  return jax.default_backend()


def pytest_collection_modifyitems(config, items):
  run_slow = config.getoption("--runslow")
  backend = _backend()
  for item in items:
    if "slow" in item.keywords and not run_slow:
      item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))
    if "gpu" in item.keywords and backend != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU backend"))
    if "tpu" in item.keywords and backend != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU backend"))
