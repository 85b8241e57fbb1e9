"""One way to build test traces: real :class:`tracing.causal.Trace` objects with known numbers.

- ``make_trace(scores=None, **fields)``: a trace over ``TOKENS`` ("The Eiffel Tower is in") whose
  numbers are given (``scores``, the p(target) cells [tokens, layers]) or made up (the noised token
  helps early, the final token late); every other field has a default and can be overridden.
- ``rows_trace(noised_row, final_row, low, high, ...)``: a trace whose only non-zero rows are the
  noised token's and the final token's (the category-analysis shape: rows in, averages out).
- ``stand_in_trace(lm, prompt, noised, ...)``: a stand-in for ``causal_trace`` with its signature
  (``run_batch(..., trace=stand_in_trace)``, or monkeypatched where a page calls the engine):
  the real tokenization of ``prompt``, the noised row falling from the clean to the corrupted
  value over the layers and the final row rising, instantly.

Derived metrics: ``logprob = log(p)`` and ``kl = 2 * (high - p)`` (lower is better, 0 at the clean
run); ``logit_diff = 10 * p`` when a contrast is given. ``metrics`` / ``metric_low`` /
``metric_high`` entries replace the derived ones.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tracing.causal import Trace
from tracing.settings import TraceSettings

TOKENS = ["The", " E", "iffel", " Tower", " is", " in"]
PROMPT = "The Eiffel Tower is in"
TARGET, TARGET_ID = " Paris", 42


def default_scores(n_tokens: int, n_layers: int, noised: Sequence[int], low: float, seed: int) -> np.ndarray:
    """Near ``low`` everywhere (a little noise from ``seed``); the last noised token falls from 0.6
    to 0.3 over the first half of the layers, the final token rises from 0.5 to 0.65 over the rest."""
    rng = np.random.default_rng(seed)
    scores = low + 0.01 * rng.random((n_tokens, n_layers))
    half = n_layers // 2
    scores[noised[-1], :half] = np.linspace(0.6, 0.3, half)
    scores[-1, half:] = np.linspace(0.5, 0.65, n_layers - half)
    return scores


def make_trace(
    scores: np.ndarray | None = None,
    *,
    tokens: Sequence[str] = TOKENS,
    token_ids: Sequence[int] | None = None,
    prompt: str = PROMPT,
    noised: Sequence[int] = (1, 2, 3),
    n_layers: int = 6,
    seed: int = 0,
    low: float = 0.05,
    high: float = 0.7,
    kind: str = "hidden",
    noise: float = 0.4,
    samples: int = 3,
    window: int = 10,
    convention: str = "input",
    contrast: str | None = None,
    target: str = TARGET,
    target_id: int = TARGET_ID,
    metrics: Mapping[str, np.ndarray] | None = None,
    metric_low: Mapping[str, float] | None = None,
    metric_high: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
    clean_top: Sequence[tuple[str, float]] | None = None,
    corrupted_top: Sequence[tuple[str, float]] | None = None,
    sigma: float | None = None,
    elapsed: float = 1.5,
    model: Mapping[str, Any] | None = None,
) -> Trace:
    """A Trace with known numbers (see the module docstring). ``settings`` defaults to the
    ``TraceSettings`` of the given kind, noise, samples, seed, window, convention and contrast
    plus ``noised``; ``seed`` also seeds the made-up scores."""
    tokens, noised = list(tokens), [int(i) for i in noised]
    n = len(tokens)
    if scores is None:
        scores = default_scores(n, n_layers, noised, low, seed)
    scores = np.asarray(scores, dtype=np.float64)
    assert scores.shape[0] == n, f"scores has {scores.shape[0]} rows for {n} tokens"
    all_metrics = {"prob": scores, "logprob": np.log(np.clip(scores, 1e-12, None)), "kl": (high - scores) * 2}
    lows = {"prob": low, "logprob": float(np.log(max(low, 1e-12))), "kl": (high - low) * 2}
    highs = {"prob": high, "logprob": float(np.log(max(high, 1e-12))), "kl": 0.0}
    if contrast is not None:
        all_metrics["logit_diff"] = scores * 10
        lows["logit_diff"], highs["logit_diff"] = low * 10, high * 10
    all_metrics.update(metrics or {})
    lows.update(metric_low or {})
    highs.update(metric_high or {})
    if settings is None:
        settings = TraceSettings(kind=kind, noise=noise, samples=samples, seed=seed, window=window,
                                 convention=convention, contrast=contrast).to_dict()
        settings["noised"] = list(noised)
    return Trace(
        prompt=prompt, tokens=tokens, token_ids=list(token_ids) if token_ids is not None else list(range(n)),
        noised=noised, kind=kind, convention=convention, window=window, target_id=target_id,
        target=target, metrics=all_metrics, metric_low=lows, metric_high=highs, settings=dict(settings),
        sigma=sigma, noise_std=noise,
        clean_top=list(clean_top) if clean_top is not None else [(target, high), (" Rome", 0.1)],
        corrupted_top=list(corrupted_top) if corrupted_top is not None else [(" New", 0.2), (target, low)],
        elapsed=elapsed, model=dict(model) if model is not None else {"name": "tiny", "revision": "r1"},
    )


def rows_trace(noised_row: Sequence[float], final_row: Sequence[float], low: float, high: float, *,
               n_tokens: int = 4, noised: int = 1, correct: bool = True, target: str = " yes",
               **fields: Any) -> Trace:
    """A trace whose p rows are ``noised_row`` at token ``noised`` and ``final_row`` at the final
    token (every other row 0). ``correct=False`` makes the clean top-1 token another one than the
    target (0.9 for " no")."""
    scores = np.zeros((n_tokens, len(noised_row)))
    scores[noised], scores[-1] = noised_row, final_row
    top = [(target, high)] if correct else [(" no", 0.9)]
    fields = {"tokens": ["t"] * n_tokens, "prompt": "p", "target": target, "clean_top": top,
              "corrupted_top": [(target, low)], **fields}
    return make_trace(scores, noised=(noised,), low=low, high=high, **fields)


def stand_in_trace(lm, prompt: str, noised: Sequence[int], kind: str = "hidden", noise: float = 0.4,
                   samples: int = 10, seed: int = 0, target: int | str | None = None, window: int = 10,
                   progress=None, low: float = 0.1, high: float = 0.6, **settings: Any) -> Trace:
    """``causal_trace``'s signature, instantly: the real tokens of ``prompt`` on ``lm``'s tokenizer,
    p falling linearly from ``high`` to ``low`` over the layers at the last noised token and rising
    from ``low`` to ``high`` at the final token (``low`` elsewhere). ``target=None`` is the prompt's
    last token (a stand-in has no model output); a string target is its first token.
    ``progress(done, total)`` is called twice, as the engine does at the start and end."""
    ids = [int(i) for i in lm.tokenizer(prompt)["input_ids"]]
    n, layers = len(ids), lm.n_layers
    prob = np.full((n, layers), low)
    ramp = np.linspace(0, 1, layers)
    prob[noised[-1]] = high - (high - low) * ramp
    prob[-1] = low + (high - low) * ramp
    if progress is not None:
        progress(0, 2)
        progress(2, 2)
    if isinstance(target, str):
        target = lm.tokenizer(target, add_special_tokens=False)["input_ids"][0]
    target_id = ids[-1] if target is None else int(target)
    text = lm.tokenizer.decode([target_id])
    known = {k: v for k, v in settings.items() if k in {"corruption", "noise_mode", "replacement",
                                                         "contrast", "convention"}}
    full = TraceSettings(kind=kind, noise=noise, samples=samples, seed=seed, target=target, window=window,
                         **known).to_dict()
    return make_trace(
        prob, tokens=[lm.tokenizer.decode([i]) for i in ids], token_ids=ids, prompt=prompt, noised=noised,
        low=low, high=high, kind=kind, noise=noise, samples=samples, seed=seed, window=window,
        convention=known.get("convention", "input"), target=text, target_id=target_id,
        settings={**full, "noised": list(noised)}, clean_top=[(text, high)], corrupted_top=[(text, low)],
        elapsed=0.0, model={"name": getattr(lm, "name", ""), "revision": getattr(lm, "revision", "")},
    )
