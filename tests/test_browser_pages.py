"""Every page in a real browser: Playwright driving Debian's Chromium against ``streamlit run``.

One server for the module (results go to a temporary store, so every page really computes). For
each page: load it, run its main action on the embedded model, wait for a chart, check that no
exception is shown, and save a full-page screenshot to ``test-artifacts/<page>.png``.

A deep link on a fresh server (``/hidden_states`` as the very first request) must give the app's
own navigation and sidebar, not Streamlit's automatic ``pages/`` navigation.

Skipped when Chromium or Playwright is missing, unless the environment variable CI is set.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlencode

import pytest

from browser import ARTIFACTS, AppServer, launch_chromium, require_browser, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WAIT_MS = 600_000
CHART = '[data-testid="stVegaLiteChart"]'  # not any canvas: st.data_editor draws on one
TITLES = {"Single-prompt trace", "Category averages", "Attention", "Hidden states", "ROME averages"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    results = tmp_path_factory.mktemp("browser-results")
    with AppServer("browser_pages_server", env={"CAUSAL_TRACING_RESULTS": str(results)}) as app:
        yield app


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    yield tab
    context.close()


def _problems(page) -> list[str]:
    """Exceptions and error boxes shown on the page."""
    shown = []
    for selector in ('[data-testid="stException"]', '[data-testid="stAlertContentError"]'):
        loc = page.locator(selector)
        shown += [f"{selector}: {loc.nth(i).inner_text()[:500]}" for i in range(loc.count())]
    return shown


def _wait_for_chart(page) -> None:
    page.locator(CHART).first.wait_for(state="visible", timeout=WAIT_MS)
    wait_idle(page, WAIT_MS / 1000)


def screenshot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main container, not the document, so the
    viewport is made as tall as the content first."""
    height = page.evaluate("""() => Math.max(...[
        '[data-testid="stMain"]', '[data-testid="stAppViewContainer"]', 'section.main', 'body'
    ].map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))""")
    size = page.viewport_size or {"width": 1400, "height": 1000}
    page.set_viewport_size({"width": size["width"], "height": int(min(max(height, 600) + 40, 20000))})
    time.sleep(1.5)  # charts re-layout after the resize
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def _finish(page, server, name: str) -> None:
    wait_idle(page, WAIT_MS / 1000)
    screenshot(page, name)
    problems = _problems(page)
    assert not problems, f"{name}: {problems}\n--- server log ---\n{server.log_tail()}"
    assert page.locator(CHART).count() >= 1, f"{name}: no chart"


