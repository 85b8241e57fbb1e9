"""Per-head restoration: which attention heads carry the answer.

Semantics (every number equals a one-forward-per-(layer, head) loop with hooks, to float precision):

- Noise, target, contrast, ``low`` and ``high`` exactly as :func:`tracing.causal.causal_trace` for
  the same settings and seed (the same corrupted runs, ``causal.corrupted_run``).
- Cell (l, h) restores, at token ``token`` only, the clean output of head h of block l in the
  corrupted run: the head's slice ``h * head_dim .. (h + 1) * head_dim`` of the input of the
  attention output projection (before o_proj / c_proj / dense / out_proj), the concatenated
  per-head attention outputs. Grouped-query models need nothing special: the projection's input
  has one slice per query head whatever the number of key/value heads.
- Score: the mean over samples of every metric of ``tracing.settings.METRICS`` (the engine's
  scorer). A head whose restoration changes nothing (the projection maps the difference between
  its clean and corrupted slices to exactly zero for every sample: equal slices, zero weights,
  or a token before the first noised one) scores exactly ``low``.

Speed: the clean and corrupted runs are shared with the engine (cached); every (layer, head)
restoration of one token joins one batch at its own layer (nothing below it is recomputed), only
positions ``token..`` are computed, and the positions before reuse the corrupted run's keys and
values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .analysis import describe
from .categories import ordered
from .causal import (TOKEN_ROWS_PER_BATCH, Progress, Trace, TraceCancelled, TraceInputs, corrupted_run,
                     record_fields, to_record)
from .model.adapters import projection_weight
from .model.hooks import edit_inputs
from .model.runner import KVPrefix, Runner
from .model.tokens import resolve_positions, tokenize
from .settings import UNSET, TraceSettings

if TYPE_CHECKING:
    from .model import LoadedModel
    from .store import ResultStore

RECORD = "head"  # the store's record type of a HeadTrace
HEAD_SETTINGS = ("noise", "noise_mode", "corruption", "replacement", "samples", "seed", "target", "contrast")
TOKENS = ("final", "noised")  # where a prompt set's heads are restored: the final token, the last noised one
TOKEN_LABELS = {"final": "final token", "noised": "last noised token"}


# ---------------------------------------------------------------------------------------------
# The result


@dataclass
class HeadTrace:
    """Per-head restoration of one prompt: every metric per (layer, head) cell, restored at ``token``."""

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    noised: list[int]
    token: int  # the restored position (absolute)
    target_id: int
    target: str
    metrics: dict[str, np.ndarray]  # name -> [n_layers, n_heads]
    metric_low: dict[str, float]
    metric_high: dict[str, float]
    settings: dict[str, Any]  # TraceSettings.to_dict() + noised, token, record
    sigma: float | None
    noise_std: float
    clean_top: list[tuple[str, float]]
    corrupted_top: list[tuple[str, float]]
    elapsed: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)

    # The same rules as a Trace's cells (one home: causal.Trace), on [layer, head] cells.
    scores = Trace.scores
    low = Trace.low
    high = Trace.high
    normalised = Trace.normalised
    metric = Trace.metric
    metric_bounds = Trace.metric_bounds

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores.shape[1])

    @property
    def trace_settings(self) -> TraceSettings:
        """The settings this head trace was made with (without noised and token)."""
        return settings_from_dict(self.settings)

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata and named arrays (for the result store)."""
        return to_record(self, ("prompt", "tokens", "token_ids", "noised", "token", "target_id", "target",
                                "metric_low", "metric_high", "settings", "sigma", "noise_std", "elapsed", "model"))

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "HeadTrace":
        return cls(**record_fields(meta, arrays))

    def frame(self, metric: str = "normalised") -> pd.DataFrame:
        """One row per (layer, head): ``layer, head, value``."""
        values = self.metric(metric)
        layer, head = np.indices(values.shape).reshape(2, -1)
        return pd.DataFrame({"layer": layer, "head": head, "value": values.reshape(-1)})


def head_settings(settings: TraceSettings) -> TraceSettings:
    """Only the settings a head trace depends on (kind, window, convention... take their
    defaults, so they never split the store's keys)."""
    return TraceSettings(**{name: getattr(settings, name) for name in HEAD_SETTINGS})


def settings_from_dict(values: Mapping[str, Any]) -> TraceSettings:
    """The TraceSettings of a head trace's settings dict (``token`` and ``record`` left out)."""
    return TraceSettings.from_dict({k: v for k, v in values.items() if k not in ("token", "record")})


