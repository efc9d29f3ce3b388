"""How each config field is presented and when it matters: its label in words, the group of what users do it belongs
to, whether it is on the first screen, in its group or behind the group's "more"; which fields do nothing for a
given config and model (and why); and the errors of a config, all of them, named by label.

The CLI help and the web UI both read this table. A field without an entry here still gets a place: its section's
group, a label made from its name, behind "more". Whether a field does anything is derived from the real rules
(`config.validate` and the family checks the trainer runs), by trying another value of the field: a field that no
other value can take without an error is pinned, so it does nothing here. Rules that exist nowhere else are
`_RULES` below.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, fields
from types import SimpleNamespace

from .config import SECTIONS, Config, DataFolder, flag_name, iter_options, validate
from .errors import ConfigError
from .option_labels import BASIC, FIRST, LABELS, MORE  # noqa: F401 - BASIC: for importers

Key = tuple[str, str]  # (section, field name); section "data" is one data folder



@dataclass(frozen=True)
class Group:
    key: str
    title: str
    about: str = ""


GROUPS = (
    Group("images", "Images and captions", "Repeats, tags, masks, cropping and flips."),
    Group("network", "The network", "Adapter type, rank, alpha, which layers and blocks."),
    Group("learning", "Learning", "Optimizer, learning rates, schedule, batch and steps."),
    Group("noise", "Noise and timesteps", "The training objective: noise, timesteps and the loss."),
    Group("validation", "Validation and the best file", "Held-out images, image scores and the best file."),
    Group("samples", "Samples", "Images rendered while training."),
    Group("output", "Output and sharing", "File layout, precision, metadata, checkpoints and logging."),
    Group("speed", "Speed and memory", "What changes how fast a step runs and how much memory it takes."),
    Group("model", "Base model (SD3 text encoders)", "Where SD3 single files get their text encoders, and T5."),
    Group("dreambooth", "DreamBooth (prior preservation)", "Keep the class the subject belongs to."),
    Group("pivotal", "Pivotal tuning", "Learn a new token first, then the LoRA with it."),
    Group("slider", "Slider / eraser", "A LoRA from prompts alone: a direction to slide, or a concept to erase."),
)
SECTION_GROUP = {"model": "model", "lora": "network", "data": "images", "augment": "images", "optim": "learning",
                 "train": "learning", "validation": "validation", "speed": "speed", "sample": "samples",
                 "output": "output", "prior": "dreambooth", "pivotal": "pivotal", "slider": "slider"}


@dataclass(frozen=True)
class Option:
    """One config field as the CLI help and the UI present it."""

    section: str
    field: dataclasses.Field
    label: str
    group: str
    level: str      # first (the first screen), basic (its group), more (its group's "more")
    short: str      # one line of help
    help: str       # the whole help text

    @property
    def key(self) -> Key:
        return self.section, self.field.name

    @property
    def flag(self) -> str:
        return "--" + flag_name(self.field)

    @property
    def default(self):
        obj = SECTIONS[self.section]() if self.section in SECTIONS else DataFolder()
        return getattr(obj, self.field.name)


def short_help(text: str, limit: int = 100) -> str:
    """The first sentence (or clause) of a help text, at most `limit` characters: it ends at a '.' or ';' followed by
    a space outside parentheses, and not at an abbreviation (e.g., i.e., et al.)."""
    text, depth, end = text.strip(), 0, None
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch in ".;" and depth == 0 and text[i + 1:i + 2] == " " and not _ABBREV.search(text[:i + 1]):
            end = i if ch == ";" else i + 1
            break
    first = text[:end] if end else text
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0] + " …"


_ABBREV = re.compile(r"(\be\.g\.|\bi\.e\.|\bal\.|\betc\.|\bvs\.)$")


def describe(section: str, f: dataclasses.Field) -> Option:
    """The presentation of one field: its entry in the table, or the defaults for a field that has none."""
    label, group, level, short = LABELS.get(f"{section}.{f.name}", (None, None, MORE, None))
    text = f.metadata.get("help", "")
    return Option(section, f, label or f.name.replace("_", " ").capitalize(),
                  group or SECTION_GROUP.get(section, section), level, short or short_help(text), text)


def options() -> list[Option]:
    """Every option of the config, in the config's order."""
    return [describe(s, f) for s, f in iter_options()]


