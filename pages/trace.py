"""Single-prompt causal trace: prompt, noised tokens, a live noise slider, ROME heatmaps, exports.

Every setting lives in the URL query string. Traces are cached in the session and in the on-disk
result store, so a noise level already traced shows at once, also after a reload or a restart.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import pandas as pd
import streamlit as st

import tracing
from pages import common
from pages.state import HiddenState, Study, TraceState
from tracing import runcard
from tracing.analysis import transition_layer
from tracing.causal import (Trace, TraceCancelled, causal_trace, chunk_work_for, embedding_sigma,
                            estimate_trace)
from tracing.charts import severed, style
from tracing.charts import trace as charts
from tracing.model.tokens import (answer_token, completion_token, spacing_hint, subject_positions,
                                  token_strings, tokenize)
from tracing.preview import Refinement, preview_trace
from tracing.settings import (CONVENTIONS, CORRUPTIONS, INTERACTIVE, KINDS, METRICS, NOISE_MODES,
                              NOISE_RANGE, SAMPLES_RANGE, SEED_RANGE, WINDOW_RANGE, lower_is_better)

STATE = "trace_state"  # the page state (TraceState), kept across page switches
SHOWN = "trace_shown"  # the last good result: dict(traces, state, model, source, seconds)
CACHE = "trace_cache"  # this session's traces by key (OrderedDict)
STOPPED = "trace_stopped"  # key of the computation the user stopped
LIVE_REDRAW_S = 1.5  # least seconds between two redraws of the live heatmap (each costs the browser)
ASK_ABOVE_S = float(os.environ.get("CAUSAL_TRACING_ASK_S", 60))  # longer exact traces wait for a go-ahead
CHUNK_SECONDS = 0.4  # most seconds of work between two checks for a new setting (cancel latency)
CONFIRMED = "trace_confirmed"  # keys whose cost the user accepted
CARD_MSG = "trace_card_message"  # (kind, text) about the last loaded run card
SESSION_ITEMS = 64
W = {name: f"trace_{name}" for name in runcard.DEFAULTS}  # widget keys
W["noise_sigma"] = "trace_noise_sigma"
KIND_NAMES = {"hidden": "Hidden state", "mlp": "MLP", "attn": "Attention", "all": "All three"}
ROW_NAMES = {"all": "every token", "noised_final": "noised + final", "chosen": "chosen tokens"}
TAB_NAMES = {"heatmap": "Heatmap", "compact": "Noised vs final token", "sweep": "Noise sweep",
             "severed": "Severed paths", "compare": "A/B compare", "export": "Export / load"}
COMPARE_NAMES = {"prompt": "another prompt", "noise": "another noise level", "seed": "another seed"}
PANEL_PLOT_PX = 520  # plot width of the heatmap beside an open side panel
PICKED = "trace_heatmap_pick"  # the heatmap's click selection (a cell opens the side panel)
SEVER_NAMES = {"none": "nothing", "mlp": "later MLPs", "attn": "later attention"}
TAB_KEYS = {label: name for name, label in TAB_NAMES.items()}
CORRUPTION_NAMES = {"gaussian": "Gaussian", "uniform": "Uniform", "replace": "Token replacement"}
CHIP = ("display:inline-flex;align-items:baseline;gap:3px;padding:1px 8px;border-radius:12px;"
        "border:1px solid #d0d0d8;background:#f6f6f9;font-family:monospace;font-size:0.9rem;")
CHIP_NOISED = CHIP + "border-color:#5b3f9e;background:#e9e1f7;font-weight:600;"
CHIP_INDEX = "font-size:0.7rem;color:#888;font-family:sans-serif;"


# ---------------------------------------------------------------------------------------------
# Caches: this session's traces in front of the shared result store


def trace_key(lm: tracing.LoadedModel, request: runcard.TraceRequest) -> str:
    """The store's key of a request (a hash of model, prompt and every setting)."""
    return common.result_store().key(lm, request.prompt, request.settings)


def _remember(cache: OrderedDict, key: str, trace: Trace, size: int) -> None:
    cache[key] = trace
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def lookup(key: str) -> tuple[Trace | None, str]:
    """A cached trace and where it came from ("session", "store"), or (None, "")."""
    session = st.session_state.setdefault(CACHE, OrderedDict())
    if key in session:
        return session[key], "session"
    try:
        trace = common.result_store().get(key)
    except Exception as exc:  # noqa: BLE001 - a broken store must not break the page
        st.warning(f"Could not read the result store: {exc}")
        trace = None
    if trace is not None:
        _remember(session, key, trace, SESSION_ITEMS)
        return trace, "store"
    return None, ""


def remember(key: str, trace: Trace) -> None:
    """Keep a trace in the session, and on disk."""
    _remember(st.session_state.setdefault(CACHE, OrderedDict()), key, trace, SESSION_ITEMS)
    try:
        common.result_store().put(key, trace)
    except Exception as exc:  # noqa: BLE001
        st.warning(f"Could not save the trace to the result store: {exc}")


# ---------------------------------------------------------------------------------------------
# Page state: URL <-> widgets


def widget_values(state: TraceState) -> dict[str, Any]:
    """Widget key -> value for a page state."""
    values = {W[name]: state[name] for name in runcard.DEFAULTS if name not in ("noise", "sweep")}
    values[W["sweep"]] = ", ".join(f"{v:g}" for v in state.sweep)
    sigma_mode = state.noise_mode == "sigma"
    values[W["noise_sigma" if sigma_mode else "noise"]] = float(state.noise)
    values[W["tokens"]] = list(state.tokens)
    values[W["row_tokens"]] = list(state.row_tokens)
    values[W["tab"]] = TAB_NAMES[state.tab]
    return values


def apply_state(state: TraceState) -> None:
    """Set every widget to a page state (before the widgets are drawn, or from a callback); it is
    the session's study from now on."""
    st.session_state[STATE] = state
    common.set_study(Study.from_trace(state, common.study().model))
    for key, value in widget_values(state).items():
        st.session_state[key] = value


def restore_widgets() -> list[str]:
    """On the session's first visit read a shared link; take the study when another page changed
    it (a category prompt opened here, a link that landed on another page); refill widgets
    dropped by a page switch."""
    problems: list[str] = []
    study = common.study()
    linked = common.linked_now(common.PATHS["trace"])  # another page opened a study here
    if STATE not in st.session_state or linked:
        state, problems = TraceState.parse(common.link_query(common.PATHS["trace"]))
        apply_state(state.replace(**study.trace_fields()))
        problems = common.study_only(problems)  # app.py reported the study's
        common.consume_link(common.PATHS["trace"])
    elif Study.from_trace(st.session_state[STATE], study.model) != study:
        apply_state(st.session_state[STATE].replace(**study.trace_fields()))
    state = st.session_state[STATE]
    defaults = widget_values(state)
    defaults.setdefault(W["noise"], INTERACTIVE.noise)
    defaults.setdefault(W["noise_sigma"], 3.0)
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    return problems


