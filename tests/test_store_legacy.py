"""A trace the trace page stored before answers were keyed as token ids (its completion's text in
the key) is still found by the page, and re-filed under the new key (tracing.store)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from factory import stand_in_trace
from streamlit.testing.v1 import AppTest

from pages.state import Study, TraceState
from tracing import runcard
from tracing.store import ResultStore, legacy_key, result_key

APP = str(Path(__file__).resolve().parents[1] / "app.py")

pytestmark = pytest.mark.slow


def test_the_trace_page_finds_an_entry_under_its_legacy_key(results_dir, embedded):
    study = Study(prompt="The Eiffel Tower is located in", subject="Eiffel Tower", subject_tokens="last",
                  target=" Paris", samples=1, seed=7)
    request = runcard.trace_request(embedded, TraceState().replace(**study.trace_fields()))
    assert request.settings["target"] == " Paris"
    old, new = legacy_key(embedded, request.prompt, request.settings), result_key(embedded, request.prompt,
                                                                                  request.settings)
    assert old != new
    trace = stand_in_trace(embedded, request.prompt, request.noised, samples=1, seed=7, target=" Paris")
    ResultStore(results_dir).put(old, dataclasses.replace(trace, settings=dict(request.settings)))

    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["study"] = study
    at.run()
    assert not at.exception and not at.error
    assert any("Loaded from the result store" in c.value for c in at.caption)  # found, not traced
    assert list(ResultStore(results_dir).keys()) == [new]  # re-filed under the new key, once
    # the new key is the id's: " Paris" as the tokenizer splits it after the prompt
    ids = embedded.tokenizer(request.prompt + " Paris")["input_ids"]
    paris = ids[len(embedded.tokenizer(request.prompt)["input_ids"])]
    assert new == result_key(embedded, request.prompt, {**request.settings, "target": paris})