def _pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the selectbox labelled ``label``."""
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
    box.click()
    page.get_by_role("option", name=option, exact=True).first.click()
    wait_idle(page, WAIT_MS / 1000)


def _set_number(page, label: str, value: int) -> None:
    field = page.get_by_label(label, exact=True).first
    field.fill(str(value))
    field.press("Enter")
    wait_idle(page, WAIT_MS / 1000)


# ---------------------------------------------------------------------------------------------
# Every page


def test_trace_page(server, page):
    query = urlencode({"prompt": "The Eiffel Tower is located in the city of", "samples": "2",
                       "seed": "4321"})  # the store is empty: it computes
    page.goto(f"{server.url}/?{query}")
    _wait_for_chart(page)
    assert page.get_by_text("Causal trace of one prompt").count()
    assert page.locator('[data-testid="stMetric"]').filter(has_text="Clean").count()
    _finish(page, server, "trace")


def test_categories_page(server, page):
    page.goto(f"{server.url}/categories")
    page.get_by_text("Category averages").first.wait_for(timeout=WAIT_MS)
    wait_idle(page, WAIT_MS / 1000)
    if page.locator('[data-testid="stSelectbox"]').filter(has_text="Prompt set").count():
        _pick(page, "Prompt set", "quick")  # the small shipped set
    if page.get_by_label("Samples", exact=True).count():
        _set_number(page, "Samples", 2)
    run = page.get_by_role("button", name=re.compile(r"^(Trace|Run|Compute)\b"))
    if run.count() and run.first.is_enabled():
        run.first.click()
    _wait_for_chart(page)
    _finish(page, server, "categories")


def test_attention_page(server, page):
    page.goto(f"{server.url}/attention")
    _wait_for_chart(page)  # the first tab: the study's prompt
    assert page.get_by_text("Final-token attention per layer", exact=False).count()
    _finish(page, server, "attention")


def test_hidden_states_page(server, page):
    page.goto(f"{server.url}/hidden_states")
    _wait_for_chart(page)  # trajectories of the shipped set, and the logit lens
    assert page.get_by_text("Hidden states of the final token").count()
    _finish(page, server, "hidden_states")


# ---------------------------------------------------------------------------------------------
# A deep link as the very first request of a fresh server


def _nav_labels(page) -> tuple[str, ...]:
    """Page names in the navigation shown, sidebar or top bar (the last line of each link)."""
    links = page.locator('[data-testid="stSidebarNav"] a, [data-testid="stTopNavLink"]')
    return tuple(links.nth(i).inner_text().strip().split("\n")[-1].strip() for i in range(links.count()))


def test_deep_link_on_a_fresh_server_gets_the_apps_navigation(browser, tmp_path):
    """Streamlit picks its automatic navigation (every file in pages/, "common" included) while
    nothing in the process has called st.navigation yet: a first request for /hidden_states must
    still never show it, and must end with the app's pages and the sidebar model picker."""
    with AppServer("browser_deep_link_server", env={"CAUSAL_TRACING_RESULTS": str(tmp_path)}) as fresh:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        tab = context.new_page()
        try:
            tab.goto(f"{fresh.url}/hidden_states")  # nothing has run app.py on this server yet
            seen: list[tuple[str, ...]] = []
            deadline = time.monotonic() + WAIT_MS / 1000
            while time.monotonic() < deadline:  # watch the navigation from the first paint on
                labels = _nav_labels(tab)
                if labels and (not seen or seen[-1] != labels):
                    seen.append(labels)
                    if any(label.lower() == "common" for label in labels):
                        screenshot(tab, "deep_link_automatic_navigation")
                if tab.get_by_text("Hidden states of the final token").count() and \
                        tab.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').count():
                    break
                time.sleep(0.1)
            wait_idle(tab, WAIT_MS / 1000)
            seen.append(_nav_labels(tab))
            screenshot(tab, "deep_link_hidden_states")
            shown_common = [labels for labels in seen if any(x.lower() == "common" for x in labels)]
            assert not shown_common, f"Streamlit's automatic pages/ navigation was shown: {seen}"
            assert set(seen[-1]) == TITLES, seen
            assert tab.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').count(), (
                "the sidebar has no model picker (app.py did not run)")
            assert tab.get_by_text("Hidden states of the final token").count()
            assert not tab.locator('[data-testid="stException"]').count()
        finally:
            context.close()


# ---------------------------------------------------------------------------------------------
# One study across page switches and reloads; nothing requested elsewhere; a quiet console

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
PICKED = {"prompt": "The Eiffel Tower is in", "noise_by": "tokens", "tokens": "3", "samples": "1",
          "seed": "77"}


def _go_to(page, title: str) -> None:
    page.locator('[data-testid="stTopNavLink"]').filter(has_text=title).first.click()
    wait_idle(page, WAIT_MS / 1000)


def _picked_pills(page) -> list[str]:
    """Labels of the selected pills (the picked tokens)."""
    pills = page.locator('[data-testid="stButtonGroup"] button[aria-checked="true"], '
                         '[data-testid="stButtonGroup"] button[aria-pressed="true"], '
                         '[data-testid="stBaseButton-pillsActive"]')
    return [pills.nth(i).inner_text().strip() for i in range(pills.count())]


