"""Model loading, adapters and the block runner."""

from __future__ import annotations

import time

import pytest
import torch

import tracing
from tracing.model.runner import Runner
from conftest import FAMILIES

EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_matches_model_forward(tiny, family):
    """Block-by-block run reproduces the model's own logits, for every family."""
    lm = tiny(family)
    ids = lm.tokenizer(EIFFEL, return_tensors="pt").input_ids
    runner = Runner(lm)
    states = runner.hidden_states(ids)
    assert len(states) == lm.n_layers + 1
    ours = runner.logits(states[-1])
    theirs = lm.model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_parts_exist(tiny, family):
    lm = tiny(family)
    adapter = lm.adapter
    block = lm.model.get_submodule(adapter.blocks)[0]
    assert block.get_submodule(adapter.mlp) is not None
    assert block.get_submodule(adapter.attn) is not None
    assert lm.n_layers == 3 and lm.n_heads == 4 and lm.d_model == 32


def test_recorded_attention_matches_eager(tiny):
    """Recorded weights equal an eager forward's output_attentions, and rows sum to one."""
    lm = tiny("llama")
    ids = lm.tokenizer(EIFFEL, return_tensors="pt").input_ids
    recorded = {}
    with tracing.record_attention(lambda layer, w: recorded.__setitem__(layer, w)):
        Runner(lm).hidden_states(ids)
    lm.model.config._attn_implementation = "eager"
    try:
        eager = lm.model(ids, output_attentions=True).attentions
    finally:
        lm.model.config._attn_implementation = tracing.model.runner.ATTENTION_IMPLEMENTATION
    for layer in range(lm.n_layers):
        torch.testing.assert_close(recorded[layer], eager[layer], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(recorded[layer].sum(-1), torch.ones_like(recorded[layer].sum(-1)))


def test_unsupported_architecture_names_supported_families():
    with pytest.raises(tracing.UnsupportedArchitectureError, match="GPT-2.*Llama.*Pythia"):
        tracing.adapter_for("t5")


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "No model name"),
        ("not a model!", "is not a model name"),
        ("./no/such/folder", "not a model folder"),
        ("missing.gguf", "No GGUF file"),
    ],
)
def test_bad_names_fail_clearly(name, message):
    with pytest.raises(tracing.ModelLoadError, match=message):
        tracing.load_model(name)


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    """No network: a clear 'seems offline' error within seconds, with a way forward."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(tracing.model.loading, "HUB_HOST", "huggingface.invalid")
    start = time.perf_counter()
    with pytest.raises(tracing.ModelLoadError, match="seems offline.*local"):
        tracing.load_model("gpt2-xl")
    assert time.perf_counter() - start < 15


@pytest.mark.slow
def test_embedded_model_predicts_paris(embedded):
    ids = embedded.tokenizer(EIFFEL, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = embedded.model(ids).logits[0, -1].softmax(-1)
    assert embedded.tokenizer.decode(int(probs.argmax())) == " Paris"
    assert float(probs.max()) > 0.5
    assert embedded.n_layers == 30 and embedded.n_heads == 9 and embedded.d_model == 576
    assert embedded.name == tracing.DEFAULT_MODEL


@pytest.mark.slow
def test_embedded_cached_load_is_quick(embedded):
    start = time.perf_counter()
    again = tracing.load_model(tracing.DEFAULT_MODEL)
    assert time.perf_counter() - start < 30
    assert again.n_layers == embedded.n_layers
