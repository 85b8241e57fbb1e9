"""Statistics for the seed study's claim: do categories hand over to the final token at different
layers? (numpy only, seeded and reproducible; prompts are the unit that is resampled.)

- ``compare_transitions(table)``: for each pair of groups, the difference in mean transition layer
  with a percentile-bootstrap confidence interval and a two-sided permutation-test p-value.
- ``transition_intervals(table)``: each group's mean transition layer with its bootstrap interval.
- ``bootstrap_bands(results)``: percentile-bootstrap bands on the per-layer averaged normalised
  curves that ``tracing.batch.category_averages`` draws.

Prompts are selected exactly as ``batch.category_summary`` / ``category_averages`` select them
(``min_effect``, ``correct_only``, ``combine_regurgitation``). A prompt whose transition layer is
None (the final token never takes over, shown as NaN in ``prompt_table``) is left out of the means
and counted in ``none_a`` / ``none_b`` / ``none``.

Every pair (and group) draws from its own ``numpy.random.default_rng(seed)``, so its numbers depend
only on the seed and its own prompts, not on which other groups are present.
"""

from __future__ import annotations

import itertools
import math
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pandas as pd

from .batch import MIN_EFFECT, ROWS, category_rows
from .categories import group_label, group_of, ordered

if TYPE_CHECKING:
    from .batch import PromptResult

CONFIDENCE = 0.95
RESAMPLES = 10_000
BAND_RESAMPLES = 2_000
COMPARISON_COLUMNS = ["a", "b", "label_a", "label_b", "pair", "mean_a", "mean_b", "difference",
                      "ci_low", "ci_high", "p_value", "exact", "n_a", "n_b", "none_a", "none_b"]
INTERVAL_COLUMNS = ["group", "label", "mean", "ci_low", "ci_high", "n", "none"]
BAND_COLUMNS = ["group", "label", "row", "layer", "mean", "ci_low", "ci_high", "n"]
_TIE = 1e-9  # permuted differences within this of the observed one count as "as extreme"


# ---------------------------------------------------------------------------------------------
# The three resampling rules (on plain arrays)


def _check(resamples: int, confidence: float) -> None:
    if not isinstance(resamples, (int, np.integer)) or not 1 <= resamples <= 1_000_000:
        raise ValueError(f"resamples must be an integer from 1 to 1,000,000, not {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence!r}")


