"""How options are presented (labels, groups, levels), which of them do nothing for a config and model, errors named by
label, the presets (each loads, is documented and trains), and `--preset` on the command line."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest
from conftest import draw_images

from sdlora.config import Config, DataFolder, load_toml, opt, validate
from sdlora.families import FAMILIES
from sdlora.options import (
    BASIC,
    DREAMBOOTH,
    FIRST,
    LORA,
    MORE,
    PIVOTAL,
    SLIDER,
    ModelFacts,
    check,
    describe,
    field_errors,
    groups,
    humanize,
    inapplicable,
    method_of,
    method_problems,
    model_facts,
    options,
)
from sdlora.paths import sample_data
from sdlora.presets import GOALS, list_presets, load_preset, preset_for, preset_values

SD1, SD3 = ModelFacts(FAMILIES["sd1"], "epsilon"), ModelFacts(FAMILIES["sd3"], "flow")


def test_every_field_has_a_label_a_group_and_a_level():
    opts = options()
    titles = {g.key for g in groups()}
    assert len({o.key for o in opts}) == len(opts)
    for o in opts:
        assert o.label and "_" not in o.label and o.group in titles and o.level in (FIRST, BASIC, MORE), o.key
        assert 0 < len(o.short) <= 110 and "\n" not in o.short, o.key
    first = [o.key for o in opts if o.level == FIRST]
    assert 8 <= len(first) <= 12  # the settings users change most, on the first screen
    assert {("train", "max_steps"), ("optim", "lr"), ("lora", "rank"), ("augment", "resolution")} <= set(first)


def test_a_field_without_metadata_gets_a_place(monkeypatch):
    """A field another change adds (a new section too) is placed by default: its section's group, a label from its
    name, behind "more"; the page and the CLI help pick it up from there."""
    import sdlora.options as so

    @dataclasses.dataclass
    class FutureConfig:
        target_strength: float = opt(1.0, "How strong the slider pulls. More words follow here.")

    @dataclasses.dataclass
    class ExtraTrain:
        future_flag: bool = opt(False, "A setting a later change adds to [train].")

    extra = [("future", dataclasses.fields(FutureConfig)[0]), ("train", dataclasses.fields(ExtraTrain)[0])]
    real = so.iter_options
    monkeypatch.setattr(so, "iter_options", lambda: [*real(), *extra])
    new = describe(*extra[0])
    assert (new.label, new.group, new.level, new.short) == ("Target strength", "future", MORE,
                                                             "How strong the slider pulls.")
    assert describe(*extra[1]).group == "learning"
    assert "future" in [g.key for g in groups()] and any(o.key == ("future", "target_strength") for o in options())


@pytest.mark.parametrize("change,facts,hidden,shown", [
    ({}, None, {("train", "huber_delta"), ("train", "huber_schedule"), ("train", "timestep_mean"),
                ("optim", "ema_warmup"), ("validation", "keep_best"), ("lora", "text_encoder_lr")},
     {("train", "loss"), ("optim", "ema_decay"), ("lora", "dropout"), ("optim", "loraplus_ratio")}),
    ({"train.loss": "huber"}, None, set(), {("train", "huber_delta"), ("train", "huber_schedule")}),
    ({"train.timestep_sampling": "logit-normal"}, None, {("train", "mode_scale")},
     {("train", "timestep_mean"), ("train", "timestep_scale")}),
    ({"lora.network": "loha"}, None, {("lora", "dropout"), ("optim", "loraplus_ratio"), ("model", "quantize")},
     {("lora", "network_args")}),
    ({"optim.optimizer": "prodigy", "lora.train_text_encoder": True}, None,
     {("lora", "text_encoder_lr"), ("optim", "loraplus_ratio")}, {("optim", "lr")}),
    ({"optim.optimizer": "adamw-schedulefree"}, None, {("optim", "lr_scheduler"), ("optim", "ema_decay")},
     {("optim", "warmup_steps")}),
    ({"optim.lr_scheduler": "constant"}, None, {("optim", "warmup_steps")}, set()),
    ({"optim.lr_scheduler": "cosine"}, None, set(), {("optim", "warmup_steps")}),
    ({"validation.split": 0.1}, None, {("validation", "early_stop_patience")},
     {("validation", "every"), ("validation", "keep_best"), ("validation", "timesteps")}),
    ({}, SD3, {("train", "min_snr_gamma"), ("train", "debiased_estimation"), ("train", "zero_terminal_snr"),
               ("lora", "network"), ("model", "prediction_type")},
     {("train", "flow_weighting"), ("model", "t5"), ("lora", "blocks")}),
    ({}, SD1, {("train", "flow_weighting"), ("model", "t5"), ("lora", "blocks"), ("train", "zero_terminal_snr"),
               ("lora", "train_text_encoder_2")}, {("train", "min_snr_gamma")}),
    ({}, ModelFacts(FAMILIES["sd2"], "v_prediction"), set(), {("train", "zero_terminal_snr")}),
    ({"lora.train_text_encoder": True}, ModelFacts(FAMILIES["sdxl"], "epsilon"), set(),
     {("lora", "train_text_encoder_2"), ("lora", "text_encoder_lr")}),
    ({}, None, {("validation", "seeds"), ("validation", "image_size"), ("validation", "concept"),
                ("validation", "clip_model"), ("validation", "select_by")}, {("validation", "scorer")}),
    ({"validation.scorer": "shapes"}, None, {("validation", "clip_model"), ("validation", "dino_model")},
     {("validation", "seeds"), ("validation", "image_size"), ("validation", "concept"), ("validation", "every"),
      ("validation", "keep_best"), ("validation", "select_by"), ("validation", "score_weights")}),
    ({"data.shuffle_tags": True, "data.masks": "m"}, None, set(),
     {("data", "keep_tags"), ("data", "tag_separator"), ("data", "unmasked_weight")}),
])
def test_only_what_applies(change, facts, hidden, shown):
    """Fields that do nothing for the config, model family or optimizer are reported with a reason; others not."""
    cfg = Config()
    cfg.data = [DataFolder(path="images")]
    for key, value in change.items():
        section, name = key.split(".")
        for obj in cfg.data if section == "data" else [getattr(cfg, section)]:
            setattr(obj, name, value)
    out = inapplicable(cfg, facts, LORA)
    assert hidden <= set(out), hidden - set(out)
    assert not shown & set(out), {k: out[k] for k in shown & set(out)}
    assert all(why and "." not in why.split()[0] for why in out.values())  # reasons in words, not lora.x names


def test_a_hidden_field_is_one_whose_other_values_the_rules_refuse():
    """The reason of a rule-derived hidden field is the config's own error for another value of it."""
    cfg = Config()
    cfg.data = [DataFolder(path="images")]
    why = inapplicable(cfg, None, LORA)[("train", "huber_delta")]
    cfg.train.huber_delta = 0.2
    cfg.output.path = "x.safetensors"
    with pytest.raises(Exception, match="huber_delta and huber_schedule apply to loss huber") as e:
        validate(cfg, check_paths=False)
    assert humanize(str(e.value)) == why


