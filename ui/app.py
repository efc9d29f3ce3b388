"""The web UI: `build_app(manager)` composes one file per tab; `serve` launches it with safe defaults."""

from __future__ import annotations

import gradio as gr

from .boundary import guard_handlers
from .compare_tab import CompareTab
from .jobs import JobManager
from .library_tab import LibraryTab
from .merge_tab import MergeTab
from .preview_tab import PreviewTab
from .train_tab import TrainTab

CSS = """
#job-status { padding: 10px 14px; border-radius: 8px; background: var(--block-background-fill);
              border: 1px solid var(--border-color-primary); }
#job-status progress { height: 14px; margin-top: 6px; }
#job-status.failed { border-color: #b91c1c; }
#job-status.done { border-color: #15803d; }
#job-status.loading { border-style: dashed; }
#form-errors .form-errors { color: #b91c1c; border: 1px solid #b91c1c; border-radius: 8px; padding: 6px 12px; }
#form-errors ul { margin: 4px 0 0 18px; }
.field-error textarea, .field-error input, .field-error .wrap-inner { outline: 2px solid #b91c1c; }
.field-error [data-testid="block-info"] + div, .field-error .info { color: #b91c1c; }
.folder-status { padding: 2px 4px; }
.folder-status.error { color: #b91c1c; }
.folder-status.ok { color: #15803d; }
#fit-box { padding: 8px 12px; border-radius: 8px; border: 1px solid var(--border-color-primary); }
#fit-box.fits { border-color: #15803d; }
#fit-box.nofit { border-color: #b91c1c; }
.group-note { font-size: 0.9em; opacity: 0.85; }
#applies-style { display: none; }
.option-check { min-width: min(240px, 100%) !important; flex: 1 1 240px !important; }
#loss-chart svg { max-height: 280px; }
.chart-legend { font-size: 0.85em; opacity: 0.8; }
/* small images (64 px models) are drawn large and sharp, not tiny in a big panel */
#preview-base img, #preview-lora img, #preview-grid img, #samples img, #library-samples img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""


def build_app(manager: JobManager) -> gr.Blocks:
    """The Blocks of the whole UI; every bit of state lives in `manager`, so reloaded pages see the same runs."""
    train, preview, library, merge = TrainTab(manager), PreviewTab(manager), LibraryTab(manager), MergeTab(manager)
    compare = CompareTab(manager)
    with gr.Blocks(title="sdlora") as demo:
        gr.Markdown(f"# sdlora · Stable Diffusion LoRA trainer\nOutput folder: `{manager.output_dir}`")
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train.build()
            with gr.Tab("Preview", id="preview", elem_id="tab-preview") as preview_tab:
                preview.build()
            with gr.Tab("Library", id="library", elem_id="tab-library") as library_tab:
                library.build()
            with gr.Tab("Merge", id="merge", elem_id="tab-merge") as merge_tab:
                merge.build()
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_tab:
                compare.build()
        train.wire(demo)
        preview.wire(demo, preview_tab)
        library.wire(demo, library_tab)
        merge.wire(demo, merge_tab)
        compare.wire(demo, compare_tab)
    return guard_handlers(demo)


def serve(manager: JobManager, host: str = "127.0.0.1", port: int | None = None, auth: tuple[str, str] | None = None,
          share: bool = False, block: bool = True) -> gr.Blocks:
    """Launch the UI: local-only unless `host` says otherwise, no public link unless `share` (which needs `auth`).

    Only the output folder (LoRAs, samples, previews) is served to the browser besides Gradio's uploads; logins are
    checked by `ui.auth.Login` (failures slowed down, locked out after five a minute).
    """
    from sdlora.errors import SdloraError

    from .auth import Login

    if share and not auth:
        raise SdloraError("--share makes a public link: it needs --auth USER:PASSWORD")
    manager.output_dir.mkdir(parents=True, exist_ok=True)
    demo = build_app(manager)
    demo.queue(default_concurrency_limit=2)
    login = Login(*auth) if auth else None
    demo.launch(server_name=host, server_port=port, auth=login, share=share, allowed_paths=[str(manager.output_dir)],
                prevent_thread_lock=not block, quiet=not block, css=CSS, footer_links=[])
    return demo


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); None when not given (an empty value is an error, not "no login")."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not (user and sep and password):
        from sdlora.errors import SdloraError

        raise SdloraError("--auth must be USER:PASSWORD")
    return user, password
