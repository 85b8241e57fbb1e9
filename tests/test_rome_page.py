"""AppTest of pages/rome.py (ROME averages) with the embedded model: a two-fact run with one noise
sample, charts and exports, a re-run from the store, and bad input shown as an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "rome.py")

pytestmark = pytest.mark.slow


def open_page(query: dict | None = None, **state) -> AppTest:
    """The page with widget values set in the session (``state``) or a link's ``query``."""
    at = AppTest.from_file(PAGE, default_timeout=600)
    for key, value in state.items():
        at.session_state[key] = value
    for name, value in (query or {}).items():
        at.query_params[name] = value
    at.run()
    return at


def query(at: AppTest) -> dict[str, str]:
    return {k: (v[-1] if isinstance(v, list) else v) for k, v in at.query_params.items()}


def test_two_facts_run_chart_export_and_rerun_from_the_store(embedded):
    at = open_page(rome_limit=2, rome_samples=1)
    assert not at.exception and not at.error
    assert at.selectbox(key="rome_set").value == "facts"
    assert any("2 prompts · 2 to average" in c.value and "3 x std" in c.value for c in at.caption)
    assert at.button(key="rome_run").label == "Trace 2 missing"
    at.button(key="rome_run").click().run()
    assert not at.exception and not at.error
    assert any("Computed 2 trace(s)" in c.value for c in at.caption)
    assert any("2 prompts averaged" in c.value for c in at.caption)
    assert len(at.get("vega_lite_chart")) == 1
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"PNG", "SVG", "CSV", "Run card (JSON)"} <= labels
    again = open_page(rome_limit=2, rome_samples=1)  # a new session: everything from the store
    assert at.button(key="rome_run").disabled or again.button(key="rome_run").disabled
    assert any("0 trace(s) to compute" in c.value for c in again.caption)
    assert len(again.get("vega_lite_chart")) == 1


def test_bad_input_shows_an_error_and_the_page_keeps_running(embedded):
    at = open_page(rome_limit=2, rome_samples=1)
    at.multiselect(key="rome_kinds").set_value([]).run()
    assert not at.exception
    assert any("Pick at least one kind" in e.value for e in at.error)
    at.multiselect(key="rome_kinds").set_value(["mlp"]).run()
    assert not at.exception and not at.error
    assert at.button(key="rome_run").label == "Trace 2 missing"


LINK = {"prompt_set": "facts", "rome_kinds": "mlp", "noise_rule": "0", "rome_noise": "0.05", "rome_samples": "1",
        "rome_seed": "3", "limit": "2", "rome_window": "4", "correct_only": "0"}


def test_a_link_sets_every_setting_and_the_url_keeps_them(embedded, monkeypatch):
    from pages import common

    names: dict[str, str] = {}
    real = common.download_button

    def record(label, data, file_name, mime, key, **kwargs):
        names[key] = file_name
        real(label, data, file_name, mime, key, **kwargs)

    monkeypatch.setattr(common, "download_button", record)
    at = open_page(LINK)
    assert not at.exception and not at.error and not at.warning
    assert at.multiselect(key="rome_kinds").value == ["mlp"] and at.toggle(key="rome_rule").value is False
    assert at.number_input(key="rome_noise").value == 0.05 and at.number_input(key="rome_samples").value == 1
    assert at.number_input(key="rome_seed").value == 3 and at.number_input(key="rome_limit").value == 2
    assert at.slider(key="rome_window").value == 4 and at.toggle(key="rome_correct").value is False
    assert {k: v for k, v in query(at).items() if k in LINK} == LINK
    assert "model" in query(at)  # the study rides along
    assert any("2 prompts · 2 to average" in c.value and "noise 0.05 (given)" in c.value for c in at.caption)
    at.button(key="rome_run").click().run()
    assert not at.exception and not at.error
    stem = "facts_mlp_noise0.05_samples1_seed3_window4_first2_all_facts"
    assert names["rome-mlp-png"] == f"rome_aie_{stem}.png" and names["rome-mlp-csv"] == f"rome_aie_{stem}.csv"
    assert names["rome-mlp-card"] == f"rome_run_card_{stem}.json"
    at.number_input(key="rome_samples").set_value(2).run()
    assert query(at)["rome_samples"] == "2"


def test_a_link_with_garbage_warns_and_takes_the_defaults(embedded):
    garbage = {"rome_kinds": "banana", "rome_samples": "0", "rome_window": "x", "rome_seed": "99999999999",
               "noise_rule": "maybe", "rome_noise": "-1", "prompt_set": "<script>", "correct_only": "2"}
    at = open_page({**garbage, "limit": "2", "unknown": "1"})
    assert not at.exception and not at.error
    warned = " ".join(w.value for w in at.warning)
    for name in garbage:
        assert f"`{name}=" in warned, name
    assert at.multiselect(key="rome_kinds").value == ["hidden"] and at.toggle(key="rome_rule").value is True
    assert at.number_input(key="rome_samples").value == 3 and at.selectbox(key="rome_set").value == "facts"
    assert query(at)["rome_kinds"] == "hidden" and query(at)["limit"] == "2"
    at.run()  # warned once
    assert not at.warning


def test_a_very_long_prompt_is_left_out_with_a_reason(embedded, monkeypatch, tmp_path):
    long_prompt = "The Eiffel Tower is " + "very " * (embedded.n_ctx + 10) + "in"
    path = tmp_path / "odd.csv"
    path.write_text("category,prompt,expected,subject\n"
                    f"semantic,{long_prompt},\" Paris\",Eiffel Tower\n"
                    "semantic,The Colosseum is in,\" Rome\",Colosseum\n"
                    "semantic,The Louvre is in,\" Paris\",Louvre\n", encoding="utf-8")
    import tracing.prompts

    shipped = tracing.prompts.shipped_sets()
    monkeypatch.setattr(tracing.prompts, "shipped_sets", lambda: {**shipped, "odd": path})
    at = open_page(rome_set="odd", rome_correct=False, rome_samples=1)
    assert not at.exception and not at.error
    assert any("3 prompts · 2 to average, 1 left out" in c.value for c in at.caption)
    assert at.button(key="rome_run").label == "Trace 2 missing"
    left = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    assert len(left) == 1 and len(left["prompt"][0]) <= 120 and "context" in left["reason"][0]


def test_hidden_settings_keep_their_values(embedded):
    """The noise (hidden under ROME's rule) and the window (hidden for hidden states) keep their
    values while hidden, in the page state too."""
    at = open_page(rome_limit=2, rome_samples=1)
    at.toggle(key="rome_rule").set_value(False).run()
    at.number_input(key="rome_noise").set_value(0.07).run()
    at.multiselect(key="rome_kinds").set_value(["attn"]).run()
    at.slider(key="rome_window").set_value(6).run()
    at.toggle(key="rome_rule").set_value(True).run()
    at.multiselect(key="rome_kinds").set_value(["hidden"]).run()
    assert "rome_noise" not in query(at) and "rome_window" not in query(at)
    at.toggle(key="rome_rule").set_value(False).run()
    at.multiselect(key="rome_kinds").set_value(["hidden", "mlp"]).run()
    assert at.number_input(key="rome_noise").value == 0.07 and at.slider(key="rome_window").value == 6
    assert (query(at)["rome_noise"], query(at)["rome_window"]) == ("0.07", "6")
    assert not at.exception and not at.error