def test_methods_and_their_fields():
    cfg = Config()
    assert ("prior", "class_prompt") in inapplicable(cfg, None, LORA)
    assert ("prior", "class_prompt") not in inapplicable(cfg, None, DREAMBOOTH)
    assert ("pivotal", "token") not in inapplicable(cfg, None, PIVOTAL)
    assert PIVOTAL in method_problems(cfg, SD3) and not method_problems(cfg, SD1)
    assert ("slider", "target") in inapplicable(cfg, None, LORA)
    slider = inapplicable(cfg, SD1, SLIDER)  # prompts alone: no images, no image objective, no validation
    assert {("data", "path"), ("data", "repeats"), ("train", "noise_offset"), ("augment", "random_flip"),
            ("validation", "scorer"), ("lora", "train_text_encoder")} <= set(slider)
    assert not {("slider", "target"), ("slider", "positive"), ("slider", "guidance"), ("slider", "action"),
                ("optim", "lr"), ("train", "max_steps"), ("lora", "rank")} & set(slider)
    cfg.slider.target = "a circle"
    assert method_of(cfg) == SLIDER


def test_model_facts_of_the_built_in_model_and_a_hub_id(tiny_model):
    facts = model_facts("")
    assert facts.family.name == "sd1" and facts.prediction == "epsilon"
    assert model_facts(tiny_model).family.name == "sd1"
    assert model_facts("someone/not-here") is None  # a hub id: not read here, every field stays


def test_errors_are_named_by_label_all_at_once():
    cfg = Config()
    cfg.lora.rank, cfg.train.batch_size, cfg.optim.lr = 0, 0, -1.0
    errors = field_errors(cfg)
    assert set(errors) == {("lora", "rank"), ("train", "batch_size"), ("optim", "lr")}
    assert errors[("lora", "rank")] == "Rank must be > 0, got 0"
    assert not any(re.search(r"\b(lora|train|optim)\.\w+", m) for m in errors.values())
    cfg = Config()
    cfg.data = [DataFolder(path="/nowhere")]
    cfg.train.huber_delta = 0.3
    fields, general = check(cfg, check_paths=False)
    assert set(fields) == {("train", "huber_delta"), ("train", "huber_schedule")} and not general
    assert fields[("train", "huber_delta")].startswith("Huber delta and Huber schedule apply to")
    assert humanize("give --validation-data DIR") == "Give 'Validation folder'"


