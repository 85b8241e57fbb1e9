"""tracing.stats against hand computations: bootstrap intervals re-done in a plain loop with the
same random draws, permutation p-values by enumerating every split, and the seed-study tables on
small prompt sets built by hand (no model)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from factory import rows_trace

from tracing import stats
from tracing.batch import PromptResult, category_averages, prompt_table

CLEAR_A = [10.0, 11.0, 12.0, 10.0, 13.0, 11.0]  # regurgitation-like: early hand-over
CLEAR_B = [20.0, 21.0, 19.0, 22.0, 20.0, 18.0]  # semantic-like: late hand-over
SAME_A = [10.0, 12.0, 14.0, 11.0, 13.0]
SAME_B = [11.0, 13.0, 12.0, 10.0, 14.0]  # the same values shuffled: no difference at all


def hand_percentile(values: list[float], q: float) -> float:
    """numpy's default ("linear") quantile, by hand."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def hand_p_value(a: list[float], b: list[float]) -> float:
    """Share of all splits of the pooled values whose |mean difference| is at least the observed."""
    pooled = a + b
    observed = abs(sum(b) / len(b) - sum(a) / len(a))
    extreme = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(a)):
        group_a = [pooled[i] for i in chosen]
        group_b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        total += 1
        extreme += abs(sum(group_b) / len(group_b) - sum(group_a) / len(group_a)) >= observed - 1e-9
    return extreme / total


# -- the resampling rules on arrays --------------------------------------------------------------


def test_clear_difference_is_significant_and_its_interval_excludes_zero():
    low, high = stats.bootstrap_difference(CLEAR_A, CLEAR_B, seed=0)
    difference = np.mean(CLEAR_B) - np.mean(CLEAR_A)
    assert 0 < low < difference < high
    assert high - low < 4  # the spread of both groups is about 1.2 layers
    p, exact = stats.permutation_p_value(CLEAR_A, CLEAR_B)
    assert exact and p == pytest.approx(2 / math.comb(12, 6))  # only the observed split and its mirror
    assert p < 0.01


def test_no_difference_is_not_significant_and_its_interval_covers_zero():
    low, high = stats.bootstrap_difference(SAME_A, SAME_B, seed=0)
    assert low < 0 < high
    p, exact = stats.permutation_p_value(SAME_A, SAME_B)
    assert exact and p == 1.0  # every split is at least as extreme as a difference of 0


def test_bootstrap_interval_equals_a_hand_loop_with_the_same_draws():
    a, b, resamples = [3.0, 5.0, 9.0, 4.0], [6.0, 7.0, 12.0], 200
    rng = np.random.default_rng(7)
    picks_a = rng.integers(0, len(a), (resamples, len(a)))
    picks_b = rng.integers(0, len(b), (resamples, len(b)))
    differences = []
    for r in range(resamples):
        mean_a = sum(a[int(i)] for i in picks_a[r]) / len(a)
        mean_b = sum(b[int(i)] for i in picks_b[r]) / len(b)
        differences.append(mean_b - mean_a)
    low, high = stats.bootstrap_difference(a, b, seed=7, resamples=resamples)
    assert low == pytest.approx(hand_percentile(differences, 0.025), abs=1e-12)
    assert high == pytest.approx(hand_percentile(differences, 0.975), abs=1e-12)
    low90, high90 = stats.bootstrap_difference(a, b, seed=7, resamples=resamples, confidence=0.9)
    assert low90 == pytest.approx(hand_percentile(differences, 0.05), abs=1e-12)
    assert low <= low90 <= high90 <= high


@pytest.mark.parametrize("a, b", [([1.0, 2.0, 4.0], [3.0, 5.0, 6.0, 7.0]),
                                  ([2.0, 2.0, 3.0], [2.0, 3.0, 3.0]),  # ties
                                  ([0.0, 1.0], [5.0, 6.0, 7.0, 8.0, 9.0]),
                                  ([7.0, 9.0, 8.0], [1.0, 2.0, 3.0, 8.5])])  # b lower: two-sided
