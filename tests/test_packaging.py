"""What the code imports is what pyproject.toml declares: a fresh install has every package the library and the UI
import (optional ones through an extra), so nothing works only on a machine that had it installed by hand."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def declared() -> tuple[set[str], set[str]]:
    """(base dependencies, extras' dependencies) as normalised distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    return names(project["dependencies"]), names(r for extra in project["optional-dependencies"].values()
                                                   for r in extra)


def imported() -> dict[str, str]:
    """Third-party top-level module -> a file importing it (sdlora/ and ui/, every import statement)."""
    found = {}
    for path in [*ROOT.joinpath("sdlora").rglob("*.py"), *ROOT.joinpath("ui").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("sdlora", "ui"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    base, extras = declared()
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, where in imported().items():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & (base | extras):
            missing.append(f"{module} (imported in {where}; distribution {sorted(names)})")
    assert not missing, "declare in pyproject.toml: " + "; ".join(missing)


def test_optional_packages_are_imported_only_inside_functions():
    """An extra's package imported at module level would break `import` on a base install."""
    base, extras = declared()
    dists = importlib.metadata.packages_distributions()
    for path in [*ROOT.joinpath("sdlora").rglob("*.py"), *ROOT.joinpath("ui").rglob("*.py")]:
        for node in ast.parse(path.read_text()).body:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for m in mods:
                names = {d.lower().replace("_", "-") for d in dists.get(m.split(".")[0], [])}
                assert not (names & extras - base), f"{path.relative_to(ROOT)} imports optional {m} at module level"


def test_every_package_folder_ships_in_the_wheel():
    """pyproject lists the packages (sample_data is mapped, not found), so a folder of modules missing from the list
    would install without its code."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for top in ("sdlora", "ui")
               for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts}
    assert folders <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(folders - listed)}"
