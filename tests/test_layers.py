"""The package's import rule (docs/architecture.md): arrows only point down.

Every module of `centerclip_jax` belongs to one layer; it may import modules of its own
package or of lower layers, never of a higher layer or of a sibling layer at the same rank.
Imports are read from the source (every `import` statement, also inside functions), so a
lazy upward import is caught too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "centerclip_jax"

# (prefix, layer, rank): the longest matching prefix decides a module's layer.
LAYERS = (
    ("centerclip_jax.clustering", "model", 0),
    ("centerclip_jax.models", "model", 0),
    ("centerclip_jax.paths", "core", 1),
    ("centerclip_jax.parallel", "core", 1),
    ("centerclip_jax.console", "core", 1),
    ("centerclip_jax.config", "config", 2),
    ("centerclip_jax.weights", "weights", 2),
    ("centerclip_jax.data", "input", 2),
    ("centerclip_jax.evaluation", "eval", 3),
    ("centerclip_jax.training", "train", 4),
    ("centerclip_jax.inference", "inference", 5),
    ("centerclip_jax.main", "apps", 6),
    ("centerclip_jax.encode", "apps", 6),
    ("centerclip_jax.search", "apps", 6),
    ("centerclip_jax.visualize", "apps", 6),
    ("centerclip_jax", "root", -1),  # the package __init__ only
)


def layer_of(module: str):
  best = None
  for prefix, name, rank in LAYERS:
    if module == prefix or module.startswith(prefix + "."):
      if best is None or len(prefix) > len(best[0]):
        best = (prefix, name, rank)
  return best


def modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    yield ".".join(parts), path


def imported(module: str, path: pathlib.Path):
  tree = ast.parse(path.read_text(), filename=str(path))
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")
        base = base if is_pkg else base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      yield target, node.lineno
      for alias in node.names:  # `from centerclip_jax import training` imports a package
        yield f"{target}.{alias.name}", node.lineno


def test_every_module_has_a_layer():
  missing = [m for m, _ in modules() if layer_of(m) is None or
             (layer_of(m)[1] == "root" and m != "centerclip_jax")]
  assert not missing, f"modules with no layer in tests/test_layers.py: {missing}"


def test_imports_point_down():
  bad = []
  for module, path in modules():
    _, name, rank = layer_of(module)
    for target, line in imported(module, path):
      if not target.startswith("centerclip_jax."):
        continue
      found = layer_of(target)
      if found is None or found[1] == "root":
        continue
      t_prefix, t_name, t_rank = found
      if t_name == name:
        continue
      if t_rank >= rank:
        bad.append(f"{path.relative_to(REPO)}:{line}: {name} imports {target} ({t_name})")
  assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("tool", sorted((REPO / "tools").glob("*.py")), ids=lambda p: p.name)
def test_tools_do_not_edit_sys_path(tool):
  assert "sys.path" not in tool.read_text(), f"{tool.name} edits sys.path (pip install -e .)"