def read_state() -> TraceState:
    """The page state the widgets show now."""
    old = st.session_state[STATE]
    values = {name: st.session_state.get(W[name], old[name]) for name in runcard.DEFAULTS}
    mode = values["noise_mode"]
    values["noise"] = float(st.session_state.get(W["noise_sigma" if mode == "sigma" else "noise"]))
    values["tokens"] = sorted(int(i) for i in (st.session_state.get(W["tokens"]) or []))
    values["row_tokens"] = sorted(int(i) for i in (st.session_state.get(W["row_tokens"]) or []))
    values["tab"] = TAB_KEYS.get(st.session_state.get(W["tab"]), old.tab)
    values["sweep"] = old.sweep
    return TraceState.from_dict(values)


def publish(state: TraceState) -> None:
    """Save the state, make it the session's study and put it in the URL (a shared link
    reproduces the page)."""
    common.set_study(Study.from_trace(state, common.study().model))
    common.publish_state(state, STATE)


# ---------------------------------------------------------------------------------------------
# Inputs


def prompt_inputs(lm: tracing.LoadedModel) -> list[str] | None:
    """Prompt and noised-token choice; the prompt's tokens, or None (error shown) if it is bad."""
    st.text_area("Prompt", persist_state="session", key=W["prompt"], height=68,
                 help="The model continues this text; the heatmap shows which restored states "
                      "bring back its prediction.")
    c1, c2, c3 = st.columns([1.3, 2.2, 1.6])
    c1.radio("Noise the tokens of", runcard.NOISE_BY, persist_state="session", key=W["noise_by"], horizontal=True,
             format_func={"subject": "a subject", "tokens": "my pick"}.get, on_change=_start_pick,
             help="Type the subject (its tokens are found in the prompt), or click tokens.")
    by_subject = st.session_state[W["noise_by"]] == "subject"
    if by_subject:
        c2.text_input("Subject (text inside the prompt)", persist_state="session", key=W["subject"])
        c3.radio("Which subject tokens", runcard.SUBJECT_TOKENS, persist_state="session", key=W["subject_tokens"],
                 horizontal=True, format_func={"all": "all (ROME)", "last": "last (the study)"}.get,
                 help="ROME noises every subject token; the seed study noised only the last one.")
    picker = st.container()  # token pills (pick mode), always at this place in the page
    try:
        tokens = token_strings(lm, tokenize(lm, st.session_state[W["prompt"]]))
    except ValueError as exc:
        common.show_error(exc, "Bad prompt")
        return None
    if not by_subject:
        with picker:
            _pick_tokens(tokens)
    return tokens


def _start_pick() -> None:
    """Switching to "my pick" with nothing picked starts from the subject's tokens."""
    if st.session_state.get(W["noise_by"]) != "tokens" or st.session_state.get(W["tokens"]):
        return
    try:
        picked = subject_positions(common.current_model(), st.session_state[W["prompt"]],
                                   st.session_state[W["subject"]], which=st.session_state[W["subject_tokens"]])
    except (ValueError, KeyError):
        return
    st.session_state[W["tokens"]] = sorted(picked)


def _pick_tokens(tokens: list[str]) -> None:
    picked = st.session_state.get(W["tokens"]) or []
    bad = [i for i in picked if not 0 <= i < len(tokens)]
    if bad:
        st.error(f"Token index {bad[0]} is out of range: the prompt has {len(tokens)} tokens "
                 f"(0..{len(tokens) - 1}). It was dropped.")
        st.session_state[W["tokens"]] = [i for i in picked if 0 <= i < len(tokens)]
    st.pills("Tokens to noise (click to toggle)", list(range(len(tokens))), selection_mode="multi",
             persist_state="session", key=W["tokens"], format_func=lambda i: f"{i} {style.show_token(tokens[i])}")


def token_chips(tokens: list[str], noised: list[int]) -> None:
    """The prompt's tokens as chips with their indices; noised ones highlighted and starred."""
    chips = []
    for i, token in enumerate(tokens):
        mark = "*" if i in noised else ""
        chips.append(f'<span style="{CHIP_NOISED if mark else CHIP}"><span style="{CHIP_INDEX}">{i}'
                     f"</span>{html.escape(style.show_token(token))}{mark}</span>")
    st.html(f'<div style="display:flex;flex-wrap:wrap;gap:5px">{"".join(chips)}</div>')


def target_inputs(lm: tracing.LoadedModel) -> None:
    c1, c2 = st.columns(2)
    c1.text_input("Expected completion (empty: the clean top-1 token)", persist_state="session", key=W["target"],
                  help="Its first token is the target. Mind the leading space: ' Paris'.")
    c2.text_input("Contrast completion (for the logit difference)", persist_state="session", key=W["contrast"],
                  help="Used only by the metric 'logit difference': logit(target) − logit(contrast), "
                       "first token of each.")
    for name, where in (("target", c1), ("contrast", c2)):
        _spacing_note(lm, name, where)


def _spacing_note(lm: tracing.LoadedModel, name: str, where: Any) -> None:
    """Say so when a completion typed without its leading space traces a piece of a word."""
    typed, prompt = st.session_state.get(W[name]) or "", st.session_state.get(W["prompt"]) or ""
    spaced = spacing_hint(lm, prompt, typed)
    if spaced is None:
        return
    first = lm.tokenizer.decode([completion_token(lm, prompt, typed)])
    where.warning(f"{style.quote_token(typed)} has no leading space, so its first token is "
                  f"{style.quote_token(first)}, a piece of a word. After a prompt the next word "
                  f"usually starts with a space: {style.quote_token(spaced)}.", icon=":material/space_bar:")
    where.button(f"Use {style.quote_token(spaced)}", key=f"trace_spaced_{name}", on_click=_set_widgets,
                 kwargs={name: spaced})


def noise_inputs(lm: tracing.LoadedModel) -> None:
    """Noise slider (absolute or × embedding σ), corruption and replacement prompt."""
    c1, c2, c3 = st.columns([3.2, 1.1, 1.6])
    corruption = c3.radio("Corruption", CORRUPTIONS, persist_state="session", key=W["corruption"], horizontal=True,
                          format_func=CORRUPTION_NAMES.get,
                          help="Gaussian: add N(0, level²) to the noised tokens' embeddings. "
                               "Uniform: add U(−level, level). Replacement: run a second prompt "
                               "with the same number of tokens instead.")
    if corruption == "replace":
        c1.text_input("Replacement prompt (same number of tokens)", persist_state="session", key=W["replacement"],
                      help="The corrupted run reads this prompt; e.g. swap the subject for "
                           "another one with as many tokens.")
        _replacement_count(lm, c2)
        return
    mode = c2.radio("Noise level in", NOISE_MODES, persist_state="session", key=W["noise_mode"],
                    format_func={"absolute": "absolute", "sigma": "× emb. σ"}.get,
                    help="absolute: the standard deviation itself. × emb. σ: a multiple of the "
                         "standard deviation of the token-embedding matrix (ROME used 3σ).")
    what = "half-width" if corruption == "uniform" else "standard deviation"
    if mode == "sigma":
        sigma = embedding_sigma(lm)
        c1.slider(f"Noise level: {what} in multiples of σ = {sigma:.4g}",
                  *NOISE_RANGE["sigma"], step=0.05, persist_state="session", key=W["noise_sigma"])
    else:
        c1.slider(f"Noise level ({what} added to the embeddings)", *NOISE_RANGE["absolute"],
                  step=0.01, persist_state="session", key=W["noise"],
                  help="Default 0.4 = 3σ of this model's embeddings (ROME's rule). The seed study "
                       "used 0.5 on GPT2-XL. Moving the slider re-traces at once.")


