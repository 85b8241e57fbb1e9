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
from pages.state import Study
from tracing.prompts import load_prompt_set, shipped_sets
from tracing.store import ResultStore, result_key

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


def open_page(study: Study | None = None, query: dict | None = None) -> AppTest:
    """The page as a deep link opens it (its URL path is its file name): the default trace page
    does not run first, so only this page's traces reach the test's store. ``study``: the
    session's study (as the trace page would have set it); ``query``: the link's parameters."""
    at = AppTest.from_file(APP, default_timeout=600)
    if study is not None:
        at.session_state["study"] = study
    for name, value in (query or {}).items():
        at.query_params[name] = value
    at.switch_page(PAGE)
    at.run()
    return at


def stored(root) -> list:
    """Every trace in the store at ``root`` (read from disk)."""
    store = ResultStore(root)
    return [store.get(k) for k in store.keys()]


def query(at: AppTest) -> dict[str, str]:
    return {k: (v[-1] if isinstance(v, list) else v) for k, v in at.query_params.items()}


def batch_line(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("**Batch settings**"))


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
    at = open_page(Study(samples=2))
    at.selectbox(key="cat_choice").set_value("quick").run()
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
    at.toggle(key="cat_own").set_value(True).run()
    at.number_input(key="cat_samples").set_value(3).run()
    assert any("0 in the store, 9 to compute" in c.value for c in at.caption)


def test_stored_results_are_shown_without_running(fast_engine, embedded):
    from tracing.batch import run_batch

    frame = load_prompt_set(shipped_sets()["quick"]).head(2)
    run_batch(embedded, frame, {"samples": 10}, ResultStore(fast_engine))
    at = open_page(Study(samples=10))
    at.selectbox(key="cat_choice").set_value("quick").run()
    assert any("2 in the store, 7 to compute" in c.value for c in at.caption)
    assert len(charts(at)) == 4
    assert not at.exception


def expected_id(lm, prompt: str, expected: str) -> int:
    """The first token of ``expected`` after ``prompt``, from the tokenizer itself."""
    before = lm.tokenizer(prompt)["input_ids"]
    full = lm.tokenizer(prompt + expected)["input_ids"]
    assert full[: len(before)] == before
    return full[len(before)]


def test_a_row_or_a_point_opens_the_prompt_on_the_trace_page(fast_engine, embedded):
    """Issue 12's linked view: a per-prompt table row (or a scatter point) opens that prompt on
    the trace page as the study, with the batch's settings; the trace page finds the batch's
    trace in the store under the same key (no second copy) and does not recompute it."""
    at = open_page(Study(samples=2, metric="logit_diff", contrast=" Rome"))
    at.selectbox(key="cat_choice").set_value("quick").run()
    at.button(key="cat_run").click().run()
    frame = load_prompt_set(shipped_sets()["quick"])
    keys = set(ResultStore(fast_engine).keys())
    assert len(keys) == 9

    at.session_state["cat_prompts_0"] = {"selection": {"rows": [4], "columns": [], "cells": []}}
    at.run()
    assert not at.exception and not at.error
    assert [t.value for t in at.title] == ["Causal trace of one prompt"]
    row = frame.loc[4]
    study = at.session_state["study"]
    assert (study.prompt, study.target, study.subject, study.noise_by, study.subject_tokens) == (
        row["prompt"], row["expected"], row["subject"], "subject", "last")
    assert (study.samples, study.noise, study.kind, study.seed, study.corruption) == (2, 0.4, "hidden", 0, "gaussian")
    assert study.metric == "prob" and study.contrast == ""  # the batch traced p(expected), no contrast
    state = at.session_state["trace_state"]
    assert state.prompt == row["prompt"] and state.target == row["expected"] and state.samples == 2
    assert query(at)["prompt"] == row["prompt"]
    assert any("Loaded from the result store" in c.value for c in at.caption)  # not traced again
    assert set(ResultStore(fast_engine).keys()) == keys  # the batch's own entry: no duplicate
    # that key, made by hand: the subject's last token noised, the expected completion's first token
    noised = len(embedded.tokenizer(row["prompt"][: row["prompt"].index(row["subject"]) + len(row["subject"])])
                 ["input_ids"]) - 1
    settings = {"kind": "hidden", "noise": 0.4, "samples": 2, "seed": 0, "noised": [noised],
                "target": expected_id(embedded, row["prompt"], row["expected"])}
    assert result_key(embedded, row["prompt"], settings) in keys

    at.switch_page(PAGE).run()  # back: the old selection does not open the trace page again
    assert [t.value for t in at.title] == ["Category averages"] and not at.exception
    at.session_state["cat_scatter_clean_prob_1"] = {"selection": {"pick": [{"row": 7}]}}
    at.run()
    assert [t.value for t in at.title] == ["Causal trace of one prompt"]
    assert at.session_state["trace_state"].prompt == frame.loc[7, "prompt"]
    assert any("Loaded from the result store" in c.value for c in at.caption)
    assert set(ResultStore(fast_engine).keys()) == keys


