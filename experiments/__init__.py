"""Thin absl mains; ``define_config`` and ``run`` give them one-line user errors.

An unknown ``--config.field`` names the field and its close matches on one
line instead of ml_collections' tracebacks, and errors a user can fix (a bad
flag value, an existing output directory, a missing input) end the run with
``error: ...`` on stderr and exit status 2.
"""
import difflib
import importlib.util
import re
import sys

from absl import app

USER_ERRORS = (app.UsageError, ValueError, TypeError, FileExistsError,
               FileNotFoundError, KeyError, OSError)


def _flat_keys(cfg, prefix=""):
  out = []
  for k, v in cfg.items():
    out.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, dict):
      out += _flat_keys(v, f"{prefix}{k}.")
  return out


def _config_keys(argv, default: str) -> list:
  """The field paths of the config file the command line names (or none)."""
  path = default
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  file, _, arg = path.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_lowbit_config", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg) if arg else mod.get_config()
    return _flat_keys(cfg)
  except Exception:  # pylint: disable=broad-except
    return []


def _fail(msg: str) -> None:
  sys.stderr.write(f"error: {msg}\n")
  sys.exit(2)


def define_config(default: str, help_: str = "the experiment's config"):
  """``config_flags.DEFINE_config_file("config", default)`` with one-line errors.

  Returns:
    the flag holder (``.value`` is the ConfigDict).
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _DEFAULT_CONFIG[0] = default
  try:
    return config_flags.DEFINE_config_file("config", default, help_)
  except (AttributeError, KeyError) as e:
    _field_error(e, default)
  except TypeError:
    if not any(a.startswith("--config.") for a in sys.argv[1:]):
      raise   # the config file's own error, not a command-line path
    _path_error(sys.argv)
  except (FileNotFoundError, ImportError, SyntaxError) as e:
    _fail(f"cannot load the config: {e}")


# The config file define_config was given: a --config.field typo applied while
# app.run parses the flags (an explicit --config=...) is reported like one
# applied at definition.
_DEFAULT_CONFIG = [None]


def _field_error(e: Exception, default) -> None:
  """Exits with one line naming a --config.field that is not in the config."""
  m = re.search(r"[A-Za-z_][A-Za-z0-9_]*", str(e))
  field = m.group(0) if m else str(e)
  given = [a.split("=", 1)[0][len("--config."):] for a in sys.argv[1:]
           if a.startswith("--config.")]
  bad = next((g for g in given if g.split(".")[-1] == field), field)
  close = difflib.get_close_matches(bad, _config_keys(sys.argv[1:], default), n=3,
                                    cutoff=0.6)
  _fail(f"--config.{bad} is not a field of the config"
        + (f"; close matches: {', '.join('--config.' + c for c in close)}"
           if close else ""))


def _parse_flags(argv):
  """absl's flag parsing, with a --config.field typo as one line (exit 2)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError) as e:
    # (TypeError: a dotted path through a field that holds no fields, e.g.
    # --config.model.x=1 where model is a string.)
    if any(a.startswith("--config.") for a in argv[1:]):
      if isinstance(e, TypeError):
        _path_error(argv)
      _field_error(e, _DEFAULT_CONFIG[0])
    raise


def _path_error(argv) -> None:
  """Exits with one line for a dotted --config path through a plain value."""
  given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  _fail(f"one of {given} goes through a config field that holds a value, not "
        "fields; check the dotted path")


def run(main) -> None:
  """``app.run(main)``, with user errors as one line and exit status 2."""
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      msg = str(e).strip().splitlines()
      _fail(f"{type(e).__name__}: {msg[0] if msg else ''}"
            + (" ..." if len(msg) > 1 else ""))
  app.run(wrapped, flags_parser=_parse_flags)