def _replacement_count(lm: tracing.LoadedModel, where: Any) -> None:
    """How many tokens the prompt and the replacement prompt have."""
    try:
        n = len(tokenize(lm, st.session_state[W["prompt"]]))
        m = len(tokenize(lm, st.session_state[W["replacement"]]))
    except ValueError:
        return
    where.caption(f"{m} tokens; the prompt has {n}." + (" ✓" if m == n else ""))


def run_inputs(lm: tracing.LoadedModel) -> None:
    """Kind, metric, samples, seed, window, layer convention."""
    c1, c2, c3, c4, c5, c6 = st.columns([2.6, 1.5, 0.8, 0.9, 0.8, 1.4])
    kind = c1.radio("Restore", runcard.KIND_CHOICES, persist_state="session", key=W["kind"], horizontal=True,
                    format_func=KIND_NAMES.get,
                    help="Hidden: one clean hidden state per cell. MLP / attention: the clean "
                         "outputs of a window of layers around the cell's layer.")
    c2.selectbox("Metric", list(METRICS), persist_state="session", key=W["metric"], format_func=lambda m: METRICS[m].label,
                 help="normalised: (p − corrupted) / (clean − corrupted), as in the seed study.")
    c3.number_input("Samples", *SAMPLES_RANGE, step=1, persist_state="session", key=W["samples"],
                    help=f"Noise draws averaged per cell (ROME: 10). Time grows with it; the page "
                         f"defaults to {INTERACTIVE.samples} to stay live on a CPU.")
    c4.number_input("Seed", *SEED_RANGE, step=1, persist_state="session", key=W["seed"])
    c5.number_input("Window", *WINDOW_RANGE, step=1, persist_state="session", key=W["window"],
                    disabled=kind == "hidden", help="Layers restored together for MLP / attention.")
    c6.radio("Layer l means", CONVENTIONS, persist_state="session", key=W["convention"], format_func={"input": "entering block l",
                                               "output": "leaving block l"}.get,
             help="Hidden kind only. Entering: the seed study's convention. Leaving: ROME's.")


def row_inputs(tokens: list[str] | None) -> None:
    """Which token rows the exact trace computes (each row costs a full set of restorations)."""
    c1, c2, c3 = st.columns([2.2, 2.6, 1.4])
    c3.selectbox("Sever (hidden kind)", runcard.SEVERS, persist_state="session", key=W["sever"], format_func=SEVER_NAMES.get,
                 disabled=st.session_state.get(W["kind"]) != "hidden",
                 help="ROME's severed paths: restore the clean hidden state while that token's MLP "
                      "(or attention) outputs in every later block keep their corrupted values: "
                      "how much of the state's effect flows through them. No preview: exact rows "
                      "only. Compare all three in the Severed paths tab.")
    c1.radio("Rows to compute", runcard.ROWS, persist_state="session", key=W["rows"], horizontal=True, format_func=ROW_NAMES.get,
             help="Every token's row (the full heatmap), only the noised tokens and the final token "
                  "(all the compact view and the category averages need: far cheaper on long "
                  "prompts), or rows you choose. Rows not computed stay empty.")
    if st.session_state[W["rows"]] == "chosen" and tokens is not None:
        chosen = [i for i in st.session_state.get(W["row_tokens"]) or [] if 0 <= i < len(tokens)]
        st.session_state[W["row_tokens"]] = chosen
        c2.multiselect("Token rows", list(range(len(tokens))), persist_state="session", key=W["row_tokens"],
                       format_func=lambda i: f"{i} {style.show_token(tokens[i])}",
                       placeholder="Choose token rows")


# ---------------------------------------------------------------------------------------------
# Checks and requests


def noised_tokens(lm: tracing.LoadedModel, state: TraceState, tokens: list[str]) -> list[int] | None:
    """The noised positions (chips and warnings shown), or None after showing an error."""
    try:
        noised = runcard.noised_positions(lm, state)
    except ValueError as exc:
        if state["noise_by"] == "subject":  # in pick mode the pills show the tokens already
            token_chips(tokens, [])
        common.show_error(exc, "Cannot pick the noised tokens")
        return None
    if state["noise_by"] == "subject":
        token_chips(tokens, noised)
    if 0 in noised:
        st.warning("The first token is noised. The seed study keeps it clean: its row then equals "
                   "the corrupted run, a baseline for the others.")
    if len(tokens) - 1 in noised:
        st.warning("The last token is noised: nothing can move from the noised token into the final "
                   "token, so there is no transition layer (the seed study avoids this).")
    return noised


def check_request(lm: tracing.LoadedModel, state: TraceState, n_tokens: int) -> None:
    """Raise ValueError for a bad target, contrast or replacement prompt (fast, before tracing)."""
    if state["target"]:
        answer_token(lm, state["target"], "expected completion")
    if state["metric"] == "logit_diff":
        if not state["contrast"]:
            raise ValueError("The logit difference needs a contrast completion.")
        answer_token(lm, state["contrast"], "contrast completion")
    if state["corruption"] == "replace":
        if not state["replacement"].strip():
            raise ValueError("Token replacement needs a replacement prompt.")
        n = len(tokenize(lm, state["replacement"]))
        if n != n_tokens:
            raise ValueError(f"The replacement prompt has {n} tokens; it must have as many as the "
                             f"prompt ({n_tokens}).")


def requests_for(lm: tracing.LoadedModel, state: TraceState) -> dict[str, runcard.TraceRequest]:
    kinds = KINDS if state["kind"] == "all" else (state["kind"],)
    return {kind: runcard.trace_request(lm, state, kind) for kind in kinds}


# ---------------------------------------------------------------------------------------------
# Tracing with progress and a stop button


def _stop(key: str) -> None:
    st.session_state[STOPPED] = key


def _resume() -> None:
    st.session_state.pop(STOPPED, None)


def _confirm(keys: list[str]) -> None:
    st.session_state.setdefault(CONFIRMED, set()).update(keys)


def _set_widgets(**values: Any) -> None:
    for name, value in values.items():
        st.session_state[W[name]] = value


Picture = Callable[[dict[Any, Trace], dict[Any, Any]], Any]  # (traces, exact masks) -> chart


