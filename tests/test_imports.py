"""Imports go one way: the package's module-level import graph, read with `ast` (no module is imported), has no
cycle, and no production module imports the test oracle (uno_engine.reference), the test support
(uno_engine.testing), tests/ or benchmarks/.

Every `import` / `from ... import` statement counts, also those inside functions and methods: a function-level
import is how a cycle hides (it works at import time and ties the modules together all the same). The graph's
nodes are the modules of uno_engine/ and of kernels/ (installed as uno_engine.kernels); an edge a -> b means
module a names module b in an import. `from pkg import name` points at the submodule pkg.name when there is
one, else at pkg. Parent packages that Python initializes on the way are not edges (every module would then
sit in a cycle with its package's __init__).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from uno_engine.critics import SUPPORTED_CLASSES, Critic, JanusCritic, LlavaCritic, Qwen2VLCritic, registry

ROOT = Path(__file__).resolve().parent.parent
# source folder -> dotted package it is installed as (pyproject.toml [tool.setuptools] package-dir)
PACKAGE_DIRS = {ROOT / "uno_engine": "uno_engine", ROOT / "kernels": "uno_engine.kernels"}
# test and benchmark support that may use the oracle; everything else in the package is production code
NOT_PRODUCTION = ("uno_engine.reference", "uno_engine.testing")
FORBIDDEN = ("uno_engine.reference", "uno_engine.testing", "tests", "benchmarks", "harness", "conftest")


def _modules() -> dict[str, Path]:
    """dotted module name -> file, for every .py of the package (packages by their __init__)."""
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported dotted name, line) of every import statement in the module, at any depth."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
    return out


def _resolve(target: str) -> str | None:
    """The package module a dotted import name lands in (the longest known prefix), or None if outside."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def _graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges = graph.setdefault(name, {})
        for target, line in _imports(name, path):
            dst = _resolve(target)
            if dst is not None and dst != name:
                edges.setdefault(dst, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a path."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:  # a shortest cycle through the component's first module (breadth-first)
        start = min(comp)
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        found = v
                        break
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [], found
        while v is not None:
            path.append(v)
            v = prev[v]
        cycles.append(path[::-1] + [start])
    return cycles


def _describe(graph, cycle: list[str]) -> str:
    return (
        " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False))
        + f" -> {cycle[-1]}"
    )


def test_walker_sees_the_package():
    """The walker finds the modules and the imports it is meant to judge (so an empty graph cannot pass)."""
    graph = _graph()
    for mod in ("uno_engine", "uno_engine.step", "uno_engine.critics.base", "uno_engine.kernels.bridge"):
        assert mod in graph, sorted(graph)
    assert "uno_engine.critics.base" in graph["uno_engine.critics"]
    assert "uno_engine.critics.registry" in graph["uno_engine.critics.base"]
    assert "uno_engine.kernels.bridge" in graph["uno_engine.ops._bridge_ops"]  # kernels/ is uno_engine.kernels


def test_function_level_and_relative_imports_are_edges(tmp_path):
    """Imports inside functions and methods, relative ones included, are read like module-level ones."""
    src = tmp_path / "m.py"
    src.write_text(
        "class C:\n"
        "    def f(self):\n"
        "        from uno_engine.step import UNOStep\n"
        "        from .base import Critic\n"
        "        from .. import reference\n"
        "        import uno_engine.kernels.bridge as kb\n"
    )
    got = [t for t, _ in _imports("uno_engine.critics.m", src)]
    assert got == [
        "uno_engine.step",
        "uno_engine.critics.base",
        "uno_engine.reference",
        "uno_engine.kernels.bridge",
    ]


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycle():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles in the package:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_kernels_know_nothing_of_the_engine():
    graph = _graph()
    bad = {
        m: [d for d in deps if not d.startswith("uno_engine.kernels")]
        for m, deps in graph.items()
        if m.startswith("uno_engine.kernels")
    }
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"kernels/ imports uno_engine modules: {bad}"


def _forbidden_imports() -> list[str]:
    found = []
    for name, path in MODULES.items():
        if name.startswith(NOT_PRODUCTION):
            continue
        for target, line in _imports(name, path):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return found


def test_forbidden_finder_sees_an_oracle_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def prepare():\n    from uno_engine import reference\n")
    targets = [t for t, _ in _imports("uno_engine.critics.m", src)]
    assert targets == ["uno_engine.reference"]


def test_forbidden_finder_sees_a_testing_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def main():\n    from uno_engine.testing.presets import build_preset\n")
    targets = [t for t, _ in _imports("uno_engine.m", src)]
    assert targets == ["uno_engine.testing.presets"]
    assert any(t.startswith(f + ".") for t in targets for f in FORBIDDEN)


def test_production_never_imports_oracle_tests_or_benchmarks():
    """No production module imports the oracle, uno_engine.testing (test presets and the commands built on
    them, e.g. diagnose_preset), tests/ or benchmarks/, at any depth (function-level imports included)."""
    found = _forbidden_imports()
    assert not found, "production modules import test/benchmark code:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------- the family registry
class LlavaForConditionalGeneration(torch.nn.Module):  # a stand-in with the transformers class's name
    pass


class MyLlava(LlavaForConditionalGeneration):  # a user's subclass of a supported model
    pass


class ProbeForConditionalGeneration(torch.nn.Module):
    pass


class _ProbeCritic(Critic):
    hf_class_names = ("ProbeForConditionalGeneration",)
    family = "Probe"

    def __init__(self, model, processor, *, instruction=None, checkpoint, attn_backend, trim=True):
        torch.nn.Module.__init__(self)
        self.args = (model, processor, instruction, checkpoint, attn_backend, trim)


class _SecondLlavaCritic(Critic):
    hf_class_names = ("LlavaForConditionalGeneration",)


def test_registry_finds_families_by_mro():
    assert registry.lookup(MyLlava()) is LlavaCritic
    assert registry.lookup(torch.nn.Linear(1, 1)) is None
    names = registry.supported_classes()
    for cls in (LlavaCritic, JanusCritic, Qwen2VLCritic):
        assert set(cls.hf_class_names) <= set(names), (cls, names)
    assert set(SUPPORTED_CLASSES) == set(names)
    with pytest.raises(TypeError, match="Linear is not supported; supported classes: .*Qwen2_5_VL"):
        Critic.from_hf(torch.nn.Linear(1, 1))


def test_registering_a_family_is_all_from_hf_needs():
    model, proc = ProbeForConditionalGeneration(), object()
    try:
        assert registry.register_critic(_ProbeCritic) is _ProbeCritic
        critic = Critic.from_hf(model, proc, instruction="say", checkpoint="layer", attn_backend="sdpa", trim=False)
        assert type(critic) is _ProbeCritic and critic.args == (model, proc, "say", "layer", "sdpa", False)
        assert registry.registered_families()["Probe"] == ("ProbeForConditionalGeneration",)
    finally:
        registry._BY_CLASS_NAME.pop("ProbeForConditionalGeneration", None)
    assert registry.lookup(model) is None


def test_register_rejects_bad_or_taken_names():
    with pytest.raises(ValueError, match="already wrapped by .*LlavaCritic"):
        registry.register_critic(_SecondLlavaCritic)
    assert registry.lookup(MyLlava()) is LlavaCritic  # nothing half-registered

    class_names = ((), ("",), ["LlavaForConditionalGeneration"], None)
    for names in class_names:
        bad = type("BadCritic", (Critic,), {"hf_class_names": names})
        with pytest.raises(ValueError, match="hf_class_names must be a non-empty tuple"):
            registry.register_critic(bad)


def test_top_level_kernels_from_the_repo_root_is_not_our_folder():
    """From the repository root (python -c / python -m put it first on sys.path) `import kernels` must not
    give kernels/ (transformers >= 5.25 imports HF's `kernels` library): with the library installed it is
    the library, without it a module with no __file__ (transformers' probe then skips it); either way
    `import transformers` and a model's attention import work from the root."""
    import subprocess
    import sys

    code = (
        "import importlib.util, kernels, transformers\n"
        "from transformers.integrations import hub_kernels\n"
        "f = getattr(kernels, '__file__', None)\n"
        "assert f is None or 'site-packages' in f or 'dist-packages' in f, f\n"
        "print('ok', f)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
