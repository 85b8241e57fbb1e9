"""The ROME page's URL state (pages.state.RomeState): round trip, garbage, no clash with the study."""

from __future__ import annotations

from pages.state import STUDY_KEYS, RomeState


def test_round_trip_of_every_setting():
    state = RomeState(prompt_set="quick", rome_kinds=("hidden", "attn"), noise_rule=False, rome_noise=0.05,
                      rome_samples=7, rome_seed=11, limit=25, rome_window=4, correct_only=False)
    query = state.to_query()
    assert query == {"prompt_set": "quick", "rome_kinds": "hidden,attn", "noise_rule": "0", "rome_noise": "0.05",
                     "rome_samples": "7", "rome_seed": "11", "limit": "25", "rome_window": "4", "correct_only": "0"}
    again, problems = RomeState.parse(query)
    assert again == state and problems == []


def test_unused_settings_stay_out_of_the_url():
    query = RomeState().to_query()  # ROME's noise rule, hidden states only
    assert "rome_noise" not in query and "rome_window" not in query
    assert RomeState.parse(query) == (RomeState(), [])


def test_garbage_values_warn_and_take_the_defaults():
    garbage = {"prompt_set": "../../etc/passwd", "rome_kinds": "hidden,banana", "noise_rule": "maybe",
               "rome_noise": "nan", "rome_samples": "0", "rome_seed": "-3", "limit": "1e9", "rome_window": "x",
               "correct_only": "<b>"}
    state, problems = RomeState.parse({**garbage, "unknown": "1"})
    assert state == RomeState()
    assert sorted(p.split("=", 1)[0].lstrip("`") for p in problems) == sorted(garbage)
    state, problems = RomeState.parse({"rome_kinds": ""})  # no kind at all: the default, with a warning
    assert state.rome_kinds == ("hidden",) and "no kind" in problems[0]


def test_url_names_do_not_collide_with_the_study():
    assert not STUDY_KEYS & set(RomeState.PARSERS)
    assert not STUDY_KEYS & set(RomeState(noise_rule=False, rome_kinds=("mlp",)).to_query())
