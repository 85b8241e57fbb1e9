"""The attention page opens on the study's prompt (issue 12, "one study across the pages"): its
compact per-layer chart checked against ``attention_to`` and ``attention_pattern``, the switch to
an own prompt, links with the page's own settings, bad input, download names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from pages.state import AttentionState, Study
from tracing.attention import attention_pattern, attention_to
from tracing.model.tokens import subject_positions, tokenize

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "pages/attention.py"
PROMPT, SUBJECT = "The Colosseum is located in the city of", "Colosseum"


def open_page(study: Study | None = None, query: dict | None = None, **state) -> AppTest:
    """The page as a deep link opens it, with the session's ``study`` and the link's ``query``."""
    at = AppTest.from_file(APP, default_timeout=600)
    if study is not None:
        at.session_state["study"] = study
    for key, value in state.items():
        at.session_state[key] = value
    for name, value in (query or {}).items():
        at.query_params[name] = value
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning]


def charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def chart_data(chart) -> dict[str, "object"]:
    """A drawn chart's datasets (name -> DataFrame), in the order of its layers."""
    frames = {d.name: dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data) for d in chart.proto.datasets}
    layers = json.loads(chart.proto.spec).get("layer", [])
    return [frames[layer["data"]["name"]] for layer in layers] if layers else list(frames.values())


def url(at: AppTest) -> dict[str, str]:
    return {k: (v[-1] if isinstance(v, list) else v) for k, v in at.query_params.items()}


# -- the page state in the URL (no model) --------------------------------------------------------


def test_state_round_trips_source_and_own_prompt():
    own = AttentionState(source="own", own_prompt="Paris is the capital of", layer=3, head="2")
    assert AttentionState.parse(own.to_query()) == (own, [])
    study = AttentionState(layer=4)
    query = study.to_query()
    assert query["source"] == "study" and "own_prompt" not in query  # the own prompt only when shown
    assert AttentionState.parse(query) == (study, [])


def test_garbage_source_and_layer_warn_and_take_their_defaults():
    state, problems = AttentionState.parse({"source": "mine", "layer": "-3", "head": "x", "own_prompt": ["a", "b"]})
    assert (state.source, state.layer, state.head, state.own_prompt) == ("study", None, "mean", "b")
    assert [p.split("=")[0] for p in problems] == ["`source", "`layer", "`head"]


