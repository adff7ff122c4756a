"""The web page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``make test``) driven by Selenium, on the real default model.

Set ``FACTEDIT_SCREENSHOT_DIR=docs/img`` to refresh the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_weights_equal
from factedit.arch import describe
from factedit.hooks import get_parameter
from factedit.web import ServerState, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = "web_page.png"


def _skip_or_fail(reason: str) -> None:
    # In CI the Makefile installs Chromium; a missing browser there is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests: see the Makefile's 'browser' step)")
    pytest.skip(f"{reason}: install Debian's chromium and chromium-driver (make browser)")


@pytest.fixture(scope="module")
def driver_factory():
    if not (CHROMIUM and CHROMEDRIVER):
        _skip_or_fail("no system Chromium/chromedriver found")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip_or_fail("selenium is not installed")
    drivers = []

    def make(width: int = 1280, height: int = 1500):
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):  # fmt: skip
            opts.add_argument(arg)
        # The system chromedriver: Selenium Manager never downloads a driver or a browser.
        d = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
        drivers.append(d)
        return d

    yield make
    for d in drivers:
        d.quit()


@pytest.fixture(scope="module")
def page(model, tok, pristine_state):
    state = ServerState(model, tok, model_name="SmolLM2-135M-Instruct")
    with running_server(state) as url:
        yield url, state
    state.close()
    state.revert_all()
    assert_weights_equal(model, pristine_state)


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except Exception as exc:
        shot = Path(os.environ.get("TMPDIR", "/tmp")) / "factedit-web-failure.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"timed out waiting for {what} (screenshot: {shot})") from exc


def fill(driver, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(
        driver, lambda d: d.execute_script("return document.body.dataset.ready"), 20, "the page"
    )


def test_seed_edit_in_the_browser_then_revert(
    driver_factory, page, model, pristine_state, tmp_path
):
    from selenium.webdriver.common.by import By

    url, state = page
    driver = driver_factory()
    open_page(driver, url)
    assert driver.title == "factedit"
    methods = [
        o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#method option")
    ]
    assert "rome" in methods and "ft-l" in methods
    # Nothing outside this server was requested by the page.
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(url) for u in urls), urls

    fill(driver, "prompt", "{} was the founder of")
    fill(driver, "subject", "Steve Jobs")
    fill(driver, "target", "Microsoft")
    driver.find_element(By.ID, "method").send_keys("rome")
    prompts = driver.find_element(By.ID, "test-prompts").get_attribute("value").splitlines()
    assert "Steve Jobs worked for" in prompts  # the seed's test prompts are offered
    driver.find_element(By.ID, "edit-submit").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "edit-progress").is_displayed()
             or d.execute_script("return document.body.dataset.editState") != "running", 10, "the progress indicator")  # fmt: skip
    wait_for(
        driver,
        lambda d: d.execute_script("return document.body.dataset.editState") in ("done", "error"),
        1200,
        "the edit's result",
    )  # fmt: skip  (generous: a busy machine is slow)
    assert driver.execute_script("return document.body.dataset.editState") == "done", (
        driver.find_element(By.ID, "edit-message").text
    )
    rows = driver.find_elements(By.CSS_SELECTOR, "#generations tbody tr")
    assert len(rows) == len(prompts)
    original = [r.find_element(By.CSS_SELECTOR, "td.original").text for r in rows]
    edited = [r.find_element(By.CSS_SELECTOR, "td.edited").text for r in rows]
    assert not any("Microsoft" in t for t in original), original
    assert any("Microsoft" in t for t in edited), edited
    before = float(driver.find_element(By.ID, "prob-before").text)
    after = float(driver.find_element(By.ID, "prob-after").text)
    assert before < 0.05 and after > 0.5

    name = describe(model).mlp_out_weight_name(4)
    assert not torch.equal(get_parameter(model, name), pristine_state[name])
    items = wait_for(
        driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#edits-list li"), 10, "the edit list"
    )
    assert len(items) == 1 and "Microsoft" in items[0].text

    # The screenshot the README shows (refreshed with FACTEDIT_SCREENSHOT_DIR=docs/img).
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(tmp_path / SCREENSHOT))
    assert (tmp_path / SCREENSHOT).stat().st_size > 20_000
    if os.environ.get("FACTEDIT_SCREENSHOT_DIR"):
        dest = Path(os.environ["FACTEDIT_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / SCREENSHOT, dest / SCREENSHOT)

    items[0].find_element(By.CSS_SELECTOR, "button.revert").click()
    wait_for(
        driver,
        lambda d: d.execute_script("return document.body.dataset.edits") == "0",
        30,
        "the revert",
    )
    assert "reverted" in driver.find_element(By.ID, "edits-message").text
    assert state.edits() == []
    assert_weights_equal(model, pristine_state)  # bit-for-bit, every tensor


def test_bad_request_shows_a_message(driver_factory, page, model, pristine_state, tmp_path):
    from selenium.webdriver.common.by import By

    from conftest import make_tiny_model
    from edit_helpers import rank_one, synthetic_edit

    url, state = page
    driver = driver_factory()
    open_page(driver, url)
    message = driver.find_element(By.ID, "edit-message")
    cases = [
        ("Steve Jobs was the founder of", "Steve Jobs", "Microsoft", "must contain {}"),
        ("{} was the founder of", "Steve Jobs", " ", "target is empty"),
    ]
    for prompt, subject, target, expected in cases:
        fill(driver, "prompt", prompt)
        fill(driver, "subject", subject)
        fill(driver, "target", target)
        t0 = time.monotonic()
        driver.find_element(By.ID, "edit-submit").click()
        wait_for(
            driver,
            lambda d, e=expected: message.is_displayed() and e in message.text,
            20,
            f"message {expected!r}",
        )
        assert time.monotonic() - t0 < 20
        assert driver.execute_script("return document.body.dataset.editState") == "error"
        assert not driver.find_element(By.ID, "edit-result").is_displayed()
    # Locate with a subject that is not in the prompt: a message there too.
    fill(driver, "trace-prompt", "The Space Needle is located in the city of")
    fill(driver, "trace-subject", "Big Ben")
    driver.find_element(By.ID, "trace-submit").click()
    trace_msg = driver.find_element(By.ID, "trace-message")
    wait_for(driver, lambda d: trace_msg.is_displayed(), 20, "the trace message")
    assert "does not occur in the prompt" in trace_msg.text
    # A saved edit of another base model, uploaded: refused with the reason.
    tiny = make_tiny_model("llama")
    path = synthetic_edit(tiny, [rank_one(tiny, 0, seed=1)]).save(
        tmp_path / "tiny-llama.safetensors"
    )
    driver.find_element(By.ID, "upload-file").send_keys(str(path))
    driver.find_element(By.ID, "upload-submit").click()
    edits_msg = driver.find_element(By.ID, "edits-message")
    wait_for(driver, lambda d: edits_msg.is_displayed(), 20, "the upload message")
    assert "tiny-llama.safetensors does not fit this model" in edits_msg.text
    assert state.edits() == []
    assert_weights_equal(model, pristine_state)