def head_settings_dict(lm: "LoadedModel", prompt: str, noised: Sequence[int], settings: TraceSettings,
                       token: int = -1) -> dict[str, Any]:
    """The settings dict a head trace of these inputs records (and its store key is made of):
    ``head_settings(settings).to_dict()`` + sorted ``noised``, the absolute ``token`` and the record type."""
    n = len(tokenize(lm, prompt))
    (position,) = resolve_positions([token], n, "restored token")
    return {**head_settings(settings).to_dict(), "noised": sorted({int(i) for i in noised}),
            "token": position, "record": RECORD}


# ---------------------------------------------------------------------------------------------
# The heads' clean outputs (thread-owned pre-hooks on the output projections: model.hooks)



def clean_head_outputs(lm: "LoadedModel", ids: Sequence[int]) -> torch.Tensor:
    """The clean run's output-projection inputs: [n_layers, n_tokens, n_heads * head_dim]."""
    runner = Runner(lm)
    kept: dict[int, torch.Tensor] = {}
    with torch.inference_mode(), edit_inputs(lm.adapter.out_projections(runner.blocks),
                                             lambda layer, x: kept.__setitem__(layer, x[0].clone())):
        tokens = torch.tensor([list(ids)], device=lm.device)
        positions = torch.arange(len(ids), device=lm.device)
        runner.run(runner.block_input(runner.token_embeddings(tokens), positions), positions)
    return torch.stack([kept[layer] for layer in range(runner.n_layers)])


# ---------------------------------------------------------------------------------------------
# The restorations


def _chunks(cells: list[tuple[int, int]], per_chunk: int) -> list[list[tuple[int, int]]]:
    return [cells[i:i + per_chunk] for i in range(0, len(cells), per_chunk)]


def _cost(cells: list[tuple[int, int]], n_layers: int, width: int) -> int:
    """Block-positions of work: a cell of layer l runs blocks l..L-1 on ``width`` rows x positions."""
    return sum(width * (n_layers - layer) for layer, _ in cells)


