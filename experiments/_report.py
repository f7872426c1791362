"""An experiment's results on disk: ``<stem>.json`` (its meta and rows) and
``<stem>.md`` (the table it prints), both in ``out_dir``."""
import json
import os


def write(out_dir: str, stem: str, meta: dict, rows: list, md_lines: list) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, stem + ".json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(out_dir, stem + ".md"), "w") as f:
    f.write("\n".join(md_lines) + "\n")