def preview_of(lm: tracing.LoadedModel, request: runcard.TraceRequest) -> Refinement:
    """The request's attribution preview, to be refined by exact rows; rows the exact trace will
    not compute are left empty in it too."""
    preview = preview_trace(lm, request.prompt, request.noised, settings=request.trace_settings)
    if request.rows is not None:
        skipped = np.ones(len(preview.tokens), dtype=bool)
        skipped[request.rows] = False
        metrics = {k: np.where(skipped[:, None], np.nan, v) for k, v in preview.metrics.items()}
        preview = dataclasses.replace(preview, metrics=metrics)
    return Refinement(preview)


def estimate(lm: tracing.LoadedModel, request: runcard.TraceRequest, **changes: Any) -> float:
    """Expected seconds of the exact trace of ``request`` (``changes``: other settings, or rows)."""
    rows = changes.pop("rows", request.rows)
    settings = request.trace_settings.replace(**changes) if changes else request.trace_settings
    return estimate_trace(lm, request.prompt, request.noised, settings=settings, rows=rows).seconds


def duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cost_accepted(lm: tracing.LoadedModel, requests: dict[Any, runcard.TraceRequest],
                  keys: list[str], state: TraceState) -> bool:
    """True when the exact traces of ``requests`` are cheap, or the user agreed to their cost;
    otherwise shows the estimate with cheaper choices and returns False."""
    if set(keys) <= st.session_state.get(CONFIRMED, set()):
        return True
    seconds = sum(estimate(lm, r) for r in requests.values())
    if seconds <= ASK_ABOVE_S:
        return True
    box = st.container(border=True)
    box.warning(f"The exact trace would take about **{duration(seconds)}** on this machine "
                f"(it grows with the square of the prompt's length). Above is its preview.",
                icon=":material/schedule:")
    row = box.container(horizontal=True, gap="small")
    row.button(f"Compute it ({duration(seconds)})", key="trace_cost_go", on_click=_confirm, args=(keys,))
    if state.rows != "noised_final":
        cheaper = sum(estimate(lm, r, rows="noised_final") for r in requests.values())
        row.button(f"Only the noised and final rows ({duration(cheaper)})", key="trace_cost_rows",
                   on_click=_set_widgets, kwargs={"rows": "noised_final"})
    if state.samples > 1:
        cheaper = sum(estimate(lm, r, samples=1) for r in requests.values())
        row.button(f"1 sample ({duration(cheaper)})", key="trace_cost_samples",
                   on_click=_set_widgets, kwargs={"samples": 1})
    return False


def get_traces(lm: tracing.LoadedModel, requests: dict[Any, runcard.TraceRequest], state: TraceState,
               slot: str = "main", picture: Picture | None = None,
               label: Callable[[Any], str] = lambda kind: style.KIND_LABELS[kind],
               ) -> tuple[dict[Any, Trace], str] | None:
    """Exact traces of every request (from the caches when known), drawn live while they compute:
    ``picture(traces, masks)`` shows previews of the missing ones at once, then their exact rows
    replacing the preview's as they arrive, with a progress bar and a Stop button. Returns
    (traces, source) or None when stopped or waiting for the user to accept the cost. Only exact
    traces are returned and stored; a new setting interrupts the run (Streamlit's rerun)."""
    keys = {name: trace_key(lm, request) for name, request in requests.items()}
    found = {name: lookup(key) for name, key in keys.items()}
    traces = {name: trace for name, (trace, _) in found.items() if trace is not None}
    missing = [name for name in requests if name not in traces]
    if not missing:
        sources = {source for _, source in found.values()}
        return traces, "store" if "store" in sources else "session"
    if any(st.session_state.get(STOPPED) == keys[name] for name in missing):
        _stopped_note()
        return None
    st.session_state.pop(STOPPED, None)  # other settings now: the stop is over
    if any(requests[name].trace_settings.sever for name in missing):
        picture = None  # severed traces have no preview: their exact rows, with progress
    live: dict[Any, Refinement] = {}
    if picture is not None:
        with st.spinner("Preview (a first-order estimate, about a second)…"):
            live = {name: preview_of(lm, requests[name]) for name in missing}
    holder, drawn = st.empty(), [0.0]

    def draw(force: bool = False) -> None:
        if picture is not None and (force or time.perf_counter() - drawn[0] > LIVE_REDRAW_S):
            shown = {name: traces[name] if name in traces else live[name].trace for name in requests}
            masks = {name: live[name].exact if name in live else None for name in requests}
            holder.altair_chart(picture(shown, masks), width="content")
            drawn[0] = time.perf_counter()

    draw(force=True)
    if not cost_accepted(lm, {name: requests[name] for name in missing}, [keys[n] for n in missing], state):
        return None
    for i, name in enumerate(missing):
        count = f" ({i + 1}/{len(missing)})" if len(missing) > 1 else ""
        try:
            traces[name] = exact_trace(lm, requests[name], keys[name], f"{label(name)}{count}",
                                       f"{slot}_{i}", live.get(name), draw)
        except TraceCancelled:
            _stopped_note()
            return None
        remember(keys[name], traces[name])
        live.pop(name, None)
    holder.empty()
    return {name: traces[name] for name in requests}, "computed"


def exact_trace(lm: tracing.LoadedModel, request: runcard.TraceRequest, key: str, label: str, slot: str,
                refinement: Refinement | None, draw: Callable[..., None]) -> Trace:
    """The exact trace, its rows handed to ``refinement`` (and redrawn) as they are computed;
    progress counts work (rows of early tokens cost the most), so the ETA is honest. Raises
    TraceCancelled when stopped."""
    def stop_button(box: Any) -> None:
        box.button("Stop", key=f"trace_stop_{slot}", on_click=_stop, args=(key,),
                   icon=":material/stop_circle:", help="Stop this trace (the rows so far stay drawn).")

    def on_rows(block: Any) -> None:
        if refinement is not None:
            refinement.add(block)
            draw()

    rows = 8 * max(1, int(request.kwargs["samples"])) * max(1, len(tokenize(lm, request.prompt)))
    with common.progress(f"Tracing {label}: exact rows replacing the preview", unit="%",
                         first=f"Tracing {label}: clean and corrupted runs…",
                         stopped=lambda: st.session_state.get(STOPPED) == key, below=stop_button) as update:
        return causal_trace(lm, request.prompt, request.noised, progress=update, on_rows=on_rows,
                            rows=request.rows, token_rows_per_batch=rows,
                            max_chunk_work=chunk_work_for(lm, CHUNK_SECONDS),
                            settings=request.trace_settings)


def _stopped_note() -> None:
    c1, c2 = st.columns([4, 1])
    kept = " The last result stays below." if st.session_state.get(SHOWN) else ""
    c1.info(f"Stopped.{kept} Change a setting, or trace these settings.")
    c2.button("Trace these settings", on_click=_resume, key="trace_resume")


# ---------------------------------------------------------------------------------------------
# Results


def metric_for(traces: dict[Any, Trace], metric: str, quiet: bool = False) -> str:
    """The metric to draw (probability when a trace lacks the logit difference)."""
    if all(metric != "logit_diff" or "logit_diff" in t.metrics for t in traces.values()):
        return metric
    if not quiet:
        st.warning("These traces have no logit difference (no contrast); showing the probability.")
    return "prob"


