"""Category averages: trace a whole prompt set, then average the noised and final token rows;
test the seed's claim (do the categories hand over to the final token at different layers?) with
bootstrap intervals and permutation tests; click a prompt to open its trace."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

from pages import common
from pages.state import CategoriesState, Study
from tracing import batch, causal, prompts, stats
from tracing.charts import averages as category_charts
from tracing.charts.style import SHORT_KIND, ellipsis
from tracing.settings import DEFAULTS, KINDS, METRICS, NOISE_MODES, NOISE_RANGE, SAMPLES_RANGE, SEED_RANGE, WINDOW_RANGE

STATE = "cat_state"  # the page state (CategoriesState), kept across page switches
SET_KEY = "cat_set"  # last valid prompt set: dict(name, source, frame)
EDITABLE = ["category", "prompt", "expected", "subject", "notes", "noised", "model_top1"]
MODES = {"absolute": "absolute", "sigma": "× embedding std"}
ANSWERS = {"expected": "expected token", "top1": "clean top-1"}
LINKS = "cat_links"  # how many prompts were opened on the trace page (fresh selection keys after each)
PROMPT_CHARS = 80  # prompts longer than this are cut in messages
CSV_HELP = ("CSV columns: category, prompt, expected, subject; optional: notes, noised, model_top1 "
            "(see the README).")


# -- prompt set ----------------------------------------------------------------------------------


def pick_set() -> None:
    """Shipped set or upload; a bad file shows an error and keeps the previous set."""
    def read() -> dict | None:
        picked = common.prompt_set_picker("cat_choice", upload_key="cat_upload", upload_note=False,
                                          help=CSV_HELP)
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
    common.download_button("Download the edited set (CSV)", prompts.prompt_set_to_csv(checked),
                           common.file_name(set_stem(), "edited") + ".csv", "text/csv", "cat_download_set")
    return checked


def set_stem() -> str:
    """The current prompt set's name without ".csv" (for file names)."""
    state = st.session_state.get(SET_KEY)
    return str(state["name"]).removesuffix(".csv") if state else "prompts"


# -- settings and run ----------------------------------------------------------------------------


def _clamp(key: str, low, high) -> None:
    """Keep a widget's value inside its range (a link or another model may have put it outside)."""
    value = st.session_state.get(key)
    if value is not None and not low <= value <= high:
        st.session_state[key] = min(max(value, low), high)


def settings_form(n_layers: int, study: Study) -> CategoriesState:
    """The batch's settings: the study's (shown on one line), or with "Own settings for this
    batch" the page's own form; and the traced answer. Traces of both stay in the store."""
    common.study_box("The batch (its kind, noise, samples, seed and window)")
    c = st.columns([1.6, 1.4, 3])
    own = c[0].toggle("Own settings for this batch", persist_state="session", key="cat_own",
                      help="Off: the batch traces with the study's settings (set on the trace page). On: "
                           "with the settings below. Traces made with either stay in the result store.")
    c[1].selectbox("Target", batch.TARGETS, persist_state="session", key="cat_target", format_func=ANSWERS.get)
    if own:
        own_form(n_layers)
    state = common.widget_state(CategoriesState, STATE)
    settings = state.batch_settings(study)
    st.markdown(f"**Batch settings** ({'own' if own else 'from the study'}): {describe_settings(settings)}")
    for note in [] if own else study_notes(study):
        st.caption(note)
    return state


