"""Attention: where the final token looks, by prompt type and per head; one prompt; long texts."""

from __future__ import annotations

import hashlib

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from pages import common
from pages.state import ATTENTION_TABS, PROMPT_SOURCES, AttentionState, Study
from tracing import attention as A
from tracing import heads as HD
from tracing import runcard
from tracing.categories import group_label, ordered
from tracing.charts import attention as C
from tracing.charts.style import ellipsis, show_token, token_labels
from tracing.model.tokens import token_strings, tokenize
from tracing.prompts import LONG_TEXT
from tracing.settings import INTERACTIVE, METRICS, NOISE_RANGE, SAMPLES_RANGE, SEED_RANGE, TraceSettings

STATE = "attn_state"  # the page state (AttentionState), kept across page switches
SET_KEY = "attn_set_result"  # last good prompt-set result: dict(model, source, result)
LONG_KEY = "attn_long_result"  # last good long-text result: dict(model, source, result)
MAX_TEXT_BYTES = 5_000_000
MAX_PATTERN_TOKENS = 90  # 90 x 91 / 2 cells: under Altair's 5000-row limit
MAX_PROMPT_CHARS = 2000  # the single prompt's own text field
SOURCE_LABELS = {"study": "the study's prompt", "own": "my own prompt"}
DEFAULT_TEXT_LABEL = (
    "“The Tide Clock of Harrow Point”, an original short story (about 3,400 words) written for this "
    "app and released into the public domain (CC0). It appears in no book, so the model cannot "
    "have memorised it."
)
MEAN = "mean over heads"
HEAD_VIEWS = {"attention": "attention weights", "effect": "causal effect"}
EFFECT_SCOPES = {"set": "prompt set, per type", "one": "one prompt"}
EFFECT_METRICS = ("normalised", "prob", "logprob", "kl")
# Widgets of the causal-effect view and their starting values (set before the widgets are made,
# never as a widget default, so a value from the URL or the session is never overridden).
EFFECT_DEFAULTS = {"attn_head_view": "attention", "attn_fx_scope": "set", "attn_fx_token": "final",
                   "attn_fx_noise": INTERACTIVE.noise, "attn_fx_samples": INTERACTIVE.samples,
                   "attn_fx_seed": INTERACTIVE.seed, "attn_fx_metric": "normalised", "attn_fx_prompt": 0,
                   "attn_long_disjoint": False}


# ---------------------------------------------------------------------------------------------
# Cached computations (keyed by model name and inputs; the model is fetched inside)


@st.cache_data(show_spinner=False, max_entries=64)  # [L, H, M] each: ~1 MB at 30 x 9 x 800
def _first_token_attention(model: str, revision: str, window: tuple[int, ...]) -> np.ndarray:
    return A.first_token_attention(common.cached_model(model), window)


@st.cache_data(show_spinner=False, max_entries=64)
def _pattern(model: str, revision: str, prompt: str, layer: int) -> np.ndarray:
    return A.attention_pattern(common.cached_model(model), prompt, layer)


def _cached_window(lm, window) -> np.ndarray:
    return _first_token_attention(lm.name, lm.revision, tuple(int(i) for i in window))


# ---------------------------------------------------------------------------------------------
# Prompt set (shared by the first two sections)


def pick_prompt_set(lm) -> tuple[pd.DataFrame, str] | None:
    """The chosen prompt set, filtered; None (with a message) when it cannot be read."""
    c1, c2, c3 = st.columns([1.2, 1.3, 1.5])
    skip_flagged = c2.toggle("Skip prompts flagged with problems", persist_state="session", key="attn_skip_flagged",
                             help="E.g. the subject is missing, or the first or last token would be noised.")
    only_right = c3.toggle("Only prompts the embedded model gets right", persist_state="session", key="attn_only_right",
                           help="Uses the set's model_top1 column (top-1 of SmolLM2-135M-Instruct).")
    picked = common.prompt_set_picker("attn_set", lm=lm, where=c1, upload_key="attn_set_upload",
                                      help="The prompt-set CSV format is described in the README.")
    if picked is None:
        return None
    frame, source = picked
    if skip_flagged:
        frame = frame[frame["problems"].fillna("") == ""]
    if only_right and "model_top1" in frame:
        frame = frame[frame["model_top1"].fillna(False).astype(bool)]
    if frame.empty:
        st.error("No prompts left after the filters.")
        return None
    return frame, source


def _set_key(lm, frame: pd.DataFrame) -> str:
    records = frame[["category", "prompt", "subject", "noised"]].to_dict("records")
    return hashlib.sha256(repr((lm.name, lm.revision, records)).encode()).hexdigest()