def test_the_batch_follows_the_study_by_default(fast_engine):
    """Issue 12: kind, noise, samples, seed and window come from the study, shown on one line."""
    at = open_page(Study(kind="mlp", noise=0.7, samples=4, seed=5, window=3))
    assert not at.exception and not at.error
    assert batch_line(at) == ("**Batch settings** (from the study): MLP outputs · Gaussian noise 0.7 · "
                              "4 samples · seed 5 · window 3")
    assert "cat_samples" not in [w.key for w in at.number_input]  # the own form is hidden
    at.selectbox(key="cat_choice").set_value("quick").run()
    at.button(key="cat_run").click().run()
    assert not at.exception and not at.error
    traces = stored(fast_engine)
    assert len(traces) == 9
    for trace in traces:
        s = trace.settings
        assert (s["kind"], s["noise"], s["samples"], s["seed"], s["window"]) == ("mlp", 0.7, 4, 5, 3)
    assert "batch_samples" not in query(at) and query(at)["samples"] == "4"  # the study is in the URL


def test_a_study_the_batch_cannot_follow_says_what_it_uses(fast_engine):
    at = open_page(Study(kind="all", corruption="replace", replacement="The Statue of Liberty is in", noise=0.5,
                         convention="output"))
    assert not at.exception and not at.error
    assert batch_line(at).endswith("Hidden states · Gaussian noise 0.5 · 3 samples · seed 0")
    notes = " ".join(c.value for c in at.caption)
    assert "restores all three kinds" in notes and "hidden states" in notes
    assert "replaces the noised tokens" in notes and "Gaussian noise of 0.5 instead" in notes
    assert "block outputs" in notes


def test_own_settings_override_the_study_and_both_stay_stored(fast_engine):
    at = open_page(Study(samples=2))
    at.selectbox(key="cat_choice").set_value("quick").run()
    at.button(key="cat_run").click().run()
    at.toggle(key="cat_own").set_value(True).run()
    at.number_input(key="cat_samples").set_value(5).run()
    at.number_input(key="cat_noise").set_value(0.9).run()
    assert batch_line(at) == "**Batch settings** (own): Hidden states · Gaussian noise 0.9 · 5 samples · seed 0"
    assert any("0 in the store, 9 to compute" in c.value for c in at.caption)
    at.button(key="cat_run").click().run()
    assert not at.exception and not at.error
    assert sorted((t.settings["samples"], t.settings["noise"]) for t in stored(fast_engine)) == \
        [(2, 0.4)] * 9 + [(5, 0.9)] * 9
    assert (query(at)["own_settings"], query(at)["batch_samples"], query(at)["batch_noise"]) == ("1", "5", "0.9")
    at.toggle(key="cat_own").set_value(False).run()  # back to the study: its traces are still there
    assert any("9 in the store, 0 to compute" in c.value for c in at.caption)
    assert "batch_samples" not in query(at)
    at.toggle(key="cat_own").set_value(True).run()  # and the own values were kept
    assert at.number_input(key="cat_samples").value == 5
    assert any("9 in the store, 0 to compute" in c.value for c in at.caption)


