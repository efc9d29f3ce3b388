"""Inputs generated from the config tree: one widget per option, its tooltip taken from the field's help text.

The page places a few options up front (`ConfigForm.add`) and generates the rest (`ConfigForm.add_remaining`);
`to_config` turns the widgets' values back into the same `Config` the CLI and TOML files fill.
"""

from __future__ import annotations

import dataclasses

import gradio as gr

from sdlora.config import SECTIONS, Config, DataFolder, from_dict, iter_options

Key = tuple[str, str]  # (section, field name); section "data" is the one image folder


def default_of(section: str, f: dataclasses.Field):
    obj = SECTIONS[section]() if section in SECTIONS else DataFolder()
    return getattr(obj, f.name)


def widget(section: str, f: dataclasses.Field, **kw) -> gr.components.Component:
    """The input for one config field: checkbox, dropdown, number or text; its `info` is the help text."""
    value = kw.pop("value", default_of(section, f))
    kw = {"label": f.name.replace("_", " "), "info": f.metadata.get("help", ""),
          "elem_id": f"opt-{section}-{f.name}", **kw}
    if f.metadata.get("choices"):
        return gr.Dropdown(choices=list(f.metadata["choices"]), value=value, **kw)
    if f.type == "bool":
        return gr.Checkbox(value=value, **kw)
    if f.type == "int":
        return gr.Number(value=value, precision=0, **kw)
    if f.type == "float":
        return gr.Number(value=value, **kw)
    if f.type == "list":
        kw["info"] += " One per line."
        return gr.Textbox(value="\n".join(value), lines=2, **kw)
    return gr.Textbox(value=value, **kw)


class ConfigForm:
    """The widgets of one settings page, in a fixed order, keyed by (section, field)."""

    def __init__(self):
        self.keys: list[Key] = []
        self.components: list[gr.components.Component] = []
        self._fields = {(s, f.name): f for s, f in iter_options()}

    def add(self, section: str, name: str, **kw) -> gr.components.Component:
        comp = widget(section, self._fields[(section, name)], **kw)
        self.keys.append((section, name))
        self.components.append(comp)
        return comp

    def add_remaining(self, skip: set[Key] = frozenset(), skip_sections: set[str] = frozenset()) -> None:
        """Every option not placed yet, grouped by section (for the "Advanced" accordion)."""
        by_section: dict[str, list[Key]] = {}
        for key in self._fields:
            if key not in self.keys and key not in skip and key[0] not in skip_sections:
                by_section.setdefault(key[0], []).append(key)
        for section, keys in by_section.items():
            gr.Markdown(f"**[{section}]**" if section != "data" else "**[[data]]**")
            with gr.Row(equal_height=False):
                for s, name in keys:
                    self.add(s, name, min_width=220)

    def to_config(self, values: list, overrides: dict[Key, object] | None = None) -> Config:
        """A Config from the widgets' values (plus page-set values); bad values raise ConfigError."""
        tree: dict = {}
        items = dict(zip(self.keys, values)) | dict(overrides or {})
        for (section, name), value in items.items():
            f = self._fields[(section, name)]
            if f.type == "list":
                value = [line.strip() for line in (value or "").splitlines() if line.strip()]
            elif f.type == "int" and value is not None:
                value = int(value)
            elif f.type == "float" and value is not None:
                value = float(value)
            elif f.type == "str" and value is None:
                value = ""
            tree.setdefault(section, {})[name] = value
        data = tree.pop("data", {})
        if data.get("path"):
            tree["data"] = [data]
        return from_dict(tree)

    def values_of(self, cfg: Config) -> list:
        """The widgets' values for a Config (to show a loaded TOML)."""
        folder = cfg.data[0] if cfg.data else DataFolder()
        out = []
        for section, name in self.keys:
            value = getattr(folder if section == "data" else getattr(cfg, section), name)
            out.append("\n".join(value) if isinstance(value, list) else value)
        return out
