"""The web UI in a real headless Chromium (Debian's, driven by Python Playwright), on a tiny model.

Screenshots of each tab go to $SDLORA_SCREENSHOTS (default: a pytest temp folder). Without Chromium the
tests skip, except under CI (the `CI` variable set), where they fail: a missing browser must not pass.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from conftest import draw_images

from sdlora.config import load_toml
from sdlora.loras.files import read_lora

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SDLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
TIMEOUT = 60_000  # ms; the tiny model trains 8 steps in a few seconds


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


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    """The UI served in this process on a free local port, with an output folder in tmp."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ui.app import serve
    from ui.jobs import JobManager

    # as `sdlora ui --data-root <pytest's temp folder>`: the tests' image folders may be typed into the page
    manager = JobManager(tmp_path_factory.mktemp("ui-output"), model=tiny_model,
                         data_roots=[tmp_path_factory.getbasetemp()])
    port = free_port()
    demo = serve(manager, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", manager
    manager.close()
    demo.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("SDLORA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, app):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT)
    page.goto(app[0])
    page.wait_for_selector("#start")
    yield page
    page.close()


def field(page, elem_id: str):
    """The text or number input inside a Gradio component."""
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def set_value(page, elem_id: str, value) -> None:
    from playwright.sync_api import expect

    box = field(page, elem_id)
    box.wait_for(state="visible")
    for _ in range(5):  # a freshly opened accordion may still be writing its initial values: type until it sticks
        box.fill(str(value))
        box.press("Tab")  # Gradio reads the value on input/blur
        page.wait_for_timeout(200)
        if box.input_value() == str(value):
            break
    expect(box).to_have_value(str(value))


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
        if job.state != "running":
            break
        page.wait_for_timeout(100)
    raise AssertionError(f"no {what}: job {job.state} at step {job.step}, {job.error or ''} {job.messages[-5:]}")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_upload_train_watch_preview_download(page, app, shots, tmp_path):
    _, manager = app
    images = draw_images(tmp_path / "pick", n=3)
    set_value(page, "lora-name", "../../web lora")  # sanitized: no escape from the output folder
    page.locator("#upload input[type=file]").set_input_files(sorted(str(p) for p in images.glob("*.png")))
    page.wait_for_function("() => document.querySelectorAll('#dataset-gallery img').length >= 3")
    folder = manager.output_dir / "web_lora" / "images"
    assert field(page, "opt-data-path").input_value() == str(folder)
    page.locator('#captions [data-testid="cell-0-1"]').dblclick()  # edit a caption in place
    page.keyboard.type("a red sks circle")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#dataset-gallery').innerText.includes('circle')")
    assert (folder / "img0.txt").read_text().strip() == "a red sks circle"
    set_value(page, "opt-data-prompt", "a red sks")
    set_value(page, "opt-train-max_steps", 8)
    set_value(page, "opt-augment-resolution", 32)
    set_value(page, "opt-optim-lr", 0.001)
    set_value(page, "opt-sample-every", 4)
    page.get_by_text("Advanced", exact=True).click()
    set_value(page, "opt-sample-steps", 2)
    page.get_by_role("button", name="Save settings (TOML)").click()
    with page.expect_download() as info:
        page.locator("#settings-file a").first.click()
    settings = load_toml(info.value.path())  # the same TOML `sdlora train` reads
    assert (settings.train.max_steps, settings.sample.steps, settings.data[0].path) == (8, 2, str(folder))
    page.screenshot(path=shots / "train-setup.png", full_page=True)

    page.locator("#start").click()
    page.locator("#job-status").filter(has_text="web_lora").wait_for()
    page.reload()  # a closed or reloaded tab: the run goes on, and the page shows it again from the manager
    page.wait_for_selector("#start")
    status = page.locator("#job-status")
    job_status(page, "done", "web_lora").wait_for()
    assert "8 / 8" in status.inner_text()
    page.wait_for_function("() => document.querySelectorAll('#samples img').length >= 1")
    page.wait_for_timeout(500)  # let the loss plot draw
    page.screenshot(path=shots / "train-done.png", full_page=True)
    out = manager.output_dir / "web_lora" / "web_lora.safetensors"
    assert out.is_file() and manager.jobs()[-1].state == "done"

    open_tab(page, "Preview")
    page.wait_for_function("() => document.querySelector('#preview-lora-0 input').value.includes('web_lora')")
    set_value(page, "preview-steps", 2)
    set_value(page, "preview-size", 64)
    page.locator("#preview-generate").click()
    page.locator("#preview-lora img").wait_for()
    page.locator("#preview-base img").wait_for()
    assert "Seed 0" in page.locator("#preview-status").inner_text()
    page.locator("#preview-sweep").click()
    page.locator("#preview-grid img").wait_for()
    page.screenshot(path=shots / "preview.png", full_page=True)

    open_tab(page, "Library")
    page.locator("#library-summary").filter(has_text="layout: kohya").wait_for()
    with page.expect_download() as info:
        page.locator("#library-download a").first.click()
    assert info.value.suggested_filename == "web_lora.safetensors"
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    page.screenshot(path=shots / "library.png", full_page=True)
    tensors, meta = read_lora(path)
    assert any(k.endswith(".lora_down.weight") for k in tensors) and meta["ss_network_dim"] == "4"

    open_tab(page, "Merge")
    page.locator("#merge-lora-0 input").click()
    page.get_by_role("option", name="web_lora/web_lora.safetensors").click()
    page.locator("#merge-go").click()
    page.locator("#merge-download a").first.wait_for()
    assert read_lora(manager.output_dir / "merged" / "merged.safetensors")[0].keys() == tensors.keys()
    page.screenshot(path=shots / "merge.png", full_page=True)


def test_training_without_images_shows_the_error(page, app, shots, tmp_path):
    _, manager = app
    set_value(page, "lora-name", "no-images")
    page.locator("#start").click()
    error = page.locator("#job-status .job-error")
    error.wait_for()
    assert "no training images" in error.inner_text()
    assert "Traceback" not in page.content()
    page.screenshot(path=shots / "error-no-images.png", full_page=True)

    set_value(page, "opt-data-path", "/etc")  # outside the output folder and the data roots: refused in one line
    set_value(page, "opt-augment-resolution", 32)
    page.locator("#start").click()
    page.locator("#job-status .job-error").filter(has_text="outside the folders this UI may use").wait_for()
    assert "Traceback" not in page.content()

    (tmp_path / "empty").mkdir()  # an existing folder without images: the trainer's own error reaches the page
    set_value(page, "opt-data-path", tmp_path / "empty")
    set_value(page, "opt-augment-resolution", 32)
    page.locator("#start").click()
    page.locator("#job-status.failed").filter(has_text="no-images").wait_for()
    job = manager.jobs()[-1]
    assert job.state == "failed" and job.error in page.locator("#job-status .job-error").inner_text()
    page.screenshot(path=shots / "error-empty-folder.png", full_page=True)


def test_sample_now_and_save_now_on_a_running_job(page, app, shots, tmp_path):
    """The buttons reach the running loop: a sample at a step no schedule asked for, and a checkpoint that a Resume
    continues from."""
    _, manager = app
    images = draw_images(tmp_path / "now", n=2)
    set_value(page, "lora-name", "now-lora")
    set_value(page, "opt-data-path", images)
    set_value(page, "opt-data-prompt", "a red sks")
    set_value(page, "opt-train-max_steps", 4000)  # long enough to press the buttons while it runs
    set_value(page, "opt-augment-resolution", 32)
    set_value(page, "opt-sample-every", 0)  # samples at step 0 and at the end only, unless asked
    page.get_by_text("Advanced", exact=True).click()
    set_value(page, "opt-sample-steps", 2)
    page.locator("#start").click()
    job_status(page, "running", "now-lora").wait_for()
    job = manager.current()
    assert job.name == "now-lora" and job.state == "running"
    # The gallery may still show an earlier job's samples, so wait on this job's own list, then on the page.
    wait_until(page, lambda: job.samples, "step-0 sample", job)
    page.locator("#sample-now").click()
    wait_until(page, lambda: [s for s, _ in job.samples if s > 0], "asked-for sample", job)
    asked = [s for s, _ in job.samples if s > 0]
    assert asked and all(s < 4000 for s in asked)
    page.locator("#samples").get_by_text(f"step {asked[0]}").first.wait_for(state="attached")
    page.locator("#save-now").click()
    ckpts = manager.output_dir / "now-lora" / "now-lora_checkpoints"
    page.wait_for_function("() => document.querySelector('#job-status') !== null")
    for _ in range(600):
        if list(ckpts.glob("step_*.pt")):
            break
        page.wait_for_timeout(100)
    saved = sorted(ckpts.glob("step_*.pt"))
    assert saved, "Save now wrote no checkpoint"
    saved_step = int(saved[0].stem.split("_")[1])
    page.screenshot(path=shots / "sample-save-now.png", full_page=True)
    page.locator("#stop").click()
    job_status(page, "stopped", "now-lora").wait_for()
    set_value(page, "opt-train-max_steps", job.step + 3)  # resume, then finish soon
    page.locator("#resume").click()
    job_status(page, "done", "now-lora").wait_for()
    resumed = manager.current()
    assert resumed.id != job.id and resumed.start_step >= saved_step and resumed.state == "done"
    assert any("resumed from" in m for m in resumed.messages)


def test_masks_upload_beside_images_and_show_over_them(page, app, shots, tmp_path):
    from PIL import Image

    _, manager = app
    images = draw_images(tmp_path / "mpick", n=2)
    masks = tmp_path / "mpick_masks"
    masks.mkdir()
    for p in images.glob("*.png"):
        m = Image.new("L", Image.open(p).size, 0)
        m.paste(255, (0, 0, m.width // 2, m.height))
        m.save(masks / p.name)
    set_value(page, "lora-name", "masked-lora")
    page.locator("#upload input[type=file]").set_input_files(sorted(str(p) for p in images.glob("*.png")))
    page.wait_for_function("() => document.querySelectorAll('#dataset-gallery img').length >= 2")
    page.locator("#mask-upload input[type=file]").set_input_files(sorted(str(p) for p in masks.glob("*.png")))
    page.wait_for_function("() => document.querySelector('#dataset-gallery').innerText.includes('masked')")
    folder = manager.output_dir / "masked-lora" / "masks"
    assert field(page, "opt-data-masks").input_value() == str(folder)
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(p.name for p in masks.glob("*.png"))
    page.screenshot(path=shots / "masks.png", full_page=True)
