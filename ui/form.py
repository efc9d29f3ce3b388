"""Inputs generated from the config tree (`sdlora.options`): one widget per field, labelled in words, with a short line
of help; numbers are typed as text so a mistyped one stays on screen and is named in the error.

`ConfigForm.read` turns the widgets' values back into the same `Config` the CLI and TOML files fill, with every
value that is not a number of the right kind reported by field.
"""

from __future__ import annotations

import math

import gradio as gr

from sdlora.config import Config, DataFolder, from_dict
from sdlora.options import Key, Option, by_key

FREE_TEXT = ("str", "list")


def shown(opt: Option, value) -> object:
    """A config value as its widget shows it."""
    if opt.field.type in ("int", "float") and not isinstance(value, bool) and value is not None:
        return repr(value)
    if opt.field.type == "list":
        return "\n".join(str(v) for v in value) if isinstance(value, list) else value
    return value


def classes(opt: Option) -> list[str]:
    """A field's CSS classes: numbers, and checkboxes (which take the width of a field, not of their box)."""
    return {"int": ["number"], "float": ["number"], "bool": ["option-check"]}.get(opt.field.type, [])


def widget(opt: Option, value=None, **kw) -> gr.components.Component:
    """The input of one field: checkbox, dropdown, or a text box (numbers too)."""
    value = shown(opt, opt.default if value is None else value)
    kw = {"label": opt.label, "info": opt.short, "elem_id": f"opt-{opt.section}-{opt.field.name}",
          "min_width": 240, "elem_classes": classes(opt), **kw}
    f = opt.field
    if f.metadata.get("choices"):
        return gr.Dropdown(choices=list(f.metadata["choices"]), value=value, **kw)
    if f.type == "bool":
        return gr.Checkbox(value=value, **kw)
    if f.type == "list":
        return gr.Textbox(value=value, lines=2, **kw)
    if f.type in ("int", "float"):
        return gr.Textbox(value=value, lines=1, max_lines=1, **kw)
    if len(str(opt.default)) > 24:  # a long default (score weights, a hub id) wraps instead of being cut off
        return gr.Textbox(value=value, lines=2, max_lines=4, **kw)
    return gr.Textbox(value=value, lines=1, max_lines=1, **kw)


def parse(opt: Option, raw) -> tuple[object, str | None]:
    """(value, None) or (the default, an error in words) for what a widget holds."""
    t = opt.field.type
    if t == "list":
        return [line.strip() for line in (raw or "").splitlines() if line.strip()], None
    if t == "bool":
        return bool(raw), None
    if t == "str":  # one line, also where the box wraps a long value
        return ("" if raw is None else str(raw).replace("\n", "")), None
    if t not in ("int", "float"):
        return raw, None
    text = "" if raw is None else str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    kind = "a whole number" if t == "int" else "a number"
    if number is None or not math.isfinite(number) or (t == "int" and not number.is_integer()):
        return opt.default, f"{opt.label} must be {kind}, got {text!r}" if text else f"{opt.label} needs {kind}"
    return (int(number) if t == "int" else number), None


class ConfigForm:
    """The widgets of the settings, in the order they were made, keyed by (section, field)."""

    def __init__(self):
        self.options = by_key()
        self.keys: list[Key] = []
        self.components: list[gr.components.Component] = []

    def add(self, section: str, name: str, value=None, **kw) -> gr.components.Component:
        comp = widget(self.options[(section, name)], value, **kw)
        self.keys.append((section, name))
        self.components.append(comp)
        return comp

    def component(self, key: Key) -> gr.components.Component:
        return self.components[self.keys.index(key)]

    def read(self, values, overrides: dict[Key, object] | None = None) -> tuple[Config, dict[Key, str]]:
        """The Config of the widgets' values (plus page-set values), and {field: error} for values that are not of
        their field's kind (those fields take their defaults)."""
        tree: dict = {}
        errors: dict[Key, str] = {}
        for key, raw in zip(self.keys, values):
            value, error = parse(self.options[key], raw)
            if error:
                errors[key] = error
            tree.setdefault(key[0], {})[key[1]] = value
        for (section, name), value in (overrides or {}).items():
            tree.setdefault(section, {})[name] = value
        data = tree.pop("data", {})
        if data.get("path"):
            tree["data"] = [data]
        return from_dict(tree), errors

    def values_of(self, cfg: Config) -> list:
        """The widgets' values for a Config."""
        folder = cfg.data[0] if cfg.data else DataFolder()
        return [shown(self.options[(s, n)], getattr(folder if s == "data" else getattr(cfg, s), n))
                for s, n in self.keys]
