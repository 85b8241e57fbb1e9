"""The hidden-states page opens on the study's prompt (issue 12, "one study across the pages"): the
logit lens of the study's prompt and target (checked against a hand-made lens from the model's own
hidden states), the study prompt drawn over the trajectories, the page's own settings in its URL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from pages.state import HiddenState, Study
from tracing.model.tokens import completion_token, tokenize

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "pages/hidden_states.py"
PROMPT, TARGET = "The capital city of Wales is called", " Cardiff"
TRAJECTORIES = "Trajectories by prompt type"


def open_page(study: Study | None = None, query: dict | None = None, **state) -> AppTest:
    """The page as a deep link opens it, with the session's ``study``, the link's ``query`` and
    widget values ``state``."""
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


def datasets(chart) -> list:
    return [dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data) for d in chart.proto.datasets]


def url(at: AppTest) -> dict[str, str]:
    return {k: (v[-1] if isinstance(v, list) else v) for k, v in at.query_params.items()}


def hand_lens(lm, prompt: str, token: int) -> np.ndarray:
    """p(token) of the final token's state entering each layer through the final norm and the
    unembedding, from the model's own hidden states; the last layer: the model's own output."""
    ids = torch.tensor([tokenize(lm, prompt)])
    with torch.inference_mode():
        out = lm.model(ids, output_hidden_states=True)
        inner = [lm.model.lm_head(lm.model.model.norm(h[0, -1])).softmax(-1)[token] for h in out.hidden_states[:-1]]
        final = out.logits[0, -1].softmax(-1)[token]
    return torch.stack([*inner, final]).float().numpy()


# -- the page state in the URL (no model) --------------------------------------------------------


def test_state_round_trips_tab_and_lens_source():
    for state in (HiddenState(), HiddenState(tab=TRAJECTORIES, lens_source="set", lens_pick=7),
                  HiddenState(lens_source="own", lens_prompt="Once upon a", lens_target=" time")):
        assert HiddenState.parse(state.to_query()) == (state, [])
    query = HiddenState(lens_source="study", lens_prompt="unused", lens_pick=3).to_query()
    assert not {"lens_prompt", "lens_target", "lens_pick"} & set(query)  # only what the lens uses
    assert query["tab"] == "Logit lens" and query["lens_source"] == "study"


def test_garbage_hidden_settings_warn_and_take_their_defaults():
    state, problems = HiddenState.parse({"tab": "Everything", "lens_source": "mine", "lens_pick": "-1",
                                         "lens_prompt": ["a", "b"]})
    assert (state.tab, state.lens_source, state.lens_pick, state.lens_prompt) == ("Logit lens", "study", 0, "b")
    assert sorted(p.split("=")[0] for p in problems) == ["`lens_pick", "`lens_source", "`tab"]


# -- the page ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lens_opens_on_the_study_prompt_and_target(embedded):
    at = open_page(Study(prompt=PROMPT, subject="Wales", target=TARGET))
    assert not errors(at) and not warnings(at), (errors(at), warnings(at))
    assert at.radio(key="hidden_lens_source").value == "study" and not at.text_input
    assert any(PROMPT in m.value for m in at.markdown)  # the study box
    assert any('Target " Cardiff"' in c.value for c in at.caption)
    assert len(charts(at)) == 2
    (curve,) = datasets(charts(at)[1])
    token = completion_token(embedded, PROMPT, TARGET)
    np.testing.assert_allclose(curve.sort_values("layer")["target_prob"], hand_lens(embedded, PROMPT, token),
                               rtol=1e-4, atol=1e-6)
    assert url(at)["tab"] == "Logit lens" and url(at)["prompt"] == PROMPT and url(at)["target"] == TARGET
    # the study's empty target: the model's top prediction at the output
    at = open_page(Study(prompt=PROMPT, subject="Wales", target=""))
    (curve,) = datasets(charts(at)[1])
    ids = torch.tensor([tokenize(embedded, PROMPT)])
    with torch.inference_mode():
        top = int(embedded.model(ids).logits[0, -1].argmax())
    np.testing.assert_allclose(curve.sort_values("layer")["target_prob"], hand_lens(embedded, PROMPT, top),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trajectories_show_the_study_prompt_as_its_own_line(embedded):
    at = open_page(Study(prompt=PROMPT, subject="Wales", target=TARGET), hidden_tab=TRAJECTORIES)
    assert not errors(at), errors(at)
    assert any("current prompt" in c.value for c in at.caption)
    (figure,) = charts(at)
    mine = [d for d in datasets(figure) if "category" in d and set(d["category"]) == {"current prompt"}]
    norms = next(d for d in mine if set(d["measure"]) == {"norm"} and d["layer"].min() == 0)
    probs = next(d for d in mine if set(d["measure"]) == {"target_prob"} and d["layer"].min() == 0)
    ids = torch.tensor([tokenize(embedded, PROMPT)])
    with torch.inference_mode():
        states = embedded.model(ids, output_hidden_states=True).hidden_states
    L = embedded.n_layers
    expected = [float(h[0, -1].norm()) for h in states[:L]]  # the last one is after the final norm
    np.testing.assert_allclose(norms.sort_values("layer")["value"].iloc[:L], expected, rtol=1e-5)
    token = completion_token(embedded, PROMPT, TARGET)
    np.testing.assert_allclose(probs.sort_values("layer")["value"], hand_lens(embedded, PROMPT, token),
                               rtol=1e-4, atol=1e-6)
    # an empty study prompt: the prompt types alone, with a note
    at = open_page(Study(prompt="", subject=""), hidden_tab=TRAJECTORIES)
    assert not errors(at) and len(charts(at)) == 1
    assert any("study's prompt is not drawn" in i.value for i in at.info)


@pytest.mark.slow
def test_a_link_with_the_lens_settings_round_trips():
    at = open_page(query={"lens_source": "own", "lens_prompt": "Once upon a", "lens_target": " time", "top_k": "3"})
    assert not errors(at) and not warnings(at), (errors(at), warnings(at))
    assert at.text_input(key="hidden_lens_prompt").value == "Once upon a"
    assert any('Target " time"' in c.value for c in at.caption)
    assert "top 3 next tokens" in charts(at)[0].proto.spec
    assert {k: url(at)[k] for k in ("lens_source", "lens_prompt", "lens_target", "top_k")} == {
        "lens_source": "own", "lens_prompt": "Once upon a", "lens_target": " time", "top_k": "3"}
    # the open tab survives a switch and comes back in the link
    at.session_state["hidden_tab"] = TRAJECTORIES
    at.run()
    assert url(at)["tab"] == TRAJECTORIES and url(at)["lens_source"] == "own"
    at.run()  # a second run without the lens drawn keeps its settings
    at.session_state["hidden_tab"] = "Logit lens"
    at.run()
    assert at.radio(key="hidden_lens_source").value == "own"
    assert at.text_input(key="hidden_lens_prompt").value == "Once upon a"


@pytest.mark.slow
def test_garbage_links_warn_and_the_page_keeps_running():
    at = open_page(query={"tab": "Everything", "lens_source": "mine", "top_k": "99"})
    warned = " ".join(warnings(at))
    for name in ("tab", "lens_source", "top_k"):
        assert f"`{name}=" in warned, (name, warned)
    assert at.radio(key="hidden_lens_source").value == "study" and len(charts(at)) == 2
    # a set row the set does not have
    at = open_page(query={"lens_source": "set", "lens_pick": "999"})
    assert any("Row 999 is not in this prompt set" in w for w in warnings(at)), warnings(at)
    assert at.selectbox(key="hidden_lens_pick").value == 0 and len(charts(at)) == 2
    # an empty study prompt: a clear message
    at = open_page(Study(prompt="", subject=""))
    assert any("study's prompt" in e and "empty" in e for e in errors(at)), errors(at)


@pytest.mark.slow
def test_downloads_are_named_after_what_they_hold(monkeypatch):
    from pages import common

    names: dict[str, str] = {}
    real = common.download_button

    def record(label, data, file_name, mime, key, **kwargs):
        names[key] = file_name
        real(label, data, file_name, mime, key, **kwargs)

    monkeypatch.setattr(common, "download_button", record)
    at = open_page(Study(prompt=PROMPT, subject="Wales", target=TARGET), hidden_lens_downloads=True)
    assert names["logit_lens-png"] == "logit_lens_The_capital_city_of_Wales_is_cal_Cardiff_top5.png"
    assert names["logit_lens_target-csv"] == "logit_lens_target_The_capital_city_of_Wales_is_cal_Cardiff_linear.csv"
    at.session_state["hidden_tab"] = TRAJECTORIES
    at.session_state["hidden_traj_downloads"] = True
    at.run()
    assert names["hidden_trajectories-svg"] == "hidden_trajectories_default_combined_std.svg"
    assert names["hidden_pp_csv"] == "hidden_trajectories_per_prompt_default.csv"
