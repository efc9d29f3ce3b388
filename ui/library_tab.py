"""Library tab: the LoRAs in the output folder with their metadata and samples; download, convert, resize.
Calls `sdlora.inspect_lora / convert_lora / resize_lora`, as `sdlora inspect / convert / resize` do."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from sdlora.errors import SdloraError

from .files import list_loras, relative, safe_name, samples_of
from .jobs import JobManager
from .preview_tab import lora_choices


class LibraryTab:
    def __init__(self, manager: JobManager):
        self.manager = manager

    def build(self) -> None:
        gr.Markdown("LoRAs in the output folder. Pick one to see its metadata and samples, download, convert "
                    "or resize it.")
        with gr.Row():
            self.pick = gr.Dropdown(choices=[], label="LoRA", scale=3, elem_id="library-pick")
            self.refresh = gr.Button("Refresh", size="sm", scale=1)
        self.table = gr.Dataframe(headers=["LoRA", "size (MB)", "modified"], interactive=False, label="All LoRAs")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                self.summary = gr.Markdown(elem_id="library-summary")
                with gr.Accordion("All metadata", open=False, elem_id="library-metadata"):
                    self.details = gr.Markdown(elem_id="library-details")
            with gr.Column(scale=1, min_width=280):
                self.download = gr.DownloadButton("Download this LoRA", variant="primary", visible=False,
                                                  elem_id="library-download")
                self.samples = gr.Gallery(label="Samples from training", columns=3, height=240,
                                          elem_id="library-samples")
        with gr.Accordion("Convert / resize", open=False, elem_id="library-tools"):
            with gr.Row():
                self.to = gr.Radio(["kohya", "diffusers"], value="kohya", label="Convert to")
                self.convert_btn = gr.Button("Convert")
            with gr.Row():
                self.rank = gr.Number(value=4, precision=0, label="New rank (0: choose by energy)")
                self.energy = gr.Number(value=0, label="Keep energy (e.g. 0.99; 0: use the rank)")
                self.resize_btn = gr.Button("Resize")
            self.tool_status = gr.Markdown()
            self.tool_file = gr.File(label="Result", height=80)

    def wire(self, demo: gr.Blocks, tab: gr.Tab) -> None:
        tab.select(self.on_refresh, [self.pick], [self.pick, self.table])
        self.refresh.click(self.on_refresh, [self.pick], [self.pick, self.table])
        self.pick.change(self.on_pick, [self.pick], [self.summary, self.details, self.download, self.samples])
        self.convert_btn.click(self.on_convert, [self.pick, self.to], [self.tool_status, self.tool_file])
        self.resize_btn.click(self.on_resize, [self.pick, self.rank, self.energy], [self.tool_status, self.tool_file])

    def on_refresh(self, current):
        choices = lora_choices(self.manager)[1:]  # the Library shows LoRAs; no empty choice
        paths = [p for _, p in choices]
        rows = [[relative(p, self.manager.output_dir), round(Path(p).stat().st_size / 2**20, 2),
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(p).stat().st_mtime))]
                for p in list_loras(self.manager.output_dir)]
        value = current if current in paths else (paths[0] if paths else None)
        return gr.update(choices=choices, value=value), rows

    def on_pick(self, path):
        if not path:
            return "No LoRA yet: train one in the Train tab.", "", gr.update(visible=False), []
        from sdlora import inspect_lora

        try:
            info = inspect_lora(self.manager.allowed.output(path))
        except SdloraError as e:
            return f"**Error:** {e}", "", gr.update(value=path, visible=True), samples_of(path)
        return headline(info), f"```\n{info.summary()}\n```", gr.update(value=path, visible=True), \
            samples_of(path)

    def on_convert(self, path, to):
        from sdlora import convert_lora

        if not path:
            raise gr.Error("Pick a LoRA first.")
        path = self._lora(path)
        layout = _layout(path)
        if layout == to:
            return f"{Path(path).name} is already in the {to} layout: nothing written.", None
        out = Path(path).with_name(safe_name(f"{Path(path).stem}_{to}.safetensors"))
        return self._run(lambda: convert_lora(path, to, out, overwrite=True), out, f"Converted to {to}")

    def on_resize(self, path, rank, energy):
        from sdlora import resize_lora

        if not path:
            raise gr.Error("Pick a LoRA first.")
        path = self._lora(path)
        rank, energy = int(rank or 0) or None, float(energy or 0) or None
        tag = f"r{rank}" if rank else f"e{energy:g}"
        out = Path(path).with_name(safe_name(f"{Path(path).stem}_{tag}.safetensors"))
        return self._run(lambda: resize_lora(path, out, rank=rank, keep_energy=energy, overwrite=True), out,
                         "Resized")

    def _lora(self, path) -> Path:
        try:
            return self.manager.allowed.output(path)
        except SdloraError as e:
            raise gr.Error(str(e)) from None

    def _run(self, action, out: Path, done: str):
        try:
            result = action()
        except SdloraError as e:
            return f"**Error:** {e}", None
        report = f"\n\n```\n{result.table(limit=12)}\n```" if hasattr(result, "table") else ""
        return f"{done}: `{relative(out, self.manager.output_dir)}`{report}", str(out)


def _layout(path) -> str:
    from sdlora.loras.files import read_lora
    from sdlora.loras.layout import detect_layout, split_embeddings

    try:
        return detect_layout(split_embeddings(read_lora(path)[0])[0])
    except SdloraError:
        return ""


def headline(info) -> str:
    """What a user looks for first: the trigger words, the base, the network, how it was trained, where it loads."""
    m = info.metadata
    trigger = m.get("modelspec.trigger_phrase") or "(none recorded)"
    trained = ", ".join(x for x in (
        f"{m['ss_max_train_steps']} steps" if m.get("ss_max_train_steps") else "",
        f"{m['ss_resolution']} px" if m.get("ss_resolution") else "",
        f"lr {m['ss_learning_rate']}" if m.get("ss_learning_rate") else "") if x) or "-"
    types = ", ".join(info.types) or "-"
    rows = [("Trigger words", f"**{trigger}**"), ("Base", m.get("modelspec.architecture") or info.family or "-"),
            ("Network", f"{types}, rank {', '.join(map(str, info.ranks)) or '-'}"), ("Trained", trained),
            ("Layout", f"{info.layout}: loads in {info.loads_in}"), ("Size", f"{info.size_bytes / 1e6:.2f} MB"),
            ("Problems", "; ".join(info.problems) or "none")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### {Path(info.path).name}\n\n| | |\n|---|---|\n{table}"
