"""The prediction page (GET /) in a real headless browser: Debian's chromium driven by Playwright against a real
api.py process. `playwright install` cannot download browsers here and is never called."""

from __future__ import annotations

import base64
import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from playwright.sync_api import expect

from checkpoint import save_checkpoint
from config import ModelConfig
from conftest import free_port, server_process
from data import CIFAR_CLASSES
from model import CnnClassifier
from transforms import CIFAR10_MEAN, CIFAR10_STD

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "page-test-key"
pytestmark = pytest.mark.full


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """api.py serving an untrained CIFAR-10-class net (random whitening: answers differ by image), with an API key."""
    torch.manual_seed(0)
    model = CnnClassifier(ModelConfig(widths=(8, 16, 16)), num_classes=10).eval()
    with torch.no_grad():
        model.whiten.weight.normal_()
    folder = tmp_path_factory.mktemp("page")
    save_checkpoint(folder / "cnn.pt", model, model_config=model.cfg, classes=CIFAR_CLASSES, mean=CIFAR10_MEAN,
                    std=CIFAR10_STD, image_size=32, metrics={"val_acc": 0.1})
    port = free_port()
    env = {**os.environ, "CATER_MODEL_PATH": str(folder / "cnn.pt"), "CATER_API_KEY": KEY}
    cmd = [sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    with server_process(cmd, env, folder / "api.log", f"http://127.0.0.1:{port}/ready", 120):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "the page test needs Debian's chromium: apt-get install chromium (.ci/run installs it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no sandbox
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base_url):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(base_url + "/")
    expect(page.locator("#model-info")).to_contain_text("10 classes")
    yield page
    page.close()


def test_upload_shows_the_top_classes_and_errors_in_plain_words(page, base_url, tmp_path):
    image = tmp_path / "horse.png"
    Image.open(REPO / "ui" / "samples" / "horse.png").resize((96, 80)).save(image)  # any size: the server resizes
    expected = httpx.post(f"{base_url}/predict/file", files={"file": image.read_bytes()}, data={"top_k": "5"},
                          headers={"X-API-Key": KEY}).json()

    page.set_input_files("#file-input", str(image))  # no key yet: the page says what to do
    page.wait_for_selector("#error:not([hidden])")
    assert "needs an API key" in page.inner_text("#error")

    page.click("summary")
    page.fill("#api-key", KEY)
    page.set_input_files("#file-input", [])
    page.set_input_files("#file-input", str(image))
    expect(page.locator("#bars li")).to_have_count(5)
    names = page.locator("#bars .name").all_inner_texts()
    assert names == [c["class_name"] for c in expected["top_k"]]
    assert f"Most likely: {expected['class_name']}" in page.inner_text("#status") and " ms." in page.inner_text("#status")
    assert page.is_visible("#preview") and page.is_hidden("#error")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000

    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    page.set_input_files("#file-input", str(text))
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.inner_text("#error")
    assert page.locator("#bars li").count() == 0


def test_keyboard_alone_reaches_a_sample_and_classifies_it(page, base_url):
    page.click("summary")
    page.fill("#api-key", KEY)
    page.locator("#api-key").dispatch_event("change")  # kept for the tab: the reload below starts with it
    page.reload()
    page.locator("#samples button").first.wait_for()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file-input"  # the file chooser comes first
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Try the sample image of a airplane"
    page.keyboard.press("Enter")
    expect(page.locator("#bars li")).to_have_count(5)
    assert page.inner_text("#preview-name") == "sample: airplane"
    assert len(page.locator("#samples button").all()) == 10  # every CIFAR-10 class the served model knows


def test_why_draws_where_the_model_looked_over_the_image(page, base_url):
    page.click("summary")
    page.fill("#api-key", KEY)
    page.locator("#samples button").first.wait_for()
    page.click("button[aria-label='Try the sample image of a cat']")
    expect(page.locator("#bars li")).to_have_count(5)
    assert page.is_hidden("#why-map")
    page.check("#why")
    expect(page.locator("#why-map")).to_be_visible()
    assert page.get_attribute("#why-map", "src").startswith("data:image/png;base64,")
    sample = base64.b64encode((REPO / "ui" / "samples" / "cat.png").read_bytes()).decode()
    answer = httpx.post(f"{base_url}/explain", json={"image_base64": sample}, headers={"X-API-Key": KEY}).json()
    assert f"score of {answer['explained_class_name']}" in page.inner_text("#why-note")
    assert page.evaluate("document.getElementById('why-map').naturalWidth") == 224  # the PNG decoded
    page.click("button[aria-label='Try the sample image of a dog']")  # a new image: its own map, asked for again
    expect(page.locator("#bars li")).to_have_count(5)
    expect(page.locator("#why-map")).to_be_visible()
    page.uncheck("#why")
    expect(page.locator("#why-map")).to_be_hidden()


def test_the_page_fits_a_phone_and_needs_nothing_from_the_internet(browser, base_url):
    page = browser.new_page(viewport={"width": 360, "height": 740})
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(base_url) else None)
    page.goto(base_url + "/")
    expect(page.locator("#model-info")).to_contain_text("10 classes")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    assert outside == []
    labelled = page.evaluate("[...document.querySelectorAll('input')].every(i => i.labels.length > 0)")
    assert labelled
    page.close()