def own_form(n_layers: int) -> None:
    """The page's own trace settings (ranges from tracing.settings)."""
    c = st.columns(5)
    kind = c[0].selectbox("Restore", KINDS, format_func=SHORT_KIND.get, persist_state="session", key="cat_kind")
    mode = c[2].selectbox("Noise is", NOISE_MODES, persist_state="session", key="cat_mode", format_func=MODES.get)
    _clamp("cat_noise", *NOISE_RANGE[mode])
    c[1].number_input("Noise", *NOISE_RANGE[mode], step=0.05, persist_state="session", key="cat_noise",
                      help="Std of the Gaussian noise added to the noised token's embedding "
                           f"(default {DEFAULTS.noise:g}).")
    c[3].number_input("Samples", *SAMPLES_RANGE, persist_state="session", key="cat_samples",
                      help=f"Noise draws averaged per cell (default {DEFAULTS.samples}, as ROME).")
    c[4].number_input("Seed", *SEED_RANGE, persist_state="session", key="cat_seed")
    if kind != "hidden":
        high = min(n_layers, WINDOW_RANGE[1])
        _clamp("cat_window", WINDOW_RANGE[0], high)
        st.slider("Window (layers)", WINDOW_RANGE[0], high, persist_state="session", key="cat_window")


def describe_settings(settings: dict[str, Any]) -> str:
    """One line: kind, noise, samples, seed (and window) of batch settings."""
    sigma = " × σ" if settings.get("noise_mode") == "sigma" else ""
    window = f" · window {settings['window']}" if settings["kind"] != "hidden" else ""
    samples = settings["samples"]
    return (f"{SHORT_KIND[settings['kind']]} · Gaussian noise {settings['noise']:g}{sigma} · {samples} "
            f"sample{'s' if samples != 1 else ''} · seed {settings['seed']}{window}")


def study_notes(study: Study) -> list[str]:
    """What the batch does instead where the study's settings do not apply to a prompt set."""
    notes = []
    if study.kind == "all":
        notes.append("The study restores all three kinds; a batch restores one: hidden states.")
    if study.corruption == "replace":
        notes.append("The study replaces the noised tokens by a second prompt's, which a prompt set does "
                     f"not have: the batch adds Gaussian noise of {study.noise:g} instead.")
    elif study.corruption != "gaussian":
        notes.append(f"The study's noise is {study.corruption}; the batch's is Gaussian.")
    if study.convention != "input":
        notes.append("The study numbers layers by block outputs; the batch numbers them by block inputs.")
    notes.append("The batch noises each prompt's subject's last token (the seed study's rule) and traces "
                 "the chosen target, not the study's prompt.")
    return notes


def name_parts(settings: dict[str, Any], answer: str) -> tuple[str, ...]:
    """What identifies a batch in file names: the set and the settings that change its numbers."""
    sigma = "sigma" if settings.get("noise_mode") == "sigma" else ""
    parts = [set_stem(), settings["kind"], f"noise{settings['noise']:g}{sigma}", f"samples{settings['samples']}",
             f"seed{settings['seed']}"]
    if settings["kind"] != "hidden":
        parts.append(f"window{settings['window']}")
    return (*parts, *(["top1"] if answer == "top1" else []))


class PromptProgress:
    """The current prompt's bar: its own count and clock, reset when the next prompt starts (so
    it never shows the previous prompt's count beside a new bar). ``bar``: anything with
    ``progress(value, text=)`` (``st.progress``'s element); ``prompts``: the batch's prompts."""

    def __init__(self, bar: Any, prompts: list[str]) -> None:
        self.bar, self.prompts = bar, prompts
        self.start(0)

    def start(self, index: int) -> None:
        """Prompt ``index`` (0-based) is next: an empty bar and a fresh clock."""
        self.index, self.started = index, time.perf_counter()
        self.show(0, 0)

    def __call__(self, done: int, total: int) -> bool:
        """The engine's ``progress(done, total)`` for the current prompt."""
        self.show(done, total)
        return True

    def text(self, done: int, total: int, seconds: float) -> str:
        if self.index >= len(self.prompts):
            return "all prompts done"
        name = ellipsis(self.prompts[self.index], 50)
        share = done / total if total else 0.0
        left = f", about {seconds / share * (1 - share):.0f} s left" if 0 < share < 1 else ""
        return (f"prompt {self.index + 1} / {len(self.prompts)} ({name}): {100 * share:.0f} % of "
                f"its work, {seconds:.0f} s{left}")

    def show(self, done: int, total: int) -> None:
        share = min(1.0, done / total) if total else 0.0
        self.bar.progress(share, text=self.text(done, total, time.perf_counter() - self.started))


