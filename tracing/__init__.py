"""Causal tracing of language models: a plain library (no Streamlit).

Layers, bottom up: ``tracing.model`` (loading, adapters, block runner, hooks, tokens);
``settings`` (the trace settings type and metrics); the analyses ``causal`` (the engine),
``attention``, ``hidden``, ``batch`` and the shared rules in ``analysis`` and ``categories``;
I/O in ``prompts``, ``store`` and ``runcard``; ``tracing.charts`` draws them with Altair.
"""

from .analysis import describe, followed_token, handover_layer, transition_layer
from .attention import attention_to
from .batch import run_batch
from .categories import CATEGORIES
from .causal import Trace, TraceCancelled, causal_trace
from .heads import HeadTrace, head_trace
from .hidden import LogitLens, final_token_states, logit_lens
from .model import (DEFAULT_MODEL, EXAMPLE_MODELS, LoadedModel, ModelLoadError, Runner,
                    UnsupportedArchitectureError, adapter_for, load_model, record_attention,
                    supported_families)
from .model.tokens import subject_positions
from .prompts import PromptSetError, load_prompt_set, noised_positions
from .rome import average_indirect_effects
from .settings import METRICS, Metric, TraceSettings
from .store import ResultStore

__all__ = [
    "CATEGORIES", "DEFAULT_MODEL", "EXAMPLE_MODELS", "HeadTrace", "LoadedModel", "LogitLens", "METRICS",
    "Metric", "ModelLoadError", "PromptSetError", "ResultStore", "Runner", "Trace",
    "TraceCancelled", "TraceSettings", "UnsupportedArchitectureError", "adapter_for",
    "attention_to", "average_indirect_effects", "causal_trace", "describe", "final_token_states", "followed_token",
    "handover_layer", "head_trace", "load_model", "load_prompt_set", "logit_lens", "noised_positions",
    "record_attention", "run_batch", "subject_positions", "supported_families",
    "transition_layer",
]