def test_exact_permutation_p_value_equals_enumeration(a, b):
    p, exact = stats.permutation_p_value(a, b, exact=True)
    assert exact and p == pytest.approx(hand_p_value(a, b), abs=1e-12)
    sampled, exact = stats.permutation_p_value(a, b, seed=3, resamples=20_000, exact=False)
    assert not exact and sampled == pytest.approx(hand_p_value(a, b), abs=0.02)  # about 5 sd
    assert sampled > 0  # (1 + count) / (1 + resamples): never 0
    assert stats.permutation_p_value(b, a, exact=True)[0] == pytest.approx(p)  # symmetric


def test_seeded_and_reproducible():
    rng = np.random.default_rng(5)
    a, b = rng.normal(15, 3, 20), rng.normal(17, 3, 20)  # C(40, 20) splits: sampled, not exact
    first = stats.bootstrap_difference(a, b, seed=1), stats.permutation_p_value(a, b, seed=1)
    assert first == (stats.bootstrap_difference(a, b, seed=1), stats.permutation_p_value(a, b, seed=1))
    assert first[1][1] is False
    assert stats.bootstrap_difference(a, b, seed=2) != first[0]


def test_too_few_values_give_nan_and_bad_arguments_a_clear_error():
    assert all(math.isnan(v) for v in stats.bootstrap_difference([1.0], [2.0, 3.0]))
    assert math.isnan(stats.permutation_p_value([], [2.0, 3.0])[0])
    with pytest.raises(ValueError, match="resamples"):
        stats.bootstrap_difference(CLEAR_A, CLEAR_B, resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_difference(CLEAR_A, CLEAR_B, confidence=95)
    with pytest.raises(ValueError, match="prompt_table"):
        stats.compare_transitions(pd.DataFrame({"category": ["semantic"]}))


def test_bootstrap_mean_equals_a_hand_loop():
    values = np.array([[0.0, 1.0], [0.5, np.nan], [1.0, 0.0]])  # NaN left out of each mean
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 3, (50, 3))
    hand = [[np.nanmean([values[int(i), col] for i in row]) if any(not np.isnan(values[int(i), col]) for i in row)
             else np.nan for col in range(2)] for row in picks]
    low, high = stats.bootstrap_mean(values, seed=0, resamples=50)
    for col in range(2):
        column = [h[col] for h in hand if not np.isnan(h[col])]  # draws of only the NaN row: out
        assert len(column) < 50 if col == 1 else len(column) == 50
        assert low[col] == pytest.approx(hand_percentile(column, 0.025), abs=1e-12)
        assert high[col] == pytest.approx(hand_percentile(column, 0.975), abs=1e-12)


# -- on a batch's prompt table -------------------------------------------------------------------


def table_of(layers: dict[str, list[float]], **columns) -> pd.DataFrame:
    """A prompt table (the columns stats reads) with these transition layers per category."""
    rows = [{"category": c, "transition_layer": v, "effect": 0.5, "correct": True}
            for c, values in layers.items() for v in values]
    return pd.DataFrame(rows).assign(**columns)


def test_compare_transitions_pairs_in_study_order_with_none_counted():
    table = table_of({"semantic": CLEAR_B + [np.nan], "non_english": CLEAR_A, "plain_english": SAME_A})
    out = stats.compare_transitions(table)
    assert list(out.columns) == stats.COMPARISON_COLUMNS
    assert list(zip(out["a"], out["b"])) == [("non_english", "plain_english"), ("non_english", "semantic"),
                                             ("plain_english", "semantic")]
    row = out.iloc[1]
    assert row["pair"] == "Semantic recall − Non-English regurgitation"
    assert row["difference"] == pytest.approx(np.mean(CLEAR_B) - np.mean(CLEAR_A))
    assert (row["n_a"], row["n_b"], row["none_a"], row["none_b"]) == (6, 6, 0, 1)
    assert row["p_value"] == pytest.approx(hand_p_value(CLEAR_A, CLEAR_B)) and row["exact"]
    assert (row["ci_low"], row["ci_high"]) == stats.bootstrap_difference(CLEAR_A, CLEAR_B, seed=0)
    assert row["ci_low"] > 0
    # each pair draws from its own generator: the same numbers when another group is absent
    alone = stats.compare_transitions(table[table["category"] != "plain_english"])
    assert alone.iloc[0][["ci_low", "ci_high", "p_value"]].tolist() == row[["ci_low", "ci_high", "p_value"]].tolist()


