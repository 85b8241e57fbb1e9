"""The analysis rules every view shares: which noised token a trace is followed by, where the
final token takes over (the seed study's transition layer), and one summary statistic.

The trace page, the category table and the CLI all call these; none has its own variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

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
