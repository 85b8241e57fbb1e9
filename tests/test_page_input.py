"""Bad input at the app level: garbage in the trace page's URL query string, and a model that
fails to load in the sidebar (AppTest, the embedded model). The library's bad-input cases live
beside their modules (test_causal.py, test_attention.py, test_hidden.py, test_prompts.py,
test_runcard.py, test_store.py, test_batch.py); these exercise the pages (pages/trace.py and the
sidebar in pages/common.py), whose tests are test_trace_page.py and test_app.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import tracing
from tracing import runcard

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def _app(params: dict | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=600)
    for key, value in (params or {}).items():
        at.query_params[key] = value
    return at.run()


SMALL = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "samples": "1"}


@pytest.mark.slow
def test_garbage_query_strings_on_the_trace_page_warn_and_use_defaults():
    garbage = {"seed": "abc", "window": "1e99", "noise": "inf", "noise_mode": "relative",
               "corruption": "blur", "convention": "middle", "subject_tokens": "some",
               "sweep": "a,b", "sweep_on": "maybe", "metric": "<script>alert(1)</script>",
               "kind": ""}
    at = _app({**SMALL, **garbage, "unknown_key": "whatever"})
    assert not at.exception, at.exception
    warned = " ".join(w.value for w in at.warning)
    for name in garbage:
        assert f"`{name}=" in warned, (name, warned)
    state = at.session_state["trace_state"]
    for name in garbage:
        assert state[name] == runcard.DEFAULTS[name], name
    assert at.get("vega_lite_chart"), "no heatmap with the defaults"
    assert not [e.value for e in at.error]
    # the URL now holds the clean values
    query = {k: (v[-1] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert query["seed"] == str(runcard.DEFAULTS["seed"]) and query["corruption"] == "gaussian"
    # a second run of the same session does not warn again and keeps working
    at.run()
    assert not at.exception and at.get("vega_lite_chart")


@pytest.mark.slow
def test_negative_and_huge_numbers_in_the_query_string():
    at = _app({**SMALL, "samples": "-5", "seed": "-1", "window": "99999999999999999999",
               "tokens": "-1,99999999999999999999", "noise_by": "subject"})
    assert not at.exception, at.exception
    warned = " ".join(w.value for w in at.warning)
    for name in ("samples", "seed", "window", "tokens"):
        assert f"`{name}=" in warned, (name, warned)
    assert at.get("vega_lite_chart")


def _model_picker(at):
    return at.sidebar.selectbox[0]


def _sidebar_errors(at) -> list[str]:
    return [e.value for e in at.sidebar.error]


@pytest.mark.slow
@pytest.mark.parametrize("bogus, message", [
    ("./no/such/model-folder", "not a model folder"),
    ("not a model name!", "is not a model name"),
    ("missing-model.gguf", "No GGUF file"),
])
def test_a_failed_model_load_shows_an_error_and_keeps_the_model(bogus, message):
    at = _app(SMALL)
    assert not at.exception and at.get("vega_lite_chart")
    heatmap = at.get("vega_lite_chart")[0].proto.spec
    _model_picker(at).set_value(common_other()).run()
    assert not at.exception
    at.sidebar.text_input[0].set_value(bogus).run()
    assert not at.exception, at.exception
    said = " ".join(_sidebar_errors(at))
    assert message in said and f"Still using **{tracing.DEFAULT_MODEL}**" in said, said
    assert at.session_state["model_name"] == tracing.DEFAULT_MODEL
    assert any(tracing.DEFAULT_MODEL in c.value for c in at.sidebar.caption)
    assert at.get("vega_lite_chart") and at.get("vega_lite_chart")[0].proto.spec == heatmap
    # the page keeps working: another setting traces on the kept model
    at.text_area(key="trace_prompt").set_value("The Colosseum is in").run()
    at.text_input(key="trace_subject").set_value("Colosseum").run()
    assert not at.exception and not [e.value for e in at.error if "Still using" not in e.value]
    assert at.session_state["trace_shown"]["traces"]["hidden"].prompt == "The Colosseum is in"
    # picking the embedded model again clears the error
    _model_picker(at).set_value(tracing.DEFAULT_MODEL).run()
    assert not at.exception and not _sidebar_errors(at)


def common_other() -> str:
    """The sidebar's "Other" option, from the pages' shared module (wherever app.py keeps it)."""
    import importlib
    import re as _re

    folder = _re.search(r'st\.Page\("([^/"]+)/', Path(APP).read_text()).group(1)
    return importlib.import_module(f"{folder}.common").OTHER


@pytest.mark.slow
def test_a_failed_model_name_is_not_loaded_again_on_every_rerun(monkeypatch):
    """While a bad name sits in the sidebar box, every rerun (every slider move, on every page)
    tries to load it again: for a hub id that is a network check of up to 4 s each time."""
    attempts: list[str] = []
    real = tracing.load_model

    def counting(name, *args, **kwargs):
        attempts.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(tracing, "load_model", counting)
    at = _app(SMALL)
    _model_picker(at).set_value(common_other()).run()
    at.sidebar.text_input[0].set_value("./no/such/model-folder").run()
    assert any("not a model folder" in e for e in _sidebar_errors(at))
    for noise in (0.5, 0.4):
        at.slider(key="trace_noise").set_value(noise).run()
        assert not at.exception
        assert any("not a model folder" in e for e in _sidebar_errors(at)), "the error went away"
    assert attempts.count("./no/such/model-folder") == 1, attempts
