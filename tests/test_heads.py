"""Per-head restoration against a one-forward-per-(layer, head) hooked loop, plus API behaviour."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tracing.causal import TraceCancelled, causal_trace
from tracing.heads import HeadTrace, head_summary, head_trace, per_prompt_effects, plan_heads, run_heads
from tracing.model.loading import model_from_config
from tracing.settings import TraceSettings
from tracing.store import ResultStore
from conftest import FAMILIES, tiny_config

EIFFEL = "The Eiffel Tower is located in the city of"
NOISED = [1, 2, 3]
# Written out here, not taken from the adapters: the reference must not share the code under test.
OUT_PROJECTION = {"gpt2": "attn.c_proj", "llama": "self_attn.o_proj", "qwen2": "self_attn.o_proj",
                  "gpt_neox": "attention.dense", "gptj": "attn.out_proj"}
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers",
          "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h"}


def naive_head_trace(lm, prompt, noised, noise=0.4, samples=2, seed=0, token=-1, cells=None):
    """p(target) per (layer, head), each by its own whole-model forward (batch = samples) with a
    pre-forward hook on that layer's output projection putting the clean head slice at ``token``.
    Returns (scores [L, H] (NaN outside ``cells``), low, high, target id)."""
    model, family = lm.model, lm.model.config.model_type
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    t = token % ids.shape[1]
    blocks = model.get_submodule(BLOCKS[family])
    projections = [block.get_submodule(OUT_PROJECTION[family]) for block in blocks]
    n_heads = model.config.num_attention_heads
    with torch.no_grad():
        clean_emb = model.get_input_embeddings()(ids)
        unit = torch.randn((samples, len(noised), clean_emb.shape[-1]), generator=torch.Generator().manual_seed(seed))
        corrupt_emb = clean_emb.repeat(samples, 1, 1)
        corrupt_emb[:, noised] += unit * noise
        clean_inputs = {}
        handles = [p.register_forward_pre_hook(lambda m, args, l=l: clean_inputs.__setitem__(l, args[0][0].clone()))
                   for l, p in enumerate(projections)]
        try:
            clean_logits = model(inputs_embeds=clean_emb).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        target = int(clean_logits.argmax())
        head_dim = clean_inputs[0].shape[-1] // n_heads

        def score(hook_at=None):
            handle = projections[hook_at[0]].register_forward_pre_hook(hook_at[1]) if hook_at else None
            try:
                logits = model(inputs_embeds=corrupt_emb).logits[:, -1]
            finally:
                if handle is not None:
                    handle.remove()
            return float(torch.softmax(logits.double(), -1)[:, target].mean())

        scores = np.full((len(blocks), n_heads), np.nan)
        for l, h in cells or [(l, h) for l in range(len(blocks)) for h in range(n_heads)]:
            part = slice(h * head_dim, (h + 1) * head_dim)

            def put_clean(m, args, l=l, part=part):
                x = args[0].clone()
                x[:, t, part] = clean_inputs[l][t, part]
                return (x, *args[1:])

            scores[l, h] = score((l, put_clean))
        high = float(torch.softmax(clean_logits.double(), -1)[target])
        return scores, score(), high, target


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_match_reference(tiny, family):
    lm = tiny(family)
    traced = head_trace(lm, EIFFEL, NOISED, noise=0.4, samples=2, seed=3)
    reference, low, high, target = naive_head_trace(lm, EIFFEL, NOISED, samples=2, seed=3)
    assert traced.target_id == target and traced.scores.shape == (lm.n_layers, lm.n_heads)
    np.testing.assert_allclose(np.log(traced.scores), np.log(reference), atol=2e-5, rtol=0)
    assert abs(np.log(traced.low) - np.log(low)) < 2e-5 and abs(np.log(traced.high) - np.log(high)) < 2e-5
    assert np.abs(np.log(reference) - np.log(low)).max() > 100 * 2e-5  # restorations moved the score
    assert set(traced.metrics) == {"prob", "logprob", "kl"} and (traced.metrics["kl"] >= -1e-6).all()


def test_other_token_and_noise_match_reference(tiny):
    lm = tiny("gpt2")
    traced = head_trace(lm, EIFFEL, [2], noise=0.8, samples=3, seed=1, token=5)
    reference, low, _, _ = naive_head_trace(lm, EIFFEL, [2], noise=0.8, samples=3, seed=1, token=5)
    np.testing.assert_allclose(np.log(traced.scores), np.log(reference), atol=2e-5, rtol=0)
    assert traced.token == 5 and traced.settings["token"] == 5


def test_same_noise_and_bounds_as_causal_trace(tiny):
    lm = tiny("llama")
    heads = head_trace(lm, EIFFEL, NOISED, samples=3, seed=5)
    trace = causal_trace(lm, EIFFEL, NOISED, samples=3, seed=5)
    assert heads.metric_low == trace.metric_low and heads.metric_high == trace.metric_high
    assert heads.noise_std == trace.noise_std and heads.corrupted_top == trace.corrupted_top


def test_batch_size_does_not_change_numbers(tiny):
    lm = tiny("qwen2")
    whole = head_trace(lm, EIFFEL, NOISED, samples=2)
    small = head_trace(lm, EIFFEL, NOISED, samples=2, token_rows_per_batch=1)
    np.testing.assert_allclose(whole.scores, small.scores, rtol=1e-5, atol=0)


def test_head_that_changes_nothing_gives_exactly_low(tokenizer):
    lm = model_from_config(tiny_config("llama", vocab_size=len(tokenizer)), tokenizer, name="tiny-zeroed")
    projection = lm.model.model.layers[1].self_attn.o_proj
    head_dim = projection.in_features // lm.n_heads
    with torch.no_grad():
        projection.weight[:, 2 * head_dim:3 * head_dim] = 0  # head 2 of layer 1 writes nothing
    traced = head_trace(lm, EIFFEL, NOISED, samples=2)
    assert traced.scores[1, 2] == traced.low
    for name, value in traced.metric_low.items():
        assert traced.metrics[name][1, 2] == value
    others = np.delete(traced.scores.reshape(-1), 1 * lm.n_heads + 2)
    assert (others != traced.low).all()


def test_token_before_the_noise_gives_exactly_low(tiny):
    traced = head_trace(tiny("gptj"), EIFFEL, [4], samples=2, token=2)  # clean == corrupted at token 2
    assert (traced.scores == traced.low).all() and (traced.normalised() == 0).all()


def test_progress_and_cancel(tiny):
    calls = []
    head_trace(tiny("gpt2"), EIFFEL, NOISED, samples=2, token_rows_per_batch=8,
               progress=lambda done, total: calls.append((done, total)))
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] and len(calls) > 2
    with pytest.raises(TraceCancelled):
        head_trace(tiny("gpt2"), EIFFEL, NOISED, samples=2, token_rows_per_batch=8, progress=lambda d, t: d == 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"token": 99}, "out of range"), ({"token": "last"}, "token index"), ({"noised": []}, "No tokens"),
    ({"samples": 0}, "samples"), ({"noise": -1}, "noise"),
])
def test_bad_input_raises_clear_errors(tiny, kwargs, message):
    args = {"noised": NOISED, **kwargs}
    with pytest.raises(ValueError, match=message):
        head_trace(tiny("gpt2"), EIFFEL, **args)


def test_record_round_trip_and_store(tiny, tmp_path):
    lm = tiny("gpt_neox")
    traced = head_trace(lm, EIFFEL, NOISED, samples=2, seed=2)
    meta, arrays = traced.to_record()
    again = HeadTrace.from_record(meta, arrays)
    np.testing.assert_array_equal(again.scores, traced.scores)
    assert again.settings == traced.settings and again.trace_settings.seed == 2
    store = ResultStore(tmp_path)
    key = store.key(lm, EIFFEL, traced.settings)
    store.put(key, traced)
    store.forget_memory()
    read = store.get(key)
    assert isinstance(read, HeadTrace) and read.token == traced.token
    np.testing.assert_array_equal(read.metrics["kl"], traced.metrics["kl"])
    # not the key of the causal trace with the same settings
    assert key != store.key(lm, EIFFEL, {k: v for k, v in traced.settings.items() if k not in ("token", "record")})


def test_prompt_set_plan_run_and_averages(tiny, tmp_path):
    lm = tiny("gpt2")
    frame = pd.DataFrame({
        "category": ["semantic", "semantic", "plain_english"],
        "prompt": [EIFFEL, "The capital of France is", "To be or not to"],
        "expected": [" Paris", " Paris", " be"],
        "subject": ["Eiffel Tower", "France", "be"],
    })
    store, settings = ResultStore(tmp_path), TraceSettings(samples=2)
    plan = plan_heads(lm, frame, settings, store, target="top1")
    assert [r.status for r in plan] == ["pending"] * 3
    seen = []
    assert run_heads(lm, plan, store, progress=lambda d, t, r: seen.append(d))
    assert seen == [1, 2, 3] and [r.status for r in plan] == ["computed"] * 3
    again = plan_heads(lm, frame, settings, store, target="top1")
    assert [r.status for r in again] == ["stored"] * 3
    summary = head_summary(again)
    semantic = summary[summary["category"] == "semantic"].set_index(["layer", "head"])
    want = (again[0].trace.normalised() + again[1].trace.normalised()) / 2
    np.testing.assert_allclose(semantic["mean"].to_numpy(), want.reshape(-1), atol=1e-12)
    assert set(summary["n"]) == {1, 2}
    values = per_prompt_effects(again, 1, 0)
    assert values["value"].iloc[0] == pytest.approx(again[0].trace.normalised()[1, 0])
    stopped = plan_heads(lm, frame, TraceSettings(samples=1), store, target="top1")
    assert not run_heads(lm, stopped, store, should_stop=lambda: True)


@pytest.mark.slow
def test_embedded_model_matches_reference(embedded):
    """SmolLM2 (9 query heads sharing 3 key/value heads), 2 samples, a sample of cells."""
    cells = [(l, h) for l in (0, 9, 20, 29) for h in (0, 4, 8)]
    traced = head_trace(embedded, EIFFEL, NOISED, samples=2)
    reference, low, high, target = naive_head_trace(embedded, EIFFEL, NOISED, samples=2, cells=cells)
    assert traced.target == " Paris" and target == traced.target_id
    for l, h in cells:
        assert traced.scores[l, h] == pytest.approx(reference[l, h], abs=1e-5)
    assert traced.low == pytest.approx(low, abs=1e-5) and traced.high == pytest.approx(high, abs=5e-5)
    assert max(abs(reference[l, h] - low) for l, h in cells) > 0.002


def test_the_heads_command_writes_the_grid_of_a_prompt_set(embedded, tmp_path):
    """``python -m tracing heads``: one prompt, its grid equal to ``head_trace`` of that prompt;
    a second run reads the store; bad input exits with 2."""
    import pandas as pd

    from tracing.__main__ import main
    from tracing.prompts import load_prompt_set, resolve_noised

    from pathlib import Path

    quick = str(Path(__file__).resolve().parents[1] / "prompts" / "quick.csv")
    out, store = tmp_path / "heads.csv", tmp_path / "store"
    args = ["heads", "--prompts", quick, "--limit", "1", "--samples", "1", "--seed", "3",
            "--store", str(store), "--out", str(out), "--quiet"]
    assert main(args) == 0
    table = pd.read_csv(out)
    row = load_prompt_set(quick).iloc[0]
    noised = resolve_noised(embedded, row["prompt"], row["subject"], row.get("noised"))
    direct = head_trace(embedded, row["prompt"], noised, noise=0.4, samples=1, seed=3, target=row["expected"])
    grid = table.pivot(index="layer", columns="head", values="mean").to_numpy()
    np.testing.assert_allclose(grid, direct.metric("normalised"), atol=1e-6)
    assert main(args) == 0  # from the store now
    assert main(args[:-1] + ["--samples", "0"]) == 2
