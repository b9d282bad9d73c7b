"""One way through the code: the import graph of m2cnn_tf and data_prep, read from the source
(AST, nothing imported), has no cycle, and the TF-free modules stay TF-free.

Every import counts, also one inside a function (a lazy import is still a dependency); only an
`if TYPE_CHECKING:` block, which never runs, is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("m2cnn_tf", "data_prep")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` (module `name`) imports: `from pkg import mod` names the
    module `pkg.mod` when that is one, else `pkg`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports. Package `__init__` modules are left out as
    targets: importing `a.b` runs `a/__init__.py`, which imports nothing here."""
    paths = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(paths)
    inits = {m for m, p in paths.items() if p.name == "__init__.py"}
    return {m: imports_of(p, m, known) - inits for m, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph(ROOT)
    assert len(graph) > 50  # every module was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_planted_cycle_is_found_even_through_a_lazy_import(tmp_path):
    """The same reader on a copy of the tree with one lazy import added that closes a loop:
    checkpoints imports nothing of backends, backends imports checkpoints."""
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            target = tmp_path / p.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(p.read_text())
    assert find_cycle(import_graph(tmp_path)) is None
    planted = tmp_path / "m2cnn_tf" / "checkpoints.py"
    lazy = "\n\ndef _planted():\n    from m2cnn_tf import backends\n"
    planted.write_text(planted.read_text() + lazy)
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and {"m2cnn_tf.checkpoints", "m2cnn_tf.backends"} <= set(cycle)


def test_a_type_checking_import_is_not_a_dependency(tmp_path):
    pkg = tmp_path / "m2cnn_tf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from m2cnn_tf import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from m2cnn_tf.a import X\n"
    )
    graph = import_graph(tmp_path, packages=("m2cnn_tf",))
    assert graph["m2cnn_tf.a"] == {"m2cnn_tf.b"} and graph["m2cnn_tf.b"] == set()


@pytest.mark.parametrize(
    "module",
    ["m2cnn_tf.checkpoints", "m2cnn_tf.backends", "m2cnn_tf.prediction", "m2cnn_tf.manifest",
     "m2cnn_tf.serve.grader", "m2cnn_tf.serve.app", "m2cnn_tf.config", "m2cnn_tf.tta",
     "m2cnn_tf.quantization", "m2cnn_tf.export"],
)  # fmt: skip
def test_tf_free_modules_import_neither_tensorflow_nor_keras_at_the_top(module):
    """What the LiteRT paths load: no TensorFlow or Keras import outside a function, directly or
    through a project module they import at the top."""
    paths = {module_name(p, ROOT): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}

    def top_imports(name: str) -> set[str]:
        tree = ast.parse(paths[name].read_text())
        found = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        return found

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found = top_imports(name)
        heavy = {m for m in found if m.split(".")[0] in ("tensorflow", "keras")}
        assert not heavy, f"{name} imports {heavy} at the top (reached from {module})"
        todo += [m for m in found if m in paths]
