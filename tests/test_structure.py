"""One home for each kind of knowledge, checked on the source: what tells the model families apart lives in
sdlora/families/ (a module per family and a row in its table), so adding a family means one module and one row.

No module outside sdlora/families/ names a family: no string that is a family's name ("sdxl"), its pipeline or its
denoiser class ("StableDiffusion3Pipeline", "SD3Transformer2DModel"), and no comparison of a row's naming attributes
with a string, which stands for one (`family.kohya_naming == "sgm"`, `fam.denoiser_attr == "transformer"`,
`slot.kohya_prefix == "lora_te1"`): such code asks the family's row instead.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from sdlora.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "sdlora" / "families"
NAMES = {n for f in FAMILIES.values() for n in (f.name, f.pipeline_class, f.denoiser_class)}
# attributes of a family row or its text-encoder slots that say which family it is: compared with a string, they
# stand for a family's name
ROW_ATTRS = {"name", "kohya_naming", "denoiser_attr", "denoiser_class", "pipeline_class", "kohya_prefix",
             "model_class", "tokenizer_attr"}


def _row_attr(node: ast.expr) -> str | None:
    """`x.kohya_naming` -> 'kohya_naming' where x looks like a family row or slot (`family`, `fam`, `slot`, `s`, ...);
    for `.name` only when the object is called family/fam (a Path's .name is not a family)."""
    if not isinstance(node, ast.Attribute) or node.attr not in ROW_ATTRS:
        return None
    owner = ast.unparse(node.value).split(".")[-1]
    if node.attr == "name" and owner not in ("family", "fam"):
        return None
    return node.attr


@functools.cache
def violations(source: str, where: str) -> list[str]:
    """Each family-name string and each row-attribute comparison with a string in `source`, as 'where:line: ...'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES:
            found.append(f"{where}:{node.lineno}: the literal {node.value!r} names a family")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            attrs = [a for a in map(_row_attr, sides) if a]
            strings = [c for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant) and type(c.value) is str]
            if attrs and strings:
                found.append(f"{where}:{node.lineno}: `{ast.unparse(node)}` compares a family's {attrs[0]} with a "
                             "string")
    return found


def scan(root: Path) -> list[str]:
    """The violations in every module of sdlora/ and ui/ under `root` outside sdlora/families/."""
    home = root / "sdlora" / "families"
    files = sorted(p for top in ("sdlora", "ui") for p in (root / top).rglob("*.py") if home not in p.parents)
    return [v for p in files for v in violations(p.read_text(), p.relative_to(root).as_posix())]


def test_no_family_is_named_outside_its_package():
    found = scan(ROOT)
    assert not found, "ask the family's row (sdlora/families) instead:\n" + "\n".join(found)


PLANTED = {  # code the tree once had, and what the check says about it
    "if info.family == 'sd3':\n    pass\n": "the literal 'sd3' names a family",
    "FROM_SHAPE = {768: 'sd1', 2048: 'sdxl'}\n": "the literal 'sd1' names a family",
    "if family.kohya_naming == 'sgm':\n    pass\n": "compares a family's kohya_naming",
    "module = 'a' if family is not None and family.kohya_naming == 'mmdit' else 'b'\n": "compares a family's kohya",
    "sub = 'transformer' if fam.denoiser_attr == 'transformer' else 'unet'\n": "compares a family's denoiser_attr",
    "aliases = ('lora_te',) if slot.kohya_prefix == 'lora_te1' else ()\n": "compares a family's kohya_prefix",
    "ok = cls in ('UNet2DConditionModel', 'SD3Transformer2DModel')\n": "'UNet2DConditionModel' names a family",
    "v2 = c.family.name in names\nflow = c.family.name in ('x',)\n": "compares a family's name",
}


def test_the_check_catches_a_planted_violation(tmp_path):
    """A copy of the tree passes; each planted line is caught in loras/layout.py and passes in a family's module;
    code that asks the row passes everywhere."""
    for p in [*ROOT.joinpath("sdlora").rglob("*.py"), *ROOT.joinpath("ui").rglob("*.py")]:
        copy = tmp_path / p.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(p.read_text())
    assert scan(tmp_path) == []
    layout, family = tmp_path / "sdlora" / "loras" / "layout.py", tmp_path / "sdlora" / "families" / "sd.py"
    originals = {layout: layout.read_text(), family: family.read_text()}
    for code, said in PLANTED.items():
        layout.write_text(originals[layout] + code)
        found = scan(tmp_path)
        assert len(found) >= 1 and all(f.startswith("sdlora/loras/layout.py:") for f in found), (code, found)
        assert any(said in f for f in found), (code, found)
        layout.write_text(originals[layout])
        family.write_text(originals[family] + code)
        assert scan(tmp_path) == [], code  # a family's own module may name it
        family.write_text(originals[family])
    asks_the_row = ("module = family.kohya_lora_module or 'networks.lora'\n"
                    "namer = family.kohya_naming.path(config)\n"
                    "if path.name == 'model.safetensors':\n    pass\n"
                    "part = 'unet' if key.startswith('unet.') else 'text_encoder'\n")
    layout.write_text(originals[layout] + asks_the_row)
    assert scan(tmp_path) == []
