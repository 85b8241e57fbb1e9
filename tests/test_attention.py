"""Attention library: weights against a direct eager forward, aggregates against hand-computed numbers."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAMILIES
from tracing import attention as A
from tracing.model.tokens import tokenize

PROMPT = "The Eiffel Tower is located in the city of"
TOO_LONG = "word " * 400  # tiny models take 256 tokens
TEXT = (
    "It was a quiet morning in the harbour town. The fishing boats had gone out before dawn, and "
    "the only sound on the quay was the slow creak of ropes against the bollards. Martha opened "
    "the shutters of the bakery and set the first loaves in the window."
)


def eager_attentions(lm, ids: list[int]) -> list[np.ndarray]:
    """Reference: the model's own forward with eager attention, weights [heads, queries, keys] per layer."""
    config = lm.model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            out = lm.model(torch.tensor([ids], device=lm.device), output_attentions=True)
    finally:
        config._attn_implementation = before
    assert len(out.attentions) == lm.n_layers
    return [a[0].float().cpu().numpy() for a in out.attentions]


def check_attention_to(lm, prompt: str, positions: list[int], atol: float) -> None:
    ids = tokenize(lm, prompt)
    got = A.attention_to(lm, prompt, positions)
    assert got.shape == (lm.n_layers, lm.n_heads, len(positions))
    keys = [p % len(ids) for p in positions]
    want = np.stack([a[:, -1, keys] for a in eager_attentions(lm, ids)])
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert not np.allclose(got, got.mean()), "degenerate weights would make this test pass vacuously"


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_to_matches_eager_forward(tiny, family):
    check_attention_to(tiny(family), PROMPT, [0, 3, -2, -1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_pattern_matches_eager_forward(tiny, family):
    lm = tiny(family)
    ids = tokenize(lm, PROMPT)
    want = eager_attentions(lm, ids)
    for layer in (0, lm.n_layers - 1):
        got = A.attention_pattern(lm, PROMPT, layer)
        np.testing.assert_allclose(got, want[layer], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_attention_on_embedded_model(embedded):
    check_attention_to(embedded, PROMPT, [0, 4, -1], atol=1e-4)
    ids = tokenize(embedded, PROMPT)
    got = A.attention_pattern(embedded, PROMPT, 12)
    np.testing.assert_allclose(got, eager_attentions(embedded, ids)[12], atol=1e-4, rtol=0)


def test_bad_inputs_give_clear_errors(tiny):
    lm = tiny("gpt2")
    with pytest.raises(ValueError, match="empty"):
        A.attention_to(lm, "   ", [0])
    with pytest.raises(ValueError, match="context"):
        A.attention_to(lm, "word " * (lm.n_ctx + 5), [0])
    n = len(tokenize(lm, PROMPT))
    for bad in (n, -n - 1):
        with pytest.raises(ValueError, match="out of range"):
            A.attention_to(lm, PROMPT, [bad])
    with pytest.raises(ValueError, match="integers"):
        A.attention_to(lm, PROMPT, [1.5])
    with pytest.raises(ValueError, match="Layer"):
        A.attention_pattern(lm, PROMPT, lm.n_layers)


def test_attention_pattern_rejects_bad_prompts_and_layers(tiny):
    lm = tiny("gpt2")
    for prompt, message in (("", "empty"), ("  ", "empty"), (None, "empty"), (TOO_LONG, "context")):
        with pytest.raises(ValueError, match=message):
            A.attention_pattern(lm, prompt, 0)
    for layer in (-1, lm.n_layers, 10**6):
        with pytest.raises(ValueError, match="out of range"):
            A.attention_pattern(lm, PROMPT, layer)


@pytest.mark.parametrize("layer", [1.5, "1", None, True])
def test_attention_pattern_rejects_non_integer_layers(tiny, layer):
    """Not a TypeError ('float' object cannot be interpreted as an integer / str + int)."""
    with pytest.raises(ValueError, match="[Ll]ayer"):
        A.attention_pattern(tiny("gpt2"), PROMPT, layer)


def test_attention_to_rejects_bad_prompts_and_positions(tiny):
    lm = tiny("gpt2")
    with pytest.raises(ValueError, match="empty"):
        A.attention_to(lm, None, [0])
    with pytest.raises(ValueError, match="integers"):
        A.attention_to(lm, PROMPT, "0")  # a string is not a list of positions
    with pytest.raises(ValueError, match="integers"):
        A.attention_to(lm, PROMPT, [None])
    n = len(tokenize(lm, PROMPT))
    with pytest.raises(ValueError, match="out of range"):
        A.attention_to(lm, PROMPT, [0, 10**9])
    np.testing.assert_array_equal(A.attention_to(lm, PROMPT, [-n]), A.attention_to(lm, PROMPT, [0]))


def test_attention_to_without_positions_is_an_error(tiny):
    """Not an empty [layers, heads, 0] array, which charts would show as nothing."""
    with pytest.raises(ValueError, match="position"):
        A.attention_to(tiny("gpt2"), PROMPT, [])


@pytest.mark.parametrize("window, message", [
    ([], "empty"),
    (list(range(300)), "context"),
    ([1, 10**9], "vocabulary"),
    ([-5, 1], "vocabulary"),
])
def test_first_token_attention_rejects_bad_windows(tiny, window, message):
    """Not a RuntimeError (reshape) for an empty window or an IndexError for a bad id."""
    with pytest.raises(ValueError, match=message):
        A.first_token_attention(tiny("gpt2"), window)


def test_threads_record_only_their_own_attention(tiny):
    lm = tiny("llama")
    prompts = [PROMPT, "One two three four five six", "Paris is the capital of", TEXT[:80]]
    serial = [A.attention_to(lm, p, [0, -1]) for p in prompts]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = A.attention_to(lm, prompts[i], [0, -1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(serial):
        np.testing.assert_array_equal(results[i], want)


# ---------------------------------------------------------------------------------------------
# Aggregation over a prompt set


def hand_result() -> A.PromptSetAttention:
    """2 layers, 2 heads; two 'semantic' prompts and one 'non_english' prompt, values chosen by hand."""
    w = np.zeros((3, 2, 2, 3), dtype=np.float32)
    # prompt 0 (semantic): first-token attention per [layer][head]
    w[0, :, :, 0] = [[0.1, 0.3], [0.5, 0.7]]
    w[1, :, :, 0] = [[0.6, 0.2], [0.9, 0.1]]
    w[2, :, :, 0] = [[0.3, 0.5], [0.3, 0.2]]
    w[0, :, :, 1] = [[0.2, 0.0], [0.0, 0.0]]
    w[1, :, :, 1] = [[0.4, 0.0], [0.0, 0.0]]
    w[2, :, :, 1] = [[0.6, 0.0], [0.0, 0.0]]
    table = pd.DataFrame({
        "category": ["semantic", "non_english", "semantic"],
        "prompt": ["a", "b", "c"], "subject": ["", "", ""], "expected": ["", "", ""],
        "noised": ["1", "1", "1"], "n_tokens": [4, 4, 4], "problems": ["", "", ""],
    })
    return A.PromptSetAttention("hand", table, w, pd.DataFrame(columns=["category", "prompt", "error"]))


def test_layer_summary_hand_computed():
    s = A.layer_summary(hand_result())
    assert list(dict.fromkeys(s["category"])) == ["non_english", "semantic"]
    first = s[(s.category == "semantic") & (s.target == "first")].set_index("layer")
    # head means: prompt a -> layer0 0.2, layer1 0.6; prompt c -> layer0 0.4, layer1 0.25
    assert first.loc[0, "mean"] == pytest.approx(0.3)
    assert first.loc[1, "mean"] == pytest.approx(0.425)
    # tracing.analysis.describe: sample std (ddof=1), sem = std / sqrt(n)
    assert first.loc[0, "std"] == pytest.approx(0.1 * np.sqrt(2))  # |0.2 - 0.4| / sqrt(2) = 0.1414...
    assert first.loc[1, "std"] == pytest.approx(0.175 * np.sqrt(2))  # |0.6 - 0.25| / sqrt(2) = 0.2475...
    assert first.loc[1, "sem"] == pytest.approx(0.175)  # std(ddof=1) / sqrt(2) with n = 2
    assert first.loc[0, "q25"] == pytest.approx(0.25) and first.loc[0, "q75"] == pytest.approx(0.35)
    assert (first["n"] == 2).all()
    single = s[(s.category == "non_english") & (s.target == "first")].set_index("layer")
    assert single.loc[0, "mean"] == pytest.approx(0.4)
    assert np.isnan(single.loc[0, "std"]) and np.isnan(single.loc[0, "sem"])  # one prompt: undefined
    assert (single["n"] == 1).all()
    noised = s[(s.category == "semantic") & (s.target == "noised")].set_index("layer")
    assert noised.loc[0, "mean"] == pytest.approx((0.1 + 0.3) / 2)
    assert noised.loc[1, "mean"] == pytest.approx(0.0)


def test_head_summary_difference_and_per_prompt_hand_computed():
    r = hand_result()
    heads = A.head_summary(r, "first").set_index(["category", "layer", "head"])
    assert heads.loc[("semantic", 1, 0), "mean"] == pytest.approx((0.5 + 0.3) / 2)
    assert heads.loc[("semantic", 1, 1), "std"] == pytest.approx(0.25 * np.sqrt(2))  # |0.7 - 0.2| / sqrt(2)
    assert np.isnan(heads.loc[("non_english", 0, 0), "std"])  # one prompt: undefined
    assert heads.loc[("non_english", 0, 0), "n"] == 1
    diff = A.head_difference(r, "first", "semantic", "non_english").set_index(["layer", "head"])
    assert diff.loc[(0, 1), "difference"] == pytest.approx((0.3 + 0.5) / 2 - 0.2)
    assert diff.loc[(1, 0), "difference"] == pytest.approx((0.5 + 0.3) / 2 - 0.9)
    per = A.per_prompt_values(r, "noised", layer=0, head=0)
    assert per["attention"].tolist() == pytest.approx([0.2, 0.4, 0.6])
    per = A.per_prompt_values(r, "first", layer=1)
    assert per["attention"].tolist() == pytest.approx([0.6, 0.5, 0.25])
    long = A.long_frame(r)
    assert len(long) == 3 * 2 * 2 * 3
    row = long[(long.prompt == "b") & (long.target == "first") & (long.layer == 1) & (long["head"] == 0)]
    assert row["attention"].item() == pytest.approx(0.9)
    with pytest.raises(ValueError):
        A.head_difference(r, "first", "semantic", "plain_english")
    with pytest.raises(ValueError):
        A.head_summary(r, "middle")


def test_prompt_set_attention_positions_and_noised_sum(tiny):
    """Asks attend for [first, noised..., final], sums several noised tokens, skips bad rows."""
    lm = tiny("gpt2")
    frame = pd.DataFrame({
        "category": ["semantic", "plain_english", "semantic"],
        "prompt": [PROMPT, "Once upon a time there was", "Nothing here"],
        "expected": [" Paris", " a", " x"],
        "subject": ["Eiffel Tower", "time", "absent"],
        "noised": [None, [1, 2], None],
        "problems": ["", "", ""],
    })
    asked = []

    def fake_attend(lm_, prompt, positions):
        asked.append((prompt, positions))
        base = np.arange(len(positions), dtype=np.float32) + 1  # 1, 2, ..., P
        return np.broadcast_to(base, (lm.n_layers, lm.n_heads, len(positions))) / 10

    calls = []
    r = A.prompt_set_attention(lm, frame, progress=lambda d, t: calls.append((d, t)), attend=fake_attend)
    n0 = len(tokenize(lm, PROMPT))
    tower = tokenize(lm, PROMPT).index(lm.tokenizer(" Tower")["input_ids"][0])
    assert asked[0] == (PROMPT, (0, tower, n0 - 1))
    n1 = len(tokenize(lm, frame.prompt[1]))
    assert asked[1] == (frame.prompt[1], (0, 1, 2, n1 - 1))
    np.testing.assert_allclose(r.weights[0, 0, 0], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(r.weights[1, 0, 0], [0.1, 0.2 + 0.3, 0.4])
    assert r.weights.shape == (2, lm.n_layers, lm.n_heads, 3)
    assert r.table["noised"].tolist() == [str(tower), "1 2"]
    assert len(r.skipped) == 1 and "absent" in r.skipped.error[0]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert r.categories == ["plain_english", "semantic"]


def test_prompt_set_attention_real_weights(tiny):
    lm = tiny("qwen2")
    frame = pd.DataFrame({"category": ["semantic"], "prompt": [PROMPT], "expected": [" Paris"],
                          "subject": ["Eiffel Tower"], "problems": [""]})
    r = A.prompt_set_attention(lm, frame)
    tower = int(r.table["noised"][0])
    np.testing.assert_allclose(r.weights[0], A.attention_to(lm, PROMPT, [0, tower, -1]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Long texts


def test_sample_windows():
    ids = np.arange(100)
    starts = A.sample_windows(ids, 10, 30, seed=1)
    assert len(set(starts.tolist())) == 10 and starts.min() >= 0 and starts.max() <= 70
    np.testing.assert_array_equal(starts, A.sample_windows(ids, 10, 30, seed=1))
    assert len(A.sample_windows(ids, 5, 100)) == 5  # one possible start: repeated
    with pytest.raises(ValueError, match="only 100 tokens"):
        A.sample_windows(ids, 2, 101)
    with pytest.raises(ValueError):
        A.sample_windows(ids, 0, 10)


def test_disjoint_windows_never_overlap():
    ids = np.arange(1000)
    for seed in range(20):
        starts = A.sample_windows(ids, 7, 130, seed=seed, disjoint=True)
        assert len(starts) == 7 and starts.min() >= 0 and starts.max() + 130 <= 1000
        assert (np.diff(starts) >= 130).all()  # sorted, each window ends before the next starts
        assert A.window_coverage(starts, 130) == 7 * 130
    np.testing.assert_array_equal(A.sample_windows(ids, 7, 130, 3, True), A.sample_windows(ids, 7, 130, 3, True))
    assert A.max_disjoint_windows(1000, 130) == 7
    with pytest.raises(ValueError, match="only 7 non-overlapping windows of 130"):
        A.sample_windows(ids, 8, 130, disjoint=True)


def test_window_coverage_and_overlap_hand_computed(tiny):
    assert A.window_coverage([0, 5, 20], 10) == 15 + 10  # 0..14 and 20..29
    lm = tiny("gpt2")
    r = A.long_text_attention(lm, TEXT, n_samples=4, length=12, seed=0)
    covered = A.window_coverage(r.starts, 12)
    assert r.covered_tokens == covered and r.overlap == pytest.approx(4 * 12 / covered) and not r.disjoint
    d = A.long_text_attention(lm, TEXT, n_samples=2, length=12, seed=0, disjoint=True)
    assert d.disjoint and d.overlap == 1.0 and (np.diff(d.starts) >= 12).all()


def test_category_difference_of_any_per_head_frame():
    heads = pd.DataFrame({"category": ["a", "a", "b", "b"], "layer": [0, 1, 0, 1], "head": [0, 0, 0, 0],
                          "mean": [0.5, 0.25, 0.125, 1.0]})
    diff = A.category_difference(heads, "a", "b").set_index("layer")
    assert diff["difference"].tolist() == [0.375, -0.75]
    with pytest.raises(ValueError, match="category 'c'"):
        A.category_difference(heads, "a", "c")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_long_text_reduction_matches_direct_computation(tiny, family):
    lm = tiny(family)
    n, m, seed = 3, 12, 5
    r = A.long_text_attention(lm, TEXT, n_samples=n, length=m, seed=seed)
    ids = A.text_ids(lm, TEXT)
    starts = A.sample_windows(ids, n, m, seed)
    np.testing.assert_array_equal(r.starts, starts)
    direct = np.stack([
        np.stack(eager_attentions(lm, ids[s : s + m].tolist()))[:, :, :, 0] for s in starts
    ])  # [n, L, H, m]
    np.testing.assert_allclose(r.mean, direct.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(r.per_sample, direct.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(r.mean[:, :, 0], 1.0, atol=1e-6)
    curves = A.long_text_curves(r)
    mean = curves[curves.layer == "mean"]
    np.testing.assert_allclose(mean["attention"], direct.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(mean["uniform"], 1 / (np.arange(m) + 1))
    np.testing.assert_allclose(mean["q25"], np.quantile(direct.mean(axis=(1, 2)), 0.25, axis=0), atol=1e-5)
    layer1 = curves[curves.layer == "1"]["attention"].to_numpy()
    np.testing.assert_allclose(layer1, direct[:, 1].mean(axis=(0, 1)), atol=1e-5)
    heads = A.long_text_heads(r, from_position=4).set_index(["layer", "head"])
    assert heads.loc[(2, 3), "attention"] == pytest.approx(direct[:, 2, 3, 4:].mean(), abs=1e-5)


def test_long_text_caps_length_and_checks_text(tiny):
    lm = tiny("gpt2")
    long_text = (TEXT + " ") * 30
    r = A.long_text_attention(lm, long_text, n_samples=1, length=10_000)
    assert r.length == lm.n_ctx
    with pytest.raises(ValueError, match="empty"):
        A.long_text_attention(lm, "  ", n_samples=1, length=10)
    with pytest.raises(ValueError, match="only"):
        A.long_text_attention(lm, "Short text.", n_samples=1, length=50)


def test_long_text_attention_rejects_bad_sizes(tiny):
    lm = tiny("gpt2")
    text = PROMPT * 10
    with pytest.raises(ValueError, match="at least 1"):
        A.long_text_attention(lm, text, n_samples=0, length=5)
    with pytest.raises(ValueError, match="at least 2"):
        A.long_text_attention(lm, text, n_samples=1, length=1)
    with pytest.raises(ValueError, match="empty"):
        A.long_text_attention(lm, None, n_samples=1, length=5)
