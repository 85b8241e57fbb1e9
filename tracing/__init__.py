"""Causal tracing of language models: a plain library (no Streamlit)."""

from .adapters import UnsupportedArchitectureError, adapter_for, supported_families
from .attention import attention_to
from .causal import METRICS, Trace, TraceCancelled, causal_trace, subject_positions
from .hidden import LogitLens, final_token_states, logit_lens
from .models import DEFAULT_MODEL, EXAMPLE_MODELS, LoadedModel, ModelLoadError, load_model
from .batch import run_batch
from .prompts import CATEGORIES, PromptSetError, load_prompt_set, noised_positions
from .runner import Runner, record_attention
from .store import ResultStore

__all__ = [
    "CATEGORIES",
    "PromptSetError",
    "ResultStore",
    "load_prompt_set",
    "noised_positions",
    "run_batch",
    "METRICS",
    "Trace",
    "TraceCancelled",
    "attention_to",
    "causal_trace",
    "final_token_states",
    "logit_lens",
    "LogitLens",
    "subject_positions",
    "DEFAULT_MODEL",
    "EXAMPLE_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "Runner",
    "UnsupportedArchitectureError",
    "adapter_for",
    "load_model",
    "record_attention",
    "supported_families",
]