def groups() -> list[Group]:
    """The groups in page order, with a plain group for any section that has none (a section added later)."""
    known = {g.key for g in GROUPS}
    extra = [Group(o.group, o.group.replace("_", " ").capitalize()) for o in options() if o.group not in known]
    return list(GROUPS) + list({g.key: g for g in extra}.values())


def by_key() -> dict[Key, Option]:
    return {o.key: o for o in options()}


# ------------------------------------------------------------------ methods
LORA, DREAMBOOTH, PIVOTAL, SLIDER = "LoRA", "DreamBooth (prior preservation)", "Pivotal tuning", "Slider / eraser"
METHODS = (LORA, DREAMBOOTH, PIVOTAL, SLIDER)
_METHOD_GROUP = {"dreambooth": DREAMBOOTH, "pivotal": PIVOTAL, "slider": SLIDER}
FROM_PROMPTS = "A slider learns from prompts alone, not from images"


def method_of(cfg: Config) -> str:
    """The training method a config describes: a slider with a slider target, pivotal tuning with a token,
    DreamBooth with a class prompt."""
    if cfg.is_slider:
        return SLIDER
    return PIVOTAL if cfg.pivotal.token else DREAMBOOTH if cfg.prior.class_prompt else LORA


def _slider_unused(key: Key) -> str:
    """Why a slider does not use a field that training on images uses (images, captions, masks, the objective's
    noise settings, validation against images), or ''."""
    from .config import SLIDER_UNUSED

    if key[0] == "validation":
        return "A slider has no images to validate against"
    return FROM_PROMPTS if key in SLIDER_UNUSED or key[0] == "data" else ""


