"""Shared test setup.

Multi-device tests use fake CPU devices: the flag must be set before jax is
imported anywhere, so it is set here, at collection time. Slow tests run only
with --runslow; GPU/TPU tests skip unless such a backend is present.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

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
