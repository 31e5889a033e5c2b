"""The dependency rules of ../shared/DESIGN.md ("Dependency direction"), asserted over the package's imports:
every `import` and `from … import` anywhere in a module (at its top or inside a function: a lazy import is
still a dependency), followed transitively."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pbe_jax"


def module_files() -> dict[str, Path]:
    """pbe_jax's modules by dotted name (a package by its __init__.py)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def direct_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The pbe_jax modules `name` imports: `from a import b` counts `a.b` when it is a module, else `a`; a
    package whose names load their modules lazily (`_HOMES` in its __init__) imports those modules."""
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif (isinstance(node, ast.Assign) and path.name == "__init__.py"
              and any(isinstance(t, ast.Name) and t.id == "_HOMES" for t in node.targets)):
            found |= {f"{name}.{home}" for home in ast.literal_eval(node.value).values()}
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: direct_imports(name, path, modules) for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` reaches, with one import chain to it."""
    chains, todo = {start: [start]}, [start]
    while todo:
        here = todo.pop()
        for there in sorted(graph[here]):
            if there not in chains:
                chains[there] = chains[here] + [there]
                todo.append(there)
    return chains


def inside(name: str, area: str) -> bool:
    return name == area or name.startswith(area + ".")


# (modules under this name, must never reach this one): DESIGN.md's rules
RULES = [
    ("pbe_jax.models", "pbe_jax.diffusion"), ("pbe_jax.models", "pbe_jax.convert"),
    ("pbe_jax.models", "pbe_jax.train"), ("pbe_jax.models", "pbe_jax.data"), ("pbe_jax.models", "pbe_jax.pipeline"),
    ("pbe_jax.diffusion", "pbe_jax.models"),
    ("pbe_jax.data", "pbe_jax.models"), ("pbe_jax.data", "pbe_jax.train"), ("pbe_jax.data", "pbe_jax.batch"),
    ("pbe_jax.data", "pbe_jax.pipeline"),
    ("pbe_jax.pipeline", "pbe_jax.train"), ("pbe_jax.pipeline", "pbe_jax.data"),
    ("pbe_jax.convert", "pbe_jax.train"),
    ("pbe_jax.aot", "pbe_jax.train.loop"),
]


@pytest.mark.parametrize("area,forbidden", RULES, ids=[f"{a}-not-{b}" for a, b in RULES])
def test_dependency_rule(graph, area, forbidden):
    starts = [m for m in graph if inside(m, area)]
    assert starts, f"no modules under {area}"
    broken = {}
    for start in starts:
        for reached, chain in reachable(graph, start).items():
            if inside(reached, forbidden):
                broken[start] = " → ".join(chain)
    assert not broken, f"{area} must not import {forbidden}:\n" + "\n".join(broken.values())


def test_the_rules_see_imports_inside_functions(graph):
    """The graph is not empty where it matters (a broken parser would pass every rule): the training loop's
    lazy imports and the convert package's lazily loaded names are seen."""
    assert "pbe_jax.data.loader" in graph["pbe_jax.train.loop"]  # imported inside make_loader
    assert "pbe_jax.pipeline" in graph["pbe_jax.train.loop"]  # inside the sample grid
    assert "pbe_jax.convert.build" in graph["pbe_jax.convert"]
    for user in ("pbe_jax.train.trainer", "pbe_jax.aot.report", "pbe_jax.pipeline"):  # the one builder's users
        assert "pbe_jax.convert.build" in graph[user], user
