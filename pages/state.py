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
from tracing.model.loading import DEFAULT_MODEL, MAX_NAME_CHARS
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
    """Category averages: the prompt set, the batch's own trace settings (used only with
    ``own_settings``; by default the batch takes the study's) and the averaging options."""

    prompt_set: str = "default"
    own_settings: bool = False  # False: kind, noise, samples, seed, window come from the study
    batch_kind: str = DEFAULTS.kind
    batch_noise: float = DEFAULTS.noise
    batch_noise_mode: str = DEFAULTS.noise_mode
    batch_samples: int = DEFAULTS.samples
    batch_seed: int = DEFAULTS.seed
    batch_window: int = DEFAULTS.window
    answer: str = "expected"  # trace the expected completion or the clean top-1 token
    correct_only: bool = True
    combine: bool = False
    spread: str = "sem"
    min_effect: float = MIN_EFFECT

    PARSERS: ClassVar[dict[str, Parser]] = {
        "prompt_set": SET_CHOICE, "own_settings": flag, "batch_kind": choice(KINDS), "batch_noise": BATCH_NOISE,
        "batch_noise_mode": choice(NOISE_MODES), "batch_samples": integer(*SAMPLES_RANGE),
        "batch_seed": integer(*SEED_RANGE), "answer": choice(BATCH_TARGETS),
        "batch_window": integer(*WINDOW_RANGE), "correct_only": flag, "combine": flag,
        "spread": choice(tuple(AVERAGE_SPREADS)), "min_effect": number(0.0, 1.0),
    }
    WIDGETS: ClassVar[dict[str, str]] = {
        "prompt_set": "cat_choice", "own_settings": "cat_own", "batch_kind": "cat_kind",
        "batch_noise": "cat_noise", "batch_noise_mode": "cat_mode", "batch_samples": "cat_samples",
        "batch_seed": "cat_seed", "answer": "cat_target", "batch_window": "cat_window",
        "correct_only": "cat_correct", "combine": "cat_combine", "spread": "cat_spread",
        "min_effect": "cat_min_effect",
    }

    @classmethod
    def parse(cls, query: Mapping[str, Any]) -> tuple["CategoriesState", list[str]]:
        state, problems = super().parse(query)
        high = NOISE_RANGE[state.batch_noise_mode][1]
        if state.batch_noise > high:
            problems.append(f"`batch_noise={state.batch_noise:g}` ignored (not a number from 0 to {high:g} "
                            f"with batch_noise_mode={state.batch_noise_mode}); using {DEFAULTS.noise:g}.")
            state = state.replace(batch_noise=DEFAULTS.noise)
        return state, problems

    def to_query(self) -> dict[str, str]:
        """The page's settings; the batch's own trace settings only when they are used."""
        query = super().to_query()
        if not self.own_settings:
            for name in ("batch_kind", "batch_noise", "batch_noise_mode", "batch_samples", "batch_seed",
                         "batch_window"):
                query.pop(name)
        return query

    def batch_settings(self, study: "Study | None" = None) -> dict[str, Any]:
        """The trace settings of the whole batch (``tracing.batch`` settings): the study's unless
        ``own_settings`` (or no study is given)."""
        if study is not None and not self.own_settings:
            return study.batch_settings()
        settings = {"kind": self.batch_kind, "noise": float(self.batch_noise), "noise_mode": self.batch_noise_mode,
                    "samples": int(self.batch_samples), "seed": int(self.batch_seed)}
        if self.batch_kind != "hidden":
            settings["window"] = int(self.batch_window)
        return settings


ROME_LIMIT = 2000  # "First N prompts" of the ROME page: at most this many (0: every prompt)


def _rome_kinds(value: Any) -> tuple[str, ...]:
    kinds = subset(KINDS)(value)
    if not kinds:
        raise ValueError(f"no kind: give one or more of {', '.join(KINDS)}")
    return kinds


@dataclass(frozen=True)
class RomeState(PageState):
    """ROME averages: the fact set, the kinds restored, the noise (ROME's rule or a given std),
    samples, seed, window, the first N prompts and whether only facts the model gets right count.
    The trace settings are the page's own, not the study's: their URL names start with ``rome_``."""

    prompt_set: str = "facts"
    rome_kinds: tuple[str, ...] = ("hidden",)
    noise_rule: bool = True  # ROME's rule: 3 x the std of the subject tokens' embeddings
    rome_noise: float = 0.1  # used only without the rule
    rome_samples: int = INTERACTIVE.samples
    rome_seed: int = 0
    limit: int = 0
    rome_window: int = 10  # used only for the MLP / attention kinds
    correct_only: bool = True

    PARSERS: ClassVar[dict[str, Parser]] = {
        "prompt_set": SET_CHOICE, "rome_kinds": _rome_kinds, "noise_rule": flag,
        "rome_noise": number(*NOISE_RANGE["absolute"]), "rome_samples": integer(*SAMPLES_RANGE),
        "rome_seed": integer(*SEED_RANGE), "limit": integer(0, ROME_LIMIT),
        "rome_window": integer(*WINDOW_RANGE), "correct_only": flag,
    }
    WIDGETS: ClassVar[dict[str, str]] = {
        "prompt_set": "rome_set", "rome_kinds": "rome_kinds", "noise_rule": "rome_rule",
        "rome_noise": "rome_noise", "rome_samples": "rome_samples", "rome_seed": "rome_seed",
        "limit": "rome_limit", "rome_window": "rome_window", "correct_only": "rome_correct",
    }

    def to_query(self) -> dict[str, str]:
        """Every setting; the noise only without ROME's rule, the window only for MLP / attention."""
        query = super().to_query()
        if self.noise_rule:
            query.pop("rome_noise")
        if all(kind == "hidden" for kind in self.rome_kinds):
            query.pop("rome_window")
        return query


