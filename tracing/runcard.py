"""Page state, trace settings and run cards of single-prompt traces (no Streamlit).

- ``parse_state(raw)``: a page state from URL query parameters or a run card, with a problem
  message (and the default) for every value that is garbage.
- ``state_to_query(state)``: the URL query parameters of a page state.
- ``trace_request(lm, state, kind)``: the noised positions and ``causal_trace`` keyword arguments.
- ``run_card(trace, ...)``, ``to_json(...)``, ``to_csv(...)``: exports with everything needed to
  reproduce a trace; ``load_run_card(data, lm)`` reads a JSON export back (``RunCardError`` when it
  is malformed or from another model).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from . import query
from .causal import Trace, resolve_rows
from .model.tokens import subject_positions, tokenize
from .settings import (CONVENTIONS, CORRUPTIONS, INTERACTIVE, KINDS, METRICS, NOISE_MODES, NOISE_RANGE,
                       SEVER_PARTS,
                       SAMPLES_RANGE, SEED_RANGE, WINDOW_RANGE, TraceSettings)

if TYPE_CHECKING:
    from .model import LoadedModel

CARD_FORMAT = "causal-tracing run card"
CARD_VERSION = 1
EXAMPLE_PROMPT = "The Eiffel Tower is located in the city of"
EXAMPLE_SUBJECT = "Eiffel Tower"
KIND_CHOICES = KINDS + ("all",)
NOISE_BY = ("subject", "tokens")
SUBJECT_TOKENS = ("all", "last")
ROWS = ("all", "noised_final", "chosen")  # token rows to compute exactly (ROW_CHOICES + chosen ones)
TABS = ("heatmap", "compact", "sweep", "severed", "compare", "export")  # the trace page's result tabs
COMPARE = ("prompt", "noise", "seed")  # what trace B changes in the A/B comparison
EXAMPLE_B_PROMPT = "The Colosseum is located in the city of"
EXAMPLE_B_SUBJECT = "Colosseum"
SEVERS = ("none",) + SEVER_PARTS  # hidden kind: what stays corrupted at the restored token
MAX_TEXT = query.MAX_TEXT
MAX_SWEEP = 8
DEFAULT_SWEEP = (0.1, 0.3, 0.5, 1.0)
PACKAGES = ("causal-tracing", "torch", "transformers", "numpy", "pandas", "altair",
            "vl-convert-python", "streamlit", "safetensors")

DEFAULTS: dict[str, Any] = {
    "prompt": EXAMPLE_PROMPT,
    "noise_by": "subject",  # noise the subject's tokens, or the picked token indices
    "subject": EXAMPLE_SUBJECT,
    "subject_tokens": "all",  # all subject tokens (ROME) or only the last (the seed study)
    "tokens": [],
    "target": "",  # "" = the clean top-1 token, else an expected completion (its first token)
    "contrast": "",  # second answer for the logit difference
    "corruption": INTERACTIVE.corruption,
    "noise_mode": INTERACTIVE.noise_mode,
    "noise": INTERACTIVE.noise,  # = 3 × embedding σ of the embedded model (ROME's rule); the study used 0.5
    "replacement": "",
    "samples": INTERACTIVE.samples,
    "seed": INTERACTIVE.seed,
    "kind": INTERACTIVE.kind,
    "window": INTERACTIVE.window,
    "metric": "prob",
    "convention": INTERACTIVE.convention,
    "sweep": list(DEFAULT_SWEEP),
    "sweep_on": True,  # the sweep computes whenever its tab is open
    "rows": "all",  # every token row, only the noised tokens and the final token, or chosen rows
    "row_tokens": [],  # the chosen rows (rows="chosen")
    "tab": "heatmap",
    "sever": "none",  # hidden kind: sever the later MLP or attention outputs (ROME Fig. 3)
    "sever_token": -1,  # the severed-paths comparison's token (-1: the last noised token)
    "compare": "prompt",  # A/B: trace B is another prompt, or this one at another noise level or seed
    "b_prompt": EXAMPLE_B_PROMPT,  # compare=prompt: B's prompt, its subject noised like A's
    "b_subject": EXAMPLE_B_SUBJECT,
    "b_target": "",  # B's expected completion ("" = its clean top-1 token)
    "b_noise": 0.8,  # compare=noise
    "b_seed": 1,  # compare=seed
}
B_FIELDS = {"prompt": ("b_prompt", "b_subject", "b_target"), "noise": ("b_noise",), "seed": ("b_seed",)}
_TEXT = ("prompt", "subject", "target", "contrast", "replacement", "b_prompt", "b_subject", "b_target")
_CHOICES = {"noise_by": NOISE_BY, "subject_tokens": SUBJECT_TOKENS, "corruption": CORRUPTIONS,
            "noise_mode": NOISE_MODES, "kind": KIND_CHOICES, "metric": METRICS,
            "convention": CONVENTIONS, "rows": ROWS, "tab": TABS, "sever": SEVERS, "compare": COMPARE}
_INTS = {"samples": SAMPLES_RANGE, "seed": SEED_RANGE, "window": WINDOW_RANGE, "sever_token": (-1, 10**6),
         "b_seed": SEED_RANGE}


class RunCardError(ValueError):
    """A run card that cannot be loaded: malformed, or from another model."""


# ---------------------------------------------------------------------------------------------
# Page state


def _parse_one(name: str, value: Any, noise_mode: str) -> Any:
    """One validated state value (raises ValueError with a short reason)."""
    if name in _TEXT:
        return query.text(value)
    if name in _CHOICES:
        return query.choice(tuple(_CHOICES[name]))(value)
    if name in _INTS:
        return query.integer(*_INTS[name])(value)
    if name in ("noise", "b_noise"):
        return query.number(*NOISE_RANGE[noise_mode])(value)
    if name in ("tokens", "row_tokens"):
        indices = query.items(value)
        if len(indices) > 4096:
            raise ValueError("too many indices")
        return sorted({query.integer(0, 10**6)(v) for v in indices})
    if name == "sweep":
        levels = sorted({query.number(*NOISE_RANGE[noise_mode])(v) for v in query.items(value)})
        if not 1 <= len(levels) <= MAX_SWEEP:
            raise ValueError(f"give 1 to {MAX_SWEEP} noise levels")
        return levels
    if name == "sweep_on":
        return query.flag(value)
    raise KeyError(name)


def parse_state(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A full page state from ``raw`` (query parameters or a run card's page state).

    Missing keys take their defaults; unknown keys are ignored; a garbage value takes its default
    and adds a message to the returned list of problems.
    """
    state = {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}
    problems: list[str] = []
    order = ["noise_mode"] + [k for k in DEFAULTS if k != "noise_mode"]
    for name in order:
        if name not in raw:
            continue
        try:
            state[name] = _parse_one(name, raw[name], state["noise_mode"])
        except (ValueError, TypeError, OverflowError) as exc:
            shown = str(raw[name])
            shown = shown if len(shown) <= 40 else shown[:39] + "…"
            problems.append(f"`{name}={shown}` ignored ({exc}); using {DEFAULTS[name]!r}.")
    if "tokens" in raw and "noise_by" not in raw and state["tokens"]:
        state["noise_by"] = "tokens"
    return state, problems


