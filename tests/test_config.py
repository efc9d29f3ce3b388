"""Config: TOML + flags, defaults in one place, one-line errors before any model loads."""

from __future__ import annotations

import pytest

from sdlora.cli import main
from sdlora.config import Config, from_dict, load_toml, validate
from sdlora.errors import ConfigError


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_roundtrip_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    path = write(tmp_path, '[lora]\nrank = 8\nalpha = 4\n[[data]]\npath = "imgs"\nrepeats = 3\n'
                           '[output]\npath = "out/x.safetensors"\n')
    cfg = load_toml(path)
    assert cfg.lora.rank == 8 and cfg.lora_alpha == 4.0 and cfg.data[0].repeats == 3
    assert cfg.data[0].path == str(tmp_path / "imgs")
    assert cfg.output.path == str(tmp_path / "out/x.safetensors")
    again = from_dict(__import__("tomllib").loads(cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize("text,message", [
    ("[lora]\nrnak = 4\n", "unknown key 'lora.rnak'"),
    ("[loar]\nrank = 4\n", "unknown section 'loar'"),
    ("[lora]\nrank = 'four'\n", "lora.rank must be int"),
    ("[lora]\nrank = 0\n[[data]]\npath = '.'\n", "lora.rank must be > 0"),
    ("[augment]\nresolution = 500\n[[data]]\npath = '.'\n", "multiple of 8"),
    ("[[data]]\npath = 'nope'\n", "data folder not found"),
    ("[lora]\ntargets = 'everything'\n[[data]]\npath = '.'\n", "lora.targets must be one of"),
    ("", "no training data"),
])
def test_bad_config_fails_in_one_line_before_loading(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    rc = main(["train", str(path), "--model", str(tmp_path / "no-model-needed")])
    err = capsys.readouterr().err
    assert rc != 0
    assert message in err
    assert err.strip().count("\n") == 0, err  # one line, no traceback


def test_flags_override_toml(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    path = write(tmp_path, '[lora]\nrank = 8\n[train]\nmax_steps = 10\n[[data]]\npath = "imgs"\nprompt = "x"\n')
    assert main(["train", str(path), "--rank", "2", "--lr", "3e-4", "--train-text-encoder",
                 "--instance-prompt", "a sks dog", "--print-config"]) == 0
    printed = capsys.readouterr().out
    cfg = from_dict(__import__("tomllib").loads(printed.split("\n", 1)[1]))
    assert cfg.lora.rank == 2 and cfg.train.max_steps == 10 and cfg.optim.lr == 3e-4
    assert cfg.lora.train_text_encoder and cfg.data[0].prompt == "a sks dog"


def test_help_documents_every_option_with_default(capsys):
    from sdlora.config import flag_name, iter_options

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for _, f in iter_options():
        assert f"--{flag_name(f)}" in text
    assert "(default: 4)" in text  # rank


def test_prior_preservation_settings_are_checked(tmp_path):
    cfg = Config()
    cfg.data = []
    from sdlora.config import DataFolder

    cfg.data = [DataFolder(path=str(tmp_path))]
    cfg.prior.class_prompt = "a dog"
    with pytest.raises(ConfigError, match="class_data"):
        validate(cfg)
    cfg.prior.mode = "model"
    validate(cfg)
    cfg.prior.class_data = str(tmp_path / "missing")  # the model prior's images to preserve: an existing folder
    with pytest.raises(ConfigError, match=r"prior\.class_data folder not found"):
        validate(cfg)

    from sdlora.options import check

    cfg.prior.mode, cfg.prior.class_data = "images", str(tmp_path / "class")  # no class images, none to render
    fields, general = check(cfg)  # the page's check: the field to fix is marked before any run starts
    assert list(fields) == [("prior", "num_class_images")] and not general
    assert fields[("prior", "num_class_images")].startswith("No class images in ")
    cfg.prior.num_class_images = 3  # the trainer renders them into the folder
    assert check(cfg) == ({}, [])


def test_queue_runs_every_job_and_a_failure_does_not_stop_the_next(tiny_model, tmp_path, capsys):
    from conftest import draw_images

    data = draw_images(tmp_path / "imgs", n=2)
    common = f'[model]\npath = "{tiny_model}"\n[augment]\nresolution = 32\n[train]\nmax_steps = 2\n'
    write(tmp_path, common + '[[data]]\npath = "missing"\n', "bad.toml")
    write(tmp_path, common + f'[[data]]\npath = "{data}"\nprompt = "a sks"\n'
                                    '[output]\npath = "good.safetensors"\n', "good.toml")
    queue = write(tmp_path, "# jobs\nbad.toml\ngood.toml\n", "queue.txt")
    rc = main(["train", "--queue", str(queue)])
    out = capsys.readouterr()
    assert rc == 1
    assert "data folder not found" in out.err
    assert "good.toml: done" in out.out and "1 of 2 jobs succeeded" in out.out
    assert (tmp_path / "good.safetensors").is_file()


@pytest.mark.parametrize("name", ["example.toml", "demo.toml", "inpaint_demo.toml"])
def test_shipped_job_files_are_valid(name):
    from sdlora.paths import sample_data

    cfg = load_toml(sample_data() / name)
    if name == "inpaint_demo.toml":  # its model is what scripts/build_shapes_inpaint.py writes by default
        assert cfg.model.path.endswith("output/shapes-sd-inpaint")
        cfg.model.path = ""
    cfg = validate(cfg)
    assert all(__import__("pathlib").Path(d.path).is_dir() for d in cfg.data)


@pytest.mark.parametrize("text,message", [
    ('config_version = "1"\n[[data]]\npath = "."\n', "config_version must be a whole number like 2"),
    ("config_version = 99\n[[data]]\npath = '.'\n", "config_version 99 is newer than this sdlora"),
    ("config_version = 1\n[train]\ntimestep_sampling = 'logit-normal'\ntimestep_mean = 0.5\n[[data]]\npath = '.'\n",
     "write -0.5 and config_version = 2"),  # version 1's sign was the opposite of diffusers' --logit_mean
    ("[train]\nmax_steps = 0\n[[data]]\npath = '.'\n", "0 is only for plain textual inversion"),
    ("[train]\nmax_steps = -2\n[[data]]\npath = '.'\n", "train.max_steps must be >= 0, got -2"),
])
def test_bad_versions_and_step_counts_are_one_line(tmp_path, capsys, text, message):
    rc = main(["train", str(write(tmp_path, text))])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and err.strip().count("\n") == 0, err


def test_zero_steps_are_valid_for_plain_textual_inversion(tmp_path):
    cfg = Config()
    from sdlora.config import DataFolder

    cfg.data = [DataFolder(path=str(tmp_path))]
    cfg.train.max_steps, cfg.pivotal.token, cfg.pivotal.ti_steps = 0, "<s1>", 10
    assert validate(cfg).total_steps == 10


def test_demo_refuses_zero_steps_instead_of_ignoring_them(capsys):
    assert main(["demo", "--max-steps", "0"]) == 2
    assert "train.max_steps must be > 0" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_timestep_mean_sign_flip_is_not_resumed(tmp_path):
    """config_version 1 ran timestep_mean with the opposite sign to diffusers' --logit_mean: resuming it under
    version 2 would silently favour the other end of the timesteps."""
    import torch

    from sdlora.errors import TrainingError
    from sdlora.training.periodic.checkpoint import STATE_VERSION, load_state

    config = Config().to_dict()
    old = {**config, "config_version": 1, "train": {**config["train"], "timestep_mean": 0.5}}
    torch.save({"version": STATE_VERSION, "config": old}, tmp_path / "step.pt")
    with pytest.raises(TrainingError, match="opposite sign"):
        load_state(tmp_path / "step.pt", config)
    torch.save({"version": STATE_VERSION, "config": {**old, "config_version": 2}}, tmp_path / "new.pt")
    assert load_state(tmp_path / "new.pt", config)["version"] == STATE_VERSION