def test_compare_transitions_uses_the_summary_prompts():
    table = table_of({"non_english": [1.0, 2.0, 3.0], "plain_english": [4.0, 5.0], "semantic": [9.0, 8.0, 7.0]})
    table.loc[0, "effect"] = 0.01  # below min_effect: out
    table.loc[1, "correct"] = False  # out with correct_only
    combined = stats.compare_transitions(table, combine_regurgitation=True)
    assert list(zip(combined["a"], combined["b"])) == [("regurgitation", "semantic")]
    assert combined.iloc[0]["n_a"] == 4  # 2 non-English (one left out by min_effect) + 2 plain
    assert combined.iloc[0]["difference"] == pytest.approx(8.0 - (2 + 3 + 4 + 5) / 4)
    strict = stats.compare_transitions(table, correct_only=True, combine_regurgitation=True)
    assert strict.iloc[0]["n_a"] == 3
    assert stats.compare_transitions(table, min_effect=None, combine_regurgitation=True).iloc[0]["n_a"] == 5
    intervals = stats.transition_intervals(table)
    assert list(intervals["group"]) == ["non_english", "plain_english", "semantic"]
    assert intervals["mean"].tolist() == pytest.approx([2.5, 4.5, 8.0])
    assert (intervals["ci_low"] <= intervals["mean"]).all() and (intervals["mean"] <= intervals["ci_high"]).all()


# -- bands on the averaged curves ----------------------------------------------------------------


def result(category: str, noised_row, final_row, low=0.0, high=1.0, **fields) -> PromptResult:
    trace = rows_trace(noised_row, final_row, low, high, **fields)
    return PromptResult(0, category, "p", " yes", "s", status="computed", trace=trace)


def band_set() -> list[PromptResult]:
    return [
        result("semantic", [1.0, 0.8, 0.2], [0.0, 0.4, 0.9]),
        result("semantic", [0.9, 0.5, 0.1], [0.2, 0.6, 1.0]),
        result("semantic", [1.0, 0.9, 0.6], [0.1, 0.1, 0.7]),
        result("non_english", [0.8, 0.1, 0.0], [0.3, 0.9, 1.0]),
        result("non_english", [0.6, 0.2, 0.1], [0.5, 0.8, 0.9]),
        result("non_english", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], low=0.5, high=0.52),  # effect < 0.05: out
    ]


def test_bootstrap_bands_match_the_averages_and_a_hand_loop():
    results = band_set()
    bands = stats.bootstrap_bands(results, seed=4, resamples=300)
    averages = category_averages(results)
    assert list(bands.columns) == stats.BAND_COLUMNS
    keys = ["group", "row", "layer"]
    merged = averages.merge(bands, on=keys, suffixes=("", "_band"))
    assert len(merged) == len(averages) == len(bands) == 2 * 2 * 3
    np.testing.assert_allclose(merged["mean_band"], merged["mean"])
    assert (merged["n_band"] == merged["n"]).all()
    assert (bands["ci_low"] <= bands["mean"] + 1e-12).all() and (bands["mean"] <= bands["ci_high"] + 1e-12).all()
    # by hand for the semantic group: prompts resampled together for both rows
    semantic = [r for r in results if r.category == "semantic"]
    rows = {"noised token": [r.trace.scores[1] for r in semantic], "final token": [r.trace.scores[-1] for r in semantic]}
    picks = np.random.default_rng(4).integers(0, 3, (300, 3))
    for row, curves in rows.items():
        for layer in range(3):
            means = [sum(curves[int(i)][layer] for i in pick) / 3 for pick in picks]
            got = bands[(bands["group"] == "semantic") & (bands["row"] == row) & (bands["layer"] == layer)].iloc[0]
            assert got["ci_low"] == pytest.approx(hand_percentile(means, 0.025), abs=1e-12)
            assert got["ci_high"] == pytest.approx(hand_percentile(means, 0.975), abs=1e-12)


def test_bands_and_comparison_on_results_follow_the_filters():
    results = band_set() + [result("semantic", [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], correct=False)]
    assert stats.bootstrap_bands(results, correct_only=True)["n"].max() == 3
    assert stats.bootstrap_bands(results)["n"].max() == 4
    assert stats.bootstrap_bands([], seed=0).empty
    comparison = stats.compare_transitions(prompt_table(results))
    assert list(comparison["pair"]) == ["Semantic recall − Non-English regurgitation"]
    assert comparison.iloc[0]["n_a"] == 2  # the low-effect prompt is left out
