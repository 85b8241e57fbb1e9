"""AppTest of pages/rome.py (ROME averages) with the embedded model: a two-fact run with one noise
sample, charts and exports, a re-run from the store, and bad input shown as an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "rome.py")

pytestmark = pytest.mark.slow


def open_page(**state) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=600)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    return at


def test_two_facts_run_chart_export_and_rerun_from_the_store(embedded):
    at = open_page(rome_limit=2, rome_samples=1)
    assert not at.exception and not at.error
    assert at.selectbox(key="rome_set").value == "facts"
    assert any("2 prompts · 2 to average" in c.value and "3 x std" in c.value for c in at.caption)
    assert at.button(key="rome_run").label == "Trace 2 missing"
    at.button(key="rome_run").click().run()
    assert not at.exception and not at.error
    assert any("Computed 2 trace(s)" in c.value for c in at.caption)
    assert any("2 prompts averaged" in c.value for c in at.caption)
    assert len(at.get("vega_lite_chart")) == 1
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"PNG", "SVG", "CSV", "Run card (JSON)"} <= labels
    again = open_page(rome_limit=2, rome_samples=1)  # a new session: everything from the store
    assert at.button(key="rome_run").disabled or again.button(key="rome_run").disabled
    assert any("0 trace(s) to compute" in c.value for c in again.caption)
    assert len(again.get("vega_lite_chart")) == 1


def test_bad_input_shows_an_error_and_the_page_keeps_running(embedded):
    at = open_page(rome_limit=2, rome_samples=1)
    at.multiselect(key="rome_kinds").set_value([]).run()
    assert not at.exception
    assert any("Pick at least one kind" in e.value for e in at.error)
    at.multiselect(key="rome_kinds").set_value(["mlp"]).run()
    assert not at.exception and not at.error
    assert at.button(key="rome_run").label == "Trace 2 missing"
