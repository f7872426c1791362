"""The CI suite's slow-by-duration rule (tests/conftest.py, SLOW_SECONDS)."""
import dataclasses
import json
import os

from tests import conftest


@dataclasses.dataclass
class _Item:
  nodeid: str
  keywords: tuple = ()


def _moved(items, seconds):
  return [i.nodeid for i in conftest._slow_by_duration(items, seconds)]  # pylint: disable=protected-access


def test_over_the_threshold_moves_but_a_family_keeps_its_quickest_case():
  over = conftest.SLOW_SECONDS + 1.0
  items = [_Item("t.py::test_a[x]"), _Item("t.py::test_a[y]"), _Item("t.py::test_a[z]"),
           _Item("t.py::test_single"), _Item("t.py::test_quick"),
           _Item("t.py::test_b[x]"), _Item("t.py::test_b[y]", ("slow",)),
           _Item("t.py::test_new")]
  seconds = {"t.py::test_a[x]": over + 2, "t.py::test_a[y]": over,
             "t.py::test_a[z]": over + 1, "t.py::test_single": over,
             "t.py::test_quick": 0.1, "t.py::test_b[x]": over, "t.py::test_b[y]": 0.1}
  # test_a: every case over, its quickest ([y]) stays; a lone test over it
  # moves; test_b's only case left in CI is over, so it stays; a test the
  # record does not know yet stays
  assert _moved(items, seconds) == ["t.py::test_a[x]", "t.py::test_a[z]",
                                    "t.py::test_single"]


def test_ci_keep_stays_and_names_recorded_tests():
  with open(conftest._DURATIONS) as f:  # pylint: disable=protected-access
    seconds = json.load(f)["seconds"]
  assert conftest.CI_KEEP <= set(seconds), "a CI_KEEP entry names no recorded test"
  items = [_Item(n) for n in sorted(conftest.CI_KEEP)]
  assert _moved(items, {n: 1e9 for n in conftest.CI_KEEP}) == []
  root = os.path.dirname(os.path.dirname(os.path.abspath(conftest.__file__)))
  for name in seconds:  # every record names a test file that exists
    assert os.path.exists(os.path.join(root, name.split("::")[0])), name