def _query(page) -> dict[str, str]:
    from urllib.parse import parse_qs, urlparse

    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def test_picked_tokens_survive_page_switches_and_reloads(server, page):
    page.goto(f"{server.url}/?{urlencode(PICKED)}")
    _wait_for_chart(page)
    assert _picked_pills(page) == ["3 ␣Tower"], _picked_pills(page)
    for title in ("Hidden states", "Attention", "Single-prompt trace"):
        _go_to(page, title)
    _wait_for_chart(page)
    screenshot(page, "study_after_page_switches")
    assert _picked_pills(page) == ["3 ␣Tower"], _picked_pills(page)
    assert _query(page).get("tokens") == "3" and _query(page).get("noise_by") == "tokens", page.url
    assert not _problems(page), _problems(page)
    page.reload()
    _wait_for_chart(page)
    assert _picked_pills(page) == ["3 ␣Tower"] and _query(page).get("tokens") == "3"
    assert not _problems(page), _problems(page)


def test_nothing_is_requested_from_other_hosts_and_the_console_stays_quiet(server, page):
    from urllib.parse import urlparse

    foreign: list[str] = []
    console: list[str] = []

    def route(request_route) -> None:
        host = urlparse(request_route.request.url).hostname
        if host in LOCAL_HOSTS or request_route.request.url.startswith(("data:", "blob:")):
            request_route.continue_()
        else:
            foreign.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("warning", "error") else None)
    page.goto(f"{server.url}/?{urlencode(PICKED)}")
    _wait_for_chart(page)
    for title in ("Category averages", "Attention", "Hidden states", "ROME averages", "Single-prompt trace"):
        _go_to(page, title)
        time.sleep(1)
    wait_idle(page, WAIT_MS / 1000)
    assert not foreign, f"{len(foreign)} requests to other hosts: {sorted(set(foreign))[:10]}"
    assert not console, console[:20]
    assert "Traceback" not in server.log_tail(400) and "Warning" not in server.log_tail(400), server.log_tail(60)


# ---------------------------------------------------------------------------------------------
# Linked views, the A/B comparison and links that reproduce every page

STUDY = {**PICKED, "kind": "hidden", "rows": "all"}
STREAMLIT_PROBES = ("/_stcore/health", "/_stcore/host-config")  # streamlit#7074: a deep link's first load


def _quiet(page):
    """Collects failed requests and console warnings and errors from now on; returns a function
    that lists them. Streamlit's own probes of a deep link (streamlit#7074: it first asks for
    ``/<page>/_stcore/health``, gets 404, then asks the right URL) and their console lines are
    left out, nothing else."""
    said: list[str] = []
    failed: list[str] = []
    page.on("console", lambda m: said.append(f"{m.type}: {m.text}") if m.type in ("warning", "error") else None)
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)

    def problems() -> list[str]:
        probes = [u for u in failed if u.split("?")[0].endswith(STREAMLIT_PROBES)]
        lines = list(said)
        for _ in probes:  # one "404" console line per probe
            match = next((m for m in lines if "status of 404" in m), None)
            if match is not None:
                lines.remove(match)
        return [u for u in failed if u not in probes] + lines
    return problems


def _cell(page, token: int, layer: int, n_layers: int):
    """A heatmap cell of the first chart (cells are drawn token-major)."""
    cells = page.locator(CHART).first.locator("path[role='graphics-symbol']")
    return cells.nth(token * n_layers + layer)


