"""Each page's own settings as a typed, frozen object, read from and written to the URL.

No Streamlit here: ``parse(query) -> (state, problems)`` turns URL query parameters into a page
state (a garbage value takes its default and adds a problem message), ``to_query()`` gives the
query parameters back (every setting, so a shared link reproduces the page). The pages map the
fields onto their widgets (``WIDGETS``: field -> widget key).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from tracing import hidden, prompts, runcard
from tracing.query import Parser, choice, flag, integer, number, pair, subset, text as _text
from tracing.attention import TARGETS as ATTENTION_TARGETS
from tracing.batch import MIN_EFFECT, TARGETS as BATCH_TARGETS
from tracing.charts.averages import SPREADS as AVERAGE_SPREADS
from tracing.charts.hidden import CURVE_SCALES, SPREADS
from tracing.heads import TOKENS as HEAD_TOKENS
from tracing.settings import INTERACTIVE, DEFAULTS, KINDS, NOISE_MODES, NOISE_RANGE, SAMPLES_RANGE, SEED_RANGE, WINDOW_RANGE

UPLOAD = "Upload a CSV…"  # the prompt-set choice that asks for a file


def _shown(value: Any) -> str:
    """How a value is written in a URL."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}-{value[1]}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# ---------------------------------------------------------------------------------------------
# The shared machinery of the simple page states


class PageState:
    """Mixin of the frozen page-state dataclasses below: ``parse``, ``to_query``, ``replace``.

    Subclasses define ``PARSERS`` (field -> parser) and ``WIDGETS`` (field -> widget key)."""

    PARSERS: ClassVar[dict[str, Parser]] = {}
    WIDGETS: ClassVar[dict[str, str]] = {}

    @classmethod
    def parse(cls, query: Mapping[str, Any]) -> tuple["PageState", list[str]]:
        """A state from URL query parameters: unknown keys ignored, missing ones default, a bad
        value replaced by its default with a message in ``problems``."""
        default = cls()
        values, problems = {}, []
        for name, parser in cls.PARSERS.items():
            if name not in query:
                continue
            try:
                values[name] = parser(query[name])
            except (ValueError, TypeError, OverflowError) as exc:
                raw = str(query[name])
                raw = raw if len(raw) <= 40 else raw[:39] + "…"
                value = getattr(default, name)
                problems.append(f"`{name}={raw}` ignored ({exc}); using "
                                f"{'the default' if value is None else repr(value)}.")
        return dataclasses.replace(default, **values), problems

    def to_query(self) -> dict[str, str]:
        """Every setting as URL query parameters."""
        return {name: _shown(getattr(self, name)) for name in self.PARSERS}

    def replace(self, **changes: Any) -> "PageState":
        return dataclasses.replace(self, **changes)

    def widget_values(self) -> dict[str, Any]:
        """Widget key -> value."""
        return {key: getattr(self, name) for name, key in self.WIDGETS.items()}

    @classmethod
    def from_widgets(cls, values: Mapping[str, Any], fallback: "PageState | None" = None) -> "PageState":
        """The state the widgets show (``values``: widget key -> value); missing keys keep
        ``fallback``'s (or the default) value."""
        base = fallback or cls()
        changes = {}
        for name, key in cls.WIDGETS.items():
            if key in values and values[key] is not None:
                value = values[key]
                changes[name] = tuple(value) if isinstance(value, list) else value
        return dataclasses.replace(base, **changes)


def _set_names() -> tuple[str, ...]:
    return (*prompts.shipped_sets(), UPLOAD)


SET_CHOICE = choice(_set_names)
BATCH_NOISE = number(0.0, max(high for _, high in NOISE_RANGE.values()))