def main_picture(metric: str) -> Picture:
    """The live picture of the page's own traces: one heatmap, or the three kinds side by side."""
    def picture(traces: dict[str, Trace], masks: dict[str, Any]) -> Any:
        shown = metric_for(traces, metric, quiet=True)
        if len(traces) > 1:
            return charts.kinds_side_by_side(traces, shown, exact=masks)
        kind, trace = next(iter(traces.items()))
        return charts.heatmap(trace, shown, exact=masks[kind])
    return picture


def target_note(trace: Trace) -> str:
    given = trace.settings.get("target")
    target = style.quote_token(trace.target)
    if given is None:
        return f"Target {target} (id {trace.target_id}): the clean run's top-1 token."
    if not isinstance(given, str):  # a token id (a category batch's trace)
        return f"Target {target} (id {trace.target_id}): the expected completion's first token."
    if given == trace.target:
        return f"Target {target} (id {trace.target_id}): the expected completion."
    return (f"Target {target} (id {trace.target_id}): the first token of the expected completion "
            f"{style.quote_token(given)}.")


def summary(trace: Trace, metric: str, source: str) -> None:
    """Clean / corrupted values, best cell, transition layer, time."""
    values = trace.metric(metric)
    low, high = trace.metric_bounds(metric)
    best = np.nanargmin(values) if lower_is_better(metric) else np.nanargmax(values)
    t, layer = divmod(int(best), trace.n_layers)
    transition = transition_layer(trace, metric)
    title = charts.metric_title(trace, metric)
    cols = st.columns(5)
    cols[0].metric(f"Clean {title}", f"{high:.4g}")
    cols[1].metric(f"Corrupted {title}", f"{low:.4g}")
    cols[2].metric("Best restoration", f"{values.flat[best]:.4g}",
                   help=f"token {t} {style.show_token(trace.tokens[t])}, layer {layer}")
    cols[3].metric("Transition layer", "none" if transition is None else str(transition),
                   help="First layer from which restoring the final token beats restoring the "
                        "noised token (the one that helps most, when several are noised) at every "
                        "later layer.")
    loaded = {"session": "Loaded from this session's cache.",
              "store": "Loaded from the result store (on disk)."}.get(source, "Just computed.")
    cols[4].metric("Computed in", f"{trace.elapsed:.1f} s", help=loaded)
    st.caption(f"{target_note(trace)} Best cell: token {t} `{style.show_token(trace.tokens[t])}`, "
               f"layer {layer}. {loaded}")


def summary_table(traces: dict[str, Trace], metric: str, source: str) -> None:
    """One row of summary numbers per kind ("All three"): each kind's own clean and corrupted
    values, best restoration, transition layer and time."""
    rows = []
    for kind, trace in traces.items():
        values = trace.metric(metric)
        low, high = trace.metric_bounds(metric)
        best = np.nanargmin(values) if lower_is_better(metric) else np.nanargmax(values)
        t, layer = divmod(int(best), trace.n_layers)
        transition = transition_layer(trace, metric)
        rows.append({"restored": KIND_NAMES[kind], "clean": high, "corrupted": low,
                     "best restoration": float(values.flat[best]),
                     "best cell": f"token {t} {style.show_token(trace.tokens[t])}, layer {layer}",
                     "transition layer": "none" if transition is None else str(transition),
                     "seconds": round(float(trace.elapsed), 1)})
    title = charts.metric_title(next(iter(traces.values())), metric)
    st.markdown(f"**{title}, per kind**")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
        name: st.column_config.NumberColumn(format="%.4g") for name in ("clean", "corrupted", "best restoration")})
    loaded = {"session": "Loaded from this session's cache.",
              "store": "Loaded from the result store (on disk)."}.get(source, "Just computed.")
    st.caption(f"{target_note(next(iter(traces.values())))} Each row is that kind's own trace; the "
               f"transition layer is computed per kind. {loaded}")


def top_tables(trace: Trace) -> None:
    c1, c2 = st.columns(2)
    for col, name, top in ((c1, "Clean run", trace.clean_top),
                           (c2, "Corrupted run (mean over samples)", trace.corrupted_top)):
        frame = pd.DataFrame([(style.quote_token(tok), p, "◀ target" if tok == trace.target else "")
                              for tok, p in top], columns=["next token", "probability", ""])
        col.markdown(f"**{name}: top 5**")
        col.dataframe(frame, hide_index=True, width="stretch", column_config={
            "probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.4f")})


def heatmap_tab(lm: tracing.LoadedModel, traces: dict[str, Trace], metric: str) -> None:
    """The heatmap(s); a clicked cell opens its side panel (attention per head, logit lens)."""
    first = next(iter(traces.values()))
    cell = picked_cell(first)
    where, panel = (st.columns([2.5, 1]) if cell is not None else (st.container(), None))
    budget = PANEL_PLOT_PX if cell is not None else charts.PLOT_BUDGET  # room for the side panel
    with where:
        if len(traces) > 1:
            chart = charts.kinds_side_by_side(traces, metric, pick=True, budget=budget)
            data = pd.concat([charts.trace_frame(t, metric).assign(kind=k) for k, t in traces.items()])
        else:
            width = charts.fitted_cell_width(first.n_layers, budget)
            chart = charts.heatmap(first, metric, pick=True, cell_width=width)
            data = charts.trace_frame(first, metric)
        st.altair_chart(chart, width="content", on_select="rerun", selection_mode=charts.PICK, key=PICKED)
        st.caption("Rows: tokens (index, token; * = noised, ␣ = space). Columns: layers. Colour: the "
                   "metric with that one state restored, from the corrupted run's value (white) up. "
                   "Hover a cell for exact numbers; **click a cell** for its attention heads and logit "
                   "lens (double-click to close).")
        common.chart_downloads(chart, "trace_heatmap", data, name=export_name("trace_heatmap", traces))
    if panel is not None:
        with panel:
            cell_panel(lm, traces, *cell, metric)


def picked_cell(trace: Trace) -> tuple[int, int] | None:
    """The (token, layer) clicked in the heatmap, when it is a cell of ``trace``."""
    event = st.session_state.get(PICKED)
    points = ((event or {}).get("selection") or {}).get(charts.PICK) or []
    if not points or not isinstance(points[0], dict):
        return None
    try:
        token, layer = int(points[0]["token_index"]), int(points[0]["layer"])
    except (KeyError, TypeError, ValueError):
        return None
    return (token, layer) if 0 <= token < len(trace.tokens) and 0 <= layer < trace.n_layers else None


def lens_row(trace: Trace, layer: int) -> int:
    """The logit-lens row (the residual state entering block ``row``) of a heatmap column: the
    state entering block l (hidden kind, "input" convention), else the state leaving it."""
    entering = trace.kind == "hidden" and trace.settings.get("convention", "input") == "input"
    return layer if entering else min(layer + 1, trace.n_layers)


