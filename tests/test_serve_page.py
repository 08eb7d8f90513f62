"""The kiosk page at / in a real headless browser (Debian's chromium + chromedriver, driven by
Selenium): upload the bundled example, run detect, and check that the labels and the overlay
appear. Saves a screenshot ($PALIGEMMA_TEST_ARTIFACTS, else the test's tmp dir) and prints where.
Skips, saying why, when no browser or driver is installed (.ci/run installs them)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import ServerThread, require_server_libs

require_server_libs()
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")

import engine  # noqa: E402
from engine.serve.app import ServeConfig  # noqa: E402

EXAMPLE = engine.default_model_path() / "example.png"
LABELS = "blue square ; green square"


def find_browser():
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    path, driver_path = find_browser()
    if path is None or driver_path is None:
        reason = (f"no headless browser: chromium {'found' if path else 'missing'}, chromedriver "
                  f"{'found' if driver_path else 'missing'}; install them with `apt-get install chromium "
                  "chromium-driver` (.ci/run does)")
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--hide-scrollbars"):
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")           # never let Selenium Manager look for downloads
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served():
    model = engine.load()
    server = ServerThread(model, ServeConfig(model_name="paligemma-default"))
    server.wait_ready()
    yield server, model
    server.stop()
    model.close()


def test_kiosk_detect_shows_labels_and_overlay(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, model = served
    want = model.detect(EXAMPLE, LABELS)
    assert want
    d = browser
    d.get(server.url + "/")
    assert d.title == "PaliGemma kiosk"
    file_input = d.find_element(By.ID, "image")
    assert file_input.get_attribute("capture") == "environment"
    file_input.send_keys(str(EXAMPLE))
    d.find_element(By.CSS_SELECTOR, "input[name=task][value=detect]").click()
    query = d.find_element(By.ID, "query")
    assert query.is_displayed()
    query.send_keys(LABELS)
    WebDriverWait(d, 30).until(lambda drv: drv.find_element(By.ID, "run").is_enabled())
    d.find_element(By.ID, "run").click()
    WebDriverWait(d, 120).until(lambda drv: drv.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                in ("done", "error"))
    assert d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        d.find_element(By.ID, "status").text
    labels = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .label")]
    assert labels == [x.label for x in want]
    canvas = d.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-overlays") == str(len(want))
    # the box outline is drawn on the canvas: the pixel on the first box's left edge has its label's colour
    from engine import draw
    color = draw.label_colors(want)[want[0].label]
    x0, y0, x1, y1 = want[0].box
    pixel = d.execute_script(
        "const c = document.getElementById('canvas'); const s = c.width / 224;"
        "return Array.from(c.getContext('2d').getImageData(Math.round(arguments[0] * s),"
        " Math.round(arguments[1] * s), 1, 1).data);", x0, (y0 + y1) / 2)
    assert all(abs(p - q) <= 40 for p, q in zip(pixel[:3], color)), (pixel, color)
    save_screenshot(d, "kiosk_detect.png", tmp_path)

    # segment: the masks are drawn too
    segs = model.segment(EXAMPLE, "blue square")
    assert segs and segs[0].mask is not None
    d.find_element(By.CSS_SELECTOR, "input[name=task][value=segment]").click()
    query.clear()
    query.send_keys("blue square")
    d.find_element(By.ID, "run").click()
    WebDriverWait(d, 120).until(lambda drv: drv.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                in ("done", "error"))
    assert d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "#results .label")] == [s.label for s in segs]
    assert canvas.get_attribute("data-overlays") == str(len(segs))
    save_screenshot(d, "kiosk_segment.png", tmp_path)


def save_screenshot(driver, name, tmp_path):
    out_dir = Path(os.environ.get("PALIGEMMA_TEST_ARTIFACTS") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / name
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot of the kiosk page: {shot}")
