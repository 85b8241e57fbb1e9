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
    return next(d.value for d in at.dataframe if "transition layer std" in d.value.columns)


def comparison(at: AppTest):
    """The table comparing every pair of categories."""
    return next(d.value for d in at.dataframe if "p (permutation)" in d.value.columns)


RAW_NAMES = {"transition_std", "clean_prob", "transition_layer", "token_distance", "corrupted_prob",
             "noised_token", "p_value", "ci_low"}


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
    assert list(table["category"]) == ["Non-English regurgitation", "Plain-English regurgitation", "Semantic recall"]
    assert list(table["prompts"]) == [3, 3, 3]
    assert list(table["mean transition layer"]) == [15.0, 15.0, 15.0]  # the fake rows cross mid-way
    assert list(table["no transition (left out)"]) == [0, 0, 0]
    assert len(list(ResultStore(fast_engine).keys())) == 9
    # issue 12 item 12: human column labels in every table the page shows (not the set's editor)
    for frame in at.dataframe:
        if frame.key != "cat_editor_quick":
            assert not RAW_NAMES & set(frame.value.columns), list(frame.value.columns)
    # the seed's claim with statistics: every pair, same transition everywhere -> no difference
    pairs = comparison(at)
    assert list(zip(pairs["B"], pairs["A"])) == [
        ("Plain-English regurgitation", "Non-English regurgitation"),
        ("Semantic recall", "Non-English regurgitation"), ("Semantic recall", "Plain-English regurgitation")]
    assert list(pairs["B − A (layers)"]) == [0.0, 0.0, 0.0]
    assert list(pairs["p (permutation)"]) == [1.0, 1.0, 1.0]
    assert list(pairs["prompts A"]) == [3, 3, 3]

    at.radio(key="cat_spread").set_value("ci").run()  # bootstrap bands on the averaged curves
    assert not at.exception and not at.error
    assert len(charts(at)) == 4
    assert "bootstrap 95% interval" in str(charts(at)[1].proto.spec)

    at.toggle(key="cat_combine").set_value(True).run()
    assert list(summary(at)["category"]) == ["Regurgitation (combined)", "Semantic recall"]
    assert list(comparison(at)["prompts A"]) == [6]

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


def test_a_row_or_a_point_opens_the_prompt_on_the_trace_page(fast_engine):
    """Issue 12's linked view: a per-prompt table row (or a scatter point) opens that prompt on
    the trace page with the batch's settings, its trace read from the store, not recomputed."""
    at = open_page()
    at.selectbox(key="cat_choice").set_value("quick").run()
    at.number_input(key="cat_samples").set_value(2).run()
    at.button(key="cat_run").click().run()
    frame = load_prompt_set(shipped_sets()["quick"])
    stored = len(list(ResultStore(fast_engine).keys()))

    at.session_state["cat_prompts_0"] = {"selection": {"rows": [4], "columns": [], "cells": []}}
    at.run()
    assert not at.exception and not at.error
    assert [t.value for t in at.title] == ["Causal trace of one prompt"]
    state = at.session_state["trace_state"]
    assert state.prompt == frame.loc[4, "prompt"] and state.target == frame.loc[4, "expected"]
    assert (state.samples, state.noise, state.kind, state.seed) == (2, 0.4, "hidden", 0)
    assert state.noise_by == "subject" and state.subject == frame.loc[4, "subject"] and state.subject_tokens == "last"
    assert at.query_params["prompt"] == [frame.loc[4, "prompt"]] or at.query_params["prompt"] == frame.loc[4, "prompt"]
    assert any("Loaded from the result store" in c.value for c in at.caption)  # not traced again
    assert len(list(ResultStore(fast_engine).keys())) == stored + 1  # the same trace, under the page's key

    at.switch_page(PAGE).run()  # back: the old selection does not open the trace page again
    assert [t.value for t in at.title] == ["Category averages"] and not at.exception
    at.session_state["cat_scatter_clean_prob_1"] = {"selection": {"pick": [{"row": 7}]}}
    at.run()
    assert [t.value for t in at.title] == ["Causal trace of one prompt"]
    assert at.session_state["trace_state"].prompt == frame.loc[7, "prompt"]


def test_prompt_bar_restarts_for_each_prompt():
    """Issue 12 item 13: the per-prompt bar never shows the previous prompt's count."""
    from pages.categories import PromptProgress

    class Bar:
        def progress(self, value, text=""):
            self.value, self.text = value, text

    bar = Bar()
    progress = PromptProgress(bar, ["first prompt", "second prompt", "third"])
    assert (bar.value, bar.text.split(":")[0]) == (0.0, "prompt 1 / 3 (first prompt)")
    assert progress(90, 100) is True
    assert bar.value == 0.9 and "90 % of its work" in bar.text
    progress.start(1)  # the batch reports prompt 1 done
    assert bar.value == 0.0 and bar.text.startswith("prompt 2 / 3 (second prompt): 0 %")
    progress(1, 4)
    assert bar.value == 0.25 and "25 %" in bar.text
    progress.start(3)
    assert bar.text == "all prompts done"


def test_scatter_points_are_jittered_and_carry_their_prompt_row():
    """Issue 12 item 5: prompts with equal values do not hide each other; hover shows the true
    values; a clicked point names its row of the full per-prompt table."""
    import pandas as pd

    from tracing.charts.averages import PICK, scatter_chart

    table = pd.DataFrame({"category": ["semantic"] * 5, "prompt": list("abcde"), "expected": list("vwxyz"),
                          "target": list("vwxyz"), "noised_token": list("pqrst"), "token_distance": [2] * 5,
                          "clean_prob": [0.5] * 5, "effect": [0.3] * 5, "transition_layer": [3.0] * 5,
                          "n_layers": [10] * 5})
    spec = scatter_chart(table.iloc[2:], "token_distance").to_dict()
    points = spec["datasets"][next(iter(spec["datasets"]))]
    assert [p["row"] for p in points] == [2, 3, 4]  # index labels, not positions in the part drawn
    assert len({(p["x_shown"], p["y_shown"]) for p in points}) == 3  # same values, distinct points
    assert all(abs(p["y_shown"] - 3.0) <= 0.25 and abs(p["x_shown"] - 2) <= 0.25 for p in points)
    assert spec["encoding"]["y"]["field"] == "y_shown" and spec["params"][0]["name"] == PICK
    shown = {t["field"] for t in spec["encoding"]["tooltip"]}
    assert {"prompt", "transition_layer", "token_distance", "clean_prob"} <= shown  # true values on hover
