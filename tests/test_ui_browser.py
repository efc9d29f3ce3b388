"""The web UI in a real headless Chromium (Debian's, driven by Python Playwright), on a tiny model and on the built-in
shapes-world model.

Screenshots go to $SDLORA_SCREENSHOTS (default: test-artifacts/ui in the checkout, git-ignored). Without Chromium the
tests skip, except under CI (the `CI` variable set), where they fail: a missing browser must not pass. The machine may
be busy: waits are on a job's own state (never on text an earlier job could also show) and long enough for load.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_images
from PIL import Image

from sdlora.config import DataFolder, load_toml
from sdlora.loras.files import read_lora, write_embedding
from sdlora.options import LORA, inapplicable, model_facts, options
from sdlora.paths import sample_data

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SDLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
TIMEOUT = 120_000  # ms; generous: the machine is shared
VIEWPORTS = [(1280, 800), (1920, 1080)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        message = f"Chromium not found at {CHROMIUM}: apt-get install chromium (never `playwright install`)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


LOADING = threading.Event()  # cleared by a test: the model "loads" until the test has seen the page say so
LOADING.set()


def slow_start(cfg, callbacks, commands, resume=False):
    """sdlora.train once LOADING is set, which stands in for a slow model download: until the steps begin, the page
    must say it is loading the model, not training."""
    from sdlora import train

    LOADING.wait(TIMEOUT / 1000)
    return train(cfg, callbacks, commands, resume=resume)


def serve_ui(output, model: str, roots: list, train_fn=None):
    from ui.app import serve
    from ui.jobs import JobManager

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    manager = JobManager(output, model=model, data_roots=roots, train_fn=train_fn)
    port = free_port()
    return f"http://127.0.0.1:{port}/", manager, serve(manager, port=port, block=False)


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    """The UI on the tiny model, as `sdlora ui --model TINY --data-root <pytest's temp folder>`."""
    url, manager, demo = serve_ui(tmp_path_factory.mktemp("ui-output"), tiny_model,
                                  [tmp_path_factory.getbasetemp()], slow_start)
    yield url, manager
    manager.close()
    demo.close()


@pytest.fixture(scope="module")
def builtin_app(tmp_path_factory):
    """The UI as a first-time user starts it: `sdlora ui`, the built-in shapes-world model."""
    url, manager, demo = serve_ui(tmp_path_factory.mktemp("ui-builtin"), "", [sample_data()])
    yield url, manager
    manager.close()
    demo.close()


@pytest.fixture(scope="module")
def shots():
    default = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"
    folder = Path(os.environ.get("SDLORA_SCREENSHOTS") or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def new_page(browser, url: str, size=(1280, 800)):
    page = browser.new_page(viewport={"width": size[0], "height": size[1]}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    page.wait_for_selector("#start")
    return page


@pytest.fixture(autouse=True)
def no_internal_error(tmp_path, monkeypatch):
    """No handler behind the page fails with an internal error (a bug) during a test: the error boundary would write
    its crash log here. (A toast is easy to miss: the memory estimate once crashed on batch size 0 unseen.)"""
    logs = tmp_path / "crash-logs"
    monkeypatch.setenv("SDLORA_LOG_DIR", str(logs))
    yield
    found = sorted(logs.glob("crash-*.log")) if logs.is_dir() else []
    assert not found, f"an internal error behind the page:\n{found[0].read_text()[-2000:] if found else ''}"


@pytest.fixture
def page(browser, app):
    page = new_page(browser, app[0])
    yield page
    page.close()


def field(page, elem_id: str):
    """The text or number input inside a Gradio component."""
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def set_value(page, elem_id: str, value, key: str = "Tab") -> None:
    from playwright.sync_api import expect

    box = field(page, elem_id)
    box.wait_for(state="visible")
    for _ in range(5):  # a freshly opened accordion may still be writing its initial values: type until it sticks
        box.fill(str(value))
        box.press(key)  # Gradio reads the value on blur / Enter
        page.wait_for_timeout(200)
        if box.input_value() == str(value):
            break
    expect(box).to_have_value(str(value))


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option").first.wait_for()
    mine = page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True)  # not another open list's
    (mine if mine.count() else page.get_by_role("option", name=option, exact=True)).first.click()
    page.wait_for_timeout(300)


def open_accordion(page, elem_id: str) -> None:
    acc = page.locator(f"#{elem_id}")
    content = acc.locator(":scope > [data-testid=accordion-content]")
    if not content.is_visible():
        acc.locator(":scope > button.label-wrap").click()
        content.wait_for(state="visible")


def open_group(page, key: str, more: bool = False) -> None:
    open_accordion(page, f"group-{key}")
    if more and page.locator(f"#more-{key}").is_visible():
        open_accordion(page, f"more-{key}")


def job_status(page, state: str, name: str):
    """The status box of job `name` in `state` (its CSS class; a text match could hit an earlier job's error, whose
    path may hold any word)."""
    return page.locator(f"#job-status.{state}").filter(has_text=name)


def wait_until(page, condition, what: str, job, seconds: float = 300) -> None:
    """Poll a condition on the server's side (the job's own state) while the page keeps running; the job's state
    and messages when it does not come."""
    for _ in range(int(seconds * 10)):
        if condition():
            return
        if job is not None and job.state not in ("running", "queued"):
            break
        page.wait_for_timeout(100)
    state = f"job {job.state} at step {job.step}, {job.error or ''} {job.messages[-5:]}" if job else ""
    raise AssertionError(f"no {what}: {state}")


def job_named(page, manager, name: str):
    wait_until(page, lambda: any(j.name == name for j in manager.jobs()), f"job {name}", None, 60)
    return next(j for j in reversed(manager.jobs()) if j.name == name)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


# every visible text carrier whose text is wider than its box (a label, help line, button, value or tab cut off)
CUT_OFF = """() => {
  const sel = '[data-testid="block-info"], .info-text, .label-text, .label-wrap > span, button:not(.label-wrap),'
    + ' [role=tab],'
    + ' input[type=text], input:not([type]), input[role=combobox], input[type=number], textarea, .prose li, h3';
  const out = [];
  for (const e of document.querySelectorAll(sel)) {
    if (!e.offsetParent || !e.getClientRects().length || e.closest('[aria-hidden=true]')) continue;
    if (e.scrollWidth > e.clientWidth + 1)
      out.push(`${e.closest('[id]') ? e.closest('[id]').id : '?'}: ${(e.value || e.innerText || '').slice(0, 60)}`
               + ` (${e.scrollWidth} > ${e.clientWidth})`);
  }
  return out;
}"""
# every visible input without a name a screen reader can say, or out of the keyboard's reach
UNNAMED = """() => {
  const out = [];
  for (const e of document.querySelectorAll('input, textarea, select, button')) {
    if (!e.offsetParent || e.type === 'file' || e.type === 'hidden' || e.closest('[aria-hidden=true]')) continue;
    const name = e.getAttribute('aria-label') || [...(e.labels || [])].map(l => l.innerText).join(' ').trim()
      || (e.innerText || '').trim() || e.title;
    if (!name || e.tabIndex < 0) out.push(`${e.closest('[id]') ? e.closest('[id]').id : '?'} ${e.tagName}`);
  }
  return out;
}"""


def test_first_time_path_on_the_built_in_model(browser, builtin_app, shots):
    """Upload the shipped star images, start with the preset the page picks, reload mid-run (the page shows the
    run's settings), Stop, Resume (the same job goes on), finish; the loss chart draws every step, and the Preview's
    scale sweep differs visibly between x0 and x1."""
    url, manager = builtin_app
    page = new_page(browser, url)
    demo = load_toml(sample_data() / "demo.toml")
    assert field(page, "preset").input_value() == "Shapes world · the demo's recipe"
    shown = [field(page, f"opt-{k}").input_value() for k in ("lora-rank", "optim-lr", "train-batch_size",
                                                             "augment-resolution", "lora-targets")]
    assert shown == [str(demo.lora.rank), repr(demo.optim.lr), str(demo.train.batch_size),
                     str(demo.augment.resolution), demo.lora.targets]
    assert page.locator("#opt-lora-train_text_encoder input").is_checked() == demo.lora.train_text_encoder
    set_value(page, "lora-name", "first-star")
    stars = sorted(str(p) for p in (sample_data() / "concepts" / "star").iterdir())
    page.locator("#upload input[type=file]").set_input_files(stars)
    page.wait_for_function("() => document.querySelectorAll('#dataset-gallery img').length >= 8")
    set_value(page, "opt-train-max_steps", 60)  # the demo's 2500 steps teach the star; 60 already change the image
    page.locator("#start").click()
    job = job_named(page, manager, "first-star")
    wait_until(page, lambda: job.begun and job.step >= 2, "first steps", job)
    page.reload()
    page.wait_for_selector("#start")
    page.wait_for_function("() => document.querySelector('#lora-name textarea').value === 'first-star'")
    assert field(page, "opt-train-max_steps").input_value() == "60"  # the run's settings, not the defaults
    assert field(page, "opt-data-path").input_value() == str(manager.output_dir / "first-star" / "images")
    page.locator("#stop").click()
    job_status(page, "stopped", "first-star").wait_for()
    stopped = job.step
    assert 0 < stopped < 60
    page.locator("#resume").click()
    job_status(page, "done", "first-star").wait_for()
    assert [j.name for j in manager.jobs()] == ["first-star"] and job.state == "done"  # the same job went on
    assert job.start_step == stopped and any("resumed from" in m for m in job.messages)
    points = page.evaluate("() => document.querySelector('#loss-chart polyline.loss-raw')"
                           ".getAttribute('points').trim().split(/\\s+/).length")
    assert points == len(job.losses) == 60
    page.screenshot(path=shots / "first-time-done.png", full_page=True)

    open_tab(page, "Preview")
    page.wait_for_function("() => document.querySelector('#preview-lora-0 input').value.includes('first-star')")
    set_value(page, "preview-prompt", "a red sks")
    page.locator("#preview-sweep").click()
    page.locator("#preview-grid img").wait_for()
    grid = max((manager.output_dir / "_previews").glob("grid_*.png"), key=lambda p: p.stat().st_mtime)
    cells = np.asarray(Image.open(grid).convert("RGB"), dtype=float)[-64:]  # the model's 64 px, x0 ... x1
    x0, x1 = cells[:, -5 * 64:-4 * 64], cells[:, -64:]
    assert np.abs(x1 - x0).mean() > 10, "the LoRA at x1 draws the same image as x0"
    natural, drawn = page.evaluate("() => { const i = document.querySelector('#preview-grid img');"
                                   " return [i.naturalWidth, i.clientWidth] }")
    assert drawn >= 2 * natural  # a 64-px result is drawn large, not tiny in a big panel
    page.screenshot(path=shots / "first-time-preview.png", full_page=True)
    page.close()


def test_page_is_grouped_readable_and_complete(browser, app, shots, tiny_model):
    """Every group open, at 1280x800 and 1920x1080: no label, help line, value or button cut off; every input named
    for screen readers and in the keyboard's reach; a screenshot of each group. Every config field is on the page
    exactly when it applies, fields appear and hide as the settings change, and the CLI flags are there on demand."""
    from ui.settings import initial_config

    page = new_page(browser, app[0])
    groups = ["images", "network", "learning", "noise", "validation", "samples", "output", "speed"]
    for key in groups:
        open_group(page, key, more=True)
        open_accordion(page, f"help-{key}")
    open_accordion(page, "captioning")
    for size in VIEWPORTS:
        page.set_viewport_size({"width": size[0], "height": size[1]})
        open_tab(page, "Train")
        page.wait_for_timeout(500)
        cut, unnamed = page.evaluate(CUT_OFF), page.evaluate(UNNAMED)
        assert not cut, f"{size}: " + "\n".join(cut)
        assert not unnamed, "\n".join(unnamed)
        save_groups(page, shots, groups, f"{size[0]}x{size[1]}")
        for tab in ("Preview", "Library", "Merge", "Compare"):
            open_tab(page, tab)
            page.wait_for_timeout(500)
            cut = page.evaluate(CUT_OFF)
            assert not cut, f"{tab} {size}: " + "\n".join(cut)
            if size == VIEWPORTS[0]:
                page.screenshot(path=shots / f"{tab.lower()}-{size[0]}x{size[1]}.png", full_page=True)
    open_tab(page, "Train")
    cfg = initial_config(tiny_model)[0]
    cfg.data = [DataFolder(path="images")]
    hidden = inapplicable(cfg, model_facts(tiny_model), LORA)
    placed_by_page = {("output", "path"), ("prior", "class_data")}
    ids = set(page.evaluate("() => [...document.querySelectorAll('[id^=opt-]')].filter(e => e.offsetParent)"
                            ".map(e => e.id)"))  # shown: rendered and not hidden
    on_page = {o.key for o in options() if f"opt-{o.section}-{o.field.name}" in ids}
    assert on_page == {o.key for o in options()} - set(hidden) - placed_by_page
    assert ("train", "huber_delta") in hidden and "Huber delta" in page.locator("#note-noise").inner_text()
    choose(page, "opt-train-loss", "huber")  # now they apply, and appear
    page.locator("#opt-train-huber_delta").wait_for()
    choose(page, "opt-lora-network", "loha")  # LoHa has no LoRA dropout and no LoRA+
    page.locator("#opt-lora-dropout").wait_for(state="hidden")
    assert "LoRA dropout" in page.locator("#note-network").inner_text()
    assert "--network-args" in page.locator("#help-network").inner_text()
    page.close()


def save_groups(page, shots, groups, tag: str) -> None:
    """One full-page screenshot, and each group cut out of it."""
    whole = shots / f"train-{tag}.png"
    page.screenshot(path=whole, full_page=True)
    boxes = page.evaluate("(keys) => keys.map(k => { const r = document.querySelector('#group-' + k)"
                          ".getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, r.right + scrollX,"
                          " r.bottom + scrollY] })", groups)
    with Image.open(whole) as im:
        for key, box in zip(groups, boxes):
            im.crop(tuple(round(v) for v in box)).save(shots / f"group-{key}-{tag}.png")


def test_errors_paths_uploads_and_renames(page, app, shots, tmp_path):
    """All errors at once, in words, each field marked (not in the job's status); a missing or refused folder said at
    once; an old error gone once images arrive; uploads follow a renamed LoRA; masks uploaded make their option
    apply; one edited caption writes one file; a message with '<s1>' keeps it; the trainer's own error reaches the
    job's status."""
    _, manager = app
    set_value(page, "lora-name", "checks")
    set_value(page, "opt-lora-rank", "abc")
    set_value(page, "opt-train-batch_size", 0)
    page.locator("#start").click()
    box = page.locator("#form-errors .form-errors")
    box.wait_for()
    text = box.inner_text()
    for message in ("Rank must be a whole number, got 'abc'", "Batch size must be > 0, got 0",
                    "No training images"):
        assert message in text
    assert "lora.rank" not in text and "No training images" not in page.locator("#status").inner_text()
    for elem in ("opt-lora-rank", "opt-train-batch_size", "opt-data-path"):
        assert "field-error" in page.locator(f"#{elem}").get_attribute("class")
    assert field(page, "opt-lora-rank").input_value() == "abc"  # kept on screen, not emptied
    page.screenshot(path=shots / "errors.png", full_page=True)
    set_value(page, "opt-lora-rank", 4)  # batch size still 0: the memory estimate says why it waits, no crash
    page.locator("#fit-box").filter(has_text="settings are valid (Batch size must be > 0").wait_for(state="attached")
    set_value(page, "opt-train-batch_size", 1)
    set_value(page, "opt-data-path", tmp_path / "no-such-folder", key="Enter")
    page.locator("#folder-status").filter(has_text="Folder not found").wait_for()
    set_value(page, "opt-data-path", "/etc", key="Enter")
    page.locator("#folder-status").filter(has_text="--data-root").wait_for()

    images = draw_images(tmp_path / "pick", n=2)
    page.locator("#upload input[type=file]").set_input_files(sorted(str(p) for p in images.glob("*")))
    page.wait_for_function("() => document.querySelectorAll('#dataset-gallery img').length >= 2")
    page.wait_for_function("() => !document.querySelector('#form-errors .form-errors')")  # the old error is gone
    set_value(page, "lora-name", "renamed")
    moved = manager.output_dir / "renamed" / "images"
    page.wait_for_function(f"() => document.querySelector('#opt-data-path input').value === {str(moved)!r}")
    assert sorted(p.name for p in moved.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt"]
    assert not (manager.output_dir / "checks" / "images").exists()

    masks = tmp_path / "pick_masks"  # masks uploaded beside the images, shown over them; their option now applies
    masks.mkdir()
    for p in images.glob("*.png"):
        m = Image.new("L", Image.open(p).size, 0)
        m.paste(255, (0, 0, m.width // 2, m.height))
        m.save(masks / p.name)
    open_group(page, "images", more=True)
    assert not page.locator("#opt-data-unmasked_weight").is_visible()  # no masks yet: it does nothing
    page.locator("#mask-upload input[type=file]").set_input_files(sorted(str(p) for p in masks.glob("*.png")))
    page.wait_for_function("() => document.querySelector('#dataset-gallery').innerText.includes('masked')")
    assert field(page, "opt-data-masks").input_value() == str(manager.output_dir / "renamed" / "masks")
    page.locator("#opt-data-unmasked_weight").wait_for()

    before = (moved / "img1.txt").stat().st_mtime_ns
    page.locator('#captions [data-testid="cell-0-1"]').dblclick()
    page.keyboard.press("Control+A")
    page.keyboard.type("a red sks circle")
    page.keyboard.press("Enter")
    page.get_by_text("Saved the caption of img0.png").first.wait_for()
    assert (moved / "img0.txt").read_text().strip() == "a red sks circle"
    assert (moved / "img1.txt").stat().st_mtime_ns == before  # the others are not rewritten

    page.get_by_label("Pivotal tuning").check()
    page.locator("#opt-pivotal-token").wait_for()
    page.locator("#start").click()
    page.locator("#form-errors").filter(has_text="(e.g. '<s1>')").wait_for()
    assert "field-error" in page.locator("#opt-pivotal-token").get_attribute("class")

    page.get_by_label("LoRA", exact=True).check()
    (tmp_path / "empty").mkdir()  # an existing folder without images: the trainer's own error reaches the page
    set_value(page, "opt-data-path", tmp_path / "empty")
    set_value(page, "opt-data-masks", "")
    set_value(page, "lora-name", "empty-folder")
    page.locator("#start").click()
    job_status(page, "failed", "empty-folder").wait_for()
    job = manager.jobs()[-1]
    assert job.state == "failed" and job.error in page.locator("#job-status .job-error").inner_text()
    # nothing of an earlier job stays under the new error: its loss, scores and samples are gone
    page.locator("#loss-chart.empty").wait_for()
    assert page.locator("#score-chart.empty").count() == 1 and page.locator("#samples img").count() == 0
    assert "Traceback" not in page.content()


def test_memory_fit_on_the_page(page, app):
    """The fit check's estimate for the page's settings; a typed GPU size it exceeds; its cheapest change applied by
    one click, after which it fits."""
    set_value(page, "opt-train-batch_size", 4)
    set_value(page, "opt-augment-resolution", 32)
    page.locator("#fit-box.fits").wait_for()
    open_group(page, "speed")
    assert not page.locator("#opt-train-gradient_checkpointing input").is_checked()
    set_value(page, "fit-vram", "100GB", key="Enter")  # the estimate for a CUDA GPU
    page.locator("#fit-box.fits").filter(has_text="the given memory").wait_for()
    peak = int(page.locator("#fit-box").get_attribute("data-bytes"))
    set_value(page, "fit-vram", f"{peak // 2**20 - 1}MB", key="Enter")  # a GPU a mebibyte short
    page.locator("#fit-box.nofit").filter(has_text="--gradient-checkpointing").wait_for()
    page.locator("#fit-apply").click()
    page.locator("#fit-box.fits").wait_for()
    assert page.locator("#opt-train-gradient_checkpointing input").is_checked()


def test_upload_train_watch_preview_download(page, app, shots, tmp_path):
    _, manager = app
    images = draw_images(tmp_path / "pick", n=3)
    set_value(page, "lora-name", "../../web lora")  # sanitized: no escape from the output folder
    page.locator("#upload input[type=file]").set_input_files(sorted(str(p) for p in images.glob("*.png")))
    page.wait_for_function("() => document.querySelectorAll('#dataset-gallery img').length >= 3")
    folder = manager.output_dir / "web_lora" / "images"
    assert field(page, "opt-data-path").input_value() == str(folder)
    set_value(page, "opt-data-prompt", "a red sks")
    set_value(page, "opt-train-max_steps", 8)
    set_value(page, "opt-augment-resolution", 32)
    set_value(page, "opt-optim-lr", 0.001)
    set_value(page, "opt-sample-every", 4)
    open_group(page, "samples")
    set_value(page, "opt-sample-steps", 2)
    page.locator("#save-settings").click()
    with page.expect_download() as info:
        page.locator("#settings-file a").first.click()
    settings = load_toml(info.value.path())  # the same TOML `sdlora train` reads
    assert (settings.train.max_steps, settings.sample.steps, settings.data[0].path) == (8, 2, str(folder))
    page.screenshot(path=shots / "train-setup.png", full_page=True)

    LOADING.clear()
    try:
        page.locator("#start").click()
        job_status(page, "loading", "web_lora").wait_for()  # not "Training · step 0" while the model loads
    finally:
        LOADING.set()
    page.reload()  # a closed or reloaded tab: the run goes on, and the page shows it again from the manager
    page.wait_for_selector("#start")
    job_status(page, "done", "web_lora").wait_for()
    assert "8 / 8" in page.locator("#job-status").inner_text()
    page.wait_for_function("() => document.querySelectorAll('#samples img').length >= 1")
    page.screenshot(path=shots / "train-done.png", full_page=True)
    out = manager.output_dir / "web_lora" / "web_lora.safetensors"
    assert out.is_file() and manager.jobs()[-1].state == "done"
    write_embedding(out.parent / "web_lora_emb.safetensors", "<s1>", {"clip_l": torch.zeros(1, 32)})  # pivotal's

    open_tab(page, "Preview")
    page.wait_for_function("() => document.querySelector('#preview-lora-0 input').value.includes('web_lora')")
    set_value(page, "preview-steps", 2)
    set_value(page, "preview-size", 64)
    page.locator("#preview-generate").click()
    page.locator("#preview-lora img").wait_for()
    page.locator("#preview-base img").wait_for()
    assert "Seed 0" in page.locator("#preview-status").inner_text()
    page.locator("#preview-lora-1 input").click()  # every slot offers LoRAs only, and an empty choice
    offered = [o.replace("✓", "").strip() for o in page.get_by_role("option").all_inner_texts()]  # ✓: the chosen
    assert "(none)" in offered and not any("_emb" in o for o in offered)
    page.keyboard.press("Escape")
    choose(page, "preview-lora-0", "(none)")  # a slot can be cleared, and stays cleared
    open_tab(page, "Library")
    open_tab(page, "Preview")
    page.wait_for_timeout(1000)
    assert field(page, "preview-lora-0").input_value() == "(none)"
    page.screenshot(path=shots / "preview.png", full_page=True)

    open_tab(page, "Library")
    page.locator("#library-summary").filter(has_text="Trigger words").wait_for()
    assert "sks" in page.locator("#library-summary").inner_text()
    with page.expect_download() as info:
        page.locator("#library-download").click()
    assert info.value.suggested_filename == "web_lora.safetensors"
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    tensors, meta = read_lora(path)
    assert any(k.endswith(".lora_down.weight") for k in tensors)
    assert meta["ss_network_dim"] == str(settings.lora.rank)
    open_accordion(page, "library-tools")
    page.get_by_role("button", name="Convert", exact=True).click()  # to kohya, which it is already: nothing written
    page.get_by_text("already in the kohya layout").wait_for()
    assert not (out.parent / "web_lora_kohya.safetensors").exists()
    page.screenshot(path=shots / "library.png", full_page=True)

    open_tab(page, "Merge")
    choose(page, "merge-lora-0", "web_lora/web_lora.safetensors")
    page.locator("#merge-go").click()
    page.get_by_text("Wrote merged/merged.safetensors").first.wait_for()  # said where it is seen
    page.locator("#merge-download").wait_for()
    assert read_lora(manager.output_dir / "merged" / "merged.safetensors")[0].keys() == tensors.keys()
    page.screenshot(path=shots / "merge.png", full_page=True)


def test_sample_now_and_save_now_on_a_running_job(page, app, shots, tmp_path):
    """The buttons reach the running loop: a sample at a step no schedule asked for, and a checkpoint that a Resume
    continues from (the same job, with the Steps raised on the page)."""
    _, manager = app
    images = draw_images(tmp_path / "now", n=2)
    set_value(page, "lora-name", "now-lora")
    set_value(page, "opt-data-path", images)
    set_value(page, "opt-data-prompt", "a red sks")
    set_value(page, "opt-train-max_steps", 4000)  # long enough to press the buttons while it runs
    set_value(page, "opt-augment-resolution", 32)
    set_value(page, "opt-sample-every", 0)  # samples at step 0 and at the end only, unless asked
    open_group(page, "samples")
    set_value(page, "opt-sample-steps", 2)
    page.locator("#start").click()
    job = job_named(page, manager, "now-lora")
    # The gallery may still show an earlier job's samples, so wait on this job's own list, then on the page.
    wait_until(page, lambda: job.samples, "step-0 sample", job)
    page.locator("#sample-now").click()
    wait_until(page, lambda: [s for s, _ in job.samples if s > 0], "asked-for sample", job)
    asked = [s for s, _ in job.samples if s > 0]
    assert asked and all(s < 4000 for s in asked)
    page.locator("#samples").get_by_text(f"step {asked[0]}").first.wait_for(state="attached")
    page.locator("#save-now").click()
    ckpts = manager.output_dir / "now-lora" / "now-lora_checkpoints"
    wait_until(page, lambda: list(ckpts.glob("step_*.pt")), "checkpoint", job)
    saved_step = int(sorted(ckpts.glob("step_*.pt"))[0].stem.split("_")[1])
    page.screenshot(path=shots / "sample-save-now.png", full_page=True)
    page.locator("#stop").click()
    job_status(page, "stopped", "now-lora").wait_for()
    set_value(page, "opt-train-max_steps", job.step + 3)  # the page shows this job: resume it, then finish soon
    page.locator("#resume").click()
    job_status(page, "done", "now-lora").wait_for()
    assert job.state == "done" and job.start_step >= saved_step and job.step == job.start_step + 3
    assert any("resumed from" in m for m in job.messages)


def test_image_scores_and_a_slider_on_the_built_in_model(browser, builtin_app, shots):
    """A short run with the shapes scorer on the shapes world: the score chart draws a point for each validation and
    part, the validation sheets and the checkpoint table (with the row --select-by picked) appear. Then the method
    "Slider / eraser": no images asked for, its prompts train a file, as `sdlora slider` does."""
    url, manager = builtin_app
    page = new_page(browser, url)
    set_value(page, "lora-name", "scored-star")
    stars = sorted(str(p) for p in (sample_data() / "concepts" / "star").iterdir())
    page.locator("#upload input[type=file]").set_input_files(stars)
    page.wait_for_function("() => document.querySelectorAll('#dataset-gallery img').length >= 8")
    set_value(page, "opt-train-max_steps", 4)
    set_value(page, "opt-sample-every", 0)
    open_group(page, "validation", more=True)
    assert field(page, "opt-validation-scorer").input_value() == "shapes"  # the preset's, the demo's
    set_value(page, "opt-validation-every", 2)
    set_value(page, "opt-validation-seeds", 1)
    set_value(page, "opt-validation-image_steps", 2)
    page.locator("#start").click()
    job = job_named(page, manager, "scored-star")
    job_status(page, "done", "scored-star").wait_for()
    assert job.state == "done" and [s for s, _ in job.scores] == [2, 4]
    points = page.locator("#score-chart circle.score-point")
    points.first.wait_for()
    assert points.count() == sum(len(p) for _, p in job.scores)
    assert page.locator("#score-chart line.score-best").count() == 1
    page.wait_for_function("() => document.querySelectorAll('#validation-images img').length >= 2")
    table = page.locator("#checkpoint-scores").inner_text()
    assert "best (images)" in table and "scored-star_best.safetensors" in table
    page.locator("#validation-view").scroll_into_view_if_needed()
    page.screenshot(path=shots / "image-scores.png", full_page=True)

    page.get_by_label("Slider / eraser").check()
    page.locator("#images-section").wait_for(state="hidden")  # prompts alone: no images asked for
    set_value(page, "lora-name", "bigger")
    set_value(page, "opt-slider-target", "a circle")
    set_value(page, "opt-slider-positive", "a big circle")
    set_value(page, "opt-train-max_steps", 2)
    open_group(page, "slider", more=True)
    set_value(page, "opt-slider-denoise_steps", 2)
    page.wait_for_function("() => document.querySelector('#applies-style').innerHTML"
                           ".includes('#opt-train-noise_offset')")  # the image objective's settings do nothing here
    page.screenshot(path=shots / "slider.png", full_page=True)
    page.locator("#start").click()
    slider = job_named(page, manager, "bigger")
    job_status(page, "done", "bigger").wait_for()
    assert slider.state == "done" and slider.cfg.is_slider and not slider.cfg.data
    assert read_lora(slider.output)[1]["modelspec.tags"] == "slider"
    page.close()
