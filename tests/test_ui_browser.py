"""lyco-ui end to end in a real headless browser (Playwright driving Debian's chromium).

1. Train tab: a config error names its field; then train a tiny LoRA on builtin:tiny-sd with a generated
   concept dataset for 2 steps: progress and a loss appear, the adapter file is written.
2. Generate tab: add that adapter, generate at strength 0 and 1 (same seed): the images differ and the
   served PNGs carry their A1111 parameters. Only the configured folders are served.
3. Train tab again: Stop during a second training leaves the UI idle, a resumable state written and the
   child process gone.

Screenshots of both tabs go to a temporary folder, or to docs/screenshots/ (linked from the README)
when LYCO_UPDATE_SCREENSHOTS=1 is set, so that a test run leaves the checkout as it was.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "screenshots" if os.environ.get("LYCO_UPDATE_SCREENSHOTS") == "1" else Path(tempfile.mkdtemp(prefix="lyco-shots-"))
CHROMIUM = os.environ.get("LYCO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TRAIN_TIMEOUT_MS = 300_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="the playwright Python package is not installed (pip install playwright)"),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium browser at {CHROMIUM} (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """lyco-ui in its own process on a free port, with a 4-image concept dataset in its data folder."""
    from pipelines.synthetic import write_concept_dataset

    root = tmp_path_factory.mktemp("ui")
    write_concept_dataset(root / "data" / "sks", n_images=4, repeats=1)
    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(root / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = open(root / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ui.app", "--port", str(port), "--workdir", str(root / "work"),
                             "--data-dir", str(root / "data")], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/config", timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("lyco-ui did not start:\n" + (root / "app.log").read_text(errors="replace")[-3000:])
            time.sleep(1)
    yield {"url": url, "root": root, "proc": proc}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
                                                        headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        page.wait_for_selector("#train-start")
        yield page
        context.close()


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_text(page, selector: str, pattern: str, timeout: float = 60_000) -> str:
    page.wait_for_function("([sel, pat]) => { const e = document.querySelector(sel); return e && new RegExp(pat).test(e.innerText); }",
                           arg=[selector, pattern], timeout=timeout)
    return text_of(page, selector)


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Tab")


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_train_tab_trains_a_tiny_adapter(page, server) -> None:
    choose(page, "train-data-dir", "sks")
    assert "4 images x 1 repeats, 4/4 captioned" in wait_text(page, "#train-preview", "captioned")
    for elem_id, value in (("train-rank", "4"), ("train-length", "2"), ("train-batch-size", "2"), ("train-sample-steps", "10"),
                           ("train-output-name", "ui_test"), ("train-learning-rate", "0")):
        fill(page, elem_id, value)
    page.locator("#train-start").click()
    assert "optimizer.learning_rate" in wait_text(page, "#train-errors", "problems")  # the error names the field
    assert "State: idle" in text_of(page, "#train-status")
    fill(page, "train-learning-rate", "0.001")
    page.locator("#train-start").click()
    wait_text(page, "#train-status", "State: running")
    progress = wait_text(page, "#train-progress", r"loss \d", timeout=TRAIN_TIMEOUT_MS)
    assert re.search(r"Step [12] / 2", progress)
    status = wait_text(page, "#train-status", "State: (completed|failed)", timeout=TRAIN_TIMEOUT_MS)
    assert "State: completed" in status, text_of(page, "#train-log")
    adapter = server["root"] / "work" / "adapters" / "ui_test" / "ui_test.safetensors"
    assert adapter.is_file() and str(adapter) in status
    page.wait_for_selector("#train-samples img")
    page.wait_for_selector("#train-loss canvas, #train-loss svg")
    assert page.locator("#train-start").is_enabled() and page.locator("#train-stop").is_disabled()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "train.png"), full_page=True)


def _generate(page, strength: str):
    from PIL import Image

    number = page.locator("#gen-slot-0-strength input[type=number]")
    number.fill(strength)
    number.press("Enter")
    images = page.locator("#gen-gallery img")
    previous = images.first.get_attribute("src") if images.count() else None
    page.locator("#gen-run").click()
    page.wait_for_function("(prev) => { const i = document.querySelector('#gen-gallery img'); return i && i.src !== prev; }", arg=previous)
    response = page.request.get(images.first.get_attribute("src"))
    assert response.ok
    image = Image.open(io.BytesIO(response.body()))
    return image.format, image.info.get("parameters", ""), image.convert("RGB").tobytes()


def test_generate_tab_stack_strengths_change_the_image_and_pngs_carry_parameters(page, server) -> None:
    if not (server["root"] / "work" / "adapters" / "ui_test" / "ui_test.safetensors").is_file():
        pytest.skip("needs the adapter trained by the previous test")
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-adapter-refresh").click()
    choose(page, "gen-adapter-pick", "ui_test/ui_test.safetensors")
    page.locator("#gen-adapter-add").click()
    assert "Added ui_test" in wait_text(page, "#gen-stack-message", "Added|Could not")
    fill(page, "gen-prompt", "a photo of sks")
    fill(page, "gen-seed", "5")
    fill(page, "gen-steps", "10")
    fmt0, params0, pixels0 = _generate(page, "0")
    fmt1, params1, pixels1 = _generate(page, "1")
    assert fmt0 == fmt1 == "PNG"
    assert "Seed: 5" in params0 and "<lora:ui_test:0>" in params0 and "Lora hashes" in params0
    assert "<lora:ui_test:1>" in params1 and params1 in text_of(page, "#gen-parameters") + page.locator("#gen-parameters textarea").input_value()
    assert pixels0 != pixels1
    page.screenshot(path=str(SHOTS / "generate.png"), full_page=True)
    # Only the configured folders are served: a file in the data folder is, /etc/passwd and the repo are not.
    base = server["url"] + "/gradio_api/file="
    assert page.request.get(base + str(server["root"] / "data" / "sks" / "1_sks" / "0000.png")).status == 200
    assert page.request.get(base + "/etc/passwd").status == 403
    assert page.request.get(base + str(REPO / "pyproject.toml")).status == 403


def test_stop_leaves_the_ui_idle_and_the_child_gone(page, server) -> None:
    page.get_by_role("tab", name="Train").click()
    fill(page, "train-output-name", "ui_stop")
    fill(page, "train-length", "500")
    page.locator("#train-start").click()
    status = wait_text(page, "#train-status", "State: running")
    pid = int(re.search(r"pid (\d+)", status).group(1))
    assert psutil.pid_exists(pid)
    wait_text(page, "#train-progress", r"Step [1-9]\d* / 500", timeout=TRAIN_TIMEOUT_MS)
    page.wait_for_function("() => !document.querySelector('#train-stop').disabled")
    page.locator("#train-stop").click()
    status = wait_text(page, "#train-status", "State: (stopped|failed|completed)", timeout=120_000)
    assert "State: stopped" in status and "resumable state" in status, text_of(page, "#train-log")
    try:
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass
    assert list((server["root"] / "work" / "adapters" / "ui_stop" / "state").glob("step-*/lyco_state.json"))
    page.wait_for_function("() => !document.querySelector('#train-start').disabled && document.querySelector('#train-stop').disabled")
