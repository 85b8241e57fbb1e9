"""Hidden-state trajectories and the logit lens (tracing/hidden.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAMILIES
from tracing import hidden
from tracing.charts import hidden as hidden_charts
from tracing.charts import style

PROMPT = "The Eiffel Tower is in the city of"
TOO_LONG = "word " * 400  # tiny models take 256 tokens


def hooked_states(lm, prompt: str) -> np.ndarray:
    """Block inputs (pre-hooks) and the last block's output (hook) at the final token."""
    blocks = lm.model.get_submodule(lm.adapter.blocks)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre(layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            inputs[layer] = h[0, -1].detach().clone()
        return hook

    def post(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            outputs[layer] = h[0, -1].detach().clone()
        return hook

    try:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre(layer), with_kwargs=True))
            handles.append(block.register_forward_hook(post(layer)))
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
        with torch.inference_mode():
            lm.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    rows = [inputs[layer] for layer in range(len(blocks))] + [outputs[len(blocks) - 1]]
    return torch.stack(rows).float().cpu().numpy()


def check_states(lm, atol: float) -> None:
    got = hidden.final_token_states(lm, PROMPT)
    want = hooked_states(lm, PROMPT)
    assert got.shape == (lm.n_layers + 1, lm.d_model)
    assert isinstance(got, np.ndarray)
    scale = np.abs(want).max(axis=-1, keepdims=True)
    np.testing.assert_allclose(got / scale, want / scale, atol=atol)
    # the block outputs, too, match the next block's input
    assert not np.allclose(got[0], got[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_final_token_states_match_hooks_tiny(tiny, family):
    check_states(tiny(family), atol=1e-5)


@pytest.mark.slow
def test_final_token_states_match_hooks_embedded(embedded):
    check_states(embedded, atol=1e-4)


def test_final_token_states_bad_prompts(tiny):
    lm = tiny("gpt2")
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            hidden.final_token_states(lm, bad)
    with pytest.raises(ValueError, match="context of 256"):
        hidden.final_token_states(lm, "word " * 400)


# Hand-made trajectory: h0=(3,4,0) h1=(3,4,12) h2=(3,4,0) h3=(9,12,0)
# steps d0=(0,0,12) d1=(0,0,-12) d2=(6,8,0)
STATES = np.array([[3, 4, 0], [3, 4, 12], [3, 4, 0], [9, 12, 0]], dtype=np.float32)


def test_trajectory_measures_hand_computed():
    m = hidden.trajectory_measures(STATES)
    np.testing.assert_allclose(m["norm"], [5, 13, 5, 15])
    np.testing.assert_allclose(m["cosine"], [25 / 65, 25 / 65, 1.0])
    np.testing.assert_allclose(m["step"], [12, 12, 10])
    np.testing.assert_allclose(m["step_cosine"], [-1.0, 0.0], atol=1e-12)
    for name, values in m.items():
        assert len(values) == len(hidden.measure_layers(name, 3))


def test_trajectory_measures_zero_vectors_give_nan():
    m = hidden.trajectory_measures(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    assert math.isnan(m["cosine"][0]) and m["cosine"][1] == pytest.approx(1.0)
    assert math.isnan(m["step_cosine"][0])  # second step is zero
    with pytest.raises(ValueError):
        hidden.trajectory_measures(np.zeros(3))


def test_trajectory_measures_match_numpy_on_random():
    h = np.random.default_rng(0).normal(size=(7, 16))
    m = hidden.trajectory_measures(h)
    for l in range(6):
        a, b = h[l], h[l + 1]
        assert m["cosine"][l] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert m["step"][l] == pytest.approx(np.sqrt(((b - a) ** 2).sum()))
    d = np.diff(h, axis=0)
    want = d[2] @ d[3] / np.linalg.norm(d[2]) / np.linalg.norm(d[3])
    assert m["step_cosine"][2] == pytest.approx(want)


def long_frame(rows):
    columns = ["category", "prompt_index", "prompt", "measure", "layer", "value"]
    return pd.DataFrame(rows, columns=columns)


def test_summarise_mean_and_spread_by_hand():
    frame = long_frame([
        ("non_english", 0, "a", "norm", 0, 1.0),
        ("plain_english", 1, "b", "norm", 0, 3.0),
        ("semantic", 2, "c", "norm", 0, 10.0),
        ("semantic", 3, "d", "norm", 0, 14.0),
        ("semantic", 4, "e", "norm", 0, float("nan")),
    ])
    combined = hidden.summarise(frame, combine_regurgitation=True).set_index("group")
    assert set(combined.index) == {"regurgitation", "semantic"}
    assert combined.loc["regurgitation", "mean"] == 2.0
    assert combined.loc["regurgitation", "std"] == pytest.approx(math.sqrt(2))
    assert combined.loc["regurgitation", "sem"] == pytest.approx(1.0)
    assert combined.loc["semantic", "mean"] == 12.0 and combined.loc["semantic", "n"] == 2
    separate = hidden.summarise(frame, combine_regurgitation=False).set_index("group")
    # tracing.analysis.describe: one prompt has no spread (std and sem NaN, not 0)
    assert separate.loc["non_english", "mean"] == 1.0 and math.isnan(separate.loc["non_english", "std"])
    assert math.isnan(separate.loc["non_english", "sem"]) and separate.loc["non_english", "n"] == 1
    assert len(separate) == 3


def check_lens(lm) -> None:
    lens = hidden.logit_lens(lm, PROMPT, k=5)
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids.to(lm.device)
    with torch.inference_mode():
        probs = lm.model(ids).logits[0, -1].float().softmax(-1).cpu()
    top = probs.topk(5)
    assert lens.top_probs.shape == (lm.n_layers + 1, 5)
    np.testing.assert_array_equal(lens.top_ids[-1], top.indices.numpy())
    np.testing.assert_allclose(lens.top_probs[-1], top.values.numpy(), rtol=1e-4, atol=1e-6)
    assert lens.target_id == int(top.indices[0])
    assert lens.target_probs[-1] == pytest.approx(float(top.values[0]), rel=1e-4)
    assert lens.target_ranks[-1] == 1
    assert np.all(np.diff(lens.top_probs, axis=1) <= 0)  # sorted per layer
    assert np.all((lens.top_probs > 0) & (lens.top_probs <= 1))
    assert lens.top_tokens[-1][0] == lm.tokenizer.decode([lens.target_id])


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_last_row_is_model_prediction_tiny(tiny, family):
    check_lens(tiny(family))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_logit_lens_every_row_from_hooked_states(tiny, family):
    lm = tiny(family)
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    with torch.inference_mode():
        states = torch.from_numpy(hooked_states(lm, PROMPT))
        probs = unembed(norm(states)).float().softmax(-1).numpy()
    lens = hidden.logit_lens(lm, PROMPT, k=3, target=" Paris")
    target = lm.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    np.testing.assert_allclose(lens.target_probs, probs[:, target], rtol=1e-4)
    np.testing.assert_allclose(lens.top_probs[:, 0], probs.max(-1), rtol=1e-4)
    np.testing.assert_array_equal(lens.target_ranks, (probs > probs[:, [target]]).sum(-1) + 1)


@pytest.mark.slow
def test_logit_lens_embedded_target_string(embedded):
    check_lens(embedded)
    lens = hidden.logit_lens(embedded, PROMPT, k=3, target=" Paris")
    assert lens.target == " Paris" and lens.top_tokens[-1][0] == " Paris"
    assert lens.target_probs[-1] > 0.2
    assert lens.target_probs[0] < 0.01  # the embedding of " of" does not predict " Paris"
    other = hidden.logit_lens(embedded, PROMPT, k=3, target=" London")
    assert other.target_ranks[-1] > 1 and other.target_probs[-1] < lens.target_probs[-1]
    table = lens.table()
    assert list(table.columns) == ["layer", "rank", "token", "token_id", "prob"]
    assert len(table) == 3 * (embedded.n_layers + 1)


def test_logit_lens_target_forms_and_errors(tiny):
    lm = tiny("llama")
    first = lm.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    by_string = hidden.logit_lens(lm, PROMPT, k=2, target=" Paris")
    by_id = hidden.logit_lens(lm, PROMPT, k=2, target=first)
    assert by_string.target_id == by_id.target_id == first
    np.testing.assert_allclose(by_string.target_probs, by_id.target_probs)
    with pytest.raises(ValueError, match="empty"):
        hidden.logit_lens(lm, PROMPT, target="")
    with pytest.raises(ValueError, match="vocabulary"):
        hidden.logit_lens(lm, PROMPT, target=10**9)
    with pytest.raises(ValueError, match="empty"):
        hidden.logit_lens(lm, "")


def test_prompt_set_trajectories_tiny(tiny):
    lm = tiny("qwen2")
    prompts = pd.DataFrame({
        "category": ["non_english", "semantic"],
        "prompt": ["abc def", PROMPT],
        "expected": ["", " Paris"],
    })
    seen = []
    frame = hidden.prompt_set_trajectories(lm, prompts, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    one = frame[(frame.prompt_index == 1)]
    states = hidden.final_token_states(lm, PROMPT)
    norms = one[one.measure == "norm"].sort_values("layer")["value"].to_numpy()
    np.testing.assert_allclose(norms, np.linalg.norm(states, axis=-1), rtol=1e-5)
    lens = hidden.logit_lens(lm, PROMPT, target=" Paris")
    target = one[one.measure == "target_prob"].sort_values("layer")["value"].to_numpy()
    np.testing.assert_allclose(target, lens.target_probs, rtol=1e-5)
    counts = frame[frame.prompt_index == 0].groupby("measure").size().to_dict()
    L = lm.n_layers
    assert counts == {"norm": L + 1, "target_prob": L + 1, "cosine": L, "step": L,
                      "step_cosine": L - 1}
    with pytest.raises(ValueError):
        hidden.prompt_set_trajectories(lm, prompts.iloc[:0])


def test_prompt_set_batches_match_single_prompts(tiny):
    lm = tiny("gpt2")
    texts = ["one two three", "four five six", "seven eight nine", "alpha beta", PROMPT]
    lengths = [len(lm.tokenizer(t).input_ids) for t in texts]
    assert len(set(lengths)) < len(texts), "some prompts must share a length"
    prompts = pd.DataFrame({"category": ["semantic"] * 5, "prompt": texts, "expected": [""] * 5})
    batched = hidden.prompt_set_trajectories(lm, prompts, batch_size=2)
    assert list(batched.drop_duplicates("prompt_index")["prompt"]) == texts
    for i, text in enumerate(texts):
        single = hidden.prompt_trajectory(lm, text)
        mine = batched[batched.prompt_index == i]
        for name, values in single.items():
            got = mine[mine.measure == name].sort_values("layer")["value"].to_numpy()
            np.testing.assert_allclose(got, values, rtol=1e-4, atol=1e-6, err_msg=f"{text} {name}")


def test_prompt_set_bad_prompt_names_its_row(tiny):
    prompts = pd.DataFrame({"category": ["semantic"] * 2, "prompt": ["fine", " "],
                            "expected": ["", ""]})
    with pytest.raises(ValueError, match="Prompt 2: The prompt is empty"):
        hidden.prompt_set_trajectories(tiny("gpt2"), prompts)


def test_hidden_state_functions_reject_bad_prompts(tiny):
    lm = tiny("gpt2")
    for prompt in (None, "", " \n "):
        with pytest.raises(ValueError, match="empty"):
            hidden.final_token_states(lm, prompt)
        with pytest.raises(ValueError, match="empty"):
            hidden.prompt_trajectory(lm, prompt)
    with pytest.raises(ValueError, match="context|at most"):
        hidden.logit_lens(lm, TOO_LONG)
    with pytest.raises(ValueError, match="context|at most"):
        hidden.prompt_trajectory(lm, TOO_LONG)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        hidden.logit_lens(lm, PROMPT, target=-1)
    with pytest.raises(ValueError, match="Unknown measure"):
        hidden.measure_layers("curvature", 3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        hidden.trajectory_measures(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        hidden.trajectory_measures(np.zeros(4))


@pytest.mark.parametrize("target", [1.5, True, ["a"]])
def test_logit_lens_rejects_targets_of_the_wrong_type(tiny, target):
    """1.5 is not 'The target completion is empty.' and True is not token id 1."""
    with pytest.raises(ValueError, match="token id|string") as info:
        hidden.logit_lens(tiny("gpt2"), PROMPT, target=target)
    assert "empty" not in str(info.value)


def test_prompt_set_trajectories_names_the_bad_row(tiny):
    frame = pd.DataFrame({"category": ["semantic"] * 3, "prompt": ["fine", "also fine", TOO_LONG],
                          "expected": ["", "", ""]})
    with pytest.raises(ValueError, match="Prompt 3: .*(context|at most)"):
        hidden.prompt_set_trajectories(tiny("gpt2"), frame)


def test_show_token_makes_whitespace_visible():
    show = style.show_token
    assert show(" Paris") == "␣Paris" and show("\n") == "↵" and show("") == "∅"
    assert show("\xa0") == "\\xa0" and show("é") == "é"


def test_trajectory_figure_rows_and_crop():
    frame = long_frame([
        (cat, i, f"p{i}", "norm", layer, float(layer * (i + 1)))
        for i, cat in enumerate(["non_english", "plain_english", "semantic"])
        for layer in range(7)
    ])
    summary = hidden.summarise(frame)
    spec = hidden_charts.trajectory_figure(summary, ["norm"], (2, 4)).to_dict()
    left, right = spec["vconcat"][0]["hconcat"]
    datasets = spec["datasets"]
    layers = lambda chart: {row["layer"] for row in datasets[chart["layer"][-1]["data"]["name"]]}
    assert layers(left) == set(range(7)) and layers(right) == {2, 3, 4}
    with pytest.raises(ValueError):
        hidden_charts.trajectory_figure(summary, [], (2, 4))


def test_lens_charts_mark_the_target(tiny):
    lens = hidden.logit_lens(tiny("gpt2"), PROMPT, k=4)
    frame = hidden_charts.lens_frame(lens)
    assert frame.loc[frame["is_target"], "layer"].max() == lens.n_layers
    assert frame[(frame.layer == lens.n_layers) & (frame["rank"] == 1)]["is_target"].item()
    wide = hidden_charts.lens_wide_table(lens)
    assert len(wide) == lens.n_layers + 1 and list(wide["target rank"])[-1] == 1
    for chart in (hidden_charts.lens_heatmap(lens), hidden_charts.target_curve(lens, "rank")):
        chart.to_dict()
