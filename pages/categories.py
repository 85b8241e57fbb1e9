"""Category averages: trace a whole prompt set, then average the noised and final token rows."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages import common
from pages.state import CategoriesState
from tracing import batch, causal, prompts
from tracing.charts import averages as category_charts
from tracing.charts.style import SHORT_KIND
from tracing.settings import DEFAULTS, KINDS, NOISE_MODES, NOISE_RANGE, SAMPLES_RANGE, SEED_RANGE, WINDOW_RANGE

STATE = "cat_state"  # the page state (CategoriesState), kept across page switches
SET_KEY = "cat_set"  # last valid prompt set: dict(name, source, frame)
EDITABLE = ["category", "prompt", "expected", "subject", "notes", "noised", "model_top1"]
MODES = {"absolute": "absolute", "sigma": "× embedding std"}


# -- prompt set ----------------------------------------------------------------------------------


def pick_set() -> None:
    """Shipped set or upload; a bad file shows an error and keeps the previous set."""
    def read() -> dict | None:
        picked = common.prompt_set_picker("cat_choice", upload_key="cat_upload", upload_note=False)
        if picked is None:  # nothing uploaded yet, or unreadable (error shown): keep the set
            return None
        frame, name = picked
        previous = st.session_state.get(SET_KEY)
        if previous is not None and previous["name"] == name and previous["source"].equals(frame):
            return previous  # the same set: keep its edits
        return {"name": name, "source": frame, "frame": frame}

    common.keep_last_good(SET_KEY, read, "Could not read the prompt set")


def _for_editor(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[EDITABLE].copy()
    out["noised"] = [" ".join(map(str, v)) if isinstance(v, list) else "" for v in out["noised"]]
    out["model_top1"] = out["model_top1"].astype(object).where(out["model_top1"].notna(), None)
    return out


def edit_set(lm) -> pd.DataFrame | None:
    """The set in an editable table, re-checked with the model; the last valid edit is used."""
    state = st.session_state.get(SET_KEY)
    if state is None:
        st.info("Pick a shipped set or upload a CSV.")
        return None
    edited = st.data_editor(
        _for_editor(state["source"]), num_rows="dynamic", width="stretch", height=260,
        key=f"cat_editor_{state['name']}",
        column_config={
            "category": st.column_config.SelectboxColumn(options=list(prompts.CATEGORIES), required=True),
            "noised": st.column_config.TextColumn(help="Token indices to noise instead of the subject's last token"),
            "model_top1": st.column_config.CheckboxColumn("embedded top-1", disabled=True),
        },
    )
    try:
        checked = prompts.check_prompt_set(edited, lm=lm)
        state["frame"] = checked
    except ValueError as exc:
        common.show_error(exc, "The edited set has errors (the last valid version is used)")
        checked = state["frame"]
    flagged = checked[checked["problems"] != ""]
    if len(flagged):
        with st.expander(f"{len(flagged)} prompt(s) break a constraint of the study"):
            st.dataframe(flagged[["category", "prompt", "subject", "problems"]], width="stretch")
    stem = state["name"].rsplit(".", 1)[0]
    common.download_button("Download the edited set (CSV)", prompts.prompt_set_to_csv(checked),
                           f"{stem}-edited.csv", "text/csv", "cat_download_set")
    return checked


# -- settings and run ----------------------------------------------------------------------------


def _clamp(key: str, low, high) -> None:
    """Keep a widget's value inside its range (a link or another model may have put it outside)."""
    value = st.session_state.get(key)
    if value is not None and not low <= value <= high:
        st.session_state[key] = min(max(value, low), high)


def settings_form(n_layers: int) -> CategoriesState:
    """Trace settings for the whole batch and the target mode (ranges from tracing.settings)."""
    c = st.columns(6)
    kind = c[0].selectbox("Restore", KINDS, format_func=SHORT_KIND.get, key="cat_kind")
    mode = c[2].selectbox("Noise is", NOISE_MODES, key="cat_mode", format_func=MODES.get)
    _clamp("cat_noise", *NOISE_RANGE[mode])
    c[1].number_input("Noise", *NOISE_RANGE[mode], step=0.05, key="cat_noise",
                      help="Std of the Gaussian noise added to the noised token's embedding "
                           f"(default {DEFAULTS.noise:g}).")
    c[3].number_input("Samples", *SAMPLES_RANGE, key="cat_samples",
                      help=f"Noise draws averaged per cell (default {DEFAULTS.samples}, as ROME).")
    c[4].number_input("Seed", *SEED_RANGE, key="cat_seed")
    c[5].selectbox("Target", batch.TARGETS, key="cat_target",
                   format_func={"expected": "expected token", "top1": "clean top-1"}.get)
    if kind != "hidden":
        high = min(n_layers, WINDOW_RANGE[1])
        _clamp("cat_window", WINDOW_RANGE[0], high)
        st.slider("Window (layers)", WINDOW_RANGE[0], high, key="cat_window")
    return common.widget_state(CategoriesState, STATE)