def compute_prompt_set(lm, picked: tuple[pd.DataFrame, str] | None) -> dict | None:
    """Measure every prompt (cached per prompt); on failure keep and return the last good result."""
    stored = st.session_state.get(SET_KEY)
    if picked is None or (stored is not None and stored["key"] == _set_key(lm, picked[0])):
        return stored
    frame, source = picked

    def measure() -> dict | None:
        with common.progress("Measuring attention on the prompt set…", unit="prompts") as update:
            result = A.prompt_set_attention(lm, frame, progress=update, attend=common.attention_to)
        if not len(result.table):
            st.error("None of the prompts could be measured (see the skipped prompts below).")
            _show_skipped(result)
            return None
        return dict(model=lm.name, source=source, result=result, key=_set_key(lm, frame))

    return common.keep_last_good(SET_KEY, measure, "Could not measure the prompt set")[0]


def _show_skipped(result: A.PromptSetAttention) -> None:
    if len(result.skipped):
        with st.expander(f"{len(result.skipped)} prompt(s) could not be measured"):
            st.dataframe(result.skipped, hide_index=True, width="stretch")


def _result_caption(stored: dict, model: str) -> None:
    result: A.PromptSetAttention = stored["result"]
    if stored["model"] != model:
        st.warning(f"Showing the last result, computed with **{stored['model']}**.")
    counts = result.table["category"].value_counts()
    per = " · ".join(f"{group_label(c)}: {counts[c]}" for c in result.categories)
    st.caption(f"**{len(result.table)} prompts** from `{stored['source']}` ({per}) · {stored['model']} · "
               f"measured in {result.elapsed:.1f} s (prompts measured before come from a cache)")
    _show_skipped(result)


# ---------------------------------------------------------------------------------------------
# 1. By prompt type


def section_by_type(stored: dict) -> None:
    result: A.PromptSetAttention = stored["result"]
    source = stored["source"]
    st.caption(
        "For each prompt (un-noised), the attention weight of the **final token's query** on the "
        "**first** token, the **noised** token (the subject's last token: what causal tracing corrupts) "
        "and the **final** token itself, at each layer, averaged over the heads of the layer, then "
        "over the prompts of each type. The seed study's “Attention by Prompt Type” plot."
    )
    scale = st.radio("Scale", list(C.SCALES), horizontal=True, persist_state="session", key="attn_type_scale",
                     help=f"Log scale: weights below {C.LOG_FLOOR:g} are drawn at {C.LOG_FLOOR:g}.")
    summary = A.layer_summary(result)
    chart = C.layer_lines(summary, scale)
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "attention_by_type", summary,
                           name=common.file_name("attention_by_type", source, scale))
    target = st.selectbox("Compare the prompt types on", list(A.TARGETS), persist_state="session", key="attn_type_target",
                          format_func=lambda t: f"attention to the {A.TARGET_LABELS[t]}")
    chart = C.category_lines(summary, target, scale)
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "attention_types_compared", summary[summary["target"] == target],
                           name=common.file_name("attention_to", target, "by_type", source, scale))
    with st.expander("Every number (prompt × layer × head × target)"):
        common.download_button("CSV", A.long_frame(result).to_csv(index=False),
                               f"{common.file_name('attention_per_prompt_head', source)}.csv", "text/csv",
                               "attn_all_csv")
        st.dataframe(result.table, hide_index=True, width="stretch")


# ---------------------------------------------------------------------------------------------
# 2. Per-head grids


def _clicked_cell(event, name: str, key: str) -> tuple[int, int] | None:
    """A newly clicked (layer, head) of a chart, or None when the click has not changed."""
    try:
        points = event.selection[name]
    except (AttributeError, KeyError, TypeError):
        return None
    cell = (int(points[0]["layer"]), int(points[0]["head"])) if points else None
    if cell is None or st.session_state.get(key) == cell:
        return None
    st.session_state[key] = cell
    return cell


def section_heads(stored: dict) -> None:
    """The attention-weight view of the per-head grids."""
    result: A.PromptSetAttention = stored["result"]
    st.caption(
        "The same final-token attention, per head: one layers × heads grid per prompt type (mean over "
        "its prompts), with a colour scale shared across the types. Below, the difference between two "
        "types. Click a cell (or pick it below) to see every prompt's value for that head."
    )
    c1, c2 = st.columns(2)
    target = c1.selectbox("Attention to", list(A.TARGETS), persist_state="session", key="attn_head_target",
                          format_func=lambda t: A.TARGET_LABELS[t])
    scale = c2.radio("Colour scale", list(C.SCALES), horizontal=True, persist_state="session", key="attn_head_scale")
    heads = A.head_summary(result, target)
    chart = C.head_grids(heads, scale, alt.selection_point(fields=["layer", "head"], name="cell"))
    event = st.altair_chart(chart, width="content", on_select="rerun", selection_mode="cell", key="attn_grid")
    files = ("attention_heads", target, stored["source"])
    common.chart_downloads(chart, "attention_heads", heads, name=common.file_name(*files, scale))
    new = _clicked_cell(event, "cell", "attn_grid_seen")
    new = _difference(heads, "attn_diff", f"Attention to the {A.TARGET_LABELS[target]}: A − B", files, new)
    _per_prompt(result, target, new, stored["source"])


