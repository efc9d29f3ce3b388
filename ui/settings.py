"""The settings of the Train tab: a preset, the settings users change most on the first screen, then one collapsed group
per thing users do (`sdlora.options`), each with a one-line summary of what differs from the defaults, its expert
fields behind "More", the fields that do nothing here hidden with the reason, and the help with each CLI flag on
demand; and the memory fit of the current settings (`sdlora.training.memory.fit_plan.check_fit`)."""

from __future__ import annotations

import html

import gradio as gr

from sdlora.config import Config, DataFolder, SliderConfig
from sdlora.errors import SdloraError
from sdlora.options import (
    BASIC,
    FIRST,
    METHODS,
    MORE,
    SLIDER,
    ModelFacts,
    changed,
    field_errors,
    groups,
    inapplicable,
    method_of,
    method_problems,
    model_facts,
)
from sdlora.presets import family_key, load_preset, preset_for, preset_values, presets_for

from .form import FREE_TEXT, ConfigForm

METHOD_GROUPS = {"dreambooth": METHODS[1], "pivotal": METHODS[2], "slider": SLIDER}
PAGE_OWNED = {("model", "path"), ("data", "path"), ("data", "prompt"), ("data", "masks"), ("output", "path"),
              ("prior", "class_data")}  # placed by the page, or set from the LoRA's name
NO_PRESET = "(none: sdlora's defaults)"
METHOD_INFO = "From images (LoRA, DreamBooth, pivotal tuning) or from prompts alone (slider / eraser)."


def for_method(cfg: Config, method: str, errors: dict | None = None) -> Config:
    """The form's config as the method trains it: a slider learns from prompts alone (the page's image folder is not
    its), any other method has no slider (on when it has a target); the errors of what is dropped go too."""
    drop = "data" if method == SLIDER else "slider"
    if method == SLIDER:
        cfg.data = []
    else:
        cfg.slider = SliderConfig()
    for key in [k for k in (errors or {}) if k[0] == drop]:
        errors.pop(key)
    return cfg


def preset_choices(model: str) -> list[tuple[str, str]]:
    return [(p.title, p.name) for p in presets_for(family_key(model))] + [(NO_PRESET, "")]


def initial_config(model: str) -> tuple[Config, str]:
    """The values a new page starts from: the preset of the model's family (visibly training on it), and its name."""
    preset = preset_for(model)
    cfg = load_preset(preset.name) if preset else Config()
    cfg.model.path = model
    return cfg, preset.name if preset else ""


