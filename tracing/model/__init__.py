"""The model layer: loading, one adapter per architecture family, the hook-free block runner,
thread-owned hooks and the one tokenization rule. Everything above it is architecture-free."""

from .adapters import Adapter, UnsupportedArchitectureError, adapter_for, supported_families
from .loading import DEFAULT_MODEL, EXAMPLE_MODELS, LoadedModel, ModelLoadError, load_model
from .runner import Runner, record_attention

__all__ = [
    "Adapter", "DEFAULT_MODEL", "EXAMPLE_MODELS", "LoadedModel", "ModelLoadError", "Runner",
    "UnsupportedArchitectureError", "adapter_for", "load_model", "record_attention",
    "supported_families",
]
