"""Real browser: load the trace page, move the noise slider with the keyboard, see the heatmap change.

Starts ``streamlit run app.py`` on a free port and drives Debian's Chromium with Playwright.
Skipped when Chromium or Playwright is missing, unless the environment variable CI is set.
Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlencode

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_S = 600

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _require(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI is set, so this is a failure)")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def playwright_api():
    """Playwright's sync API, once Chromium and Playwright are known to be there."""
    _require(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "playwright is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def server(playwright_api):
    """The app on a free port; yields its base URL."""
    port = _free_port()
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
               "--server.headless", "true", "--server.fileWatcherType", "none",
               "--browser.gatherUsageStats", "false"]
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "browser_trace_server.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/_stcore/health", timeout=2)
                break
            except OSError:
                assert process.poll() is None, "streamlit exited; see test-artifacts/browser_trace_server.log"
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start within 120 s")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _idle(page) -> None:
    """Wait until the script has stopped running."""
    from browser import wait_idle

    wait_idle(page, timeout=WAIT_S)


def _metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def _download(page, label: str) -> bytes:
    """Click a download button and return the file. A second click is allowed (and reported as a
    warning with what the page and server said), as a user would click again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    button = page.locator('[data-testid="stDownloadButton"]').filter(has_text=label).first
    failures = []
    for _ in range(2):
        try:
            with page.expect_download(timeout=60_000) as download:
                button.click()
            if failures:
                warnings.warn(f"{label} download needed a second click: {failures}")
            return Path(download.value.path()).read_bytes()
        except PlaywrightTimeout:
            shown = page.locator('[data-testid="stDownloadButtonError"]')
            log = (ARTIFACTS / "browser_trace_server.log").read_text(errors="replace")[-3000:]
            failures.append({"button error": shown.all_inner_texts(), "server log tail": log})
            page.screenshot(path=str(ARTIFACTS / f"trace_download_failed_{len(failures)}.png"))
    pytest.fail(f"no {label} download after two clicks: {failures}")


def test_slider_retraces_in_a_real_browser(playwright_api, server):
    seed = random.randrange(1000, 10**6)  # a setting never traced: the page really computes
    query = urlencode({"prompt": "The Eiffel Tower is in", "noise_by": "tokens", "tokens": "3",
                       "samples": "1", "seed": str(seed), "noise": "0.4"})
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
        page.goto(f"{server}/?{query}")
        chart = page.locator('[data-testid="stVegaLiteChart"]').first
        chart.wait_for(timeout=WAIT_S * 1000)
        _idle(page)
        before_value = _metric(page, "Corrupted")
        before = chart.screenshot()
        page.screenshot(path=str(ARTIFACTS / "trace_before.png"))
        thumb = page.locator('[data-testid="stSlider"] input[type="range"]').first  # the thumb
        assert thumb.input_value() == "0.4"
        thumb.focus()
        for _ in range(5):
            thumb.press("ArrowRight")
        page.wait_for_function("() => location.search.includes('noise=0.45')", timeout=WAIT_S * 1000)
        deadline = time.time() + WAIT_S
        while time.time() < deadline and _metric(page, "Corrupted") == before_value:
            time.sleep(1)
        _idle(page)
        after_value = _metric(page, "Corrupted")
        after = page.locator('[data-testid="stVegaLiteChart"]').first.screenshot()
        page.screenshot(path=str(ARTIFACTS / "trace_after.png"))
        assert thumb.input_value() == "0.45"
        assert after_value != before_value
        assert after != before, "the heatmap did not change"
        assert not page.locator('[data-testid="stException"]').count()
        png = _download(page, "PNG")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        browser.close()
