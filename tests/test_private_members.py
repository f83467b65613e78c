"""No package of uno_engine calls another package's private members.

A package is a folder under uno_engine/ (critics, latent, ops, generators, testing, ...), the modules directly
in uno_engine/ being one more ("uno_engine"), and kernels/. `obj._name` (not `self._name` / `cls._name`, not a
dunder) in a package's module is a violation when `_name` is defined only in other packages of ours (a def, a
class, an assignment or a `self._name = ...`): it is then another package's private member. Private names of
third-party libraries (torch's, transformers') are not this test's business.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "kernels"
    return rel.parts[1] if len(rel.parts) > 2 else "uno_engine"


def _files():
    yield from (ROOT / "uno_engine").rglob("*.py")
    yield from (ROOT / "kernels").rglob("*.py")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _definitions(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)  # setattr-style keyword construction (dataclass fields, ...)
    return {n for n in names if _private(n)}


def _accesses(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            yield node.attr, node.lineno


def violations() -> list[str]:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in _files()}
    defined = defaultdict(set)
    for path, tree in trees.items():
        defined[_package(path)] |= _definitions(tree)
    found = []
    for path, tree in trees.items():
        pkg = _package(path)
        for name, line in _accesses(tree):
            if name in defined[pkg]:
                continue
            owners = sorted(p for p, names in defined.items() if name in names)
            if owners:
                found.append(f"{path.relative_to(ROOT)}:{line}: .{name} is private to {', '.join(owners)}")
    return found


def test_no_package_calls_another_packages_private_members():
    found = violations()
    assert not found, "private members used across packages:\n" + "\n".join(found)


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The check itself can fail: a latent-view module reaching for the critic's private `_encode`."""
    global ROOT
    pkg = tmp_path / "uno_engine"
    (pkg / "critics").mkdir(parents=True)
    (pkg / "latent").mkdir()
    (tmp_path / "kernels").mkdir()
    (pkg / "critics" / "base.py").write_text("class Critic:\n    def _encode(self, x):\n        return x\n")
    (pkg / "latent" / "view.py").write_text("def read(critic, x):\n    return critic._encode(x)\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    old, ROOT = ROOT, tmp_path
    try:
        found = violations()
    finally:
        ROOT = old
    assert found == ["uno_engine/latent/view.py:2: ._encode is private to critics"]
