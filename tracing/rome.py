"""Average indirect effects by token position over a fact set (ROME, Meng et al. 2022, Fig. 2).

Every prompt of a set is traced with *all* its subject tokens noised (ROME's rule, not the seed
study's last subject token) and the expected answer as the target. Each trace's cells are
grouped by token position into ROME's six rows (its ``average_causal_effects`` notebook):

=================  ===========================================================================
``first_subject``  the first subject token
``middle_subject`` the subject tokens between the first and the last (prompts with >= 3 only)
``last_subject``   the last subject token (a one-token subject is both first and last)
``first_after``    the token just after the subject (it may be the last token: then it counts
                   in both rows, as in ROME's notebook)
``further``        the tokens between the first after and the last (prompts that have them)
``last``           the last token of the prompt
=================  ===========================================================================

A prompt's indirect effect at (position, layer) is p(restored) - p(corrupted) of the cell, and
for ``middle_subject`` and ``further`` its mean over those tokens (ROME's notebook pools these
tokens over prompts instead; we average per prompt first, so each prompt weighs the same).
The AIE is the mean over prompts; ``ci_low`` / ``ci_high`` are a two-sided 95 % Student-t
interval over prompts (mean +- t(0.975, n - 1) * sd / sqrt(n), sd with ddof = 1; NaN for n < 2).

``noise=None`` is ROME's noise level: 3 x the standard deviation of the token embeddings of every
subject token of the set (all entries together, ddof = 1), rounded to 4 significant digits so that
the result-store keys are stable. Traces go through the result store (``batch.run_batch``), so a
re-run computes only what is missing. The hidden kind uses ROME's ``convention="output"`` by
default (column l restores the state leaving block l).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch

from . import causal
from .analysis import describe, position_groups
from .batch import BatchProgress, CellProgress, plan_batch, run_batch
from .model.runner import Runner
from .model.tokens import subject_positions, tokenize
from .prompts import model_top1
from .store import ResultStore

if TYPE_CHECKING:
    from .causal import Trace
    from .model import LoadedModel

POSITIONS = ("first_subject", "middle_subject", "last_subject", "first_after", "further", "last")
POSITION_LABELS = {
    "first_subject": "First subject token", "middle_subject": "Middle subject tokens",
    "last_subject": "Last subject token", "first_after": "First subsequent token",
    "further": "Further tokens", "last": "Last token",
}
COLUMNS = ["position", "layer", "aie", "ci_low", "ci_high", "n"]
NOISE_FACTOR = 3.0  # ROME: noise = 3 x the std of the subject embeddings
CONFIDENCE = 0.95
ROME_CONVENTION = "output"


# ---------------------------------------------------------------------------------------------
# Noise level


def rome_noise(lm: "LoadedModel", prompts: pd.DataFrame, factor: float = NOISE_FACTOR) -> float:
    """ROME's noise level: ``factor`` x the std (ddof=1, over all entries) of the token
    embeddings [n_subject_tokens, d] of every subject token of the set (as tokenized in its
    prompt), rounded to 4 significant digits. Prompts whose subject is missing are left out."""
    runner, chunks = Runner(lm), []
    with torch.inference_mode():
        for prompt, subject in zip(prompts["prompt"], prompts["subject"]):
            try:
                ids = tokenize(lm, str(prompt))
                positions = subject_positions(lm, str(prompt), str(subject or ""), "all")
            except ValueError:
                continue
            emb = runner.token_embeddings(torch.tensor([ids], device=lm.device))[0, positions]
            chunks.append(emb.double().cpu())
    if not chunks:
        raise ValueError("No prompt of the set has its subject in the prompt: cannot set ROME's noise level.")
    values = torch.cat(chunks).flatten()
    if values.numel() < 2:
        raise ValueError("One embedding entry is not enough for a standard deviation.")
    return float(f"{factor * float(values.std()):.4g}")


# ---------------------------------------------------------------------------------------------
# Position groups and per-prompt effects


def prompt_effects(trace: "Trace") -> dict[str, np.ndarray | None]:
    """Per position, the prompt's indirect effect [n_layers]: p(restored) - p(corrupted), the mean
    over the position's tokens; None for a position the prompt does not have."""
    scores = np.asarray(trace.scores, dtype=np.float64) - float(trace.low)
    groups = position_groups(list(trace.noised), len(trace.tokens))
    return {name: scores[rows].mean(axis=0) if rows else None for name, rows in groups.items()}


# ---------------------------------------------------------------------------------------------
# Confidence intervals (no scipy)


