"""Pivotal tuning is one object (sdlora/training/run/pivotal.py): a run holds `Pivotal` or the do-nothing `NoConcept`,
and the code that builds and runs it calls the two alike. Checked on the source of sdlora/training and sdlora/cli:
no branch on whether a run has a concept (`if concept`, `concept is None`, `isinstance(x, Pivotal)`), and the
`[pivotal]` settings read only in pivotal.py, besides two config-level readers that run without a training run
(the family's capability check, and the trigger phrase `sdlora compare` uses too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = "sdlora/training/run/pivotal.py"
READERS = {("sdlora/training/run/setup.py", "check_family_options"),
           ("sdlora/training/periodic/image_validation.py", "trigger_of")}
KINDS = {"Pivotal", "NoConcept"}


def _is_concept(node: ast.expr) -> bool:
    """`concept`, `state.concept` or `self.concept` (a ValidationPrompt's `p.concept` is a flag, not the object)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        node = node.operand
    if isinstance(node, ast.Name):
        return node.id == "concept"
    return isinstance(node, ast.Attribute) and node.attr == "concept" and ast.unparse(node.value) in ("state", "self")


def _asks(node: ast.AST) -> bool:
    """Whether the node asks if there is a concept: tests it, compares it with None, or checks its class."""
    if isinstance(node, (ast.If, ast.IfExp, ast.While)):
        return _is_concept(node.test)
    if isinstance(node, ast.BoolOp):
        return any(map(_is_concept, node.values))
    if isinstance(node, ast.Compare):
        sides = [node.left, *node.comparators]
        return any(map(_is_concept, sides)) and any(isinstance(s, ast.Constant) and s.value is None for s in sides)
    return isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance" and len(node.args) == 2 \
        and bool({n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & KINDS)


def violations(source: str, where: str) -> list[str]:
    """Each branch on the concept and each read of the `[pivotal]` settings outside their readers, as 'where:line'."""
    tree = ast.parse(source)
    allowed = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and (where, fn.name) in READERS:
            allowed |= set(range(fn.lineno, fn.end_lineno + 1))
    found = [f"{where}:{n.lineno}: `{ast.unparse(n)}` asks whether the run has a concept"
             for n in ast.walk(tree) if _asks(n)]
    found += [f"{where}:{n.lineno}: `{ast.unparse(n)}` reads the pivotal settings outside {HOME}"
              for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "pivotal"
              and n.lineno not in allowed]
    return found


def scan() -> list[str]:
    files = sorted(p for top in ("training", "cli") for p in (ROOT / "sdlora" / top).rglob("*.py"))
    return [v for p in files if (where := p.relative_to(ROOT).as_posix()) != HOME
            for v in violations(p.read_text(), where)]


def test_the_run_never_asks_whether_it_has_a_concept():
    found = scan()
    assert not found, "call the concept (Pivotal / NoConcept in pivotal.py) instead:\n" + "\n".join(found)


PLANTED = {  # code the tree once had
    "if state.concept is not None:\n    pass\n": "asks whether the run has a concept",
    "params = concept.params if concept else []\n": "asks whether the run has a concept",
    "trigger = state.concept.token if state.concept else ''\n": "asks whether the run has a concept",
    "ok = state.concept and True\n": "asks whether the run has a concept",
    "ok = isinstance(state.concept, NoConcept)\n": "asks whether the run has a concept",
    "if cfg.pivotal.token:\n    pass\n": "reads the pivotal settings",
    "lr = state.cfg.pivotal.continue_lr\n": "reads the pivotal settings",
}


def test_the_check_catches_a_planted_branch():
    """Each planted line is caught in the loop; calling the concept, a prompt's `p.concept` flag and the allowed
    readers pass."""
    loop = (ROOT / "sdlora" / "training" / "loop.py").read_text()
    assert violations(loop, "sdlora/training/loop.py") == []
    for code, said in PLANTED.items():
        found = violations(loop + code, "sdlora/training/loop.py")
        assert len(found) == 1 and said in found[0], (code, found)
    calls = ("params = state.optim.lora_params + state.concept.params\n"
             "trigger = state.concept.token or 'sks'\n"
             "if not p.concept:\n    pass\n"
             "state.concept.check_trained(step)\n")
    assert violations(loop + calls, "sdlora/training/loop.py") == []
    reader = "def trigger_of(cfg):\n    return cfg.pivotal.trigger if cfg.pivotal.token else ''\n"
    assert violations(reader, "sdlora/training/periodic/image_validation.py") == []
    assert len(violations(reader, "sdlora/training/loop.py")) == 2
