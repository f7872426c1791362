r"""Format report: bits per element and SQNR of every registered format.

Quantizes 1M standard-normal and 1M Student-t (3 dof) values along the last
axis of a [1024, 1024] tensor in every format of ``lowbit_jax.formats`` and
prints the table; with ``--out`` it writes the markdown document (docs/formats.md's
table is this command's output; an existing document keeps its hand-written
sections, from its first ``## `` heading on)::

  python -m experiments.format_report --out docs/formats.md

``--n`` sets the values per distribution (a multiple of 1024).
"""
from __future__ import annotations

import os
import sys

import experiments
from absl import app, flags

from lowbit_jax.eval import format_report

_N = flags.DEFINE_integer("n", 1 << 20, "values per distribution (multiple of 1024)")
_SEED = flags.DEFINE_integer("seed", 0, "numpy seed of the data")
_OUT = flags.DEFINE_string("out", None, "write the markdown report here")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _OUT.value and os.path.isdir(_OUT.value):
    raise app.UsageError(f"--out={_OUT.value} is a folder; give the markdown file")
  rows = format_report.report(n=_N.value, seed=_SEED.value, log=print)
  command = "python -m experiments.format_report " + " ".join(sys.argv[1:])
  md = format_report.to_markdown(rows, n=_N.value, seed=_SEED.value,
                                 command=command.strip())
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    # An existing document keeps its hand-written sections (from its first
    # "## " heading on): only the generated table above them is replaced.
    kept = ""
    if os.path.exists(_OUT.value):
      with open(_OUT.value) as f:
        old = f.read()
      i = old.find("\n## ")
      kept = old[i:] if i >= 0 else ""
    with open(_OUT.value, "w") as f:
      f.write(md.rstrip("\n") + "\n" + kept)
    print(f"wrote {_OUT.value}")
  else:
    print(md)


if __name__ == "__main__":
  experiments.run(main)