def pick_pair(categories: list[str], key: str) -> tuple[str, str]:
    """Two prompt types A and B to compare (widgets ``<key>_a``, ``<key>_b``); says so when the
    same type is picked twice."""
    c1, c2 = st.columns(2)
    a = c1.selectbox("A", categories, index=len(categories) - 1, persist_state="session", key=f"{key}_a", format_func=group_label)
    b = c2.selectbox("B", categories, index=0, persist_state="session", key=f"{key}_b", format_func=group_label)
    if a == b:
        st.info("Pick two different prompt types to see their difference.")
    return a, b


def _difference(heads: pd.DataFrame, key: str, title: str, files: tuple[str, ...],
                new: tuple[int, int] | None) -> tuple[int, int] | None:
    """Two prompt types A and B (widgets ``<key>_a``, ``<key>_b``) and the layers x heads grid of
    A − B of ``heads`` (a per-head mean: attention weights or causal effects); ``files``: what the
    downloads hold (``common.file_name`` parts). Returns the cell newly clicked in it, else ``new``."""
    cats = ordered(heads["category"])
    if len(cats) < 2:
        st.info("The difference grid needs prompts of at least two types.")
        return new
    a, b = pick_pair(cats, key)
    if a == b:
        return new
    diff = A.category_difference(heads, a, b)
    chart = C.difference_grid(diff, a, b, alt.selection_point(fields=["layer", "head"], name="dcell"), title=title)
    event = st.altair_chart(chart, width="content", on_select="rerun", selection_mode="dcell", key=f"{key}_grid")
    common.chart_downloads(chart, f"{key}_grid", diff, name=common.file_name(*files, a, "minus", b))
    return _clicked_cell(event, "dcell", f"{key}_seen") or new


def _cell_name(layer: int, head: int | None) -> tuple[str, str]:
    """(words, file-name part) of a layer and head (None: the mean over heads)."""
    return (f"layer {layer}, " + (MEAN if head is None else f"head {head}"),
            f"L{layer}_H{'mean' if head is None else head}")


def _per_prompt(result: A.PromptSetAttention, target: str, new: tuple[int, int] | None, source: str) -> None:
    layer, head = _cell_pickers(result.n_layers, result.n_heads, new)
    values = A.per_prompt_values(result, target, layer, head)
    where, part = _cell_name(layer, head)
    chart = C.per_prompt_strip(values, f"Attention to the {A.TARGET_LABELS[target]}, every prompt · {where}")
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "attention_per_prompt", values,
                           name=common.file_name("attention_per_prompt", target, source, part))
    st.dataframe(values.sort_values("attention", ascending=False), hide_index=True, width="stretch",
                 column_config={"attention": st.column_config.NumberColumn(format="%.4f")})


# ---------------------------------------------------------------------------------------------
# 2b. Per-head grids: causal effect (per-head restoration, tracing.heads)


def _effect_settings(lm) -> tuple[TraceSettings, str, str]:
    """The head traces' settings, where heads are restored and the metric shown."""
    c = st.columns([1.3, 1, 1, 1, 1.4])
    where = c[0].radio("Restore heads at", list(HD.TOKENS), horizontal=True, persist_state="session", key="attn_fx_token",
                       format_func=HD.TOKEN_LABELS.get,
                       help="The position whose clean head outputs are put back into the corrupted run.")
    noise = c[1].number_input("Noise", *NOISE_RANGE["absolute"], step=0.05, persist_state="session", key="attn_fx_noise",
                              help="Gaussian noise on the subject's last token (as the trace page).")
    samples = c[2].number_input("Samples", *SAMPLES_RANGE, persist_state="session", key="attn_fx_samples")
    seed = c[3].number_input("Seed", *SEED_RANGE, persist_state="session", key="attn_fx_seed")
    metric = c[4].selectbox("Effect", EFFECT_METRICS, persist_state="session", key="attn_fx_metric",
                            format_func=lambda m: METRICS[m].label)
    return TraceSettings(noise=float(noise), samples=int(samples), seed=int(seed)), where, metric


def _effect_caption(metric: str, where: str) -> str:
    unit = ("0 = corrupted run, 1 = clean run" if metric == "normalised"
            else f"{METRICS[metric].label} of the expected token" + (" (lower is better)" if METRICS[metric].lower_is_better else ""))
    return (f"Each cell: {unit}, when only that head's clean output at the {HD.TOKEN_LABELS[where]} is restored "
            "in the corrupted run (the subject's last token noised). Layer 0 at the bottom.")