def cell_panel(lm: tracing.LoadedModel, traces: dict[str, Trace], token: int, layer: int, metric: str) -> None:
    """The side panel of a heatmap cell: its values, the final token's attention to that token at
    that layer for every head, and the final token's logit lens there; links to the full views."""
    first = next(iter(traces.values()))
    shown = style.show_token(first.tokens[token])
    box = st.container(border=True)
    box.markdown(f"**Token {token} `{shown}` · layer {layer}**")
    for kind, trace in traces.items():
        value = trace.metric(metric)[token, layer]
        box.caption(f"{KIND_NAMES[kind]} restored: {charts.metric_title(trace, metric)} = {value:.4g} "
                    f"(corrupted {trace.metric_bounds(metric)[0]:.4g}, clean {trace.metric_bounds(metric)[1]:.4g})")
    try:
        weights = common.attention_to(lm, first.prompt, [token])[layer, :, 0]
        lens = common.logit_lens(lm, first.prompt, k=5, target=int(first.target_id))
    except Exception as exc:  # noqa: BLE001 - the panel says so; the heatmap stays
        show = box.container()
        with show:
            common.show_error(exc, "Could not compute this cell's views")
        return
    final = style.show_token(first.tokens[-1])
    box.markdown(f"**Attention** of the final token `{final}` to token {token} at layer {layer}, per head")
    heads = pd.DataFrame({"head": np.arange(len(weights)), "weight": weights.astype(float)})
    box.dataframe(heads, hide_index=True, width="stretch", height=min(400, 36 + 35 * len(heads)), column_config={
        "weight": st.column_config.ProgressColumn(min_value=0.0, max_value=max(0.05, float(weights.max())),
                                                  format="%.4f")})
    box.caption(f"Mean over heads {weights.mean():.4f}; the largest: head {int(weights.argmax())} "
                f"({weights.max():.4f}).")
    row = lens_row(first, layer)
    where = "entering" if row == layer else "leaving"
    top = pd.DataFrame({"next token": [style.quote_token(t) for t in lens.top_tokens[row]],
                        "probability": lens.top_probs[row]})
    box.markdown(f"**Logit lens** of the final token's state {where} block {layer if row == layer else row - 1}")
    box.dataframe(top, hide_index=True, width="stretch", column_config={
        "probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.4f")})
    box.caption(f"Target {style.quote_token(lens.target)}: p = {lens.target_probs[row]:.4g}, rank "
                f"{int(lens.target_ranks[row])} (clean run, no noise).")
    row_links = box.container(horizontal=True, gap="small")
    if row_links.button("All heads (Attention page)", key="trace_cell_attention", icon=":material/visibility:"):
        common.follow_link("pages/attention.py", common.PATHS["attention"],
                           {"tab": "Single prompt", "source": "study", "layer": layer})
    if row_links.button("Full logit lens (Hidden states)", key="trace_cell_lens", icon=":material/timeline:"):
        common.follow_link("pages/hidden_states.py", common.PATHS["hidden_states"], HIDDEN_LENS_LINK)


HIDDEN_LENS_LINK = {"tab": HiddenState.TABS[0], "lens_source": "study"}  # the hidden-states page's settings that show the study's lens


def compact_tab(traces: dict[str, Trace], metric: str) -> None:
    st.caption("Only the noised tokens and the final token, as in the seed study's figures. The "
               "curves compare the noised token whose restoration helps most with the final token; "
               "the transition layer is where restoring the final token starts to beat it for good.")
    for kind, trace in traces.items():
        if trace.last_token_noised:
            st.info(f"{KIND_NAMES[kind]}: the final token is noised, so there is no compact view.")
            continue
        chart = charts.compact(trace, metric)
        st.altair_chart(chart, width="content")
        common.chart_downloads(chart, f"trace_compact_{kind}", charts.compact_frame(trace, metric),
                               name=export_name("trace_compact", {kind: trace}))


def export_tab(lm: tracing.LoadedModel, traces: dict[str, Trace], metric: str, state: TraceState) -> None:
    facts = lm.facts()
    model = {"name": facts["name"], "revision": facts["revision"], "family": facts["family"],
             "dtype": facts["dtype"], "device": facts["device"]}
    st.markdown("**Numbers with the run card** (model and revision, prompt, noised tokens, every "
                "setting, package versions). Load a JSON export back below to reproduce the page.")
    for kind, trace in traces.items():
        stem = export_name("trace", {kind: trace})
        page = {**state.to_dict(), "kind": kind}
        c1, c2, c3 = st.columns([1, 1, 4], vertical_alignment="center")
        which = f" · {KIND_NAMES[kind]}" if len(traces) > 1 else ""
        common.download_button(f"JSON{which}", _later(runcard.to_json, trace, metric, model, page),
                               f"{stem}.json", "application/json", f"trace_json_{kind}",
                               icon=":material/download:", where=c1)
        common.download_button(f"CSV{which}", _later(runcard.to_csv, trace, metric, model),
                               f"{stem}.csv", "text/csv", f"trace_csv_{kind}",
                               icon=":material/download:", where=c2)
        with c3.expander(f"Run card ({KIND_NAMES[kind]})"):
            st.json(runcard.run_card(trace, metric, model, page), expanded=1)


def _later(function: Any, *args: Any) -> Any:
    """A deferred download: ``function(*args)`` runs when the button is clicked."""
    return lambda: function(*args)


def export_name(what: str, traces: dict[str, Trace], noise: bool = True) -> str:
    """A file name saying what an export holds: what, prompt, kind(s), noise level and seed."""
    trace = next(iter(traces.values()))
    kinds = "all" if len(traces) > 1 else trace.kind
    level = [f"noise{trace.settings.get('noise', 0):g}"] if noise else []
    return common.file_name(what, trace.prompt, kinds, *level, f"seed{trace.settings.get('seed', 0)}")


def card_upload() -> None:
    """Load a JSON run card back into the page (settings, and its numbers into the cache)."""
    st.file_uploader("Load a JSON run card", type=["json"], key="trace_card_upload",
                     on_change=_load_card)
    message = st.session_state.get(CARD_MSG)
    if message:
        (st.error if message[0] == "error" else st.success)(message[1])


def _load_card() -> None:
    upload = st.session_state.get("trace_card_upload")
    if upload is None:
        st.session_state.pop(CARD_MSG, None)
        return
    lm = common.current_model()
    try:
        loaded = runcard.load_run_card(upload.getvalue(), lm)
    except ValueError as exc:
        st.session_state[CARD_MSG] = ("error", f"Could not load {upload.name}: {exc}")
        return
    apply_state(TraceState.from_dict(loaded.state))
    st.session_state.pop(STOPPED, None)
    if loaded.trace is not None:
        _cache_loaded(lm, loaded)
    st.session_state[CARD_MSG] = ("ok", f"Loaded {upload.name}: the page now shows its settings. "
                                        + " ".join(loaded.notes))