# -- the page ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_opens_on_the_study_prompt_with_its_attention_per_layer(embedded):
    at = open_page(Study(prompt=PROMPT, subject=SUBJECT))
    assert not errors(at) and not warnings(at), (errors(at), warnings(at))
    assert at.radio(key="attn_source").value == "study"
    assert not at.text_input  # the study's prompt is shown, not typed
    assert any(PROMPT in m.value for m in at.markdown)  # the study box
    assert len(charts(at)) == 3  # per layer, pattern, final rows
    heads, lines = chart_data(charts(at)[0])
    # independently: the final token's attention to [first, *subject tokens, final]
    noised = subject_positions(embedded, PROMPT, SUBJECT, which="all")
    n = len(tokenize(embedded, PROMPT))
    weights = attention_to(embedded, PROMPT, [0, *noised, n - 1])
    expected = {"first": weights[..., 0], "noised": weights[..., 1:-1].sum(-1), "final": weights[..., -1]}
    assert len(noised) == 3 and len(lines) == 3 * embedded.n_layers
    for target, values in expected.items():
        mine = lines[lines["target"] == target].sort_values("layer")
        np.testing.assert_allclose(mine["mean"], values.mean(axis=1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mine["max"], values.max(axis=1), rtol=1e-5, atol=1e-7)
        assert (mine["top_head"].to_numpy() == values.argmax(axis=1)).all()
        dots = heads[heads["target"] == target].sort_values(["layer", "head"])
        np.testing.assert_allclose(dots["attention"], values.reshape(-1), rtol=1e-5, atol=1e-7)
    # the pattern view (another code path: the full pattern of the middle layer) agrees, noised marked
    layer = embedded.n_layers // 2
    pattern = attention_pattern(embedded, PROMPT, layer)
    cells = chart_data(charts(at)[1])[0]
    assert {int(k.split()[0]) for k in cells["key"] if k.endswith("*")} == set(noised)
    last_row = cells[cells["query"].str.startswith(f"{n - 1} ")].copy()
    last_row["index"] = last_row["key"].str.split().str[0].astype(int)
    np.testing.assert_allclose(last_row.sort_values("index")["attention"], pattern.mean(axis=0)[-1], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(pattern[:, -1, 0].mean(), expected["first"][layer].mean(), rtol=1e-5)
    assert url(at)["prompt"] == PROMPT and url(at)["source"] == "study" and "own_prompt" not in url(at)
    assert url(at)["tab"] == "Single prompt"


@pytest.mark.slow
def test_own_prompt_switch_and_back():
    at = open_page(Study(prompt=PROMPT, subject=SUBJECT))
    at.radio(key="attn_source").set_value("own").run()
    assert not at.exception and not errors(at)
    assert len(charts(at)) == 2  # pattern and final rows only
    at.text_input(key="attn_single_prompt").set_value("Paris is the capital of").run()
    assert not at.exception and not errors(at)
    keys = chart_data(charts(at)[0])[0]["key"]
    assert not any(k.endswith("*") for k in keys) and any("capital" in k for k in keys)
    assert url(at)["source"] == "own" and url(at)["own_prompt"] == "Paris is the capital of"
    assert url(at)["prompt"] == PROMPT  # the study stays in the link
    # another tab (twice: the single prompt's widgets are not drawn), then back: still my own prompt
    at.session_state["attn_tab"] = "Long texts"
    at.run()
    at.run()
    assert url(at)["source"] == "own" and url(at)["tab"] == "Long texts"
    at.session_state["attn_tab"] = "Single prompt"
    at.run()
    assert at.radio(key="attn_source").value == "own"
    assert at.text_input(key="attn_single_prompt").value == "Paris is the capital of"
    at.radio(key="attn_source").set_value("study").run()
    assert not at.exception and len(charts(at)) == 3


@pytest.mark.slow
def test_a_link_with_its_own_prompt_and_out_of_range_layer_and_head():
    at = open_page(query={"source": "own", "own_prompt": "Paris is the capital of", "layer": "99", "head": "42"})
    assert not errors(at), errors(at)
    warned = " ".join(warnings(at))
    assert "`layer=99` ignored" in warned and "`head=42` ignored" in warned, warned
    assert at.text_input(key="attn_single_prompt").value == "Paris is the capital of"
    assert at.slider(key="attn_single_layer_30").value == 15
    assert at.selectbox(key="attn_single_head_9").value == "mean over heads"
    assert len(charts(at)) == 2
    assert url(at)["layer"] == "15" and url(at)["head"] == "mean"
    # layer and head of a link that fit are used
    at = open_page(query={"source": "own", "own_prompt": "Paris is the capital of", "layer": "3", "head": "2"})
    assert not warnings(at) and at.slider(key="attn_single_layer_30").value == 3
    assert at.selectbox(key="attn_single_head_9").value == 2
    # a garbage source: a warning, the study's prompt
    at = open_page(query={"source": "bogus"})
    assert any("`source=bogus`" in w for w in warnings(at))
    assert at.radio(key="attn_source").value == "study" and len(charts(at)) == 3


@pytest.mark.slow
def test_bad_study_prompts_give_clear_messages():
    at = open_page(Study(prompt="   ", subject="x"))
    assert any("study's prompt cannot be measured" in e and "empty" in e for e in errors(at)), errors(at)
    assert not charts(at)
    at = open_page(Study(prompt=PROMPT, subject="Eiffel"))  # the subject is not in the prompt
    assert any("noised tokens" in e for e in errors(at)), errors(at)
    assert len(charts(at)) == 2  # the pattern view still works, nothing marked
    long = "The Colosseum is " + "very " * 120 + "old"
    at = open_page(Study(prompt=long, subject=SUBJECT))
    assert any("at most 90" in e for e in errors(at)), errors(at)
    assert len(charts(at)) == 1  # the per-layer chart covers every token
    # tab switches keep working
    at.session_state["attn_tab"] = "Long texts"
    at.run()
    assert not at.exception


@pytest.mark.slow
def test_downloads_are_named_after_what_they_hold(monkeypatch):
    from pages import common

    names: dict[str, str] = {}
    real = common.download_button

    def record(label, data, file_name, mime, key, **kwargs):
        names[key] = file_name
        real(label, data, file_name, mime, key, **kwargs)

    monkeypatch.setattr(common, "download_button", record)
    at = open_page(Study(prompt=PROMPT, subject=SUBJECT))
    stem = "The_Colosseum_is_located_in_the"
    assert names["attention_study_prompt-png"] == f"attention_final_token_{stem}_linear.png"
    assert names["attention_pattern-csv"] == f"attention_pattern_{stem}_L15_Hmean.csv"
    assert names["attention_final_rows-svg"] == f"attention_final_row_{stem}_L15.svg"
    at.selectbox(key="attn_single_head_9").set_value(4).run()
    assert names["attention_pattern-png"] == f"attention_pattern_{stem}_L15_H4.png"
