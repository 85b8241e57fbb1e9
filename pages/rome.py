"""ROME averages: average indirect effects by token position over a fact set (ROME Fig. 2)."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from pages import common
from pages.state import ROME_LIMIT, UPLOAD, RomeState
from tracing import prompts, rome
from tracing.charts import rome as rome_charts
from tracing.charts.style import SHORT_KIND, ellipsis
from tracing.model.tokens import tokenize
from tracing.settings import KINDS, NOISE_RANGE, SAMPLES_RANGE, SEED_RANGE, WINDOW_RANGE

STATE = "rome_state"  # the page state (RomeState), kept across page switches and in the URL
LAST_RUN = "rome_last_run"  # caption of the last run
PROMPT_CHARS = 120  # prompts longer than this are cut in the page's tables


@st.cache_data(show_spinner="Checking which facts the model gets right…", max_entries=16)
def correct_mask(model_name: str, records: tuple[tuple[str, str, str], ...]) -> list[bool]:
    """Whether the model's clean top-1 is the expected token, per prompt (cached per model and set);
    False for a prompt the model cannot run (empty, longer than its context: left out, with why)."""
    lm = common.cached_model(model_name)
    frame = pd.DataFrame(records, columns=["prompt", "subject", "expected"])
    runs = pd.Series([_runs(lm, p) for p in frame["prompt"]], index=frame.index)
    mask = pd.Series(False, index=frame.index)
    if runs.any():
        mask[runs] = rome.correct_mask(lm, frame[runs])
    return mask.tolist()


def _runs(lm, prompt: str) -> bool:
    try:
        tokenize(lm, prompt)
    except ValueError:
        return False
    return True


def controls(n_layers: int) -> dict | None:
    """The averaging settings; None (with an error shown) when they are unusable."""
    c = st.columns([2, 1.3, 1, 1, 1])
    kinds = c[0].multiselect("Restore", KINDS, format_func=SHORT_KIND.get, persist_state="session", key="rome_kinds")
    rule = c[1].toggle("ROME's noise rule", persist_state="session", key="rome_rule",
                       help="Noise std = 3 × the std of the subject tokens' embeddings over the set.")
    noise = None if rule else c[1].number_input("Noise (std)", *NOISE_RANGE["absolute"], step=0.01,
                                                persist_state="session", key="rome_noise", format="%.4f")
    samples = c[2].number_input("Samples", *SAMPLES_RANGE, persist_state="session", key="rome_samples", help="Noise draws per trace (ROME: 10).")
    seed = c[3].number_input("Seed", *SEED_RANGE, persist_state="session", key="rome_seed")
    limit = c[4].number_input("First N prompts", 0, ROME_LIMIT, persist_state="session", key="rome_limit", help="0: every prompt.")
    window = st.session_state["rome_window"]
    if any(k != "hidden" for k in kinds):
        high = min(n_layers, WINDOW_RANGE[1])
        st.session_state["rome_window"] = min(max(window, WINDOW_RANGE[0]), high)
        window = st.slider("Window (layers, MLP / attention)", WINDOW_RANGE[0], high, persist_state="session", key="rome_window")
    correct_only = st.toggle("Only facts the model gets right (ROME)", persist_state="session", key="rome_correct")
    if not kinds:
        st.error("Pick at least one kind to restore.")
        return None
    return dict(kinds=kinds, noise=noise, samples=int(samples), seed=int(seed), window=int(window),
                correct_only=correct_only, limit=int(limit))


def options(opts: dict, kind: str, correct: pd.Series) -> dict:
    return dict(kind=kind, noise=opts["noise"], samples=opts["samples"], seed=opts["seed"], window=opts["window"],
                correct_only=opts["correct_only"], store=common.result_store(), correct=correct)


def run(lm, frame: pd.DataFrame, opts: dict, correct: pd.Series, pending: int) -> None:
    """Trace the missing facts of every chosen kind, with an overall and a per-trace progress bar."""
    overall_slot, inner_slot = st.empty(), st.empty()
    st.button("Stop", key="rome_stop", help="Stops after the current step; finished traces are kept.")
    done = {"n": 0}
    with common.progress(f"0 / {pending} traces", overall_slot) as overall, \
            common.progress("current trace:", inner_slot, unit="%") as inner:
        for kind in opts["kinds"]:
            def on_prompt(_done: int, _total: int, result, kind: str = kind) -> None:
                if result.status == "computed":
                    done["n"] += 1
                overall(done["n"], max(pending, 1), f"{done['n']} / {pending} traces · {kind}: {result.prompt[:50]}")

            table = rome.average_indirect_effects(lm, frame, progress=on_prompt, prompt_progress=inner,
                                                  **options(opts, kind, correct))
            if table.attrs["cancelled"]:
                break
    st.session_state[LAST_RUN] = f"Computed {done['n']} trace(s)."


def export_name(what: str, source: str, kind: str, noise: float, opts: dict) -> str:
    """A download's file name stem: what it holds, the set, the kind and every setting that
    changes the numbers (``common.file_name``)."""
    parts = [what, source.removesuffix(".csv"), kind, f"noise{noise:g}", f"samples{opts['samples']}",
             f"seed{opts['seed']}"]
    if kind != "hidden":
        parts.append(f"window{opts['window']}")
    if opts["limit"]:
        parts.append(f"first{opts['limit']}")
    parts.append("correct_only" if opts["correct_only"] else "all_facts")
    return common.file_name(*parts)


def left_out(skipped: list[tuple[str, str]], title: str) -> None:
    """The prompts left out and why (long prompts cut), in an expander."""
    if skipped:
        with st.expander(title.format(n=len(skipped))):
            rows = [(ellipsis(str(p), PROMPT_CHARS), ellipsis(str(why), 300)) for p, why in skipped]
            st.dataframe(pd.DataFrame(rows, columns=["prompt", "reason"]), hide_index=True)


def show_kind(lm, kind: str, table: pd.DataFrame, source: str, frame: pd.DataFrame, opts: dict,
              planned: list[tuple[str, str]]) -> None:
    """One kind's caption, chart, downloads, peaks and the prompts that failed in the run
    (``planned``: those left out before it, listed above)."""
    a = table.attrs
    st.subheader(SHORT_KIND[kind])
    st.caption(f"{a['used']} prompts averaged, {len(a['skipped'])} left out · noise **{a['noise']:g}** "
               f"({a['noise_rule']}) · mean p clean {a['high']:.3f}, corrupted {a['low']:.3f}, "
               f"total effect {a['total_effect']:.3f} · {a['ci']}")
    if a.get("pending"):
        st.warning(f"{a['pending']} prompt(s) not traced yet: the averages use the stored ones only.")
    chart = rome_charts.figure({kind: table})
    st.altair_chart(chart)
    export = table.assign(kind=kind, noise=a["noise"], model=lm.name)
    common.chart_downloads(chart, f"rome-{kind}", export,
                           name=export_name("rome_aie", source, kind, a["noise"], opts))
    card = rome.run_card(table, lm, source, frame)
    common.download_button("Run card (JSON)", json.dumps(card, indent=2, default=str),
                           export_name("rome_run_card", source, kind, a["noise"], opts) + ".json",
                           "application/json", f"rome-{kind}-card")
    with st.expander("Peaks per position"):
        st.dataframe(rome.peaks(table), hide_index=True)
    left_out([s for s in a["skipped"] if s not in planned], "{n} prompt(s) failed in the run")


def main() -> None:
    st.title("ROME averages")
    st.caption(
        "Average indirect effect (ROME, Meng et al. 2022, Fig. 2): every subject token is noised, one "
        "state is restored at a time, and p(restored) − p(corrupted) of the expected answer is averaged "
        "over the facts by token position (first / middle / last subject token, first subsequent token, "
        "further tokens, last token). Bands: 95 % Student-t intervals over prompts. Traces are kept in "
        "the result store: a re-run only computes what is missing. These settings are this page's "
        "own (ROME's), not the study's."
    )
    lm = common.current_model()
    picked = common.prompt_set_picker("rome_set", upload_key="rome_upload")
    if picked is None:
        return
    frame, source = picked
    opts = controls(lm.n_layers)
    if opts is None:
        return
    frame = frame.head(opts["limit"]) if opts["limit"] else frame
    try:
        records = tuple(zip(frame["prompt"], frame["subject"].fillna(""), frame["expected"]))
        correct = pd.Series(correct_mask(lm.name, records), index=frame.index)
        plans = {k: rome.plan_facts(lm, frame, **options(opts, k, correct)) for k in opts["kinds"]}
    except ValueError as exc:
        common.show_error(exc, "Bad prompt set or settings")
        return
    pending = sum(r.status == "pending" for p in plans.values() for r in p["plan"])
    first = next(iter(plans.values()))
    st.caption(f"{len(frame)} prompts · {len(first['frame'])} to average, {len(first['skipped'])} left out · "
               f"noise {first['noise']:g} ({first['noise_rule']}) · {pending} trace(s) to compute")
    left_out(first["skipped"], "{n} prompt(s) left out, and why")
    if st.button(f"Trace {pending} missing", type="primary", disabled=pending == 0, key="rome_run"):
        try:
            common.publish_state(common.widget_state(RomeState, STATE), STATE)  # the URL before a long run
            run(lm, frame, opts, correct, pending)
            st.rerun()
        except Exception as exc:  # noqa: BLE001 - finished traces are stored; show what went wrong
            common.show_error(exc, "The run stopped")
    if LAST_RUN in st.session_state:
        st.caption(st.session_state[LAST_RUN])
    for kind in opts["kinds"]:
        if not any(r.trace is not None for r in plans[kind]["plan"]):
            st.info(f"{SHORT_KIND[kind]}: no traces yet for these settings: press the button above.")
            continue
        try:
            table = rome.average_indirect_effects(lm, frame, stored_only=True, **options(opts, kind, correct))
        except ValueError as exc:
            common.show_error(exc, "Could not average")
            continue
        show_kind(lm, kind, table, source, frame, opts, plans[kind]["skipped"])


def render() -> None:
    """The page with its settings from the link (first visit) or the session, then in the URL."""
    _, problems = common.restore_state(RomeState, STATE, common.PATHS["rome"])
    if st.session_state.get("rome_set") not in (*prompts.shipped_sets(), UPLOAD):
        st.session_state["rome_set"] = next(iter(prompts.shipped_sets()), UPLOAD)
    common.show_problems(common.study_only(problems))
    main()
    common.publish_state(common.widget_state(RomeState, STATE), STATE)


common.run_page(render)