def _t_cdf(x: float, df: int) -> float:
    """Student-t cumulative distribution for x >= 0 (Simpson's rule on the density)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    steps = 2000
    h = x / steps
    total = 0.0
    for i in range(steps + 1):
        u = i * h
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += weight * math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p >= 0.5) of Student's t with ``df`` degrees of freedom (bisection on
    the numerically integrated CDF; t(0.975, 4) = 2.776, t(0.975, 30) = 2.042)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 <= p < 1 and df >= 1")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def confidence_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, np.ndarray]:
    """Mean, Student-t interval bounds and count over prompts (axis 0) of [n_prompts, n_layers]."""
    stats = describe(values)
    n = int(np.max(stats["n"])) if np.size(stats["n"]) else 0
    t = t_quantile(0.5 + confidence / 2, n - 1) if n >= 2 else math.nan
    half = t * stats["sem"]
    return {"mean": stats["mean"], "low": stats["mean"] - half, "high": stats["mean"] + half, "n": stats["n"]}


def aie_table(effects: list[dict[str, np.ndarray | None]], n_layers: int) -> pd.DataFrame:
    """The AIE table (``COLUMNS``, six positions x ``n_layers`` rows) from per-prompt effects."""
    frames = []
    for position in POSITIONS:
        rows = [e[position] for e in effects if e.get(position) is not None]
        if rows:
            ci = confidence_interval(np.vstack(rows))
            values = dict(aie=ci["mean"], ci_low=ci["low"], ci_high=ci["high"], n=len(rows))
        else:
            values = dict(aie=np.nan, ci_low=np.nan, ci_high=np.nan, n=0)
        frames.append(pd.DataFrame({"position": position, "layer": np.arange(n_layers), **values}))
    table = pd.concat(frames, ignore_index=True)[COLUMNS]
    table["n"] = table["n"].astype(int)
    return table


# ---------------------------------------------------------------------------------------------
# The fact set


def _check_frame(prompts: pd.DataFrame) -> None:
    if not isinstance(prompts, pd.DataFrame):
        raise ValueError("prompts must be a prompt-set DataFrame (tracing.prompts.load_prompt_set)")
    missing = [c for c in ("prompt", "subject", "expected") if c not in prompts.columns]
    if missing:
        raise ValueError(f"the prompt set lacks the column(s) {', '.join(missing)}")
    if prompts.empty:
        raise ValueError("the prompt set is empty")


def correct_mask(lm: "LoadedModel", prompts: pd.DataFrame) -> pd.Series:
    """Per prompt (same index), whether the model's clean top-1 token is the expected first token."""
    _check_frame(prompts)
    return model_top1(lm, prompts)["correct"].astype(bool)


