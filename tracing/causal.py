"""Causal tracing (Meng et al. 2022): corrupt some input tokens, restore one clean state at a time.

Semantics (every number equals a one-forward-per-cell loop with hooks, to float precision):

- Noise: ``randn((samples, len(noised), d_model), generator=Generator().manual_seed(seed)) * noise``
  drawn in float32 on the CPU, then moved to the model's device and dtype, and added to the output
  of the token-embedding module (before position embeddings) at the noised positions.
  ``corruption="uniform"`` draws ``(2 * rand(...) - 1) * noise`` instead; ``noise_mode="sigma"``
  multiplies ``noise`` by the standard deviation of the token-embedding matrix (ROME's "3 sigma").
  ``corruption="replace"`` runs a second prompt of the same token length as the corrupted run.
- kind "hidden": cell (t, l) restores the clean hidden state at token t entering block l
  (``convention="input"``, the seed study's) or leaving block l (``convention="output"``, ROME's).
- kind "mlp" / "attn": cell (t, l) restores, at token t, the MLP (attention) outputs of layers
  ``max(0, l - window // 2)`` to ``min(L, l - (-window // 2)) - 1``.
- Score: the mean over samples of softmax(logits at the last position)[target]. ``low``: corrupted
  with nothing restored; ``high``: clean. Log-probability, logit difference and KL divergence from
  the clean next-token distribution come from the same forward passes.

Speed without changing a number: one clean run and one corrupted run (both cached across calls),
logits only at the last position, all restorations of one token in a batch that grows layer by
layer (no layer below the restored one is recomputed), positions before the restored token reused
from the corrupted run's keys and values, and cells whose clean and corrupted states are identical
not computed at all.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .hooks import edit_outputs
from .runner import KVPrefix, KVRecorder, Runner
from .tokens import answer_token, subject_positions, token_strings, tokenize

KINDS = ("hidden", "mlp", "attn")
CORRUPTIONS = ("gaussian", "uniform", "replace")
NOISE_MODES = ("absolute", "sigma")
CONVENTIONS = ("input", "output")
METRICS = ("prob", "normalised", "logprob", "logit_diff", "kl")
METRIC_LABELS = {
    "prob": "probability",
    "normalised": "normalised probability",
    "logprob": "log-probability",
    "logit_diff": "logit difference",
    "kl": "KL divergence from clean",
}
TOKEN_ROWS_PER_BATCH = 4096  # rows x positions per forward; bounds peak memory

Progress = Callable[[int, int], "bool | None"]


class TraceCancelled(Exception):
    """The progress callback asked to stop."""


@dataclass
class Trace:
    """One causal trace: scores per (token, layer) cell and everything needed to reproduce it."""

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    noised: list[int]
    kind: str
    convention: str
    window: int
    target_id: int
    target: str
    metrics: dict[str, np.ndarray]
    metric_low: dict[str, float]
    metric_high: dict[str, float]
    settings: dict[str, Any]
    sigma: float | None
    noise_std: float
    clean_top: list[tuple[str, float]]
    corrupted_top: list[tuple[str, float]]
    elapsed: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        """p(target) with each cell restored, [n_tokens, n_layers]."""
        return self.metrics["prob"]

    @property
    def low(self) -> float:
        return self.metric_low["prob"]

    @property
    def high(self) -> float:
        return self.metric_high["prob"]

    @property
    def last_token_noised(self) -> bool:
        return len(self.tokens) - 1 in self.noised

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    def normalised(self) -> np.ndarray:
        """(p - low) / (high - low): 0 = corrupted run, 1 = clean run."""
        span = self.high - self.low
        if abs(span) < 1e-12:
            return np.zeros_like(self.scores)
        return (self.scores - self.low) / span

    def metric(self, name: str) -> np.ndarray:
        """Cells in one metric: prob, normalised, logprob, logit_diff (needs a contrast) or kl."""
        if name == "normalised":
            return self.normalised()
        if name not in self.metrics:
            if name == "logit_diff":
                raise ValueError("The logit difference needs a second answer (contrast).")
            raise ValueError(f"Unknown metric '{name}'. Known: {', '.join(METRICS)}.")
        return self.metrics[name]

    def metric_bounds(self, name: str) -> tuple[float, float]:
        """(corrupted, clean) value of a metric."""
        if name == "normalised":
            return 0.0, 1.0
        self.metric(name)
        return self.metric_low[name], self.metric_high[name]

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata and named arrays (for the result store)."""
        meta = {
            key: getattr(self, key)
            for key in (
                "prompt", "tokens", "token_ids", "noised", "kind", "convention", "window",
                "target_id", "target", "metric_low", "metric_high", "settings", "sigma",
                "noise_std", "elapsed", "model",
            )
        }
        meta["clean_top"] = [list(x) for x in self.clean_top]
        meta["corrupted_top"] = [list(x) for x in self.corrupted_top]
        arrays = {f"metric.{k}": np.ascontiguousarray(v) for k, v in self.metrics.items()}
        return meta, arrays

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Trace":
        metrics = {k.split(".", 1)[1]: np.asarray(v) for k, v in arrays.items() if k.startswith("metric.")}
        fields = dict(meta)
        fields["clean_top"] = [tuple(x) for x in meta["clean_top"]]
        fields["corrupted_top"] = [tuple(x) for x in meta["corrupted_top"]]
        return cls(metrics=metrics, **fields)


