"""Image validation: the validation prompts rendered at fixed seeds with the weights a file would get (the caller
holds `optim.evaluation()`: EMA / schedule-free averaged), scored by a pluggable scorer (`sdlora.scoring`), with the
best combined score so far (in checkpoints, so a resumed run picks the same best file).

Prompts come from the job (`[[validation.prompts]]`) or from the training captions: those with the trigger are
concept prompts (likeness, adherence), those without it and the class prompt are preservation prompts (compared with
the base model's image at the same seed, rendered with the adapters switched off)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ...scoring.base import Scorer, Shots, has_trigger
from ...scoring.make import make_scorer
from .best import Best

CONCEPT_PROMPTS, PRESERVATION_PROMPTS = 4, 2  # default prompts drawn from the training captions
MAX_REFERENCE = 64  # training images scored against (evenly spread when there are more)


@dataclass(frozen=True)
class ValidationPrompt:
    text: str        # as written: with the trigger word (the pivotal token replaces it only for rendering)
    concept: bool    # carries the trigger (likeness) or not (preservation)
    negative: str = ""


def trigger_of(cfg, captions_by_folder: dict[str, list[str]]) -> str:
    """The trigger phrase that splits concept from preservation prompts: pivotal tuning's trigger (or token),
    output.trigger, the instance prompt's words the class prompt lacks, else the words every caption of the first
    data folder has and no caption of another folder has (kohya-style folders: "a red sks" beside "a blue circle");
    '' when none can be told (then every caption is a concept prompt)."""
    from ...loras.metadata import trigger_words

    if cfg.pivotal.token:
        return cfg.pivotal.trigger or cfg.pivotal.token
    if cfg.output.trigger or (cfg.data and cfg.data[0].prompt and cfg.prior.class_prompt):
        return trigger_words(cfg)
    folders = list(captions_by_folder.values())
    if len(folders) < 2 or not folders[0]:
        return ""
    first = [c.lower().split() for c in folders[0]]
    others = {w for caps in folders[1:] for c in caps for w in c.lower().split()}
    shared = [w for w in first[0] if all(w in c for c in first[1:]) and w not in others]
    return " ".join(shared)


def validation_prompts(cfg, captions_by_folder: dict[str, list[str]], trigger: str) -> list[ValidationPrompt]:
    """The job's [[validation.prompts]], else up to 4 distinct training captions with the trigger and up to 2
    preservation prompts (the class prompt, then captions without the trigger), evenly spread over the sorted
    captions."""
    if cfg.validation.prompts:
        out = []
        for p in cfg.validation.prompts:
            t = {"text": p} if isinstance(p, str) else p
            kind = t.get("kind") or ("concept" if not trigger or has_trigger(t["text"], trigger) else "preservation")
            out.append(ValidationPrompt(t["text"], kind == "concept", t.get("negative", "")))
        return out
    captions = sorted({c for caps in captions_by_folder.values() for c in caps if c.strip()})
    concept = [c for c in captions if not trigger or has_trigger(c, trigger)]
    others = [c for c in captions if trigger and not has_trigger(c, trigger)]
    preserve = ([cfg.prior.class_prompt] if cfg.prior.class_prompt else []) + _spread(others, PRESERVATION_PROMPTS)
    out = [ValidationPrompt(c, True) for c in _spread(concept, CONCEPT_PROMPTS)]
    out += [ValidationPrompt(c, False) for c in preserve[:PRESERVATION_PROMPTS]]
    if not out:
        raise ConfigError("image validation found no prompt: the training images have no captions or instance "
                          "prompt; give [[validation.prompts]] or --validation-prompt")
    return out


def _spread(items: list, k: int) -> list:
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


@dataclass
class ImageValidation:
    """The prompts, how they are rendered, the scorer (main process only; None on the others) and the best score."""

    prompts: list[ValidationPrompt]
    scorer: Scorer | None
    weights: dict[str, float]
    seeds: int
    steps: int
    size: int
    guidance: float
    seed: int
    best: Best = dataclasses.field(default_factory=lambda: Best("score"))
    last: dict = dataclasses.field(default_factory=dict)  # the latest validation's record
    base: list | None = None  # the base model's image of every preservation shot (None: not rendered yet)

    @property
    def shots(self) -> list[tuple[ValidationPrompt, int]]:
        """(prompt, seed) of every image: prompt i's seeds are seed + i*seeds .. seed + i*seeds + seeds - 1."""
        return [(p, self.seed + i * self.seeds + k) for i, p in enumerate(self.prompts) for k in range(self.seeds)]

    def run(self, state, step: int) -> tuple[dict, object]:
        """Render and score every shot with the weights as they are; (the record {score, likeness, ...} without
        missing parts, the labelled sheet of the images)."""
        if self.base is None:
            with adapters_off(state):
                made = render_shots(state, [(p, s) if not p.concept else None for p, s in self.shots], self.steps,
                                    self.guidance, self.size)
            self.base = made
        images = render_shots(state, self.shots, self.steps, self.guidance, self.size)
        shots = Shots([p.text for p, _ in self.shots], [p.concept for p, _ in self.shots], images, self.base)
        scores = self.scorer.score(shots)
        record = {"score": scores.combined(self.weights), **scores.parts()}
        return record, self.sheet(images, step, record)

    def sheet(self, images: list, step: int, record: dict):
        """One row per prompt (its seeds across, the base model's images after them for preservation prompts)."""
        from ...scoring.grid import labelled_grid

        n = self.seeds
        rows, labels = [], []
        for i, p in enumerate(self.prompts):
            row = images[i * n:(i + 1) * n]
            if not p.concept:
                row = row + self.base[i * n:(i + 1) * n]
            rows.append(row)
            labels.append(f"{p.text[:38]}\n({'concept' if p.concept else 'preservation'})")
        cols = [f"seed {k}" for k in range(n)] + (["base"] * n if self.base and any(self.base) else [])
        head = f"step {step}: score {record['score']:.3f}"
        return labelled_grid(rows, labels, cols, width=max(64, images[0].width), title=head), head

    def state_dict(self) -> dict:
        return {"best": self.best.state_dict(), "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.best.load_state_dict(state["best"])
        self.last = dict(state.get("last", {}))


def build(cfg, state, say) -> ImageValidation | None:
    """The run's image validation (None without a scorer): prompts, and on the main process the scorer with the
    training images that carry the trigger as its reference."""
    va = cfg.validation
    if va.scorer == "none":
        return None
    trigger = trigger_of(cfg, state.captions_by_folder)
    prompts = validation_prompts(cfg, state.captions_by_folder, trigger)
    scorer = None
    if state.acc.is_main_process:
        scorer = make_scorer(va.scorer, trigger, va.concept, va.clip_model, va.dino_model, str(state.device))
        say(scorer.reference(reference_images(state, trigger)))
        say(f"image validation: {len(prompts)} prompts x {va.seeds} seeds "
            f"({sum(p.concept for p in prompts)} with the trigger {trigger!r}), {va.image_steps} steps")
    return ImageValidation(prompts, scorer, cfg.score_weights, va.seeds, va.image_steps,
                           va.image_size or state.resolution, cfg.sample.guidance, cfg.sample.seed)


def reference_images(state, trigger: str) -> list:
    """The training images whose caption carries the trigger (all of them without a trigger), at most 64, evenly
    spread."""
    from ..inputs.data import load_image

    token = state.concept.prompt(trigger) if trigger else ""
    paths = sorted({e.path for e in state.batches.examples if not token or has_trigger(e.caption, token)})
    return [load_image(p) for p in _spread(paths, MAX_REFERENCE)]


def render_shots(state, shots: list, steps: int, guidance: float, size: int) -> list:
    """Each shot (prompt, seed) rendered with the models as they are (None shots give None), the pivotal trigger
    replaced by its token; consecutive shots with the same negative prompt render as one batch."""
    from ...sampling import render

    modules = state.models.modules()
    modes = [m.training for m in modules]
    state.models.denoiser.module.eval()
    pipe = state.components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    out: list = [None] * len(shots)
    try:
        i = 0
        while i < len(shots):
            if shots[i] is None:
                i += 1
                continue
            j = i
            while j < len(shots) and shots[j] is not None and shots[j][0].negative == shots[i][0].negative \
                    and shots[j][1] == shots[i][1] + (j - i):
                j += 1
            with state.acc.autocast():
                images = render(pipe, [state.concept.prompt(p.text) for p, _ in shots[i:j]], shots[i][1], steps,
                                guidance, size, size, shots[i][0].negative, batch=16,
                                embeds=state.models.text.for_pipeline())
            out[i:j] = images
            i = j
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return out


@contextmanager
def adapters_off(state):
    """Inside: every adapter layer of the denoiser and the text encoders passes its input through the base layer
    alone (peft's disable flag, which sdlora's input-axis DoRA also reads), so the pipeline draws the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in state.models.modules() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m._disable_adapters = s


def save_sheet(state, step: int, sheet) -> str:
    """The validation's sheet as NAME_validation/step_N.png (atomically)."""
    from ...sampling import save_png

    out = Path(state.cfg.output.path)
    image, head = sheet
    return str(save_png(image, out.with_name(out.stem + "_validation") / f"step_{step:07d}.png", {"title": head}))