ATTENTION_TABS = ("Single prompt", "By prompt type", "Per-head grids", "Long texts")
PROMPT_SOURCES = ("study", "own")  # the study's prompt (the trace page's), or one typed on the page


@dataclass(frozen=True)
class AttentionState(PageState):
    """Attention: the open tab, the prompt set and its filters, the single prompt (the study's or
    its own) with its layer and head, the long-text N x M and seed."""

    tab: str = ATTENTION_TABS[0]
    prompt_set: str = "default"
    skip_flagged: bool = True
    only_right: bool = False
    to_token: str = "noised"  # by prompt type: attention to the first, noised or final token
    source: str = "study"  # single prompt: the study's prompt or own_prompt
    own_prompt: str = runcard.EXAMPLE_PROMPT
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
        "only_right": flag, "to_token": choice(ATTENTION_TARGETS), "source": choice(PROMPT_SOURCES),
        "own_prompt": _text,
        "layer": integer(0, 10_000), "head": lambda v: "mean" if _text(v).strip() == "mean"
        else str(integer(0, 10_000)(v)),
        "long_n": integer(1, 500), "long_m": integer(2, 1_000_000), "long_seed": integer(*SEED_RANGE),
    }
    WIDGETS: ClassVar[dict[str, str]] = {
        "tab": "attn_tab", "prompt_set": "attn_set", "skip_flagged": "attn_skip_flagged",
        "only_right": "attn_only_right", "to_token": "attn_type_target", "source": "attn_source",
        "own_prompt": "attn_single_prompt",
        "long_n": "attn_long_n", "long_seed": "attn_long_seed", "long_disjoint": "attn_long_disjoint",
        "head_view": "attn_head_view", "fx_scope": "attn_fx_scope", "fx_token": "attn_fx_token",
        "fx_noise": "attn_fx_noise", "fx_samples": "attn_fx_samples", "fx_seed": "attn_fx_seed",
        "fx_metric": "attn_fx_metric", "fx_prompt": "attn_fx_prompt",
    }  # layer, head and M have model-dependent ranges: the page sets them

    def to_query(self) -> dict[str, str]:
        """Every setting; the own prompt only when it is shown."""
        query = super().to_query()
        if self.layer is None:
            query.pop("layer")
        if self.source != "own":
            query.pop("own_prompt")
        return query


@dataclass(frozen=True)
class HiddenState(PageState):
    """Hidden states: the open tab, the logit lens's prompt (the study's, a row of the prompt set, or
    its own prompt and target), the prompt set and the trajectory options."""

    TABS: ClassVar[tuple[str, ...]] = ("Logit lens", "Trajectories by prompt type")
    LENS_SOURCES: ClassVar[tuple[str, ...]] = ("study", "set", "own")

    tab: str = TABS[0]
    lens_source: str = LENS_SOURCES[0]
    lens_prompt: str = runcard.EXAMPLE_PROMPT  # lens_source "own": its prompt and target ("" = top-1)
    lens_target: str = ""
    lens_pick: int = 0  # lens_source "set": the row of the prompt set
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
        "lens_scale": choice(tuple(CURVE_SCALES)), "tab": choice(TABS), "lens_source": choice(LENS_SOURCES),
        "lens_prompt": _text, "lens_target": _text, "lens_pick": integer(0, 100_000),
    }
    WIDGETS: ClassVar[dict[str, str]] = {
        "prompt_set": "hidden_set", "combine": "hidden_combine", "spread": "hidden_spread",
        "per_prompt": "hidden_per_prompt", "measures": "hidden_measures", "top_k": "hidden_lens_k",
        "lens_scale": "hidden_lens_scale", "tab": "hidden_tab", "lens_source": "hidden_lens_source",
        "lens_prompt": "hidden_lens_prompt", "lens_target": "hidden_lens_target", "lens_pick": "hidden_lens_pick",
    }  # crop has a model-dependent range: the page sets it

    def to_query(self) -> dict[str, str]:
        """Every setting; the lens's own prompt and target, or its set row, only when they are used."""
        query = super().to_query()
        if self.crop is None:
            query.pop("crop")
        if self.lens_source != "own":
            query.pop("lens_prompt")
            query.pop("lens_target")
        if self.lens_source != "set":
            query.pop("lens_pick")
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
    compare: str = runcard.DEFAULTS["compare"]
    b_prompt: str = runcard.DEFAULTS["b_prompt"]
    b_subject: str = runcard.DEFAULTS["b_subject"]
    b_target: str = runcard.DEFAULTS["b_target"]
    b_noise: float = runcard.DEFAULTS["b_noise"]
    b_seed: int = runcard.DEFAULTS["b_seed"]

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