@dataclass(frozen=True)
class CategoriesState(PageState):
    """Category averages: the prompt set, the batch's trace settings and the averaging options."""

    prompt_set: str = "default"
    kind: str = DEFAULTS.kind
    noise: float = DEFAULTS.noise
    noise_mode: str = DEFAULTS.noise_mode
    samples: int = DEFAULTS.samples
    seed: int = DEFAULTS.seed
    target: str = "expected"
    window: int = DEFAULTS.window
    correct_only: bool = True
    combine: bool = False
    spread: str = "sem"
    min_effect: float = MIN_EFFECT

    PARSERS: ClassVar[dict[str, Parser]] = {
        "prompt_set": SET_CHOICE, "kind": choice(KINDS), "noise": BATCH_NOISE,
        "noise_mode": choice(NOISE_MODES), "samples": integer(*SAMPLES_RANGE),
        "seed": integer(*SEED_RANGE), "target": choice(BATCH_TARGETS),
        "window": integer(*WINDOW_RANGE), "correct_only": flag, "combine": flag,
        "spread": choice(tuple(AVERAGE_SPREADS)), "min_effect": number(0.0, 1.0),
    }
    WIDGETS: ClassVar[dict[str, str]] = {
        "prompt_set": "cat_choice", "kind": "cat_kind", "noise": "cat_noise", "noise_mode": "cat_mode",
        "samples": "cat_samples", "seed": "cat_seed", "target": "cat_target", "window": "cat_window",
        "correct_only": "cat_correct", "combine": "cat_combine", "spread": "cat_spread",
        "min_effect": "cat_min_effect",
    }

    @classmethod
    def parse(cls, query: Mapping[str, Any]) -> tuple["CategoriesState", list[str]]:
        state, problems = super().parse(query)
        high = NOISE_RANGE[state.noise_mode][1]
        if state.noise > high:
            problems.append(f"`noise={state.noise:g}` ignored (not a number from 0 to {high:g} with "
                            f"noise_mode={state.noise_mode}); using {DEFAULTS.noise:g}.")
            state = state.replace(noise=DEFAULTS.noise)
        return state, problems

    def batch_settings(self) -> dict[str, Any]:
        """The trace settings of the whole batch (``tracing.batch`` settings)."""
        settings = {"kind": self.kind, "noise": float(self.noise), "noise_mode": self.noise_mode,
                    "samples": int(self.samples), "seed": int(self.seed)}
        if self.kind != "hidden":
            settings["window"] = int(self.window)
        return settings


ATTENTION_TABS = ("By prompt type", "Per-head grids", "Single prompt", "Long texts")


@dataclass(frozen=True)
class AttentionState(PageState):
    """Attention: the open tab, the prompt set and its filters, the single prompt's layer and head,
    the long-text N x M and seed."""

    tab: str = ATTENTION_TABS[0]
    prompt_set: str = "default"
    skip_flagged: bool = True
    only_right: bool = False
    target: str = "noised"
    prompt: str = runcard.EXAMPLE_PROMPT
    layer: int | None = None  # None: the middle layer of the model
    head: str = "mean"  # "mean" or a head index
    long_n: int = 40
    long_m: int = 800
    long_seed: int = 0
    long_disjoint: bool = False  # non-overlapping long-text windows
    head_view: str = "attention"  # per-head grids: attention weights or causal effect
    fx_scope: str = "set"  # causal effect of a prompt set (per type) or of one prompt
    fx_token: str = "final"
    fx_noise: float = INTERACTIVE.noise
    fx_samples: int = INTERACTIVE.samples
    fx_seed: int = INTERACTIVE.seed
    fx_metric: str = "normalised"
    fx_prompt: int = 0

    PARSERS: ClassVar[dict[str, Parser]] = {
        "long_disjoint": flag, "head_view": choice(("attention", "effect")), "fx_scope": choice(("set", "one")),
        "fx_token": choice(tuple(HEAD_TOKENS)), "fx_noise": number(*NOISE_RANGE["absolute"]),
        "fx_samples": integer(*SAMPLES_RANGE), "fx_seed": integer(*SEED_RANGE),
        "fx_metric": choice(("normalised", "prob", "logprob", "kl")), "fx_prompt": integer(0, 10_000),
        "tab": choice(ATTENTION_TABS), "prompt_set": SET_CHOICE, "skip_flagged": flag,
        "only_right": flag, "target": choice(ATTENTION_TARGETS), "prompt": _text,
        "layer": integer(0, 10_000), "head": lambda v: "mean" if _text(v).strip() == "mean"
        else str(integer(0, 10_000)(v)),
        "long_n": integer(1, 500), "long_m": integer(2, 1_000_000), "long_seed": integer(*SEED_RANGE),
    }
    WIDGETS: ClassVar[dict[str, str]] = {
        "tab": "attn_tab", "prompt_set": "attn_set", "skip_flagged": "attn_skip_flagged",
        "only_right": "attn_only_right", "target": "attn_type_target", "prompt": "attn_single_prompt",
        "long_n": "attn_long_n", "long_seed": "attn_long_seed", "long_disjoint": "attn_long_disjoint",
        "head_view": "attn_head_view", "fx_scope": "attn_fx_scope", "fx_token": "attn_fx_token",
        "fx_noise": "attn_fx_noise", "fx_samples": "attn_fx_samples", "fx_seed": "attn_fx_seed",
        "fx_metric": "attn_fx_metric", "fx_prompt": "attn_fx_prompt",
    }  # layer, head and M have model-dependent ranges: the page sets them

    def to_query(self) -> dict[str, str]:
        query = super().to_query()
        if self.layer is None:
            query.pop("layer")
        return query