def _interval(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 (numpy's default linear interpolation); NaN resamples (a
    draw of only NaN values) are left out."""
    tail = (1 - confidence) / 2
    with _quiet():
        return np.nanquantile(values, tail, axis=0), np.nanquantile(values, 1 - tail, axis=0)


def bootstrap_difference(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = RESAMPLES,
                         confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean(b) - mean(a): each group resampled with replacement
    on its own. ``a`` [n_a], ``b`` [n_b]; draws ``rng.integers(0, n_a, (resamples, n_a))`` then the
    same for b, from ``default_rng(seed)``. (NaN, NaN) with fewer than two values in a group."""
    _check(resamples, confidence)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means_a, means_b = _resampled_means(a, rng, resamples), _resampled_means(b, rng, resamples)
    low, high = _interval(means_b - means_a, confidence)
    return float(low), float(high)


def permutation_p_value(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = RESAMPLES,
                        exact: bool | None = None) -> tuple[float, bool]:
    """Two-sided permutation test of "a and b come from one distribution" with the statistic
    |mean(b) - mean(a)|: (p-value, whether it was exact).

    Exact (every split of the pooled values into groups of n_a and n_b, p = share at least as
    extreme) when ``exact`` is True, or when None and there are at most ``resamples`` splits;
    otherwise ``resamples`` random relabellings from ``default_rng(seed)`` with
    p = (1 + as extreme) / (1 + resamples), never 0. NaN with an empty group."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan, False
    pooled, n_a = np.concatenate([a, b]), len(a)
    observed = abs(b.mean() - a.mean())
    splits = math.comb(len(pooled), n_a)
    if exact or (exact is None and splits <= resamples):
        if splits > 5_000_000:
            raise ValueError(f"{splits:,} splits are too many to enumerate: use exact=False")
        in_a = np.zeros((splits, len(pooled)), dtype=bool)
        for i, chosen in enumerate(itertools.combinations(range(len(pooled)), n_a)):
            in_a[i, list(chosen)] = True
        diffs = _split_differences(pooled, in_a, n_a)
        return float(np.mean(diffs >= observed - _TIE)), True
    _check(resamples, CONFIDENCE)
    rng = np.random.default_rng(seed)
    diffs = np.concatenate([_relabelled(pooled, n_a, rng, rows) for rows in _chunks(resamples, len(pooled))])
    return float((1 + np.sum(diffs >= observed - _TIE)) / (1 + resamples)), False


def _split_differences(pooled: np.ndarray, in_a: np.ndarray, n_a: int) -> np.ndarray:
    """|mean(rest) - mean(chosen)| for each boolean row ``in_a`` [splits, n]."""
    total, n_b = pooled.sum(), len(pooled) - n_a
    sum_a = in_a.astype(np.float64) @ pooled
    return np.abs((total - sum_a) / n_b - sum_a / n_a)


def bootstrap_mean(values: np.ndarray, seed: int = 0, resamples: int = RESAMPLES,
                   confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap interval of the mean over axis 0 of ``values`` [n, ...] (rows
    resampled with replacement, NaNs left out of each mean, and resamples of only NaNs left out of
    the interval): (low, high), each [...]. NaN with fewer than two rows."""
    _check(resamples, confidence)
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan.copy()
    means = _resampled_means(values, np.random.default_rng(seed), resamples)
    return _interval(means, confidence)


CHUNK = 2_000_000  # values per chunk of resamples (bounds memory on large sets)


def _chunks(resamples: int, per_resample: int) -> list[int]:
    """Resamples per chunk: one chunk unless ``resamples * per_resample`` exceeds ``CHUNK``."""
    step = max(1, CHUNK // max(1, per_resample))
    return [min(step, resamples - start) for start in range(0, resamples, step)]


def _resampled_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means over axis 0 of ``values`` [n, ...] resampled with replacement: [resamples, ...].
    Each chunk draws ``rng.integers(0, n, (rows, n))`` (NaNs left out of each mean)."""
    n = len(values)
    out = []
    for rows in _chunks(resamples, values.size):
        picks = rng.integers(0, n, (rows, n))
        with _quiet():
            out.append(np.nanmean(values[picks], axis=1))
    return np.concatenate(out)


def _relabelled(pooled: np.ndarray, n_a: int, rng: np.random.Generator, rows: int) -> np.ndarray:
    """|mean(b) - mean(a)| for ``rows`` random relabellings (``rng.permuted`` of each row)."""
    shuffled = rng.permuted(np.tile(pooled, (rows, 1)), axis=1)
    return np.abs(shuffled[:, n_a:].mean(axis=1) - shuffled[:, :n_a].mean(axis=1))


@contextmanager
def _quiet() -> Iterator[None]:
    """No "mean of empty slice" warnings (an all-NaN column is NaN, as describe() says)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ---------------------------------------------------------------------------------------------
# On the batch's tables and results


def _transitions(table: pd.DataFrame, correct_only: bool, combine_regurgitation: bool,
                 min_effect: float | None) -> dict[str, np.ndarray]:
    """Group -> transition layers [prompts] (NaN = None) of the prompts the summary uses."""
    missing = {"category", "transition_layer", "effect", "correct"} - set(table.columns)
    if missing:
        raise ValueError(f"the prompt table lacks column(s) {', '.join(sorted(missing))} "
                         "(use tracing.batch.prompt_table)")
    keep = pd.to_numeric(table["effect"], errors="coerce").notna()
    if min_effect is not None:
        keep &= pd.to_numeric(table["effect"], errors="coerce") >= min_effect
    if correct_only:
        keep &= table["correct"].fillna(False).astype(bool)
    chosen = table[keep]
    groups = [group_of(c, combine_regurgitation) for c in chosen["category"]]
    layers = pd.to_numeric(chosen["transition_layer"], errors="coerce").to_numpy(dtype=np.float64)
    return {g: layers[[i for i, x in enumerate(groups) if x == g]] for g in ordered(groups)}


def transition_intervals(table: pd.DataFrame, *, correct_only: bool = False,
                         combine_regurgitation: bool = False, min_effect: float | None = MIN_EFFECT,
                         seed: int = 0, resamples: int = RESAMPLES,
                         confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group (study order): mean transition layer with its percentile-bootstrap interval.

    ``table``: ``tracing.batch.prompt_table(results)``. Returns ``INTERVAL_COLUMNS``: ``n``
    prompts with a transition layer, ``none`` prompts without one (left out)."""
    rows = []
    for group, layers in _transitions(table, correct_only, combine_regurgitation, min_effect).items():
        known = layers[~np.isnan(layers)]
        low, high = bootstrap_mean(known[:, None], seed, resamples, confidence) if len(known) else (
            np.array([np.nan]), np.array([np.nan]))
        rows.append({"group": group, "label": group_label(group),
                     "mean": float(known.mean()) if len(known) else math.nan,
                     "ci_low": float(low[0]), "ci_high": float(high[0]),
                     "n": len(known), "none": int(np.isnan(layers).sum())})
    return pd.DataFrame(rows, columns=INTERVAL_COLUMNS)


def compare_transitions(table: pd.DataFrame, *, correct_only: bool = False,
                        combine_regurgitation: bool = False, min_effect: float | None = MIN_EFFECT,
                        seed: int = 0, resamples: int = RESAMPLES,
                        confidence: float = CONFIDENCE) -> pd.DataFrame:
    """The difference in mean transition layer between every pair of groups.

    ``table``: ``tracing.batch.prompt_table(results)``; prompts are selected as
    ``category_summary`` selects them. For groups a before b in the study's order (regurgitation
    first, semantic last), ``difference = mean_b - mean_a`` (positive: b hands over later), its
    percentile-bootstrap interval (``ci_low``, ``ci_high``; ``bootstrap_difference``) and the
    two-sided permutation p-value (``p_value``, ``exact``; ``permutation_p_value``). One row per
    pair, ``COMPARISON_COLUMNS``; ``pair`` reads "<label b> − <label a>"."""
    _check(resamples, confidence)
    groups = _transitions(table, correct_only, combine_regurgitation, min_effect)
    rows = []
    for a, b in itertools.combinations(groups, 2):
        va, vb = groups[a][~np.isnan(groups[a])], groups[b][~np.isnan(groups[b])]
        low, high = bootstrap_difference(va, vb, seed, resamples, confidence)
        p, exact = permutation_p_value(va, vb, seed, resamples)
        mean_a = float(va.mean()) if len(va) else math.nan
        mean_b = float(vb.mean()) if len(vb) else math.nan
        rows.append({
            "a": a, "b": b, "label_a": group_label(a), "label_b": group_label(b),
            "pair": f"{group_label(b)} − {group_label(a)}", "mean_a": mean_a, "mean_b": mean_b,
            "difference": mean_b - mean_a, "ci_low": low, "ci_high": high, "p_value": p, "exact": exact,
            "n_a": len(va), "n_b": len(vb), "none_a": int(np.isnan(groups[a]).sum()),
            "none_b": int(np.isnan(groups[b]).sum()),
        })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def bootstrap_bands(results: list["PromptResult"], *, correct_only: bool = False,
                    combine_regurgitation: bool = False, min_effect: float = MIN_EFFECT, seed: int = 0,
                    resamples: int = BAND_RESAMPLES, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Percentile-bootstrap bands on the per-layer mean normalised curves of each group.

    Prompts are resampled with replacement within a group; both rows of a prompt go together
    (one draw per group, from ``default_rng(seed)``). Returns ``BAND_COLUMNS``, one row per
    (group, row, layer), in ``category_averages``' order; ``mean`` equals its mean."""
    frames = []
    for group, by_row in category_rows(results, correct_only, combine_regurgitation, min_effect).items():
        both = np.stack([by_row[row] for row in ROWS], axis=1)  # [prompts, rows, layers]
        low, high = bootstrap_mean(both, seed, resamples, confidence)
        with _quiet():
            mean = np.nanmean(both, axis=0)
        for i, row in enumerate(ROWS):
            frames.append(pd.DataFrame({
                "group": group, "label": group_label(group), "row": row, "layer": np.arange(both.shape[2]),
                "mean": mean[i], "ci_low": low[i], "ci_high": high[i], "n": both.shape[0],
            }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BAND_COLUMNS)
