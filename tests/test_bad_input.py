"""Bad input everywhere gets a clear message, and the app keeps working after it.

Engine calls raise ``ValueError`` (with a message that says what is wrong) for every input that
can be wrong; tests/test_causal.py, test_attention.py, test_hidden.py and test_runcard.py already
cover many, this file adds the rest: other causal-trace settings, attention and hidden-state
positions and layers, prompt-set files, run cards from another model. At the app level: garbage
in the URL query string and a model that fails to load in the sidebar.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tracing
from tracing import attention as A
from tracing import hidden, prompts, runcard
from tracing.causal import causal_trace, subject_positions
from tracing.prompts import PromptSetError, load_prompt_set, parse_prompt_set

APP = str(Path(__file__).resolve().parents[1] / "app.py")
EIFFEL = "The Eiffel Tower is located in the city of"
NOISED = [1, 2, 3]
TOO_LONG = "word " * 400  # tiny models take 256 tokens


@pytest.fixture
def lm(tiny):
    return tiny("gpt2")


# ---------------------------------------------------------------------------------------------
# causal_trace: the settings test_causal.py does not try


@pytest.mark.parametrize("kwargs, message", [
    (dict(corruption="blur"), "Unknown corruption 'blur'"),
    (dict(noise_mode="relative"), "Unknown noise mode 'relative'"),
    (dict(convention="middle"), "Unknown layer convention 'middle'"),
    (dict(kind=None), "Unknown kind"),
    (dict(noise="loud"), "noise level must be a finite number"),
    (dict(noise=float("inf")), "noise level must be a finite number"),
    (dict(noise=None), "noise level must be a finite number"),
    (dict(samples=1.5), "samples must be an integer"),
    (dict(samples=True), "samples must be an integer"),
    (dict(samples="3"), "samples must be an integer"),
    (dict(window=2.5), "window must be an integer"),
    (dict(window=-3), "window must be an integer"),
    (dict(target=1.5), "must be a token id or a completion string"),
    (dict(target=True), "must be a token id or a completion string"),
    (dict(target=-1), "outside the vocabulary"),
    (dict(contrast=10**9), "contrast token id .* outside the vocabulary"),
    (dict(corruption="replace"), "needs a second prompt"),
    (dict(corruption="replace", replacement="   "), "empty"),
    (dict(noised=[True]), "not an integer"),
    (dict(noised=["1"]), "not an integer"),
    (dict(noised=[1.0]), "not an integer"),
    (dict(noised=[-1]), "out of range"),
    (dict(noised=None), "No tokens to noise"),
    (dict(prompt=None), "empty"),
    (dict(prompt="   \n\t"), "empty"),
])
def test_causal_trace_rejects_bad_settings(lm, kwargs, message):
    args = dict(prompt=EIFFEL, noised=NOISED, samples=1) | kwargs
    with pytest.raises(ValueError, match=message):
        causal_trace(lm, args.pop("prompt"), args.pop("noised"), **args)


@pytest.mark.parametrize("seed", ["abc", 1.5, 2**70, None, True])
def test_causal_trace_rejects_bad_seeds_clearly(lm, seed):
    """The seed is validated like samples and window (today: int('abc') / an overflow message, or a
    float silently truncated to another seed than the one recorded)."""
    with pytest.raises(ValueError, match="seed"):
        causal_trace(lm, EIFFEL, NOISED, samples=1, seed=seed)


def test_subject_positions_rejects_bad_input(lm):
    for subject in ("", "   ", None):
        with pytest.raises(ValueError, match="subject is empty"):
            subject_positions(lm, EIFFEL, subject)
    with pytest.raises(ValueError, match="'all' or 'last'"):
        subject_positions(lm, EIFFEL, "Eiffel", which="middle")
    with pytest.raises(ValueError, match="does not occur"):
        subject_positions(lm, "", "Eiffel")


# ---------------------------------------------------------------------------------------------
# Attention and hidden states: prompts, positions, layers, windows


def test_attention_pattern_rejects_bad_prompts_and_layers(lm):
    for prompt, message in (("", "empty"), ("  ", "empty"), (None, "empty"), (TOO_LONG, "context")):
        with pytest.raises(ValueError, match=message):
            A.attention_pattern(lm, prompt, 0)
    for layer in (-1, lm.n_layers, 10**6):
        with pytest.raises(ValueError, match="out of range"):
            A.attention_pattern(lm, EIFFEL, layer)


@pytest.mark.parametrize("layer", [1.5, "1", None, True])
def test_attention_pattern_rejects_non_integer_layers(lm, layer):
    """Today: TypeError ('float' object cannot be interpreted as an integer / str + int)."""
    with pytest.raises(ValueError, match="[Ll]ayer"):
        A.attention_pattern(lm, EIFFEL, layer)


def test_attention_to_rejects_bad_prompts_and_positions(lm):
    with pytest.raises(ValueError, match="empty"):
        A.attention_to(lm, None, [0])
    with pytest.raises(ValueError, match="integers"):
        A.attention_to(lm, EIFFEL, "0")  # a string is not a list of positions
    with pytest.raises(ValueError, match="integers"):
        A.attention_to(lm, EIFFEL, [None])
    n = len(A.prompt_ids(lm, EIFFEL))
    with pytest.raises(ValueError, match="out of range"):
        A.attention_to(lm, EIFFEL, [0, 10**9])
    np.testing.assert_array_equal(A.attention_to(lm, EIFFEL, [-n]), A.attention_to(lm, EIFFEL, [0]))


def test_attention_to_without_positions_is_an_error(lm):
    """Today it returns an empty [layers, heads, 0] array, which charts then show as nothing."""
    with pytest.raises(ValueError, match="position"):
        A.attention_to(lm, EIFFEL, [])


@pytest.mark.parametrize("window, message", [
    ([], "empty"),
    (list(range(300)), "context"),
    ([1, 10**9], "vocabulary"),
    ([-5, 1], "vocabulary"),
])
def test_first_token_attention_rejects_bad_windows(lm, window, message):
    """Today an empty window raises a RuntimeError (reshape) and a bad id an IndexError."""
    with pytest.raises(ValueError, match=message):
        A.first_token_attention(lm, window)


def test_long_text_attention_rejects_bad_sizes(lm):
    text = EIFFEL * 10
    with pytest.raises(ValueError, match="at least 1"):
        A.long_text_attention(lm, text, n_samples=0, length=5)
    with pytest.raises(ValueError, match="at least 2"):
        A.long_text_attention(lm, text, n_samples=1, length=1)
    with pytest.raises(ValueError, match="empty"):
        A.long_text_attention(lm, None, n_samples=1, length=5)


def test_hidden_state_functions_reject_bad_prompts(lm):
    for prompt in (None, "", " \n "):
        with pytest.raises(ValueError, match="empty"):
            hidden.final_token_states(lm, prompt)
        with pytest.raises(ValueError, match="empty"):
            hidden.prompt_trajectory(lm, prompt)
    with pytest.raises(ValueError, match="context|at most"):
        hidden.logit_lens(lm, TOO_LONG)
    with pytest.raises(ValueError, match="context|at most"):
        hidden.prompt_trajectory(lm, TOO_LONG)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        hidden.logit_lens(lm, EIFFEL, target=-1)
    with pytest.raises(ValueError, match="Unknown measure"):
        hidden.measure_layers("curvature", 3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        hidden.trajectory_measures(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        hidden.trajectory_measures(np.zeros(4))


@pytest.mark.parametrize("target", [1.5, True, ["a"]])
def test_logit_lens_rejects_targets_of_the_wrong_type(lm, target):
    """Today 1.5 says 'The target completion is empty.' and True is read as token id 1."""
    with pytest.raises(ValueError, match="token id|string") as info:
        hidden.logit_lens(lm, EIFFEL, target=target)
    assert "empty" not in str(info.value)


def test_prompt_set_trajectories_names_the_bad_row(lm):
    frame = pd.DataFrame({"category": ["semantic"] * 3, "prompt": ["fine", "also fine", TOO_LONG],
                          "expected": ["", "", ""]})
    with pytest.raises(ValueError, match="Prompt 3: .*(context|at most)"):
        hidden.prompt_set_trajectories(lm, frame)


# ---------------------------------------------------------------------------------------------
# Store settings and batches


def test_store_and_batch_settings_are_checked(lm):
    from tracing.batch import run_batch
    from tracing.store import canonical_settings

    with pytest.raises(ValueError, match="Unknown trace settings: colour"):
        canonical_settings({"noised": [1], "colour": "red"})
    with pytest.raises(ValueError, match="noised"):
        canonical_settings({"samples": 2})
    with pytest.raises(ValueError, match="finite"):
        canonical_settings({"noised": [1], "noise": float("nan")})
    frame = load_prompt_set(prompts.shipped_sets()["quick"]).head(1)
    with pytest.raises(ValueError, match="target must be one of"):
        run_batch(lm, frame, {"samples": 1}, target="best")
    with pytest.raises(ValueError, match="Unknown trace settings"):
        run_batch(lm, frame, {"samples": 1, "colour": "red"})


# ---------------------------------------------------------------------------------------------
# Prompt-set files

HEADER = "category,prompt,expected,subject\n"


# tests/test_prompts.py covers missing and repeated columns, field counts, unknown categories,
# empty prompt / expected, bad noised / model_top1, empty files, too many rows, Latin-1 files and
# missing files; these are the other ways a prompt file can be wrong.


@pytest.mark.parametrize("text, message", [
    (HEADER + 'semantic,"The Eiffel, Paris,x\n', "line 2: 2 fields"),  # an unclosed quote
    (HEADER + "semantic,a b, c,a\n" + "semantic,a b, c\n" * 2, "line 3: 3 fields"),
    ("Category , PROMPT,Expected,subject\nSemantic recall,a b, c,a\n", None),  # loose spellings are fine
])
def test_prompt_file_errors_name_the_file_and_line(text, message):
    if message is None:
        assert parse_prompt_set(text, source="mine.csv")["category"].tolist() == ["semantic"]
        return
    with pytest.raises(PromptSetError) as info:
        parse_prompt_set(text, source="mine.csv")
    assert str(info.value).startswith("mine.csv: ") and message in str(info.value), str(info.value)


def test_many_problems_are_listed_with_a_count():
    text = HEADER + "".join(f"bogus{i},a b, c,a\n" for i in range(25))
    with pytest.raises(PromptSetError) as info:
        parse_prompt_set(text)
    assert len(info.value.errors) == 25
    assert "line 2: unknown category 'bogus0'" in str(info.value) and "(and 5 more)" in str(info.value)
    assert "bogus24" not in str(info.value)  # the message stays readable


@pytest.mark.parametrize("source, message", [
    (b"\xff\xfe" + HEADER.encode("utf-16-le"), "not UTF-8"),  # a UTF-16 export
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),  # a picture uploaded by mistake
    (HEADER.encode() + b"x" * prompts.MAX_BYTES, "larger than"),
])
def test_unreadable_prompt_uploads(source, message):
    for given in (source, io.BytesIO(source)):
        with pytest.raises(PromptSetError, match=message):
            load_prompt_set(given)


def test_prompt_file_that_is_a_folder_or_too_large(tmp_path):
    with pytest.raises(PromptSetError, match="no such file"):
        load_prompt_set(tmp_path)
    big = tmp_path / "big.csv"
    big.write_bytes(HEADER.encode() + b"semantic,a b, c,a\n" * (prompts.MAX_BYTES // 10))
    with pytest.raises(PromptSetError, match="larger than"):
        load_prompt_set(big)


# ---------------------------------------------------------------------------------------------
# Run cards from another model (real models, not stubs)


def test_run_cards_from_another_model_or_revision_are_refused(tiny):
    made_on = tiny("gpt2")
    trace = causal_trace(made_on, EIFFEL, NOISED, samples=1)  # the page state's default prompt
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


# ---------------------------------------------------------------------------------------------
# App level (AppTest, the embedded model)


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
