"""The package's shape: imports point down the layers (every import, inside functions too), so
there is no import cycle; the recipe is read as typed attributes everywhere; the public API."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "raytune_ft"
# Bottom to top: a module may import its own layer and the layers below, never one above.
LAYERS = [
    ("errors", "log", "schema", "checkpoint", "run_folder", "ray_compat", "worker_setup"),
    ("data", "models"),
    ("tasks", "strategies", "backends"),  # the registries
    ("recipe", "evaluation"),  # validation against the registries; sharded evaluation
    ("report",),
    ("post",),
    ("addons",),  # the loop's add-ons
    ("train",),  # the loop and the driver that runs it
    ("search",),
    ("jobs", "cli", "docs_reference", "warm"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (absolute and relative, anywhere in the file)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                stem = node.module or ""
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    stem = f"{base}.{stem}" if stem else base
                targets.update({stem, *(f"{stem}.{alias.name}" for alias in node.names)})
        resolved = {resolve(target) for target in targets if target.split(".")[0] == "raytune_ft"}
        # A module reaches its own package's __init__ (and the root's) without depending on it.
        graph[name] = {target for target in resolved if target and target != name and not name.startswith(f"{target}.")}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    if top == "__init__":
        return len(LAYERS)  # the public API sits above everything
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_imports_point_down_the_layers_so_there_is_no_cycle():
    graph = imports()
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if layer(target) > layer(module))
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(upward)

    def cycle_from(start: str, seen: list[str]) -> list[str] | None:
        for target in sorted(graph[start]):
            if target in seen:
                return seen[seen.index(target):] + [target]
            found = cycle_from(target, seen + [target])
            if found:
                return found
        return None

    for module in sorted(graph):
        cycle = cycle_from(module, [module])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    unplaced = sorted(module for module in imports() if "." in module and not any(module.split(".")[1] in names for names in LAYERS))
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_the_recipe_is_read_as_typed_attributes_everywhere():
    pattern = re.compile(r'recipe\[|config\["(task|model|data|strategy|train|scaling|retention|deepspeed)"\]')
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in sorted(PACKAGE.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)


def test_the_runner_is_short_and_the_public_api_imports_lightly():
    assert len((PACKAGE / "train" / "runner.py").read_text().splitlines()) <= 250
    # The public names exist, and importing the package imports neither Ray nor torch (the
    # command line imports it on every call).
    code = ("import sys, raytune_ft as r; r.load_recipe; r.run; r.tune; r.register_task; r.register_strategy; "
            "r.register_addon; r.register_backend; heavy = [m for m in ('ray', 'torch') if m in sys.modules]; "
            "print(heavy); r.Recipe")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    for name in ("load_recipe", "run", "tune", "register_task", "register_strategy", "register_addon", "register_backend"):
        import raytune_ft

        doc = getattr(raytune_ft, name).__doc__ or ""
        assert "Example" in doc, f"raytune_ft.{name} has no example in its docstring"
