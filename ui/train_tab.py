"""Train tab: images and captions, method, settings (generated from the config tree), start / stop / resume,
and live progress polled from the job manager (so a reloaded page shows the same run)."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
from PIL import Image

from sdlora.config import load_toml, validate
from sdlora.errors import ConfigError, SdloraError
from sdlora.training.data import Example, load_mask, mask_file

from . import progress
from .files import dataset_rows, import_uploads, safe_name, write_captions
from .form import ConfigForm
from .jobs import JobManager

LORA, DREAMBOOTH, PIVOTAL = "LoRA", "DreamBooth (prior preservation)", "Pivotal tuning"
PRIOR_KEYS = [("prior", "class_prompt"), ("prior", "num_class_images"), ("prior", "mode"), ("prior", "weight")]
COMMON = [("lora", "network"), ("lora", "rank"), ("optim", "lr"), ("train", "max_steps"), ("augment", "resolution"),
          ("lora", "train_text_encoder")]
SET_BY_PAGE = {("model", "path"), ("output", "path"), ("prior", "class_data")}
LATEST = 0  # job selector value: "whatever runs now, else the newest"


def thumbnails(folder: str, rows: list[list[str]], masks: str = "", size: int = 192) -> list[tuple[Image.Image, str]]:
    """The images with their captions; with a mask folder, what the loss ignores is shown dimmed and tinted."""
    out = []
    for name, caption in rows[:60]:
        with Image.open(Path(folder) / name) as im:
            shown = im.convert("RGB")
        mask = _mask_of(masks, name)
        if mask is not None and mask.size == shown.size:
            tint = Image.blend(shown, Image.new("RGB", shown.size, (40, 0, 60)), 0.7)
            shown = Image.composite(shown, tint, mask)
        shown.thumbnail((size, size))
        out.append((shown, (caption or "(no caption)") + (" · masked" if mask is not None else "")))
    return out


def _mask_of(masks: str, image_name: str) -> Image.Image | None:
    """The mask training would use for an image (its file in the mask folder, read as training reads it)."""
    if not masks or not Path(masks).is_dir():
        return None
    found = mask_file(image_name, masks)
    return None if found is None else load_mask(Example(image_name, "", (0, 0), mask=str(found)))


class TrainTab:
    def __init__(self, manager: JobManager):
        self.manager = manager
        self.form = ConfigForm()

    # ------------------------------------------------------------ layout
    def build(self) -> None:
        f = self.form
        gr.Markdown("Train a LoRA: add images, pick a method, press **Start training**. Runs are queued and "
                    "keep going if you close this page.")
        with gr.Row():
            self.name = gr.Textbox(value="my-lora", label="LoRA name", elem_id="lora-name",
                                   info="The file and its folder in the output directory are named after it.")
            self.model = f.add("model", "path", label="Base model", value=self.manager.model,
                               placeholder="empty: the built-in shapes-world model")
        gr.Markdown("### 1 · Images")
        with gr.Row(equal_height=False):
            self.upload = gr.File(label="Upload images (and .txt captions)", file_count="multiple",
                                  file_types=["image", ".txt"], elem_id="upload", scale=1)
            with gr.Column(scale=1):
                self.folder = f.add("data", "path", label="Image folder",
                                    info="Uploads are copied here; or type the path of a folder of images.")
                self.prompt = f.add("data", "prompt", label="Instance prompt / trigger", value="a photo of sks")
            with gr.Column(scale=1):
                self.mask_upload = gr.File(label="Upload masks (named like their images)", file_count="multiple",
                                           file_types=["image"], elem_id="mask-upload")
                self.masks = f.add("data", "masks", label="Mask folder",
                                   info="White = learn, black = ignore. Mask uploads are copied here.")
        self.gallery = gr.Gallery(label="Images", columns=8, height=200, fit_columns=False, object_fit="contain",
                                  elem_id="dataset-gallery")
        self.captions = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], type="array",
                                     interactive=True, static_columns=[0], elem_id="captions",
                                     label="Captions (edit a cell: it is saved to the image's .txt file)")
        with gr.Accordion("Caption images automatically", open=False, elem_id="captioning"), gr.Row():
            self.captioner = gr.Textbox(label="Captioner", elem_id="captioner", scale=3,
                                        info="A BLIP / Florence-2 / small vision-language model: a folder or a "
                                             "hub id. Images that have a caption keep it.")
            self.caption_prefix = gr.Textbox(label="Prefix", value="", placeholder="e.g. sks, ", scale=1)
            self.caption_btn = gr.Button("Caption images", elem_id="caption-images", scale=1)
        gr.Markdown("### 2 · Method")
        self.method = gr.Radio([LORA, DREAMBOOTH, PIVOTAL], value=LORA, label="Method", elem_id="method")
        with gr.Group(visible=False) as self.prior_group, gr.Row():
            for s, n in PRIOR_KEYS:
                f.add(s, n)
        self.pivotal_group = self._pivotal_group()
        gr.Markdown("### 3 · Settings")
        with gr.Row():
            for s, n in COMMON:
                f.add(s, n)
        with gr.Row():
            f.add("sample", "prompts", label="Sample prompts", placeholder="empty: the instance prompt")
            f.add("sample", "every", value=50)
        with gr.Accordion("Advanced", open=False, elem_id="advanced"):
            f.add_remaining(skip=SET_BY_PAGE)
        with gr.Row():
            self.save_btn = gr.Button("Save settings (TOML)", size="sm")
            self.load_btn = gr.UploadButton("Load settings (TOML)", file_types=[".toml"], size="sm")
        self.settings_file = gr.File(label="Settings file (the same TOML `sdlora train` reads)", visible=False,
                                     elem_id="settings-file")
        self._build_run_controls()

    def _pivotal_group(self):
        with gr.Group(visible=False) as group, gr.Row():
            for s, fld in [(s, fld) for s, fld in self.form._fields if s == "pivotal"]:
                self.form.add(s, fld)
        return group

    def _build_run_controls(self) -> None:
        gr.Markdown("### 4 · Run")
        with gr.Row():
            self.start_btn = gr.Button("Start training", variant="primary", elem_id="start")
            self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            self.resume_btn = gr.Button("Resume", elem_id="resume")
            self.job_pick = gr.Dropdown(choices=[("latest", LATEST)], value=LATEST, label="Show job", scale=1)
        with gr.Row():
            self.sample_now_btn = gr.Button("Sample now", size="sm", elem_id="sample-now")
            self.save_now_btn = gr.Button("Save now (resumable checkpoint)", size="sm", elem_id="save-now")
        self.status = gr.HTML(progress.status_html(None), elem_id="status")
        with gr.Row(equal_height=False):
            self.loss_plot = gr.LinePlot(progress.loss_frame(None), x="step", y="loss", color="series", title="Loss",
                                         height=260, elem_id="loss-plot")
            self.samples = gr.Gallery(label="Samples (newest first)", columns=3, height=260, fit_columns=False,
                                      elem_id="samples")
        self.log = gr.Textbox(label="Messages", lines=3, max_lines=8, interactive=False)
        self.queue = gr.Dataframe(headers=["#", "name", "state", "step", "loss", "output / error"],
                                  interactive=False, label="Jobs", elem_id="queue")
        self.seen = gr.State(None)
        self.timer = gr.Timer(1.0)

    # ------------------------------------------------------------ events
    def wire(self, demo: gr.Blocks) -> None:
        values = self.form.components
        self.upload.upload(self.on_upload, [self.upload, self.name, self.masks],
                           [self.folder, self.captions, self.gallery])
        self.mask_upload.upload(self.on_mask_upload, [self.mask_upload, self.name, self.folder],
                                [self.masks, self.gallery])
        self.folder.blur(self.on_folder, [self.folder, self.masks], [self.captions, self.gallery])
        self.masks.blur(self.on_folder, [self.folder, self.masks], [self.captions, self.gallery])
        self.captions.input(self.on_captions, [self.folder, self.captions, self.masks], [self.gallery])
        self.method.change(self.on_method, [self.method], [self.prior_group, self.pivotal_group])
        run_inputs = [self.name, self.method] + values
        self.start_btn.click(self.on_start, run_inputs, [self.status, self.job_pick, self.seen])
        self.resume_btn.click(self.on_resume, run_inputs, [self.status, self.job_pick, self.seen])
        self.stop_btn.click(self.on_stop, [], [self.seen])
        self.sample_now_btn.click(self.on_sample_now, [], [self.seen])
        self.save_now_btn.click(self.on_save_now, [], [self.seen])
        self.caption_btn.click(self.on_caption, [self.folder, self.captioner, self.caption_prefix],
                               [self.captions, self.gallery])
        self.save_btn.click(self.on_save, run_inputs, [self.settings_file])
        self.load_btn.upload(self.on_load, [self.load_btn], [self.name, self.method] + values)
        watch = [self.status, self.loss_plot, self.samples, self.log, self.queue, self.job_pick, self.seen]
        self.timer.tick(self.on_tick, [self.job_pick, self.seen], watch, show_progress="hidden")
        demo.load(self.on_tick, [self.job_pick, self.seen], watch, show_progress="hidden")

    def on_mask_upload(self, files, name, folder):
        masks = self.manager.output_dir / safe_name(name, "lora") / "masks"
        if not import_uploads(files or [], masks):
            gr.Warning("No images in the mask upload.")
        try:
            folder = str(self.manager.allowed.path(folder, "image folder")) if folder else ""
        except SdloraError:
            folder = ""
        return str(masks), thumbnails(folder, dataset_rows(folder), str(masks)) if folder else []

    def on_upload(self, files, name, masks=""):
        folder = self.manager.output_dir / safe_name(name, "lora") / "images"
        copied = import_uploads(files or [], folder)
        if not copied:
            gr.Warning("No images in the upload (png, jpg, webp, bmp, gif, tif).")
        rows = dataset_rows(folder)
        return str(folder), rows, thumbnails(str(folder), rows, self._masks(masks))

    def _masks(self, masks: str) -> str:
        """A mask folder the page may show, or "" (a folder outside the allowed ones is not read)."""
        try:
            return str(self.manager.allowed.path(masks, "mask folder")) if masks else ""
        except SdloraError:
            return ""

    def on_folder(self, folder, masks=""):
        if not folder:
            return [], []
        try:
            folder = str(self.manager.allowed.path(folder, "image folder"))
        except SdloraError as e:
            gr.Warning(str(e))
            return [], []
        rows = dataset_rows(folder)
        if not rows:
            gr.Warning(f"No images found in {folder}")
        return rows, thumbnails(folder, rows, self._masks(masks))

    def on_captions(self, folder, rows, masks=""):
        try:
            folder = str(self.manager.allowed.path(folder, "image folder"))
            n = write_captions(folder, rows)
        except SdloraError as e:
            raise gr.Error(str(e)) from None
        gr.Info(f"Saved {n} caption file(s)")
        return thumbnails(folder, dataset_rows(folder), self._masks(masks))

    def on_method(self, method):
        return gr.update(visible=method == DREAMBOOTH), gr.update(visible=method == PIVOTAL)

    def on_start(self, name, method, *values, resume=False):
        try:
            cfg, name = self.make_config(name, method, values, resume)
        except SdloraError as e:
            gr.Warning(str(e))
            return _error_html(str(e)), gr.skip(), gr.skip()
        job = self.manager.submit(cfg, name, resume=resume)
        gr.Info(f"Queued job #{job.id} '{name}'")
        return gr.skip(), self._job_choices(LATEST), None  # the timer's next tick shows it

    def on_resume(self, name, method, *values):
        return self.on_start(name, method, *values, resume=True)

    def on_stop(self):
        if self.manager.stop() is None:
            gr.Warning("Nothing is training.")
        return None  # the timer's next tick redraws

    def on_sample_now(self):
        if self.manager.request("sample_now") is None:
            gr.Warning("Nothing is training.")
        return None

    def on_save_now(self):
        if self.manager.request("save_now") is None:
            gr.Warning("Nothing is training.")
        return None

    def on_caption(self, folder, captioner, prefix, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        from sdlora.captioning import caption_folder

        if not (captioner or "").strip():
            raise gr.Error("Give a captioner: a model folder or a hub id (e.g. a BLIP or Florence-2 model).")
        try:
            folder = str(self.manager.allowed.path(folder, "image folder"))
            report = caption_folder(folder, self.manager.allowed.model_path(captioner), prefix or "",
                                    progress=lambda done, total: progress((done, total), unit="images"))
        except SdloraError as e:
            raise gr.Error(str(e)) from None
        gr.Info(report.summary())
        rows = dataset_rows(folder)
        return rows, thumbnails(folder, rows)

    def on_save(self, name, method, *values):
        try:
            cfg, name = self.make_config(name, method, values, resume=True, check=False)
        except SdloraError as e:
            raise gr.Error(str(e)) from None
        path = Path(cfg.output.path).with_suffix(".toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cfg.to_toml())
        return gr.update(value=str(path), visible=True)

    def on_load(self, file):
        try:
            cfg = load_toml(file)
        except SdloraError as e:
            raise gr.Error(str(e)) from None
        method = DREAMBOOTH if cfg.prior.class_prompt else LORA
        if cfg.pivotal.token:
            method = PIVOTAL
        return [Path(cfg.output.path).stem, method] + self.form.values_of(cfg)

    def on_tick(self, pick, seen):
        job = self.manager.get(pick) if pick else self.manager.current()
        jobs = self.manager.jobs()
        sig = (job.id, job.version) if job else None, tuple((j.id, j.state) for j in jobs)
        if sig == seen:
            return [gr.skip()] * 6 + [seen]
        waiting = [j for j in self.manager.queued() if j is not job]
        return (progress.status_html(job, len(waiting)), progress.loss_frame(job),
                progress.sample_items(job), progress.messages_text(job), progress.queue_rows(jobs),
                self._job_choices(pick), sig)

    # ------------------------------------------------------------ helpers
    def _job_choices(self, value):
        choices = [("latest", LATEST)] + [(f"#{j.id} {j.name} ({j.state})", j.id) for j in self.manager.jobs()]
        return gr.update(choices=choices, value=value)

    def make_config(self, name, method, values, resume=False, check=True):
        """The Config of the form: page-set paths added, validated; the job name sanitized."""
        name = safe_name(name, "lora")
        out = self.manager.output_dir / name / f"{name}.safetensors"
        over = {("output", "path"): str(out), ("prior", "class_data"): ""}
        if method != DREAMBOOTH:
            over[("prior", "class_prompt")] = ""
        elif dict(zip(self.form.keys, values)).get(("prior", "mode")) == "images":
            over[("prior", "class_data")] = str(out.parent / "class_images")
        cfg = self.form.to_config(list(values), over)
        allowed = self.manager.allowed
        cfg.model.path = allowed.model_path(cfg.model.path)
        for folder in cfg.data:
            folder.path = str(allowed.path(folder.path, "image folder")) if folder.path else folder.path
            folder.masks = str(allowed.path(folder.masks, "mask folder")) if folder.masks else ""
            folder.inpaint_masks = str(allowed.path(folder.inpaint_masks, "inpainting mask folder")) \
                if folder.inpaint_masks else ""
        for key in ("sample_image", "sample_mask"):  # an inpainting base's sample image and mask
            value = getattr(cfg.inpaint, key)
            setattr(cfg.inpaint, key, str(allowed.path(value, f"inpaint {key.replace('_', ' ')}")) if value else "")
        if method != PIVOTAL:
            cfg.pivotal.token = ""  # pivotal tuning is on when it has a token
        if not cfg.sample.prompts and cfg.data and cfg.data[0].prompt:
            cfg.sample.prompts = [cfg.data[0].prompt]
        if check:
            _check_method(cfg, method)
            if not cfg.data:
                raise ConfigError("no training images: upload some or give an image folder")
            validate(cfg)
            if name in self.manager.busy_names():
                raise ConfigError(f"'{name}' is already queued or training; choose another name")
            if out.exists() and not resume:
                raise ConfigError(f"a LoRA named '{name}' exists ({out}); choose another name, or Resume it")
        return cfg, name


def _check_method(cfg, method: str) -> None:
    """A chosen method whose key setting is empty would silently train plain LoRA: say so instead."""
    if method == DREAMBOOTH and not cfg.prior.class_prompt:
        raise ConfigError("DreamBooth needs a class prompt (e.g. 'a photo of a dog')")
    if method == PIVOTAL and not cfg.pivotal.token:
        raise ConfigError("pivotal tuning needs a token to learn (e.g. '<s1>')")


def _error_html(message: str) -> str:
    return f'<div id="job-status" class="failed"><div class="job-error" style="color:#b91c1c"><b>Error:</b> ' \
           f'{html.escape(message)}</div></div>'
