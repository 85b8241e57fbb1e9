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


def open_page(**state) -> AppTest:
    """The page as a deep link opens it (widget values in ``state``, e.g. the open tab)."""
    at = AppTest.from_file(APP, default_timeout=600)
    at.switch_page(PAGE)  # a deep link: the trace page does not run first
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


TRAJECTORIES = "Trajectories by prompt type"


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
    assert len(charts(at)) == 2  # the study prompt's lens: heatmap, target curve
    at = open_page(hidden_tab=TRAJECTORIES)
    assert not at.exception and not errors(at)
    assert any("prompts** from `default`" in c.value for c in at.caption)
    assert len(charts(at)) == 1


def test_trajectories_and_lens(small_set):
    at = open_page(hidden_lens_source="set")
    assert not at.exception, at.exception
    assert not errors(at)
    assert len(charts(at)) == 2  # lens heatmap, target curve (the trajectories tab does not run)
    # the first set prompt is the lens's
    assert at.selectbox(key="hidden_lens_pick").value == 0
    assert "Prompt: 3.14159" in charts(at)[0].proto.spec
    assert any('Target "2"' in c.value for c in at.caption)  # the first token of its expected "26"
    # picking another prompt takes its prompt and target
    at.selectbox(key="hidden_lens_pick").set_value(2).run()
    assert not at.exception and not errors(at)
    assert any('Target " Paris"' in c.value for c in at.caption)
    # my own prompt: typed
    at.radio(key="hidden_lens_source").set_value("own").run()
    at.text_input(key="hidden_lens_prompt").set_value("The Eiffel Tower is in").run()
    at.text_input(key="hidden_lens_target").set_value(" France").run()
    assert not at.exception and not errors(at)
    assert any('Target " France"' in c.value for c in at.caption)
    # the trajectories tab
    at.session_state["hidden_tab"] = TRAJECTORIES
    at.run()
    assert not at.exception and not errors(at)
    assert any("4 prompts" in c.value for c in at.caption)
    assert len(charts(at)) == 1
    # separate categories, per-prompt lines, cropped layers: still one trajectory figure
    at.toggle(key="hidden_combine").set_value(False)
    at.toggle(key="hidden_per_prompt").set_value(True)
    at.run()
    assert not at.exception and not errors(at) and len(charts(at)) == 1
    # downloads on demand: PNG, SVG and CSV for the trajectories
    assert len(at.get("download_button")) == 1  # the per-prompt CSV only
    at.toggle(key="hidden_traj_downloads").set_value(True).run()
    assert not at.exception and not at.warning, [w.value for w in at.warning]
    assert len(at.get("download_button")) == 1 + 3
    # and for both lens charts, back on the lens tab (its own prompt kept)
    at.session_state["hidden_tab"] = "Logit lens"
    at.run()
    assert at.text_input(key="hidden_lens_prompt").value == "The Eiffel Tower is in"
    at.toggle(key="hidden_lens_downloads").set_value(True).run()
    assert not at.exception and not at.warning, [w.value for w in at.warning]
    assert len(at.get("download_button")) == 2 * 3


def test_bad_inputs_show_errors_and_keep_results(small_set):
    at = open_page(hidden_lens_source="own")
    assert not at.exception
    # empty prompt: an error, the last lens stays
    at.text_input(key="hidden_lens_prompt").set_value("").run()
    assert not at.exception
    assert any("empty" in e for e in errors(at))
    assert any("last valid result" in w.value for w in at.warning)
    assert len(charts(at)) == 2
    # too long a prompt
    at.text_input(key="hidden_lens_prompt").set_value("word " * 9000).run()
    assert not at.exception and any("context of" in e for e in errors(at))
    # a target that is no completion
    at.text_input(key="hidden_lens_prompt").set_value("Once upon a").run()
    at.text_input(key="hidden_lens_target").set_value("").run()
    assert not at.exception and not errors(at)
    # no measure picked
    at.session_state["hidden_tab"] = TRAJECTORIES
    at.run()
    at.multiselect(key="hidden_measures").set_value([]).run()
    assert not at.exception and any("at least one measure" in e for e in errors(at))
    # a malformed prompt set: an error, earlier trajectories stay
    small_set.write_text("category,prompt\nsemantic,oops\n")
    at.multiselect(key="hidden_measures").set_value(["norm"]).run()
    assert not at.exception
    assert any("prompt set" in e for e in errors(at))
    assert any("4 prompts" in c.value for c in at.caption)