def test_a_link_with_garbage_warns_and_takes_the_defaults(fast_engine):
    at = open_page(query={"own_settings": "1", "batch_samples": "many", "batch_kind": "<b>", "min_effect": "2",
                          "answer": "nope", "batch_noise": "0.6"})
    assert not at.exception and not at.error
    warned = " ".join(w.value for w in at.warning)
    for name in ("batch_samples", "batch_kind", "min_effect", "answer"):
        assert f"`{name}=" in warned, name
    assert batch_line(at) == "**Batch settings** (own): Hidden states · Gaussian noise 0.6 · 10 samples · seed 0"
    assert at.selectbox(key="cat_target").value == "expected"


def test_downloads_are_named_after_what_they_hold(fast_engine, monkeypatch):
    from pages import common

    names: dict[str, str] = {}
    real = common.download_button

    def record(label, data, file_name, mime, key, **kwargs):
        names[key] = file_name
        real(label, data, file_name, mime, key, **kwargs)

    monkeypatch.setattr(common, "download_button", record)
    at = open_page(Study(samples=2, noise=0.3, seed=4))
    at.selectbox(key="cat_choice").set_value("quick").run()
    at.button(key="cat_run").click().run()
    assert not at.exception
    stem = "quick_hidden_noise0.3_samples2_seed4"
    filters = f"{stem}_correct_only_min_effect0.05"
    assert names["cat_download_set"] == "quick_edited.csv"
    assert names["cat_download_prompts"] == f"category_prompts_{stem}.csv"
    assert names["cat_download_comparison"] == f"category_comparison_{filters}.csv"
    assert names["category-heatmaps-png"] == f"category_heatmaps_{filters}.png"
    assert names["category-lines-csv"] == f"category_lines_{filters}_sem.csv"
    assert names["transition-vs-clean_prob-svg"] == f"transition_vs_clean_prob_{filters}.svg"


def test_a_very_long_prompt_is_skipped_with_a_short_message(fast_engine, monkeypatch, tmp_path, embedded):
    """Bad input: a prompt longer than the model's context (and odd characters) in an uploaded set."""
    long_prompt = "The capital city of Wales is " + "very " * (embedded.n_ctx + 10) + "called"
    path = tmp_path / "odd.csv"
    path.write_text("category,prompt,expected,subject\n"
                    f"semantic,{long_prompt},\" Cardiff\",Wales\n"
                    "semantic,\"The capital city of \u2028France is called\",\" Paris\",France\n"
                    "semantic,The capital of Italy is,\" Rome\",Italy\n", encoding="utf-8")
    import tracing.prompts

    shipped = tracing.prompts.shipped_sets()
    monkeypatch.setattr(tracing.prompts, "shipped_sets", lambda: {**shipped, "odd": path})
    at = open_page(Study(samples=1))
    at.selectbox(key="cat_choice").set_value("odd").run()
    assert not at.exception
    skipped = [w.value for w in at.warning if w.value.startswith("Skipped")]
    assert len(skipped) == 1 and len(skipped[0]) < 500 and "context" in skipped[0]
    assert any("3 prompts: 0 in the store, 2 to compute, 1 skipped" in c.value for c in at.caption)
    at.button(key="cat_run").click().run()
    assert not at.exception and len(stored(fast_engine)) == 2


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


def test_scatter_tooltips_cut_very_long_prompts():
    import pandas as pd

    from tracing.charts.averages import TOOLTIP_CHARS, scatter_chart

    long = "word " * 5000
    table = pd.DataFrame({"category": ["semantic"], "prompt": [long], "expected": [" x"], "target": [" x"],
                          "noised_token": ["w"], "token_distance": [3], "clean_prob": [0.5], "effect": [0.3],
                          "transition_layer": [2.0], "n_layers": [10]})
    spec = scatter_chart(table).to_dict()
    point = spec["datasets"][next(iter(spec["datasets"]))][0]
    assert len(point["prompt"]) == TOOLTIP_CHARS and point["prompt"].startswith("word word") and point["prompt"][-1] == "…"
    assert table["prompt"][0] == long  # the table (and its CSV download) keeps the whole prompt
