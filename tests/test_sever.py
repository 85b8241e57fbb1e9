"""Severed paths (ROME Fig. 3): the engine's ``sever=`` against a hooked one-forward-per-cell loop,
its settings and store keys, and the comparison chart."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tracing.causal import RowBlock, Trace, causal_trace, estimate_trace
from tracing.charts.severed import default_token, severed_comparison, severed_frame
from tracing.model.tokens import subject_positions
from tracing.preview import preview_trace
from tracing.reference import naive_trace
from tracing.settings import TraceSettings
from tracing.store import ResultStore
from conftest import FAMILIES

PROMPT = "The Eiffel Tower is located in"
NOISED = [1, 2, 3]
ATOL_LOG = 2e-5


def assert_matches(trace, reference, low, high, cells=None):
    """Log-space agreement (tiny random models spread probability thinly) on ``cells`` (rows of
    the reference that were computed; default all)."""
    got = trace.scores if cells is None else trace.scores[cells]
    want = reference if cells is None else reference[cells]
    assert np.isfinite(want).all()
    np.testing.assert_allclose(np.log(got), np.log(want), atol=ATOL_LOG, rtol=0)
    assert abs(np.log(trace.low) - np.log(low)) < ATOL_LOG
    assert abs(np.log(trace.high) - np.log(high)) < ATOL_LOG


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("convention", ["input", "output"])
def test_tiny_models_match_reference(tiny, family, convention):
    lm = tiny(family)
    options = dict(kind="hidden", noise=0.5, samples=2, convention=convention)
    plain = causal_trace(lm, PROMPT, NOISED, **options)
    for part in ("mlp", "attn"):
        trace = causal_trace(lm, PROMPT, NOISED, sever=part, **options)
        reference, low, high, target = naive_trace(lm, PROMPT, NOISED, sever=part, **options)
        assert trace.target_id == target and trace.sever == part
        assert_matches(trace, reference, low, high)
        # severing changes the numbers far beyond the tolerance, so a wrong range would fail
        assert np.abs(np.log(reference) - np.log(plain.scores)).max() > 100 * ATOL_LOG


def test_embedded_model_matches_reference(embedded):
    prompt = "The Eiffel Tower is in the city of"
    noised = subject_positions(embedded, prompt, "Eiffel Tower")
    rows = [noised[-1], len(embedded.tokenizer(prompt)["input_ids"]) - 1]
    layers = [0, 7, 14, 21, embedded.n_layers - 1]  # a few layers: each reference cell is a full forward
    cells = [(t, l) for t in rows for l in layers]
    for part, convention in (("mlp", "input"), ("attn", "output")):
        options = dict(kind="hidden", noise=0.4, samples=2, convention=convention)
        trace = causal_trace(embedded, prompt, noised, sever=part, rows=rows, **options)
        reference, low, high, _ = naive_trace(embedded, prompt, noised, sever=part, cells=cells, **options)
        assert_matches(trace, reference, low, high, cells=tuple(np.array(cells).T))
        assert np.isnan(trace.scores[0]).all()  # a row not asked for is not faked


def test_nothing_severed_is_todays_trace_bit_for_bit(tiny):
    lm = tiny("llama")
    today = causal_trace(lm, PROMPT, NOISED, samples=2, contrast=" London")
    for none in (dict(sever=None), dict(settings=TraceSettings(samples=2, contrast=" London", sever=None))):
        again = causal_trace(lm, PROMPT, NOISED, samples=2, contrast=" London", **none)
        assert again.metrics.keys() == today.metrics.keys()
        for name, values in today.metrics.items():
            np.testing.assert_array_equal(again.metrics[name], values)
        assert "sever" not in again.settings and again.sever is None


def test_severed_trace_keeps_engine_features(tiny):
    lm = tiny("gpt2")
    options = dict(kind="hidden", samples=2, sever="attn", convention="output")
    whole = causal_trace(lm, PROMPT, NOISED, **options)
    assert whole.settings["sever"] == "attn" and whole.trace_settings.sever == "attn"
    blocks: list[RowBlock] = []
    calls = []
    partial = causal_trace(lm, PROMPT, NOISED, rows="noised_final", on_rows=blocks.append,
                           progress=lambda done, total: calls.append((done, total)), token_rows_per_batch=9,
                           **options)
    rows = [*NOISED, len(whole.tokens) - 1]
    np.testing.assert_allclose(partial.scores[rows], whole.scores[rows], rtol=1e-5)
    seen = np.zeros(whole.scores.shape, int)
    for block in blocks:
        seen[block.token, list(block.layers)] += 1
        np.testing.assert_array_equal(block.values["prob"], partial.scores[block.token, list(block.layers)])
    assert (seen[rows] == 1).all() and seen.sum() == len(rows) * whole.n_layers
    assert calls[-1][0] == calls[-1][1] > 0
    estimate = estimate_trace(lm, PROMPT, NOISED, rows="noised_final", **options)
    assert estimate.cost == calls[-1][1]
    again = Trace.from_record(*whole.to_record())
    assert again.sever == "attn" and again.settings == whole.settings


def test_settings_validation():
    assert TraceSettings(sever="").sever is None
    assert "sever" not in TraceSettings().to_dict()
    mlp = TraceSettings(sever="mlp")
    assert mlp.to_dict()["sever"] == "mlp"
    assert TraceSettings.from_dict(mlp.to_dict()) == mlp
    assert TraceSettings.merged(None, sever="attn").sever == "attn"
    assert TraceSettings.merged(mlp, samples=3).sever == "mlp"
    with pytest.raises(ValueError, match="Unknown sever"):
        TraceSettings(sever="both")
    with pytest.raises(ValueError, match="needs the hidden kind"):
        TraceSettings(kind="mlp", sever="mlp")
    with pytest.raises(ValueError, match="needs the hidden kind"):
        mlp.replace(kind="attn")


def test_engine_and_preview_reject_bad_sever(tiny):
    lm = tiny("qwen2")
    with pytest.raises(ValueError, match="needs the hidden kind"):
        causal_trace(lm, PROMPT, NOISED, kind="attn", sever="attn", samples=1)
    with pytest.raises(ValueError, match="No preview for severed traces"):
        preview_trace(lm, PROMPT, NOISED, sever="mlp", samples=1)


def test_store_keys(tmp_path):
    """Unsevered keys are what they were before ``sever`` existed (values computed with the
    previous code); severed ones differ from them and from each other."""
    lm = SimpleNamespace(name="stand-in", revision="r1", dtype="torch.float32")
    store = ResultStore(tmp_path)

    def key(settings: TraceSettings) -> str:
        return store.key(lm, "The Eiffel Tower is in", {**settings.to_dict(), "noised": [1, 2, 3]})

    assert key(TraceSettings()) == "5cd81fd8f5cb0582a3c6c9cb8edc8d36a81c2fe30d4a64d6917432bd57ea42ce"
    other = TraceSettings(kind="mlp", samples=3, convention="output", target=" Paris")
    assert key(other) == "416ed3e334270aca1312ab3feb08a7897fc163820c1dbaffb92007458102a814"
    severed = {key(TraceSettings(sever=part)) for part in ("mlp", "attn")}
    assert len(severed) == 2 and key(TraceSettings()) not in severed


def test_comparison_chart_data_are_the_traces_rows(tiny):
    lm = tiny("gptj")
    traces = {part: causal_trace(lm, PROMPT, NOISED, samples=2, sever=part) for part in (None, "mlp", "attn")}
    token = default_token(traces[None])
    assert token == NOISED[-1]
    spec = severed_comparison(traces, token).to_dict()
    rows = [d for d in spec["datasets"].values() if d and "effect" in d[0]][0]
    for part, trace in traces.items():
        got = [r for r in rows if r["sever"] == (part or "none")]
        assert [r["layer"] for r in got] == list(range(trace.n_layers))
        np.testing.assert_allclose([r["value"] for r in got], trace.scores[token])
        np.testing.assert_allclose([r["effect"] for r in got], trace.scores[token] - trace.low)
    assert list(severed_frame(traces, -1)["layer"][:2]) == [0, 1]
    with pytest.raises(ValueError, match="made with sever"):
        severed_frame({"mlp": traces[None]}, token)
    with pytest.raises(ValueError, match="out of range"):
        severed_frame(traces, 99)