# ------------------------------------------------------------------ what applies
@dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know of the base model: its family (sdlora.families.Family) and prediction type
    (epsilon, v_prediction or flow)."""

    family: object
    prediction: str
    inpainting: bool = False  # the family's inpainting variant (its denoiser takes the mask and masked image)

    def components(self):
        """The stand-in for loaded components that `check_family_options` reads."""
        return SimpleNamespace(family=self.family, prediction_type=self.prediction, name=self.family.title,
                               frozen_text=[], inpainting=self.inpainting)


def model_facts(path: str) -> ModelFacts | None:
    """The family and prediction type of a base model on this machine ("" = the built-in one), read from its
    configs or a single file's header (no weights); None for a hub id or anything that cannot be read here (the
    rules that need the model then keep every field)."""
    from pathlib import Path

    from .errors import SdloraError
    from .paths import default_model_path

    source = path or str(default_model_path())
    if not Path(source).exists():
        return None
    try:
        return _read_facts(source)
    except (SdloraError, OSError, ValueError, KeyError):
        return None


def _read_facts(source: str) -> ModelFacts:
    from pathlib import Path

    from .families import FAMILIES, folder_family

    if Path(source).is_file():
        from .single_file import detect_checkpoint

        info = detect_checkpoint(source)
        family = FAMILIES[info.family]
        return ModelFacts(family, info.prediction_type, family.inpainting(info.configs[family.denoiser_attr]))
    import diffusers

    family = folder_family(source)  # a FlowMatch scheduler has no prediction_type: flow, as Components reads it
    scheduler = diffusers.DDPMScheduler.load_config(source, subfolder="scheduler")
    denoiser = getattr(diffusers, family.denoiser_class).load_config(source, subfolder=family.denoiser_attr)
    return ModelFacts(family, scheduler.get("prediction_type") or "flow", family.inpainting(denoiser))


def _has_validation(cfg: Config) -> bool:
    return bool(cfg.validation.split or cfg.validation.data)


def _text_frozen(cfg: Config) -> bool:
    return not cfg.lora.train_text_encoder and not cfg.pivotal.token


# Rules the config's validation does not hold (a value there is harmless, it just does nothing): key -> (does the
# field do anything?, why not). `facts` is None when the model is not known; such rules then keep the field.
_RULES = {
    ("lora", "text_encoder_lr"): (lambda c, m: c.lora.train_text_encoder, "needs Train the text encoder"),
    ("lora", "train_text_encoder_2"): (
        lambda c, m: c.lora.train_text_encoder and (m is None or len(m.family.text_encoders) > 1),
        "needs Train the text encoder and a model with two text encoders (SDXL, SD3)"),
    ("lora", "text_encoder_2_lr"): (
        lambda c, m: c.lora.train_text_encoder and c.lora.train_text_encoder_2 and
        (m is None or len(m.family.text_encoders) > 1),
        "needs Train the second text encoder (SDXL, SD3)"),
    ("model", "t5"): (lambda c, m: m is None or bool(m.family.frozen_encoders), "SD3 only"),
    ("model", "t5_max_length"): (lambda c, m: (m is None or bool(m.family.frozen_encoders)) and c.model.t5,
                                 "SD3 with T5 only"),
    ("model", "text_encoders"): (lambda c, m: m is None or bool(m.family.frozen_encoders), "SD3 only"),
    ("data", "keep_tags"): (lambda c, m: any(d.shuffle_tags or d.tag_dropout for d in c.data),
                            "needs Shuffle tags or Tag dropout"),
    ("data", "tag_separator"): (lambda c, m: any(d.shuffle_tags or d.tag_dropout for d in c.data),
                                "needs Shuffle tags or Tag dropout"),
    ("data", "unmasked_weight"): (lambda c, m: any(d.masks or d.alpha_mask for d in c.data),
                                  "needs a Mask folder or Alpha channel as mask"),
    ("validation", "timesteps"): (lambda c, m: _has_validation(c), "needs validation images"),
    **{("validation", name): (lambda c, m: c.validation.scorer != "none", "needs an Image scorer")
       for name in ("prompts", "seeds", "image_steps", "image_size", "score_weights")},
    ("validation", "concept"): (lambda c, m: c.validation.scorer == "shapes", "the shapes scorer only"),
    ("validation", "clip_model"): (lambda c, m: c.validation.scorer == "clip-dino", "the clip-dino scorer only"),
    ("validation", "dino_model"): (lambda c, m: c.validation.scorer == "clip-dino", "the clip-dino scorer only"),
    ("optim", "warmup_steps"): (lambda c, m: c.optim.lr_scheduler != "constant"
                                or c.optim.optimizer == "adamw-schedulefree",
                                "the constant schedule has no warm-up: choose constant_with_warmup"),
    ("speed", "fused_optimizer"): (lambda c, m: c.optim.optimizer == "adamw", "AdamW only"),
    ("train", "cache_latents"): (lambda c, m: c.augment.crop != "random", "a random crop needs fresh latents"),
    ("train", "cache_text"): (lambda c, m: _text_frozen(c), "the text encoder trains"),
    ("prior", "num_class_images"): (lambda c, m: c.prior.mode == "images", "Prior from model needs no images"),
    ("model", "prediction_type"): (lambda c, m: m is None or m.prediction != "flow",
                                   "SD3 trains by flow matching"),
}
# Probe values where the generic ones would break a rule of their own (a resolution of 1), or for free-text fields
# whose rules are worth trying (other text fields always apply).
_PROBES = {("lora", "blocks"): "0", ("pivotal", "token"): "<s1>", ("augment", "resolution"): 64,
           ("validation", "image_size"): 64, ("inpaint", "sample_image"): "image.png",
           ("inpaint", "sample_mask"): "mask.png", ("data", "inpaint_masks"): "masks"}  # inpainting bases only
_PAGE_SET = {("output", "path"), ("prior", "class_data")}


def _problem(cfg: Config, facts: ModelFacts | None) -> str | None:
    """The first error the config's own rules and the model family's rules find, or None."""
    try:
        validate(cfg, check_paths=False)
        if facts is not None:
            from .training.run.setup import check_family_options

            facts.family.target_patterns(cfg.lora.targets)
            check_family_options(cfg, facts.components())
    except ConfigError as e:
        return str(e)
    return None


def _probes(opt: Option) -> list:
    """Values other than the default to try the field with."""
    f, default = opt.field, opt.default
    if opt.key in _PROBES:
        return [_PROBES[opt.key]]
    if f.metadata.get("choices"):
        return [c for c in f.metadata["choices"] if c != default]
    if f.type == "bool":
        return [not default]
    if f.type in ("int", "float"):
        cast = int if f.type == "int" else float
        bounds = f.metadata.get("bounds") or {}
        for v in (default * 2, default + 1, default / 2, default - 1, 0.5):
            v = cast(v)
            if v != default and all(_within(v, k, b) for k, b in bounds.items()):
                return [v]
    return []


def _within(v, kind: str, b) -> bool:
    return {"ge": v >= b, "gt": v > b, "le": v <= b, "lt": v < b}[kind]


def _set(cfg: Config, key: Key, value) -> None:
    section, name = key
    for obj in cfg.data if section == "data" else [getattr(cfg, section)]:
        setattr(obj, name, value)


def _probe_base(cfg: Config, facts: ModelFacts | None, method: str | None = None) -> Config:
    """The config as the rules should see it: a data folder (a slider: none, and a target) and an output file (the
    page sets them), and `auto` read as the model's own prediction type (so a v-prediction-only option is judged
    against the model)."""
    base = copy.deepcopy(cfg)
    if (method or method_of(cfg)) == SLIDER:
        base.data = []
        base.slider.target = base.slider.target or "a shape"
        base.slider.positive = base.slider.positive or "a big shape"
    elif not base.data:
        base.data = [DataFolder(path="images")]
    base.output.path = "lora.safetensors"
    if facts is not None and base.model.prediction_type == "auto" and facts.prediction in ("epsilon",
                                                                                          "v_prediction"):
        base.model.prediction_type = facts.prediction
    return base


def inapplicable(cfg: Config, facts: ModelFacts | None = None, method: str | None = None) -> dict[Key, str]:
    """{(section, name): why} of the fields that do nothing for this config, model and method. A field applies when
    another value of it is accepted where its default is (the rules of `config.validate` and of the model's
    family), and when the rules of `_RULES` allow it; the method's own fields apply to that method only."""
    method = method or method_of(cfg)
    out: dict[Key, str] = {}
    for opt in options():
        if opt.key in _PAGE_SET:
            continue
        if opt.group in _METHOD_GROUP and _METHOD_GROUP[opt.group] != method:
            out[opt.key] = f"{_METHOD_GROUP[opt.group]} only"
            continue
        if method == SLIDER and _slider_unused(opt.key):
            out[opt.key] = _slider_unused(opt.key)
            continue
        why = _pinned(cfg, facts, opt, method) or _rule(cfg, facts, opt.key)
        if why:
            out[opt.key] = why
    return out


