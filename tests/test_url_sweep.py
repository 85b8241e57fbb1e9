"""Every URL parameter of every page, given garbage, in a fresh session (AppTest through app.py):
the page runs to its end with no exception, and a value the parameter cannot take is named in a
"Link setting" warning that says what is used instead.

The parameters come from the pages' typed states (``pages.state``), so a new setting is swept as
soon as it exists. One test per page: one result store, so the trace page traces its short
prompt once and every later run loads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pages import common
from tracing import runcard
from pages.state import AttentionState, CategoriesState, HiddenState, RomeState, Study, TraceState

APP = str(Path(__file__).resolve().parents[1] / "app.py")
SHORT = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "samples": "1", "rows": "noised_final"}
TOO_LONG = "x" * 25_000  # longer than any text setting takes
ODD = "-1e999"  # overflows every number; not a choice, flag, index list or pair
PAGES = {
    "trace": (TraceState, ""),
    "categories": (CategoriesState, common.PATHS["categories"]),
    "attention": (AttentionState, common.PATHS["attention"]),
    "hidden_states": (HiddenState, common.PATHS["hidden_states"]),
    "rome": (RomeState, common.PATHS["rome"]),
}
TEXT_OK = {"prompt", "subject", "target", "contrast", "replacement", "b_prompt", "b_subject", "b_target",
           "own_prompt", "lens_prompt", "lens_target"}  # free text: "-1e999" is a valid text

pytestmark = pytest.mark.slow


def names(cls) -> list[str]:
    """Every URL parameter of a page: the study's and the page's own."""
    own = list(runcard.DEFAULTS) if cls is TraceState else list(cls.PARSERS)
    return list(dict.fromkeys(["model", *Study().to_query(), *own]))


@pytest.mark.parametrize("page", list(PAGES))
def test_every_url_parameter_with_garbage(page, embedded):
    cls, path = PAGES[page]
    failures, runs = [], 0
    for name in names(cls):
        for value in (TOO_LONG, ODD):
            if name == "model" and value == ODD:
                continue  # a plausible hub id: it is tried (offline: a clear load error)
            query = {**SHORT, name: value} if page == "trace" else {name: value}
            at = AppTest.from_file(APP, default_timeout=600)
            at.query_params.update(query)
            if path:
                at.session_state[common.LANDING] = path  # the link opened this page
                at.switch_page(f"pages/{path}.py")
            at.run()
            runs += 1
            shown = " ".join(w.value for w in at.warning)
            if at.exception:
                failures.append(f"{name}={value[:12]}: exception {at.exception[0].value[:200]}")
            elif (value == TOO_LONG or name not in TEXT_OK) and f"`{name}=" not in shown:
                failures.append(f"{name}={value[:12]}: no warning naming it (warnings: {shown[:200]!r})")
    assert runs >= 2 * len(Study().to_query()), runs  # the study's parameters and the page's own
    assert not failures, "\n".join(failures)
