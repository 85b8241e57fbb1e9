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
- Severed paths (ROME Fig. 3; kind "hidden" only): ``sever="mlp"`` (``"attn"``) restores the same
  clean hidden state while the MLP (attention) outputs at token t in every block after the restored
  state, blocks l..L-1 for the input convention and l+1..L-1 for the output convention, keep the
  values they had in the corrupted run of the same noise sample. The drop from the unsevered cell
  is how much of the state's effect flows through those later MLPs (attention). ROME's
  ``trace_with_repatch`` draws a fresh noise sample for its second pass, so its severed numbers
  differ from ours by sampling; here the corrupted values come from the very run being restored
  (one sample), which is the defined quantity.
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
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from .model.hooks import edit_outputs
from .model.runner import KVPrefix, KVRecorder, Runner
from .model.tokens import answer_token, resolve_positions, token_strings, tokenize
from .settings import METRICS, UNSET, TraceSettings, metric_info

if TYPE_CHECKING:
    from .model import LoadedModel

TOKEN_ROWS_PER_BATCH = 4096  # rows x positions per forward; bounds peak memory

Progress = Callable[[int, int], "bool | None"]


@dataclass(frozen=True)
class RowBlock:
    """Cells of one token row finished together: ``values[metric][i]`` is the cell at
    (``token``, ``layers[i]``) of the final trace."""

    token: int
    layers: tuple[int, ...]
    values: dict[str, np.ndarray]


RowsCallback = Callable[[RowBlock], None]


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
    approximate: bool = False  # True for a first-order preview (tracing.preview), not an exact trace

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
    def trace_settings(self) -> TraceSettings:
        """The settings this trace was made with."""
        return TraceSettings.from_dict(self.settings)

    @property
    def sever(self) -> str | None:
        """What this trace severed ("mlp", "attn") or None."""
        return self.settings.get("sever")

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
            if metric_info(name).needs_contrast:
                raise ValueError(f"The {METRICS[name].label} needs a second answer (contrast).")
            raise ValueError(f"Metric '{name}' is missing from this trace.")
        return self.metrics[name]

    def metric_bounds(self, name: str) -> tuple[float, float]:
        """(corrupted, clean) value of a metric."""
        if name == "normalised":
            return 0.0, 1.0
        self.metric(name)
        return self.metric_low[name], self.metric_high[name]

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata and named arrays (for the result store)."""
        return to_record(self, ("prompt", "tokens", "token_ids", "noised", "kind", "convention", "window",
                                "target_id", "target", "metric_low", "metric_high", "settings", "sigma",
                                "noise_std", "elapsed", "model", "approximate"))

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Trace":
        fields = record_fields(meta, arrays)
        fields["approximate"] = bool(meta.get("approximate", False))
        return cls(**fields)


# ---------------------------------------------------------------------------------------------
# Input checks


def to_record(result: Any, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The store's record of a result (a Trace or a HeadTrace): the named fields and the top-5
    lists as JSON-able metadata, each metric as an array ``metric.<name>``."""
    meta = {key: getattr(result, key) for key in names}
    meta["clean_top"] = [list(x) for x in result.clean_top]
    meta["corrupted_top"] = [list(x) for x in result.corrupted_top]
    arrays = {f"metric.{k}": np.ascontiguousarray(v) for k, v in result.metrics.items()}
    return meta, arrays


