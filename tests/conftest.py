"""Shared fixtures: the embedded model (loaded once) and tiny random models of every family."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tracing  # noqa: E402
from tracing.models import model_from_config  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _always_app_navigation() -> None:
    """Make AppTest run app.py's st.navigation on every run, as a live server does after its
    first run. (AppTest resets Streamlit's legacy `pages/` folder flag before each run, which
    would otherwise run a selected page on its own, without app.py and its sidebar.)"""
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    PagesManager.__init__ = init


_always_app_navigation()

FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox", "gptj")


def tiny_config(family: str, vocab_size: int, n_layers: int = 3):
    """A few layers, a few heads, small width: fast, random, offline."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, initializer_range=0.3)  # large weights: visible effects
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=n_layers, n_head=4, n_embd=32, n_positions=256, **common)
    if family in ("llama", "qwen2"):
        return AutoConfig.for_model(
            family,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=256,
            **common,
        )
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox",
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=256,
            rotary_pct=0.5,
            **common,
        )
    if family == "gptj":
        return AutoConfig.for_model(
            "gptj", n_layer=n_layers, n_head=4, n_embd=32, rotary_dim=4, n_positions=256, **common
        )
    raise ValueError(family)


@pytest.fixture(scope="session")
def embedded() -> tracing.LoadedModel:
    """The embedded pretrained SmolLM2-135M-Instruct (converted once, then cached)."""
    return tracing.load_model(tracing.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(embedded):
    return embedded.tokenizer


@pytest.fixture(scope="session")
def tiny(tokenizer):
    """tiny(family) -> a LoadedModel with random weights and the embedded model's tokenizer."""
    made: dict[str, tracing.LoadedModel] = {}

    def make(family: str) -> tracing.LoadedModel:
        if family not in made:
            config = tiny_config(family, vocab_size=len(tokenizer))
            made[family] = model_from_config(config, tokenizer, name=f"tiny-{family}")
        return made[family]

    return make
