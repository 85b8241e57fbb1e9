"""Shared fixtures: the embedded model (loaded once), tiny random models of every family, and a
private cache for every test.

No test writes into the user's ``~/.cache``: for the whole session ``CAUSAL_TRACING_CACHE`` (the
model cache, ``tracing.model.loading.cache_root()``) points at one temporary folder, into which the
embedded GGUF model is converted once and then shared by every test; each test gets its own empty
result store (``CAUSAL_TRACING_RESULTS``), returned by the ``results_dir`` fixture. Set
``CAUSAL_TRACING_TEST_CACHE`` to a folder to keep the converted model between sessions (it saves
the ~20 s conversion on every targeted run).

Test traces with known numbers come from ``tests/factory.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tracing  # noqa: E402
from tracing.model.loading import model_from_config  # noqa: E402

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

CACHE_ENV = "CAUSAL_TRACING_CACHE"  # tracing.model.loading.cache_root(): converted models
RESULTS_ENV = "CAUSAL_TRACING_RESULTS"  # tracing.store.default_root(): stored traces
KEEP_CACHE_ENV = "CAUSAL_TRACING_TEST_CACHE"  # optional: a model cache kept between sessions
# The trace page asks before an exact trace it expects to take over a minute; the estimate depends
# on this machine's speed and load, so tests go ahead unless a test sets a limit itself.
os.environ.setdefault("CAUSAL_TRACING_ASK_S", "1e9")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """The session's model cache (``CAUSAL_TRACING_CACHE``): a temporary folder, or the folder
    named by ``CAUSAL_TRACING_TEST_CACHE``. Set for the whole session before any other fixture
    (session fixtures such as ``embedded`` load through it), so the embedded model is converted
    once per session and read by every test from there. Session-scoped fixtures that store
    results write into ``<cache>/session-results``; each test gets its own (``results_dir``)."""
    kept = os.environ.get(KEEP_CACHE_ENV)
    root = Path(kept).expanduser().resolve() if kept else tmp_path_factory.mktemp("cache")
    root.mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in (CACHE_ENV, RESULTS_ENV)}
    os.environ[CACHE_ENV] = str(root)
    os.environ[RESULTS_ENV] = str(root / "session-results")
    try:
        yield root
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def results_dir(model_cache, tmp_path_factory, monkeypatch) -> Path:
    """Every test's own, empty result store (``CAUSAL_TRACING_RESULTS``), with the session's model
    cache (a test may change either with monkeypatch; both are restored after it). Subprocesses
    and app servers a test starts inherit both."""
    results = tmp_path_factory.mktemp("results")
    monkeypatch.setenv(CACHE_ENV, str(model_cache))
    monkeypatch.setenv(RESULTS_ENV, str(results))
    return results


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
def embedded(model_cache) -> tracing.LoadedModel:
    """The embedded pretrained SmolLM2-135M-Instruct (converted once into the session's model
    cache, then shared)."""
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
