"""The web demo in headless Chromium: choose an image, ask, and watch the answer stream in."""

from __future__ import annotations

import shutil

import pytest

from eve_vlm.generate import GenerationConfig, answer
from eve_vlm.loading import load_for_inference
from eve_vlm.serve import ServerLimits, ServerSettings, create_app
from eve_vlm.serve.server import start_background_server
from eve_vlm.testing import make_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)

# Collects every text change of the answer box, so the test can see the text grow piece by piece.
OBSERVE = """
window.__answers = [];
new MutationObserver(() => window.__answers.push(document.getElementById('answer').textContent))
  .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def server(tiny_v2_dir):
    model, processor = load_for_inference(tiny_v2_dir, device="cpu")
    limits = ServerLimits(max_output_tokens=256, default_max_tokens=256)
    srv = start_background_server(create_app(model, processor, ServerSettings(limits=limits)))
    yield srv, model, processor
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_ask_and_see_streamed_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv, model, processor = server
    png = make_png(48, 32, (200, 30, 30), 0)
    image = tmp_path / "red.png"
    image.write_bytes(png)

    browser.get(srv.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("image ready"))
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,")

    question = browser.find_element(By.ID, "question")
    question.clear()
    question.send_keys("What is in the image?")
    browser.execute_script(OBSERVE)
    browser.find_element(By.ID, "ask").click()
    wait.until(
        lambda d: (
            d.find_element(By.ID, "status").text in ("done",)
            or "error" in d.find_element(By.ID, "status").text
        )
    )
    assert browser.find_element(By.ID, "status").text == "done"

    shown = browser.find_element(By.ID, "answer").get_attribute("textContent")
    expected = answer(
        model,
        processor,
        ["<image>\nWhat is in the image?"],
        [[png]],
        config=GenerationConfig(max_new_tokens=256),
    )[0]
    assert shown.strip() == expected
    assert expected, "the tiny model should say something"
    snapshots = [s for s in browser.execute_script("return window.__answers;") if s]
    assert len(snapshots) >= 2, "the answer should appear in several streamed pieces"
    assert all(later.startswith(earlier) for earlier, later in zip(snapshots, snapshots[1:], strict=False))


def test_server_error_is_shown(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv, _, _ = server
    browser.get(srv.url + "/")
    question = browser.find_element(By.ID, "question")
    question.clear()
    question.send_keys("<image> is not allowed in text")
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 30).until(lambda d: "error" in d.find_element(By.ID, "status").text)
    assert "<image>" in browser.find_element(By.ID, "status").text
