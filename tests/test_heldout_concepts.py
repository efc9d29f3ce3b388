"""scripts/heldout_concepts.py's summary: mean and worst per role, the verdict against the issue's targets, and the
report read back from its JSON lines. Rows are made up here (no training); the expected figures are worked out by
hand from them."""

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("heldout_concepts",
                                                  Path(__file__).parents[1] / "scripts" / "heldout_concepts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(concept, role, cf, pf, drop, last=None, label="a"):
    figures = {"concept_fidelity": cf, "prompt_fidelity": pf, "base_accuracy_with_lora": 1.0 - drop,
               "base_accuracy_without_lora": 1.0, "preservation_drop": drop}
    return {"concept": concept, "role": role, "selected_step": 750, "selected": figures,
            "last": last or figures, "label": label}


ROWS = [row("cross", "held-out", 1.0, 0.9375, 0.0),
        row("diamond", "held-out", 0.9375, 0.875, 0.03125, last=row("", "", 0.5, 0.5, 0.25)["selected"]),
        row("crescent", "held-out", 0.96875, 1.0, 0.0),
        row("heart", "tuned", 0.25, 0.25, 0.5)]


def test_mean_and_worst_per_role(script):
    held = script.aggregate(ROWS, "selected", "held-out")
    assert held["concepts"] == 3
    assert held["mean"] == pytest.approx({"concept_fidelity": (1.0 + 0.9375 + 0.96875) / 3,
                                          "prompt_fidelity": (0.9375 + 0.875 + 1.0) / 3,
                                          "preservation_drop": 0.03125 / 3})
    # worst: the lowest fidelities, the largest drop (each figure's own worst concept)
    assert held["worst"] == {"concept_fidelity": 0.9375, "prompt_fidelity": 0.875, "preservation_drop": 0.03125}
    assert not held["targets_met"]  # 3.1 points lost > 3
    tuned = script.aggregate(ROWS, "selected", "tuned")  # the tuned concept never enters the held-out figures
    assert tuned["concepts"] == 1 and tuned["mean"]["concept_fidelity"] == 0.25
    last = script.aggregate(ROWS, "last", "held-out")
    assert last["worst"] == {"concept_fidelity": 0.5, "prompt_fidelity": 0.5, "preservation_drop": 0.25}
    assert script.aggregate(ROWS, "selected", "nobody") is None


def test_targets_are_inclusive(script):
    rows = [row("cross", "held-out", 0.90, 0.85, 0.03), row("diamond", "held-out", 1.0, 1.0, -0.02)]
    assert script.aggregate(rows, "selected", "held-out")["targets_met"]
    rows.append(row("crescent", "held-out", 0.875, 1.0, 0.0))
    assert not script.aggregate(rows, "selected", "held-out")["targets_met"]


def test_table_and_report_only(script, tmp_path, capsys):
    text = script.table(ROWS)
    assert "| diamond | held-out | selected (step 750) | 93.8% | 87.5% | 96.9% / 100.0% | +3.1% |" in text
    assert "| diamond | held-out | last | 50.0% | 50.0% | 75.0% / 100.0% | +25.0% |" in text
    assert "selected held-out worst concept_fidelity  93.8%  prompt_fidelity  87.5%  preservation_drop   3.1%" \
        "  (targets NOT met)" in text
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, row("star", "held-out", 0, 0, 0, label="b")]))
    script.main(["--report-only", "--results", str(results), "--label", "a"])
    out = capsys.readouterr().out
    assert "| cross |" in out and "| star |" not in out
    script.main(["--report-only", "--results", str(results)])  # default: the last row's label
    out = capsys.readouterr().out
    assert out.startswith("b\n") and "| star |" in out and "| cross |" not in out
    with pytest.raises(SystemExit):
        script.main(["--report-only", "--results", str(results), "--label", "nope"])


def test_replay_picks_what_another_weighting_would_have_kept(script):
    """The logged parts, re-weighted: (w_l L + w_a A + w_p P - w_c C) / (w_l + w_a + w_p), the best kept, a tie
    going to the later step (the trainer's rule), worked out by hand."""
    history = {250: {"likeness": 0.5, "adherence": 0.75, "preservation": 1.0, "copying": 0.6},
               500: {"likeness": 1.0, "adherence": 0.75, "preservation": 1.0, "copying": 0.7},
               750: {"likeness": 1.0, "adherence": 0.5, "preservation": 1.0, "copying": 0.8},
               1000: {"likeness": 0.75, "adherence": 1.0, "preservation": 1.0, "copying": 0.8}}
    # likeness and preservation: 0.75, 1.0, 1.0, 0.875 -> the tie at 1.0 keeps the later step, 750
    assert script.replayed_step(history, "likeness=1,adherence=0,preservation=1,copying=0") == 750
    # adding adherence: (L + A + P) / 3 = 0.75, 0.917, 0.833, 0.917 -> the tie keeps step 1000
    assert script.replayed_step(history, "likeness=1,adherence=1,preservation=1") == 1000
    # a copying penalty of 1 on likeness alone: L - C = -0.1, 0.3, 0.2, -0.05 -> step 500
    assert script.replayed_step(history, "likeness=1,copying=1") == 500
