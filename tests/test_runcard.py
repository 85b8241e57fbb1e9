"""Page state from URLs, run cards, JSON/CSV exports and loading a run card back."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pandas as pd
import pytest

from factory import TOKENS, make_trace
from tracing import runcard
from tracing.causal import causal_trace
from tracing.runcard import RunCardError


class StubTokenizer:
    """Tokenizes the test prompt into TOKENS; anything else into one token per word."""

    def __call__(self, text: str, **_) -> dict:
        if text == "The Eiffel Tower is in":
            return {"input_ids": list(range(len(TOKENS)))}
        return {"input_ids": [100 + i for i, _ in enumerate(text.split())]}

    def decode(self, ids) -> str:
        return TOKENS[ids[0]] if ids[0] < len(TOKENS) else f" w{ids[0]}"


class StubModel:
    def __init__(self, name: str = "tiny", revision: str = "r1") -> None:
        self.name, self.revision, self.tokenizer = name, revision, StubTokenizer()


# ---------------------------------------------------------------------------------------------
# Page state


def test_defaults_are_the_eiffel_example():
    state, problems = runcard.parse_state({})
    assert problems == []
    assert state["prompt"] == "The Eiffel Tower is located in the city of"
    assert state["subject"] == "Eiffel Tower" and state["noise_by"] == "subject"
    assert state["noise"] == 0.4 and state["samples"] == 3 and state["kind"] == "hidden"
    assert state["sweep"] == [0.1, 0.3, 0.5, 1.0]


def test_query_values_are_parsed_and_typed():
    raw = {"prompt": "Hello there", "noise": "0.75", "samples": "5", "seed": "12", "kind": "all",
           "metric": "normalised", "convention": "output", "tokens": "2,0, 1", "window": "4",
           "noise_mode": "sigma", "sweep": "3,1,2", "sweep_on": "1", "target": " Paris",
           "corruption": "uniform", "subject_tokens": "last"}
    state, problems = runcard.parse_state(raw)
    assert problems == []
    assert state["noise"] == 0.75 and isinstance(state["samples"], int) and state["samples"] == 5
    assert state["tokens"] == [0, 1, 2] and state["noise_by"] == "tokens"
    assert state["sweep"] == [1.0, 2.0, 3.0] and state["sweep_on"] is True
    assert (state["kind"], state["metric"], state["convention"]) == ("all", "normalised", "output")
    assert state["target"] == " Paris" and state["subject_tokens"] == "last"


@pytest.mark.parametrize("name,value", [
    ("noise", "abc"), ("noise", "nan"), ("noise", "-1"), ("noise", "2.5"), ("samples", "0"),
    ("samples", "1.5"), ("samples", "many"), ("seed", "-3"), ("kind", "neurons"),
    ("metric", "accuracy"), ("convention", "middle"), ("tokens", "1,x"), ("window", "0"),
    ("sweep", ""), ("sweep", "0.1,9"), ("noise_mode", "relative"), ("corruption", "blur"),
    ("sweep_on", "maybe"), ("noise_by", "magic"), ("prompt", "x" * 30_000),
])
def test_garbage_values_fall_back_to_defaults_with_a_message(name, value):
    state, problems = runcard.parse_state({name: value, "seed": "5"} if name != "seed" else {name: value})
    assert len(problems) == 1 and f"`{name}=" in problems[0] and "ignored" in problems[0]
    assert state[name] == runcard.DEFAULTS[name]


def test_sigma_mode_allows_larger_noise():
    assert runcard.parse_state({"noise_mode": "sigma", "noise": "3"})[0]["noise"] == 3.0
    assert runcard.parse_state({"noise": "3"})[1]  # absolute: 0..2


def test_query_round_trip():
    state, _ = runcard.parse_state({"prompt": "A b", "tokens": "1", "noise": "0.13", "kind": "mlp",
                                    "target": " c", "sweep": "0.2,0.4", "seed": "9"})
    query = runcard.state_to_query(state)
    assert all(isinstance(v, str) for v in query.values())
    assert query["tokens"] == "1" and "subject" not in query
    again, problems = runcard.parse_state(query)
    assert problems == [] and again == state
    subject_state = runcard.parse_state({})[0]
    assert "tokens" not in runcard.state_to_query(subject_state)


def test_trace_request_for_picked_tokens():
    state, _ = runcard.parse_state({"prompt": "The Eiffel Tower is in", "tokens": "3", "noise": "0.5",
                                    "target": " Paris", "metric": "logit_diff", "contrast": " Rome"})
    request = runcard.trace_request(StubModel(), state, "attn")
    assert request.noised == [3]
    assert request.kwargs["kind"] == "attn" and request.kwargs["noise"] == 0.5
    assert request.kwargs["target"] == " Paris" and request.kwargs["contrast"] == " Rome"
    assert request.settings["noised"] == [3]
    assert set(request.settings) == {"kind", "noise", "samples", "seed", "target", "window",
                                     "corruption", "noise_mode", "replacement", "contrast",
                                     "convention", "noised"}
    plain = runcard.trace_request(StubModel(), {**state, "metric": "prob"}, noise=1.0)
    assert plain.kwargs["contrast"] is None and plain.kwargs["noise"] == 1.0
    with pytest.raises(ValueError, match="contrast"):
        runcard.trace_request(StubModel(), {**state, "contrast": ""})
    with pytest.raises(ValueError, match="pick at least one"):
        runcard.trace_request(StubModel(), {**state, "tokens": []})


# ---------------------------------------------------------------------------------------------
# Run cards and exports


def test_run_card_has_everything_to_reproduce():
    trace = make_trace()
    card = runcard.run_card(trace, "normalised", {"name": "tiny", "revision": "r1", "family": "llama"},
                            page={"prompt": trace.prompt})
    assert card["model"]["name"] == "tiny" and card["model"]["revision"] == "r1"
    assert card["prompt"] == trace.prompt and card["noised"] == [1, 2, 3]
    assert card["noised_tokens"] == [" E", "iffel", " Tower"]
    for key in ("corruption", "noise", "samples", "seed", "kind", "window", "metric", "convention"):
        assert card[key] is not None, key
    assert card["metric"] == "normalised" and card["target"] == " Paris"
    assert card["target_from"] == "clean top-1 token"
    assert {"torch", "transformers", "python", "altair"} <= set(card["versions"])
    json.dumps(card)


def test_json_export_round_trips_exactly():
    trace = make_trace(contrast=" Rome")
    page = runcard.parse_state({"prompt": trace.prompt, "tokens": "1,2,3", "metric": "logit_diff",
                                "contrast": " Rome", "samples": "3"})[0]
    text = runcard.to_json(trace, "logit_diff", page=page)
    payload = json.loads(text)
    assert payload["numbers"]["metrics"]["prob"] == trace.scores.tolist()
    assert payload["numbers"]["metrics"]["normalised"] == trace.normalised().tolist()
    loaded = runcard.load_run_card(text.encode(), StubModel())
    assert loaded.state == page
    back = loaded.trace
    for name, values in trace.metrics.items():
        assert np.array_equal(back.metrics[name], values), name
    assert back.tokens == trace.tokens and back.noised == trace.noised
    assert back.settings == trace.settings and back.target == trace.target
    assert back.clean_top == trace.clean_top and back.metric_low == trace.metric_low


def test_csv_export():
    trace = make_trace()
    frame = pd.read_csv(io.StringIO(runcard.to_csv(trace, "prob", {"name": "tiny", "revision": "r1"})),
                        keep_default_na=False)
    assert len(frame) == trace.scores.size
    assert {"token_index", "token", "noised", "layer", "prob", "normalised", "logprob", "kl",
            "model", "revision", "noise", "samples", "seed", "kind", "corruption"} <= set(frame.columns)
    wide = frame.pivot(index="token_index", columns="layer", values="prob").to_numpy()
    assert np.array_equal(wide, trace.scores)  # written exactly
    assert frame["token"].tolist()[:: trace.n_layers] == TOKENS
    assert (frame["model"] == "tiny").all() and (frame["noise"] == 0.4).all()


def test_card_without_numbers_or_page_still_loads():
    card = runcard.run_card(make_trace(), "prob", {"name": "tiny", "revision": "r1"})
    loaded = runcard.load_run_card(json.dumps(card), StubModel())
    assert loaded.trace is None and loaded.notes
    assert loaded.state["noise_by"] == "tokens" and loaded.state["tokens"] == [1, 2, 3]
    assert loaded.state["prompt"] == "The Eiffel Tower is in"


@pytest.mark.parametrize("data,match", [
    (b"\x89PNG not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"hello": 1}', "not a run card"),
    ('{"run_card": {"format": "causal-tracing run card", "version": 99}}', "version"),
])
def test_malformed_cards_are_refused_clearly(data, match):
    with pytest.raises(RunCardError, match=match):
        runcard.load_run_card(data, StubModel())


def test_cards_from_another_model_or_revision_are_refused():
    text = runcard.to_json(make_trace())
    with pytest.raises(RunCardError, match="from the model 'tiny'.*'gpt2' is loaded"):
        runcard.load_run_card(text, StubModel("gpt2"))
    with pytest.raises(RunCardError, match="revision 'r1'"):
        runcard.load_run_card(text, StubModel("tiny", "r2"))
    runcard.load_run_card(text, StubModel())  # the right one loads


def test_run_cards_from_another_real_model_or_revision_are_refused(tiny):
    made_on = tiny("gpt2")
    trace = causal_trace(made_on, runcard.EXAMPLE_PROMPT, [1, 2, 3], samples=1)  # the page's default prompt
    text = runcard.to_json(trace, "prob", made_on.facts(), runcard.parse_state({})[0])
    loaded = runcard.load_run_card(text, made_on)
    np.testing.assert_array_equal(loaded.trace.scores, trace.scores)
    with pytest.raises(runcard.RunCardError, match="'tiny-gpt2'.*'tiny-llama' is loaded"):
        runcard.load_run_card(text, tiny("llama"))
    other_revision = dataclasses.replace(made_on, revision="0123abc")
    with pytest.raises(runcard.RunCardError, match="revision"):
        runcard.load_run_card(text, other_revision)
    card = json.loads(text)
    card["run_card"]["model"]["name"] = None
    with pytest.raises(runcard.RunCardError, match="which model"):
        runcard.load_run_card(json.dumps(card), made_on)


def test_cards_with_bad_settings_or_numbers_are_refused():
    payload = json.loads(runcard.to_json(make_trace(), page=runcard.parse_state({})[0]))
    bad = json.loads(json.dumps(payload))
    bad["run_card"]["page"]["noise"] = "loud"
    with pytest.raises(RunCardError, match="invalid settings.*noise"):
        runcard.load_run_card(json.dumps(bad), None)
    bad = json.loads(json.dumps(payload))
    bad["numbers"]["metrics"]["prob"] = [[1.0, 2.0]]
    with pytest.raises(RunCardError, match="numbers .* malformed"):
        runcard.load_run_card(json.dumps(bad), None)
    bad = json.loads(json.dumps(payload))
    del bad["run_card"]["model"]
    with pytest.raises(RunCardError, match="which model"):
        runcard.load_run_card(json.dumps(bad), None)
    bad = json.loads(json.dumps(payload))
    bad["run_card"]["tokens"] = ["other"]
    bad["run_card"]["page"]["prompt"] = "The Eiffel Tower is in"
    with pytest.raises(RunCardError, match="tokenization"):
        runcard.load_run_card(json.dumps(bad), StubModel())


@pytest.mark.slow
def test_trace_request_with_the_embedded_model(embedded):
    state = runcard.parse_state({})[0]
    request = runcard.trace_request(embedded, state)
    assert request.noised == [1, 2, 3]  # " E", "iffel", " Tower"
    last = runcard.trace_request(embedded, {**state, "subject_tokens": "last"})
    assert last.noised == [3]
    with pytest.raises(ValueError, match="does not occur"):
        runcard.trace_request(embedded, {**state, "subject": "Colosseum"})
