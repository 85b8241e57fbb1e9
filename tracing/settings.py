"""Trace settings: the choices, their ranges and defaults, the metrics, and one frozen type.

Everything that offers or checks a trace setting derives from this module: the engine
(``causal_trace`` validates through :class:`TraceSettings`), the result store's keys, run cards,
URL state, the CLI's choices and every page's widgets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

KINDS = ("hidden", "mlp", "attn")
CORRUPTIONS = ("gaussian", "uniform", "replace")
NOISE_MODES = ("absolute", "sigma")
CONVENTIONS = ("input", "output")
SEVER_PARTS = ("mlp", "attn")  # what a severed hidden-state trace keeps at its corrupted values

# Ranges offered by the pages, URLs, run cards and the CLI (the engine accepts any valid value).
NOISE_RANGE = {"absolute": (0.0, 2.0), "sigma": (0.0, 10.0)}
SAMPLES_RANGE = (1, 100)
SEED_RANGE = (0, 2**31 - 1)
WINDOW_RANGE = (1, 128)
MAX_SEED = 2**63 - 1  # what the engine's random generator accepts


@dataclass(frozen=True)
class Metric:
    """How a restoration is scored: name, display label, direction, and whether it needs a
    contrast answer."""

    name: str
    label: str
    lower_is_better: bool = False
    needs_contrast: bool = False


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("prob", "probability"),
    Metric("normalised", "normalised probability"),
    Metric("logprob", "log-probability"),
    Metric("logit_diff", "logit difference", needs_contrast=True),
    Metric("kl", "KL divergence from clean", lower_is_better=True),
)}


def metric_info(name: str) -> Metric:
    """The :class:`Metric` called ``name``; ValueError naming the known ones otherwise."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric '{name}'. Known: {', '.join(METRICS)}.")
    return METRICS[name]


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` mean a better restoration (KL divergence)."""
    return metric_info(metric).lower_is_better


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _answer(value: Any, what: str) -> int | str | None:
    """A target or contrast: a token id, a completion string, or None. An empty contrast is None
    (no contrast); an empty target is an error (None asks for the clean top-1 token)."""
    if value is None:
        return None
    if value == "":
        if what == "target":
            raise ValueError("The target is empty: give a completion, a token id, or None for the top-1 token.")
        return None
    if _is_int(value):
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"The {what} must be a token id or a completion string, not {type(value).__name__}.")
    return value


class _Unset:
    """The default of a keyword that was not given (take the value from ``settings``)."""

    def __repr__(self) -> str:
        return "<from settings>"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class TraceSettings:
    """Every setting of one causal trace except the prompt and the noised positions.

    ``noise`` is the standard deviation (Gaussian) or half-width (uniform) of the noise added to
    the token embeddings, in absolute units or, with ``noise_mode="sigma"``, in units of the
    embedding matrix's standard deviation. ``target``/``contrast``: a token id or a completion
    string (its first token after the prompt); ``target=None`` is the clean top-1 token.
    ``window``: layers restored around each column for the mlp/attn kinds. ``convention``: a
    hidden-state column l restores the state entering (``input``) or leaving (``output``) block l.
    ``sever`` (hidden kind only): "mlp" / "attn" keeps the MLP (attention) outputs at the restored
    token in every later block at their corrupted values (ROME's severed paths); None = nothing
    severed (left out of ``to_dict``, so keys of unsevered traces do not change).
    """

    kind: str = "hidden"
    noise: float = 0.4
    noise_mode: str = "absolute"
    corruption: str = "gaussian"
    replacement: str | None = None
    samples: int = 10
    seed: int = 0
    target: int | str | None = None
    contrast: int | str | None = None
    window: int = 10
    convention: str = "input"
    sever: str | None = None

    def __post_init__(self) -> None:
        for name, choices in (("kind", KINDS), ("corruption", CORRUPTIONS), ("noise_mode", NOISE_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"Unknown {name.replace('_', ' ')} '{getattr(self, name)}'. "
                                 f"Use one of: {', '.join(choices)}.")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"Unknown layer convention '{self.convention}'. Use 'input' or 'output'.")
        if self.corruption != "replace":
            try:
                ok = math.isfinite(float(self.noise)) and float(self.noise) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"The noise level must be a finite number >= 0, not {self.noise!r}.")
        for name, low in (("samples", 1), ("window", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}.")
        if not _is_int(self.seed) or not 0 <= int(self.seed) <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, not {self.seed!r}.")
        sever = None if self.sever in (None, "") else self.sever
        if sever is not None and sever not in SEVER_PARTS:
            raise ValueError(f"Unknown sever '{self.sever}'. Use 'mlp', 'attn' or None (nothing severed).")
        if sever is not None and self.kind != "hidden":
            raise ValueError(f"Severing (sever='{sever}') needs the hidden kind, not '{self.kind}': it cuts the "
                             "later MLP or attention outputs of a restored hidden state.")
        replace = self.corruption == "replace"
        normal = {
            "sever": sever,
            "noise": float(self.noise or 0), "samples": int(self.samples), "seed": int(self.seed),
            "window": int(self.window), "target": _answer(self.target, "target"),
            "contrast": _answer(self.contrast, "contrast"), "replacement": self.replacement if replace else None,
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    @property
    def effective_samples(self) -> int:
        """Corrupted runs actually made: one for token replacement, else ``samples``."""
        return 1 if self.corruption == "replace" else self.samples

    def replace(self, **changes: Any) -> "TraceSettings":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name, JSON-able; ``sever`` only when something is severed (so the
        result store's keys of unsevered traces stay what they were)."""
        out = dataclasses.asdict(self)
        if out["sever"] is None:
            del out["sever"]
        return out

    @classmethod
    def merged(cls, settings: "TraceSettings | None" = None, **given: Any) -> "TraceSettings":
        """``settings`` (default: the defaults) with every keyword that was given (is not
        ``UNSET``) replacing its value: how a function taking both ``settings=`` and single
        keywords resolves them."""
        base = settings if settings is not None else DEFAULTS
        changes = {k: v for k, v in given.items() if v is not UNSET}
        return base.replace(**changes) if changes else base

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TraceSettings":
        """Settings from a mapping; missing names take their defaults, unknown ones are an error
        (``noised`` and ``rows`` are accepted and ignored: they belong to one prompt's trace)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names - {"noised", "rows"}
        if unknown:
            raise ValueError(f"Unknown trace settings: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in values.items() if k in names})


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(TraceSettings))
DEFAULTS = TraceSettings()
# The pages start from fewer samples than ROME's 10: each sample is a full trace, and 3 keep a
# slider move live on a CPU.
INTERACTIVE = TraceSettings(samples=3)
