"""AppTest of the attention page on the embedded model: renders, computes, survives bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def open_page(tab: str = "By prompt type", prompt_set: str = "quick", **state) -> AppTest:
    """The attention page on one tab (tabs are lazy), with the small shipped set ``quick`` (and
    more widget values in ``state``)."""
    at = AppTest.from_file(APP, default_timeout=600)
    at.switch_page("pages/attention.py")  # a deep link: the trace page does not run first
    at.session_state["attn_set"] = prompt_set
    at.session_state["attn_tab"] = tab
    for key, value in state.items():
        at.session_state[key] = value
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
    at = open_page("Single prompt", attn_source="own")  # the study's prompt: tests/test_attention_study.py
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


# -- per-head causal effects (tracing.heads), with a stand-in for the head trace -----------------


def stand_in_head_trace(lm, prompt, noised, noise=None, samples=None, seed=None, token=-1, target=None,
                        progress=None, *, settings=None, **_):
    """A HeadTrace with the real tokenization and made-up numbers (instantly): the page's wiring,
    not the numbers, is under test here (tests/test_heads.py checks those)."""
    import numpy as np

    from tracing.heads import RECORD, HeadTrace, head_settings
    from tracing.model.tokens import token_strings, tokenize
    from tracing.settings import TraceSettings

    ids = tokenize(lm, prompt)
    t = token % len(ids)
    s = head_settings(settings or TraceSettings())
    prob = 0.1 + 0.6 * np.random.default_rng(len(prompt)).random((lm.n_layers, lm.n_heads))
    if progress is not None:
        progress(1, 1)
    return HeadTrace(prompt, token_strings(lm, ids), ids, sorted(noised), t, 0, " x",
                     {"prob": prob, "logprob": np.log(prob), "kl": 0.7 - prob}, {"prob": 0.1, "logprob": -2.3, "kl": 0.6},
                     {"prob": 0.7, "logprob": -0.36, "kl": 0.0},
                     {**s.to_dict(), "noised": sorted(noised), "token": t, "record": RECORD}, None, 0.4,
                     [(" x", 0.7)], [(" y", 0.2)])


@pytest.fixture
def fake_heads(monkeypatch):
    import tracing.heads

    calls = []

    def fake(*args, **kwargs):
        calls.append(args[1])
        return stand_in_head_trace(*args, **kwargs)

    monkeypatch.setattr(tracing.heads, "head_trace", fake)
    return calls


def effect_page(**state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    at.switch_page("pages/attention.py")
    at.session_state["attn_set"] = "quick"
    at.session_state["attn_tab"] = "Per-head grids"
    at.session_state["attn_head_view"] = "effect"
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.mark.slow
def test_causal_effect_view_per_type_from_the_store(fake_heads):
    at = effect_page()
    assert not errors(at), errors(at)
    run = at.button(key="attn_fx_run")
    assert "missing head trace" in run.label and not run.disabled
    run.click().run()
    assert not at.exception and not errors(at), errors(at)
    n = len(fake_heads)
    assert n >= 4  # the quick set's prompts (flagged ones skipped)
    assert len(at.get("vega_lite_chart")) == 3  # per-type grids, difference, per-prompt values
    at.selectbox(key="attn_fx_metric").set_value("prob").run()
    assert not at.exception and not errors(at) and len(at.get("vega_lite_chart")) == 3
    # a fresh session reads every head trace from the store: nothing is computed again
    again = effect_page()
    assert again.button(key="attn_fx_run").disabled and len(fake_heads) == n
    assert len(again.get("vega_lite_chart")) == 3
    # one prompt: its own grid, from the store
    again.radio(key="attn_fx_scope").set_value("one").run()
    assert not again.exception and not errors(again), errors(again)
    assert len(again.get("vega_lite_chart")) == 1 and len(fake_heads) == n
    assert any("Heads restoring most" in c.value for c in again.caption)
    # the weights view is still there, beside it
    again.radio(key="attn_head_view").set_value("attention").run()
    assert not again.exception and len(again.get("vega_lite_chart")) == 3


@pytest.mark.slow
def test_causal_effect_one_prompt_computes_when_missing(fake_heads):
    at = effect_page(attn_fx_scope="one", attn_fx_token="noised")
    assert not at.exception and not errors(at), errors(at)
    assert len(fake_heads) == 1 and len(at.get("vega_lite_chart")) == 1


def test_no_session_state_warnings(monkeypatch, fake_heads):
    """Issue 12 #10: no widget gets both a default value and a Session State value."""
    from streamlit.elements.lib import policies

    warned = []
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    monkeypatch.setattr(policies._LOGGER, "warning", lambda *a, **k: warned.append(a))
    at = effect_page(attn_skip_flagged=False)
    for tab in ("By prompt type", "Per-head grids", "Single prompt", "Long texts"):
        at.session_state["attn_tab"] = tab
        at.run()
        assert not at.exception
    assert warned == []


@pytest.mark.slow
def test_long_text_overlap_warning_and_disjoint_windows():
    at = open_page("Long texts")
    m_key = next(n.key for n in at.number_input if n.key.startswith("attn_long_m_"))
    assert any("overlap" in w.value and "Non-overlapping windows" in w.value for w in at.warning)  # 40 x 800
    at.toggle(key="attn_long_disjoint").set_value(True).run()
    assert any("non-overlapping windows of 800" in e for e in errors(at)), errors(at)
    at.number_input(key="attn_long_n").set_value(3)
    at.number_input(key=m_key).set_value(16)
    at.button(key="attn_long_go").click().run()
    assert not at.exception and not errors(at), errors(at)
    assert any("3 windows × 16 tokens" in c.value and "non-overlapping" in c.value for c in at.caption)
    assert not any("overlap" in w.value for w in at.warning)
