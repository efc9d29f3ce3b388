"""Merge tab: several LoRAs with weights, mixed into one LoRA or merged into a base checkpoint.
Calls `sdlora.mix_loras / merge_into_model`, as `sdlora mix / merge` do."""

from __future__ import annotations

import gradio as gr

from sdlora.errors import SdloraError

from . import notify
from .files import inside, relative, safe_name
from .jobs import JobManager
from .preview_tab import NONE, lora_choices, refreshed

SLOTS = 4
MIX, MERGE = "Mix into one LoRA", "Merge into the base model (a checkpoint)"


class MergeTab:
    def __init__(self, manager: JobManager):
        self.manager = manager

    def build(self) -> None:
        gr.Markdown("Combine LoRAs, each with a weight: **mix** them into one LoRA file, or **merge** them into "
                    "the base model's weights to get a new checkpoint.")
        self.refresh = gr.Button("Refresh LoRA list", size="sm")
        self.picks, self.weights = [], []
        for i in range(SLOTS):
            with gr.Row():
                self.picks.append(gr.Dropdown(choices=[NONE], value="", label=f"LoRA {i + 1}", scale=3,
                                              elem_id=f"merge-lora-{i}", min_width=260))
                self.weights.append(gr.Number(value=1.0, label="weight", scale=1, min_width=120))
        self.mode = gr.Radio([MIX, MERGE], value=MIX, label="Result", elem_id="merge-mode")
        with gr.Row():
            self.name = gr.Textbox(value="merged", label="Output name", elem_id="merge-name")
            self.rank = gr.Number(value=0, precision=0, label="Rank of the mix (0: exact, ranks stacked)")
            self.model = gr.Textbox(value=self.manager.model, label="Base model (a checkpoint's; a DoRA mix's)",
                                    placeholder="empty: the built-in shapes-world model (no model for a mix)")
        with gr.Row(equal_height=False):
            self.go = gr.Button("Combine", variant="primary", elem_id="merge-go", min_width=160)
            self.result = gr.DownloadButton("Download the result", visible=False, elem_id="merge-download",
                                            min_width=200)
        self.status = gr.Markdown(elem_id="merge-status")

    def wire(self, demo: gr.Blocks, tab: gr.Tab) -> None:
        for trigger in (self.refresh.click, tab.select):
            trigger(self.on_refresh, self.picks, self.picks)
        self.mode.change(lambda m: gr.update(visible=m == MIX), [self.mode], [self.rank])
        self.go.click(self.on_combine, [self.mode, self.name, self.rank, self.model] + self.picks + self.weights,
                      [self.status, self.result])

    def on_refresh(self, *current):
        return refreshed(lora_choices(self.manager), list(current))

    def on_combine(self, mode, name, rank, model, *slots):
        loras = [(p, float(w if w is not None else 1.0)) for p, w in zip(slots[:SLOTS], slots[SLOTS:]) if p]
        if not loras:
            raise gr.Error("Pick at least one LoRA.")
        try:
            loras = [(str(self.manager.allowed.output(p)), w) for p, w in loras]
            model = self.manager.allowed.model_path(model)
        except SdloraError as e:
            return f"**Error:** {e}", gr.update(visible=False)
        # checkpoints go to a *_checkpoints folder, so the LoRA lists leave them out
        folder = self.manager.output_dir / ("merged" if mode == MIX else "merged_checkpoints")
        folder.mkdir(parents=True, exist_ok=True)
        out = inside(folder, safe_name(name, "merged").removesuffix(".safetensors") + ".safetensors")
        try:
            if mode == MIX:
                from sdlora import mix_loras

                report = mix_loras(loras, out, rank=int(rank or 0) or None, overwrite=True, model=model or None)
                text = f"```\n{report.table(limit=12)}\n```"
            else:
                from sdlora import merge_into_model

                out = merge_into_model(model or None, loras, out, overwrite=True)
                text = ""
        except SdloraError as e:
            return f"**Error:** {e}", gr.update(visible=False)
        notify.info(f"Wrote {relative(out, self.manager.output_dir)}")
        done = gr.update(value=str(out), visible=True) if out.is_file() else gr.update(visible=False)
        return f"Wrote `{relative(out, self.manager.output_dir)}`\n\n{text}", done