def state_to_query(state: Mapping[str, Any]) -> dict[str, str]:
    """URL query parameters for a page state (every setting, so links stay exact)."""
    query: dict[str, str] = {}
    for name in DEFAULTS:
        value = state.get(name, DEFAULTS[name])
        if name in ("tokens", "sweep", "row_tokens"):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        elif name == "sweep_on":
            value = "1" if value else "0"
        elif isinstance(value, float):
            value = f"{value:g}"
        query[name] = str(value)
    if state.get("rows") != "chosen":
        query.pop("row_tokens")
    if state.get("sever_token", -1) == -1:
        query.pop("sever_token")
    for mode, names in B_FIELDS.items():  # B's fields only for what B changes, and when it is shown
        if state.get("tab") != "compare" or state.get("compare") != mode:
            for name in names:
                query.pop(name)
    if state.get("tab") != "compare":
        query.pop("compare")
    if state.get("noise_by") != "tokens":
        query.pop("tokens")
    else:
        query.pop("subject")
        query.pop("subject_tokens")
    return query


# ---------------------------------------------------------------------------------------------
# From page state to a trace


@dataclass
class TraceRequest:
    """One ``causal_trace`` call: the prompt, the positions to noise and the settings."""

    prompt: str
    noised: list[int]
    trace_settings: TraceSettings
    rows: list[int] | None = None  # token rows to compute (None: every row)

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``causal_trace`` (every setting)."""
        return self.trace_settings.to_dict()

    @property
    def settings(self) -> dict[str, Any]:
        """The settings with the noised positions (and the rows, when restricted): what the result
        store keys."""
        rows = {} if self.rows is None else {"rows": list(self.rows)}
        return {**self.kwargs, "noised": list(self.noised), **rows}


def noised_positions(lm: "LoadedModel", state: Mapping[str, Any]) -> list[int]:
    """The token indices to noise: the subject's tokens (all or the last) or the picked ones."""
    if state["noise_by"] == "subject":
        return subject_positions(lm, state["prompt"], state["subject"], which=state["subject_tokens"])
    if not state["tokens"]:
        raise ValueError("No tokens to noise: pick at least one token (or noise by subject).")
    return list(state["tokens"])