def record_fields(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The constructor fields of a result from its record (``to_record``'s inverse)."""
    fields = dict(meta)
    fields["metrics"] = {k.split(".", 1)[1]: np.asarray(v) for k, v in arrays.items() if k.startswith("metric.")}
    fields["clean_top"] = [tuple(x) for x in meta["clean_top"]]
    fields["corrupted_top"] = [tuple(x) for x in meta["corrupted_top"]]
    return fields


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
    modules: dict[str, torch.Tensor]  # "mlp"/"attn" -> [L, S, n, d] module outputs (severed paths)
    keys: dict[int, torch.Tensor]  # layer -> [S, kv_heads, n, head_dim]
    values: dict[int, torch.Tensor]
    logits: torch.Tensor  # [S, V] at the last position
    first_changed: int  # first position whose corrupted input differs from the clean one
    sigma: float | None
    noise_std: float
    seconds: float = 0.0  # time its forward took (calibrates cost estimates)


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


def clean_run(lm: "LoadedModel", ids: Sequence[int]) -> CleanRun:
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


def embedding_sigma(lm: "LoadedModel") -> float:
    """Standard deviation of all entries of the token-embedding matrix."""
    weight = lm.model.get_submodule(lm.adapter.token_embedding).weight
    return float(weight.detach().float().std())


def draw_noise(corruption: str, samples: int, n_noised: int, d_model: int, seed: int) -> torch.Tensor:
    """Unit noise [samples, n_noised, d_model], float32 on the CPU (scale it by the noise level)."""
    generator = torch.Generator().manual_seed(int(seed))
    if corruption == "uniform":
        return torch.rand((samples, n_noised, d_model), generator=generator) * 2 - 1
    return torch.randn((samples, n_noised, d_model), generator=generator)


def corrupted_input(lm: "LoadedModel", ids: Sequence[int], noised: Sequence[int], corruption: str,
                    noise: float, noise_mode: str, samples: int, seed: int,
                    replacement_ids: Sequence[int] | None) -> tuple[torch.Tensor, int, float | None, float]:
    """The corrupted runs' block-0 input [S, n, d] (the noise contract of the module docstring),
    the first position that differs from the clean input, the embedding sigma (sigma mode) and the
    noise std actually used."""
    runner = Runner(lm)
    n = len(ids)
    sigma = embedding_sigma(lm) if noise_mode == "sigma" else None
    noise_std = float(noise) * (sigma if sigma is not None else 1.0)
    with torch.inference_mode():
        clean_embeddings = runner.token_embeddings(torch.tensor([list(ids)], device=lm.device))
        if corruption == "replace":
            embeddings = runner.token_embeddings(torch.tensor([list(replacement_ids)], device=lm.device))
            noise_std = 0.0
        else:
            embeddings = clean_embeddings.repeat(samples, 1, 1)
            unit = draw_noise(corruption, samples, len(noised), lm.d_model, seed)
            embeddings[:, list(noised)] += (unit * noise_std).to(lm.device, lm.dtype)
        changed = (embeddings != clean_embeddings).any(-1).any(0).nonzero()
        first_changed = int(changed[0]) if len(changed) else n
        start = runner.block_input(embeddings, torch.arange(n, device=lm.device))
    return start, first_changed, sigma, noise_std


def corrupted_run(
    lm: "LoadedModel",
    ids: Sequence[int],
    noised: Sequence[int],
    corruption: str,
    noise: float,
    noise_mode: str,
    samples: int,
    seed: int,
    replacement_ids: Sequence[int] | None,
) -> CorruptedRun:
    """States, module outputs, keys, values and logits of the corrupted runs (cached)."""
    key = (_model_key(lm.model), tuple(ids), tuple(noised), corruption, float(noise), noise_mode, samples,
           seed, tuple(replacement_ids or ()))

    def make() -> CorruptedRun:
        started = time.perf_counter()
        runner = Runner(lm)
        start, first_changed, sigma, noise_std = corrupted_input(
            lm, ids, noised, corruption, noise, noise_mode, samples, seed, replacement_ids)
        outputs: dict[str, dict[int, torch.Tensor]] = {"mlp": {}, "attn": {}}
        with torch.inference_mode(), \
                edit_outputs(_module_map(runner, "mlp"), lambda l, o: outputs["mlp"].__setitem__(l, o.clone())), \
                edit_outputs(_module_map(runner, "attn"), lambda l, o: outputs["attn"].__setitem__(l, o.clone())):
            recorder = KVRecorder()
            states, logits = _forward_collect(runner, start, recorder)
        modules = {k: torch.stack([v[l] for l in range(runner.n_layers)]) for k, v in outputs.items()}
        return CorruptedRun(states, modules, recorder.keys, recorder.values, logits, first_changed, sigma,
                            noise_std, time.perf_counter() - started)

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


def _top(lm: "LoadedModel", probs: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
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


def _chunks(rows: list[_Row], per_chunk: int, cost: Callable[[_Row], int],
            max_work: int | None = None) -> list[list[_Row]]:
    """Consecutive groups of at most ``per_chunk`` rows and, when ``max_work`` is given, at most
    that much work (block-positions) each; every group has at least one row."""
    chunks: list[list[_Row]] = []
    work = 0
    for row in rows:
        if not chunks or len(chunks[-1]) >= per_chunk or (max_work is not None and work + cost(row) > max_work):
            chunks.append([])
            work = 0
        chunks[-1].append(row)
        work += cost(row)
    return chunks


def _trace_token(
    runner: Runner,
    t: int,
    rows: list[_Row],
    clean: CleanRun,
    corrupt: CorruptedRun,
    kind: str,
    sever: str | None = None,
) -> torch.Tensor:
    """Last-position logits [len(rows), S, V] with position t restored as each row says.

    Only positions t.. are computed; positions before t reuse the corrupted run's keys/values.
    Rows join the batch at their start layer (below it they equal the corrupted run). With
    ``sever`` (hidden kind), every block a row runs sets that part's output at t back to the
    corrupted run's value of the same sample: exactly blocks start..L-1.
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

    def keep_corrupted(layer: int, output: torch.Tensor) -> None:
        output.view(len(active), samples, *output.shape[1:])[:, :, 0] = corrupt.modules[sever][layer, :, t]

    if sever is not None:
        modules, edit = _module_map(runner, sever), keep_corrupted
    else:
        modules, edit = (_module_map(runner, kind) if kind != "hidden" else {}), patch
    with edit_outputs(modules, edit):
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


@dataclass
class TraceInputs:
    """What every trace of one prompt starts from: checked settings, token ids and noised
    positions, the clean run, the target and contrast ids and their scorer."""

    prompt: str
    settings: TraceSettings
    ids: list[int]
    noised: list[int]
    replacement_ids: list[int] | None
    clean: CleanRun
    target_id: int
    contrast_id: int | None
    scorer: "_Scorer"

    @classmethod
    def make(cls, lm: "LoadedModel", prompt: str, noised: Sequence[int], settings: TraceSettings) -> "TraceInputs":
        """Tokenize and check everything (ValueError for bad input), then run or reuse the clean run."""
        ids = tokenize(lm, prompt)
        noised = _check_noised(noised, len(ids))
        replacement_ids = _replacement_ids(lm, settings, len(ids))
        clean = clean_run(lm, ids)
        target = settings.target
        target_id = int(clean.logits.argmax()) if target is None else answer_token(lm, target, "target", prompt)
        contrast_id = None if settings.contrast is None else answer_token(lm, settings.contrast, "contrast", prompt)
        return cls(prompt, settings, ids, noised, replacement_ids, clean, target_id, contrast_id,
                   _Scorer(clean.logits, target_id, contrast_id))

    def trace(self, lm: "LoadedModel", cells: dict[str, np.ndarray], low: dict[str, float],
              corrupted_logits: torch.Tensor, sigma: float | None, noise_std: float, started: float,
              rows: list[int] | None = None, approximate: bool = False) -> Trace:
        """The :class:`Trace` of these inputs with computed ``cells`` ([T, L] per metric), their
        ``low`` (from ``low()``) and the corrupted runs' last-position logits [S, V]."""
        with torch.inference_mode():
            high = {k: float(v) for k, v in self.scorer(self.clean.logits).items()}
            corrupted_probs = torch.softmax(corrupted_logits.float(), -1).mean(0)
            clean_probs = torch.softmax(self.clean.logits.float(), -1)
        return Trace(
            prompt=self.prompt,
            tokens=token_strings(lm, self.ids),
            token_ids=list(map(int, self.ids)),
            noised=list(self.noised),
            kind=self.settings.kind,
            convention=self.settings.convention,
            window=self.settings.window,
            target_id=self.target_id,
            target=lm.tokenizer.decode([self.target_id]),
            metrics=cells,
            metric_low=low,
            metric_high=high,
            settings={**self.settings.to_dict(), "noised": list(self.noised),
                      **({"rows": rows} if rows is not None else {})},
            sigma=sigma,
            noise_std=noise_std,
            clean_top=_top(lm, clean_probs),
            corrupted_top=_top(lm, corrupted_probs),
            elapsed=time.perf_counter() - started,
            model={"name": getattr(lm, "name", ""), "revision": getattr(lm, "revision", "")},
            approximate=approximate,
        )

    def low(self, corrupted_logits: torch.Tensor) -> dict[str, float]:
        """Every metric of the corrupted runs with nothing restored (mean over samples)."""
        with torch.inference_mode():
            return {k: float(v.mean()) for k, v in self.scorer(corrupted_logits).items()}


def causal_trace(
    lm: "LoadedModel",
    prompt: str,
    noised: Sequence[int],
    kind: str = UNSET,
    noise: float = UNSET,
    samples: int = UNSET,
    seed: int = UNSET,
    target: int | str | None = UNSET,
    window: int = UNSET,
    progress: Progress | None = None,
    *,
    settings: TraceSettings | None = None,
    corruption: str = UNSET,
    noise_mode: str = UNSET,
    replacement: str | None = UNSET,
    contrast: int | str | None = UNSET,
    convention: str = UNSET,
    sever: str | None = UNSET,
    rows: str | Sequence[int] | None = None,
    on_rows: RowsCallback | None = None,
    token_rows_per_batch: int = TOKEN_ROWS_PER_BATCH,
    max_chunk_work: int | None = None,
) -> Trace:
    """Trace how much restoring each (token, layer) cell of ``prompt`` brings back p(target)
    when the tokens at ``noised`` are corrupted.

    Settings come from ``settings`` (a :class:`TraceSettings`, default ``TraceSettings()``:
    hidden, noise 0.4, 10 samples, seed 0, window 10, input convention); any keyword that is
    given replaces its value (``target=None``: the clean top-1 token; ``sever="mlp"|"attn"``
    with kind "hidden": severed paths, see the module docstring). Returns a :class:`Trace` with cells
    [n_tokens, n_layers]; raises ``ValueError`` for bad input and :class:`TraceCancelled` when
    ``progress(done, total)`` returns False (asked after every chunk of cells; ``done`` and
    ``total`` count block-positions of work, so their ratio is an honest fraction of the time).
    ``max_chunk_work`` caps the work between two ``progress`` calls (block-positions; see
    ``chunk_work_for``), so that a cancel takes effect quickly; chunking changes numbers only at
    float rounding. ``rows``: which token rows to compute (``resolve_rows``; the others are NaN, not faked).
    ``on_rows(RowBlock)`` receives every computed cell exactly once as
    soon as it is known (``token_order``: noised tokens and the final token first); the result is
    the same, bit for bit, with or without it.
    """
    started = time.perf_counter()
    s = TraceSettings.merged(settings, kind=kind, noise=noise, samples=samples, seed=seed,
                             target=target, window=window, corruption=corruption,
                             noise_mode=noise_mode, replacement=replacement, contrast=contrast,
                             convention=convention, sever=sever)
    inputs = TraceInputs.make(lm, prompt, noised, s)
    corrupt = corrupted_run(lm, inputs.ids, inputs.noised, s.corruption, s.noise, s.noise_mode,
                            s.effective_samples, s.seed, inputs.replacement_ids)
    computed_rows = resolve_rows(rows, inputs.noised, len(inputs.ids))
    plan = _plan(inputs.clean, corrupt, s.kind, s.convention, s.window, token_rows_per_batch, inputs.noised,
                 computed_rows, max_chunk_work)
    low = inputs.low(corrupt.logits)
    with torch.inference_mode():
        cells = _restore_all(lm, inputs.clean, corrupt, s.kind, inputs.scorer, low, plan, progress, on_rows,
                             s.sever)
    return inputs.trace(lm, cells, low, corrupt.logits, corrupt.sigma, corrupt.noise_std, started, computed_rows)


def _replacement_ids(lm: "LoadedModel", s: TraceSettings, n_tokens: int) -> list[int] | None:
    """Token ids of the replacement prompt (token replacement only), checked for length."""
    if s.corruption != "replace":
        return None
    if not s.replacement:
        raise ValueError("Token replacement needs a second prompt (the corrupted run).")
    ids = tokenize(lm, s.replacement)
    if len(ids) != n_tokens:
        raise ValueError(
            f"The replacement prompt has {len(ids)} tokens; it must have the same "
            f"number as the prompt ({n_tokens})."
        )
    return ids


@dataclass
class _Chunk:
    """Rows of one token computed in one batch, and their cost in block-positions."""

    token: int
    rows: list[_Row]
    cost: int


@dataclass
class _Plan:
    chunks: list[_Chunk]  # in computing order
    known: list[tuple[int, tuple[int, ...]]]  # (token, layers) whose cells equal the corrupted run
    skipped: list[int]  # token rows not computed at all (NaN)
    capped: bool = False  # chunks limited by max_work (their speed, overhead included, is not recorded)

    @property
    def cost(self) -> int:
        return sum(c.cost for c in self.chunks)

    @property
    def cells(self) -> int:
        return sum(len(c.rows) for c in self.chunks)


def _plan(clean: CleanRun, corrupt: CorruptedRun, kind: str, convention: str, window: int,
          budget: int, noised: Sequence[int], rows: Sequence[int] | None, max_work: int | None = None) -> _Plan:
    """Which cells to compute, in which batches and order (``token_order``), and at what cost: a
    row restored at token t from layer ``start`` runs blocks start..L-1 on positions t..n-1 for
    every sample. Cells whose clean and corrupted states are equal are known without a forward.
    Chunks hold at most ``budget`` rows x positions (memory) and ``max_work`` block-positions."""
    n_tokens, n_layers = len(clean.states[0]), len(clean.states) - 1
    samples = corrupt.states[0].shape[0]
    all_rows = _rows(kind, convention, n_layers, window)
    wanted = set(range(n_tokens)) if rows is None else set(rows)
    plan = _Plan([], [], sorted(set(range(n_tokens)) - wanted), capped=max_work is not None)
    for t in token_order(n_tokens, noised):
        if t not in wanted:
            continue
        todo = [r for r in all_rows if not _identical(r, t, clean, corrupt)] if t >= corrupt.first_changed else []
        computed = {r.column for r in todo}
        plan.known.append((t, tuple(c for c in range(n_layers) if c not in computed)))
        width = samples * (n_tokens - t)

        def cost(row: _Row, width: int = width) -> int:
            return width * max(1, n_layers - row.start)

        for chunk in _chunks(todo, max(1, budget // max(1, width)), cost, max_work):
            plan.chunks.append(_Chunk(t, chunk, sum(cost(r) for r in chunk)))
    return plan


def _restore_all(lm: "LoadedModel", clean, corrupt, kind: str, scorer, low, plan: _Plan, progress,
                 on_rows: RowsCallback | None = None, sever: str | None = None) -> dict[str, np.ndarray]:
    """Every planned cell's metrics (known cells take the corrupted values, skipped rows are NaN).
    ``progress(done, total)`` counts block-positions of work; each finished group of cells goes to
    ``on_rows``."""
    runner = Runner(lm)
    n_tokens, n_layers = len(clean.states[0]), runner.n_layers
    cells = {k: np.full((n_tokens, n_layers), v, dtype=np.float64) for k, v in low.items()}
    for values in cells.values():
        values[plan.skipped] = np.nan
    total, done = plan.cost, 0

    def check() -> None:
        if progress is not None and progress(done, total) is False:
            raise TraceCancelled()

    def deliver(token: int, layers: tuple[int, ...]) -> None:
        if on_rows is not None and layers:
            on_rows(RowBlock(token, layers, {k: v[token, list(layers)].copy() for k, v in cells.items()}))

    check()
    for token, layers in plan.known:  # known before any forward
        deliver(token, layers)
    for chunk in plan.chunks:
        started = time.perf_counter()
        logits = _trace_token(runner, chunk.token, chunk.rows, clean, corrupt, kind, sever)
        for name, value in scorer(logits).items():
            means = value.mean(1).double().cpu().numpy()
            for row, mean in zip(chunk.rows, means):
                cells[name][chunk.token, row.column] = mean
        if not plan.capped:  # small chunks' fixed costs would lower the cap they set, and so on
            _record_rate(lm, chunk.cost, time.perf_counter() - started)
        done += chunk.cost
        deliver(chunk.token, tuple(r.column for r in chunk.rows))
        check()
    return cells


_rates: dict[int, float] = {}  # model key -> seconds per block-position of restoration work
_rates_lock = threading.Lock()


def _record_rate(lm: "LoadedModel", cost: int, seconds: float) -> None:
    """Fold one chunk's measured speed into the model's running rate."""
    if cost <= 0:
        return
    key = _model_key(lm.model)
    with _rates_lock:
        old = _rates.get(key)
        _rates[key] = seconds / cost if old is None else 0.7 * old + 0.3 * seconds / cost


def seconds_per_work(lm: "LoadedModel") -> float | None:
    """Measured seconds per block-position of restoration work for this model (None before its
    first trace in this process)."""
    with _rates_lock:
        return _rates.get(_model_key(lm.model))


# Least work per chunk: every chunk has a fixed cost, so much smaller chunks run many times slower
# (measured: chunks of 193 block-positions made a trace 12x slower than uncapped; chunks of about
# 2,400, 0.4 s on the idle machine, 1.3-1.4x). A slow or loaded moment cannot push the cap below it.
MIN_CHUNK_WORK = 1500


def chunk_work_for(lm: "LoadedModel", seconds: float = 0.4) -> int | None:
    """The ``max_chunk_work`` that keeps one chunk under ``seconds`` at this model's measured speed,
    never below ``MIN_CHUNK_WORK`` (None before its first trace: no cap)."""
    rate = seconds_per_work(lm)
    return None if rate is None else max(MIN_CHUNK_WORK, int(seconds / rate))


# Restorations run in large batches, so a block-position costs less than in the single corrupted
# forward: measured 2.4-3.4x on the embedded model (Eiffel prompt, 3 samples, CPU).
BATCHED_SPEEDUP = 3.0


@dataclass(frozen=True)
class TraceEstimate:
    """What an exact trace will cost before it runs: cells to compute, work in block-positions,
    and the expected seconds on this machine (from the measured speed of earlier traces of this
    model, else from the corrupted run's forward)."""

    cells: int
    cost: int
    seconds: float


def estimate_trace(lm: "LoadedModel", prompt: str, noised: Sequence[int], *, settings: TraceSettings | None = None,
                   rows: str | Sequence[int] | None = None, token_rows_per_batch: int = TOKEN_ROWS_PER_BATCH,
                   **keywords: Any) -> TraceEstimate:  # keywords: TraceSettings fields, as causal_trace
    """The cost of ``causal_trace`` with the same arguments, without tracing: runs (or reuses)
    only the clean and corrupted forwards."""
    s = TraceSettings.merged(settings, **keywords)
    inputs = TraceInputs.make(lm, prompt, noised, s)
    ids, noised = inputs.ids, inputs.noised
    corrupt = corrupted_run(lm, ids, noised, s.corruption, s.noise, s.noise_mode, s.effective_samples,
                            s.seed, inputs.replacement_ids)
    plan = _plan(inputs.clean, corrupt, s.kind, s.convention, s.window, token_rows_per_batch, noised,
                 resolve_rows(rows, noised, len(ids)))
    rate = seconds_per_work(lm)
    if rate is None:  # before this model's first trace: from the corrupted forward's speed
        forward = corrupt.states[0].shape[0] * len(ids) * (len(corrupt.states) - 1)
        rate = corrupt.seconds / max(1, forward) / BATCHED_SPEEDUP
    return TraceEstimate(plan.cells, plan.cost, plan.cost * rate)


ROW_CHOICES = ("all", "noised_final")


def resolve_rows(rows: str | Sequence[int] | None, noised: Sequence[int], n_tokens: int) -> list[int] | None:
    """Token rows to compute: None or "all" = every token (None returned); "noised_final" = the
    noised tokens and the final token; or explicit indices (negative ones count from the end)."""
    if rows is None or (isinstance(rows, str) and rows == "all"):
        return None
    if isinstance(rows, str):
        if rows != "noised_final":
            raise ValueError(f"Unknown rows '{rows}'. Use 'all', 'noised_final' or token indices.")
        return sorted({*noised, n_tokens - 1})
    out = set(resolve_positions(rows, n_tokens, "row"))
    return None if len(out) == n_tokens else sorted(out)


def token_order(n_tokens: int, noised: Sequence[int]) -> list[int]:
    """The order token rows are computed in, most informative first: the noised tokens, the final
    token, then the others from the first on."""
    first = [t for t in sorted(set(noised)) if 0 <= t < n_tokens]
    if n_tokens - 1 not in first:
        first.append(n_tokens - 1)
    return first + [t for t in range(n_tokens) if t not in first]


def _identical(row: _Row, t: int, clean: CleanRun, corrupt: CorruptedRun) -> bool:
    """Whether restoring this cell changes nothing (its clean and corrupted states are equal)."""
    if row.restore_state is None:
        return False
    return bool((corrupt.states[row.restore_state][:, t] == clean.states[row.restore_state][t]).all())
