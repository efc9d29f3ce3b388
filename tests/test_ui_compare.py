"""The UI side of image validation without a browser: a job's scores and validation sheets in its progress data,
the library's per-checkpoint scores, and the Compare tab (files from the library, the grid, the table)."""

from __future__ import annotations

from pathlib import Path

from conftest import draw_images, tiny_config

from sdlora.training.periodic.selection import checkpoint_scores, validation_history
from ui.compare_tab import COLUMNS, CompareTab, compare_choices
from ui.jobs import DONE, JobManager


def scored_job(tiny_model, data, out, **kw):
    cfg = tiny_config(tiny_model, data, out, train__max_steps=4, validation__scorer="shapes", validation__every=2,
                      validation__seeds=1, validation__image_steps=2, **kw)
    cfg.validation.prompts, cfg.output.trigger, cfg.output.save_every = ["a red sks", "a blue square"], "sks", 2
    return cfg


def test_a_job_records_scores_and_sheets_and_the_library_reads_them_per_checkpoint(tmp_path, tiny_model):
    data = draw_images(tmp_path / "imgs", n=3)
    out = tmp_path / "o" / "l.safetensors"
    m = JobManager(tmp_path)
    job = m.wait(m.submit(scored_job(tiny_model, data, out, validation__keep_best=True), "l"), 300)
    m.close()
    assert job.state == DONE, job.error
    assert [s for s, _ in job.scores] == [2, 4] and set(job.scores[0][1]) == {"score", "likeness", "adherence",
                                                                               "preservation", "copying"}
    assert [s for s, _ in job.validation_images] == [2, 4] and all(Path(p).is_file() for _, p in
                                                                   job.validation_images)
    assert job.best_step in (2, 4) and not job.val_losses  # images only: no held-out loss
    logged = {r["step"]: r for r in validation_history(out.with_name("l_log.jsonl"))}
    per_ckpt = checkpoint_scores(out)
    assert [c["step"] for c in per_ckpt] == [2] and Path(per_ckpt[0]["file"]).is_file()
    assert per_ckpt[0]["score"] == logged[2]["score"] == round(dict(job.scores)[2]["score"], 8)


def test_compare_tab_lists_checkpoints_draws_the_grid_and_ranks_the_files(tmp_path, tiny_model):
    data = draw_images(tmp_path / "imgs", n=3)
    m = JobManager(tmp_path / "out", model=tiny_model, data_roots=[tmp_path])
    cfg = tiny_config(tiny_model, data, tmp_path / "out" / "run" / "r.safetensors", train__max_steps=5,
                      optim__lr=0.05)
    cfg.output.save_every = 2
    m.wait(m.submit(cfg, "r"), 300)
    m.close()
    tab = CompareTab(m)
    choices = [p for _, p in tab.on_refresh([])["choices"]]
    ckpts = [p for p in choices if "_checkpoints" in p]
    assert sorted(Path(p).name for p in ckpts) == ["step_0000002.safetensors", "step_0000004.safetensors"]
    assert [p for _, p in compare_choices(m)] == choices and str(cfg.output.path) in choices
    status, grid, rows = tab.on_compare(ckpts + [str(cfg.output.path)], tiny_model, "0.5, 1", 1, 2, "shapes",
                                        "a red sks\na blue square", progress=lambda *a, **k: None)
    assert status.startswith("Best:") and Path(grid).is_file(), status
    assert len(rows) == 6 and all(len(r) == len(COLUMNS) for r in rows)
    assert [r[4] for r in rows] == sorted((r[4] for r in rows), reverse=True) and [r[0] for r in rows] == \
        list(range(1, 7))
    refused, _, _ = tab.on_compare([str(tmp_path / "imgs" / "x.safetensors")], "", "1", 1, 2, "none", "a",
                                   progress=lambda *a, **k: None)
    assert refused.startswith("**Error:**") and "not in the output folder" in refused