def _cache_loaded(lm: tracing.LoadedModel, loaded: runcard.LoadedCard) -> None:
    """Put a loaded card's numbers in the session cache when they match its settings exactly."""
    kind = loaded.trace.kind
    try:
        request = runcard.trace_request(lm, loaded.state, kind)
    except ValueError as exc:
        loaded.notes.append(f"Its settings do not make a trace here ({exc}).")
        return
    same = json.loads(json.dumps(request.settings)) == json.loads(json.dumps(loaded.trace.settings))
    if same:
        _remember(st.session_state.setdefault(CACHE, OrderedDict()), trace_key(lm, request),
                  loaded.trace, SESSION_ITEMS)
    else:
        loaded.notes.append("Its numbers do not match its settings; the trace will be recomputed.")


# ---------------------------------------------------------------------------------------------
# Noise sweep


def sweep_tab(lm: tracing.LoadedModel, state: TraceState, metric: str, ok: bool) -> TraceState:
    """The noise sweep; returns the state with the sweep's levels as typed (when they parse)."""
    st.caption("The same trace at several noise levels, side by side on one colour scale (the seed "
               "study compared 0.1, 0.3, 0.5 and 1.0). Every level is a full trace; each is cached.")
    c1, c2 = st.columns([1, 3])
    c1.toggle("Compute the sweep", persist_state="session", key=W["sweep_on"])
    c2.text_input("Noise levels (comma separated)", persist_state="session", key=W["sweep"])
    levels, problems = TraceState.parse({"sweep": st.session_state[W["sweep"]],
                                         "noise_mode": state.noise_mode})
    if problems:
        st.error(f"Bad noise levels: {problems[0]}")
        return state
    state = state.replace(sweep=levels.sweep)
    if state.corruption == "replace":
        st.info("Token replacement has no noise level to sweep.")
        return state
    if not state.sweep_on:
        return state
    if not ok:
        st.info("Fix the settings above to compute the sweep.")
        return state
    kind = "hidden" if state.kind == "all" else state.kind
    requests = {level: runcard.trace_request(lm, state, kind, noise=level) for level in state.sweep}
    metric = state.metric

    def picture(traces: dict[float, Trace], masks: dict[float, Any]) -> Any:
        return charts.noise_sweep(traces, metric_for(traces, metric, quiet=True), exact=masks)

    got = get_traces(lm, requests, state, slot="sweep", picture=picture, label=lambda level: f"noise {level:g}")
    if got is None:
        return state
    traces = got[0]
    metric = metric_for(traces, metric)
    chart = charts.noise_sweep(traces, metric)
    st.altair_chart(chart, width="content")
    data = pd.concat([charts.trace_frame(t, metric).assign(noise=level) for level, t in traces.items()])
    common.chart_downloads(chart, "trace_noise_sweep", data,
                           name=export_name("trace_noise_sweep", {kind: traces[min(traces)]}, noise=False))
    return state


# ---------------------------------------------------------------------------------------------
# A/B comparison


def compare_inputs(state: TraceState) -> None:
    """What trace B changes, and B's value(s)."""
    c1, c2 = st.columns([1.2, 3])
    mode = c1.radio("Trace B is this study with", runcard.COMPARE, persist_state="session", key=W["compare"], format_func=COMPARE_NAMES.get)
    if mode == "prompt":
        a, b, c = c2.columns([2.6, 1.4, 1.2])
        a.text_input("B's prompt", persist_state="session", key=W["b_prompt"])
        b.text_input("B's subject (noised like A's)", persist_state="session", key=W["b_subject"])
        c.text_input("B's expected completion", persist_state="session", key=W["b_target"], help="Empty: B's clean top-1 token.")
    elif mode == "noise":
        low, high = NOISE_RANGE[state.noise_mode]
        if not low <= float(st.session_state.get(W["b_noise"], low)) <= high:
            st.session_state[W["b_noise"]] = min(max(float(st.session_state[W["b_noise"]]), low), high)
        c2.slider("B's noise level" + (" (× σ)" if state.noise_mode == "sigma" else ""), low, high,
                  step=0.01, persist_state="session", key=W["b_noise"], help=f"A's is {state.noise:g}.")
    else:
        c2.number_input("B's seed", *SEED_RANGE, step=1, persist_state="session", key=W["b_seed"], help=f"A's is {state.seed}.")


def compare_tab(lm: tracing.LoadedModel, state: TraceState, metric: str, ok: bool) -> TraceState:
    """Trace A (this page's study) and trace B (it with another prompt, noise level or seed) on one
    colour scale, their difference and both compact curves on one chart."""
    st.caption("A is the study above. B changes one thing: the prompt (its subject noised the same way), "
               "the noise level or the seed. Both are exact traces of one kind, cached like every trace.")
    compare_inputs(state)
    state = read_state().replace(tab=state.tab, sweep=state.sweep, sever_token=state.sever_token)
    if not ok:
        st.info("Fix the settings above to compare.")
        return state
    kind = "hidden" if state.kind == "all" else state.kind
    try:
        b = runcard.b_state(state)
        check_request(lm, TraceState.from_dict(b), len(tokenize(lm, b["prompt"])))
        requests = {"A": runcard.trace_request(lm, state, kind), "B": runcard.trace_request(lm, b, kind)}
    except ValueError as exc:
        common.show_error(exc, "Cannot trace B")
        return state
    names = ab_names(state)

    def picture(traces: dict[str, Trace], masks: dict[str, Any]) -> Any:
        shown = metric_for(traces, metric, quiet=True)
        return charts.ab_pair(traces["A"], traces["B"], shown, names, exact={names[0]: masks["A"], names[1]: masks["B"]})

    got = get_traces(lm, requests, state, slot="ab", picture=picture, label=lambda name: f"trace {name}")
    if got is None:
        return state
    a, b_trace = got[0]["A"], got[0]["B"]
    shown = metric_for(got[0], metric)
    stem = export_name(f"ab_{state.compare}", {kind: a})
    pair = charts.ab_pair(a, b_trace, shown, names)
    st.altair_chart(pair, width="content")
    common.chart_downloads(pair, "trace_ab_pair", pd.concat([charts.trace_frame(t, shown).assign(trace=n)
                                                             for n, t in zip(names, (a, b_trace))]),
                           name=stem + "_pair")
    try:
        diff = charts.difference_heatmap(a, b_trace, shown)
    except ValueError as exc:
        st.info(f"No difference heatmap: {exc}")
    else:
        st.altair_chart(diff, width="content")
        common.chart_downloads(diff, "trace_ab_difference", charts.difference_frame(a, b_trace, shown),
                               name=stem + "_difference")
    try:
        curves = charts.compact_pair(a, b_trace, shown, names)
    except ValueError as exc:
        st.info(f"No compact curves: {exc}")
    else:
        st.altair_chart(curves, width="content")
        common.chart_downloads(curves, "trace_ab_compact", pd.concat(
            [charts.compact_frame(t, shown).assign(trace=n) for n, t in zip(names, (a, b_trace))]),
            name=stem + "_compact")
    facts = lm.facts()
    model = {k: facts[k] for k in ("name", "revision", "family", "dtype", "device")}
    common.download_button("Run card of A and B (JSON)",
                           _later(lambda: json.dumps(runcard.ab_card(a, b_trace, shown, model, state.to_dict()),
                                                     indent=1, default=str)),
                           f"{stem}.json", "application/json", "trace_ab_json", icon=":material/download:")
    return state