def prepare_facts(lm: "LoadedModel", prompts: pd.DataFrame, correct_only: bool = True,
                  correct: pd.Series | None = None) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(the prompts to trace, with ``noised`` = every subject token; (prompt, reason) of the
    others). ``correct_only`` keeps the prompts whose clean top-1 token is the expected one
    (``correct``: that mask, ``correct_mask``'s, when already known)."""
    _check_frame(prompts)
    keep, noised, skipped = [], [], []
    for index, row in prompts.iterrows():
        prompt, subject = str(row["prompt"]), str(row["subject"] or "")
        try:
            positions = subject_positions(lm, prompt, subject, "all")
            position_groups(positions, len(tokenize(lm, prompt)))
        except ValueError as exc:
            skipped.append((prompt, str(exc)))
            continue
        keep.append(index)
        noised.append(positions)
    frame = prompts.loc[keep].copy()
    frame["noised"] = pd.Series(noised, index=frame.index, dtype=object)
    if correct_only and len(frame):
        correct = correct_mask(lm, frame) if correct is None else correct.loc[frame.index].astype(bool)
        skipped += [(p, "the model's top-1 token is not the expected one") for p in frame.loc[~correct, "prompt"]]
        frame = frame[correct]
    return frame, skipped


def fact_settings(kind: str = "hidden", noise: float = 0.1, samples: int = 10, seed: int = 0, window: int = 10,
                  sever: str | None = None, convention: str = ROME_CONVENTION) -> dict[str, Any]:
    """The batch trace settings of a ROME average (``sever`` only when given)."""
    settings = dict(kind=kind, noise=float(noise), noise_mode="absolute", corruption="gaussian",
                    samples=samples, seed=seed, window=window, convention=convention)
    if sever is not None:
        settings["sever"] = sever
    return settings


def plan_facts(lm: "LoadedModel", prompts: pd.DataFrame, kind: str = "hidden", noise: float | None = None,
               samples: int = 10, seed: int = 0, window: int = 10, sever: str | None = None,
               correct_only: bool = True, store: ResultStore | None = None,
               convention: str = ROME_CONVENTION, correct: pd.Series | None = None) -> dict[str, Any]:
    """What ``average_indirect_effects`` would do, without tracing: ``frame``, ``skipped``,
    ``noise`` (the value used), ``settings`` and the batch ``plan`` (stored / pending)."""
    frame, skipped = prepare_facts(lm, prompts, correct_only, correct)
    value = rome_noise(lm, prompts) if noise is None else float(noise)
    settings = fact_settings(kind, value, samples, seed, window, sever, convention)
    plan = plan_batch(lm, frame, settings, store or ResultStore(), "expected") if len(frame) else []
    return dict(frame=frame, skipped=skipped, noise=value, noise_rule="given" if noise is not None else
                f"{NOISE_FACTOR:g} x std of the subject-token embeddings", settings=settings, plan=plan)


def average_indirect_effects(
    lm: "LoadedModel",
    prompts: pd.DataFrame,
    kind: str = "hidden",
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    window: int = 10,
    sever: str | None = None,
    correct_only: bool = True,
    progress: BatchProgress | None = None,
    store: ResultStore | None = None,
    *,
    prompt_progress: CellProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    convention: str = ROME_CONVENTION,
    correct: pd.Series | None = None,
    stored_only: bool = False,
    batch_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """ROME's average indirect effect of restoring each (position, layer) over a fact set.

    Returns ``COLUMNS`` (``position`` in ``POSITIONS`` order, ``layer`` 0..L-1, ``aie``,
    ``ci_low``, ``ci_high``: 95 % Student-t interval, ``n``: prompts in that row). ``attrs``:
    ``noise`` (the value used), ``noise_rule``, ``kind``, ``settings``, ``prompts`` (rows of the
    set), ``used`` (prompts averaged), ``skipped`` ((prompt, reason) pairs), ``counts`` (batch
    statuses), ``high`` / ``low`` / ``total_effect`` (means over used prompts), ``ci``,
    ``cancelled``, ``elapsed``. ``progress(done, total, PromptResult)`` after each prompt and
    ``prompt_progress(done, total)`` within one (either returning False cancels, as does
    ``should_stop()``); a cancelled run averages the prompts finished so far. ``convention``:
    ROME's ``"output"`` by default (hidden kind). ``correct``: ``correct_mask`` when already
    known. ``stored_only``: average the stored traces, computing none. ``batch_options``: more
    ``run_batch`` keywords, e.g. ``backend="ray", workers=2`` (docs/CLUSTER.md).
    """
    started = time.perf_counter()
    store = store or ResultStore()
    planned = plan_facts(lm, prompts, kind, noise, samples, seed, window, sever, correct_only, store, convention,
                         correct)
    if not len(planned["frame"]):
        raise ValueError("No prompt of the set can be averaged: "
                         + "; ".join(f"{p!r}: {why}" for p, why in planned["skipped"][:5]))
    stop = (lambda: True) if stored_only else should_stop
    # causal.causal_trace is looked up now: tests may swap the engine
    result = run_batch(lm, planned["frame"], planned["settings"], store, target="expected", progress=progress,
                       prompt_progress=prompt_progress, should_stop=stop, trace=causal.causal_trace,
                       **dict(batch_options or {}))
    traced = result.traced()
    skipped = planned["skipped"] + [(r.prompt, r.message) for r in result.results if r.status in ("failed", "skipped")]
    table = aie_table([prompt_effects(r.trace) for r in traced], lm.n_layers)
    high = np.array([float(r.trace.high) for r in traced])
    low = np.array([float(r.trace.low) for r in traced])
    table.attrs.update(
        noise=planned["noise"], noise_rule=planned["noise_rule"], kind=kind, settings=planned["settings"],
        prompts=len(prompts), used=len(traced), skipped=skipped, counts=dict(result.counts),
        high=float(high.mean()) if len(high) else math.nan, low=float(low.mean()) if len(low) else math.nan,
        total_effect=float((high - low).mean()) if len(high) else math.nan,
        ci=f"{CONFIDENCE:.0%} Student t over prompts", cancelled=result.cancelled and not stored_only,
        pending=sum(r.status in ("pending", "cancelled") for r in result.results),
        elapsed=time.perf_counter() - started, model=lm.name, correct_only=correct_only,
    )
    return table


def peaks(table: pd.DataFrame) -> pd.DataFrame:
    """Per position: the layer of the largest AIE, the AIE, its interval and n."""
    data = table.dropna(subset=["aie"])
    if data.empty:
        return pd.DataFrame(columns=COLUMNS)
    best = data.loc[data.groupby("position", sort=False)["aie"].idxmax()]
    order = {p: i for i, p in enumerate(POSITIONS)}
    return best.sort_values("position", key=lambda s: s.map(order)).reset_index(drop=True)[COLUMNS]


def run_card(table: pd.DataFrame, lm: "LoadedModel", source: str = "", prompts: pd.DataFrame | None = None
             ) -> dict[str, Any]:
    """Everything needed to reproduce an AIE table: model, prompt set (name and sha256 of its CSV),
    settings, the noise used and its rule, counts, the interval method and package versions."""
    import hashlib
    from datetime import datetime, timezone

    from .prompts import prompt_set_to_csv
    from .runcard import package_versions
    from .store import model_identity

    a = table.attrs
    digest = hashlib.sha256(prompt_set_to_csv(prompts).encode()).hexdigest() if prompts is not None else None
    return {
        "format": "causal-tracing ROME averages", "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_identity(lm), "prompt_set": source, "prompt_set_sha256": digest,
        "settings": {**a.get("settings", {}), "target": "expected", "noised": "all subject tokens",
                     "correct_only": a.get("correct_only")},
        "noise": a.get("noise"), "noise_rule": a.get("noise_rule"), "prompts": a.get("prompts"),
        "used": a.get("used"), "left_out": len(a.get("skipped", [])), "high": a.get("high"), "low": a.get("low"),
        "total_effect": a.get("total_effect"), "interval": a.get("ci"), "positions": dict(POSITION_LABELS),
        "packages": package_versions(),
    }
