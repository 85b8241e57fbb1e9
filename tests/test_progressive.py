"""Progressive exact traces: ``causal_trace(..., on_rows=...)`` delivers every cell once, most
informative rows first, and changes no number."""

from __future__ import annotations

import numpy as np
import pytest

import tracing
from tracing.causal import RowBlock, causal_trace, token_order

from conftest import FAMILIES

EIFFEL = "The Eiffel Tower is located in the city of"
NOISED = [1, 2]


def collect(blocks: list[RowBlock], shape: tuple[int, int], metric: str = "prob") -> tuple[np.ndarray, np.ndarray]:
    """(cells assembled from the blocks, NaN where none came; how often each cell came)."""
    cells, seen = np.full(shape, np.nan), np.zeros(shape, dtype=int)
    for block in blocks:
        for layer, value in zip(block.layers, block.values[metric]):
            cells[block.token, layer] = value
            seen[block.token, layer] += 1
    return cells, seen


def test_token_order_puts_noised_and_final_rows_first():
    assert token_order(6, [3, 1]) == [1, 3, 5, 0, 2, 4]
    assert token_order(4, [3]) == [3, 0, 1, 2]
    assert token_order(3, []) == [2, 0, 1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["hidden", "mlp"])
def test_every_cell_once_and_bit_identical(tiny, family, kind):
    lm = tiny(family)
    plain = causal_trace(lm, EIFFEL, NOISED, kind=kind, samples=2, window=2, noise=0.5, token_rows_per_batch=7)
    blocks: list[RowBlock] = []
    progressive = causal_trace(lm, EIFFEL, NOISED, kind=kind, samples=2, window=2, noise=0.5,
                               on_rows=blocks.append, token_rows_per_batch=7)
    for name in plain.metrics:
        assert np.array_equal(plain.metrics[name], progressive.metrics[name]), name
        cells, seen = collect(blocks, plain.metrics[name].shape, name)
        assert (seen == 1).all(), f"{name}: cells delivered {seen.min()}..{seen.max()} times"
        assert np.array_equal(cells, plain.metrics[name]), name


def test_computed_rows_arrive_noised_first_then_final(tiny):
    lm = tiny("llama")
    blocks: list[RowBlock] = []
    trace = causal_trace(lm, EIFFEL, NOISED, samples=2, on_rows=blocks.append, token_rows_per_batch=1)
    n_layers, final = trace.n_layers, len(trace.tokens) - 1
    computed = [b.token for b in blocks if not np.array_equal(b.values["prob"], np.full(len(b.layers), trace.low))]
    order = list(dict.fromkeys(computed))
    assert order[:3] == [1, 2, final], order
    # token 0 is before the first noised token: its row equals the corrupted run, known at once
    first = next(b for b in blocks if b.token == 0)
    assert first.layers == tuple(range(n_layers)) and blocks.index(first) < len(blocks) // 2


def test_cancel_keeps_what_was_delivered(tiny):
    lm = tiny("gpt2")
    full = causal_trace(lm, EIFFEL, NOISED, samples=2, noise=0.5, token_rows_per_batch=1)
    blocks: list[RowBlock] = []

    def progress(done: int, total: int) -> bool:
        return done < total // 2

    with pytest.raises(tracing.TraceCancelled):
        causal_trace(lm, EIFFEL, NOISED, samples=2, noise=0.5, progress=progress,
                     on_rows=blocks.append, token_rows_per_batch=1)
    cells, seen = collect(blocks, full.scores.shape)
    delivered = seen == 1
    assert 0 < delivered.sum() < delivered.size and seen.max() == 1
    assert np.array_equal(cells[delivered], full.scores[delivered])


def test_rows_compute_only_those_rows(tiny):
    lm = tiny("qwen2")
    full = causal_trace(lm, EIFFEL, NOISED, samples=2, noise=0.5)
    final = len(full.tokens) - 1
    compact = causal_trace(lm, EIFFEL, NOISED, samples=2, noise=0.5, rows="noised_final")
    assert compact.settings["rows"] == [1, 2, final]
    for t in range(len(full.tokens)):
        if t in (1, 2, final):
            np.testing.assert_allclose(compact.scores[t], full.scores[t], rtol=1e-6, atol=1e-9)
        else:
            assert np.isnan(compact.scores[t]).all()
    assert "rows" not in full.settings
    from tracing.store import canonical_settings

    assert canonical_settings(compact.settings)["rows"] == [1, 2, final]
    assert "rows" not in canonical_settings(full.settings)
    with pytest.raises(ValueError, match="out of range"):
        causal_trace(lm, EIFFEL, NOISED, samples=1, rows=[99])
    with pytest.raises(ValueError, match="Unknown rows"):
        causal_trace(lm, EIFFEL, NOISED, samples=1, rows="some")


def test_estimate_counts_the_planned_work(tiny):
    lm = tiny("gpt2")
    done: list[tuple[int, int]] = []
    trace = causal_trace(lm, EIFFEL, NOISED, samples=2, noise=0.45, progress=lambda d, t: done.append((d, t)))
    estimate = tracing.causal.estimate_trace(lm, EIFFEL, NOISED, samples=2, noise=0.45)
    assert estimate.cost == done[-1][1] == done[-1][0] and estimate.seconds > 0
    # cells from the first noised token on, less the layer-0 inputs of tokens after the noised
    # ones (not yet mixed with the noise, so equal to the clean state and not computed)
    n_after = len(trace.tokens) - 1 - max(NOISED)
    assert estimate.cells == (len(trace.tokens) - 1) * trace.n_layers - n_after
    compact = tracing.causal.estimate_trace(lm, EIFFEL, NOISED, samples=2, noise=0.45, rows="noised_final")
    assert compact.cells == 3 * trace.n_layers - 1 and compact.cost < estimate.cost  # final token: layer 0 too


def test_max_chunk_work_bounds_the_work_between_progress_calls(tiny):
    lm = tiny("gptj")
    plain = causal_trace(lm, EIFFEL, NOISED, samples=2, noise=0.5)
    calls: list[tuple[int, int]] = []
    capped = causal_trace(lm, EIFFEL, NOISED, samples=2, noise=0.5, max_chunk_work=40,
                          progress=lambda done, total: calls.append((done, total)))
    steps = np.diff([done for done, _ in calls])
    # one row costs samples x positions x blocks <= 2 x 9 x 3 = 54: a chunk is one row when it
    # alone exceeds the cap, else within it
    assert steps.max() <= 54 and (steps <= 40).mean() > 0.5 and len(calls) > 10
    np.testing.assert_allclose(capped.scores, plain.scores, rtol=1e-5, atol=1e-7)
    assert tracing.causal.chunk_work_for(lm, 0.4) >= 1
