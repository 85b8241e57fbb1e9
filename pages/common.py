"""Shared page helpers: the cached model, the sidebar model picker, errors and chart downloads."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

import tracing

MODEL_KEY = "model_name"
OTHER = "Other (hub id, folder or .gguf)…"
FAILED_KEY = "model_failed"  # (name, message) of the last name that failed to load


APP_SCRIPT = Path(__file__).resolve().parents[1] / "app.py"


def leave_legacy_pages_mode() -> None:
    """Rerun through app.py when Streamlit ran this page on its own.

    A fresh server that sees a `pages/` folder makes its very first run the legacy way: the
    requested page alone, with an automatic list of every file in `pages/`, until some run calls
    st.navigation. A page that finds app.py absent from the call stack switches the server to
    app.py's navigation and reruns (the same page, now with the sidebar and layout).
    """
    from streamlit.runtime.pages_manager import PagesManager

    frame = sys._getframe(1)
    while frame is not None:
        if Path(frame.f_code.co_filename).resolve() == APP_SCRIPT:
            return
        frame = frame.f_back
    PagesManager.uses_pages_directory = False
    st.rerun()


@st.cache_resource(show_spinner="Loading model…", max_entries=2)
def cached_model(name: str) -> tracing.LoadedModel:
    """One model per name, shared by every browser session."""
    return tracing.load_model(name)


def current_model() -> tracing.LoadedModel:
    """The model picked in the sidebar (the last one that loaded)."""
    return cached_model(st.session_state.get(MODEL_KEY, tracing.DEFAULT_MODEL))


def model_sidebar() -> None:
    """Model picker and the loaded model's facts. A failed load keeps the previous model."""
    st.session_state.setdefault(MODEL_KEY, tracing.DEFAULT_MODEL)
    with st.sidebar:
        st.subheader("Model")
        options = list(tracing.EXAMPLE_MODELS) + [OTHER]
        current = st.session_state[MODEL_KEY]
        index = options.index(current) if current in options else len(options) - 1
        choice = st.selectbox(
            "Model", options, index=index, label_visibility="collapsed", key="model_picker"
        )
        if choice == OTHER:
            choice = st.text_input(
                "Hub id, local folder or .gguf path",
                value="" if current in options else current,
                key="model_other",
            ).strip()
        failed = st.session_state.get(FAILED_KEY)
        if choice and choice != current and failed and failed[0] == choice:
            st.error(failed[1])  # not retried on every rerun
        elif choice and choice != current:
            try:
                cached_model(choice)
                st.session_state[MODEL_KEY] = choice
                st.session_state.pop(FAILED_KEY, None)
            except Exception as exc:  # noqa: BLE001 - shown to the user, previous model kept
                message = f"{exc}\n\nStill using **{current}**."
                st.session_state[FAILED_KEY] = (choice, message)
                st.error(message)
        lm = current_model()
        facts = lm.facts()
        st.caption(
            f"**{facts['name']}** · {facts['family']}  \n"
            f"{facts['layers']} layers · {facts['heads']} heads · width {facts['width']}  \n"
            f"{facts['device']} · {facts['dtype']} · loaded in {facts['load seconds']} s"
        )


def show_error(exc: BaseException, what: str = "That did not work") -> None:
    """A clear message for a bad input or failed computation; the page keeps running."""
    if isinstance(exc, (ValueError, tracing.ModelLoadError)):
        st.error(f"{what}: {exc}")
    else:
        st.error(f"{what}: {type(exc).__name__}: {exc}")
        with st.expander("Details"):
            st.code("".join(traceback.format_exception(exc)))


def download_button(label: str, data, file_name: str, mime: str, key: str, *, icon: str | None = None,
                    where=None) -> None:
    """``st.download_button`` (in ``where``, default the page) that never reruns the page.

    A download has nothing to redo, and a rerun would replace a lazily made file (``data`` a
    callable) while the browser is asking for it.
    """
    (where or st).download_button(label, data, file_name, mime, key=key, icon=icon, on_click="ignore")


def chart_downloads(chart: alt.TopLevelMixin, stem: str, data: pd.DataFrame | None = None) -> None:
    """PNG, SVG (vl-convert) and CSV download buttons for a chart.

    The files are made only when a button is clicked (vl-convert takes about a second a chart),
    so reruns stay fast.
    """
    from tracing.charts import to_png, to_svg

    row = st.container(horizontal=True, gap="small")  # buttons as wide as their labels
    files = [("PNG", lambda: to_png(chart), "png", "image/png"),
             ("SVG", lambda: to_svg(chart), "svg", "image/svg+xml")]
    if data is not None:
        files.append(("CSV", lambda: data.to_csv(index=False), "csv", "text/csv"))
    for label, make, suffix, mime in files:
        download_button(label, make, f"{stem}.{suffix}", mime, f"{stem}-{suffix}",
                        icon=":material/download:", where=row)