# ------------------------------------------------------------------ presets
def test_presets_cover_every_family_and_goal_and_document_each_value():
    presets = list_presets()
    for family in ("sd1", "sdxl", "sd3"):
        assert sorted(p.goal for p in presets if p.family == family) == sorted(GOALS)
    assert [p.name for p in presets if p.family == "shapes"] == ["shapes-world"]
    for p in presets:
        assert p.title and p.about, p.name
        cfg = load_preset(p.name)
        cfg.data = [DataFolder(path="images")]
        validate(cfg, check_paths=False)
        section = None
        for line in p.path.read_text().splitlines():  # every value says where it comes from
            if line.startswith("["):
                section = line.strip("[] ")
            elif "=" in line and not line.lstrip().startswith("#") and section != "preset":
                assert "#" in line, f"{p.name}: {line!r} has no justification"


def test_the_shapes_preset_is_the_demo_recipe():
    """Derived from demo.toml (based_on), so a retuned demo retunes the preset."""
    demo = load_toml(sample_data() / "demo.toml")
    preset = load_preset("shapes-world")
    for section in ("model", "lora", "augment", "optim", "train", "speed"):
        assert getattr(preset, section) == getattr(demo, section), section
    assert (preset.sample.every, preset.sample.prompts) == (demo.sample.every, [])
    assert preset.validation.prompts == [] and demo.validation.prompts  # the demo's name its star "sks"
    preset.validation.prompts = demo.validation.prompts
    assert preset.validation == demo.validation
    assert demo.prior.class_data and preset.prior == type(demo.prior)()  # a folder of the demo's, as its data
    assert preset_for("").name == "shapes-world"
    values = tomllib.loads((sample_data() / "presets" / "shapes-world.toml").read_text())
    assert set(values) == {"preset"} and "based_on" in values["preset"]


def test_presets_are_picked_by_the_models_family(tiny_model, tiny_xl):
    assert preset_for(tiny_model).name == "sd15-character"
    assert preset_for(tiny_xl, "object").name == "sdxl-object"
    assert preset_for("stabilityai/stable-diffusion-3.5-medium").family == "sd3"  # a hub id: by its name


@pytest.fixture(scope="module")
def preset_images(tmp_path_factory):
    return draw_images(tmp_path_factory.mktemp("preset-images"), n=3)


@pytest.mark.parametrize("name", [p.name for p in list_presets()])
def test_each_preset_trains(name, preset_images, tmp_path, request):
    """Two steps of each preset on a tiny model of its family (the shapes world's own for its preset), with its
    network, targets, text encoders, optimizer, schedule, EMA and objective as they are (batch 1 and small images to
    stay fast); the file loads and has the preset's rank."""
    from sdlora import train
    from sdlora.loras.files import load_lora, read_lora

    preset = next(p for p in list_presets() if p.name == name)
    model = {"shapes": "", "sd1": "tiny_model", "sdxl": "tiny_xl", "sd3": "sd35m"}[preset.family]
    cfg = load_preset(name)
    cfg.model.path = request.getfixturevalue(model) if model else ""
    cfg.data = [DataFolder(path=str(preset_images), prompt="a red sks")]
    cfg.train.max_steps, cfg.sample.every, cfg.output.save_every = 2, 0, 0
    cfg.train.batch_size, cfg.train.grad_accum = 1, 1
    cfg.augment.resolution = 64 if preset.family == "shapes" else 32
    cfg.train.mixed_precision, cfg.speed.threads = "no", 1
    cfg.output.path = str(tmp_path / f"{name}.safetensors")
    result = train(validate(cfg))
    mods = load_lora(result.output)[0]
    assert mods and read_lora(result.output)[1]["ss_network_dim"] == str(load_preset(name).lora.rank)


def test_the_cli_takes_a_preset_under_a_job_file_and_flags(tmp_path, capsys):
    from sdlora.cli import build_parser, main
    from sdlora.cli.train import job_configs

    job = tmp_path / "job.toml"
    job.write_text('[optim]\nlr = 2e-4\n[[data]]\npath = "imgs"\n')
    args = build_parser().parse_args(["train", "--preset", "sdxl-object", str(job), "--rank", "8"])
    cfg = job_configs(args)[0][1]
    assert (cfg.lora.rank, cfg.optim.lr, cfg.train.grad_accum) == (8, 2e-4, 4)  # flag, job file, preset
    assert cfg.data[0].path == str(tmp_path / "imgs")
    assert preset_values("sdxl-object")["train"]["grad_accum"] == 4
    assert main(["train", "--preset", "no-such", "--print-config"]) == 2
    assert "unknown preset 'no-such'; choose one of shapes-world, sd15-character" in capsys.readouterr().err
    assert main(["train", "--preset", "sd15-style", "--data", str(tmp_path), "--print-config"]) == 0
    assert 'rank = 32' in capsys.readouterr().out