def _rule(cfg: Config, facts: ModelFacts | None, key: Key) -> str | None:
    ok, why = _RULES.get(key, (lambda c, m: True, ""))
    return None if ok(cfg, facts) else why[:1].upper() + why[1:]


def _pinned(cfg: Config, facts: ModelFacts | None, opt: Option, method: str | None = None) -> str | None:
    """Why every other value of this field is refused where its default is accepted, or None."""
    probes = _probes(opt)
    if not probes:
        return None
    base = _probe_base(cfg, facts, method)
    _set(base, opt.key, opt.default)
    before = _problem(base, facts)
    reasons = []
    for value in probes:
        trial = copy.deepcopy(base)
        _set(trial, opt.key, value)
        after = _problem(trial, facts)
        if after is None or after == before:
            return None
        reasons.append(after)
    return humanize(reasons[0]) if reasons else None


def method_problems(cfg: Config, facts: ModelFacts | None) -> dict[str, str]:
    """{method: why} for the methods the model cannot train (pivotal tuning on SD3)."""
    out = {}
    for method, key, value in ((PIVOTAL, ("pivotal", "token"), "<s1>"),):
        trial = _probe_base(cfg, facts)
        _set(trial, key, value)
        problem = _problem(trial, facts)
        if problem and problem != _problem(_probe_base(cfg, facts), facts):
            out[method] = humanize(problem)
    return out


