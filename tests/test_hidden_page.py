"""AppTest of pages/hidden_states.py with the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tracing import prompts

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGE = "pages/hidden_states.py"
SMALL_SET = '''category,prompt,expected,subject
non_english,"3.14159","26","141"
plain_english,"From Wikipedia, the free"," encyclopedia"," Wikipedia"
semantic,"The Eiffel Tower is in the city of"," Paris"," Tower"
semantic,"The capital city of Wales is called"," Cardiff"," Wales"
'''

pytestmark = pytest.mark.slow


def open_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    at.switch_page(PAGE)  # a deep link: the trace page does not run first
    return at.run()


def charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


@pytest.fixture
def small_set(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "small.csv"
    path.write_text(SMALL_SET)
    monkeypatch.setattr(prompts, "shipped_sets", lambda: {"small": path})
    return path


def test_page_renders_with_shipped_set():
    at = open_page()
    assert not at.exception, at.exception
    assert at.title[0].value == "Hidden states of the final token"
    assert not errors(at)
    assert charts(at), "no chart"


def test_trajectories_and_lens(small_set):
    at = open_page()
    assert not at.exception, at.exception
    assert not errors(at)
    assert any("4 prompts" in c.value for c in at.caption)
    assert len(charts(at)) == 3  # trajectories, lens heatmap, target curve
    # the first set prompt fills the lens inputs
    assert at.text_input(key="hidden_lens_prompt").value == "3.14159"
    # separate categories, per-prompt lines, cropped layers: still one trajectory figure
    at.toggle(key="hidden_combine").set_value(False)
    at.toggle(key="hidden_per_prompt").set_value(True)
    at.run()
    assert not at.exception and not errors(at)
    # picking another prompt fills prompt and target
    at.selectbox(key="hidden_lens_pick").set_value("2").run()
    assert at.text_input(key="hidden_lens_prompt").value == "The Eiffel Tower is in the city of"
    assert at.text_input(key="hidden_lens_target").value == " Paris"
    assert any('Target " Paris"' in c.value for c in at.caption)
    # editing the prompt leaves the set
    at.text_input(key="hidden_lens_prompt").set_value("The Eiffel Tower is in").run()
    assert at.selectbox(key="hidden_lens_pick").value == "(type your own prompt)"
    # downloads on demand: PNG, SVG and CSV for the trajectories and both lens charts
    assert len(at.get("download_button")) == 1  # the per-prompt CSV only
    at.toggle(key="hidden_traj_downloads").set_value(True)
    at.toggle(key="hidden_lens_downloads").set_value(True)
    at.run()
    assert not at.exception and not at.warning, [w.value for w in at.warning]
    assert len(at.get("download_button")) == 1 + 3 * 3


def test_bad_inputs_show_errors_and_keep_results(small_set):
    at = open_page()
    assert not at.exception
    # empty prompt: an error, the last lens stays
    at.text_input(key="hidden_lens_prompt").set_value("").run()
    assert not at.exception
    assert any("empty" in e for e in errors(at))
    assert any("last valid result" in w.value for w in at.warning)
    assert len(charts(at)) == 3
    # too long a prompt
    at.text_input(key="hidden_lens_prompt").set_value("word " * 9000).run()
    assert not at.exception and any("context of" in e for e in errors(at))
    # no measure picked
    at.text_input(key="hidden_lens_prompt").set_value("Once upon a").run()
    at.multiselect(key="hidden_measures").set_value([]).run()
    assert not at.exception and any("at least one measure" in e for e in errors(at))
    # a malformed prompt set: an error, earlier trajectories stay
    small_set.write_text("category,prompt\nsemantic,oops\n")
    at.multiselect(key="hidden_measures").set_value(["norm"]).run()
    assert not at.exception
    assert any("prompt set" in e for e in errors(at))
    assert any("4 prompts" in c.value for c in at.caption)