def _run_missing(lm, plan: list, store) -> None:
    """Compute the pending head traces with a progress bar and a Stop button (stored as they finish)."""
    pending = sum(r.status == "pending" for r in plan)
    with common.progress(f"Head traces: 0/{pending}", unit="prompts",
                         below=lambda box: box.button("Stop", key="attn_fx_stop",
                                                      help="Stops after the current prompt; finished ones are stored.")) as update:
        count = [0]

        def on_prompt(done: int, total: int, result) -> None:
            count[0] += result.status == "computed"
            update(count[0], pending, f"Head traces: {count[0]}/{pending} · {result.prompt[:50]}")

        HD.run_heads(lm, plan, store, progress=on_prompt)


def section_effects(lm, picked: tuple[pd.DataFrame, str]) -> None:
    """The causal-effect view of the per-head grids: per-head restoration, one prompt or per type."""
    st.caption(
        "Which heads carry the answer: restore the clean output of **one attention head** (its slice of the "
        "attention output projection's input) at one position of the corrupted run, and measure how much of "
        "the expected token's probability comes back. Head traces are kept in the result store."
    )
    frame, source = picked
    settings, where, metric = _effect_settings(lm)
    scope = st.radio("Of", list(EFFECT_SCOPES), horizontal=True, persist_state="session", key="attn_fx_scope", format_func=EFFECT_SCOPES.get)
    store = common.result_store()
    files = ("head_effects", where, metric, f"noise{settings.noise:g}", f"seed{settings.seed}")
    if scope == "one":
        _effect_one(lm, frame, settings, where, metric, store, files)
        return
    try:
        plan = HD.plan_heads(lm, frame, settings, store, where)
    except ValueError as exc:
        common.show_error(exc, "Bad settings")
        return
    pending = sum(r.status == "pending" for r in plan)
    skipped = [r for r in plan if r.status == "skipped"]
    st.caption(f"{len(plan)} prompts: {sum(r.status == 'stored' for r in plan)} in the store, {pending} to compute, "
               f"{len(skipped)} skipped.")
    if st.button(f"Compute {pending} missing head trace(s)", type="primary", disabled=pending == 0, key="attn_fx_run"):
        try:
            _run_missing(lm, plan, store)
            st.rerun()  # the counts and grids from the store
        except Exception as exc:  # noqa: BLE001 - finished traces are stored; say what went wrong
            common.show_error(exc, "Head tracing stopped")
    for r in skipped + [r for r in plan if r.status == "failed"]:
        st.warning(f"Skipped {r.prompt!r}: {r.message}")
    if not any(r.trace is not None for r in plan):
        st.info("No head traces yet for these settings: press the button above.")
        return
    _effect_grids(plan, metric, where, (*files, source))


def _effect_grids(plan: list, metric: str, where: str, files: tuple[str, ...]) -> None:
    summary = HD.head_summary(plan, metric)
    label = METRICS[metric].label
    chart = C.head_grids(summary, "linear", alt.selection_point(fields=["layer", "head"], name="fxcell"),
                         title=f"Causal effect of each head at the {HD.TOKEN_LABELS[where]} ({label}), per prompt type",
                         subtitle=_effect_caption(metric, where) + " Mean over the prompts of each type.", value="effect")
    event = st.altair_chart(chart, width="content", on_select="rerun", selection_mode="fxcell", key="attn_fx_grid")
    common.chart_downloads(chart, "head_effects", summary, name=common.file_name(*files))
    new = _clicked_cell(event, "fxcell", "attn_fx_seen")
    new = _difference(summary, "attn_fx_diff", f"Causal effect of each head ({label}): A − B", files, new)
    n_layers, n_heads = int(summary["layer"].max()) + 1, int(summary["head"].max()) + 1
    layer, head = _cell_pickers(n_layers, n_heads, new)
    values = HD.per_prompt_effects(plan, layer, head, metric)
    where_cell, part = _cell_name(layer, head)
    chart = C.per_prompt_strip(values, f"Causal effect ({label}), every prompt · {where_cell}", column="value",
                               axis_title=label)
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "head_effects_per_prompt", values, name=common.file_name(*files, part))