def trace_request(lm: "LoadedModel", state: Mapping[str, Any], kind: str | None = None,
                  noise: float | None = None, sever: str | None = None,
                  rows: list[int] | None = None) -> TraceRequest:
    """Arguments of one ``causal_trace`` call (``kind``, ``noise``, ``sever`` ("none", "mlp",
    "attn") and ``rows`` override the state's)."""
    kind = kind or state["kind"]
    sever = sever or state.get("sever", "none")
    if kind not in KINDS:
        raise ValueError(f"Unknown kind '{kind}'.")
    noised = noised_positions(lm, state)
    replace = state["corruption"] == "replace"
    contrast = (state["contrast"] or None) if METRICS[state["metric"]].needs_contrast else None
    if METRICS[state["metric"]].needs_contrast and contrast is None:
        raise ValueError("The logit difference needs a second answer: type a contrast completion.")
    settings = TraceSettings(
        kind=kind,
        noise=0.0 if replace else float(state["noise"] if noise is None else noise),
        noise_mode=state["noise_mode"],
        corruption=state["corruption"],
        replacement=state["replacement"] if replace else None,
        samples=int(state["samples"]),
        seed=int(state["seed"]),
        target=state["target"] or None,
        contrast=contrast,
        window=int(state["window"]),
        convention=state["convention"],
        sever=sever if kind == "hidden" and sever != "none" else None,
    )
    return TraceRequest(state["prompt"], noised, settings,
                        rows_to_compute(lm, state, noised) if rows is None else sorted(set(rows)))


def b_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Trace B's page state in the A/B comparison: A's state with what ``compare`` changes (another
    prompt, its subject noised like A's; another noise level; another seed). ValueError when B
    cannot be traced that way."""
    out = {**DEFAULTS, **dict(state)}
    mode = out["compare"]
    if mode == "prompt":
        if out["corruption"] == "replace":
            raise ValueError("Comparing two prompts needs noise: with token replacement B would need a "
                             "replacement prompt of its own.")
        if not out["b_prompt"].strip():
            raise ValueError("Type B's prompt.")
        if not out["b_subject"].strip():
            raise ValueError("Type B's subject (the text inside B's prompt to noise).")
        rows = "noised_final" if out["rows"] == "chosen" else out["rows"]  # A's chosen rows are A's tokens
        out.update(prompt=out["b_prompt"], noise_by="subject", subject=out["b_subject"], target=out["b_target"],
                   rows=rows)
    elif mode == "noise":
        if out["corruption"] == "replace":
            raise ValueError("Token replacement has no noise level: compare another seed or prompt.")
        out["noise"] = out["b_noise"]
    elif mode == "seed":
        out["seed"] = out["b_seed"]
    else:
        raise ValueError(f"Unknown comparison {mode!r}: use one of {', '.join(COMPARE)}.")
    return out


def rows_to_compute(lm: "LoadedModel", state: Mapping[str, Any], noised: list[int]) -> list[int] | None:
    """The token rows a state asks for (None: every row); ValueError for a bad choice."""
    choice = state.get("rows", "all")
    if choice == "all":
        return None
    n_tokens = len(tokenize(lm, state["prompt"]))
    if choice == "noised_final":
        return resolve_rows("noised_final", noised, n_tokens)
    chosen = sorted(set(state.get("row_tokens") or []))
    if not chosen:
        raise ValueError("No rows to compute: choose at least one token row (or compute every row).")
    if chosen[-1] >= n_tokens:
        raise ValueError(f"Row {chosen[-1]} is out of range: the prompt has {n_tokens} tokens "
                         f"(0..{n_tokens - 1}).")
    return resolve_rows(chosen, noised, n_tokens)


# ---------------------------------------------------------------------------------------------
# Run cards and exports


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages that can change a trace or its charts."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


METHODS = {False: "exact causal trace", True: "attribution preview"}  # run card "method"


def run_card(trace: Trace, metric: str = "prob", model: Mapping[str, Any] | None = None,
             page: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce ``trace``: model, prompt, noised tokens, every setting."""
    s = trace.settings
    model_facts = {**(trace.model or {}), **dict(model or {})}
    given = s.get("target")
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {k: model_facts.get(k) for k in ("name", "revision", "family", "dtype", "device")},
        "method": METHODS[trace.approximate],
        "prompt": trace.prompt,
        "tokens": list(trace.tokens),
        "noised": list(trace.noised),
        "noised_tokens": [trace.tokens[i] for i in trace.noised],
        "target": trace.target,
        "target_id": trace.target_id,
        "target_from": "clean top-1 token" if given is None else
                       f"first token of the expected completion {given!r}",
        "contrast": s.get("contrast"),
        "corruption": s.get("corruption"),
        "noise": s.get("noise"),
        "noise_mode": s.get("noise_mode"),
        "noise_std": trace.noise_std,
        "embedding_sigma": trace.sigma,
        "replacement": s.get("replacement"),
        "samples": s.get("samples"),
        "seed": s.get("seed"),
        "kind": trace.kind,
        "window": trace.window,
        "metric": metric,
        "convention": trace.convention,
        "rows": s.get("rows", "all"),
        "sever": s.get("sever"),
        "seconds": round(float(trace.elapsed), 3),
        "versions": package_versions(),
        "page": dict(page) if page is not None else None,
    }


