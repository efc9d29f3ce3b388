"""Train tab: the LoRA's name, base model and preset; its images; the method; the settings in groups with the memory
fit; start / stop / resume and live progress (polled from the job manager, so a reloaded page shows the same run).
The sections live in `dataset`, `settings` and `runs`; this file lays them out and wires them."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from sdlora.config import load_toml
from sdlora.errors import SdloraError
from sdlora.options import LORA, METHODS, groups, method_of

from . import notify
from .dataset import DatasetSection
from .form import ConfigForm
from .jobs import JobManager
from .runs import FormError, RunSection
from .settings import METHOD_INFO, SettingsPanel

OWN_PLACE = ("images", "dreambooth", "pivotal", "slider")  # groups laid out beside their section, not under Settings


class TrainTab:
    def __init__(self, manager: JobManager):
        self.manager = manager
        self.form = ConfigForm()
        self.settings = SettingsPanel(manager, self.form)
        self.dataset = DatasetSection(manager, self.settings)
        self.runs = RunSection(manager, self.form, self.settings)

    # ------------------------------------------------------------ layout
    def build(self) -> None:
        gr.Markdown("Train a LoRA: add images, pick a method, press **Start training**. Runs are queued and keep "
                    "going if you close this page.")
        with gr.Row(equal_height=False):
            self.name = gr.Textbox(value="my-lora", label="LoRA name", elem_id="lora-name", min_width=220,
                                   info="Its file and folder in the output directory are named after it.")
            self.model = self.settings.add("model", "path", placeholder="empty: the built-in shapes-world model",
                                           value=self.manager.model, scale=2)
            self.settings.build_preset()
        self.last_name = gr.State("my-lora")
        with gr.Column(elem_id="images-section"):  # hidden for a slider, which learns from prompts alone
            gr.Markdown("### 1 · Images")
            self.dataset.build()
            self.settings.build_group("images", extra=self.dataset.build_group_extra)
        gr.Markdown("### 2 · Method")
        self.method = gr.Radio(list(METHODS), value=method_of(self.settings.initial) or LORA, label="Method",
                               elem_id="method", info=METHOD_INFO)
        self.settings.build_group("dreambooth", open=True)
        self.settings.build_group("pivotal", open=True)
        self.settings.build_group("slider", open=True)
        gr.Markdown("### 3 · Settings")
        self.settings.build_first()
        for group in groups():
            if group.key not in OWN_PLACE:
                self.settings.build_group(group.key)
        self.settings.build_fit()
        with gr.Row():
            self.save_btn = gr.Button("Save settings (TOML)", size="sm", elem_id="save-settings")
            self.load_btn = gr.UploadButton("Load settings (TOML)", file_types=[".toml"], size="sm",
                                            elem_id="load-settings")
        self.settings_file = gr.File(label="Settings file (the same TOML `sdlora train` reads)", visible=False,
                                     elem_id="settings-file")
        gr.Markdown("### 4 · Run")
        self.runs.build()

    # ------------------------------------------------------------ events
    def wire(self, demo: gr.Blocks) -> None:
        self.settings.wire(self.model, self.method)
        redraw = [self.settings.settings_args(self.model, self.method), self.settings.fit_args]
        self.dataset.wire(self.name, self.last_name, self.runs.errors, redraw)
        d = self.dataset
        for shown in self.runs.wire(demo, self.name, self.method, self.last_name):
            shown.then(d.on_folder, [d.folder, d.masks], [d.captions, d.gallery, d.folder_status],
                       show_progress="hidden")
        comps = self.form.components
        marked = [self.runs.errors] + comps + list(self.settings.accordions.values())
        self.save_btn.click(self.on_save, [self.name, self.method] + comps, [self.settings_file] + marked)
        self.load_btn.upload(self.on_load, [self.load_btn], [self.name, self.method, self.last_name] + comps).then(
            **self.settings.settings_args(self.model, self.method))

    def on_save(self, name, method, *values):
        """The settings as the TOML `sdlora train` runs unchanged."""
        try:
            cfg, name = self.runs.make_config(name, method, values, resume=True, check_all=False)
        except FormError as e:
            return [gr.skip()] + self.runs.marks(e)
        path = Path(cfg.output.path).with_suffix(".toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cfg.to_toml())
        return [gr.update(value=str(path), visible=True)] + self.runs.marks(None)

    def on_load(self, file):
        """A settings file back on the page (the same values, method and name)."""
        try:
            cfg = load_toml(file)
        except SdloraError as e:
            raise notify.error(str(e)) from None
        name = Path(cfg.output.path).stem
        return [name, method_of(cfg), name] + self.form.values_of(cfg)
