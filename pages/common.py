"""Shared page helpers: the cached model and result store, the sidebar model picker, the
prompt-set picker, page state <-> URL, "keep the last good result", progress bars, errors and
chart downloads."""

from __future__ import annotations

import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import altair as alt
import pandas as pd
import streamlit as st

import tracing
from tracing import prompts
from tracing.store import ResultStore, default_root

from pages.state import STUDY_KEYS, UPLOAD, PageState, Study

MODEL_KEY = "model_name"
OTHER = "Other (hub id, folder or .gguf)…"
FAILED_KEY = "model_failed"  # (name, message) of the last name that failed to load


@st.cache_resource(show_spinner="Loading the model… (the very first start converts the embedded model to "
                                "safetensors once: about 20 s; a hub model downloads once)", max_entries=2)
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
            "Model", options, index=index, label_visibility="collapsed", persist_state="session", key="model_picker"
        )
        if choice == OTHER:
            choice = st.text_input(
                "Hub id, local folder or .gguf path",
                value="" if current in options else current,
                persist_state="session", key="model_other",
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


def file_name(*parts: Any, limit: int = 32) -> str:
    """A file name stem from descriptive parts: each part's letters, digits, '.', '-' kept, the rest
    '_', each part cut to ``limit`` characters (``file_name("trace", prompt, "noise0.4")``)."""
    out = []
    for part in parts:
        text = "".join(c if c.isalnum() or c in ".-" else "_" for c in str(part).strip())
        text = "_".join(filter(None, text[:limit].split("_")))
        if text:
            out.append(text)
    return "_".join(out) or "export"


def chart_downloads(chart: alt.TopLevelMixin, stem: str, data: pd.DataFrame | None = None,
                    name: str | None = None) -> None:
    """PNG, SVG (vl-convert) and CSV download buttons for a chart; ``stem`` names the buttons'
    keys, ``name`` the files (default ``stem``; say what is in them: ``file_name(...)``).

    The files are made only when a button is clicked (vl-convert takes about a second a chart),
    so reruns stay fast.
    """
    from tracing.charts.style import to_png, to_svg

    row = st.container(horizontal=True, gap="small")  # buttons as wide as their labels
    files = [("PNG", lambda: to_png(chart), "png", "image/png"),
             ("SVG", lambda: to_svg(chart), "svg", "image/svg+xml")]
    if data is not None:
        files.append(("CSV", lambda: data.to_csv(index=False), "csv", "text/csv"))
    for label, make, suffix, mime in files:
        download_button(label, make, f"{name or stem}.{suffix}", mime, f"{stem}-{suffix}",
                        icon=":material/download:", where=row)


# ---------------------------------------------------------------------------------------------
# The result store


@st.cache_resource(show_spinner=False)
def _store(root: str) -> ResultStore:
    return ResultStore(root)


def result_store() -> ResultStore:
    """One result store per folder (disk with a memory layer in front), shared by every session.
    The folder is read each time (env ``CAUSAL_TRACING_RESULTS``), so tests can point it away."""
    return _store(str(default_root()))


# ---------------------------------------------------------------------------------------------
# Page state <-> URL and widgets


# Each page's URL path (as `st.Page("pages/<name>.py")` infers it, so old links keep working).
PATHS = {"trace": "trace", "categories": "categories", "attention": "attention",
         "hidden_states": "hidden_states", "rome": "rome"}
LANDING = "app_landing_page"  # url path of the page this session opened first (set by app.py)


def run_page(main: Callable[[], None]) -> None:
    """Run a page's ``main``, unless Streamlit ran the page file on its own.

    A `pages/` folder beside app.py puts a fresh server in Streamlit's legacy multipage mode until
    the first ``st.navigation`` call: its very first run may execute the requested page file alone,
    without app.py's navigation and sidebar. Streamlit's own flag for that mode says so; then it
    is switched off, as ``st.navigation`` does, and the same page is rerun through app.py.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()
    main()


def land(url_path: str) -> None:
    """Called by app.py before each run of a page: remembers the session's first page."""
    st.session_state.setdefault(LANDING, url_path)


PENDING = "pending_link"  # (url path, query) of a link another page followed (follow_link)


def link_query(url_path: str) -> dict[str, Any]:
    """The URL's query parameters when they are this page's: the session opened this page
    first (a shared link), or another page followed a link to it (``follow_link``). A page
    reached through the navigation starts from its last state, so another page's settings never
    leak into it."""
    pending = st.session_state.get(PENDING)
    if pending is not None and pending[0] == url_path:
        return dict(pending[1])
    if st.session_state.get(LANDING, url_path) != url_path:
        return {}
    return st.query_params.to_dict()


def follow_link(page: str, url_path: str, query: dict[str, Any]) -> None:
    """Open ``page`` (its file; ``url_path`` its path) with its settings from ``query``, as a
    shared link would, keeping this session (a linked view: "show this on its own page")."""
    st.session_state[PENDING] = (url_path, {k: str(v) for k, v in query.items()})
    st.switch_page(page, query_params={**study().to_query(), **query})


def linked_now(url_path: str) -> bool:
    """Whether this run of the page follows a link from another page (``follow_link``); the
    page's ``restore_state`` consumes it."""
    pending = st.session_state.get(PENDING)
    return pending is not None and pending[0] == url_path


def consume_link(url_path: str) -> None:
    """The page has read the link another page followed to it."""
    if linked_now(url_path):
        st.session_state.pop(PENDING)


def restore_state(cls: type[PageState], key: str, url_path: str) -> tuple[PageState, list[str]]:
    """The page's state: from a shared link on the session's first visit, or from a link another
    page followed (the widgets it names are set; widgets set by code before are kept), else the
    last published state. Widgets that a page switch dropped are refilled from it. Returns the
    state and the link's problems."""
    problems: list[str] = []
    if linked_now(url_path):
        st.session_state.pop(key, None)
    if key not in st.session_state:
        query = link_query(url_path)
        state, problems = cls.parse(query)
        st.session_state[key] = state
        for name, widget in cls.WIDGETS.items():
            if name in query and name in cls.PARSERS:
                st.session_state[widget] = _widget_value(getattr(state, name))
    consume_link(url_path)
    state = st.session_state[key]
    for widget, value in state.widget_values().items():
        if widget not in st.session_state:
            st.session_state[widget] = _widget_value(value)
    return state, problems


def _widget_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def publish_state(state: PageState | Any, key: str) -> None:
    """Keep the state for the session and put it in the URL with the study (a shared link
    reproduces the page and the study)."""
    st.session_state[key] = state
    query = {**study().to_query(), **state.to_query()}
    if st.query_params.to_dict() != query:
        st.query_params.from_dict(query)


def widget_state(cls: type[PageState], key: str, **changes: Any) -> PageState:
    """The state the page's widgets show now (``changes``: fields the page sets itself)."""
    values = {widget: st.session_state.get(widget) for widget in cls.WIDGETS.values()}
    return cls.from_widgets(values, st.session_state.get(key)).replace(**changes)


def show_problems(problems: list[str]) -> None:
    for problem in problems:
        st.warning(f"Link setting {problem}")


# ---------------------------------------------------------------------------------------------
# The study every page shares


STUDY = "study"  # the session's Study (pages.state)
TRACE_PAGE = "pages/trace.py"


def study() -> Study:
    """The session's current study (the model: the one the sidebar has loaded)."""
    current = st.session_state.get(STUDY) or Study()
    model = st.session_state.get(MODEL_KEY, current.model)
    return current if current.model == model else current.replace(model=model)


def set_study(new: Study) -> None:
    """Make ``new`` the session's study (every page reads it; the trace page shows it)."""
    st.session_state[STUDY] = new


def restore_study(url_path: str) -> list[str]:
    """On the session's first run: the study from the link that opened it (any page's URL
    carries it), its model loaded when it names another one. Returns the link's problems."""
    if STUDY in st.session_state:
        return []
    linked, problems = Study.parse(link_query(url_path))
    if linked.model != tracing.DEFAULT_MODEL and MODEL_KEY not in st.session_state:
        try:
            cached_model(linked.model)
            st.session_state[MODEL_KEY] = linked.model
        except Exception as exc:  # noqa: BLE001 - shown; the embedded model is used
            problems.append(f"`model={linked.model[:40]}` could not be loaded ({exc}); using "
                            f"{tracing.DEFAULT_MODEL!r}.")
            linked = linked.replace(model=tracing.DEFAULT_MODEL)
    set_study(linked)
    return problems


def study_only(problems: list[str]) -> list[str]:
    """A page's link problems without those about the study's parameters (``restore_study``
    reports those once)."""
    return [p for p in problems if p.split("=", 1)[0].lstrip("`") not in STUDY_KEYS]


def open_study(new: Study, page: str = TRACE_PAGE, url_path: str = PATHS["trace"],
               query: dict[str, str] | None = None) -> None:
    """Make ``new`` the study and open ``page`` (default the trace page, which shows it) as a link
    would: its own settings from ``query``, else their defaults (so the trace page computes every
    row, nothing severed: what a category batch stored)."""
    set_study(new)
    follow_link(page, url_path, query or {})


def study_box(what: str = "This page") -> None:
    """A one-line reminder of the current study with a link to edit it on the trace page."""
    with st.container(border=True, horizontal=True, vertical_alignment="center", gap="small"):
        st.markdown(f"**Study** · {study().describe()}  \n:gray[{what} uses it; it is set on the "
                    "trace page and kept across pages and in every link.]")
        st.page_link(TRACE_PAGE, label="Edit on the trace page", icon=":material/edit:",
                     query_params=study().to_query())


# ---------------------------------------------------------------------------------------------
# Cached per-prompt views (shared by the pages that show them)


@st.cache_data(show_spinner=False, max_entries=5_000)  # [L, H, few] each: a prompt set's worth
def _attention_to(model: str, revision: str, prompt: str, positions: tuple[int, ...]):
    return tracing.attention.attention_to(cached_model(model), prompt, positions)


def attention_to(lm: tracing.LoadedModel, prompt: str, positions) -> Any:
    """``tracing.attention.attention_to``, cached: [n_layers, n_heads, len(positions)]."""
    return _attention_to(lm.name, lm.revision, prompt, tuple(int(p) for p in positions))


@st.cache_data(show_spinner=False, max_entries=64)
def _logit_lens(model: str, revision: str, prompt: str, k: int, target: Any):
    return tracing.hidden.logit_lens(cached_model(model), prompt, k=k, target=target)


def logit_lens(lm: tracing.LoadedModel, prompt: str, k: int = 5, target: Any = None) -> Any:
    """``tracing.hidden.logit_lens``, cached (``target``: None, a completion or a token id)."""
    return _logit_lens(lm.name, lm.revision, prompt, int(k), target)


# ---------------------------------------------------------------------------------------------
# The prompt-set picker (categories, attention and hidden-states pages)


@st.cache_data(show_spinner=False, max_entries=32)
def _load_set(data: bytes, model: str | None) -> pd.DataFrame:
    return prompts.load_prompt_set(data, lm=cached_model(model) if model else None)


def prompt_set_picker(key: str, *, lm: tracing.LoadedModel | None = None, where: Any = None,
                      upload_key: str | None = None, upload_note: bool = True,
                      help: str = "CSV columns: category, prompt, expected, subject; optional: notes, "
                                  "noised, model_top1 (see the README).") -> tuple[pd.DataFrame, str] | None:
    """A shipped prompt set or an uploaded CSV: (frame, its name), or None with a message shown
    (nothing uploaded yet, or an unreadable file). With ``lm`` the set is checked against the
    model (model_top1, token problems). Loads are cached by content, so an edited file is read
    again."""
    shipped = prompts.shipped_sets()
    choice = (where or st).selectbox("Prompt set", [*shipped, UPLOAD], persist_state="session", key=key, help=help)
    try:
        if choice in shipped:
            name, data = choice, shipped[choice].read_bytes()
        else:
            upload = st.file_uploader("Prompt-set CSV", type=["csv"], key=upload_key or f"{key}_upload",
                                      max_upload_size=max(1, prompts.MAX_BYTES // 1_000_000))
            if upload is None:
                if upload_note:
                    st.info("Upload a prompt-set CSV to use it here.")
                return None
            if upload.size > prompts.MAX_BYTES:
                raise ValueError(f"'{upload.name}' is larger than {prompts.MAX_BYTES // 1000} kB.")
            name, data = upload.name, upload.getvalue()
        return _load_set(data, lm.name if lm is not None else None), name
    except Exception as exc:  # noqa: BLE001 - shown to the user, the page keeps running
        show_error(exc, "Could not read the prompt set")
        return None


# ---------------------------------------------------------------------------------------------
# Keep the last good result


def keep_last_good(key: str, compute: Callable[[], Any] | None, what: str) -> tuple[Any, bool]:
    """Run ``compute`` (when given) and keep its result under ``key``; when it raises, show the
    error (``what``: what failed) and keep the previous result. A result of None is not kept
    (``compute`` has shown why). Returns (the last good result or None, whether it is new)."""
    fresh = False
    if compute is not None:
        try:
            value = compute()
        except Exception as exc:  # noqa: BLE001 - shown to the user; the last result stays
            show_error(exc, what)
        else:
            if value is not None:
                st.session_state[key] = value
                fresh = True
    return st.session_state.get(key), fresh


# ---------------------------------------------------------------------------------------------
# Progress


@contextmanager
def progress(text: str, where: Any = None, *, unit: str = "", first: str | None = None,
             stopped: Callable[[], bool] | None = None,
             below: Callable[[Any], None] | None = None) -> Iterator[Callable[..., bool]]:
    """A progress bar for the duration of the block; yields ``update(done, total, text=None)``,
    which shows "text done/total unit, N s, about M s left" ("text N %, ..." when ``unit`` is
    "%": the engine counts work, not cells) and returns False once ``stopped()`` says so (the
    computation then cancels). ``first``: the text before the first update;
    ``below(container)`` draws more under the bar (a Stop button). The bar disappears at the end."""
    holder = (where or st).empty()
    box = holder.container()
    bar = box.progress(0.0, text=first or text)
    if below is not None:
        below(box)
    started = time.perf_counter()

    def update(done: int, total: int, label: str | None = None) -> bool:
        if stopped is not None and stopped():
            return False
        seconds = time.perf_counter() - started
        left = f", about {seconds / done * (total - done):.0f} s left" if 0 < done < total else ""
        count = f"{100 * done / total:.0f} %" if unit == "%" and total else f"{done}/{total}{' ' + unit if unit else ''}"
        shown = label or f"{text} {count}, {seconds:.0f} s{left}"
        bar.progress(min(1.0, done / total) if total else 1.0, text=shown)
        return True

    try:
        yield update
    finally:
        holder.empty()
