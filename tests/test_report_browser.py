"""The HTML report in a real headless browser (Debian's chromium through selenium): it loads from a file://
URL with no console errors, every plot decodes and has a size, and a screenshot of it is a real, non-blank
picture.

Skipped only where chromium (and its driver) are not installed; scripts/setup.sh installs them when it can
(not with --no-browser).
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from report_fixtures import small_report_inputs

from simulator.report import build_report, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium and chromedriver not installed (scripts/setup.sh installs them as root with apt-get "
           "unless given --no-browser; or apt-get install chromium chromium-driver)")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser")
    _, inputs = small_report_inputs(directory)
    report = build_report(inputs)
    (path,) = write_report(report, directory / "report.html")
    return path, report


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_loads_without_console_errors_and_plots_render(page, browser):
    path, report = page
    browser.get(path.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title == report.title
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight,"
        " i.getBoundingClientRect().width])")
    assert [img[0] for img in images] == [f.title for f in report.figures]
    for (alt, complete, natural_w, natural_h, shown_w), fig in zip(images, report.figures, strict=True):
        assert complete, alt
        assert (natural_w, natural_h) == (fig.width, fig.height), alt  # decoded: a broken image has 0 x 0
        assert shown_w > 100, alt
    sections = (browser.execute_script("return Array.from(document.querySelectorAll('section')).map(s => "
                                       "s.id)"))
    assert sections == [s.key for s in report.sections]
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []


def test_console_check_sees_errors(browser, tmp_path):
    """The checks above can fail: a page with a missing image and a script error shows up in both."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<img src="missing.png" alt="x"><script>undefinedFunction()</script></body></html>')
    browser.get(bad.as_uri())
    assert browser.execute_script("return document.images[0].naturalWidth") == 0
    messages = " ".join(e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE")
    assert "missing.png" in messages and "undefinedFunction" in messages


def test_screenshot_is_not_blank(page, browser, tmp_path):
    from PIL import Image

    path, _ = page
    browser.get(path.as_uri())
    browser.execute_script("document.getElementById('fig-load-heatmap').scrollIntoView()")
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 1000
    # a page with a plot on it: many distinct colours and real contrast, not one flat colour
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200
