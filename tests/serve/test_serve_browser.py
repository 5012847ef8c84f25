"""``codi-lightning serve`` in a real browser: headless Chromium (Debian's ``chromium``)
driven by Playwright, against the command as users start it. Skipped, with the reason,
where Chromium, Playwright or the UI extra is missing (``.ci/run`` installs all three)."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from distributed.procwatch import free_port
from PIL import Image

CHROMIUM = os.environ.get("CODI_CHROMIUM") or shutil.which("chromium") or ""
MISSING = [
    name
    for name, ok in [
        ("Chromium (apt-get install chromium)", bool(CHROMIUM)),
        ("playwright (pip install playwright)", importlib.util.find_spec("playwright")),
        ("the UI extra (pip install -e '.[ui]')", importlib.util.find_spec("gradio")),
    ]
    if not ok
]
pytestmark = pytest.mark.skipif(bool(MISSING), reason="needs " + ", ".join(MISSING))
# the probe flags of a machine with no network: no background requests, no sandbox as root
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
START_TIMEOUT = 120  # seconds for the command to load the model and listen
RESULT_TIMEOUT = 60_000  # ms for a page to show a result


class Server:
    """``codi-lightning serve ARGS`` on a free local port, stopped at the end."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "codi_lightning", "serve", *args, "--port", str(self.port)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}):\n{log.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"serve did not listen in {START_TIMEOUT} s:\n{log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def run(tiny_pixel_teacher, tmp_path_factory):
    """A checkpoint, its export, and two example inputs (8x8, different digits)."""
    from helpers import write_checkpoint

    from codi_lightning.cli import main

    root = tmp_path_factory.mktemp("serve_browser")
    ckpt = root / "run.ckpt"
    write_checkpoint(tiny_pixel_teacher, ckpt, scale=0.05, pixel_space=True)
    main(["export", "--ckpt", str(ckpt), "--output", str(root / "exported")])
    examples = root / "examples"
    examples.mkdir()
    for i, box in enumerate([(2, 1, 5, 7), (1, 3, 7, 5)]):
        image = Image.new("RGB", (8, 8), (0, 0, 0))
        image.paste((230, 230, 230), box)
        image.save(examples / f"digit{i}.png")
    return {"ckpt": ckpt, "exported": root / "exported", "examples": examples, "root": root,
            "teacher": tiny_pixel_teacher}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_server(run):
    server = Server(["--ckpt_path", str(run["ckpt"]), "--upscale", "4",
                     "--examples", str(run["examples"])], run["root"] / "serve.log")  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, server):
    """A page of its own (a browser context: a separate session), with every request
    the page makes recorded."""
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.requested = []
    page.on("request", lambda r: page.requested.append(r.url))
    page.goto(server.url)
    page.wait_for_selector("#run", timeout=RESULT_TIMEOUT)
    return page


def upload(page, path: Path) -> None:
    """Put ``path`` in the upload box (clearing the file already there, as a user does)."""
    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count():
        clear.click()
    page.set_input_files("#upload input[type=file]", str(path))


def wait_for_status(page, text: str) -> str:
    page.wait_for_function(
        "t => document.querySelector('#status').innerText.includes(t)", arg=text,
        timeout=RESULT_TIMEOUT,
    )  # fmt: skip
    return page.inner_text("#status")


def output_image(page) -> Image.Image:
    """The output as the page shows it, fetched from the server like the browser did."""
    page.wait_for_function(
        "() => { const i = document.querySelector('#output-image img');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=RESULT_TIMEOUT,
    )  # fmt: skip
    src = page.get_attribute("#output-image img", "src")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def local_only(page, server) -> list[str]:
    """The page's requests that left the local server (none, offline)."""
    return [u for u in page.requested if not u.startswith((server.url, "data:", "blob:"))]


def test_an_uploaded_image_is_sampled_and_shown(browser, checkpoint_server, run):
    page = open_page(browser, checkpoint_server)
    source = run["examples"] / "digit0.png"
    upload(page, source)
    assert "32x32" in wait_for_status(page, "Ready")
    page.click("#run")
    status = wait_for_status(page, "Done")
    assert "4 steps:" in status and " s." in status
    out = output_image(page)
    assert out.size == (32, 32)  # 4x the 8x8 input
    bicubic = Image.open(source).convert("RGB").resize((32, 32), Image.BICUBIC)
    assert np.abs(np.asarray(out, float) - np.asarray(bicubic, float)).mean() > 1
    link = page.get_attribute("#download a", "href")
    assert link and page.request.get(link).ok  # the PNG to download
    # every step count side by side, each with its time
    page.click("#compare input")
    page.click("#run")
    assert "8 steps:" in wait_for_status(page, "8 steps")
    captions = page.inner_text("#compare-gallery")
    assert all(f"{n} step" in captions for n in (1, 2, 4, 8))
    assert local_only(page, checkpoint_server) == []
    page.context.close()


def test_a_file_that_is_not_an_image_gets_a_message(browser, checkpoint_server, run):
    page = open_page(browser, checkpoint_server)
    notes = run["root"] / "notes.png"
    notes.write_text("these are notes, not pixels")
    upload(page, notes)
    assert "not an image" in wait_for_status(page, "Cannot use this file")
    page.click("#run")  # the page stays usable: running says so again
    assert "not an image" in wait_for_status(page, "Cannot use this file")
    upload(page, run["examples"] / "digit1.png")
    wait_for_status(page, "Ready")
    page.click("#run")
    assert output_image(page).size == (32, 32)
    page.context.close()


def test_two_sessions_at_once_get_their_own_results(browser, checkpoint_server, run):
    """Two pages run different inputs and seeds at the same moment; each shows the image
    the model gives for its own input and seed (the model is loaded once, in the one
    server). The tiny model's images hang on the seed more than on the input."""
    from codi_lightning.serve import ServedModel

    model = ServedModel.from_checkpoint(str(run["ckpt"]), upscale=4)
    sources = [run["examples"] / "digit0.png", run["examples"] / "digit1.png"]
    seeds = [11, 12]
    expected = [np.asarray(model.generate(model.prepare(s), 4, seed=seed).image, float)
                for s, seed in zip(sources, seeds, strict=True)]  # fmt: skip
    assert np.abs(expected[0] - expected[1]).mean() > 5
    pages = [open_page(browser, checkpoint_server) for _ in sources]
    for page, source, seed in zip(pages, sources, seeds, strict=True):
        upload(page, source)
        wait_for_status(page, "Ready")
        page.fill("#seed input", str(seed))
    for page in pages:  # back to back: the second asks while the first is sampling
        page.click("#run", no_wait_after=True)
    for page, want in zip(pages, expected, strict=True):
        wait_for_status(page, "Done")
        got = np.asarray(output_image(page), float)
        assert np.abs(got - want).max() <= 2  # its own input's image, not the other's
        page.context.close()


def test_an_exported_folder_is_served(browser, run):
    server = Server(["--folder", str(run["exported"]), "--pretrained", str(run["teacher"]),
                     "--upscale", "4"], run["root"] / "serve_folder.log")  # fmt: skip
    try:
        page = open_page(browser, server)
        assert "exported" in page.inner_text("body")
        upload(page, run["examples"] / "digit0.png")
        wait_for_status(page, "Ready")
        page.click("#run")
        wait_for_status(page, "Done")
        assert output_image(page).size == (32, 32)
        assert local_only(page, server) == []
        page.context.close()
    finally:
        server.stop()