def ab_names(state: TraceState) -> tuple[str, str]:
    """Panel names of A and B: what B changes."""
    if state.compare == "noise":
        return f"A · noise {state.noise:g}", f"B · noise {state.b_noise:g}"
    if state.compare == "seed":
        return f"A · seed {state.seed}", f"B · seed {state.b_seed}"
    return (f"A · {style.ellipsis(state.prompt, 28)}", f"B · {style.ellipsis(state.b_prompt, 28)}")


# ---------------------------------------------------------------------------------------------
# Severed paths (ROME Fig. 3)


def severed_tab(lm: tracing.LoadedModel, state: TraceState, tokens: list[str] | None, metric: str,
                ok: bool) -> TraceState:
    """ROME's comparison at one token: the effect per layer of restoring its hidden state with
    nothing severed, the later MLPs severed and the later attention severed. Only that token's row
    is computed (three exact traces of one row each)."""
    st.caption("Restore the clean hidden state of one token at each layer, while that token's MLP "
               "(or attention) outputs in every later block keep their corrupted values: the gap to "
               "the unsevered curve is the share of the effect that flows through them (Meng et al. "
               "2022, Fig. 3). One noise sample per trace, the same for all three.")
    if not ok or tokens is None:
        st.info("Fix the settings above to compare severed paths.")
        return state
    if state.corruption == "replace" and not state.replacement.strip():
        return state
    noised = runcard.noised_positions(lm, state)
    default = max(noised)
    options = list(range(len(tokens)))
    if st.session_state.get(W["sever_token"]) not in options:
        st.session_state[W["sever_token"]] = default if state.sever_token < 0 or state.sever_token >= len(tokens) \
            else state.sever_token
    token = st.selectbox("At token", options, persist_state="session", key=W["sever_token"],
                         format_func=lambda i: f"{i} {style.show_token(tokens[i])}" + ("*" if i in noised else ""),
                         help="ROME's figure uses the last subject token (the default here).")
    state = state.replace(sever_token=-1 if token == default else int(token))
    requests = {part: runcard.trace_request(lm, state, "hidden", sever=part, rows=[token])
                for part in runcard.SEVERS}
    got = get_traces(lm, requests, state, slot="severed",
                     label=lambda part: f"{SEVER_NAMES[part]} severed" if part != "none" else "nothing severed")
    if got is None:
        return state
    traces = {None if part == "none" else part: trace for part, trace in got[0].items()}
    shown = metric_for(got[0], metric)
    chart = severed.severed_comparison(traces, token, shown)
    st.altair_chart(chart, width="content")
    data = severed.severed_frame(traces, token, shown)
    common.chart_downloads(chart, "trace_severed", data,
                           name=export_name(f"trace_severed_token{token}", {"hidden": got[0]["none"]}))
    return state


# ---------------------------------------------------------------------------------------------
# The page


def inputs(lm: tracing.LoadedModel) -> tuple[TraceState, list[str] | None, list[int] | None]:
    """Every input widget; the page state, the prompt's tokens and the noised positions."""
    notes = st.container()  # fixed place for chips, errors and warnings (a stable layout)
    with notes:
        tokens = prompt_inputs(lm)
        state = read_state()
        noised = noised_tokens(lm, state, tokens) if tokens is not None else None
    target_inputs(lm)
    noise_inputs(lm)
    run_inputs(lm)
    row_inputs(tokens)
    state = read_state()
    return state, tokens, noised


def trace_now(lm: tracing.LoadedModel, state: TraceState, tokens, noised) -> bool:
    """Trace the current settings (or load them); False if the inputs are bad or it stopped (the
    last good result stays in SHOWN)."""
    if tokens is None or noised is None:
        return False

    def trace() -> dict | None:
        check_request(lm, state, len(tokens))
        got = get_traces(lm, requests_for(lm, state), state, picture=main_picture(state.metric))
        if got is None:  # stopped
            return None
        traces, source = got
        return dict(traces=traces, state=state, model=lm.name, source=source)

    return common.keep_last_good(SHOWN, trace, "Cannot trace these settings")[1]


def results(lm: tracing.LoadedModel, state: TraceState, current: bool, ok: bool,
            tokens: list[str] | None = None) -> TraceState:
    """The last good result (with a warning when it is not the current settings'); returns the
    state with the sweep's levels."""
    shown = st.session_state.get(SHOWN)
    if shown is None:
        return state
    if not current:
        st.warning(f"Showing the last result that worked (model {shown['model']}, prompt "
                   f"{shown['state']['prompt']!r}, noise {shown['state']['noise']:g}).")
    traces = shown["traces"]
    metric = metric_for(traces, state.metric)
    source = shown["source"] if current else "session"
    if len(traces) > 1:
        summary_table(traces, metric, source)
    else:
        summary(next(iter(traces.values())), metric, source)
    top_tables(next(iter(traces.values())))
    # tabs that rerun when switched: only the open one runs (the sweep computes only when shown)
    tabs = dict(zip(TAB_NAMES, st.tabs(list(TAB_NAMES.values()), key=W["tab"], on_change="rerun")))
    state = state.replace(tab=TAB_KEYS.get(st.session_state.get(W["tab"]), state.tab))
    if _showing(tabs["heatmap"]):
        with tabs["heatmap"]:
            heatmap_tab(lm, traces, metric)
    if _showing(tabs["compact"]):
        with tabs["compact"]:
            compact_tab(traces, metric)
    if _showing(tabs["export"]):
        with tabs["export"]:
            export_tab(lm, traces, metric, shown["state"])
            card_upload()
    if _showing(tabs["severed"]):
        with tabs["severed"]:
            state = severed_tab(lm, state, tokens, metric, ok and current)
    if _showing(tabs["compare"]):
        with tabs["compare"]:
            state = compare_tab(lm, state, metric, ok and current)
    if _showing(tabs["sweep"]):
        with tabs["sweep"]:
            state = sweep_tab(lm, state, metric, ok and current)
    return state


def _showing(tab: Any) -> bool:
    """Whether a tab is open (True when Streamlit does not say)."""
    return tab.open is not False


def main() -> None:
    st.title("Causal trace of one prompt")
    st.caption("Corrupt some input tokens with noise, then restore one clean state at a time and "
               "see how much of the model's prediction comes back (Meng et al. 2022, ROME).")
    lm = common.current_model()
    with st.container():
        common.show_problems(restore_widgets())
    state, tokens, noised = inputs(lm)
    publish(state)
    st.divider()
    with st.container():  # errors, progress and Stop: a fixed place above the results
        ok = trace_now(lm, state, tokens, noised)
        if st.session_state.get(SHOWN) is None and not ok:
            if STOPPED not in st.session_state:
                st.info("Nothing traced yet: fix the inputs above.")
            card_upload()
            return
    publish(results(lm, state, ok, ok, tokens))


common.run_page(main)
