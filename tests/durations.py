"""Records per-test times for tests/conftest.py's slow-by-duration rule.

Run the suite with a JUnit report on a CI-like machine (2 cores, nothing
else running), then fold the report in:

  python3 -m pytest -n 2 -q --junitxml=/tmp/junit.xml
  python3 tests/durations.py /tmp/junit.xml --host="AMD EPYC, 2 cores"

tests/durations.json then holds each test that ran with its time in seconds
(a test the report skipped keeps the time recorded before, so a run without
--runslow leaves the slow tests' times alone; pass --runslow to the suite to
measure them again). tests/conftest.py reads the file at collection: a test
whose recorded time is over SLOW_SECONDS runs with --runslow only, except
those in CI_KEEP and the quickest case of a parametrized family whose every
case is over it.
"""
import argparse
import datetime
import json
import os
import xml.etree.ElementTree as ET

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def nodeid(testcase) -> str:
  """The pytest node id of a JUnit testcase (module-level tests only)."""
  return testcase.get("classname").replace(".", "/") + ".py::" + testcase.get("name")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("junit", help="the JUnit XML report of a suite run")
  parser.add_argument("--host", required=True,
                      help="the machine the run was on, as the file records it")
  args = parser.parse_args()
  ran = {}
  for case in ET.parse(args.junit).iter("testcase"):
    if case.find("skipped") is None:
      ran[nodeid(case)] = round(float(case.get("time")), 2)
  if not ran:
    raise SystemExit(f"{args.junit} holds no test that ran: is it a pytest "
                     "--junitxml report of a run that got past collection?")
  old = {}
  if os.path.exists(PATH):
    with open(PATH) as f:
      old = json.load(f)["seconds"]
  seconds = {**old, **ran}
  record = {
      "what": "seconds each test took (pytest's call, setup and teardown), "
              "tests/durations.py's record; tests/conftest.py reads it",
      "host": args.host,
      "updated": datetime.date.today().isoformat(),
      "seconds": dict(sorted(seconds.items())),
  }
  with open(PATH, "w") as f:
    json.dump(record, f, indent=0)
    f.write("\n")
  print(f"{len(ran)} tests timed, {len(seconds)} in {PATH}")


if __name__ == "__main__":
  main()