@dataclass(frozen=True)
class HiddenState(PageState):
    """Hidden states: the prompt set, the trajectory options and the logit lens's inputs."""

    prompt_set: str = "default"
    combine: bool = True
    spread: str = next(iter(SPREADS))
    per_prompt: bool = False
    crop: tuple[int, int] | None = None  # None: 10 % to 90 % of the model's layers
    measures: tuple[str, ...] = tuple(hidden.MEASURES)
    top_k: int = 5
    lens_scale: str = next(iter(CURVE_SCALES))

    PARSERS: ClassVar[dict[str, Parser]] = {
        "prompt_set": SET_CHOICE, "combine": flag, "spread": choice(tuple(SPREADS)), "per_prompt": flag,
        "crop": pair(0, 10_000), "measures": subset(tuple(hidden.MEASURES)), "top_k": integer(1, 10),
        "lens_scale": choice(tuple(CURVE_SCALES)),
    }
    WIDGETS: ClassVar[dict[str, str]] = {
        "prompt_set": "hidden_set", "combine": "hidden_combine", "spread": "hidden_spread",
        "per_prompt": "hidden_per_prompt", "measures": "hidden_measures", "top_k": "hidden_lens_k",
        "lens_scale": "hidden_lens_scale",
    }  # crop has a model-dependent range: the page sets it

    def to_query(self) -> dict[str, str]:
        query = super().to_query()
        if self.crop is None:
            query.pop("crop")
        return query


# ---------------------------------------------------------------------------------------------
# The trace page: a typed view of tracing.runcard's page state


@dataclass(frozen=True)
class TraceState(Mapping):
    """The single-prompt trace page's state: every field of ``tracing.runcard.DEFAULTS``
    (prompt, noised tokens, every trace setting, metric, sweep); tuples as attributes. A read-only
    mapping as well, in runcard's plain form (``state["tokens"]`` a list), so ``tracing.runcard``
    functions take it as it is."""

    prompt: str = runcard.DEFAULTS["prompt"]
    noise_by: str = runcard.DEFAULTS["noise_by"]
    subject: str = runcard.DEFAULTS["subject"]
    subject_tokens: str = runcard.DEFAULTS["subject_tokens"]
    tokens: tuple[int, ...] = tuple(runcard.DEFAULTS["tokens"])
    target: str = runcard.DEFAULTS["target"]
    contrast: str = runcard.DEFAULTS["contrast"]
    corruption: str = runcard.DEFAULTS["corruption"]
    noise_mode: str = runcard.DEFAULTS["noise_mode"]
    noise: float = runcard.DEFAULTS["noise"]
    replacement: str = runcard.DEFAULTS["replacement"]
    samples: int = runcard.DEFAULTS["samples"]
    seed: int = runcard.DEFAULTS["seed"]
    kind: str = runcard.DEFAULTS["kind"]
    window: int = runcard.DEFAULTS["window"]
    metric: str = runcard.DEFAULTS["metric"]
    convention: str = runcard.DEFAULTS["convention"]
    sweep: tuple[float, ...] = tuple(runcard.DEFAULTS["sweep"])
    sweep_on: bool = runcard.DEFAULTS["sweep_on"]
    rows: str = runcard.DEFAULTS["rows"]
    row_tokens: tuple[int, ...] = tuple(runcard.DEFAULTS["row_tokens"])
    tab: str = runcard.DEFAULTS["tab"]
    sever: str = runcard.DEFAULTS["sever"]
    sever_token: int = runcard.DEFAULTS["sever_token"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(i) for i in self.tokens))
        object.__setattr__(self, "row_tokens", tuple(int(i) for i in self.row_tokens))
        object.__setattr__(self, "sweep", tuple(float(v) for v in self.sweep))

    @classmethod
    def parse(cls, query: Mapping[str, Any]) -> tuple["TraceState", list[str]]:
        """``tracing.runcard.parse_state``, typed."""
        values, problems = runcard.parse_state(query)
        return cls.from_dict(values), problems

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TraceState":
        """A state from a full or partial state dict (missing names take their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_query(self) -> dict[str, str]:
        """``tracing.runcard.state_to_query``."""
        return runcard.state_to_query(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The plain dict ``tracing.runcard`` uses (lists for tokens and sweep)."""
        return dict(self.items())

    def replace(self, **changes: Any) -> "TraceState":
        return dataclasses.replace(self, **changes)

    # read-only mapping, in tracing.runcard's plain form (lists for tokens and sweep)
    def __getitem__(self, name: str) -> Any:
        if name not in runcard.DEFAULTS:
            raise KeyError(name)
        value = getattr(self, name)
        return list(value) if isinstance(value, tuple) else value

    def __iter__(self) -> Iterator[str]:
        return iter(runcard.DEFAULTS)

    def __len__(self) -> int:
        return len(runcard.DEFAULTS)


assert tuple(f.name for f in dataclasses.fields(TraceState)) == tuple(runcard.DEFAULTS), \
    "TraceState must have exactly the fields of tracing.runcard.DEFAULTS"
