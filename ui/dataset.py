"""The images of the Train tab: uploads (moved along when the LoRA is renamed), a typed folder (said at once when it
is missing or not allowed), the gallery, captions edited in place (only the changed file written), masks, and
automatic captions (errors beside the button; the images stay on screen)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.training.inputs.data import Example, load_mask, mask_file

from . import notify
from .files import dataset_rows, import_uploads, move_uploads, safe_name, write_captions


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


def _status(text: str = "", kind: str = "") -> str:
    return f'<div class="folder-status {kind}">{text}</div>' if text else ""


class DatasetSection:
    def __init__(self, manager, settings):
        self.manager, self.settings = manager, settings

    def build(self) -> None:
        s = self.settings
        with gr.Row(equal_height=False):
            self.upload = gr.File(label="Upload images (and .txt captions)", file_count="multiple",
                                  file_types=["image", ".txt"], elem_id="upload", scale=1, min_width=260,
                                  height=190)
            with gr.Column(scale=2, min_width=320):
                self.folder = s.add("data", "path")
                self.prompt = s.add("data", "prompt", value="a photo of sks")
                self.folder_status = gr.HTML("", elem_id="folder-status")
        self.gallery = gr.Gallery(label="Images", columns=8, height=200, fit_columns=False, object_fit="contain",
                                  elem_id="dataset-gallery")
        self.captions = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], type="array",
                                     interactive=True, static_columns=[0], elem_id="captions",
                                     label="Captions (edit a cell: it is saved to the image's .txt file)")

    def build_group_extra(self) -> None:
        """Masks and automatic captions, at the top of the "Images and captions" group."""
        with gr.Row(equal_height=False):
            self.mask_upload = gr.File(label="Upload masks (named like their images)", file_count="multiple",
                                       file_types=["image"], elem_id="mask-upload", min_width=260, height=190)
            self.masks = self.settings.add("data", "masks")
        with gr.Accordion("Caption images automatically", open=False, elem_id="captioning"):
            with gr.Row(equal_height=False):
                self.captioner = gr.Textbox(label="Captioner", elem_id="captioner", scale=3, min_width=260,
                                            info="A BLIP, Florence-2 or small vision-language model: folder or hub id.")
                self.caption_prefix = gr.Textbox(label="Prefix", value="", placeholder="e.g. sks, ", min_width=160)
                self.overwrite = gr.Checkbox(label="Overwrite existing captions", value=False, min_width=200,
                                             elem_id="caption-overwrite")
            self.caption_btn = gr.Button("Caption images", elem_id="caption-images")
            self.caption_status = gr.HTML("", elem_id="caption-status")

    # ------------------------------------------------------------ events
    def wire(self, name, last_name, form_errors, redraw: list[dict]) -> None:
        """`redraw`: the events that follow a change of the folders (what applies, the memory estimate)."""
        view = [self.captions, self.gallery, self.folder_status]
        # What reads or moves the folders runs one at a time, in the order it was asked for: a folder field's blur
        # (leaving it for the name field) must read the folder before a rename moves the uploads away from it.
        one = dict(concurrency_limit=1, concurrency_id="dataset")
        uploads = [self.upload.upload(self.on_upload, [self.upload, name, self.masks],
                                      [self.folder] + view + [form_errors], **one),
                   self.mask_upload.upload(self.on_mask_upload, [self.mask_upload, name, self.folder],
                                           [self.masks, self.gallery], **one)]
        for event in uploads:
            for then in redraw:
                event = event.then(**then)
        gr.on([self.folder.blur, self.folder.submit, self.masks.blur, self.masks.submit], self.on_folder,
              [self.folder, self.masks], view, **one)
        self.captions.input(self.on_captions, [self.folder, self.captions, self.masks], [self.gallery],
                            trigger_mode="always_last")
        self.caption_btn.click(self.on_caption, [self.folder, self.captioner, self.caption_prefix, self.overwrite,
                                                 self.masks], [self.captions, self.gallery, self.caption_status],
                               show_progress_on=[self.caption_status])
        gr.on([name.blur, name.submit], self.on_rename, [name, last_name, self.folder, self.masks],
              [self.folder, self.masks, last_name], show_progress="hidden", **one).then(
            self.on_folder, [self.folder, self.masks], view, show_progress="hidden", **one)

    def _allowed(self, folder: str, what: str) -> str:
        return str(self.manager.allowed.path(folder, what)) if folder else ""

    def _masks(self, masks: str) -> str:
        """A mask folder the page may show, or "" (a folder outside the allowed ones is not read)."""
        try:
            return self._allowed(masks, "mask folder")
        except SdloraError:
            return ""

    def on_upload(self, files, name, masks=""):
        folder = self.manager.output_dir / safe_name(name, "lora") / "images"
        if not import_uploads(files or [], folder):
            notify.warn("No images in the upload (png, jpg, webp, bmp, gif, tif).")
        rows = dataset_rows(folder)
        return str(folder), rows, thumbnails(str(folder), rows, self._masks(masks)), _count(rows), ""

    def on_mask_upload(self, files, name, folder):
        masks = self.manager.output_dir / safe_name(name, "lora") / "masks"
        if not import_uploads(files or [], masks):
            notify.warn("No images in the mask upload.")
        try:
            folder = self._allowed(folder, "image folder")
        except SdloraError:
            folder = ""
        return str(masks), thumbnails(folder, dataset_rows(folder), str(masks)) if folder else []

    def on_folder(self, folder, masks=""):
        """The folder's images, or at once why there are none (missing, not allowed, empty)."""
        if not (folder or "").strip():
            return [], [], ""
        try:
            folder = self._allowed(folder, "image folder")
        except SdloraError as e:
            return [], [], _status(str(e), "error")
        if not Path(folder).is_dir():
            return [], [], _status(f"Folder not found: {folder}", "error")
        rows = dataset_rows(folder)
        if not rows:
            return [], [], _status(f"No images in {folder} (png, jpg, webp, bmp, gif, tif).", "error")
        return rows, thumbnails(folder, rows, self._masks(masks)), _count(rows)

    def on_captions(self, folder, rows, masks=""):
        try:
            folder = self._allowed(folder, "image folder")
            written = write_captions(folder, rows)
        except SdloraError as e:
            raise notify.error(str(e)) from None
        if not written:
            return gr.skip()
        notify.info(f"Saved the caption of {written[0]}" if len(written) == 1 else
                    f"Saved {len(written)} captions")
        return thumbnails(folder, dataset_rows(folder), self._masks(masks))

    def on_caption(self, folder, captioner, prefix, overwrite, masks="", progress=gr.Progress()):  # noqa: B008
        """Captions from a model; whatever goes wrong is said beside the button, and the images stay."""
        from sdlora.captioning import caption_folder

        try:
            folder, model = self._caption_inputs(folder, captioner)
            rows = dataset_rows(folder)
            if not overwrite and rows and all(caption for _, caption in rows):
                return gr.skip(), gr.skip(), _status(f"All {len(rows)} images have a caption; tick <b>Overwrite "
                                                     "existing captions</b> to caption them again.", "note")
            where = "" if Path(model).exists() else " (from the hub: the first time downloads it)"
            progress(0, desc=f"Loading the captioner{where} …")
            report = caption_folder(folder, model, prefix or "", overwrite=bool(overwrite),
                                    progress=lambda done, total: progress((done, total), unit="images"))
        except SdloraError as e:
            return gr.skip(), gr.skip(), _status(f"Captioning failed: {e}", "error")
        rows = dataset_rows(folder)
        return rows, thumbnails(folder, rows, self._masks(masks)), _status(report.summary().capitalize(), "ok")

    def _caption_inputs(self, folder: str, captioner: str) -> tuple[str, str]:
        if not (captioner or "").strip():
            raise SdloraError("give a captioner: a model folder or a hub id (e.g. a BLIP or Florence-2 model)")
        if not (folder or "").strip():
            raise SdloraError("no images yet: upload some or give an image folder")
        return self._allowed(folder, "image folder"), self.manager.allowed.model_path(captioner)

    def on_rename(self, name, last, folder, masks):
        """Uploads made under the previous name follow the LoRA to its new folder."""
        new, old = safe_name(name, "lora"), safe_name(last or name, "lora")
        if new == old:
            return gr.skip(), gr.skip(), new
        folder, masks = move_uploads(self.manager.output_dir, old, new, folder or "", masks or "")
        return folder, masks, new


def _count(rows) -> str:
    captioned = sum(1 for _, c in rows if c)
    return _status(f"{len(rows)} images, {captioned} with a caption.", "ok") if rows else ""
