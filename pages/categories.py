"""Category averages: trace a whole prompt set, then average the noised and final token rows."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages import common

common.leave_legacy_pages_mode()
from tracing import batch, category_charts, prompts
from tracing.store import ResultStore, default_root

SET_KEY = "cat_set"  # last valid prompt set: dict(name, frame)
UPLOAD = "Upload a CSV…"
EDITABLE = ["category", "prompt", "expected", "subject", "notes", "noised", "model_top1"]
KINDS = {"hidden": "hidden states", "mlp": "MLP outputs", "attn": "attention outputs"}


@st.cache_resource
def _store(root: str) -> ResultStore:
    return ResultStore(root)


def result_store() -> ResultStore:
    """One result store per folder (disk + memory layer), shared by every session."""
    return _store(str(default_root()))


# -- prompt set ----------------------------------------------------------------------------------


def pick_set() -> None:
    """Shipped set or upload; a bad file shows an error and keeps the previous set."""
    shipped = prompts.shipped_sets()
    choice = st.selectbox("Prompt set", list(shipped) + [UPLOAD], key="cat_choice",
                          help="CSV columns: category, prompt, expected, subject, notes (see the README).")
    try:
        if choice in shipped:
            name, frame = choice, prompts.load_prompt_set(shipped[choice])
        else:
            upload = st.file_uploader("Prompt-set CSV", type=["csv"], key="cat_upload")
            if upload is None:
                return
            if upload.size > prompts.MAX_BYTES:
                raise ValueError(f"'{upload.name}' is larger than {prompts.MAX_BYTES // 1000} kB.")
            name, frame = upload.name, prompts.load_prompt_set(upload.getvalue())
    except ValueError as exc:
        common.show_error(exc, "Could not read the prompt set")
        return
    previous = st.session_state.get(SET_KEY)
    if previous is None or previous["name"] != name or not previous["source"].equals(frame):
        st.session_state[SET_KEY] = {"name": name, "source": frame, "frame": frame}


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


def settings_form(n_layers: int) -> tuple[dict, str]:
    """Trace settings for the whole batch, and the target mode."""
    c = st.columns(6)
    kind = c[0].selectbox("Restore", list(KINDS), format_func=KINDS.get, key="cat_kind")
    noise = c[1].number_input("Noise", 0.0, 100.0, 0.4, 0.05, key="cat_noise",
                              help="Std of the Gaussian noise added to the noised token's embedding.")
    mode = c[2].selectbox("Noise is", ["absolute", "sigma"], key="cat_mode",
                          format_func={"absolute": "absolute", "sigma": "× embedding std"}.get)
    samples = c[3].number_input("Samples", 1, 100, 10, key="cat_samples")
    seed = c[4].number_input("Seed", 0, 2**31 - 1, 0, key="cat_seed")
    target = c[5].selectbox("Target", list(batch.TARGETS), key="cat_target",
                            format_func={"expected": "expected token", "top1": "clean top-1"}.get)
    settings = {"kind": kind, "noise": noise, "noise_mode": mode, "samples": int(samples), "seed": int(seed)}
    if kind != "hidden":
        settings["window"] = int(st.slider("Window (layers)", 1, n_layers, min(10, n_layers), key="cat_window"))
    return settings, target


def run(lm, frame: pd.DataFrame, settings: dict, target: str) -> None:
    """Run the missing traces with an overall and a per-prompt progress bar."""
    overall = st.progress(0.0, text=f"0 / {len(frame)} prompts")
    inner = st.progress(0.0, text="current prompt")
    st.button("Cancel", key="cat_cancel", help="Stops after the current step; finished prompts are kept.")

    def on_prompt(done: int, total: int, result: batch.PromptResult) -> None:
        overall.progress(done / total, text=f"{done} / {total} prompts · {result.status}: {result.prompt[:50]}")

    def on_cells(done: int, total: int) -> None:
        inner.progress(done / max(total, 1), text=f"current prompt: {done} / {total} restorations")

    result = batch.run_batch(lm, frame, settings, result_store(), target=target,
                             progress=on_prompt, prompt_progress=on_cells)
    inner.empty()
    st.session_state["cat_last_run"] = (
        f"Computed {result.counts.get('computed', 0)} trace(s), "
        f"{result.counts.get('stored', 0)} from the store, in {result.elapsed:.1f} s."
    )


# -- results -------------------------------------------------------------------------------------


def show_results(results: list[batch.PromptResult], n_layers: int) -> None:
    """Summary, heatmaps, line charts, scatter plots and the per-prompt table, with downloads."""
    c = st.columns(4)
    correct_only = c[0].toggle("Only prompts the model gets right", value=True, key="cat_correct")
    combine = c[1].toggle("Combine regurgitation categories", value=False, key="cat_combine")
    spread = c[2].radio("Band", ["sem", "std"], horizontal=True, key="cat_spread",
                        format_func={"sem": "± standard error", "std": "± std"}.get)
    min_effect = c[3].number_input("Min. effect of noise", 0.0, 1.0, batch.MIN_EFFECT, 0.01, key="cat_min_effect",
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
    settings, target = settings_form(lm.n_layers)
    try:
        plan = batch.plan_batch(lm, frame, settings, result_store(), target)
    except ValueError as exc:
        common.show_error(exc, "Bad settings")
        return
    pending = sum(r.status == "pending" for r in plan)
    stored = sum(r.status == "stored" for r in plan)
    skipped = [r for r in plan if r.status == "skipped"]
    st.caption(f"{len(plan)} prompts: {stored} in the store, {pending} to compute, {len(skipped)} skipped.")
    if st.button(f"Trace {pending} missing prompt(s)", type="primary", disabled=pending == 0, key="cat_run"):
        try:
            run(lm, frame, settings, target)
            st.rerun()
        except Exception as exc:  # noqa: BLE001 - results so far are stored; show what went wrong
            common.show_error(exc, "The batch stopped")
            plan = batch.plan_batch(lm, frame, settings, result_store(), target)
    if "cat_last_run" in st.session_state:
        st.caption(st.session_state["cat_last_run"])
    for r in skipped:
        st.warning(f"Skipped {r.prompt!r}: {r.message}")
    traced = [r for r in plan if r.trace is not None]
    if traced:
        show_results(traced, lm.n_layers)
    else:
        st.info("No traces yet for these settings: press the button above to trace the set.")


page()