def run(lm, frame: pd.DataFrame, settings: dict[str, Any], answer: str) -> None:
    """Run the missing traces with an overall and a per-prompt progress bar."""
    overall_slot, inner_slot = st.empty(), st.empty()
    st.button("Cancel", key="cat_cancel", help="Stops after the current step; finished prompts are kept.")
    inner = PromptProgress(inner_slot.progress(0.0), [str(p) for p in frame["prompt"]])
    with common.progress(f"0 / {len(frame)} prompts", overall_slot) as overall:
        def on_prompt(done: int, total: int, result: batch.PromptResult) -> None:
            overall(done, total, f"{done} / {total} prompts · {result.status}: {result.prompt[:50]}")
            inner.start(done)

        result = batch.run_batch(lm, frame, settings, common.result_store(),
                                 target=answer, progress=on_prompt, prompt_progress=inner,
                                 trace=causal.causal_trace)  # looked up now: tests swap the engine
    inner_slot.empty()
    st.session_state["cat_last_run"] = (
        f"Computed {result.counts.get('computed', 0)} trace(s), "
        f"{result.counts.get('stored', 0)} from the store, in {result.elapsed:.1f} s."
    )


# -- opening a prompt on the trace page ----------------------------------------------------------


def study_for(lm, result: batch.PromptResult, study: Study) -> Study:
    """The study that reproduces a batch prompt's trace on the trace page: its prompt, noised
    tokens (by subject when the subject's last token is what was noised, else the indices),
    expected completion ("" when the batch traced the clean top-1) and every trace setting of
    the batch; the study's model and metric are kept (a metric that needs a contrast: p)."""
    s = result.settings or {}
    noised = [int(i) for i in s.get("noised", [])]
    by_subject = False
    if result.subject:
        try:
            by_subject = prompts.noised_positions(lm, result.prompt, result.subject) == noised
        except ValueError:
            by_subject = False
    metric = "prob" if METRICS[study.metric].needs_contrast else study.metric
    return study.replace(
        prompt=result.prompt, noise_by="subject" if by_subject else "tokens",
        subject=result.subject if by_subject else "", subject_tokens="last",
        tokens=() if by_subject else tuple(noised), target=result.expected if s.get("target") is not None else "",
        contrast="", corruption=s.get("corruption", "gaussian"), noise_mode=s.get("noise_mode", "absolute"),
        noise=float(s.get("noise", 0.0)), replacement="", samples=int(s.get("samples", 1)),
        seed=int(s.get("seed", 0)), kind=s.get("kind", "hidden"), window=int(s.get("window", 10)),
        metric=metric, convention=s.get("convention", "input"))


def open_trace(lm, result: batch.PromptResult) -> None:
    """Open one batch prompt on the trace page as the study, with the batch's settings: the
    page's store key is the batch's (``tracing.store`` keys a completion as its token), so
    the trace shows at once."""
    st.session_state[LINKS] = st.session_state.get(LINKS, 0) + 1  # fresh, empty selections on return
    common.open_study(study_for(lm, result, common.study()))


def picked_row(event: Any, kind: str) -> int | None:
    """The table position a selection event picked: a dataframe row (``kind="table"``) or a
    scatter point (``kind="chart"``, its ``row`` field); None when nothing is picked."""
    selection = (event or {}).get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    if kind == "table":
        rows = list(selection.get("rows", []) or [])
        return int(rows[0]) if rows else None
    points = list(selection.get(category_charts.PICK, []) or [])
    rows = [p.get("row") for p in points if isinstance(p, dict) and p.get("row") is not None]
    return int(rows[0]) if rows else None


# -- results -------------------------------------------------------------------------------------


