"""The package's layers: formats/ and core/ import no flax, optax or orbax
(only lowbit_jax/flax/ knows Flax), and ``import lowbit_jax`` (or
``lowbit_jax.optim``) loads no flax or orbax."""
import ast
import pathlib
import subprocess
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1] / "lowbit_jax"


def _imported(path: pathlib.Path) -> set:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split(".")[0])
  return names


def test_core_and_formats_import_no_flax_optax_or_orbax():
  for sub in ("core", "formats"):
    for f in sorted((_ROOT / sub).glob("*.py")):
      assert not _imported(f) & {"flax", "optax", "orbax"}, f


def test_importing_the_package_loads_no_flax_or_orbax():
  code = ("import sys, lowbit_jax, lowbit_jax.optim\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'orbax'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu"}).stdout
  assert out.strip() == "[]"