def handover_layer(noised_row: Sequence[float], final_row: Sequence[float],
                   lower_is_better: bool = False) -> int | None:
    """First layer from which restoring the final token beats restoring the noised token at every
    later layer (the seed study's "transition"); None when the final token does not win at the
    last layer. Both rows are one value per layer of the same metric."""
    noised, final = np.asarray(noised_row, dtype=np.float64), np.asarray(final_row, dtype=np.float64)
    beats = final < noised if lower_is_better else final > noised
    if not len(beats) or not beats[-1]:
        return None
    losing = np.flatnonzero(~beats)
    return int(losing[-1] + 1) if len(losing) else 0


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_noised(noised: Sequence[int], n_tokens: int) -> list[int]:
    if noised is None or len(noised) == 0:
        raise ValueError("No tokens to noise: pick at least one token (or a subject).")
    out = []
    for i in noised:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"Token index {i!r} is not an integer.")
        if not 0 <= int(i) < n_tokens:
            raise ValueError(f"Token index {i} is out of range: the prompt has {n_tokens} tokens (0..{n_tokens - 1}).")
        out.append(int(i))
    return sorted(set(out))


def _check_settings(kind, noise, samples, window, corruption, noise_mode, convention, seed=0) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown kind '{kind}'. Use one of: {', '.join(KINDS)}.")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption '{corruption}'. Use one of: {', '.join(CORRUPTIONS)}.")
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"Unknown noise mode '{noise_mode}'. Use one of: {', '.join(NOISE_MODES)}.")
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown layer convention '{convention}'. Use 'input' or 'output'.")
    if corruption != "replace":
        try:
            ok = math.isfinite(float(noise)) and float(noise) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"The noise level must be a finite number >= 0, not {noise!r}.")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, not {samples!r}.")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, not {window!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, not {seed!r}.")


# ---------------------------------------------------------------------------------------------
# Clean and corrupted runs (cached across calls)


@dataclass
class CleanRun:
    states: list[torch.Tensor]  # L + 1 tensors [n, d]: block inputs, then the last block's output
    modules: dict[str, torch.Tensor]  # "mlp"/"attn" -> [L, n, d] module outputs
    logits: torch.Tensor  # [V] at the last position


@dataclass
class CorruptedRun:
    states: list[torch.Tensor]  # L + 1 tensors [S, n, d]
    keys: dict[int, torch.Tensor]  # layer -> [S, kv_heads, n, head_dim]
    values: dict[int, torch.Tensor]
    logits: torch.Tensor  # [S, V] at the last position
    first_changed: int  # first position whose corrupted input differs from the clean one
    sigma: float | None
    noise_std: float


class _LRU:
    """A small thread-safe LRU cache."""

    def __init__(self, size: int) -> None:
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make: Callable[[], Any]):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


_clean_cache = _LRU(8)
_corrupted_cache = _LRU(4)
_model_tokens: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_model_tokens_lock = threading.Lock()


def _model_key(model: torch.nn.Module) -> int:
    """A number unique to this model object for the life of the process (ids can be reused)."""
    with _model_tokens_lock:
        if model not in _model_tokens:
            _model_tokens[model] = next(_model_counter)
        return _model_tokens[model]


_model_counter = itertools.count()


def _module_map(runner: Runner, part: str) -> dict[int, torch.nn.Module]:
    path = runner.adapter.mlp if part == "mlp" else runner.adapter.attn
    return {layer: block.get_submodule(path) for layer, block in enumerate(runner.blocks)}


