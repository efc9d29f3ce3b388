"""Preview tab: render a prompt with chosen LoRAs (each at its own scale) beside the base model, same seed;
and a scale-sweep grid. Calls `sdlora.generate`, as `sdlora generate` does."""

from __future__ import annotations

import gradio as gr

from sdlora.errors import SdloraError

from . import notify
from .files import list_loras, relative
from .jobs import JobManager

SLOTS = 3
SWEEP = [0.0, 0.25, 0.5, 0.75, 1.0]


NONE = ("(none)", "")  # an empty slot: every LoRA menu has it, so a slot can be cleared


def lora_choices(manager: JobManager) -> list[tuple[str, str]]:
    """(name shown, absolute path) of every LoRA in the output folder, newest first, after the empty choice."""
    return [NONE] + [(relative(p, manager.output_dir), str(p)) for p in list_loras(manager.output_dir)]


def refreshed(choices: list[tuple[str, str]], current: list, first_default: bool = False) -> list:
    """The slots' menus: a chosen LoRA stays, a vanished one empties its slot; with `first_default` the first slot
    takes the newest LoRA until a LoRA or "(none)" is chosen in it."""
    paths = {p for _, p in choices}
    values = [v if v in paths else "" for v in current]
    if first_default and current and current[0] is None and len(choices) > 1:
        values[0] = choices[1][1]
    return [gr.update(choices=choices, value=v) for v in values]


class PreviewTab:
    def __init__(self, manager: JobManager):
        self.manager = manager

    def build(self) -> None:
        gr.Markdown("Render a prompt with your LoRAs, beside the base model's image for the same seed.")
        with gr.Row():
            self.model = gr.Textbox(value=self.manager.model, label="Base model", scale=3,
                                    placeholder="empty: the built-in shapes-world model", elem_id="preview-model")
            self.refresh = gr.Button("Refresh LoRA list", size="sm", scale=1)
        self.picks, self.scales = [], []
        for i in range(SLOTS):
            with gr.Row():
                self.picks.append(gr.Dropdown(choices=[NONE], value=None, label=f"LoRA {i + 1}", scale=3,
                                              elem_id=f"preview-lora-{i}", min_width=260))
                self.scales.append(gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="scale", scale=2))
        with gr.Row():
            self.prompt = gr.Textbox(value="a photo of sks", label="Prompt", scale=3, elem_id="preview-prompt")
            self.negative = gr.Textbox(label="Negative prompt", scale=2)
        with gr.Row():
            self.seed = gr.Number(value=0, precision=0, label="Seed")
            self.steps = gr.Number(value=20, precision=0, label="Steps", elem_id="preview-steps")
            self.guidance = gr.Number(value=7.5, label="Guidance")
            self.size = gr.Number(value=0, precision=0, label="Size in pixels (0: the model's own)",
                                  elem_id="preview-size")
        with gr.Row():
            self.go = gr.Button("Generate", variant="primary", elem_id="preview-generate")
            self.sweep = gr.Button("Scale sweep (0 → 1)", elem_id="preview-sweep")
        self.status = gr.Markdown(elem_id="preview-status")
        with gr.Row():
            self.base_image = gr.Image(label="Base model", type="filepath", elem_id="preview-base", height=320)
            self.lora_image = gr.Image(label="With LoRA(s)", type="filepath", elem_id="preview-lora", height=320)
        self.grid = gr.Image(label="Scale sweep: columns = LoRA scale × 0, ¼, ½, ¾, 1", type="filepath",
                             elem_id="preview-grid", height=260)

    def wire(self, demo: gr.Blocks, tab: gr.Tab) -> None:
        common = [self.model, self.prompt, self.negative, self.seed, self.steps, self.guidance, self.size] + \
            self.picks + self.scales
        self.go.click(self.on_generate, common, [self.base_image, self.lora_image, self.status])
        self.sweep.click(self.on_sweep, common, [self.grid, self.status])
        for trigger in (self.refresh.click, tab.select):
            trigger(self.on_refresh, self.picks, self.picks)

    def on_refresh(self, *current):
        return refreshed(lora_choices(self.manager), list(current), first_default=True)

    def _render(self, model, prompt, negative, seed, steps, guidance, size, loras, **kw):
        from sdlora import generate

        allowed = self.manager.allowed
        model, loras = allowed.model_path(model), [(str(allowed.output(p)), s) for p, s in loras]
        size = int(size or 0) or None
        return generate(model or None, loras, prompt, negative_prompt=negative or "", seed=int(seed or 0), n=1,
                        steps=int(steps or 20), guidance=float(guidance), width=size, height=size,
                        output_dir=self._out(), **kw)

    def on_generate(self, model, prompt, negative, seed, steps, guidance, size, *slots):
        loras = _chosen(slots)
        if not loras:
            notify.warn("Pick a LoRA first (train one, or press Refresh LoRA list).")
            return None, None, "Pick a LoRA first."
        try:
            base = self._render(model, prompt, negative, seed, steps, guidance, size, [])
            mine = self._render(model, prompt, negative, seed, steps, guidance, size, loras)
        except SdloraError as e:
            notify.warn(str(e))
            return None, None, f"**Error:** {e}"
        names = ", ".join(f"{relative(p, self.manager.output_dir)} × {s:g}" for p, s in loras)
        return str(base[0]), str(mine[0]), f"Seed {int(seed or 0)} · {names}"

    def on_sweep(self, model, prompt, negative, seed, steps, guidance, size, *slots):
        loras = _chosen(slots)
        if not loras:
            notify.warn("Pick a LoRA first.")
            return None, "Pick a LoRA first."
        try:
            paths = self._render(model, prompt, negative, seed, steps, guidance, size, loras, grid=True,
                                 scales=SWEEP)
        except SdloraError as e:
            notify.warn(str(e))
            return None, f"**Error:** {e}"
        return str(paths[0]), "Scale sweep: each LoRA's scale multiplied by 0, ¼, ½, ¾, 1 (same seed)."

    def _out(self):
        return self.manager.output_dir / "_previews"


def _chosen(slots) -> list[tuple[str, float]]:
    picks, scales = slots[:SLOTS], slots[SLOTS:]
    return [(p, float(s)) for p, s in zip(picks, scales) if p]
