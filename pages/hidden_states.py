"""Hidden states of the final token: the logit lens (the study's prompt by default) and
trajectories by prompt type."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

import tracing
from pages import common
from pages.state import HiddenState, Study
from tracing import hidden
from tracing.categories import group_label
from tracing.charts import hidden as hidden_charts
from tracing.charts.style import ellipsis, quote_token, show_token

STATE = "hidden_state"  # the page state (HiddenState), kept across page switches
TRAJ_KEY = "hidden_trajectories"  # last good trajectories: dict(model, source, frame, seconds)
LENS_KEY = "hidden_lens"  # last good logit lens: dict(model, lens)
TABS = HiddenState.TABS
SOURCE_LABELS = {"study": "the study's prompt", "set": "a prompt from the set", "own": "my own"}
SET_HELP = "Columns category, prompt, expected, subject (see the README)."


@st.cache_data(show_spinner="Running every prompt of the set…", max_entries=8)
def trajectories(model_name: str, records: tuple[tuple[str, str, str], ...]
                 ) -> tuple[pd.DataFrame, float]:
    """Long table of every measure for every prompt, and the seconds it took."""
    lm = common.cached_model(model_name)
    frame = pd.DataFrame(records, columns=["category", "prompt", "expected"])
    start = time.perf_counter()
    result = hidden.prompt_set_trajectories(lm, frame)
    return result, time.perf_counter() - start


@st.cache_data(show_spinner=False, max_entries=32)
def prompt_trajectory(model_name: str, prompt: str, target: str | None) -> dict[str, np.ndarray]:
    return hidden.prompt_trajectory(common.cached_model(model_name), prompt, target)


def pick_set() -> tuple[pd.DataFrame, str] | None:
    """The prompt set (one picker for both tabs: only the open one draws it)."""
    return common.prompt_set_picker("hidden_set", upload_key="hidden_upload", help=SET_HELP)


# ---------------------------------------------------------------------------------------------
# Trajectories by prompt type


def compute_trajectories(model_name: str, picked: tuple[pd.DataFrame, str] | None) -> dict | None:
    """Run the picked set (cached); on failure show an error and return the last good result."""
    def run() -> dict | None:
        frame, source = picked
        records = tuple(zip(frame["category"], frame["prompt"], frame["expected"].fillna("")))
        result, seconds = trajectories(model_name, records)
        return dict(model=model_name, source=source, frame=result, seconds=seconds, n=len(records))

    return common.keep_last_good(TRAJ_KEY, run if picked is not None else None,
                                 "Could not compute the trajectories")[0]


def crop_key(n_layers: int) -> str:  # a model-dependent range: one widget per model depth
    return f"hidden_crop_{n_layers}"


def trajectory_controls(n_layers: int) -> dict:
    c1, c2, c3, c4 = st.columns([1.1, 1, 1, 2])
    combine = c1.toggle("Combine regurgitation", persist_state="session", key="hidden_combine",
                        help="One line for non-English and plain-English regurgitation together.")
    spread = c2.radio("Band", list(hidden_charts.SPREADS), persist_state="session", key="hidden_spread",
                      format_func=hidden_charts.SPREADS.get)
    per_prompt = c3.toggle("Show every prompt", persist_state="session", key="hidden_per_prompt")
    key = crop_key(n_layers)
    if key not in st.session_state:  # the link's layers when they fit this model, else 10 %-90 %
        crop = st.session_state[STATE].crop
        fits = crop is not None and crop[1] <= n_layers
        st.session_state[key] = crop if fits else (max(1, round(n_layers * 0.1)), max(2, round(n_layers * 0.9)))
    crop = c4.slider("Middle layers (right column)", 0, n_layers, persist_state="session", key=key,
                     help="The right-hand charts show only these layers, with their own y range.")
    measures = st.multiselect("Measures", list(hidden.MEASURES), format_func=hidden.MEASURES.get,
                              persist_state="session", key="hidden_measures")
    return dict(combine=combine, spread=spread, per_prompt=per_prompt, crop=crop, measures=measures)


def current_line(model_name: str, study: Study, n_layers: int) -> pd.DataFrame | None:
    """The study prompt's own trajectory (target: its expected completion, else the top-1 token),
    or None with a note when it cannot be measured."""
    try:
        measures = prompt_trajectory(model_name, study.prompt, study.target or None)
    except ValueError as exc:
        st.info(f"The study's prompt is not drawn: {exc} (change it on the trace page).")
        return None
    st.caption(f"Dashed dark line: the **current prompt** (the study's) “{ellipsis(study.prompt, 70)}”, "
               f"p({quote_token(study.target) if study.target else 'its top-1 token'}).")
    return hidden_charts.current_frame(measures, n_layers)


def trajectory_section(model_name: str, study: Study) -> None:
    st.caption(
        "The final token's hidden state on the clean prompt, from the embeddings (layer 0) to "
        "the last block's output (layer L, before the final norm). Lines: mean over the prompts "
        "of each type; band: spread. Cosine and step at layer l compare the states before and "
        "after block l; step cosine at layer l compares block l's step with block l−1's."
    )
    result = compute_trajectories(model_name, pick_set())
    if result is None:
        return
    frame = result["frame"]
    n_layers = int(frame["layer"].max())
    if result["model"] != model_name:
        st.warning(f"Showing the last result, computed with **{result['model']}**.")
    st.caption(f"**{result['n']} prompts** from `{result['source']}` · {result['model']} · "
               f"computed in {result['seconds']:.1f} s")
    opts = trajectory_controls(n_layers)
    if not opts["measures"]:
        st.error("Pick at least one measure.")
        return
    summary = hidden.summarise(frame, opts["combine"])
    lines = hidden.group_categories(frame, opts["combine"]) if opts["per_prompt"] else None
    current = current_line(model_name, study, n_layers) if result["model"] == model_name else None
    chart = hidden_charts.trajectory_figure(summary, opts["measures"], tuple(opts["crop"]),
                                            opts["spread"], lines, current=current)
    st.altair_chart(chart, width="content")
    if wants_downloads("hidden_traj_downloads"):
        grouping = "combined" if opts["combine"] else "by_category"
        common.chart_downloads(chart, "hidden_trajectories", summary,
                               name=common.file_name("hidden_trajectories", result["source"], grouping,
                                                     opts["spread"]))
    with st.expander("Per-prompt values"):
        st.dataframe(frame, hide_index=True, width="stretch")
        common.download_button("CSV (every prompt)", frame.to_csv(index=False),
                               f"{common.file_name('hidden_trajectories_per_prompt', result['source'])}.csv",
                               "text/csv", "hidden_pp_csv")


# ---------------------------------------------------------------------------------------------
# Logit lens


def set_row(frame: pd.DataFrame) -> tuple[str, str]:
    """A row of the prompt set (widget ``hidden_lens_pick``): its prompt and expected completion."""
    pick = st.session_state.get("hidden_lens_pick", 0)
    if not isinstance(pick, int) or not 0 <= pick < len(frame):
        st.warning(f"Row {pick} is not in this prompt set (rows 0 to {len(frame) - 1}): showing row 0.")
        st.session_state["hidden_lens_pick"] = 0

    def label(i: int) -> str:
        row = frame.iloc[i]
        return f"{group_label(row['category'])}: {row['prompt']} → {quote_token(_text(row['expected']))}"

    row = frame.iloc[st.selectbox("Prompt from the set", range(len(frame)), format_func=label,
                                  persist_state="session", key="hidden_lens_pick")]
    return str(row["prompt"]), _text(row["expected"])


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def lens_inputs(study: Study) -> tuple[str, str] | None:
    """The lens's prompt and target ("" = the top prediction) from the chosen source; None when
    there is none yet (no prompt set)."""
    source = st.radio("Prompt", list(HiddenState.LENS_SOURCES), horizontal=True, persist_state="session", key="hidden_lens_source",
                      format_func=SOURCE_LABELS.get)
    if source == "study":
        common.study_box("The logit lens")
        st.caption("Target: the study's expected completion (empty: the model's top prediction). To look at "
                   "another prompt, change the study on the trace page or choose another prompt above.")
        return study.prompt, study.target
    if source == "set":
        picked = pick_set()
        return set_row(picked[0]) if picked is not None else None
    c1, c2 = st.columns([3, 1.2])
    prompt = c1.text_input("Prompt", persist_state="session", key="hidden_lens_prompt")
    target = c2.text_input("Target completion", persist_state="session", key="hidden_lens_target",
                           help="Its first token is tracked (include the leading space, "
                                "e.g. ' Paris'). Empty: the model's top prediction.")
    return prompt, target


def lens_section(model_name: str, study: Study) -> None:
    st.caption("The final token's state entering each layer, put through the model's final norm "
               "and unembedding: what the model would predict if it stopped there.")
    inputs = lens_inputs(study)
    k = st.slider("Top tokens", 1, 10, persist_state="session", key="hidden_lens_k")
    if inputs is None:
        return
    prompt, target = inputs
    what = "Could not run the logit lens" + (" on the study's prompt (change it on the trace page)"
                                             if st.session_state.get("hidden_lens_source") == "study" else "")
    shown, _ = common.keep_last_good(
        LENS_KEY, lambda: dict(model=model_name, lens=common.logit_lens(common.cached_model(model_name), prompt, k, target or None)), what)
    if shown is None:
        return
    lens = shown["lens"]
    if shown["model"] != model_name or lens.prompt != prompt:
        st.warning(f"Showing the last valid result ({shown['model']}, prompt `{ellipsis(lens.prompt, 80)}`).")
    show_lens(lens)


def wants_downloads(key: str) -> bool:
    """A toggle: rendering PNG and SVG takes seconds, so only when asked for."""
    return st.toggle("Downloads (PNG · SVG · CSV)", value=False, persist_state="session", key=key)


def show_lens(lens: hidden.LogitLens) -> None:
    st.caption("Tokens: " + " · ".join(f"`{show_token(t)}`" for t in lens.tokens))
    downloads = wants_downloads("hidden_lens_downloads")
    k = int(lens.top_ids.shape[1])
    left, right = st.columns([3, 2])
    with left:
        heat = hidden_charts.lens_heatmap(lens)
        st.altair_chart(heat, width="content")
        if downloads:
            common.chart_downloads(heat, "logit_lens", lens_frame_csv(lens),
                                   name=common.file_name("logit_lens", lens.prompt, lens.target, f"top{k}"))
    with right:
        scale = st.radio("Show", list(hidden_charts.CURVE_SCALES), horizontal=True,
                         format_func=hidden_charts.CURVE_SCALES.get, persist_state="session", key="hidden_lens_scale")
        curve = hidden_charts.target_curve(lens, scale)
        st.altair_chart(curve, width="content")
        if downloads:
            common.chart_downloads(curve, "logit_lens_target", lens.target_frame(),
                                   name=common.file_name("logit_lens_target", lens.prompt, lens.target, scale))
        final = lens.target_probs[-1]
        st.caption(f"Target {quote_token(lens.target)} (id {lens.target_id}): "
                   f"p = {final:.3g} at the output, rank {int(lens.target_ranks[-1])}.")
    with st.expander("Table"):
        st.dataframe(hidden_charts.lens_wide_table(lens), hide_index=True, width="stretch")


def lens_frame_csv(lens: hidden.LogitLens) -> pd.DataFrame:
    table = lens.table()
    table["target"] = lens.target
    table["target_prob"] = lens.target_probs[table["layer"]]
    return table


# ---------------------------------------------------------------------------------------------


SECTIONS = {"Logit lens": lens_section, "Trajectories by prompt type": trajectory_section}
assert set(SECTIONS) == set(TABS), "every hidden-states tab needs a section"


def current_state() -> HiddenState:
    """The state the widgets show (the crop of the model shown last)."""
    shown = st.session_state.get(TRAJ_KEY)
    crop = st.session_state[STATE].crop
    if shown is not None:
        crop = st.session_state.get(crop_key(int(shown["frame"]["layer"].max())), crop)
    return common.widget_state(HiddenState, STATE, crop=tuple(crop) if crop is not None else None)


def render() -> None:
    st.title("Hidden states of the final token")
    _, problems = common.restore_state(HiddenState, STATE, common.PATHS["hidden_states"])
    common.show_problems(problems)
    common.current_model()
    model_name = st.session_state.get(common.MODEL_KEY, tracing.DEFAULT_MODEL)
    study = common.study()
    tabs = st.tabs(list(TABS), on_change="rerun", key="hidden_tab")  # lazy: only the open tab runs
    for name, tab in zip(TABS, tabs):
        with tab:
            if tab.open or (tab.open is None and name == TABS[0]):
                SECTIONS[name](model_name, study)
    common.publish_state(current_state(), STATE)


common.run_page(render)