def _effect_one(lm, frame: pd.DataFrame, settings: TraceSettings, where: str, metric: str, store,
                files: tuple[str, ...]) -> None:
    """One prompt of the set: its head trace (from the store, else computed now) as one grid."""
    prompts = frame["prompt"].tolist()
    if st.session_state.get("attn_fx_prompt", 0) >= len(prompts):
        st.session_state["attn_fx_prompt"] = 0
    index = st.selectbox("Prompt", range(len(prompts)), persist_state="session", key="attn_fx_prompt",
                         format_func=lambda i: f"{group_label(frame['category'].iloc[i])} · {prompts[i]}")
    try:
        (result,) = HD.plan_heads(lm, frame.iloc[[index]], settings, store, where)
        if result.status == "skipped":
            raise ValueError(result.message)
        if result.status == "pending":
            with common.progress("Restoring each head…", unit="%") as update:
                HD.run_heads(lm, [result], store, cell_progress=update)
        if result.trace is None:
            raise ValueError(result.message)
    except Exception as exc:  # noqa: BLE001
        common.show_error(exc, "Could not trace the heads of this prompt")
        return
    traced: HD.HeadTrace = result.trace
    grid = traced.frame(metric).rename(columns={"value": "mean"}).assign(
        category=result.category, std=np.nan, n=1)
    label = METRICS[metric].label
    token = traced.tokens[traced.token]
    chart = C.head_grids(grid, "linear", title=f"Causal effect of each head at {token!r} ({label})",
                         subtitle=_effect_caption(metric, where), value="effect")
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "head_effects_one", grid, name=common.file_name(*files, traced.prompt))
    top = traced.frame("normalised").sort_values("value", ascending=False).head(5)
    st.caption(f"Target {traced.target!r}: p = {traced.low:.4f} corrupted, {traced.high:.4f} clean · noised tokens "
               f"{', '.join(repr(traced.tokens[i]) for i in traced.noised)} · {traced.elapsed:.1f} s. "
               "Heads restoring most (normalised): "
               + ", ".join(f"L{r.layer} H{r.head} ({r.value:.2f})" for r in top.itertuples()))


def _cell_pickers(n_layers: int, n_heads: int, new: tuple[int, int] | None) -> tuple[int, int | None]:
    """The (layer, head or None for the mean) of the per-prompt view; a clicked cell sets them."""
    layer_key, head_key = f"attn_cell_layer_{n_layers}", f"attn_cell_head_{n_heads}"
    st.session_state.setdefault(layer_key, n_layers // 2)
    st.session_state.setdefault(head_key, 0)
    if new is not None:
        st.session_state[layer_key], st.session_state[head_key] = new
    c1, c2 = st.columns(2)
    layer = c1.number_input("Layer", 0, n_layers - 1, persist_state="session", key=layer_key)
    head = c2.selectbox("Head", [MEAN] + list(range(n_heads)), persist_state="session", key=head_key)
    return int(layer), (None if head == MEAN else int(head))


# ---------------------------------------------------------------------------------------------
# 3. Single prompt


def section_single(lm) -> None:
    st.caption(
        "One prompt, un-noised: for the study's prompt, the final token's attention to the first, the noised "
        "and the final token at every layer; then the full attention pattern of one head (row = the attending "
        "token, column = the token it attends to), and the final token's row for every head of the layer."
    )
    source = st.radio("Prompt", list(PROMPT_SOURCES), horizontal=True, persist_state="session", key="attn_source",
                      format_func=SOURCE_LABELS.get)
    study = common.study()
    if source == "study":
        common.study_box("The single-prompt view")
        st.caption("To look at another prompt, change the study on the trace page, or choose **my own prompt**.")
        prompt = study.prompt
    else:
        prompt = st.text_input("Prompt", max_chars=MAX_PROMPT_CHARS, persist_state="session", key="attn_single_prompt")
    c1, c2, c3 = st.columns([2, 1, 1])
    layer = int(c1.slider("Layer", 0, lm.n_layers - 1, persist_state="session", key=layer_key(lm)))
    head = c2.selectbox("Head", [MEAN] + list(range(lm.n_heads)), persist_state="session", key=head_key(lm))
    scale = c3.radio("Colour scale", list(C.SCALES), horizontal=True, persist_state="session", key="attn_single_scale")
    what = "The study's prompt" if source == "study" else "The prompt"
    try:
        tokens = token_strings(lm, tokenize(lm, prompt))
    except ValueError as exc:
        st.error(f"{what} cannot be measured: {exc}" + (" Change it on the trace page." if source == "study" else ""))
        return
    noised = study_overview(lm, study, tokens, scale) if source == "study" else []
    if len(tokens) > MAX_PATTERN_TOKENS:
        st.error(f"{what} has {len(tokens)} tokens: the pattern view shows at most {MAX_PATTERN_TOKENS}"
                 + (" (the chart above covers every token)." if source == "study" else "."))
        return
    pattern_views(lm, prompt, token_labels(tokens, noised), layer, None if head == MEAN else int(head), scale)


def study_attention(lm, study: Study) -> tuple[np.ndarray, list[int]]:
    """The study prompt's final-token attention [layers, heads, 3] to the first token, its noised
    tokens (summed; the trace page's rule for which) and itself; and the noised positions."""
    noised = runcard.noised_positions(lm, {**study.trace_fields(), "tokens": list(study.tokens)})
    row = {"category": "study", "prompt": study.prompt, "subject": study.subject, "noised": noised}
    result = A.prompt_set_attention(lm, pd.DataFrame([row]), attend=common.attention_to)
    if len(result.skipped):
        raise ValueError(result.skipped["error"].iloc[0])
    return result.weights[0], [int(i) for i in result.table["noised"].iloc[0].split()]


def study_overview(lm, study: Study, tokens: list[str], scale: str) -> list[int]:
    """The compact per-layer chart of the study prompt; returns its noised positions ([] when they
    cannot be found: the pattern view then marks none)."""
    try:
        weights, noised = study_attention(lm, study)
    except ValueError as exc:
        st.error(f"Could not measure the study prompt's attention to its noised tokens: {exc} "
                 "Change the noised tokens on the trace page.")
        return []
    n_tokens = len(tokens)
    marked = ", ".join(f"{i} {show_token(tokens[i])}" for i in noised)
    notes = [f"Noised tokens (summed): {marked}. Lines: mean over heads; dots: every head (hover for it)."]
    if 0 in noised or n_tokens - 1 in noised:
        notes.append("The noised tokens include the " + ("first" if 0 in noised else "final")
                     + " token: its attention is counted in both lines.")
    chart = C.prompt_lines(weights, f"Final-token attention per layer · “{ellipsis(study.prompt, 60)}”", notes, scale)
    st.altair_chart(chart, width="content")
    heads = C.prompt_heads(weights).merge(C.prompt_summary(weights)[["layer", "target", "mean"]], on=["layer", "target"])
    common.chart_downloads(chart, "attention_study_prompt", heads,
                           name=common.file_name("attention_final_token", study.prompt, scale))
    return noised


def pattern_views(lm, prompt: str, labels: list[str], layer: int, head: int | None, scale: str) -> None:
    """One head's (or the head-averaged) tokens x tokens pattern and every head's final-token row."""
    try:
        pattern = _pattern(lm.name, lm.revision, prompt, layer)
    except Exception as exc:  # noqa: BLE001
        common.show_error(exc, "Could not compute the attention pattern")
        return
    which = pattern.mean(axis=0) if head is None else pattern[head]
    name, part = _cell_name(layer, head)
    chart = C.pattern_heatmap(which, labels, f"Attention pattern · {name}",
                              "Each row sums to 1. Cells right of the diagonal are masked (causal)."
                              + (" * marks the noised tokens." if any(label.endswith("*") for label in labels) else ""),
                              scale)
    st.altair_chart(chart, width="content")
    frame = pd.DataFrame(which, index=labels, columns=labels)
    common.chart_downloads(chart, "attention_pattern", frame.reset_index(names="query"),
                           name=common.file_name("attention_pattern", prompt, part))
    rows = pattern[:, -1, :]
    chart = C.final_rows_heatmap(rows, labels, f"Final token's attention, every head of layer {layer}", scale)
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "attention_final_rows", pd.DataFrame(rows, columns=labels).reset_index(names="head"),
                           name=common.file_name("attention_final_row", prompt, f"L{layer}"))


