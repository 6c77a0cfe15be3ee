"""The page (GET /) in a real headless Chromium driven by Selenium, against a real daemon.

./test.sh installs Debian's chromium and chromium-driver when missing. Screenshots of each state
go to the test's folder, or to $EDGE_SCREENSHOT_DIR (docs/screenshots holds the committed ones).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from daemon_harness import TIMEOUT_SCALE, Daemon
from http_client import Http

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("chromium and chromium-driver are not installed (./test.sh installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

EXAMPLES = ["a red gear on a white desk", "three brass nuts in a row"]
IDLE = 4.0  # kiosk_idle_seconds


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("page"), "page",
               config={"http": {"examples": EXAMPLES, "kiosk_idle_seconds": IDLE * TIMEOUT_SCALE},
                       "defaults": {"negative_prompt": "blurry, text", "steps": 100}})
    d.start()
    yield d
    d.cleanup()


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="eg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30 * TIMEOUT_SCALE)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("EDGE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), name
        with Image.open(path) as image:  # 256 colours: small enough to commit, sharp enough to read
            image.convert("RGB").quantize(256).save(path, optimize=True)
        return path

    return shoot


def viewport(driver, width: int, height: int) -> None:
    """The page's own size, as a screen of that size shows it (a window's size includes its frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def wait(driver, predicate, timeout=60.0, what="the page"):
    return WebDriverWait(driver, timeout * TIMEOUT_SCALE, poll_frequency=0.05).until(
        lambda d: predicate(d), message=f"waiting for {what}")


def el(driver, element_id):
    return driver.find_element(By.ID, element_id)


def test_type_generate_watch_progress_and_preview_see_result_and_history(daemon, browser, shots):
    viewport(browser, 1920, 1080)
    browser.get(daemon.url + "/")
    wait(browser, lambda d: el(d, "model").text == "knolling-tiny", what="the config to load")
    assert el(browser, "negative_prompt").get_attribute("value") == "blurry, text"  # the configured default
    for field in ("prompt", "negative_prompt", "steps", "guidance", "count", "scheduler", "seed", "size"):
        label = browser.find_element(By.CSS_SELECTOR, f"label[for={field}]")
        assert label.is_displayed() and label.text, field
    assert el(browser, "size").get_attribute("disabled") == "true"  # the embedded model makes 128x128 only
    assert browser.switch_to.active_element == el(browser, "prompt")  # the keyboard starts where the words go

    el(browser, "random-seed").click()
    assert int(el(browser, "seed").get_attribute("value")) >= 0
    browser.find_element(By.XPATH, "//fieldset[@class='presets']/button[text()='Quality']").click()
    assert el(browser, "steps").get_attribute("value") == "40"
    for field, value in (("steps", "150"), ("count", "2"), ("seed", "1234")):
        el(browser, field).clear()
        el(browser, field).send_keys(value)
    el(browser, "prompt").send_keys("a red gear on a desk")
    shots(browser, "page-1920-start")
    el(browser, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard's way to Generate

    wait(browser, lambda d: "Step" in el(d, "progress-text").text and el(d, "preview").is_displayed()
         and el(d, "preview").get_attribute("src").startswith("data:image/png"), what="a step and its preview")
    assert int(browser.find_element(By.CSS_SELECTOR, ".bar").get_attribute("aria-valuenow")) < 100
    shots(browser, "page-1920-progress")

    wait(browser, lambda d: el(d, "result").is_displayed()
         and d.execute_script("return document.getElementById('result-image').naturalWidth") == 128,
         what="the result image")
    wait(browser, lambda d: "1234, 1235" in el(d, "result-params").text, what="the parameters")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result-more img")) == 2
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#history li"), what="the history entry")
    entry = browser.find_element(By.CSS_SELECTOR, "#history li")
    assert entry.find_element(By.TAG_NAME, "span").text == "a red gear on a desk"
    assert "download=1" in entry.find_element(By.LINK_TEXT, "Download").get_attribute("href")
    assert "/api/images.zip?id=" in el(browser, "download-all").get_attribute("href")
    shots(browser, "page-1920-result")

    el(browser, "prompt").clear()
    el(browser, "steps").clear()
    entry.find_element(By.TAG_NAME, "button").click()  # Reuse these settings
    assert el(browser, "prompt").get_attribute("value") == "a red gear on a desk"
    assert el(browser, "steps").get_attribute("value") == "150"
    assert el(browser, "seed").get_attribute("value") == "1234"

    el(browser, "generate").click()
    wait(browser, lambda d: "Step" in el(d, "progress-text").text, what="the second job to run")
    el(browser, "prompt").send_keys(Keys.ESCAPE)  # Escape cancels
    wait(browser, lambda d: not el(d, "progress").is_displayed(), what="the cancel")
    newest = Http(daemon.url).get("/api/jobs?limit=1")[1]["jobs"][0]
    assert newest["state"] == "cancelled" and newest["source"] == "http"


def test_kiosk_mode_at_800x480_examples_large_targets_and_idle_reset(daemon, browser, shots):
    viewport(browser, 800, 480)
    browser.get(daemon.url + "/?kiosk=1")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button"), what="the examples")
    assert not browser.find_element(By.CSS_SELECTOR, ".advanced").is_displayed()
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert [b.text for b in examples] == EXAMPLES
    assert all(b.size["height"] >= 48 for b in examples + [el(browser, "generate")])  # touch targets
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 800  # no sideways scrolling
    shots(browser, "kiosk-800x480-start")

    examples[1].click()
    assert el(browser, "prompt").get_attribute("value") == EXAMPLES[1]
    el(browser, "generate").click()
    wait(browser, lambda d: "Step" in el(d, "progress-text").text and el(d, "preview").is_displayed(),
         what="the kiosk's progress")
    assert not el(browser, "form").is_displayed()  # one screen at a time
    assert el(browser, "cancel").size["height"] >= 48
    shots(browser, "kiosk-800x480-progress")
    wait(browser, lambda d: el(d, "result").is_displayed()
         and d.execute_script("return document.getElementById('result-image').naturalWidth") == 128,
         what="the kiosk result")
    assert el(browser, "again").is_displayed() and el(browser, "result-download").is_displayed()
    assert not el(browser, "result-warnings").is_displayed()  # a prompt the model reads: nothing to say
    shots(browser, "kiosk-800x480-result")
    newest = Http(daemon.url).get("/api/jobs?limit=1")[1]["jobs"][0]
    assert newest["prompt"] == EXAMPLES[1] and newest["job"]["negative_prompt"] == "blurry, text"

    # a prompt the model cannot read: the result says so (the vocabulary warning of CLI and API)
    el(browser, "again").click()
    el(browser, "prompt").send_keys("an astronaut riding a horse on the moon", Keys.ENTER)
    wait(browser, lambda d: el(d, "result").is_displayed() and el(d, "result-warnings").is_displayed(),
         what="the vocabulary warning")
    warning = el(browser, "result-warnings").text
    assert "unknown to knolling-tiny" in warning and "astronaut" in warning and "gear" in warning  # what it knows
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 800
    shots(browser, "kiosk-800x480-warning")

    # nobody touches it: back to the start screen
    wait(browser, lambda d: not el(d, "result").is_displayed() and el(d, "prompt").get_attribute("value") == "",
         timeout=IDLE * 3, what="the idle reset")