def _restore_heads(runner: Runner, cells: list[tuple[int, int]], t: int, clean: torch.Tensor,
                   corrupt, head_dim: int) -> tuple[torch.Tensor, list[int]]:
    """Last-position logits [len(cells), S, V] with each (layer, head) cell's clean slice restored
    at position t, and the indices of the cells whose restoration changes nothing.

    ``clean``: [L, D] projection inputs at t. Cells (sorted by layer) join the batch at their layer.
    """
    n_layers, samples = runner.n_layers, corrupt.states[0].shape[0]
    n = corrupt.states[0].shape[1]
    context = runner.context(torch.arange(t, n), n_prefix=t)
    joining_at: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(cells):
        joining_at.setdefault(layer, []).append(i)
    active, hidden = 0, None
    joined: list[tuple[int, int]] = []  # (group in the batch, cell index) of the cells joining now
    unchanged: list[int] = []
    projections = runner.adapter.out_projections(runner.blocks)

    def prefix(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (corrupt.keys[layer][:, :, :t].repeat(active, 1, 1, 1),
                corrupt.values[layer][:, :, :t].repeat(active, 1, 1, 1))

    def patch(layer: int, x: torch.Tensor) -> None:
        if not joined or cells[joined[0][1]][0] != layer:
            return
        view = x.view(active, samples, *x.shape[1:])
        weight = projection_weight(projections[layer]).double()
        for group, i in joined:
            head = slice(cells[i][1] * head_dim, (cells[i][1] + 1) * head_dim)
            change = (clean[layer, head].double() - view[group, :, 0, head].double()) @ weight[:, head].T
            if not bool(change.any()):
                unchanged.append(i)
            view[group, :, 0, head] = clean[layer, head]

    with edit_inputs(projections, patch):
        for layer in range(cells[0][0], n_layers):
            fresh_cells = joining_at.get(layer, [])
            joined = [(active + j, i) for j, i in enumerate(fresh_cells)]
            if fresh_cells:
                fresh = corrupt.states[layer][:, t:].repeat(len(fresh_cells), 1, 1)
                hidden = fresh if hidden is None else torch.cat([hidden, fresh])
                active += len(fresh_cells)
            hidden = runner.run_block(layer, hidden, context, KVPrefix(prefix))
    return runner.logits(hidden[:, -1]).view(active, samples, -1), unchanged


def head_trace(
    lm: "LoadedModel",
    prompt: str,
    noised: Sequence[int],
    noise: float = UNSET,
    samples: int = UNSET,
    seed: int = UNSET,
    token: int = -1,
    target: int | str | None = UNSET,
    progress: Progress | None = None,
    *,
    settings: TraceSettings | None = None,
    corruption: str = UNSET,
    noise_mode: str = UNSET,
    replacement: str | None = UNSET,
    contrast: int | str | None = UNSET,
    token_rows_per_batch: int = TOKEN_ROWS_PER_BATCH,
) -> HeadTrace:
    """Restore the clean output of one attention head at a time, at position ``token`` (negative:
    from the end; default the final token), in the runs where ``noised`` is corrupted.

    Settings as :func:`tracing.causal.causal_trace` (``settings`` and/or the keywords; only the
    noise, corruption, samples, seed, target and contrast matter). Returns a :class:`HeadTrace`
    with every metric per (layer, head) [n_layers, n_heads]. ``progress(done, total)`` counts
    block-positions of work; returning False raises :class:`TraceCancelled`. ValueError for bad input.
    """
    started = time.perf_counter()
    s = head_settings(TraceSettings.merged(settings, noise=noise, samples=samples, seed=seed, target=target,
                                           corruption=corruption, noise_mode=noise_mode,
                                           replacement=replacement, contrast=contrast))
    inputs = TraceInputs.make(lm, prompt, noised, s)
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise ValueError(f"The restored token must be a token index, not {token!r}.")
    (t,) = resolve_positions([int(token)], len(inputs.ids), "restored token")
    corrupt = corrupted_run(lm, inputs.ids, inputs.noised, s.corruption, s.noise, s.noise_mode,
                            s.effective_samples, s.seed, inputs.replacement_ids)
    low = inputs.low(corrupt.logits)
    cells = _compute(lm, inputs.ids, t, corrupt, inputs.scorer, low, progress, token_rows_per_batch)
    base = inputs.trace(lm, cells, low, corrupt.logits, corrupt.sigma, corrupt.noise_std, started)
    return HeadTrace(
        prompt=base.prompt, tokens=base.tokens, token_ids=base.token_ids, noised=base.noised, token=t,
        target_id=base.target_id, target=base.target, metrics=cells, metric_low=base.metric_low,
        metric_high=base.metric_high, settings={**base.settings, "token": t, "record": RECORD},
        sigma=base.sigma, noise_std=base.noise_std, clean_top=base.clean_top, corrupted_top=base.corrupted_top,
        elapsed=time.perf_counter() - started, model=base.model,
    )


def _compute(lm: "LoadedModel", ids: list[int], t: int, corrupt, scorer, low: dict[str, float],
             progress: Progress | None, budget: int) -> dict[str, np.ndarray]:
    """Every metric per (layer, head) cell (cells that cannot change anything take ``low``)."""
    n_layers, n_heads = lm.n_layers, lm.n_heads
    out = {k: np.full((n_layers, n_heads), v, dtype=np.float64) for k, v in low.items()}
    samples, n = corrupt.states[0].shape[0], len(ids)
    todo = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if t < corrupt.first_changed:  # nothing before the first corrupted position differs
        todo = []
    width = samples * (n - t)
    chunks = _chunks(todo, max(1, budget // max(1, width)))
    total, done = _cost(todo, n_layers, width), 0

    def check() -> None:
        if progress is not None and progress(done, total) is False:
            raise TraceCancelled()

    check()
    if not todo:
        return out
    with torch.inference_mode():
        runner = Runner(lm)
        clean = clean_head_outputs(lm, ids)[:, t]
        if clean.shape[-1] % n_heads:
            raise ValueError(f"The attention output width {clean.shape[-1]} is not a multiple of {n_heads} heads.")
        head_dim = clean.shape[-1] // n_heads
        for chunk in chunks:
            logits, unchanged = _restore_heads(runner, chunk, t, clean, corrupt, head_dim)
            for name, value in scorer(logits).items():
                means = value.mean(1).double().cpu().numpy()
                for i, (layer, head) in enumerate(chunk):
                    out[name][layer, head] = low[name] if i in unchanged else means[i]
            done += _cost(chunk, n_layers, width)
            check()
    return out


# ---------------------------------------------------------------------------------------------
# Prompt sets: head traces from the store, per-category averages


@dataclass
class HeadResult:
    """One prompt of a prompt set: its head trace (when there is one) and what happened."""

    category: str
    prompt: str
    subject: str
    key: str | None = None
    settings: dict[str, Any] | None = None
    status: str = "pending"  # pending | stored | computed | skipped | failed
    trace: HeadTrace | None = None
    message: str = ""


def _restored_token(where: str, noised: Sequence[int]) -> int:
    if where not in TOKENS:
        raise ValueError(f"Restore heads at one of {', '.join(TOKENS)}, not '{where}'.")
    return -1 if where == "final" else max(noised)


def plan_heads(lm: "LoadedModel", prompts: pd.DataFrame, settings: TraceSettings, store: "ResultStore",
               where: str = "final", target: str = "expected") -> list[HeadResult]:
    """Every prompt's head-trace key and status without computing (``stored`` ones come with
    their trace). ``where``: restore at the final token or the last noised token; ``target``:
    "expected" (the first token of the expected completion) or "top1" (the clean top-1)."""
    from .batch import TARGETS
    from .prompts import expected_token_id, resolve_noised

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not '{target}'")
    out = []
    for _, row in prompts.iterrows():
        result = HeadResult(str(row["category"]), str(row["prompt"]), str(row.get("subject", "") or ""))
        try:
            noised = resolve_noised(lm, result.prompt, result.subject, row.get("noised"))
            target_id = expected_token_id(lm, result.prompt, str(row["expected"])) if target == "expected" else None
            full = head_settings_dict(lm, result.prompt, noised, settings.replace(target=target_id),
                                      _restored_token(where, noised))
        except ValueError as exc:
            result.status, result.message = "skipped", str(exc)
        else:
            result.settings, result.key = full, store.key(lm, result.prompt, full)
            result.trace = store.get(result.key)
            result.status = "stored" if result.trace is not None else "pending"
        out.append(result)
    return out


def run_heads(lm: "LoadedModel", plan: list[HeadResult], store: "ResultStore",
              progress: Callable[[int, int, HeadResult], object] | None = None,
              should_stop: Callable[[], bool] | None = None, trace: Callable[..., HeadTrace] | None = None,
              cell_progress: Progress | None = None) -> bool:
    """Compute and store the pending head traces of a plan (in place); ``progress(done, total,
    result)`` after each prompt, False from it or True from ``should_stop()`` stops (finished
    prompts stay stored); ``cell_progress`` goes to each ``head_trace``. Returns whether every
    prompt was handled (False: stopped)."""
    trace = trace or head_trace  # looked up now: tests swap it
    for done, result in enumerate(plan, start=1):
        if (should_stop is not None and should_stop()):
            return False
        if result.status == "pending":
            s = result.settings
            try:
                traced = trace(lm, result.prompt, s["noised"], token=s["token"], progress=cell_progress,
                               settings=settings_from_dict(s))
            except ValueError as exc:
                result.status, result.message = "failed", str(exc)
            else:
                store.put(result.key, traced)
                result.trace, result.status = traced, "computed"
        if progress is not None and progress(done, len(plan), result) is False:
            return False
    return True


def head_summary(results: Sequence[HeadResult], metric: str = "normalised") -> pd.DataFrame:
    """Per category, layer and head: ``describe`` over prompts of one metric of the head traces.

    Columns ``category, layer, head, mean, std, sem, n`` (the attention page's grid layout).
    """
    traced = [r for r in results if r.trace is not None]
    rows = []
    for category in ordered([r.category for r in traced]):
        values = np.stack([r.trace.metric(metric) for r in traced if r.category == category])
        stats = describe(values)
        n_layers, n_heads = values.shape[1:]
        for layer in range(n_layers):
            for head in range(n_heads):
                rows.append({"category": category, "layer": layer, "head": head,
                             **{k: float(stats[k][layer, head]) for k in ("mean", "std", "sem")},
                             "n": int(stats["n"][layer, head]) if np.ndim(stats["n"]) else int(stats["n"])})
    return pd.DataFrame(rows, columns=["category", "layer", "head", "mean", "std", "sem", "n"])


def per_prompt_effects(results: Sequence[HeadResult], layer: int, head: int | None,
                       metric: str = "normalised") -> pd.DataFrame:
    """One metric of every traced prompt at ``layer`` (one ``head``, or the mean over heads):
    ``category, prompt, subject, value``."""
    rows = []
    for r in results:
        if r.trace is None:
            continue
        values = r.trace.metric(metric)
        if not 0 <= layer < values.shape[0] or (head is not None and not 0 <= head < values.shape[1]):
            raise ValueError(f"Layer {layer} / head {head} is out of range.")
        value = values[layer].mean() if head is None else values[layer, head]
        rows.append({"category": r.category, "prompt": r.prompt, "subject": r.subject, "value": float(value)})
    return pd.DataFrame(rows, columns=["category", "prompt", "subject", "value"])
