"""Real browser: load the trace page, move the noise slider with the keyboard, see the heatmap
change, download the heatmap as PNG.

Starts ``streamlit run app.py`` on a free port and drives Debian's Chromium with Playwright
(``tests/browser.py``). Skipped when Chromium or Playwright is missing, unless the environment
variable CI is set. Screenshots and the server log go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from urllib.parse import urlencode

import pytest

from browser import ARTIFACTS, AppServer, launch_chromium, require_browser, wait_idle

WAIT_S = 600

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port, with an empty result store of its own (so the page computes)."""
    require_browser()
    results = tmp_path_factory.mktemp("browser-trace-results")
    with AppServer("browser_trace_server", env={"CAUSAL_TRACING_RESULTS": str(results)}) as app:
        yield app


def _metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def _download(page, label: str, server: AppServer) -> bytes:
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
            shown = page.locator('[data-testid="stDownloadButtonError"]').all_inner_texts()
            failures.append({"button error": shown, "server log tail": server.log_tail()})
            page.screenshot(path=str(ARTIFACTS / f"trace_download_failed_{len(failures)}.png"))
    pytest.fail(f"no {label} download after two clicks: {failures}")


def test_slider_retraces_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    seed = 4321  # never traced in this server's empty store: the page really computes
    query = urlencode({"prompt": "The Eiffel Tower is in", "noise_by": "tokens", "tokens": "3",
                       "samples": "1", "seed": str(seed), "noise": "0.4"})
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
        page.goto(f"{server.url}/?{query}")
        chart = page.locator('[data-testid="stVegaLiteChart"]').first
        chart.wait_for(timeout=WAIT_S * 1000)
        wait_idle(page, timeout=WAIT_S)
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
        wait_idle(page, timeout=WAIT_S)
        after_value = _metric(page, "Corrupted")
        after = page.locator('[data-testid="stVegaLiteChart"]').first.screenshot()
        page.screenshot(path=str(ARTIFACTS / "trace_after.png"))
        assert thumb.input_value() == "0.45"
        assert after_value != before_value
        assert after != before, "the heatmap did not change"
        assert not page.locator('[data-testid="stException"]').count()
        png = _download(page, "PNG", server)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        browser.close()


def test_slider_move_shows_the_preview_then_the_exact_trace(server):
    """A slider step draws the approximate preview first (its mark in the chart title), then the
    exact trace replaces it; the exact numbers shown equal ``causal_trace``. Prints how long the
    preview took from the key press (measured, not asserted)."""
    from playwright.sync_api import sync_playwright

    import tracing

    prompt, seed = "The Eiffel Tower is located in the city of", 4322
    query = urlencode({"prompt": prompt, "subject": "Eiffel Tower", "samples": "2", "seed": str(seed),
                       "noise": "0.4"})
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(f"{server.url}/?{query}")
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=WAIT_S * 1000)
        wait_idle(page, timeout=WAIT_S)
        thumb = page.locator('[data-testid="stSlider"] input[type="range"]').first
        thumb.focus()
        pressed = time.perf_counter()
        thumb.press("ArrowRight")  # 0.4 -> 0.41: a level never traced
        mark = page.get_by_text("APPROXIMATE PREVIEW", exact=False).first
        mark.wait_for(timeout=WAIT_S * 1000)
        to_preview = time.perf_counter() - pressed
        page.screenshot(path=str(ARTIFACTS / "trace_preview.png"))
        mark.wait_for(state="detached", timeout=WAIT_S * 1000)
        wait_idle(page, timeout=WAIT_S)
        to_exact = time.perf_counter() - pressed
        page.screenshot(path=str(ARTIFACTS / "trace_exact.png"))
        best = float(_metric(page, "Best restoration"))
        assert not page.locator('[data-testid="stException"]').count()
        browser.close()
    line = f"slider step -> preview on screen {to_preview:.2f} s, -> exact trace {to_exact:.2f} s"
    print("\n" + line)
    with open(ARTIFACTS / "timings.txt", "a") as out:  # measured, not asserted: kept for the notes
        out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line} (load {os.getloadavg()[0]:.1f})\n")
    lm = tracing.load_model(tracing.DEFAULT_MODEL)
    noised = tracing.subject_positions(lm, prompt, "Eiffel Tower")
    exact = tracing.causal_trace(lm, prompt, noised, samples=2, seed=seed, noise=0.41)
    assert best == pytest.approx(float(exact.scores.max()), rel=1e-3)  # shown with 4 digits