def run(lm, frame: pd.DataFrame, state: CategoriesState) -> None:
    """Run the missing traces with an overall and a per-prompt progress bar."""
    overall_slot, inner_slot = st.empty(), st.empty()
    st.button("Cancel", key="cat_cancel", help="Stops after the current step; finished prompts are kept.")
    with common.progress(f"0 / {len(frame)} prompts", overall_slot) as overall, \
            common.progress("current prompt:", inner_slot, unit="%") as inner:
        def on_prompt(done: int, total: int, result: batch.PromptResult) -> None:
            overall(done, total, f"{done} / {total} prompts · {result.status}: {result.prompt[:50]}")

        result = batch.run_batch(lm, frame, state.batch_settings(), common.result_store(),
                                 target=state.target, progress=on_prompt, prompt_progress=inner,
                                 trace=causal.causal_trace)  # looked up now: tests swap the engine
    st.session_state["cat_last_run"] = (
        f"Computed {result.counts.get('computed', 0)} trace(s), "
        f"{result.counts.get('stored', 0)} from the store, in {result.elapsed:.1f} s."
    )


# -- results -------------------------------------------------------------------------------------


def show_results(results: list[batch.PromptResult], n_layers: int) -> None:
    """Summary, heatmaps, line charts, scatter plots and the per-prompt table, with downloads."""
    c = st.columns(4)
    correct_only = c[0].toggle("Only prompts the model gets right", key="cat_correct")
    combine = c[1].toggle("Combine regurgitation categories", key="cat_combine")
    spread = c[2].radio("Band", ["sem", "std"], horizontal=True, key="cat_spread",
                        format_func={"sem": "± standard error", "std": "± std"}.get)
    min_effect = c[3].number_input("Min. effect of noise", 0.0, 1.0, step=0.01, key="cat_min_effect",
                                   help="Prompts where noise lowers p(target) by less are left out of averages.")
    options = dict(correct_only=correct_only, combine_regurgitation=combine, min_effect=min_effect)
    averages = batch.category_averages(results, **options)
    table = batch.prompt_table(results)
    table.insert(0, "averaged", (table["effect"] >= min_effect) & (table["correct"].astype(bool) | (not correct_only)))
    st.dataframe(batch.category_summary(results, **options), width="stretch", hide_index=True)
    if averages.empty:
        st.warning("No prompt passes the filters: relax them or trace more prompts.")
    else:
        heat = category_charts.heatmap_chart(averages, width=max(160, min(300, 9 * n_layers)))
        st.altair_chart(heat)
        common.chart_downloads(heat, "category-heatmaps", averages)
        lines = category_charts.line_chart(averages, spread=spread)
        st.altair_chart(lines)
        common.chart_downloads(lines, "category-lines", averages)
    st.subheader("Confounds: transition layer per prompt")
    st.caption("Transition layer: the first layer from which restoring the final token beats "
               "restoring the noised token at every later layer (as on the trace page). Prompts in "
               "the averages only.")
    left, right = st.columns(2)
    for column, x in ((left, "token_distance"), (right, "clean_prob")):
        with column:
            chart = category_charts.scatter_chart(table[table["averaged"]], x)
            st.altair_chart(chart)
            common.chart_downloads(chart, f"transition-vs-{x}", table)
    st.subheader("Per prompt")
    st.dataframe(table, width="stretch", hide_index=True)


def page() -> None:
    st.title("Category averages")
    st.caption(
        "Trace every prompt of a set, then average per category the normalised trace (0 = corrupted, "
        "1 = clean) of the noised token and of the final token, as in the seed study. Traces are kept "
        "in the result store: a re-run only computes what is missing."
    )
    lm = common.current_model()
    pick_set()
    frame = edit_set(lm)
    if frame is None:
        return
    state = settings_form(lm.n_layers)
    settings, target = state.batch_settings(), state.target
    try:
        plan = batch.plan_batch(lm, frame, settings, common.result_store(), target)
    except ValueError as exc:
        common.show_error(exc, "Bad settings")
        return
    pending = sum(r.status == "pending" for r in plan)
    stored = sum(r.status == "stored" for r in plan)
    skipped = [r for r in plan if r.status == "skipped"]
    st.caption(f"{len(plan)} prompts: {stored} in the store, {pending} to compute, {len(skipped)} skipped.")
    if st.button(f"Trace {pending} missing prompt(s)", type="primary", disabled=pending == 0, key="cat_run"):
        try:
            common.publish_state(state, STATE)
            run(lm, frame, state)
            st.rerun()
        except Exception as exc:  # noqa: BLE001 - results so far are stored; show what went wrong
            common.show_error(exc, "The batch stopped")
            plan = batch.plan_batch(lm, frame, settings, common.result_store(), target)
    if "cat_last_run" in st.session_state:
        st.caption(st.session_state["cat_last_run"])
    for r in skipped:
        st.warning(f"Skipped {r.prompt!r}: {r.message}")
    traced = [r for r in plan if r.trace is not None]
    if traced:
        show_results(traced, lm.n_layers)
    else:
        st.info("No traces yet for these settings: press the button above to trace the set.")


def render() -> None:
    _, problems = common.restore_state(CategoriesState, STATE, common.PATHS["categories"])
    common.show_problems(problems)
    page()
    common.publish_state(common.widget_state(CategoriesState, STATE), STATE)


common.run_page(render)
