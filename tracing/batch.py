"""Batch tracing of a prompt set, and the per-category analysis of the seed study.

``run_batch`` traces every prompt of a set with one set of settings, reading finished traces from
the result store and writing new ones to it, so an interrupted batch resumes where it stopped.
With ``backend="ray"`` the pending prompts are traced by a pool of Ray actors (``distributed``), on
this machine or a cluster; the driver still writes the store. The analysis functions work on its
results: per prompt, the normalised trace rows of the noised
token and of the final token (0 = corrupted run, 1 = clean run), averaged per category.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from .analysis import describe, followed_token, transition_layer
from .categories import group_label, group_of, ordered
from .causal import Trace, TraceCancelled, causal_trace, resolve_rows
from .model.tokens import tokenize
from .prompts import expected_token_id, resolve_noised
from .settings import TraceSettings
from .store import ResultStore, canonical_settings

if TYPE_CHECKING:
    from .model import LoadedModel

ROWS = ("noised token", "final token")
MIN_EFFECT = 0.05  # prompts whose clean - corrupted p is below this are left out of averages
TARGETS = ("expected", "top1")
BACKENDS = ("local", "ray")

BatchProgress = Callable[[int, int, "PromptResult"], "bool | None"]
CellProgress = Callable[[int, int], "bool | None"]
TraceFunction = Callable[..., Trace]


@dataclass
class PromptResult:
    """One prompt of a batch: its trace (when there is one) and what happened to it."""

    index: Any
    category: str
    prompt: str
    expected: str
    subject: str
    status: str = "pending"  # pending | stored | computed | skipped | failed | cancelled
    trace: Any = None
    key: str | None = None
    message: str = ""
    seconds: float = 0.0
    settings: dict[str, Any] | None = None  # the full trace settings (with noised and target)
    worker: str = ""  # the Ray worker that traced it (backend "ray")
    worker_pid: int | None = None
    attempts: int = 0  # times it was sent to a Ray worker (more than 1: retried after a worker died)


@dataclass
class BatchResult:
    """All prompts of a batch, in prompt-set order."""

    results: list[PromptResult]
    settings: dict[str, Any]
    cancelled: bool = False
    elapsed: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    backend: str = "local"
    retried: int = 0  # prompts sent again because their Ray worker died
    workers: list[Any] = field(default_factory=list)  # distributed.WorkerStats, backend "ray"
    start_seconds: float = 0.0  # starting a local Ray instance

    def traced(self) -> list[PromptResult]:
        """The results that have a trace."""
        return [r for r in self.results if r.trace is not None]


def trace_settings(settings: TraceSettings | dict[str, Any] | None) -> dict[str, Any]:
    """Batch-wide trace settings: every ``TraceSettings`` field but the per-prompt ``target``
    (``noised`` is per prompt too and dropped if given)."""
    values = settings.to_dict() if isinstance(settings, TraceSettings) else dict(settings or {})
    for name in ("noised", "target"):
        values.pop(name, None)
    return {k: v for k, v in TraceSettings.from_dict(values).to_dict().items() if k != "target"}


def _prepare(lm: "LoadedModel", row: pd.Series, index: Any, settings: dict[str, Any], target: str,
             store: ResultStore, rows: str = "all"):
    """(PromptResult, full settings or None) for one prompt-set row; looks the key up in the store."""
    result = PromptResult(index, str(row["category"]), str(row["prompt"]), str(row["expected"]),
                          str(row.get("subject", "") or ""))
    try:
        noised = resolve_noised(lm, result.prompt, result.subject, row.get("noised"))
        target_id = expected_token_id(lm, result.prompt, result.expected) if target == "expected" else None
        computed = None if rows == "all" else resolve_rows(rows, noised, len(tokenize(lm, result.prompt)))
        full = canonical_settings({**settings, "noised": noised, "target": target_id, "rows": computed})
    except ValueError as exc:
        result.status, result.message = "skipped", str(exc)
        return result, None
    result.key, result.settings = store.key(lm, result.prompt, full), full
    return result, full


def plan_batch(lm: "LoadedModel", prompts: pd.DataFrame, settings: TraceSettings | dict[str, Any] | None = None,
               store: ResultStore | None = None, target: str = "expected", rows: str = "all") -> list[PromptResult]:
    """Every prompt's key and status without computing: ``stored`` (with its trace), ``pending``
    or ``skipped`` (with the reason). ``rows="noised_final"`` computes only the rows the category
    analysis uses (``causal.resolve_rows``)."""
    store = store or ResultStore()
    settings, target = trace_settings(settings), _check_target(target)
    out = []
    for index, row in prompts.iterrows():
        result, full = _prepare(lm, row, index, settings, target, store, rows)
        if full is not None:
            result.trace = store.get(result.key)
            result.status = "stored" if result.trace is not None else "pending"
        out.append(result)
    return out


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not '{target}'")
    return target


def run_batch(
    lm: "LoadedModel",
    prompts: pd.DataFrame,
    settings: TraceSettings | dict[str, Any] | None = None,
    store: ResultStore | None = None,
    *,
    target: str = "expected",
    progress: BatchProgress | None = None,
    prompt_progress: CellProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    trace: TraceFunction = causal_trace,
    rows: str = "all",
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    notify: Callable[[str], None] | None = None,
) -> BatchResult:
    """Trace every prompt of ``prompts`` (a prompt-set DataFrame) with one set of ``settings``.

    ``target="expected"`` traces p(first token of the expected completion); ``"top1"`` the clean
    top-1 token. Stored traces are reused and new ones stored. ``progress(done, total, result)``
    is called after each prompt and ``prompt_progress(done, total)`` within one; either returning
    False, or ``should_stop()`` returning True, cancels (finished prompts stay stored).
    ``trace`` computes one trace (``causal_trace``'s signature; tests inject a stand-in).

    ``backend="ray"``: the pending prompts go to ``workers`` Ray actors (``distributed``) on a
    local loopback instance (``address=None``) or the cluster at ``address``, ``gpus_per_worker``
    GPUs each (default: one when the cluster has GPUs and the model is on CUDA). ``progress`` is
    then called in the order prompts finish (stored and skipped ones first), ``prompt_progress``
    is not called, ``notify(text)`` hears of worker deaths and retries, and ``trace`` must be
    picklable. Same numbers as the local backend.
    """
    _check_backend(backend, workers, address, gpus_per_worker)
    started = time.perf_counter()
    store = store or ResultStore()
    plan = plan_batch(lm, prompts, settings, store, target, rows)
    stop = should_stop or (lambda: False)
    batch = BatchResult(plan, {**trace_settings(settings), "target": target, "rows": rows}, backend=backend)
    if backend == "ray":
        _run_ray(lm, batch, store, progress, stop, trace, workers, address, gpus_per_worker, notify)
    else:
        _run_local(lm, batch, store, progress, prompt_progress, stop, trace)
    batch.elapsed = time.perf_counter() - started
    batch.counts = {k: int(v) for k, v in pd.Series([r.status for r in plan], dtype=object).value_counts().items()}
    return batch


def _check_backend(backend: str, workers: int, address: str | None, gpus_per_worker: float | None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number of at least 1, not {workers!r}")
    if backend == "local" and (workers != 1 or address is not None or gpus_per_worker is not None):
        raise ValueError("workers, address and gpus_per_worker need backend='ray'")


def _run_local(lm, batch: BatchResult, store: ResultStore, progress, prompt_progress, stop, trace) -> None:
    """One prompt after another in this process, in prompt-set order."""
    plan = batch.results

    def cells(done: int, total: int) -> bool:
        if stop():
            return False
        return prompt_progress is None or prompt_progress(done, total) is not False

    for done, result in enumerate(plan, start=1):
        if result.status == "pending":
            if stop():
                batch.cancelled = True
                break
            try:
                _compute(lm, result, store, cells, trace)
            except TraceCancelled:
                result.status, result.message = "cancelled", "cancelled"
                batch.cancelled = True
                break
        if progress is not None and progress(done, len(plan), result) is False:
            batch.cancelled = True
            break


def _run_ray(lm, batch: BatchResult, store: ResultStore, progress, stop, trace, workers, address,
             gpus_per_worker, notify) -> None:
    """Stored and skipped prompts are reported first; the pending ones go to Ray workers."""
    from .distributed import run_on_ray

    plan, done = batch.results, 0
    for result in plan:
        if result.status != "pending":
            done += 1
            if progress is not None and progress(done, len(plan), result) is False:
                batch.cancelled = True
                return
    pending = [r for r in plan if r.status == "pending"]
    if not pending:
        return

    def finished(result: PromptResult) -> bool | None:
        nonlocal done
        done += 1
        return None if progress is None else progress(done, len(plan), result)

    run = run_on_ray(lm, pending, store, workers=workers, address=address, gpus_per_worker=gpus_per_worker,
                     trace=None if trace is causal_trace else trace, finished=finished, should_stop=stop,
                     notify=notify)
    batch.cancelled, batch.retried, batch.workers = run.cancelled, run.retried, run.workers
    batch.start_seconds = run.start_seconds


def _compute(lm: "LoadedModel", result: PromptResult, store: ResultStore, cells: CellProgress, trace: TraceFunction) -> None:
    """Trace one pending prompt and store it; ValueErrors mark it failed."""
    started = time.perf_counter()
    try:
        traced = trace(lm, result.prompt, progress=cells, **result.settings)
    except ValueError as exc:
        result.status, result.message = "failed", str(exc)
        return
    store.put(result.key, traced)
    result.trace, result.status = traced, "computed"
    result.seconds = time.perf_counter() - started


@dataclass
class Tally:
    """A batch's progress from its finished prompts: done, failed (or skipped as bad input),
    retried (sent again after a worker died), per-worker throughput (prompts per second of trace
    time) and ETA."""

    total: int
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    failed: int = 0
    retried: int = 0
    computed: int = 0
    per_worker: dict[str, list[float]] = field(default_factory=dict)  # label -> [prompts, seconds]

    def add(self, result: PromptResult) -> None:
        """Count one finished prompt."""
        self.done += 1
        self.failed += result.status in ("failed", "skipped")
        self.retried += result.attempts > 1
        if result.status == "computed":
            self.computed += 1
            stats = self.per_worker.setdefault(result.worker or "local", [0, 0.0])
            stats[0] += 1
            stats[1] += result.seconds

    def eta(self) -> float | None:
        """Seconds left at the rate of the prompts computed so far (None before the first)."""
        if not self.computed:
            return None
        return (time.perf_counter() - self.started) / self.computed * (self.total - self.done)

    def line(self, width: int = 20) -> str:
        """``[#####.....] 12/54 · 1 failed · 0 retried · w1 0.9/s w2 0.8/s · ETA 40 s``."""
        filled = int(width * self.done / self.total) if self.total else width
        rates = " ".join(f"{label} {n / s:.2f}/s" for label, (n, s) in sorted(self.per_worker.items()) if s > 0)
        eta = self.eta()
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}",
                 f"{self.failed} failed", f"{self.retried} retried"]
        return " · ".join(parts + ([rates] if rates else []) + ([f"ETA {eta:.0f} s"] if eta is not None else []))


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a batch table as Parquet (``.parquet``, ``.pq``) or else CSV; returns the path."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------
# Analysis


