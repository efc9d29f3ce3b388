"""The README and docs/ show commands that work. Every `sdlora ...`, `python -m sdlora ...` and `python scripts/X.py
...` line in their code blocks names a subcommand (or script) that exists and is parsed by its real argparse parser,
without running (every flag known, every value accepted) and, for `train` and `slider`, dry-run (the job files and
flags merged and validated, no model loaded); an `sdlora ...` command written inline in the text uses only
its subcommand's flags; every hyphenated `--flag` the prose names is an option of sdlora or a script; `bash
scripts/x.sh` paths exist; every link between the pages reaches a file and a heading. Planted wrong lines fail."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEGATIVE_NUMBER = re.compile(r"^-\.?\d[\d.,+-]*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _joined_block_lines(text: str):
    """(line number, command line) for each line inside ``` fences, backslash continuations joined."""
    inside, pending, start = False, "", 0
    for n, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _inline_spans(text: str):
    """(line number, span) for each `code span` in the prose that is a whole sdlora command."""
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", lambda b: "\n" * b.group().count("\n"),
                                                          text, flags=re.S)):
        span = " ".join(m.group(1).split())
        if span.startswith(("sdlora ", "python -m sdlora ", "python scripts/", "python3 scripts/",
                            "accelerate launch ")):
            yield text.count("\n", 0, m.start()) + 1, span


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;), tokens unquoted, comments and the [ ] of optional
    parts dropped, leading VAR=value assignments removed."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # unbalanced quotes: still check what the words say
        tokens = line.split("#")[0].split()
    segments, current = [], []
    for token in tokens:
        ends = token.endswith(";") and token != ";"
        token = token.rstrip(";")
        if token in ("&&", "||", ";", ""):
            segments.append(current)
            current = []
            continue
        token = token.strip("[]")
        if token:
            current.append(token)
        if ends:
            segments.append(current)
            current = []
    segments.append(current)
    out = []
    for seg in segments:
        while seg and ENV_ASSIGNMENT.match(seg[0]):
            seg = seg[1:]
        if seg:
            out.append(seg)
    return out


def _command(seg: list[str]) -> tuple[str, str, list[str]] | None:
    """('sdlora', '', args) / ('script', path, args) / ('bash', path, []) for the commands this test checks."""
    head = seg[0]
    if head.split("/")[-1] == "sdlora":  # sdlora, .venv/bin/sdlora
        return "sdlora", "", seg[1:]
    module = seg[seg.index("-m") + 1] if "-m" in seg[:-1] else None
    if module == "sdlora" and head.split("/")[-1] in ("python", "python3", "accelerate"):
        return "sdlora", "", seg[seg.index("-m") + 2:]
    if head.split("/")[-1] in ("python", "python3") and len(seg) > 1 and seg[1].startswith("scripts/"):
        return "script", seg[1], seg[2:]
    if head == "bash" and len(seg) > 1 and seg[1].startswith("scripts/"):
        return "bash", seg[1], []
    return None


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


_SCRIPT_PARSERS: dict[str, argparse.ArgumentParser] = {}


def script_parser(path: str) -> argparse.ArgumentParser:
    """The parser a script's main() builds, caught at its parse_args call (nothing after it runs)."""
    if path not in _SCRIPT_PARSERS:
        module = runpy.run_path(str(ROOT / path), run_name="docs_check")

        def capture(self, *args, **kwargs):
            raise _Captured(self)

        original = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
        argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
        try:
            module["main"]()
        except _Captured as c:
            _SCRIPT_PARSERS[path] = c.parser
        finally:
            argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
        assert path in _SCRIPT_PARSERS, f"{path}: main() never parsed its arguments"
    return _SCRIPT_PARSERS[path]


@functools.cache
def _sdlora_parsers():
    from sdlora.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return top, sub.choices


def _unknown_flags(parser: argparse.ArgumentParser, args: list[str], also=()) -> list[str]:
    known = set(parser._option_string_actions) | set(also)
    return [a for a in args if a.startswith("-") and not NEGATIVE_NUMBER.match(a) and a.split("=")[0] not in known]


def _parse_error(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def check_sdlora(args: list[str], whole: bool, dry: bool) -> list[str]:
    top, subcommands = _sdlora_parsers()
    rest = list(args)
    while rest and rest[0].startswith("-"):
        if rest[0] not in top._option_string_actions:
            return [f"unknown option {rest[0]} of sdlora"]
        rest.pop(0)
    if not rest:
        return [] if not whole else ["no subcommand"]
    name, flags = rest[0], rest[1:]
    if name not in subcommands:
        return [f"no subcommand `sdlora {name}`"]
    problems = [f"`sdlora {name}` has no option {f}" for f in _unknown_flags(subcommands[name], flags)]
    if problems:
        return problems
    error = _parse_error(top, args)
    if error:  # a command in prose may be a fragment ("`sdlora caption photos/ --captioner MODEL [--prefix ...]`")
        return [f"`sdlora {name}` does not parse: {error}"] if whole else []
    if dry and flags and "--help" not in flags and (error := dry_run(args)):  # "`sdlora train`" alone is a name
        return [f"`sdlora {name}` fails its dry run: {error}"]
    return []


def dry_run(args: list[str]) -> str | None:
    """`sdlora train` / `slider` without training: the job files and flags merged and validated as a run validates
    them before any model loads (folders named in the example need not exist). None when it passes, or when the
    command names a job file the repository does not ship (a placeholder such as job.toml)."""
    from sdlora.cli.train import job_configs
    from sdlora.config import validate
    from sdlora.errors import SdloraError

    top, _ = _sdlora_parsers()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ns = top.parse_args(args)
    if ns.command not in ("train", "slider") or getattr(ns, "queue", None) or \
            not all((ROOT / c).is_file() for c in ns.configs):
        return None
    ns.configs = [str(ROOT / c) for c in ns.configs]
    try:
        for _, cfg in job_configs(ns):
            validate(cfg, check_paths=False)
    except SdloraError as e:
        return str(e)
    return None


def check_script(path: str, args: list[str], whole: bool) -> list[str]:
    if not (ROOT / path).is_file():
        return [f"no script {path}"]
    parser = script_parser(path)
    problems = [f"{path} has no option {f}" for f in _unknown_flags(parser, args)]
    if whole and not problems:
        error = _parse_error(parser, args)
        if error:
            problems.append(f"{path} does not parse: {error}")
    return problems


def problems_in(text: str, name: str) -> list[str]:
    """Every problem with the commands one page shows, as 'page:line: what'."""
    found = []
    lines = [(n, line, True) for n, line in _joined_block_lines(text)] + [(n, s, False) for n, s in _inline_spans(text)]
    for n, line, whole in lines:
        for seg in _segments(line):
            cmd = _command(seg)
            if cmd is None:
                continue
            kind, path, args = cmd
            fragment = "..." in args  # a placeholder for the rest of a command: parsed, not dry-run
            args = [a for a in args if a != "..."]
            if kind == "sdlora":
                issues = check_sdlora(args, whole, dry=not fragment)
            elif kind == "script":
                issues = check_script(path, args, whole)
            else:
                issues = [] if (ROOT / path).is_file() else [f"no script {path}"]
            found += [f"{name}:{n}: {issue}" for issue in issues]
    return found


def count_commands(text: str) -> int:
    lines = [line for _, line in _joined_block_lines(text)] + [s for _, s in _inline_spans(text)]
    return sum(_command(seg) is not None for line in lines for seg in _segments(line))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_shown_parses(page):
    assert problems_in(page.read_text(), page.name) == []


def test_the_pages_show_commands_and_the_check_sees_them():
    counts = {p.name: count_commands(p.read_text()) for p in PAGES}
    assert sum(counts.values()) > 80, counts
    for name in ("README.md", "training.md", "tools.md", "benchmarks.md", "memory.md", "families.md"):
        assert counts[name] > 0, name


@pytest.mark.parametrize("line, expected", [
    ("sdlora train job.toml --no-such-flag 3", "`sdlora train` has no option --no-such-flag"),
    ("sdlora generate --model M \\\n    --lora a.safetensors:0.8 --scale 2", "`sdlora generate` has no option --scale"),
    ("sdlora trian job.toml", "no subcommand `sdlora trian`"),
    ("sdlora fit job.toml --vram", "`sdlora fit` does not parse"),
    ("sdlora train --network lokra", "`sdlora train` does not parse"),
    ("sdlora train --data photos/ --output out/x.safetensors --resolution 500", "dry run: augment.resolution"),
    ("sdlora train sample_data/demo.toml --optimizer prodigy --text-encoder-lr 1e-5", "fails its dry run: prodigy"),
    ("sdlora slider --model sd15/ --slider-positive old --output out/x.safetensors", "fails its dry run"),
    ("OMP_NUM_THREADS=1 python scripts/bench_train.py --family sd1 --batches 2",
     "scripts/bench_train.py has no option --batches"),
    ("python scripts/no_such_script.py --help", "no script scripts/no_such_script.py"),
    ("bash scripts/setup.sh --test && .venv/bin/sdlora demo --fast", "`sdlora demo` has no option --fast"),
    ("bash scripts/no_such.sh", "no script scripts/no_such.sh"),
    ('sdlora caption photos/ --prefix "sks, --overwritten', "`sdlora caption` has no option --overwritten"),
    ("accelerate launch --multi_gpu -m sdlora train job.toml --rnak 4", "`sdlora train` has no option --rnak"),
])
def test_a_planted_wrong_line_fails(line, expected):
    found = problems_in(f"# page\n\ntext\n\n```bash\n{line}\n```\n", "planted.md")
    assert any(expected in p for p in found), found


def test_a_planted_inline_command_with_a_wrong_flag_fails():
    found = problems_in("Use `sdlora train job.toml --rank 4 --no-such-flag` here.\n", "planted.md")
    assert found == ["planted.md:1: `sdlora train` has no option --no-such-flag"]
    assert problems_in("Use `sdlora train job.toml --rank 4` here.\n", "planted.md") == []
    found = problems_in("Then `sdlora train sample_data/demo.toml --lr-scheduler cosine\n--optimizer "
                        "adamw-schedulefree` and so on.\n", "planted.md")
    assert len(found) == 1 and found[0].startswith("planted.md:1: `sdlora train` fails its dry run: "
                                                   "adamw-schedulefree"), found


