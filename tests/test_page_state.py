"""The pages' typed URL state (pages/state.py): plain tests, no Streamlit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pages.state import (ATTENTION_TABS, STUDY_KEYS, UPLOAD, AttentionState, CategoriesState, HiddenState, RomeState,
                         Study, TraceState)
from tracing import runcard
from tracing.settings import DEFAULTS, INTERACTIVE, SAMPLES_RANGE

STATES = (TraceState, CategoriesState, AttentionState, HiddenState, RomeState, Study)


def test_the_state_module_does_not_import_streamlit():
    tree = ast.parse((Path(__file__).resolve().parents[1] / "pages" / "state.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.split(".")[0] == "streamlit" for name in names)


@pytest.mark.parametrize("cls", STATES)
def test_defaults_round_trip(cls):
    state, problems = cls.parse({})
    assert problems == [] and state == cls()
    again, problems = cls.parse(state.to_query())
    assert problems == [] and again == state
    assert all(isinstance(v, str) for v in state.to_query().values())


def test_states_are_frozen():
    with pytest.raises(AttributeError):
        TraceState().noise = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        CategoriesState().samples = 3  # type: ignore[misc]


# -- trace page -----------------------------------------------------------------------------------


def test_trace_state_wraps_the_run_card_state():
    assert TraceState().to_dict() == runcard.DEFAULTS
    assert TraceState().samples == INTERACTIVE.samples
    state = TraceState(prompt="The Eiffel Tower is in", noise_by="tokens", tokens=(3, 1), noise=0.25,
                       metric="normalised", convention="output", sweep=(0.1, 0.5), sweep_on=True)
    assert state.tokens == (3, 1) and state["noise"] == 0.25 and dict(state)["metric"] == "normalised"
    assert state["tokens"] == [3, 1] and state["sweep"] == [0.1, 0.5]  # the mapping: runcard's form
    assert TraceState()["sweep"] == runcard.DEFAULTS["sweep"]
    assert state.to_query() == runcard.state_to_query(state.to_dict())
    again, problems = TraceState.parse(state.to_query())
    assert not problems
    assert again == state.replace(tokens=(1, 3))  # indices come back sorted
    assert state.replace(seed=7).seed == 7 and state.seed == 0


def test_trace_state_bad_values_warn_and_fall_back():
    state, problems = TraceState.parse({"noise": "loud", "kind": "neurons", "metric": "42",
                                        "samples": "0", "tokens": "1,2,x"})
    said = " ".join(problems)
    assert "`noise=loud` ignored" in said and "`kind=neurons` ignored" in said
    assert "`metric=42` ignored" in said and "`samples=0` ignored" in said and "`tokens=" in said
    assert state.noise == INTERACTIVE.noise and state.kind == "hidden" and state.metric == "prob"
    assert state.samples == INTERACTIVE.samples and state.tokens == ()


def test_trace_state_is_what_the_run_card_functions_take():
    state = TraceState(kind="mlp", window=5)
    assert runcard.state_to_query(state)["window"] == "5"
    page = {**state.to_dict(), "kind": "attn"}
    assert page["tokens"] == [] and page["sweep"] == list(runcard.DEFAULT_SWEEP)


# -- categories page ------------------------------------------------------------------------------


def test_categories_state_follows_the_study_unless_told_otherwise():
    state = CategoriesState()
    assert not state.own_settings
    study = Study(kind="mlp", noise=0.7, samples=4, seed=5, window=3)
    assert state.batch_settings(study) == {"kind": "mlp", "noise": 0.7, "noise_mode": "absolute",
                                           "samples": 4, "seed": 5, "window": 3}
    assert Study(kind="all").batch_settings()["kind"] == "hidden"  # a batch traces one kind
    own = CategoriesState(own_settings=True, batch_kind="hidden", batch_samples=2)
    assert own.batch_settings(study) == {"kind": "hidden", "noise": DEFAULTS.noise, "noise_mode": "absolute",
                                         "samples": 2, "seed": DEFAULTS.seed}
    assert "batch_noise" not in state.to_query() and "batch_noise" in own.to_query()


def test_categories_state_round_trip_and_problems():
    state = CategoriesState(prompt_set="quick", own_settings=True, batch_kind="attn", batch_noise=3.0,
                            batch_noise_mode="sigma", batch_samples=2, batch_seed=9, answer="top1",
                            batch_window=6, correct_only=False, combine=True, spread="std", min_effect=0.1)
    assert CategoriesState.parse(state.to_query()) == (state, [])
    bad, problems = CategoriesState.parse({"batch_samples": str(SAMPLES_RANGE[1] + 1), "batch_kind": "all",
                                           "prompt_set": "nope", "combine": "maybe",
                                           "batch_noise": "5", "batch_noise_mode": "absolute"})
    said = " ".join(problems)
    assert len(problems) == 5
    assert "`batch_samples=101` ignored" in said and "`batch_kind=all` ignored" in said
    assert "`prompt_set=nope` ignored" in said and "`combine=maybe` ignored" in said
    assert "`batch_noise=5` ignored" in said  # above the absolute range
    assert bad == CategoriesState()
    assert CategoriesState.parse({"prompt_set": UPLOAD})[0].prompt_set == UPLOAD


# -- the study every page shares ------------------------------------------------------------------


def test_study_round_trips_through_any_pages_url():
    study = Study(model="gpt2-xl", prompt="Paris is the capital of", noise_by="tokens", tokens=(0, 2),
                  target=" France", noise=0.3, samples=2, seed=4, kind="mlp", window=5)
    query = study.to_query()
    assert query["model"] == "gpt2-xl" and query["tokens"] == "0,2" and "subject" not in query
    page = {**query, **AttentionState(layer=3).to_query()}  # another page's link carries it too
    assert Study.parse(page) == (study, [])
    assert Study.from_trace(TraceState(**study.trace_fields()), "gpt2-xl") == study


def test_study_bad_values_warn_and_fall_back():
    study, problems = Study.parse({"model": "x" * 5000, "noise": "loud", "samples": "-3"})
    said = " ".join(problems)
    assert len(problems) == 3 and "`model=" in said and "`noise=loud` ignored" in said
    assert study == Study()


def test_page_urls_never_collide_with_the_study():
    for cls in (CategoriesState, AttentionState, HiddenState, RomeState):
        assert not STUDY_KEYS & set(cls().to_query()), cls.__name__
    assert set(Study().to_query()) <= set(TraceState().to_query()) | {"model"}  # the trace page's names


# -- attention page -------------------------------------------------------------------------------


def test_attention_state_round_trip_and_problems():
    state = AttentionState(tab=ATTENTION_TABS[3], prompt_set="quick", skip_flagged=False, only_right=True,
                           to_token="first", source="own", own_prompt="Paris is", layer=7, head="2", long_n=3, long_m=24,
                           long_seed=5)
    assert AttentionState.parse(state.to_query()) == (state, [])
    assert "layer" not in AttentionState().to_query()  # the model's middle layer
    bad, problems = AttentionState.parse({"tab": "Nope", "layer": "-1", "head": "h", "long_n": "0"})
    assert len(problems) == 4 and bad == AttentionState()
    assert "`head=h` ignored" in " ".join(problems)
    assert AttentionState.parse({"head": "mean"})[0].head == "mean"


# -- hidden-states page ---------------------------------------------------------------------------


def test_hidden_state_round_trip_and_problems():
    state = HiddenState(prompt_set="quick", combine=False, spread="sem", per_prompt=True, crop=(3, 20),
                        measures=("norm", "step"), top_k=3, lens_scale="rank")
    query = state.to_query()
    assert query["crop"] == "3-20" and query["measures"] == "norm,step"
    assert HiddenState.parse(query) == (state, [])
    bad, problems = HiddenState.parse({"crop": "20-3", "measures": "norm,colour", "top_k": "11",
                                       "spread": "wide"})
    said = " ".join(problems)
    assert len(problems) == 4 and bad == HiddenState()
    assert "`crop=20-3` ignored" in said and "'colour' is not one of" in said