# ---------------------------------------------------------------------------------------------
# 4. Long texts


def _long_text_source() -> tuple[str, str, str] | None:
    """(text, label, file-name part) from an upload or the default text; None with an error when
    unusable."""
    upload = st.file_uploader(f"A plain-text file (.txt, at most {MAX_TEXT_BYTES // 1_000_000} MB)", type=["txt"],
                              key="attn_long_upload", max_upload_size=MAX_TEXT_BYTES // 1_000_000)
    if upload is None:
        st.caption(f"No file uploaded: using the default text, {DEFAULT_TEXT_LABEL}")
        return LONG_TEXT.read_text(encoding="utf-8"), "default text (The Tide Clock of Harrow Point)", "default_text"
    if upload.size > MAX_TEXT_BYTES:
        st.error(f"`{upload.name}` is {upload.size / 1e6:.1f} MB: the limit is {MAX_TEXT_BYTES / 1e6:.0f} MB.")
        return None
    try:
        return upload.getvalue().decode("utf-8-sig"), upload.name, upload.name
    except UnicodeDecodeError as exc:
        st.error(f"`{upload.name}` is not UTF-8 text ({exc.reason} at byte {exc.start}).")
        return None


def _long_text_form(lm) -> tuple[int, int, int, bool, bool]:
    c1, c2, c3, c4, c5 = st.columns([1, 1, 1, 1.3, 0.8])
    n = c1.number_input("Samples N", 1, 500, persist_state="session", key="attn_long_n", help="Windows drawn from the text.")
    m = c2.number_input("Tokens per sample M", 2, int(lm.n_ctx), persist_state="session", key=length_key(lm),
                        help=f"Capped at the model's context ({lm.n_ctx}).")
    seed = c3.number_input("Seed", *SEED_RANGE, persist_state="session", key="attn_long_seed", help="Where the windows start.")
    disjoint = c4.toggle("Non-overlapping windows", persist_state="session", key="attn_long_disjoint",
                         help="Windows that share no token: independent samples of the text (fewer fit).")
    c5.write("")
    go = c5.button("Compute", type="primary", key="attn_long_go")
    return int(n), int(m), int(seed), bool(disjoint), go


def _overlap_note(lm, source: tuple[str, str, str] | None, n: int, m: int, disjoint: bool) -> None:
    """Before computing: how many non-overlapping windows the text holds, and a warning when the
    requested random windows must overlap."""
    if source is None:
        return
    try:
        n_tokens = len(A.text_ids(lm, source[0]))
    except ValueError:
        return
    m = min(m, int(lm.n_ctx))
    fits = A.max_disjoint_windows(n_tokens, m)
    if not disjoint and n * m > n_tokens:
        st.warning(f"{n} windows of {m} tokens need {n * m:,} tokens but the text has {n_tokens:,}: the windows "
                   f"overlap, so they are not independent samples and the band overstates the evidence. The text "
                   f"holds {fits} non-overlapping windows of {m} tokens: turn on **Non-overlapping windows** "
                   f"(with N ≤ {fits}) or shorten M.")
    elif disjoint and n > fits:
        st.error(f"The text ({n_tokens:,} tokens) holds only {fits} non-overlapping windows of {m} tokens: "
                 f"choose N ≤ {fits} or shorten M.")


def section_long(lm) -> None:
    st.caption(
        "The seed study's long-text check: draw N windows of M consecutive tokens from a text and "
        "measure, for every position i of the window, the attention token i pays to the window's first "
        "token, averaged over windows (and over heads, and layers). Evenly spread attention would give "
        "1/(i+1). Windows that were measured before are cached, so an interrupted run resumes."
    )
    source = _long_text_source()
    n, m, seed, disjoint, go = _long_text_form(lm)
    _overlap_note(lm, source, n, m, disjoint)

    def measure() -> dict:
        text, label, stem = source
        with common.progress(f"Measuring {n} windows of {m} tokens…", unit="windows") as update:
            result = A.long_text_attention(lm, text, n, m, seed, progress=update, window_fn=_cached_window,
                                           disjoint=disjoint)
        return dict(model=lm.name, source=label, file=stem, result=result)

    stored, _ = common.keep_last_good(LONG_KEY, measure if go and source is not None else None,
                                      "Could not measure the text")
    if stored is None:
        st.info("Press **Compute** (40 × 800 tokens takes a few minutes on a CPU; a small N is quick).")
        return
    show_long(stored, lm.name)


def show_long(stored: dict, model: str) -> None:
    result: A.LongTextAttention = stored["result"]
    if stored["model"] != model:
        st.warning(f"Showing the last result, computed with **{stored['model']}**.")
    st.caption(f"**{result.n_samples} windows × {result.length} tokens** from `{stored['source']}` "
               f"({result.n_text_tokens:,} tokens) · {'non-overlapping' if result.disjoint else 'random'} windows · "
               f"seed {result.seed} · {stored['model']} · {result.elapsed:.1f} s")
    if result.overlap > 1.0 + 1e-9:
        st.warning(f"These windows overlap: they cover {result.covered_tokens:,} distinct tokens, each on average "
                   f"in {result.overlap:.1f} windows, so the band over windows overstates how independent they are.")
    tail = min(512, result.length // 2)
    cols = st.columns(3)
    cols[0].metric(f"Mean attention to the first token, i ≥ {tail}", f"{result.mean[:, :, tail:].mean():.3f}",
                   help="Over layers, heads, windows and positions i ≥ the given one.")
    cols[1].metric(f"Evenly spread attention at i = {tail}", f"{1 / (tail + 1):.4f}")
    by_layer = result.mean[:, :, tail:].mean(axis=(1, 2))
    cols[2].metric("Layers above 0.25", f"{int((by_layer > 0.25).sum())} of {len(by_layer)}",
                   help=f"Head-averaged attention to the first token, i ≥ {tail}.")
    c1, c2 = st.columns(2)
    log_x = c1.toggle("Log scale for i", value=False, persist_state="session", key="attn_long_logx")
    log_y = c2.toggle("Log scale for attention", value=False, persist_state="session", key="attn_long_logy")
    curves = A.long_text_curves(result)
    files = (stored.get("file", "text"), f"{result.n_samples}x{result.length}", "disjoint" if result.disjoint else "random",
             f"seed{result.seed}")
    chart = C.long_text_mean(curves, log_x, log_y)
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "first_token_attention_mean", curves[curves["layer"] == "mean"],
                           name=common.file_name("first_token_attention_mean", *files))
    view = st.radio("Per layer, as", ["heatmap", "lines"], horizontal=True, persist_state="session", key="attn_long_view")
    chart = C.long_text_layer_heatmap(curves) if view == "heatmap" else C.long_text_layers(curves, log_x, log_y)
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "first_token_attention_per_layer", curves[curves["layer"] != "mean"],
                           name=common.file_name("first_token_attention_per_layer", *files, view))
    start = st.slider("Per-head view: positions from", 0, result.length - 1, tail, persist_state="session", key=f"attn_long_from_{result.length}")
    heads = A.long_text_heads(result, start)
    chart = C.long_text_heads(heads, start)
    st.altair_chart(chart, width="content")
    common.chart_downloads(chart, "first_token_attention_per_head", heads,
                           name=common.file_name("first_token_attention_per_head", *files, f"from{start}"))