# Hyphenated flags of other programs that the pages mention, each with the file that takes it. Flags with underscores
# (kohya's, diffusers' and accelerate's scripts: `--logit_mean`, `--multi_gpu`) are theirs and not checked.
OTHERS_FLAGS = {
    "--test": "scripts/setup.sh", "--drift": "tests/test_golden.py",
    "--index-url": "pip", "--no-index": "pip", "--no-deps": "pip", "--no-compile": "pip", "--no-cache-dir": "pip",
    "--upgrade": "pip", "--target": "pip", "--query-gpu": "nvidia-smi", "--attributes": "Concept Sliders",
}


def all_options() -> set[str]:
    top, subcommands = _sdlora_parsers()
    known = set(top._option_string_actions)
    for parser in subcommands.values():
        known |= set(parser._option_string_actions)
    for script in sorted((ROOT / "scripts").glob("*.py")):
        known |= set(script_parser(f"scripts/{script.name}")._option_string_actions)
    return known


def unknown_flags_in_prose(text: str, known: set[str]) -> list[str]:
    flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text)
    return sorted({f for f in flags if "_" not in f and f not in known and f not in OTHERS_FLAGS})


def test_every_flag_the_pages_name_is_an_option():
    known = all_options()
    assert {p.name: unknown_flags_in_prose(p.read_text(), known) for p in PAGES} == {p.name: [] for p in PAGES}
    for flag, where in OTHERS_FLAGS.items():
        if where.endswith((".sh", ".py")):
            assert flag in (ROOT / where).read_text(), (flag, where)
    assert unknown_flags_in_prose("`--shuffle-tags`, `--keep-tagz 1` and kohya's `--keep_tokens`", known) == [
        "--keep-tagz"]


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_every_link_between_pages_reaches_a_file_and_a_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no heading)")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme] == []


def test_the_readme_is_a_newcomers_page_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 15_000, len(readme)
    blocks = [line for _, line in _joined_block_lines(readme)]
    test_command = next(line for line in blocks if "pytest" in line and not line.startswith("#"))
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()
