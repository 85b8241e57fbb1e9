"""Causal tracing of language models: a plain library (no Streamlit)."""

from .adapters import UnsupportedArchitectureError, adapter_for, supported_families
from .causal import METRICS, Trace, TraceCancelled, causal_trace, subject_positions
from .models import DEFAULT_MODEL, EXAMPLE_MODELS, LoadedModel, ModelLoadError, load_model
from .runner import Runner, record_attention

__all__ = [
    "METRICS",
    "Trace",
    "TraceCancelled",
    "causal_trace",
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