# ---------------------------------------------------------------------------------------------


TABS = list(ATTENTION_TABS)


def layer_key(lm) -> str:  # model-dependent ranges: one widget per model shape
    return f"attn_single_layer_{lm.n_layers}"


def head_key(lm) -> str:
    return f"attn_single_head_{lm.n_heads}"


def length_key(lm) -> str:
    return f"attn_long_m_{lm.n_ctx}"


def fitted(lm, state: AttentionState) -> tuple[int, int | str, list[str]]:
    """The single prompt's layer and head (``MEAN`` or an index) within this model's ranges, and a
    message for each that did not fit."""
    middle, problems = lm.n_layers // 2, []
    layer, head = state.layer, state.head
    if layer is not None and layer >= lm.n_layers:
        problems.append(f"`layer={layer}` ignored (this model has layers 0 to {lm.n_layers - 1}); using {middle}.")
        layer = None
    if head != "mean" and int(head) >= lm.n_heads:
        problems.append(f"`head={head}` ignored (this model has heads 0 to {lm.n_heads - 1}); using the {MEAN}.")
        head = "mean"
    return (middle if layer is None else layer), (MEAN if head == "mean" else int(head)), problems


def restore(lm) -> list[str]:
    """The page state from a shared link (first visit) or the session; the model-dependent
    widgets (layer, head, window length) get its values within this model's ranges (a link's
    that do not fit are reported)."""
    linked = STATE not in st.session_state or common.linked_now(common.PATHS["attention"])
    state, problems = common.restore_state(AttentionState, STATE, common.PATHS["attention"])
    layer, head, unfit = fitted(lm, state)
    if linked:  # a shared link, or a linked view of another page: its layer and head
        problems = [*problems, *unfit]
        st.session_state[layer_key(lm)], st.session_state[head_key(lm)] = layer, head
    st.session_state.setdefault(layer_key(lm), layer)
    st.session_state.setdefault(head_key(lm), head)
    if len(state.own_prompt) > MAX_PROMPT_CHARS and linked:
        problems.append(f"`own_prompt` is {len(state.own_prompt):,} characters long: cut to the field's "
                        f"{MAX_PROMPT_CHARS:,}.")
    if length_key(lm) not in st.session_state:
        st.session_state[length_key(lm)] = max(2, min(state.long_m, int(lm.n_ctx)))
    for key, value in EFFECT_DEFAULTS.items():
        st.session_state.setdefault(key, value)
    return problems


