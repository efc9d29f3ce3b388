"""Start, stop and resume training, and watch it: the settings become a Config (every error at once, named by its
label and marked on its field), jobs are queued in the `JobManager`, and the page polls the chosen job. A reloaded
page shows the current job's settings, and Resume continues the chosen job from its own saved config."""

from __future__ import annotations

import copy
import html

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.options import DREAMBOOTH, METHODS, PIVOTAL, SLIDER, check, field_errors, method_of

from . import notify, progress
from .chart import loss_chart, score_chart
from .files import safe_name
from .form import classes
from .jobs import FINISHED
from .settings import for_method

LATEST = 0  # job selector value: "whatever runs now, else the newest"


class FormError(Exception):
    """What is wrong with the page's settings: {field: message} and messages that name no field."""

    def __init__(self, fields: dict, general: list[str] | None = None):
        super().__init__("; ".join(list(fields.values()) + (general or [])))
        self.fields, self.general = fields, general or []


class RunSection:
    def __init__(self, manager, form, settings):
        self.manager, self.form, self.settings = manager, form, settings

    def build(self) -> None:
        with gr.Row(equal_height=False):
            self.start_btn = gr.Button("Start training", variant="primary", elem_id="start", min_width=160)
            self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", min_width=120)
            self.resume_btn = gr.Button("Resume", elem_id="resume", min_width=120)
            self.job_pick = gr.Dropdown(choices=[("latest", LATEST)], value=LATEST, label="Show job",
                                        elem_id="job-pick", min_width=220,
                                        info="Its settings are loaded into the form; Resume continues it.")
        self.errors = gr.HTML("", elem_id="form-errors")
        with gr.Row():
            self.sample_now_btn = gr.Button("Sample now", size="sm", elem_id="sample-now")
            self.save_now_btn = gr.Button("Save now (resumable checkpoint)", size="sm", elem_id="save-now")
        self.status = gr.HTML(progress.status_html(None), elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                gr.Markdown("**Loss**")
                self.chart = gr.HTML(loss_chart([], []), elem_id="loss-plot")
            self.samples = gr.Gallery(label="Samples (newest first)", columns=3, height=280, fit_columns=False,
                                      elem_id="samples", object_fit="contain", scale=1, min_width=320)
        with gr.Accordion("Image validation: scores, images and the checkpoints", open=True, elem_id="validation-view"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=320):
                    gr.Markdown("**Image scores** (higher is better; copying: lower)")
                    self.score_chart = gr.HTML(score_chart([]), elem_id="score-plot")
                self.val_images = gr.Gallery(label="Validation images (newest first; a row per prompt)", columns=1,
                                             height=280, elem_id="validation-images", object_fit="contain",
                                             scale=1, min_width=320)
            self.checkpoints = gr.Dataframe(headers=progress.SCORE_COLUMNS, interactive=False, wrap=True,
                                            label="Checkpoints and their scores (the row --select-by picked is marked)",
                                            elem_id="checkpoint-scores")
        self.log = gr.Textbox(label="Messages", lines=3, max_lines=8, interactive=False, elem_id="messages")
        self.queue = gr.Dataframe(headers=["#", "name", "state", "step", "loss", "output / error"],
                                  interactive=False, label="Jobs", elem_id="queue", wrap=True)
        self.seen = gr.State(None)
        self.timer = gr.Timer(1.0)

    # ------------------------------------------------------------ events
    def wire(self, demo, name, method, last_name):
        """The events; returns those that load a job's settings into the form (to show its images after)."""
        comps = self.form.components
        marked = [self.errors] + comps + list(self.settings.accordions.values())
        run_in = [self.job_pick, name, method] + comps
        self.start_btn.click(self.on_start, run_in, [self.job_pick, self.seen] + marked)
        self.resume_btn.click(self.on_resume, run_in, [self.job_pick, self.seen] + marked)
        self.stop_btn.click(self.on_stop, [], [self.seen])
        self.sample_now_btn.click(self.on_command("sample_now"), [], [self.seen])
        self.save_now_btn.click(self.on_command("save_now"), [], [self.seen])
        watch = [self.status, self.chart, self.samples, self.score_chart, self.val_images, self.checkpoints,
                 self.log, self.queue, self.job_pick, self.seen]
        self.timer.tick(self.on_tick, [self.job_pick, self.seen], watch, show_progress="hidden")
        demo.load(self.on_tick, [self.job_pick, self.seen], watch, show_progress="hidden")
        shown = [name, method, last_name] + comps
        settings = self.settings.settings_args(comps[self.form.keys.index(("model", "path"))], method)
        loaded = demo.load(self.on_page_load, [], shown, show_progress="hidden").then(**settings)
        loaded.then(**self.settings.fit_args)
        picked = self.job_pick.input(self.on_pick, [self.job_pick], shown, show_progress="hidden").then(**settings)
        return loaded, picked

    # ------------------------------------------------------------ the form as a Config
    def make_config(self, name, method, values, resume=False, check_all=True):
        """The Config of the form, with the paths the page sets; FormError with every problem found."""
        name = safe_name(name, "lora")
        out = self.manager.output_dir / name / f"{name}.safetensors"
        over = {("output", "path"): str(out), ("prior", "class_data"): ""}
        given = dict(zip(self.form.keys, values))
        if method != DREAMBOOTH:
            over[("prior", "class_prompt")] = ""
        elif given.get(("prior", "mode")) == "images":
            over[("prior", "class_data")] = str(out.parent / "class_images")
        if method != PIVOTAL:
            over[("pivotal", "token")] = ""  # pivotal tuning is on when it has a token
        cfg, errors = self.form.read(values, over)
        for_method(cfg, method, errors)
        self.settings.clean(cfg, method, errors)  # what the page hides does nothing: it neither trains nor blocks
        errors.update(self._paths(cfg))
        if not cfg.sample.prompts and cfg.data and cfg.data[0].prompt:
            cfg.sample.prompts = [cfg.data[0].prompt]
        general = self._checks(cfg, name, method, errors, resume) if check_all else []
        if errors or general:
            raise FormError(errors, general)
        return cfg, name

    def _paths(self, cfg) -> dict:
        allowed, errors = self.manager.allowed, {}
        try:
            cfg.model.path = allowed.model_path(cfg.model.path)
        except SdloraError as e:
            errors[("model", "path")] = str(e)
        for folder in cfg.data:
            for key, what in (("path", "image folder"), ("masks", "mask folder"),
                              ("inpaint_masks", "inpainting mask folder")):
                try:
                    value = getattr(folder, key)
                    setattr(folder, key, str(allowed.path(value, what)) if value else "")
                except SdloraError as e:
                    errors[("data", key)] = str(e)
        for key in ("sample_image", "sample_mask"):  # an inpainting base's sample image and mask
            try:
                value = getattr(cfg.inpaint, key)
                setattr(cfg.inpaint, key, str(allowed.path(value, f"inpaint {key.replace('_', ' ')}")) if value else "")
            except SdloraError as e:
                errors[("inpaint", key)] = str(e)
        return errors

    def _checks(self, cfg, name, method, errors, resume) -> list[str]:
        """Adds the fields' own errors to `errors`; the messages that name no field."""
        if method == DREAMBOOTH and not cfg.prior.class_prompt:
            errors[("prior", "class_prompt")] = "DreamBooth needs a class prompt (e.g. 'a photo of a dog')"
        if method == PIVOTAL and not cfg.pivotal.token:
            errors[("pivotal", "token")] = "Pivotal tuning needs a token to learn (e.g. '<s1>')"
        if method == SLIDER and not cfg.slider.target.strip():
            errors[("slider", "target")] = "A slider needs a target prompt, the prompt it acts on (e.g. 'a person')"
        if method != SLIDER and not cfg.data and ("data", "path") not in errors:
            errors[("data", "path")] = "No training images: upload some or give an image folder"
        for key, message in field_errors(cfg).items():
            errors.setdefault(key, message)
        general = []
        if not errors:  # the rules across fields, once every field is right on its own
            found, general = check(cfg)
            errors.update(found)
        if name in self.manager.busy_names():
            general.append(f"'{name}' is already queued or training; choose another name")
        out = self.manager.output_dir / name / f"{name}.safetensors"
        if out.exists() and not resume:
            general.append(f"A LoRA named '{name}' exists ({out}); choose another name, or Resume it")
        return general

    # ------------------------------------------------------------ errors on the page
    def marks(self, error: FormError | None) -> list:
        """The error box, each field marked (or cleared), and the groups holding a marked field opened."""
        fields = error.fields if error else {}
        box = ""
        if error:
            items = [f"<li><b>{html.escape(self._where(k))}</b>: {html.escape(m)}</li>" for k, m in fields.items()]
            items += [f"<li>{html.escape(m)}</li>" for m in error.general]
            box = f'<div class="form-errors" role="alert"><b>Fix these first:</b><ul>{"".join(items)}</ul></div>'
        out = [box]
        for key in self.form.keys:
            opt = self.form.options[key]
            out.append(gr.update(elem_classes=[*classes(opt), "field-error"], info=f"⚠ {fields[key]}")
                       if key in fields else gr.update(elem_classes=classes(opt), info=opt.short))
        groups = {self.form.options[k].group for k in fields}
        out += [gr.update(open=True) if g in groups else gr.skip() for g in self.settings.accordions]
        return out

    def _where(self, key) -> str:
        from sdlora.options import groups

        opt = self.form.options[key]
        title = next((g.title for g in groups() if g.key == opt.group), opt.group)
        return opt.label if opt.level == "first" else f"{title} › {opt.label}"

    # ------------------------------------------------------------ handlers
    def on_start(self, pick, name, method, *values):
        try:
            cfg, name = self.make_config(name, method, values)
        except FormError as e:
            return [gr.skip(), gr.skip()] + self.marks(e)
        job = self.manager.submit(cfg, name)
        notify.info(f"Queued job #{job.id} '{name}'")
        return [self._job_choices(LATEST), None] + self.marks(None)

    def on_resume(self, pick, name, method, *values):
        job = self._resumable(pick)
        if job is None:
            return [gr.skip(), gr.skip()] + self.marks(FormError({}, [
                "Nothing to resume: pick a stopped job in Show job (or Start a new one)"]))
        try:
            cfg = self._resume_config(job, name, method, values)
            self.manager.resume(job, cfg)
        except FormError as e:
            return [gr.skip(), gr.skip()] + self.marks(e)
        except SdloraError as e:
            return [gr.skip(), gr.skip()] + self.marks(FormError({}, [str(e)]))
        notify.info(f"Resuming job #{job.id} '{job.name}'")
        return [self._job_choices(job.id), None] + self.marks(None)

    def _resumable(self, pick):
        """The chosen job, or the newest one that has finished running."""
        if pick and pick != LATEST:
            return self.manager.get(pick)
        return next((j for j in reversed(self.manager.jobs()) if j.state in FINISHED), None)

    def _resume_config(self, job, name, method, values):
        """The page's settings when the page shows this job (so Steps can be raised before resuming), else the
        job's own saved config, whatever the page holds."""
        if safe_name(name, "lora") != job.name:
            return copy.deepcopy(job.cfg)
        return self.make_config(name, method, values, resume=True)[0]

    def on_stop(self):
        if self.manager.stop() is None:
            notify.warn("Nothing is training.")
        return None  # the timer's next tick redraws

    def on_command(self, command: str):
        def handler():
            if self.manager.request(command) is None:
                notify.warn("Nothing is training.")
            return None
        return handler

    def on_tick(self, pick, seen):
        job = self.manager.get(pick) if pick else self.manager.current()
        jobs = self.manager.jobs()
        sig = (job.id, job.version) if job else None, tuple((j.id, j.state) for j in jobs)
        if sig == seen:
            return [gr.skip()] * 9 + [seen]
        waiting = [j for j in self.manager.queued() if j is not job]
        chart = loss_chart(job.losses, job.val_losses) if job else loss_chart([], [])
        scores = score_chart(job.scores, job.best_step, job.cfg.select_by) if job else score_chart([])
        return (progress.status_html(job, len(waiting)), chart, progress.sample_items(job), scores,
                progress.validation_items(job), progress.checkpoint_rows(job), progress.messages_text(job),
                progress.queue_rows(jobs), self._job_choices(pick), sig)

    def on_page_load(self):
        """A reloaded page shows the settings of the job it shows (the running one, else the newest)."""
        job = self.manager.current()
        return self.shown(job) if job else [gr.skip()] * (3 + len(self.form.keys))

    def on_pick(self, pick):
        job = self.manager.get(pick) if pick else self.manager.current()
        return self.shown(job) if job else [gr.skip()] * (3 + len(self.form.keys))

    def shown(self, job) -> list:
        cfg = copy.deepcopy(job.cfg)
        method = method_of(cfg)
        if cfg.sample.prompts == [cfg.data[0].prompt if cfg.data else None]:
            cfg.sample.prompts = []  # the page filled it in from the instance prompt
        return [job.name, method if method in METHODS else METHODS[0], job.name] + self.form.values_of(cfg)

    def _job_choices(self, value):
        choices = [("latest", LATEST)] + [(f"#{j.id} {j.name} ({j.state})", j.id) for j in self.manager.jobs()]
        return gr.update(choices=choices, value=value)