# ---------------------------------------------------------------------------------------------
# The study every page shares


STUDY_FIELDS = ("prompt", "noise_by", "subject", "subject_tokens", "tokens", "target", "contrast",
                "corruption", "noise_mode", "noise", "replacement", "samples", "seed", "kind", "window",
                "metric", "convention")  # the trace page's fields that make up the study


def _model_name(value: Any) -> str:
    name = _text(value).strip()
    if not name:
        raise ValueError("empty")
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise ValueError(f"not a model name (at most {MAX_NAME_CHARS} printable characters)")
    return name


@dataclass(frozen=True)
class Study:
    """The current study, one per browser session and shared by every page: the model, the prompt
    and its noised tokens (a subject, or picked indices), the expected and contrast completions and
    every trace setting. Every page writes it into its URL (``to_query``), so any page's link
    carries it; the trace page edits it, the other pages read it (the categories page may
    override its batch settings)."""

    model: str = DEFAULT_MODEL
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(i) for i in self.tokens))

    @classmethod
    def parse(cls, query: Mapping[str, Any]) -> tuple["Study", list[str]]:
        """A study from URL query parameters (any page's): unknown keys ignored, a bad value
        replaced by its default with a message in ``problems``."""
        values, problems = runcard.parse_state({k: v for k, v in query.items() if k in STUDY_FIELDS})
        model = DEFAULT_MODEL
        if "model" in query:
            try:
                model = _model_name(query["model"])
            except (ValueError, TypeError) as exc:
                raw = str(query["model"])
                problems.append(f"`model={raw if len(raw) <= 40 else raw[:39] + '…'}` ignored ({exc}); "
                                f"using {DEFAULT_MODEL!r}.")
        return cls.from_trace(values, model), problems

    @classmethod
    def from_trace(cls, state: Mapping[str, Any], model: str) -> "Study":
        """The study part of a trace-page state (a ``TraceState`` or runcard's plain dict)."""
        return cls(model=model, **{name: state[name] for name in STUDY_FIELDS})

    def trace_fields(self) -> dict[str, Any]:
        """The trace page's fields this study sets (``TraceState.replace(**study.trace_fields())``)."""
        return {name: getattr(self, name) for name in STUDY_FIELDS}

    def to_query(self) -> dict[str, str]:
        """The study as URL query parameters (the model first; tokens only when picked)."""
        values = {name: (list(v) if isinstance(v, tuple) else v) for name, v in self.trace_fields().items()}
        query = runcard.state_to_query({**runcard.DEFAULTS, **values})
        return {"model": self.model, **{k: v for k, v in query.items() if k in STUDY_FIELDS}}

    def replace(self, **changes: Any) -> "Study":
        return dataclasses.replace(self, **changes)

    def single_kind(self) -> str:
        """The study's kind, "hidden" when it restores all three (pages that trace one kind)."""
        return "hidden" if self.kind == "all" else self.kind

    def batch_settings(self) -> dict[str, Any]:
        """The study's settings for a prompt-set batch (``tracing.batch``): kind, noise level and
        mode, samples, seed (and window for MLP / attention)."""
        settings = {"kind": self.single_kind(), "noise": float(self.noise), "noise_mode": self.noise_mode,
                    "samples": int(self.samples), "seed": int(self.seed)}
        if settings["kind"] != "hidden":
            settings["window"] = int(self.window)
        return settings

    def describe(self) -> str:
        """One line for the pages that read the study: prompt, noised tokens, kind, noise."""
        prompt = self.prompt if len(self.prompt) <= 60 else self.prompt[:59] + "…"
        noised = (f"subject '{self.subject}'" + (" (last token)" if self.subject_tokens == "last" else "")
                  if self.noise_by == "subject" else f"tokens {', '.join(map(str, self.tokens)) or 'none'}")
        level = ("token replacement" if self.corruption == "replace"
                 else f"noise {self.noise:g}{' × σ' if self.noise_mode == 'sigma' else ''}")
        return (f"“{prompt}” · {noised} · {self.kind} · {level} · {self.samples} sample"
                f"{'s' if self.samples != 1 else ''} · seed {self.seed}")


STUDY_KEYS = frozenset(("model", *STUDY_FIELDS))
for _page in (CategoriesState, RomeState, AttentionState, HiddenState):
    assert not STUDY_KEYS & set(_page.PARSERS), f"{_page.__name__}'s URL names collide with the study's"
