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
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .causal import CONVENTIONS, CORRUPTIONS, KINDS, METRICS, NOISE_MODES, Trace, subject_positions

CARD_FORMAT = "causal-tracing run card"
CARD_VERSION = 1
EXAMPLE_PROMPT = "The Eiffel Tower is located in the city of"
EXAMPLE_SUBJECT = "Eiffel Tower"
KIND_CHOICES = KINDS + ("all",)
NOISE_BY = ("subject", "tokens")
SUBJECT_TOKENS = ("all", "last")
NOISE_RANGE = {"absolute": (0.0, 2.0), "sigma": (0.0, 10.0)}
SAMPLES_RANGE = (1, 50)
SEED_RANGE = (0, 2**31 - 1)
WINDOW_RANGE = (1, 128)
MAX_TEXT = 20_000
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
    "corruption": "gaussian",
    "noise_mode": "absolute",
    "noise": 0.4,  # = 3 × embedding σ of the embedded model (ROME's rule); the study used 0.5
    "replacement": "",
    "samples": 3,  # ROME uses 10; 3 keeps the page live on a CPU (each sample is a full trace)
    "seed": 0,
    "kind": "hidden",
    "window": 10,
    "metric": "prob",
    "convention": "input",
    "sweep": list(DEFAULT_SWEEP),
    "sweep_on": False,
}
_TEXT = ("prompt", "subject", "target", "contrast", "replacement")
_CHOICES = {"noise_by": NOISE_BY, "subject_tokens": SUBJECT_TOKENS, "corruption": CORRUPTIONS,
            "noise_mode": NOISE_MODES, "kind": KIND_CHOICES, "metric": METRICS,
            "convention": CONVENTIONS}
_INTS = {"samples": SAMPLES_RANGE, "seed": SEED_RANGE, "window": WINDOW_RANGE}


class RunCardError(ValueError):
    """A run card that cannot be loaded: malformed, or from another model."""


# ---------------------------------------------------------------------------------------------
# Page state


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # repeated query parameter: the last one wins
        value = value[-1] if value else ""
    if not isinstance(value, str):
        raise ValueError("not text")
    if len(value) > MAX_TEXT:
        raise ValueError(f"longer than {MAX_TEXT} characters")
    return value


def _as_int(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, str):
        value = value.strip()
    number = int(value) if not isinstance(value, float) or value.is_integer() else None
    if number is None or not low <= number <= high:
        raise ValueError(f"not an integer from {low} to {high}")
    return number


def _as_float(value: Any, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    number = float(value.strip() if isinstance(value, str) else value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"not a number from {low:g} to {high:g}")
    return number


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [v for v in value.replace(";", ",").split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError("not a list")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not true/false")


def _parse_one(name: str, value: Any, noise_mode: str) -> Any:
    """One validated state value (raises ValueError with a short reason)."""
    if name in _TEXT:
        return _as_text(value)
    if name in _CHOICES:
        text = _as_text(value).strip()
        if text not in _CHOICES[name]:
            raise ValueError(f"not one of {', '.join(_CHOICES[name])}")
        return text
    if name in _INTS:
        return _as_int(value, *_INTS[name])
    if name == "noise":
        return _as_float(value, *NOISE_RANGE[noise_mode])
    if name == "tokens":
        items = _as_list(value)
        if len(items) > 4096:
            raise ValueError("too many indices")
        return sorted({_as_int(v, 0, 10**6) for v in items})
    if name == "sweep":
        levels = sorted({_as_float(v, *NOISE_RANGE[noise_mode]) for v in _as_list(value)})
        if not 1 <= len(levels) <= MAX_SWEEP:
            raise ValueError(f"give 1 to {MAX_SWEEP} noise levels")
        return levels
    if name == "sweep_on":
        return _as_bool(value)
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
        if name in ("tokens", "sweep"):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        elif name == "sweep_on":
            value = "1" if value else "0"
        elif isinstance(value, float):
            value = f"{value:g}"
        query[name] = str(value)
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
    """What ``causal_trace`` gets for one kind: positions, keyword arguments and store settings."""

    prompt: str
    noised: list[int]
    kwargs: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)


def noised_positions(lm, state: Mapping[str, Any]) -> list[int]:
    """The token indices to noise: the subject's tokens (all or the last) or the picked ones."""
    if state["noise_by"] == "subject":
        return subject_positions(lm, state["prompt"], state["subject"], which=state["subject_tokens"])
    if not state["tokens"]:
        raise ValueError("No tokens to noise: pick at least one token (or noise by subject).")
    return list(state["tokens"])


def trace_request(lm, state: Mapping[str, Any], kind: str | None = None,
                  noise: float | None = None) -> TraceRequest:
    """Arguments of one ``causal_trace`` call (``kind``/``noise`` override the state's)."""
    kind = kind or state["kind"]
    if kind not in KINDS:
        raise ValueError(f"Unknown kind '{kind}'.")
    noised = noised_positions(lm, state)
    replace = state["corruption"] == "replace"
    kwargs = {
        "kind": kind,
        "noise": 0.0 if replace else float(state["noise"] if noise is None else noise),
        "samples": int(state["samples"]),
        "seed": int(state["seed"]),
        "target": state["target"] or None,
        "window": int(state["window"]),
        "corruption": state["corruption"],
        "noise_mode": state["noise_mode"],
        "replacement": state["replacement"] if replace else None,
        "contrast": (state["contrast"] or None) if state["metric"] == "logit_diff" else None,
        "convention": state["convention"],
    }
    if state["metric"] == "logit_diff" and kwargs["contrast"] is None:
        raise ValueError("The logit difference needs a second answer: type a contrast completion.")
    return TraceRequest(state["prompt"], noised, kwargs, {**kwargs, "noised": list(noised)})


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
        "seconds": round(float(trace.elapsed), 3),
        "versions": package_versions(),
        "page": dict(page) if page is not None else None,
    }


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
    if meta is None:
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


def load_run_card(data: bytes | str, lm=None) -> LoadedCard:
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
