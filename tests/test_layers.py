"""The package's layers, checked by walking every import (top-level and inside functions, and `from sdlora import
x` resolved through the lazy public API to the module that defines x): a lower layer never imports a higher one, and
no modules import each other round a cycle, within a layer too, so the foundations can be read, tested and reused
without the trainer, tools or front ends, and each module without the ones that use it.

    base -> models -> files -> trainer -> tools -> front ends
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [  # (layer, module prefixes); a module belongs to the longest prefix that names it
    ("base", ["sdlora.errors", "sdlora.io", "sdlora.paths", "sdlora.config", "sdlora.callbacks", "sdlora.hardware",
              "sdlora.failures", "sdlora.quiet", "sdlora.pickles", "sdlora.block_args"]),
    ("models", ["sdlora.families", "sdlora.models", "sdlora.single_file", "sdlora.quantize",
                "sdlora.tokenizers", "sdlora.random_pipelines", "sdlora.sampling",
                "sdlora.scoring", "sdlora.world.judge", "sdlora.world.shapes"]),  # scorers read images, not models
    ("files", ["sdlora.loras.layout", "sdlora.loras.mmdit", "sdlora.loras.modules", "sdlora.loras.networks",
               "sdlora.loras.lowrank", "sdlora.loras.files", "sdlora.loras.metadata", "sdlora.loras.checks"]),
    ("trainer", ["sdlora.training"]),
    ("tools", ["sdlora.loras.inspect", "sdlora.loras.convert", "sdlora.loras.merge", "sdlora.loras.mix",
               "sdlora.loras.apply", "sdlora.captioning", "sdlora.loras.compare",
               "sdlora.options", "sdlora.option_labels", "sdlora.presets"]),  # fields as the CLI and UI show them
    ("front", ["sdlora.cli", "sdlora.__main__", "sdlora.world", "ui"]),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
PACKAGE_INITS = {"sdlora", "sdlora.loras"}  # docstrings (and the lazy public API), no imports of their own


def layer_of(module: str) -> str | None:
    best = max(((p, name) for name, prefixes in LAYERS for p in prefixes
                if module == p or module.startswith(p + ".")), default=None, key=lambda x: len(x[0]))
    return best[1] if best else None


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.joinpath("sdlora").rglob("*.py"), *ROOT.joinpath("ui").rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def public_api() -> dict[str, str]:
    """`sdlora._API`: the names `from sdlora import x` loads lazily, and the module each comes from."""
    for node in ast.parse(ROOT.joinpath("sdlora", "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_API":
            return ast.literal_eval(node.value)
    raise AssertionError("sdlora/__init__.py has no _API table")


def imports(module: str, path: Path) -> set[str]:
    """Every sdlora/ui module this file imports, wherever the import statement stands; a name of the lazy public
    API stands for its defining module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from . import x` imports module x
    api = public_api()
    out = {api[m.split(".")[1]] if m.count(".") == 1 and m.startswith("sdlora.") and m.split(".")[1] in api else m
           for m in out}
    return {m for m in out if m.split(".")[0] in ("sdlora", "ui")}


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m not in PACKAGE_INITS and layer_of(m) is None]
    assert not unplaced, f"give these modules a layer in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_higher_layer():
    known = modules()
    wrong = []
    for module, path in known.items():
        if module in PACKAGE_INITS:
            continue
        mine = RANK[layer_of(module)]
        for target in imports(module, path):
            if target not in known or target in PACKAGE_INITS:
                continue  # a name inside a module, or a package's docstring-only __init__
            if RANK[layer_of(target)] > mine:
                wrong.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t in imports(m, p) if t in known and t not in PACKAGE_INITS and t != m}
            for m, p in known.items() if m not in PACKAGE_INITS}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_cycles_within_or_across_layers():
    assert not cycles(graph()), "modules that import each other (move the shared piece down a module):\n" + \
        "\n".join(" <-> ".join(c) for c in cycles(graph()))


def test_the_checkers_see_a_cycle_and_the_lazy_api(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    planted = graph()
    planted["sdlora.training.steps.text"].add("sdlora.training.loop")  # loop -> setup -> ... -> text -> loop
    assert any("sdlora.training.steps.text" in c for c in cycles(planted))
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from sdlora import train\n")
    assert "sdlora.training.loop" in imports("sdlora.models", path)  # models would import the trainer


LIGHT = {"quiet"}  # sdlora.quiet imports only `logging`: its warning filters must be set before any library loads


def test_package_inits_import_nothing_heavy():
    for init in PACKAGE_INITS:
        tree = ast.parse(modules()[init].read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
               and not (isinstance(n, ast.ImportFrom) and n.level == 1 and n.module in LIGHT)]
        assert not top, f"{init} imports at module level: {ast.unparse(top[0])}"
    quiet = ast.parse(modules()["sdlora.quiet"].read_text())
    assert {a.name for n in ast.walk(quiet) if isinstance(n, ast.Import) for a in n.names} <= {"logging"}


def test_the_checker_sees_a_violation(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from ..training.loop import train\n")
    assert imports("sdlora.loras.layout", path) >= {"sdlora.training.loop"}
    assert RANK[layer_of("sdlora.training.loop")] > RANK[layer_of("sdlora.loras.layout")]