class SettingsPanel:
    def __init__(self, manager, form: ConfigForm):
        self.manager, self.form = manager, form
        self.initial, self.initial_preset = initial_config(manager.model)
        self._facts: dict[str, ModelFacts | None] = {}
        self._fits: dict[tuple, tuple[str, list]] = {}  # the last estimates, by settings
        self.hidden = inapplicable(self.initial, self.facts(manager.model), method_of(self.initial))
        self.accordions: dict[str, gr.Accordion] = {}
        self.notes: dict[str, gr.Markdown] = {}
        self.mores: dict[str, list] = {}  # the fields of a group's "More settings"

    def facts(self, model: str) -> ModelFacts | None:
        model = model or ""
        if model not in self._facts:
            self._facts[model] = model_facts(model)
        return self._facts[model]

    def add(self, section: str, name: str, value=None, **kw):
        """A field's widget with the page's starting value (or `value`) and visibility."""
        cfg = self.initial
        obj = (cfg.data[0] if cfg.data else DataFolder()) if section == "data" else getattr(cfg, section)
        value = getattr(obj, name) if value is None else value
        return self.form.add(section, name, value, **kw)

    # ------------------------------------------------------------ layout
    def build_preset(self):
        self.preset = gr.Dropdown(preset_choices(self.manager.model), value=self.initial_preset, label="Preset",
                                  info="Values for the model's family and what you train; picked for the model.",
                                  elem_id="preset", min_width=260)
        return self.preset

    def build_first(self) -> None:
        keys = [o.key for o in self.form.options.values() if o.level == FIRST and o.key not in PAGE_OWNED]
        for start in range(0, len(keys), 4):
            with gr.Row(equal_height=False):
                for section, name in keys[start:start + 4]:
                    self.add(section, name)

    def build_group(self, key: str, extra=None, open: bool = False) -> None:
        opts = [o for o in self.form.options.values() if o.group == key and o.level != FIRST
                and o.key not in PAGE_OWNED]
        with gr.Accordion(self._label(key, self.initial), open=open, elem_id=f"group-{key}") as acc:
            if extra:
                extra()
            self._fields([o for o in opts if o.level == BASIC])
            more = [o for o in opts if o.level == MORE]
            if more:
                with gr.Accordion("More settings", open=False, elem_id=f"more-{key}"):
                    self._fields(more)
                self.mores[key] = [o.key for o in more]
            self.notes[key] = gr.Markdown(self._note(key, self.hidden), elem_id=f"note-{key}",
                                          elem_classes=["group-note"])
            with gr.Accordion("Help and command-line flags", open=False, elem_id=f"help-{key}"):
                gr.Markdown(_help(opts))
        self.accordions[key] = acc

    def _fields(self, opts) -> None:
        with gr.Row(equal_height=False):
            for o in opts:
                self.add(*o.key)

    def build_fit(self) -> None:
        with gr.Row(equal_height=False, elem_id="fit"):
            self.fit_status = gr.HTML('<div id="fit-box">Memory: press <b>Check memory</b>.</div>', scale=3,
                                      elem_id="fit-status")
            with gr.Column(scale=2, min_width=260):
                self.vram = gr.Textbox(label="GPU memory to plan for", placeholder="empty: this machine's; e.g. 12GB",
                                       info="The estimate is for this machine's GPU (or CPU) unless you type one.",
                                       elem_id="fit-vram")
                with gr.Row():
                    self.fit_btn = gr.Button("Check memory", size="sm", elem_id="fit-check")
                    self.fit_apply = gr.Button("Apply the cheapest changes that fit", size="sm", visible=False,
                                               variant="primary", elem_id="fit-apply")
        self.plan = gr.State([])
        # what the panel shows now (built last: every group exists), so a change redraws only what it changes
        view = self.view(self.initial, method_of(self.initial), self.manager.model)
        self.shown_view = gr.State(view)
        self.style = gr.HTML(view["style"], elem_id="applies-style")

    # ------------------------------------------------------------ what the panel shows
    def _label(self, key: str, cfg: Config) -> str:
        title = next(g.title for g in groups() if g.key == key)
        keys = [o.key for o in self.form.options.values() if o.group == key and o.level != FIRST
                and o.key not in PAGE_OWNED]
        diff = changed(cfg, keys)
        text = f"{title} · {', '.join(diff)}" if diff else f"{title} · sdlora's defaults"
        return text if len(text) <= 96 else text[:95] + "…"

    def _note(self, key: str, hidden: dict) -> str:
        reasons: dict[str, list[str]] = {}
        for o in self.form.options.values():
            if o.group == key and o.key in hidden and o.key not in PAGE_OWNED and key not in METHOD_GROUPS:
                reasons.setdefault(hidden[o.key], []).append(o.label)
        if not reasons:
            return ""
        lines = []
        for why, labels in reasons.items():
            text = html.escape(why)
            if all(label in why for label in labels):  # the reason names them: bold them there
                for label in labels:
                    text = text.replace(html.escape(label), f"**{label}**", 1)
                lines.append(f"- {text}")
            else:
                lines.append(f"- **{', '.join(labels)}**: {text}")
        return "Hidden because they do nothing with these settings:\n" + "\n".join(lines)

    def view(self, cfg: Config, method: str, model: str) -> dict:
        """What the panel shows for a config: a style hiding the fields that do nothing here (and the groups and
        "More" sections left empty), the groups' summaries and notes, and the methods the model can train."""
        facts = self.facts(model)
        hidden = inapplicable(cfg, facts, method)
        off = [f"#opt-{s}-{n}" for s, n in self.form.keys if (s, n) in hidden and (s, n) not in PAGE_OWNED]
        labels = []
        for key in self.accordions:
            opts = [o for o in self.form.options.values() if o.group == key and o.key not in PAGE_OWNED]
            show = (METHOD_GROUPS[key] == method) if key in METHOD_GROUPS else \
                any(o.key not in hidden for o in opts) or (key == "images" and method != SLIDER)
            off += [] if show else [f"#group-{key}"]
            labels.append(self._label(key, cfg))
        off += [f"#more-{key}" for key, keys in self.mores.items() if all(k in hidden for k in keys)]
        off += ["#images-section"] if method == SLIDER else []  # prompts alone: no images to add
        problems = method_problems(cfg, facts)
        info = "; ".join(f"{m}: {why}" for m, why in problems.items()) or METHOD_INFO
        return {"style": f"<style>{', '.join(off)} {{ display: none !important; }}</style>" if off else "",
                "labels": labels, "notes": [self._note(key, hidden) for key in self.notes],
                "method": ([m for m in METHODS if m not in problems], info)}

    def updates(self, new: dict, old: dict | None) -> list:
        """The page's changes from the view `old` to `new`; what did not change is skipped."""
        old = old or {}

        def diff(name, i, make):
            return make(new[name][i]) if not old or old[name][i] != new[name][i] else gr.skip()

        out = [gr.skip() if old.get("style") == new["style"] else new["style"]]
        out += [diff("labels", i, lambda v: gr.update(label=v)) for i in range(len(new["labels"]))]
        out += [diff("notes", i, lambda v: gr.update(value=v)) for i in range(len(new["notes"]))]
        same = old and old["method"] == new["method"]
        out.append(gr.skip() if same else gr.update(choices=new["method"][0], info=new["method"][1]))
        return out

    def outputs(self, method) -> list:
        return [self.style] + list(self.accordions.values()) + list(self.notes.values()) + [method, self.shown_view]

    def settings_args(self, model, method) -> dict:
        """The event that redraws the panel for the form's values (the view it shows now goes in and out)."""
        return dict(fn=self.on_settings, inputs=[model, method, self.shown_view] + self.form.components,
                    outputs=self.outputs(method), show_progress="hidden")

    # ------------------------------------------------------------ events
    def wire(self, model, method) -> None:
        """A change redraws the panel, then estimates the memory (one after the other: fewer events at once)."""
        comps = self.form.components
        self.fit_args = dict(fn=self.on_fit, inputs=[model, self.vram, method] + comps,
                             outputs=[self.fit_status, self.fit_apply, self.plan], concurrency_limit=1,
                             concurrency_id="fit", show_progress="minimal", show_progress_on=[self.fit_status])
        triggers = [t for c in comps for t in ((c.blur, c.submit) if isinstance(c, gr.Textbox) else (c.input,))]
        gr.on(triggers + [method.input], trigger_mode="always_last", **self.settings_args(model, method)).then(
            **self.fit_args)
        picked = gr.State(False)  # the model's family changed the preset: its values go in
        gr.on([model.blur, model.submit], self.on_model, [model, self.preset], [self.preset, picked],
              show_progress="hidden").then(self.on_picked, [picked, self.preset] + comps, comps,
                                           show_progress="hidden").then(**self.settings_args(model, method))
        self.preset.input(self.on_preset, [self.preset] + comps, comps, show_progress="hidden").then(
            **self.settings_args(model, method)).then(**self.fit_args)
        gr.on([self.vram.submit, self.fit_btn.click], trigger_mode="always_last", **self.fit_args)
        self.fit_apply.click(self.on_fit_apply, [self.plan] + comps, comps).then(**self.fit_args)

    def clean(self, cfg: Config, method: str, errors: dict | None = None) -> Config:
        """The fields that do nothing here (hidden on the page) at their defaults, and their errors dropped: what a
        hidden field holds never trains nor blocks."""
        hidden = inapplicable(cfg, self.facts(cfg.model.path), method)
        for key in hidden:
            opt = self.form.options[key]
            if key in PAGE_OWNED or opt.group in METHOD_GROUPS:
                continue
            for obj in cfg.data if key[0] == "data" else [getattr(cfg, key[0])]:
                setattr(obj, key[1], opt.default)
            if errors is not None:
                errors.pop(key, None)
        return cfg

    def read(self, values) -> Config:
        """The form's Config for the rules: unreadable values at their defaults, and a data folder even before the
        images are chosen (its options apply)."""
        return self._read(values)[0]

    def _read(self, values) -> tuple[Config, dict]:
        folder = values[self.form.keys.index(("data", "path"))]
        return self.form.read(values, {("data", "path"): folder or "images"})

    def on_settings(self, model, method, view, *values):
        new = self.view(for_method(self.read(values), method), method, model)
        return self.updates(new, view) + [new]

    def on_model(self, model, preset):
        """A model of another family: its presets, the same goal where it has one (then applied, `on_picked`)."""
        choices = preset_choices(model)
        if preset in [n for _, n in choices]:
            return gr.update(choices=choices), False
        goal = preset.split("-", 1)[1] if "-" in (preset or "") else ""
        fit = preset_for(model, goal)
        return gr.update(choices=choices, value=fit.name if fit else ""), fit is not None

    def on_picked(self, picked, name, *values):
        return self.on_preset(name, *values) if picked else [gr.skip()] * len(values)

    def on_preset(self, name, *values):
        """The preset's values in every field but the page's own; free text only where the preset sets it."""
        if not name:
            return [gr.skip()] * len(values)
        cfg, given = load_preset(name), preset_values(name)
        out = []
        for key, new in zip(self.form.keys, self.form.values_of(cfg)):
            opt = self.form.options[key]
            free = opt.field.type in FREE_TEXT and not opt.field.metadata.get("choices")
            keep = key in PAGE_OWNED or (free and opt.field.name not in given.get(key[0], {}))
            out.append(gr.skip() if keep else new)
        return out

    def on_fit(self, model, vram, method, *values, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        cfg, errors = self._read(values)  # the estimate needs no images: before they are chosen too
        for_method(cfg, method, errors)
        self.clean(cfg, method, errors)
        problems = list({**errors, **field_errors(cfg)}.values())
        if problems:  # estimated once the settings are valid (a batch size of 0 has no memory to estimate)
            text = f"Memory: estimated once the settings are valid ({html.escape(problems[0])})."
            return _fit_box(text, "idle"), gr.update(visible=False), []
        key = (cfg.to_toml(), model, vram)  # a field left without a change costs nothing
        if key not in self._fits:
            progress(0, desc="Estimating the memory …")
            self._fits = {**dict(list(self._fits.items())[-15:]), key: self._fit(cfg, model, vram)}
        html_box, plan = self._fits[key]
        return html_box, gr.update(visible=bool(plan)), plan

    def _fit(self, cfg: Config, model: str, vram: str) -> tuple[str, list]:
        """(the report, the plan's changed fields) of `check_fit` for the form's config."""
        from sdlora.training.memory.fit_plan import check_fit, parse_size

        try:
            cfg.model.path = self.manager.allowed.model_path(model)
            fit = check_fit(cfg, vram=parse_size(vram) if (vram or "").strip() else None)
        except (SdloraError, OSError, ValueError) as e:
            return _fit_box(f"Memory: cannot estimate ({html.escape(str(e))})", "idle"), []
        return _fit_report(fit), _plan_values(self.form, cfg, fit.plan)

    def on_fit_apply(self, plan, *values):
        new = {tuple(k): v for k, v in plan}
        return [new.get(key, gr.skip()) for key in self.form.keys]


def _plan_values(form: ConfigForm, cfg: Config, plan: Config | None) -> list:
    if plan is None:
        return []
    before, after = form.values_of(cfg), form.values_of(plan)
    return [[list(k), b] for k, a, b in zip(form.keys, before, after) if a != b]


def _fit_box(text: str, state: str, peak: int = 0) -> str:
    return f'<div id="fit-box" class="{state}" data-bytes="{peak}">{text}</div>'


def _fit_report(fit) -> str:
    g = 2**30
    head = f"Memory: about <b>{fit.estimate.total / g:.2f} GiB</b> at the peak; {html.escape(fit.where)} has " \
           f"{fit.budget / g:.2f} GiB for it"
    peak = fit.estimate.total
    if fit.fits:
        return _fit_box(f"{head}: <b>fits</b>.", "fits", peak)
    if fit.plan is None:
        return _fit_box(f"{head}: <b>does not fit</b>, and nothing sdlora can change makes it fit.", "nofit", peak)
    flags = html.escape(" ".join(fit.flags))
    return _fit_box(f"{head}: <b>does not fit</b>. The cheapest settings that fit (about "
                    f"{fit.plan_estimate.total / g:.2f} GiB): <code>{flags}</code>", "nofit", peak)


def _help(opts) -> str:
    rows = [f"- **{o.label}** · `{o.flag}` · `[{o.section}] {o.field.name}`: {o.help}" for o in opts]
    return "\n".join(rows) or "No settings."