def current_state(lm) -> AttentionState:
    head = st.session_state.get(head_key(lm), MEAN)
    return common.widget_state(AttentionState, STATE, layer=st.session_state.get(layer_key(lm)),
                               head="mean" if head == MEAN else str(head),
                               long_m=int(st.session_state.get(length_key(lm), 800)))


def _prompt_set_tab(lm, section) -> None:
    picked = pick_prompt_set(lm)
    stored = compute_prompt_set(lm, picked)
    if stored is not None:
        _result_caption(stored, lm.name)
        section(stored)


def _heads_tab(lm) -> None:
    """Per-head grids: attention weights (from the prompt set's attention) or causal effects (head traces)."""
    view = st.radio("Show", list(HEAD_VIEWS), horizontal=True, persist_state="session", key="attn_head_view", format_func=HEAD_VIEWS.get,
                    help="Attention weights: where the final token looks. Causal effect: what restoring one "
                         "head brings back of the answer.")
    if view == "attention":
        _prompt_set_tab(lm, section_heads)
        return
    picked = pick_prompt_set(lm)
    if picked is not None:
        section_effects(lm, picked)


SECTIONS = {"Single prompt": section_single, "By prompt type": lambda lm: _prompt_set_tab(lm, section_by_type),
            "Per-head grids": _heads_tab, "Long texts": section_long}  # tab name -> what it shows
assert set(SECTIONS) == set(TABS), "every attention tab needs a section"


def main() -> None:
    lm = common.current_model()
    problems = restore(lm)
    st.title("Attention")
    st.caption(
        f"Where attention goes in **{lm.name}** ({lm.n_layers} layers × {lm.n_heads} heads). Weights are "
        "read from the model's own attention of each block (softmax of scaled query · key, after the "
        "causal mask), on clean prompts."
    )
    common.show_problems(problems)
    tabs = st.tabs(TABS, on_change="rerun", key="attn_tab")  # lazy: only the open tab runs
    for name, tab in zip(TABS, tabs):
        with tab:
            if tab.open or (tab.open is None and name == TABS[0]):
                SECTIONS[name](lm)
    common.publish_state(current_state(lm), STATE)


common.run_page(main)