def show_results(lm, results: list[batch.PromptResult], n_layers: int, parts: tuple[str, ...]) -> None:
    """Summary, the category comparison, heatmaps, line charts, scatter plots and the per-prompt
    table, with downloads named after what they hold (``parts``: the batch's ``name_parts``).
    Clicking a scatter point or a table row opens that prompt's trace."""
    c = st.columns(4)
    correct_only = c[0].toggle("Only prompts the model gets right", persist_state="session", key="cat_correct")
    combine = c[1].toggle("Combine regurgitation categories", persist_state="session", key="cat_combine")
    spread = c[2].radio("Band", list(category_charts.SPREADS), horizontal=True, persist_state="session", key="cat_spread",
                        format_func=category_charts.SPREADS.get,
                        help="The band around each mean curve: ± its standard error, ± the std over "
                             f"prompts, or a bootstrap 95% interval ({stats.BAND_RESAMPLES:,} resamples "
                             "of the prompts, seed 0).")
    min_effect = c[3].number_input("Min. effect of noise", 0.0, 1.0, step=0.01, persist_state="session", key="cat_min_effect",
                                   help="Prompts where noise lowers p(target) by less are left out of averages.")
    options = dict(correct_only=correct_only, combine_regurgitation=combine, min_effect=min_effect)
    averages = batch.category_averages(results, **options)
    table = batch.prompt_table(results)
    table.insert(0, "averaged", (table["effect"] >= min_effect) & (table["correct"].astype(bool) | (not correct_only)))
    filters = (*parts, *(["correct_only"] if correct_only else []), *(["combined"] if combine else []),
               f"min_effect{min_effect:g}")
    show_summary(results, table, options, filters)
    if averages.empty:
        st.warning("No prompt passes the filters: relax them or trace more prompts.")
    else:
        heat = category_charts.heatmap_chart(averages, width=max(160, min(300, 9 * n_layers)))
        st.altair_chart(heat)
        common.chart_downloads(heat, "category-heatmaps", averages,
                               name=common.file_name("category_heatmaps", *filters))
        bands = stats.bootstrap_bands(results, **options) if spread == "ci" else None
        lines = category_charts.line_chart(averages, spread=spread, bands=bands)
        st.altair_chart(lines)
        common.chart_downloads(lines, "category-lines", averages if bands is None else bands,
                               name=common.file_name("category_lines", *filters, spread))
    show_scatter(lm, results, table, filters)
    st.subheader("Per prompt")
    st.caption("Select a row to open that prompt on the trace page with these settings.")
    event = st.dataframe(category_charts.labelled(table, category_charts.PROMPT_LABELS), width="stretch",
                         hide_index=True, on_select="rerun", selection_mode="single-row",
                         key=f"cat_prompts_{st.session_state.get(LINKS, 0)}")
    common.download_button("Download the per-prompt table (CSV)", table.to_csv(index=False),
                           common.file_name("category_prompts", *parts) + ".csv", "text/csv",
                           "cat_download_prompts")
    follow(lm, results, picked_row(event, "table"))


def follow(lm, results: list[batch.PromptResult], row: int | None) -> None:
    """Open the picked prompt (a position in ``results``), when there is one with a trace."""
    if row is not None and 0 <= row < len(results) and results[row].trace is not None:
        open_trace(lm, results[row])