def normalised_rows(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(noised-token row, final-token row) of (p - low) / (high - low); NaN when high == low."""
    scores = np.asarray(trace.scores, dtype=np.float64)
    span = float(trace.high) - float(trace.low)
    if abs(span) < 1e-12:
        nan = np.full(scores.shape[1], np.nan)
        return nan, nan.copy()
    norm = (scores - float(trace.low)) / span
    return norm[followed_token(trace)], norm[len(trace.tokens) - 1]


def is_correct(trace: Trace) -> bool:
    """Whether the clean top-1 token is the traced target."""
    top_token, top_prob = trace.clean_top[0]
    return top_token == trace.target and abs(float(top_prob) - float(trace.high)) < 1e-6


def prompt_table(results: list[PromptResult]) -> pd.DataFrame:
    """One row per prompt: probabilities, correctness, transition layer, noised->final distance."""
    rows = []
    for r in results:
        row = {"category": r.category, "prompt": r.prompt, "expected": r.expected, "status": r.status,
               "message": r.message}
        if r.trace is not None:
            t = r.trace
            noised, final = followed_token(t), len(t.tokens) - 1
            layer = transition_layer(t)
            row.update(
                target=t.target, noised_token=t.tokens[noised], noised_index=noised, final_index=final,
                token_distance=final - noised, clean_prob=float(t.high), corrupted_prob=float(t.low),
                effect=effect(t),
                correct=is_correct(t), transition_layer=np.nan if layer is None else layer,
                n_layers=int(np.asarray(t.scores).shape[1]),
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


TABLE_COLUMNS = [
    "category", "prompt", "expected", "target", "noised_token", "noised_index", "final_index",
    "token_distance", "clean_prob", "corrupted_prob", "effect", "correct", "transition_layer", "n_layers",
    "status", "message",
]
AVERAGE_COLUMNS = ["group", "label", "row", "layer", "mean", "std", "sem", "n"]


def effect(trace: Trace) -> float:
    """How much noising lowers p(target): clean p minus corrupted p."""
    return float(trace.high) - float(trace.low)


def _selected(results: list[PromptResult], correct_only: bool, min_effect: float | None = None) -> list[PromptResult]:
    """Traced results, optionally only those the model gets right and those noise clearly hurts."""
    return [
        r for r in results
        if r.trace is not None
        and (not correct_only or is_correct(r.trace))
        and (min_effect is None or effect(r.trace) >= min_effect)
    ]


def category_rows(results: list[PromptResult], correct_only: bool = False,
                  combine_regurgitation: bool = False,
                  min_effect: float = MIN_EFFECT) -> dict[str, dict[str, np.ndarray]]:
    """Group -> row ("noised token", "final token") -> normalised rows [prompts, layers] of the
    prompts the category averages use (correct ones only when asked; noise effect at least
    ``min_effect``; groups in the study's order)."""
    stacks: dict[str, dict[str, list[np.ndarray]]] = {}
    for r in _selected(results, correct_only, min_effect):
        noised, final = normalised_rows(r.trace)
        if np.isnan(noised).all():
            continue
        group = stacks.setdefault(group_of(r.category, combine_regurgitation), {row: [] for row in ROWS})
        group[ROWS[0]].append(noised)
        group[ROWS[1]].append(final)
    return {g: {row: np.vstack(v) for row, v in stacks[g].items()} for g in ordered(stacks)}


def category_averages(results: list[PromptResult], correct_only: bool = False,
                      combine_regurgitation: bool = False, min_effect: float = MIN_EFFECT) -> pd.DataFrame:
    """Per group, row (noised token / final token) and layer: mean, std (ddof=1), sem and n of the
    normalised trace over prompts. Prompts where noise lowers p(target) by less than
    ``min_effect`` are left out (their normalisation divides by almost nothing)."""
    frames = [_average_frame(group, row, values)
              for group, by_row in category_rows(results, correct_only, combine_regurgitation, min_effect).items()
              for row, values in by_row.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=AVERAGE_COLUMNS)


def _average_frame(group: str, row: str, values: np.ndarray) -> pd.DataFrame:
    """Mean, sample std, standard error and count over prompts (axis 0) of [prompts, layers]."""
    stats = describe(values)
    return pd.DataFrame({
        "group": group, "label": group_label(group), "row": row, "layer": np.arange(values.shape[1]),
        "mean": stats["mean"], "std": stats["std"], "sem": stats["sem"], "n": values.shape[0],
    })


def category_summary(results: list[PromptResult], correct_only: bool = False,
                     combine_regurgitation: bool = False, min_effect: float = MIN_EFFECT) -> pd.DataFrame:
    """Per group, over the prompts the averages use: how many, how many the model gets right,
    mean clean p, mean and std of the transition layer, mean token distance."""
    table = prompt_table(_selected(results, False, min_effect))
    if table.empty:
        return pd.DataFrame(columns=["group", "label", "prompts", "correct", "clean_prob",
                                     "transition_layer", "transition_std", "token_distance"])
    if correct_only:
        table = table[table["correct"].astype(bool)]
    table = table.assign(group=[group_of(c, combine_regurgitation) for c in table["category"]])
    summary = table.groupby("group", sort=False).agg(
        prompts=("prompt", "size"), correct=("correct", "sum"), clean_prob=("clean_prob", "mean"),
        transition_layer=("transition_layer", "mean"), transition_std=("transition_layer", "std"),
        token_distance=("token_distance", "mean"),
    ).reset_index()
    summary.insert(1, "label", [group_label(g) for g in summary["group"]])
    return summary.set_index("group").loc[ordered(summary["group"])].reset_index()
