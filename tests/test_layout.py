"""The package boundaries the design promises: imports run cli -> launch/sweeps -> engine -> the rest -> core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cap"
MAX_LINES = 350

# which of cap's packages each package may import (beyond itself); top-level modules are cap/__init__.py,
# cap/__main__.py and the two re-export modules that keep the README's first names working
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "data": set(),
    "tracking": set(),
    "deploy": {"core", "models"},
    "engine": {"core", "models", "data", "tracking"},
    "sweeps": {"engine", "tracking", "core", "data", "models"},
    "launch": {"engine", "sweeps", "tracking", "core", "data", "models"},
    "cli": {"engine", "sweeps", "launch", "tracking", "deploy", "core", "data", "models"},
    "<top>": {"cli", "core", "deploy", "engine"},
}


def cap_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported cap module) for every import in `path`, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "cap"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "cap":
                found += [(node.lineno, f"cap.{a.name}") for a in node.names]
            elif node.module.startswith("cap."):
                found.append((node.lineno, node.module))
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (ROOT / parts[1]).is_dir() else "<top>"


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    rel = path.relative_to(ROOT)
    own = rel.parts[0] if len(rel.parts) > 1 else "<top>"
    wrong = [f"{rel}:{line} imports {mod}" for line, mod in cap_imports(path)
             if (pkg := package_of(mod)) != own and pkg not in ALLOWED[own]]
    assert not wrong, "imports against the layering: " + "; ".join(wrong)


def test_core_imports_nothing_else_of_cap():
    outside = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in (ROOT / "core").rglob("*.py")
               for line, mod in cap_imports(p) if not mod.startswith("cap.core")]
    assert not outside, "; ".join(outside)


def test_nothing_imports_the_cli():
    users = [f"{p.relative_to(ROOT)}:{line}" for p in sources() if "cli" not in p.relative_to(ROOT).parts
             and p.name != "__main__.py" for line, mod in cap_imports(p) if package_of(mod) == "cli"]
    assert not users, "cap.cli is the entry point only; imported by " + ", ".join(users)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for path in sources():
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = {m for _, m in cap_imports(path)}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            nxt = nxt if nxt in graph else nxt.rsplit(".", 1)[0]  # `from cap.x import name` of a module's name
            if state.get(nxt) == 1 and nxt != node and not node.startswith(nxt + "."):
                pytest.fail("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt in graph and nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in sources()}
    big = [f"{p} ({n} lines)" for p, n in sizes.items() if n > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(big)


def test_first_names_still_work():
    import cap
    import cap.config
    import cap.pruner
    from cap.core.config import PruneConfig
    from cap.core.pruner import Pruner
    from cap.deploy import load_compact
    from cap.engine.config import load_config

    assert cap.pruner.Pruner is Pruner and cap.config.PruneConfig is PruneConfig
    assert cap.config.load_config is load_config
    assert cap.load_compact is load_compact