def show_summary(results: list[batch.PromptResult], table: pd.DataFrame, options: dict,
                 filters: tuple[str, ...]) -> None:
    """Per category: the summary with the mean transition layer's bootstrap interval, and every
    pair of categories compared (difference, interval, permutation p-value; its download named
    with ``filters``)."""
    summary = batch.category_summary(results, **options)
    intervals = stats.transition_intervals(table, **options)
    if len(summary):
        summary = summary.merge(intervals[["group", "ci_low", "ci_high", "none"]], on="group", how="left")
    labels = {**category_charts.SUMMARY_LABELS, "ci_low": "transition 95% CI low",
              "ci_high": "transition 95% CI high", "none": "no transition (left out)"}
    st.dataframe(category_charts.labelled(summary, labels), width="stretch", hide_index=True)
    st.subheader("Do the categories hand over at different layers?")
    comparison = stats.compare_transitions(table, **options)
    if comparison.empty:
        st.info("Two categories with traced prompts are needed for a comparison.")
        return
    st.caption(
        "For each pair of categories, B − A is the difference in mean transition layer (positive: B "
        f"hands over to the final token later). The 95% interval is a percentile bootstrap "
        f"({stats.RESAMPLES:,} resamples of each category's prompts, seed 0); p is a two-sided "
        f"permutation test (exact when there are at most {stats.RESAMPLES:,} ways to split the "
        "prompts, else that many random relabellings). Prompts whose final token never takes over "
        "have no transition layer: they are left out and counted. Same prompts as the summary."
    )
    st.dataframe(category_charts.labelled(comparison, category_charts.COMPARISON_LABELS), width="stretch",
                 hide_index=True, key="cat_comparison",
                 column_config={label: st.column_config.NumberColumn(format="%.2f")
                                for key, label in category_charts.COMPARISON_LABELS.items()
                                if key in ("mean_a", "mean_b", "difference", "ci_low", "ci_high")})
    common.download_button("Download the comparison (CSV)", comparison.to_csv(index=False),
                           common.file_name("category_comparison", *filters) + ".csv", "text/csv",
                           "cat_download_comparison")


def show_scatter(lm, results: list[batch.PromptResult], table: pd.DataFrame, filters: tuple[str, ...]) -> None:
    """The transition layer against its confounds; a clicked point opens its trace."""
    st.subheader("Confounds: transition layer per prompt")
    st.caption("Transition layer: the first layer from which restoring the final token beats "
               "restoring the noised token at every later layer (as on the trace page). Prompts in "
               "the averages only; points are jittered by a few pixels so equal values stay visible. "
               "Hover for details, click a point to open its trace.")
    left, right = st.columns(2)
    for column, x in ((left, "token_distance"), (right, "clean_prob")):
        with column:
            chart = category_charts.scatter_chart(table[table["averaged"]], x)
            event = st.altair_chart(chart, on_select="rerun", selection_mode=category_charts.PICK,
                                    key=f"cat_scatter_{x}_{st.session_state.get(LINKS, 0)}")
            common.chart_downloads(chart, f"transition-vs-{x}", table,
                                   name=common.file_name("transition_vs", x, *filters))
        follow(lm, results, picked_row(event, "chart"))


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
    study = common.study()
    state = settings_form(lm.n_layers, study)
    settings, answer = state.batch_settings(study), state.answer
    try:
        plan = batch.plan_batch(lm, frame, settings, common.result_store(), answer)
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
            run(lm, frame, settings, answer)
            st.rerun()
        except Exception as exc:  # noqa: BLE001 - results so far are stored; show what went wrong
            common.show_error(exc, "The batch stopped")
            plan = batch.plan_batch(lm, frame, settings, common.result_store(), answer)
    if "cat_last_run" in st.session_state:
        st.caption(st.session_state["cat_last_run"])
    for r in skipped:
        st.warning(f"Skipped “{ellipsis(r.prompt, PROMPT_CHARS)}”: {ellipsis(r.message, 300)}")
    traced = [r for r in plan if r.trace is not None]
    if traced:
        show_results(lm, traced, lm.n_layers, name_parts(settings, answer))
    else:
        st.info("No traces yet for these settings: press the button above to trace the set.")


def render() -> None:
    _, problems = common.restore_state(CategoriesState, STATE, common.PATHS["categories"])
    common.show_problems(problems)
    page()
    common.publish_state(common.widget_state(CategoriesState, STATE), STATE)


if __name__ == "__main__":  # run as a page (Streamlit runs page files as __main__); tests import helpers
    common.run_page(render)