# ------------------------------------------------------------------ errors in words
def _names() -> tuple[dict[str, Option], dict[str, Option], dict[str, Option]]:
    opts = options()
    dotted = {f"{o.section}.{o.field.name}": o for o in opts}
    flags = {o.flag: o for o in opts}
    bare: dict[str, Option | None] = {}
    for o in opts:
        bare[o.field.name] = None if o.field.name in bare else o  # only names that are one field's
    bare = {k: v for k, v in bare.items() if v is not None and "_" in k}
    bare.update({o.flag[2:].replace("-", "_"): o for o in opts if "-" in o.flag[2:]})  # validate_every
    return dotted, flags, bare


_DOTTED = re.compile(r"\b(\w+)(?:\[\d+\])?\.(\w+)")
_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*(?: (?:[A-Z]+|\.\.\.|N|X|F|DIR))?")
_BARE = re.compile(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b")


def mentioned(message: str) -> list[Key]:
    """The fields a message names: section.name, a CLI flag, or a field name that belongs to one field."""
    dotted, flags, bare = _names()
    keys = [dotted[f"{s}.{n}"].key for s, n in _DOTTED.findall(message) if f"{s}.{n}" in dotted]
    keys += [flags[m.split()[0]].key for m in _FLAG.findall(message) if m.split()[0] in flags]
    keys += [bare[m].key for m in _BARE.findall(message) if m in bare]
    return list(dict.fromkeys(keys))


def humanize(message: str) -> str:
    """A message with the fields it names given by their labels ('lora.rank must be > 0' -> 'Rank must be > 0')."""
    dotted, flags, bare = _names()

    def dot(m):
        o = dotted.get(f"{m.group(1)}.{m.group(2)}")
        return o.label if o else m.group(0)

    text = _DOTTED.sub(dot, message)
    text = _FLAG.sub(lambda m: f"'{flags[m.group(0).split()[0]].label}'" if m.group(0).split()[0] in flags
                     else m.group(0), text)
    text = _BARE.sub(lambda m: bare[m.group(0)].label if m.group(0) in bare else m.group(0), text)
    return text[:1].upper() + text[1:]


def field_errors(cfg: Config) -> dict[Key, str]:
    """Every field whose own value is out of its choices or bounds, with the message in words: all at once."""
    from .config import _check_field, _objects

    out: dict[Key, str] = {}
    for section, i, obj in _objects(cfg):
        for f in fields(obj):
            try:
                _check_field(f"{section}[{i}]" if i is not None else section, f, getattr(obj, f.name))
            except ConfigError as e:
                out.setdefault((section, f.name), humanize(str(e)))
    return out


def check(cfg: Config, check_paths: bool = True) -> tuple[dict[Key, str], list[str]]:
    """({field: message}, [messages naming no field]) of a config: every field's own errors at once, then the first
    rule across fields that fails (marked on each field it names)."""
    errors = field_errors(cfg)
    if errors:
        return errors, []
    from .training.inputs.data import missing_class_images

    try:
        validate(cfg, check_paths)
        if check_paths and (problem := missing_class_images(cfg.prior)):  # caught before a run fails on it
            raise ConfigError(problem)
    except ConfigError as e:
        text, keys = humanize(str(e)), mentioned(str(e))
        return (dict.fromkeys(keys, text), []) if keys else ({}, [text])
    return {}, []


def changed(cfg: Config, keys: list[Key]) -> list[str]:
    """'Label value' of each of these fields that differs from its default (a group's one-line summary)."""
    table, out = by_key(), []
    for key in keys:
        opt = table[key]
        objs = cfg.data[:1] if key[0] == "data" else [getattr(cfg, key[0])]
        for obj in objs:
            value = getattr(obj, key[1])
            if value != opt.default:
                out.append(f"{opt.label} {_shown(value)}")
    return out


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return f"({len(value)})"
    return str(value) if len(str(value)) <= 24 else str(value)[:22] + "…"