def _forward_collect(runner: Runner, hidden: torch.Tensor, cache=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Full forward from block-0 input; (L + 1 states, last-position logits)."""
    states: list[torch.Tensor] = []
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    out = runner.run(hidden, positions, cache=cache, before_block=lambda layer, h: states.append(h))
    states.append(out)
    return states, runner.logits(out[:, -1])


def clean_run(lm, ids: Sequence[int]) -> CleanRun:
    """States, MLP and attention outputs and logits of the clean prompt (cached)."""

    def make() -> CleanRun:
        runner = Runner(lm)
        tokens = torch.tensor([list(ids)], device=lm.device)
        outputs: dict[str, dict[int, torch.Tensor]] = {"mlp": {}, "attn": {}}
        with torch.inference_mode(), \
                edit_outputs(_module_map(runner, "mlp"), lambda l, o: outputs["mlp"].__setitem__(l, o[0].clone())), \
                edit_outputs(_module_map(runner, "attn"), lambda l, o: outputs["attn"].__setitem__(l, o[0].clone())):
            positions = torch.arange(len(ids), device=lm.device)
            hidden = runner.block_input(runner.token_embeddings(tokens), positions)
            states, logits = _forward_collect(runner, hidden)
        modules = {k: torch.stack([v[l] for l in range(runner.n_layers)]) for k, v in outputs.items()}
        return CleanRun([s[0] for s in states], modules, logits[0])

    return _clean_cache.get((_model_key(lm.model), tuple(ids)), make)


def embedding_sigma(lm) -> float:
    """Standard deviation of all entries of the token-embedding matrix."""
    weight = lm.model.get_submodule(lm.adapter.token_embedding).weight
    return float(weight.detach().float().std())


def draw_noise(corruption: str, samples: int, n_noised: int, d_model: int, seed: int) -> torch.Tensor:
    """Unit noise [samples, n_noised, d_model], float32 on the CPU (scale it by the noise level)."""
    generator = torch.Generator().manual_seed(int(seed))
    if corruption == "uniform":
        return torch.rand((samples, n_noised, d_model), generator=generator) * 2 - 1
    return torch.randn((samples, n_noised, d_model), generator=generator)


def corrupted_run(
    lm,
    ids: Sequence[int],
    noised: Sequence[int],
    corruption: str,
    noise: float,
    noise_mode: str,
    samples: int,
    seed: int,
    replacement_ids: Sequence[int] | None,
) -> CorruptedRun:
    """States, keys, values and logits of the corrupted runs (cached)."""
    key = (_model_key(lm.model), tuple(ids), tuple(noised), corruption, float(noise), noise_mode, samples,
           seed, tuple(replacement_ids or ()))

    def make() -> CorruptedRun:
        runner = Runner(lm)
        n = len(ids)
        clean_tokens = torch.tensor([list(ids)], device=lm.device)
        sigma = embedding_sigma(lm) if noise_mode == "sigma" else None
        noise_std = float(noise) * (sigma if sigma is not None else 1.0)
        with torch.inference_mode():
            clean_embeddings = runner.token_embeddings(clean_tokens)
            if corruption == "replace":
                embeddings = runner.token_embeddings(torch.tensor([list(replacement_ids)], device=lm.device))
                noise_std = 0.0
            else:
                embeddings = clean_embeddings.repeat(samples, 1, 1)
                unit = draw_noise(corruption, samples, len(noised), lm.d_model, seed)
                embeddings[:, list(noised)] += (unit * noise_std).to(lm.device, lm.dtype)
            changed = (embeddings != clean_embeddings).any(-1).any(0).nonzero()
            first_changed = int(changed[0]) if len(changed) else n
            positions = torch.arange(n, device=lm.device)
            recorder = KVRecorder()
            states, logits = _forward_collect(runner, runner.block_input(embeddings, positions), recorder)
        return CorruptedRun(states, recorder.keys, recorder.values, logits, first_changed, sigma, noise_std)

    return _corrupted_cache.get(key, make)


# ---------------------------------------------------------------------------------------------
# Metrics


class _Scorer:
    """Per-row metrics from last-position logits, against the clean distribution."""

    def __init__(self, clean_logits: torch.Tensor, target: int, contrast: int | None) -> None:
        self.target, self.contrast = target, contrast
        self.clean_logp = torch.log_softmax(clean_logits.float(), -1)
        self.clean_p = self.clean_logp.exp()

    def __call__(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logits.float()
        logp = torch.log_softmax(logits, -1)
        out = {
            "prob": logp[..., self.target].exp(),
            "logprob": logp[..., self.target],
            "kl": (self.clean_p * (self.clean_logp - logp)).sum(-1),
        }
        if self.contrast is not None:
            out["logit_diff"] = logits[..., self.target] - logits[..., self.contrast]
        return out


def _top(lm, probs: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    values, indices = probs.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices)]


# ---------------------------------------------------------------------------------------------
# The restoration plan: which rows to run for one restored token, and what to patch


@dataclass
class _Row:
    column: int  # heatmap column (layer label)
    start: int  # first block whose input differs from the corrupted run
    restore_state: int | None  # hidden kind: index into states to restore at position t
    patch_layers: range  # mlp/attn kind: layers whose module output is restored at t


def _rows(kind: str, convention: str, n_layers: int, window: int) -> list[_Row]:
    rows = []
    for column in range(n_layers):
        if kind == "hidden":
            state = column + (1 if convention == "output" else 0)
            rows.append(_Row(column, state, state, range(0)))
        else:
            low = max(0, column - window // 2)
            high = min(n_layers, column - (-window // 2))
            rows.append(_Row(column, low, None, range(low, high)))
    return sorted(rows, key=lambda r: r.start)


def _chunks(rows: list[_Row], per_chunk: int) -> list[list[_Row]]:
    return [rows[i:i + per_chunk] for i in range(0, len(rows), per_chunk)]


def _trace_token(
    runner: Runner,
    t: int,
    rows: list[_Row],
    clean: CleanRun,
    corrupt: CorruptedRun,
    kind: str,
) -> torch.Tensor:
    """Last-position logits [len(rows), S, V] with position t restored as each row says.

    Only positions t.. are computed; positions before t reuse the corrupted run's keys/values.
    Rows join the batch at their start layer (below it they equal the corrupted run).
    """
    n_layers = runner.n_layers
    samples = corrupt.states[0].shape[0]
    n = corrupt.states[0].shape[1]
    context = runner.context(torch.arange(t, n), n_prefix=t)
    active: list[_Row] = []
    hidden: torch.Tensor | None = None

    def prefix(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = len(active)
        keys = corrupt.keys[layer][:, :, :t].repeat(groups, 1, 1, 1)
        values = corrupt.values[layer][:, :, :t].repeat(groups, 1, 1, 1)
        return keys, values

    cache = KVPrefix(prefix)
    patch_rows: dict[int, list[int]] = {}

    def patch(layer: int, output: torch.Tensor) -> None:
        rows_here = patch_rows.get(layer)
        if rows_here:
            index = torch.tensor(rows_here, device=output.device)
            output.view(len(active), samples, *output.shape[1:])[index, :, 0] = clean.modules[kind][layer, t]

    modules = _module_map(runner, kind) if kind != "hidden" else {}
    with edit_outputs(modules, patch):
        for layer in range(rows[0].start, n_layers + 1):
            joining = [r for r in rows if r.start == layer]
            if joining:
                fresh = corrupt.states[layer][:, t:].repeat(len(joining), 1, 1)
                for j, row in enumerate(joining):
                    if row.restore_state is not None:
                        fresh[j * samples:(j + 1) * samples, 0] = clean.states[row.restore_state][t]
                hidden = fresh if hidden is None else torch.cat([hidden, fresh])
                active.extend(joining)
            if layer == n_layers:
                break
            patch_rows[layer] = [i for i, r in enumerate(active) if layer in r.patch_layers]
            hidden = runner.run_block(layer, hidden, context, cache)
    # rows come sorted by start layer, so they joined the batch in their own order
    return runner.logits(hidden[:, -1]).view(len(active), samples, -1)


# ---------------------------------------------------------------------------------------------
# Public entry point


def causal_trace(
    lm,
    prompt: str,
    noised: Sequence[int],
    kind: str = "hidden",
    noise: float = 0.4,
    samples: int = 10,
    seed: int = 0,
    target: int | str | None = None,
    window: int = 10,
    progress: Progress | None = None,
    *,
    corruption: str = "gaussian",
    noise_mode: str = "absolute",
    replacement: str | None = None,
    contrast: int | str | None = None,
    convention: str = "input",
    token_rows_per_batch: int = TOKEN_ROWS_PER_BATCH,
) -> Trace:
    """Trace how much restoring each (token, layer) cell brings back p(target).

    Returns a :class:`Trace`; raises ``ValueError`` for bad input and :class:`TraceCancelled` when
    ``progress(done, total)`` returns False.
    """
    started = time.perf_counter()
    _check_settings(kind, noise, samples, window, corruption, noise_mode, convention, seed)
    ids = tokenize(lm, prompt)
    noised = _check_noised(noised, len(ids))
    replacement_ids = None
    if corruption == "replace":
        if not replacement:
            raise ValueError("Token replacement needs a second prompt (the corrupted run).")
        replacement_ids = tokenize(lm, replacement)
        if len(replacement_ids) != len(ids):
            raise ValueError(
                f"The replacement prompt has {len(replacement_ids)} tokens; it must have the same "
                f"number as the prompt ({len(ids)})."
            )
    effective_samples = 1 if corruption == "replace" else int(samples)

    clean = clean_run(lm, ids)
    target_id = int(clean.logits.argmax()) if target is None else answer_token(lm, target, "target", prompt)
    contrast_id = None if contrast is None or contrast == "" else answer_token(lm, contrast, "contrast", prompt)
    corrupt = corrupted_run(lm, ids, noised, corruption, float(noise or 0), noise_mode,
                            effective_samples, int(seed), replacement_ids)
    scorer = _Scorer(clean.logits, target_id, contrast_id)
    with torch.inference_mode():
        high = {k: float(v) for k, v in scorer(clean.logits).items()}
        low = {k: float(v.mean()) for k, v in scorer(corrupt.logits).items()}
        cells = _restore_all(lm, clean, corrupt, kind, convention, int(window), scorer,
                             low, progress, token_rows_per_batch)
        corrupted_probs = torch.softmax(corrupt.logits.float(), -1).mean(0)
        clean_probs = torch.softmax(clean.logits.float(), -1)
    settings = {
        "kind": kind, "noise": float(noise or 0), "samples": int(samples), "seed": int(seed),
        "target": target if not isinstance(target, np.integer) else int(target),
        "window": int(window), "corruption": corruption, "noise_mode": noise_mode,
        "replacement": replacement if corruption == "replace" else None,
        "contrast": contrast if not isinstance(contrast, np.integer) else int(contrast),
        "convention": convention, "noised": list(noised),
    }
    return Trace(
        prompt=prompt,
        tokens=token_strings(lm, ids),
        token_ids=list(map(int, ids)),
        noised=list(noised),
        kind=kind,
        convention=convention,
        window=int(window),
        target_id=target_id,
        target=lm.tokenizer.decode([target_id]),
        metrics=cells,
        metric_low=low,
        metric_high=high,
        settings=settings,
        sigma=corrupt.sigma,
        noise_std=corrupt.noise_std,
        clean_top=_top(lm, clean_probs),
        corrupted_top=_top(lm, corrupted_probs),
        elapsed=time.perf_counter() - started,
        model={"name": getattr(lm, "name", ""), "revision": getattr(lm, "revision", "")},
    )


def _restore_all(lm, clean, corrupt, kind, convention, window, scorer, low, progress, budget) -> dict[str, np.ndarray]:
    """Every cell's metrics; identical-state cells take the corrupted values."""
    runner = Runner(lm)
    n_tokens, n_layers = len(clean.states[0]), runner.n_layers
    samples = corrupt.states[0].shape[0]
    cells = {k: np.full((n_tokens, n_layers), v, dtype=np.float64) for k, v in low.items()}
    all_rows = _rows(kind, convention, n_layers, window)
    plan = []
    for t in range(corrupt.first_changed, n_tokens):
        rows = [r for r in all_rows if not _identical(r, t, clean, corrupt)]
        per_chunk = max(1, budget // max(1, samples * (n_tokens - t)))
        plan.extend((t, chunk) for chunk in _chunks(rows, per_chunk))
    total = sum(len(chunk) for _, chunk in plan)
    done = 0
    if progress is not None and progress(0, total) is False:
        raise TraceCancelled()
    for t, chunk in plan:
        logits = _trace_token(runner, t, chunk, clean, corrupt, kind)
        for name, value in scorer(logits).items():
            means = value.mean(1).double().cpu().numpy()
            for row, mean in zip(chunk, means):
                cells[name][t, row.column] = mean
        done += len(chunk)
        if progress is not None and progress(done, total) is False:
            raise TraceCancelled()
    return cells


def _identical(row: _Row, t: int, clean: CleanRun, corrupt: CorruptedRun) -> bool:
    """Whether restoring this cell changes nothing (its clean and corrupted states are equal)."""
    if row.restore_state is None:
        return False
    return bool((corrupt.states[row.restore_state][:, t] == clean.states[row.restore_state][t]).all())
