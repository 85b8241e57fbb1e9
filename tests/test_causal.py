"""The tracing engine against a one-forward-per-cell reference loop, plus API behaviour."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import tracing
from tracing.causal import causal_trace
from tracing.model.tokens import subject_positions
from tracing.reference import naive_trace
from conftest import FAMILIES

EIFFEL = "The Eiffel Tower is located in the city of"
NOISED = [1, 2, 3]
CASES = [("hidden", "input"), ("hidden", "output"), ("mlp", "input"), ("attn", "input")]


def assert_matches_reference(trace, reference, low, high, atol_log=2e-5):
    """Compare in log space (tiny random models put ~1/vocab on every token), and make sure the
    restorations moved the score far more than the tolerance (so the test can fail)."""
    assert np.isfinite(reference).all()
    np.testing.assert_allclose(np.log(trace.scores), np.log(reference), atol=atol_log, rtol=0)
    assert abs(np.log(trace.low) - np.log(low)) < atol_log
    assert abs(np.log(trace.high) - np.log(high)) < atol_log
    assert np.abs(np.log(reference) - np.log(low)).max() > 100 * atol_log


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, convention", CASES)
def test_tiny_models_match_reference(tiny, family, kind, convention):
    lm = tiny(family)
    trace = causal_trace(lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=3, window=3, convention=convention)
    reference, low, high, target = naive_trace(
        lm, EIFFEL, NOISED, kind=kind, noise=0.5, samples=3, window=3, convention=convention
    )
    assert trace.target_id == target
    assert_matches_reference(trace, reference, low, high)


@pytest.mark.parametrize("corruption", ["uniform", "replace"])
def test_other_corruptions_match_reference(tiny, corruption):
    lm = tiny("gpt2")
    other = "The Colosseum is located in the city of"
    assert len(lm.tokenizer(other)["input_ids"]) == len(lm.tokenizer(EIFFEL)["input_ids"])
    kwargs = dict(kind="hidden", noise=0.7, samples=2, seed=3)
    trace = causal_trace(lm, EIFFEL, NOISED, corruption=corruption, replacement=other, **kwargs)
    reference, low, high, _ = naive_trace(
        lm, EIFFEL, NOISED, corruption=corruption, replacement=other, **kwargs
    )
    assert_matches_reference(trace, reference, low, high)


def test_sigma_noise_mode_scales_by_embedding_std(tiny):
    lm = tiny("llama")
    trace = causal_trace(lm, EIFFEL, NOISED, noise=3.0, samples=2, noise_mode="sigma")
    weight = lm.model.get_submodule(lm.adapter.token_embedding).weight.detach().numpy()
    assert trace.sigma == pytest.approx(float(weight.std(ddof=1)), rel=1e-5)
    assert trace.noise_std == pytest.approx(3.0 * trace.sigma)
    reference, low, high, _ = naive_trace(lm, EIFFEL, NOISED, noise=3.0, samples=2, sigma=trace.sigma)
    assert_matches_reference(trace, reference, low, high)


def test_results_do_not_depend_on_batch_size(tiny):
    lm = tiny("qwen2")
    big = causal_trace(lm, EIFFEL, NOISED, kind="mlp", samples=3, window=2)
    small = causal_trace(lm, EIFFEL, NOISED, kind="mlp", samples=3, window=2, token_rows_per_batch=1)
    np.testing.assert_allclose(np.log(small.scores), np.log(big.scores), atol=1e-5, rtol=0)


def test_metrics_are_consistent(tiny):
    lm = tiny("gpt_neox")
    trace = causal_trace(lm, EIFFEL, NOISED, samples=2, contrast=" London")
    np.testing.assert_allclose(trace.metric("normalised"), (trace.scores - trace.low) / (trace.high - trace.low))
    assert trace.metric_high["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (trace.metric("kl") >= -1e-6).all()
    assert trace.metric("logit_diff").shape == trace.scores.shape
    # cells before the first noised token equal the corrupted run
    assert np.all(trace.scores[0] == trace.low)
    # restoring the last block's clean output at the final token is the clean run
    output = causal_trace(lm, EIFFEL, NOISED, samples=2, convention="output")
    assert output.scores[-1, -1] == pytest.approx(output.high, rel=1e-5)
    # the output convention is the input convention shifted by one layer
    np.testing.assert_allclose(output.scores[:, :-1], trace.scores[:, 1:], rtol=1e-5)


def test_cancel_raises(tiny):
    lm = tiny("llama")
    calls = []

    def progress(done, total):
        calls.append((done, total))
        return done == 0

    with pytest.raises(tracing.TraceCancelled):
        causal_trace(lm, EIFFEL, NOISED, samples=1, progress=progress, token_rows_per_batch=9)
    assert len(calls) == 2 and calls[0][0] == 0


def test_record_round_trip(tiny):
    lm = tiny("gpt2")
    trace = causal_trace(lm, EIFFEL, NOISED, samples=1, contrast=" London")
    again = tracing.Trace.from_record(*trace.to_record())
    np.testing.assert_array_equal(again.scores, trace.scores)
    assert again.tokens == trace.tokens and again.settings == trace.settings
    assert again.metric_low == trace.metric_low and again.clean_top == trace.clean_top


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt="word " * 300), "context"),
        (dict(noised=[]), "No tokens to noise"),
        (dict(noised=[42]), "out of range"),
        (dict(noise=-1.0), "finite number >= 0"),
        (dict(noise=float("nan")), "finite number >= 0"),
        (dict(samples=0), "samples"),
        (dict(kind="resid"), "Unknown kind"),
        (dict(target=""), "target is empty"),
        (dict(target=10**9), "outside the vocabulary"),
        (dict(corruption="replace", replacement="Too short"), "same number"),
        (dict(window=0), "window"),
    ],
)
def test_bad_input_raises_clear_value_errors(tiny, kwargs, message):
    lm = tiny("gpt2")
    args = dict(prompt=EIFFEL, noised=NOISED, samples=1) | kwargs
    with pytest.raises(ValueError, match=message):
        causal_trace(lm, args.pop("prompt"), args.pop("noised"), **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(corruption="blur"), "Unknown corruption 'blur'"),
    (dict(noise_mode="relative"), "Unknown noise mode 'relative'"),
    (dict(convention="middle"), "Unknown layer convention 'middle'"),
    (dict(kind=None), "Unknown kind"),
    (dict(noise="loud"), "noise level must be a finite number"),
    (dict(noise=float("inf")), "noise level must be a finite number"),
    (dict(noise=None), "noise level must be a finite number"),
    (dict(samples=1.5), "samples must be an integer"),
    (dict(samples=True), "samples must be an integer"),
    (dict(samples="3"), "samples must be an integer"),
    (dict(window=2.5), "window must be an integer"),
    (dict(window=-3), "window must be an integer"),
    (dict(target=1.5), "must be a token id or a completion string"),
    (dict(target=True), "must be a token id or a completion string"),
    (dict(target=-1), "outside the vocabulary"),
    (dict(contrast=10**9), "contrast token id .* outside the vocabulary"),
    (dict(corruption="replace"), "needs a second prompt"),
    (dict(corruption="replace", replacement="   "), "empty"),
    (dict(noised=[True]), "not an integer"),
    (dict(noised=["1"]), "not an integer"),
    (dict(noised=[1.0]), "not an integer"),
    (dict(noised=[-1]), "out of range"),
    (dict(noised=None), "No tokens to noise"),
    (dict(prompt=None), "empty"),
    (dict(prompt="   \n\t"), "empty"),
])
def test_causal_trace_rejects_bad_settings(tiny, kwargs, message):
    lm = tiny("gpt2")
    args = dict(prompt=EIFFEL, noised=NOISED, samples=1) | kwargs
    with pytest.raises(ValueError, match=message):
        causal_trace(lm, args.pop("prompt"), args.pop("noised"), **args)


@pytest.mark.parametrize("seed", ["abc", 1.5, 2**70, None, True])
def test_causal_trace_rejects_bad_seeds_clearly(tiny, seed):
    """The seed is validated like samples and window (not int('abc') / an overflow message, or a
    float silently truncated to another seed than the one recorded)."""
    with pytest.raises(ValueError, match="seed"):
        causal_trace(tiny("gpt2"), EIFFEL, NOISED, samples=1, seed=seed)


def test_last_token_noised_is_flagged(tiny):
    lm = tiny("gpt2")
    n = len(lm.tokenizer(EIFFEL)["input_ids"])
    assert causal_trace(lm, EIFFEL, [n - 1], samples=1).last_token_noised
    assert not causal_trace(lm, EIFFEL, [1], samples=1).last_token_noised


def test_subject_positions(tiny):
    lm = tiny("llama")
    assert subject_positions(lm, EIFFEL, "Eiffel Tower") == [1, 2, 3]
    assert subject_positions(lm, EIFFEL, "Eiffel Tower", which="last") == [3]
    assert subject_positions(lm, EIFFEL, "Eiffel") == [1, 2]
    with pytest.raises(ValueError, match="does not occur"):
        subject_positions(lm, EIFFEL, "Louvre")


def test_subject_positions_rejects_bad_input(tiny):
    lm = tiny("gpt2")
    for subject in ("", "   ", None):
        with pytest.raises(ValueError, match="subject is empty"):
            subject_positions(lm, EIFFEL, subject)
    with pytest.raises(ValueError, match="'all' or 'last'"):
        subject_positions(lm, EIFFEL, "Eiffel", which="middle")
    with pytest.raises(ValueError, match="does not occur"):
        subject_positions(lm, "", "Eiffel")


def test_concurrent_traces_equal_serial(tiny):
    """Four threads tracing on one shared model get exactly what they get alone."""
    lm = tiny("llama")
    hooks_before = {id(m): (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in lm.model.modules()}
    jobs = [dict(kind=k, noise=n) for k, n in (("hidden", 0.3), ("mlp", 0.5), ("attn", 0.7), ("hidden", 0.9))]
    serial = [causal_trace(lm, EIFFEL, NOISED, samples=2, window=2, **job).scores for job in jobs]
    results: list = [None] * len(jobs)

    def work(i):
        results[i] = causal_trace(lm, EIFFEL, NOISED, samples=2, window=2, seed=0, **jobs[i]).scores

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)
    hooks_after = {id(m): (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in lm.model.modules()}
    assert hooks_after == hooks_before  # (transformers may own permanent recording hooks)


@pytest.mark.slow
@pytest.mark.parametrize("kind, convention", CASES)
def test_embedded_model_matches_reference(embedded, kind, convention):
    """On the real model, in probability, to 1e-5 (a sample of cells keeps the reference quick)."""
    cells = [(t, l) for t in (0, 3, 4, 9) for l in (0, 7, 15, 29)]
    trace = causal_trace(embedded, EIFFEL, NOISED, kind=kind, noise=0.4, samples=4, window=10, convention=convention)
    reference, low, high, target = naive_trace(
        embedded, EIFFEL, NOISED, kind=kind, noise=0.4, samples=4, window=10, convention=convention, cells=cells
    )
    assert trace.target == " Paris" and embedded.tokenizer.decode([target]) == " Paris"
    for t, l in cells:
        assert trace.scores[t, l] == pytest.approx(reference[t, l], abs=1e-5)
    assert trace.low == pytest.approx(low, abs=1e-5) and trace.high == pytest.approx(high, abs=1e-5)
    assert max(abs(reference[t, l] - low) for t, l in cells) > 0.005  # 500x the tolerance
