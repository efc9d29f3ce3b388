"""`sdlora compare`: any file sdlora reads (network types, pivotal files, a run's checkpoints folder, a glob), a
labelled grid and a score table best first; on the shapes world its ranking agrees with `sdlora eval`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_images, tiny_config
from PIL import Image

from sdlora import train
from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.loras.compare import CompareSettings, compare, expand_inputs


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """A LoRA run with two checkpoints, a LoHa file and a two-vector pivotal file, all on the tiny SD1 model."""
    root = tmp_path_factory.mktemp("compare")
    data = draw_images(root / "imgs", n=3)
    lora = tiny_config(tiny_model, data, root / "lora" / "l.safetensors", train__max_steps=6, optim__lr=0.05)
    lora.output.save_every = 2
    loha = tiny_config(tiny_model, data, root / "loha" / "h.safetensors", train__max_steps=2, lora__network="loha")
    piv = tiny_config(tiny_model, data, root / "piv" / "p.safetensors", train__max_steps=2)
    piv.pivotal.token, piv.pivotal.trigger, piv.pivotal.num_vectors, piv.pivotal.ti_steps = "<s1>", "sks", 2, 1
    for cfg in (lora, loha, piv):
        train(cfg)
    return {"run": root / "lora" / "l_checkpoints", "loha": loha.output.path, "piv": piv.output.path,
            "data": data, "root": root}


def pixels(im):
    return np.asarray(im, dtype=np.int16)


def test_every_kind_of_file_at_every_strength_with_the_base_row(files, tiny_model, tmp_path):
    out = tmp_path / "cmp"
    import shutil  # a second pivotal file with the same token: loads only if the first one's token was unloaded

    shutil.copy(files["piv"], Path(files["piv"]).with_name("q.safetensors"))
    s = CompareSettings(model=tiny_model, strengths=[0.0, 1.0], prompts=["a red sks", "a blue square"], seeds=1,
                        steps=2, scorer="shapes", concept="circle", trigger="sks", data=str(files["data"]))
    report = compare([str(files["run"]), files["loha"], str(Path(files["piv"]).parent / "*.safetensors")], out, s)
    names = [Path(r.file).name for r in report.rows]
    # the run's two checkpoints, the LoHa file and the pivotal files (the glob leaves p_emb.safetensors out)
    assert sorted(set(names)) == ["h.safetensors", "p.safetensors", "q.safetensors", "step_0000002.safetensors",
                                  "step_0000004.safetensors"]
    assert len(report.rows) == 10
    assert [r.score for r in report.rows] == sorted((r.score for r in report.rows), reverse=True)
    grid = Image.open(report.grid)
    assert grid.height >= 32 * (1 + len(report.rows))  # the base row and one per file and strength
    with open(report.tables["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [row["file"] for row in table] == names and table[0]["rank"] == "1"
    saved = json.loads(Path(report.tables["json"]).read_text())
    assert saved["scorer"] == "shapes" and [p["concept"] for p in saved["prompts"]] == [True, False]
    assert Path(report.tables["md"]).read_text().startswith("| rank | file | step | strength | score")


def test_strength_zero_draws_the_base_model(files, tiny_model, tmp_path, monkeypatch):
    """At strength 0 a LoRA or LoHa changes nothing: its images are the base row's (no LoRA), pixel for pixel."""
    from sdlora.loras import compare as module

    seen = []
    real = module.Renderer.render
    monkeypatch.setattr(module.Renderer, "render", lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    s = CompareSettings(model=tiny_model, strengths=[0.0, 1.0], prompts=["a red sks"], seeds=2, steps=2,
                        scorer="none", trigger="sks")
    report = compare([str(files["run"] / "step_0000004.safetensors"), files["loha"]], tmp_path / "c", s)
    base, lora0, lora1, loha0, _ = seen
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(base, lora0))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(base, loha0))
    assert any(not np.array_equal(pixels(a), pixels(b)) for a, b in zip(base, lora1))
    assert all(r.score != r.score for r in report.rows)  # scorer none: a grid, no scores


def test_a_runs_folder_supplies_prompts_trigger_and_training_images(files, tmp_path):
    from sdlora.loras.compare import run_config, settle

    found = expand_inputs([str(files["run"])])
    assert [p.name for p in found] == ["step_0000002.safetensors", "step_0000004.safetensors"]
    cfg = run_config(found)
    assert cfg.data[0].path == str(files["data"]) and cfg.train.max_steps == 6
    cfg, captions = settle(found, CompareSettings())
    assert captions == {str(files["data"]): ["a red sks"] * 3} and cfg.validation.scorer in ("shapes", "clip-dino")


def test_bad_inputs_are_one_line(files, tmp_path, capsys):
    with pytest.raises(SdloraError, match="no such file, folder or glob match"):
        expand_inputs([str(tmp_path / "nothing*.safetensors")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdloraError, match=r"no \.safetensors file"):
        expand_inputs([str(tmp_path / "empty")])
    assert main(["compare", files["loha"], "--output", str(tmp_path / "o"), "--strengths", "1,x"]) == 2
    assert main(["compare", files["loha"], "--output", str(tmp_path / "o"), "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "--strengths must be numbers" in err and "--seeds must be at least 1" in err


def test_on_the_shapes_world_compare_ranks_checkpoints_as_sdlora_eval_does(tmp_path):
    """Three checkpoints of one run teaching "sks" = circle (a shape the base model knows, so a few steps teach it):
    compare's ranking (its own scorer, prompts and seeds) orders every pair that `sdlora eval` tells apart the
    same way. Cheap on purpose: 20 steps, 6 eval images; scripts/measure_selection.py is the full-size check."""
    import random

    from sdlora.config import DataFolder, load_toml
    from sdlora.paths import sample_data
    from sdlora.world import shapes
    from sdlora.world.evaluate import evaluate

    data = tmp_path / "circles"
    data.mkdir()
    for i, colour in enumerate(shapes.COLOURS):
        shapes.render("circle", colour, random.Random(i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {colour} sks")
    cfg = load_toml(sample_data() / "demo.toml")
    cfg.data[0] = DataFolder(path=str(data), repeats=4)
    cfg.output.path, cfg.train.max_steps, cfg.optim.lr = str(tmp_path / "run" / "c.safetensors"), 20, 3e-3
    cfg.optim.lr_scheduler = "constant"  # a steady rate, as this test was built with (the demo now decays to 0)
    cfg.sample.prompts, cfg.output.save_every = [], 2
    cfg.validation = type(cfg.validation)()  # no validation: the demo's image-validation settings would be refused
    train(cfg)
    ckpts = [tmp_path / "run" / "c_checkpoints" / f"step_{s:07d}.safetensors" for s in (2, 8, 18)]
    evals = {p.name: evaluate(p, "sks", "circle", n=6, n_base=6, steps=10, output_dir=tmp_path / "eval")
             for p in ckpts}
    target = {k: (e.concept_fidelity + e.prompt_fidelity + e.base_accuracy_with_lora) / 3 for k, e in evals.items()}
    report = compare([str(p) for p in ckpts], tmp_path / "cmp", CompareSettings(seeds=1, steps=10))
    assert report.scorer == "shapes" and len(report.rows) == 3  # from the run: its scorer none -> shapes on this model
    rank = {Path(r.file).name: i for i, r in enumerate(report.rows)}
    assert max(target.values()) - min(target.values()) > 0.15, target  # eval tells the checkpoints apart
    for a in target:
        for b in target:
            if target[a] > target[b]:
                assert rank[a] < rank[b], (target, [(Path(r.file).name, r.score, r.parts) for r in report.rows])
