"""The analysis rules every view shares: which noised token a trace is followed by, where the
final token takes over (the seed study's transition layer), ROME's six token positions, how two
traces are aligned for an A/B difference, and one summary statistic.

The trace page, the category table and the CLI all call these; none has its own variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd

from .settings import lower_is_better

if TYPE_CHECKING:
    from .causal import Trace


def handover_layer(noised_row: Sequence[float], final_row: Sequence[float],
                   lower_is_better: bool = False) -> int | None:
    """First layer from which restoring the final token beats restoring the noised token at every
    later layer (the seed study's "transition"); None when the final token does not win at the
    last layer. Both rows are one value per layer of the same metric."""
    noised, final = np.asarray(noised_row, dtype=np.float64), np.asarray(final_row, dtype=np.float64)
    beats = final < noised if lower_is_better else final > noised
    if not len(beats) or not beats[-1]:
        return None
    losing = np.flatnonzero(~beats)
    return int(losing[-1] + 1) if len(losing) else 0


def followed_token(trace: "Trace", metric: str = "prob") -> int:
    """The noised token a trace is summarised by: of the noised tokens other than the final one,
    the one whose restoration helps most on average over layers (with one noised token, that
    token). ValueError when only the final token is noised."""
    candidates = [i for i in trace.noised if i != len(trace.tokens) - 1]
    if not candidates:
        raise ValueError("Only the final token is noised: there is no noised token to compare.")
    means = trace.metric(metric)[candidates].mean(axis=1)
    return candidates[int(means.argmin() if lower_is_better(metric) else means.argmax())]


def transition_layer(trace: "Trace", metric: str = "prob", token: int | None = None) -> int | None:
    """``handover_layer`` of the followed noised token's row and the final token's row; None when
    the final token never takes over, or is itself noised. ``token`` overrides the noised token."""
    if trace.last_token_noised or not trace.noised:
        return None
    values = trace.metric(metric)
    noised = values[followed_token(trace, metric) if token is None else token]
    return handover_layer(noised, values[-1], lower_is_better(metric))


def describe(values: np.ndarray, axis: int = 0) -> dict[str, np.ndarray | int]:
    """Mean, sample standard deviation (ddof=1), standard error and count over ``axis``, NaNs
    left out. With fewer than two values the std and sem are NaN (undefined), never 0.

    Returns ``{"mean", "std", "sem"}`` arrays with ``axis`` removed, and ``"n"`` (count of
    non-NaN values, an array of the same shape).
    """
    values = np.asarray(values, dtype=np.float64)
    n = np.sum(~np.isnan(values), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(values, axis=axis)
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        deviations = np.where(np.isnan(values), 0.0, values - np.expand_dims(mean, axis))
        var = np.where(n > 1, np.sum(deviations ** 2, axis=axis) / np.maximum(n - 1, 1), np.nan)
        std = np.sqrt(var)
        sem = std / np.sqrt(np.maximum(n, 1))
    return {"mean": mean, "std": std, "sem": sem, "n": n}


POSITION_LABELS = {"first_subject": "first noised token", "middle_subject": "middle noised tokens",
                   "last_subject": "last noised token", "first_after": "first token after",
                   "further": "further tokens", "last": "last token"}  # ROME's six rows


def position_groups(subject: list[int], n_tokens: int) -> dict[str, list[int]]:
    """Token indices of each of ROME's six rows for a prompt of ``n_tokens`` tokens whose subject
    covers ``subject`` (contiguous indices). ValueError when the subject ends the prompt."""
    first, last = min(subject), max(subject)
    if last >= n_tokens - 1:
        raise ValueError("the subject ends the prompt: no token follows it")
    return {
        "first_subject": [first], "middle_subject": list(range(first + 1, last)), "last_subject": [last],
        "first_after": [last + 1], "further": list(range(last + 2, n_tokens - 1)), "last": [n_tokens - 1],
    }


def ab_difference(a: "Trace", b: "Trace", metric: str = "prob",
                  token_text: Callable[[str], str] = str) -> pd.DataFrame:
    """Trace B minus trace A, cell by cell, in one metric: long, one row per (row, layer) with
    columns ``row`` (label), ``order``, ``layer``, ``a``, ``b``, ``difference`` and ``aligned``.

    Prompts with as many tokens are aligned token by token (``aligned="token"``: rows labelled
    with both tokens when they differ). Otherwise they are aligned on ROME's six positions
    (``aligned="position"``: the mean over each position's tokens; a position one prompt lacks
    is left out). ValueError when the traces have different layer counts, or when a prompt
    ends with its noised tokens (no position to align on)."""
    if a.n_layers != b.n_layers:
        raise ValueError(f"A has {a.n_layers} layers and B {b.n_layers}: compare traces of one model.")
    va, vb = a.metric(metric), b.metric(metric)
    if len(a.tokens) == len(b.tokens):
        shown = [(token_text(x), token_text(y)) for x, y in zip(a.tokens, b.tokens)]
        rows = [(f"{i} {x}" if x == y else f"{i} {x} / {y}", va[i], vb[i]) for i, (x, y) in enumerate(shown)]
        aligned = "token"
    else:
        ga = position_groups(list(a.noised), len(a.tokens))
        gb = position_groups(list(b.noised), len(b.tokens))
        rows = [(POSITION_LABELS[name], va[ga[name]].mean(axis=0), vb[gb[name]].mean(axis=0))
                for name in POSITION_LABELS if ga[name] and gb[name]]
        aligned = "position"
    layers = np.arange(a.n_layers)
    parts = [pd.DataFrame({"row": label, "order": i, "layer": layers, "a": ra.astype(float),
                           "b": rb.astype(float), "difference": (rb - ra).astype(float)})
             for i, (label, ra, rb) in enumerate(rows)]
    return pd.concat(parts, ignore_index=True).assign(aligned=aligned)
