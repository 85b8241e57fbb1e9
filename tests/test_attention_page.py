"""AppTest of the attention page on the embedded model: renders, computes, survives bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def open_page(tab: str = "By prompt type", prompt_set: str = "quick") -> AppTest:
    """The attention page on one tab (tabs are lazy), with the small shipped set ``quick``."""
    at = AppTest.from_file(APP, default_timeout=600)
    at.switch_page("pages/attention.py")  # a deep link: the trace page does not run first
    at.session_state["attn_set"] = prompt_set
    at.session_state["attn_tab"] = tab
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


@pytest.mark.slow
def test_page_renders_prompt_set_views():
    at = open_page()
    assert at.title[0].value == "Attention"
    assert not errors(at), errors(at)
    assert "quick" in at.selectbox(key="attn_set").options
    assert any("prompts** from `quick`" in c.value for c in at.caption)
    assert len(at.get("vega_lite_chart")) == 2  # by type, types compared
    at.radio(key="attn_type_scale").set_value("log").run()
    assert not at.exception and not errors(at)
    at.session_state["attn_tab"] = "Per-head grids"
    at.run()
    assert not at.exception and not errors(at)
    assert len(at.get("vega_lite_chart")) == 3  # grids, difference, per-prompt values
    at.selectbox(key="attn_head_target").set_value("noised").run()
    assert not at.exception and not errors(at)
    assert any("prompts** from `quick`" in c.value for c in at.caption)  # the set survived the tab switch
    assert len(at.dataframe) >= 1


@pytest.mark.slow
def test_single_prompt_bad_input_then_recovers():
    at = open_page("Single prompt")
    assert len(at.get("vega_lite_chart")) == 2  # pattern, final rows
    assert not any("prompts** from" in c.value for c in at.caption)  # lazy tabs: no prompt set run
    at.text_input(key="attn_single_prompt").set_value("   ").run()
    assert not at.exception
    assert any("empty" in e for e in errors(at))
    at.text_input(key="attn_single_prompt").set_value("word " * 200).run()
    assert not at.exception
    assert any("at most" in e for e in errors(at)), errors(at)
    at.text_input(key="attn_single_prompt").set_value("Paris is the capital of").run()
    assert not at.exception and not errors(at)
    assert len(at.get("vega_lite_chart")) == 2


@pytest.mark.slow
def test_long_text_small_run_and_bad_length_keeps_result():
    at = open_page("Long texts")
    m_key = next(n.key for n in at.number_input if n.key.startswith("attn_long_m_"))
    at.number_input(key="attn_long_n").set_value(2)
    at.number_input(key=m_key).set_value(24)
    at.button(key="attn_long_go").click().run()
    assert not at.exception and not errors(at), errors(at)
    assert any("2 windows × 24 tokens" in c.value for c in at.caption)
    assert len(at.metric) == 3
    # A window longer than the default text: a clear error, the previous result stays.
    at.number_input(key=m_key).set_value(8000)
    at.button(key="attn_long_go").click().run()
    assert not at.exception
    assert any("tokens" in e and "at most" in e for e in errors(at)), errors(at)
    assert any("2 windows × 24 tokens" in c.value for c in at.caption)
