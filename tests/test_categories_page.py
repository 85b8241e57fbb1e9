"""AppTest of pages/categories.py with the embedded model.

The wiring tests replace the tracing engine by a fast stand-in with known rows (AppTest runs the
page in this process), so pressing "Trace" completes in seconds; the engine itself is tested in
test_causal.py and, through batches, in test_batch.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from factory import stand_in_trace
from streamlit.testing.v1 import AppTest

import tracing.causal
from tracing.prompts import load_prompt_set, shipped_sets
from tracing.store import ResultStore

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "pages/categories.py"

pytestmark = pytest.mark.slow


@pytest.fixture
def fast_engine(monkeypatch, tmp_path):
    """The fake engine (the page hands ``tracing.causal.causal_trace``, looked up when the batch
    runs, to ``run_batch(trace=...)``) and an empty result store of this test's own."""
    monkeypatch.setenv("CAUSAL_TRACING_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(tracing.causal, "causal_trace", stand_in_trace)
    return tmp_path / "results"


def open_page() -> AppTest:
    """The page as a deep link opens it (its URL path is its file name): the default trace page
    does not run first, so only this page's traces reach the test's store."""
    at = AppTest.from_file(APP, default_timeout=600)
    at.switch_page(PAGE)
    at.run()
    return at


def charts(at: AppTest) -> list:
    return at.get("vega_lite_chart")


def summary(at: AppTest):
    """The category summary table (the data editor and the per-prompt table are dataframes too)."""
    return next(d.value for d in at.dataframe if "transition_std" in d.value.columns)


def test_page_renders_with_shipped_set(fast_engine):
    at = open_page()
    assert not at.exception
    assert not at.error
    assert any("54 prompts: 0 in the store, 54 to compute" in c.value for c in at.caption)
    assert at.button(key="cat_run").label == "Trace 54 missing prompt(s)"
    assert any("No traces yet" in i.value for i in at.info)


def test_run_shows_charts_and_reruns_from_the_store(fast_engine):
    at = open_page()
    at.selectbox(key="cat_choice").set_value("quick").run()
    at.number_input(key="cat_samples").set_value(2).run()
    assert at.button(key="cat_run").label == "Trace 9 missing prompt(s)"
    at.button(key="cat_run").click().run()
    assert not at.exception and not at.error
    assert any("Computed 9 trace(s), 0 from the store" in c.value for c in at.caption)
    assert any("9 in the store, 0 to compute" in c.value for c in at.caption)
    assert len(charts(at)) == 4  # heatmaps, lines, two scatter plots
    table = summary(at)
    assert list(table["group"]) == ["non_english", "plain_english", "semantic"]
    assert list(table["prompts"]) == [3, 3, 3]
    assert list(table["transition_layer"]) == [15.0, 15.0, 15.0]  # the fake rows cross mid-way
    assert len(list(ResultStore(fast_engine).keys())) == 9

    at.toggle(key="cat_combine").set_value(True).run()
    assert list(summary(at)["group"]) == ["regurgitation", "semantic"]

    # a bad choice (upload picked, nothing uploaded) keeps the set and the computed results
    at.selectbox(key="cat_choice").set_value("Upload a CSV…").run()
    assert not at.exception
    assert len(charts(at)) == 4

    # new settings: nothing stored for them yet
    at.number_input(key="cat_samples").set_value(3).run()
    assert any("0 in the store, 9 to compute" in c.value for c in at.caption)


def test_stored_results_are_shown_without_running(fast_engine, embedded):
    from tracing.batch import run_batch

    frame = load_prompt_set(shipped_sets()["quick"]).head(2)
    run_batch(embedded, frame, {"samples": 10}, ResultStore(fast_engine))
    at = open_page()
    at.selectbox(key="cat_choice").set_value("quick").run()
    assert any("2 in the store, 7 to compute" in c.value for c in at.caption)
    assert len(charts(at)) == 4
    assert not at.exception