def test_a_clicked_heatmap_cell_opens_its_side_panel_and_links_to_attention(server, page):
    problems = _quiet(page)
    page.goto(f"{server.url}/?{urlencode(STUDY)}")
    _wait_for_chart(page)
    _cell(page, 3, 12, 30).click()
    page.get_by_text("Logit lens", exact=False).first.wait_for(timeout=WAIT_MS)
    wait_idle(page, WAIT_MS / 1000)
    screenshot(page, "trace_cell_panel")
    heading = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="Token 3").filter(has_text="layer 12")
    assert heading.count(), "no side panel for token 3, layer 12"
    assert page.get_by_text("per head", exact=False).count() and page.get_by_text("rank", exact=False).count()
    page.get_by_role("button", name="All heads (Attention page)").click()
    page.get_by_text("Attention", exact=True).first.wait_for(timeout=WAIT_MS)
    _wait_for_chart(page)
    query = _query(page)
    assert query.get("layer") == "12" and query.get("source") == "study" and query.get("tab") == "Single prompt"
    assert query.get("prompt") == STUDY["prompt"] and query.get("tokens") == "3", page.url
    screenshot(page, "attention_from_cell")
    assert not _problems(page) and not problems(), (_problems(page), problems())


def test_ab_view_of_two_seeds(server, page):
    problems = _quiet(page)
    page.goto(f"{server.url}/?{urlencode({**STUDY, 'tab': 'compare', 'compare': 'seed', 'b_seed': '78'})}")
    page.get_by_role("button", name="Run card of A and B (JSON)").wait_for(timeout=WAIT_MS)
    wait_idle(page, WAIT_MS / 1000)
    screenshot(page, "trace_ab_seeds")
    texts = page.locator(CHART).all_inner_texts()
    assert page.locator(CHART).count() >= 3  # the pair, B − A, the compact curves
    assert _query(page).get("b_seed") == "78" and _query(page).get("compare") == "seed"
    assert not _problems(page) and not problems(), (_problems(page), problems(), texts[:1])


def test_a_category_point_opens_its_trace_from_the_store(server, page):
    problems = _quiet(page)
    page.goto(f"{server.url}/categories?{urlencode({**STUDY, 'prompt_set': 'quick'})}")
    page.get_by_text("Category averages").first.wait_for(timeout=WAIT_MS)
    wait_idle(page, WAIT_MS / 1000)
    run = page.get_by_role("button", name=re.compile(r"^Trace \d+ missing"))
    if run.count() and run.first.is_enabled():
        run.first.click()
    page.get_by_text("Confounds", exact=False).first.wait_for(timeout=WAIT_MS)
    wait_idle(page, WAIT_MS / 1000)
    screenshot(page, "categories_before_point")
    scatter = page.locator(CHART).filter(has_text="tokens from the noised to the final token").first
    scatter.locator("path[role='graphics-symbol']").first.click()
    page.get_by_text("Causal trace of one prompt").wait_for(timeout=WAIT_MS)
    _wait_for_chart(page)
    screenshot(page, "trace_from_category_point")
    assert page.get_by_text("Loaded from the result store", exact=False).count(), "the trace was recomputed"
    assert _query(page).get("samples") == "1" and _query(page).get("seed") == STUDY["seed"]
    assert not _problems(page) and not problems(), (_problems(page), problems())


@pytest.mark.parametrize("title", ["Single-prompt trace", "Category averages", "Attention", "Hidden states",
                                   "ROME averages"])
def test_every_pages_url_reproduces_it_in_a_fresh_session(server, browser, page, title):
    page.goto(f"{server.url}/?{urlencode({**STUDY, 'seed': '91'})}")
    _wait_for_chart(page)
    _go_to(page, title)
    time.sleep(1)
    wait_idle(page, WAIT_MS / 1000)
    link, shown = page.url, _query(page)
    assert shown.get("prompt") == STUDY["prompt"] and shown.get("seed") == "91", link  # the study travels
    fresh = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        other = fresh.new_page()
        other.goto(link)
        other.get_by_text(title.split()[0], exact=False).first.wait_for(timeout=WAIT_MS)
        time.sleep(1)
        wait_idle(other, WAIT_MS / 1000)
        assert _query(other) == shown, (shown, _query(other))
        assert not _problems(other), _problems(other)
        if title not in ("Single-prompt trace", "ROME averages"):  # ROME averages a fact set, not the study
            assert other.get_by_text(STUDY["prompt"], exact=False).count(), "the study is not shown"
    finally:
        fresh.close()