def ab_card(a: Trace, b: Trace, metric: str = "prob", model: Mapping[str, Any] | None = None,
            page: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run card of an A/B comparison: what B changes and both traces' run cards."""
    mode = (page or {}).get("compare")
    return {"format": CARD_FORMAT + " (A/B comparison)", "version": CARD_VERSION, "compare": mode,
            "A": run_card(a, metric, model, page), "B": run_card(b, metric, model, page)}


def numbers(trace: Trace) -> dict[str, Any]:
    """Every metric of every cell, the clean and corrupted values and the top-5 next tokens."""
    metrics = {name: trace.metric(name).tolist() for name in (*trace.metrics, "normalised")}
    return {
        "rows": "tokens", "columns": "layers",
        "metrics": metrics,
        "corrupted": dict(trace.metric_low),
        "clean": dict(trace.metric_high),
        "clean_top": [list(x) for x in trace.clean_top],
        "corrupted_top": [list(x) for x in trace.corrupted_top],
    }


def to_json(trace: Trace, metric: str = "prob", model: Mapping[str, Any] | None = None,
            page: Mapping[str, Any] | None = None) -> str:
    """JSON export: the run card, the numbers and the trace record (loadable with load_run_card)."""
    meta, _ = trace.to_record()
    payload = {"run_card": run_card(trace, metric, model, page), "numbers": numbers(trace),
               "trace": meta}
    return json.dumps(payload, indent=1, ensure_ascii=False, allow_nan=True, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


CSV_CARD_COLUMNS = ("model", "revision", "prompt", "target", "target_id", "kind", "convention",
                    "window", "corruption", "noise", "noise_mode", "noise_std", "samples", "seed",
                    "replacement", "contrast", "metric")


def to_frame(trace: Trace, metric: str = "prob", model: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Long table (one row per token and layer, every metric) with the run card's fields."""
    card = run_card(trace, metric, model)
    values = {name: trace.metric(name) for name in ("prob", "normalised", "logprob", "kl", "logit_diff")
              if name == "normalised" or name in trace.metrics}
    rows = []
    for t, token in enumerate(trace.tokens):
        for layer in range(trace.n_layers):
            row = {"token_index": t, "token": token, "noised": t in trace.noised, "layer": layer}
            row.update({name: float(v[t, layer]) for name, v in values.items()})
            rows.append(row)
    frame = pd.DataFrame(rows)
    flat = {**card, "model": card["model"]["name"], "revision": card["model"]["revision"]}
    for name in CSV_CARD_COLUMNS:
        frame[name] = flat[name]
    return frame


def to_csv(trace: Trace, metric: str = "prob", model: Mapping[str, Any] | None = None) -> str:
    """CSV export of ``to_frame`` (floats written exactly)."""
    buffer = io.StringIO()
    to_frame(trace, metric, model).to_csv(buffer, index=False, float_format="%.17g")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Loading a run card back


@dataclass
class LoadedCard:
    """A run card read back: its page state, the trace it carries, and notes for the user."""

    card: dict[str, Any]
    state: dict[str, Any]
    trace: Trace | None
    notes: list[str]


def _state_from_card(card: Mapping[str, Any]) -> dict[str, Any]:
    """A page state from the card's page section, or from its settings when it has none."""
    page = card.get("page")
    if isinstance(page, Mapping):
        return dict(page)
    given = card.get("target_from", "")
    target = card.get("target") if isinstance(given, str) and given.startswith("first token") else ""
    return {
        "prompt": card.get("prompt"), "noise_by": "tokens", "tokens": card.get("noised"),
        "target": target, "contrast": card.get("contrast") or "", "corruption": card.get("corruption"),
        "noise_mode": card.get("noise_mode"), "noise": card.get("noise"),
        "replacement": card.get("replacement") or "", "samples": card.get("samples"),
        "seed": card.get("seed"), "kind": card.get("kind"), "window": card.get("window"),
        "metric": card.get("metric"), "convention": card.get("convention"),
    }


def _check_model(card: Mapping[str, Any], lm) -> None:
    model = card.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
        raise RunCardError("The run card does not say which model made it (no model.name).")
    name, revision = model["name"], model.get("revision")
    if lm is None:
        return
    if name != lm.name:
        raise RunCardError(
            f"This run card is from the model '{name}', but '{lm.name}' is loaded. Pick '{name}' "
            "in the sidebar, then load the card again.")
    if revision and lm.revision and revision != lm.revision:
        raise RunCardError(
            f"This run card is from revision '{revision}' of '{name}', but revision "
            f"'{lm.revision}' is loaded: its numbers would not be reproduced.")


def _trace_from(payload: Mapping[str, Any], card: Mapping[str, Any]) -> Trace | None:
    meta, values = payload.get("trace"), payload.get("numbers")
    if meta is None or card.get("method") == METHODS[True]:  # a preview's numbers are never reused
        return None
    try:
        arrays = {f"metric.{k}": np.asarray(v, dtype=np.float64)
                  for k, v in values["metrics"].items() if k != "normalised"}
        trace = Trace.from_record(dict(meta), arrays)
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or next(iter(shapes))[0] != len(trace.tokens):
            raise ValueError("the arrays do not match the tokens")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RunCardError(f"The numbers in this run card are malformed ({exc}).") from None
    if trace.prompt != card.get("prompt"):
        raise RunCardError("The numbers in this run card belong to another prompt.")
    return trace


def load_run_card(data: bytes | str, lm: "LoadedModel | None" = None) -> LoadedCard:
    """Read a JSON export (or a bare run card) back; ``RunCardError`` with a clear message when it
    is not JSON, not a run card, malformed, or from another model or revision than ``lm``."""
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunCardError(f"This file is not JSON ({exc}).") from None
    if not isinstance(payload, dict):
        raise RunCardError("This file is not a run card (a JSON object was expected).")
    card = payload.get("run_card", payload)
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise RunCardError("This JSON is not a run card of this app (no 'run_card' with "
                           f"format '{CARD_FORMAT}').")
    if card.get("version") != CARD_VERSION:
        raise RunCardError(f"Run card version {card.get('version')!r}; this app reads {CARD_VERSION}.")
    _check_model(card, lm)
    state, problems = parse_state(_state_from_card(card))
    if problems:
        raise RunCardError("The run card has invalid settings: " + " ".join(problems))
    if lm is not None:
        tokens = [lm.tokenizer.decode([i]) for i in lm.tokenizer(state["prompt"])["input_ids"]]
        if isinstance(card.get("tokens"), list) and card["tokens"] != tokens:
            raise RunCardError("The run card's tokens differ from this model's tokenization of its prompt.")
    trace = _trace_from(payload, card) if "run_card" in payload else None
    if trace is not None and trace.prompt != state["prompt"]:
        raise RunCardError("The run card's numbers belong to another prompt than its settings.")
    notes = [] if trace is not None else ["This run card has no numbers: the trace will be computed."]
    return LoadedCard(card, state, trace, notes)
