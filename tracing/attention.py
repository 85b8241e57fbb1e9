"""Attention weights: final-token attention to chosen tokens, prompt-set aggregates, long texts.

Weights come from the block runner inside ``record_attention`` (a context variable of the calling
thread), so the shared model is never switched to another attention implementation and several
threads can measure at once. Every recorder reduces what it receives at once: only the rows or
columns asked for are kept, never all layers' full attention matrices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .analysis import describe
from .categories import ordered
from .model.runner import Runner, record_attention
from .model.tokens import resolve_positions, tokenize

if TYPE_CHECKING:
    from .model import LoadedModel

TARGETS = ("first", "noised", "final")
TARGET_LABELS = {"first": "first token", "noised": "noised token", "final": "final token"}
Progress = Callable[[int, int], object]
AttendFn = Callable[..., np.ndarray]


# ---------------------------------------------------------------------------------------------
# Inputs


def _forward(lm: "LoadedModel", ids: torch.Tensor, stop: int | None = None) -> None:
    """Run blocks 0..stop-1 on ids [batch, tokens] (the caller records attention)."""
    runner = Runner(lm)
    ids = ids.to(lm.device)
    positions = torch.arange(ids.shape[-1], device=lm.device)
    hidden = runner.block_input(runner.token_embeddings(ids), positions)
    runner.run(hidden, positions, stop=stop)


def _check_seen(seen: set[int], expected: range) -> None:
    missing = sorted(set(expected) - seen)
    if missing:
        raise RuntimeError(f"No attention weights were recorded for layers {missing}.")


# ---------------------------------------------------------------------------------------------
# One prompt


def attention_to(lm: "LoadedModel", prompt: str, positions: Sequence[int]) -> np.ndarray:
    """Attention from the final token to key ``positions``: float32 [n_layers, n_heads, len(positions)].

    Un-noised prompt; negative positions count from the end (-1 is the final token itself).
    """
    ids = tokenize(lm, prompt)
    keys = resolve_positions(positions, len(ids))
    out = np.zeros((lm.n_layers, lm.n_heads, len(keys)), dtype=np.float32)
    seen: set[int] = set()
    index = torch.tensor(keys, dtype=torch.long)

    def keep(layer: int, weights: torch.Tensor) -> None:
        row = weights[0, :, -1, :].float().cpu()
        out[layer] = row[:, index].numpy()
        seen.add(layer)

    with torch.inference_mode(), record_attention(keep):
        _forward(lm, torch.tensor([ids]))
    _check_seen(seen, range(lm.n_layers))
    return out


def attention_pattern(lm: "LoadedModel", prompt: str, layer: int) -> np.ndarray:
    """The full causal attention pattern of one layer: float32 [n_heads, queries, keys].

    Runs only blocks 0..layer. Row q holds what token q attends to (zeros after q).
    """
    ids = tokenize(lm, prompt)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < lm.n_layers:
        raise ValueError(f"Layer {layer} is out of range: the model has {lm.n_layers} layers (0..{lm.n_layers - 1}).")
    kept: dict[int, np.ndarray] = {}

    def keep(at: int, weights: torch.Tensor) -> None:
        if at == layer:
            kept[at] = weights[0].float().cpu().numpy()

    with torch.inference_mode(), record_attention(keep):
        _forward(lm, torch.tensor([ids]), stop=int(layer) + 1)
    _check_seen(set(kept), range(layer, layer + 1))
    return kept[layer]


# ---------------------------------------------------------------------------------------------
# Prompt sets by category


@dataclass
class PromptSetAttention:
    """Final-token attention to the first, noised and final token for every prompt of a set.

    ``weights[p, layer, head, t]`` for t in TARGETS order; attention to several noised tokens is
    summed. ``table`` has one row per measured prompt (same order); ``skipped`` lists prompts that
    could not be measured, with the reason.
    """

    model: str
    table: pd.DataFrame
    weights: np.ndarray
    skipped: pd.DataFrame
    elapsed: float = 0.0
    n_layers: int = field(init=False)
    n_heads: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_layers, self.n_heads = int(self.weights.shape[1]), int(self.weights.shape[2])

    @property
    def categories(self) -> list[str]:
        """Categories present, in the shipped order first."""
        return ordered(self.table["category"])


def _noised_for(lm: "LoadedModel", row: dict) -> list[int]:
    from .prompts import resolve_noised

    return resolve_noised(lm, row["prompt"], row.get("subject", ""), row.get("noised"))


def _measure(lm: "LoadedModel", row: dict, attend: AttendFn) -> tuple[np.ndarray, list[int], int]:
    """[L, H, 3] for one prompt row, its noised positions and its token count."""
    n_tokens = len(tokenize(lm, row["prompt"]))
    noised = _noised_for(lm, row)
    weights = np.asarray(attend(lm, row["prompt"], tuple([0, *noised, n_tokens - 1])))
    first, final = weights[..., 0], weights[..., -1]
    noised_sum = weights[..., 1:-1].sum(axis=-1)
    return np.stack([first, noised_sum, final], axis=-1), noised, n_tokens


def prompt_set_attention(
    lm: "LoadedModel",
    prompts: pd.DataFrame | None = None,
    progress: Progress | None = None,
    attend: AttendFn = attention_to,
) -> PromptSetAttention:
    """Final-token attention to first / noised / final token for every prompt of a set.

    ``prompts``: a frame from ``load_prompt_set`` (None: the shipped set). ``attend`` computes
    ``attention_to(lm, prompt, positions)`` (inject a cached version). Prompts that fail (subject
    not found, too long...) go to ``skipped``. ``progress(done, total)`` is called after each.
    """
    from .prompts import load_prompt_set

    frame = load_prompt_set() if prompts is None else prompts
    start = time.perf_counter()
    rows, arrays, skipped = [], [], []
    records = frame.to_dict("records")
    for done, row in enumerate(records, start=1):
        try:
            weights, noised, n_tokens = _measure(lm, row, attend)
        except ValueError as exc:
            skipped.append({"category": row.get("category"), "prompt": row.get("prompt"), "error": str(exc)})
        else:
            arrays.append(weights)
            rows.append(_table_row(row, noised, n_tokens))
        if progress is not None:
            progress(done, len(records))
    empty = np.zeros((0, lm.n_layers, lm.n_heads, len(TARGETS)), dtype=np.float32)
    return PromptSetAttention(
        model=lm.name,
        table=pd.DataFrame(rows, columns=_TABLE_COLUMNS),
        weights=np.stack(arrays).astype(np.float32) if arrays else empty,
        skipped=pd.DataFrame(skipped, columns=["category", "prompt", "error"]),
        elapsed=time.perf_counter() - start,
    )


_TABLE_COLUMNS = ["category", "prompt", "subject", "expected", "noised", "n_tokens", "problems"]


def _table_row(row: dict, noised: list[int], n_tokens: int) -> dict:
    return {
        "category": row.get("category"),
        "prompt": row.get("prompt"),
        "subject": row.get("subject", ""),
        "expected": row.get("expected", ""),
        "noised": " ".join(str(i) for i in noised),
        "n_tokens": n_tokens,
        "problems": row.get("problems", "") or "",
    }


def _target_index(target: str) -> int:
    if target not in TARGETS:
        raise ValueError(f"Unknown target '{target}': use one of {', '.join(TARGETS)}.")
    return TARGETS.index(target)


def layer_summary(result: PromptSetAttention) -> pd.DataFrame:
    """Per category, target and layer: head-averaged attention, statistics over prompts.

    Columns ``category, target, layer, mean, std, sem, q25, q75, n`` (``analysis.describe``).
    """
    per_prompt = result.weights.mean(axis=2)  # [P, L, 3]
    rows = []
    for category in result.categories:
        values = per_prompt[(result.table["category"] == category).to_numpy()]
        n = len(values)
        for t, target in enumerate(TARGETS):
            v = values[:, :, t]
            stats = _stats(v)
            for layer in range(result.n_layers):
                rows.append({"category": category, "target": target, "layer": layer, "n": n,
                             **{k: float(s[layer]) for k, s in stats.items()}})
    return pd.DataFrame(rows, columns=["category", "target", "layer", "mean", "std", "sem", "q25", "q75", "n"])


def _stats(v: np.ndarray) -> dict[str, np.ndarray]:
    """``describe`` (mean, std, sem) and the quartiles over axis 0."""
    stats = describe(v)
    return {"mean": stats["mean"], "std": stats["std"], "sem": stats["sem"],
            "q25": np.quantile(v, 0.25, axis=0), "q75": np.quantile(v, 0.75, axis=0)}


def head_summary(result: PromptSetAttention, target: str) -> pd.DataFrame:
    """Per category, layer and head: mean and std over prompts of attention to ``target``."""
    t = _target_index(target)
    rows = []
    for category in result.categories:
        values = result.weights[(result.table["category"] == category).to_numpy(), :, :, t]
        stats = describe(values)
        mean, std = stats["mean"], stats["std"]
        for layer in range(result.n_layers):
            for head in range(result.n_heads):
                rows.append({"category": category, "target": target, "layer": layer, "head": head,
                             "mean": float(mean[layer, head]), "std": float(std[layer, head]), "n": len(values)})
    return pd.DataFrame(rows, columns=["category", "target", "layer", "head", "mean", "std", "n"])


def head_difference(result: PromptSetAttention, target: str, a: str, b: str) -> pd.DataFrame:
    """Per layer and head: mean attention to ``target`` in category ``a`` minus category ``b``."""
    out = category_difference(head_summary(result, target), a, b)
    out.insert(0, "target", target)
    return out


def category_difference(heads: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """``layer, head, mean_a, mean_b, difference`` from a per-head frame (``category, layer, head,
    mean``: attention weights or causal effects) of categories ``a`` and ``b``."""
    for category in (a, b):
        if category not in set(heads["category"]):
            raise ValueError(f"No prompts of category '{category}' were measured.")
    left = heads[heads["category"] == a].set_index(["layer", "head"])["mean"]
    right = heads[heads["category"] == b].set_index(["layer", "head"])["mean"]
    out = pd.DataFrame({"mean_a": left, "mean_b": right}).reset_index()
    out["difference"] = out["mean_a"] - out["mean_b"]
    return out


def per_prompt_values(result: PromptSetAttention, target: str, layer: int, head: int | None = None) -> pd.DataFrame:
    """Attention to ``target`` of every prompt at ``layer`` (one ``head``, or averaged over heads)."""
    t = _target_index(target)
    if not 0 <= layer < result.n_layers or (head is not None and not 0 <= head < result.n_heads):
        raise ValueError(f"Layer {layer} / head {head} is out of range.")
    values = result.weights[:, layer, :, t]
    value = values.mean(axis=1) if head is None else values[:, head]
    out = result.table[["category", "prompt", "subject", "noised", "n_tokens"]].copy()
    out["attention"] = value
    return out


def long_frame(result: PromptSetAttention) -> pd.DataFrame:
    """Every measured number: ``category, prompt, target, layer, head, attention`` (for CSV export)."""
    p, l, h, t = np.indices(result.weights.shape).reshape(4, -1)
    return pd.DataFrame({
        "category": result.table["category"].to_numpy()[p],
        "prompt": result.table["prompt"].to_numpy()[p],
        "target": np.array(TARGETS)[t],
        "layer": l,
        "head": h,
        "attention": result.weights.reshape(-1),
    })


# ---------------------------------------------------------------------------------------------
# Long texts: attention the i-th token pays to the first token


def text_ids(lm: "LoadedModel", text: str) -> np.ndarray:
    """All token ids of a text (no special tokens added)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("The text is empty.")
    return np.asarray(lm.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def sample_windows(ids: np.ndarray, n_samples: int, length: int, seed: int = 0,
                   disjoint: bool = False) -> np.ndarray:
    """Start offsets of ``n_samples`` windows of ``length`` tokens: random starts (distinct when
    possible; windows may overlap), or with ``disjoint`` non-overlapping windows (random slots of
    a tiling with a random offset; ValueError when the text holds fewer than ``n_samples``)."""
    if n_samples < 1:
        raise ValueError("The number of samples must be at least 1.")
    if length < 2:
        raise ValueError("The sample length must be at least 2 tokens.")
    if len(ids) < length:
        raise ValueError(f"The text has only {len(ids)} tokens: choose a sample length of at most {len(ids)} tokens.")
    rng = np.random.default_rng(seed)
    if disjoint:
        slots = max_disjoint_windows(len(ids), length)
        if n_samples > slots:
            raise ValueError(f"The text ({len(ids):,} tokens) holds only {slots} non-overlapping windows of "
                             f"{length} tokens: choose at most {slots} samples, or shorter windows.")
        offset = int(rng.integers(0, len(ids) - slots * length + 1))
        return np.sort(offset + rng.choice(slots, size=n_samples, replace=False) * length)
    n_starts = len(ids) - length + 1
    return np.sort(rng.choice(n_starts, size=n_samples, replace=n_samples > n_starts))


def max_disjoint_windows(n_tokens: int, length: int) -> int:
    """How many non-overlapping windows of ``length`` tokens a text of ``n_tokens`` holds."""
    return int(n_tokens) // max(int(length), 1)


def window_coverage(starts: Sequence[int], length: int) -> int:
    """Distinct token positions covered by windows of ``length`` tokens at ``starts``."""
    covered = np.zeros(int(max(starts)) + int(length), dtype=bool)
    for begin in starts:
        covered[int(begin):int(begin) + int(length)] = True
    return int(covered.sum())


def first_token_attention(lm: "LoadedModel", window: Sequence[int]) -> np.ndarray:
    """Attention every token of ``window`` pays to its first token: float32 [n_layers, n_heads, tokens].

    Memory-bounded: the recorder keeps only column 0 of each layer's weights.
    """
    ids = torch.as_tensor(np.asarray(window, dtype=np.int64))[None]
    vocab = lm.model.get_submodule(lm.adapter.token_embedding).weight.shape[0]
    if ids.shape[-1] == 0:
        raise ValueError("The window is empty: it has no tokens.")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"Token ids must be in the vocabulary (0 to {vocab - 1}).")
    if ids.shape[-1] > lm.n_ctx:
        raise ValueError(f"{ids.shape[-1]} tokens exceed the model's context of {lm.n_ctx}.")
    out = np.zeros((lm.n_layers, lm.n_heads, ids.shape[-1]), dtype=np.float32)
    seen: set[int] = set()

    def keep(layer: int, weights: torch.Tensor) -> None:
        out[layer] = weights[0, :, :, 0].float().cpu().numpy()
        seen.add(layer)

    with torch.inference_mode(), record_attention(keep):
        _forward(lm, ids)
    _check_seen(seen, range(lm.n_layers))
    return out


@dataclass
class LongTextAttention:
    """Mean over windows of the attention token i pays to the window's first token.

    ``mean[layer, head, i]``; ``per_sample[s, i]`` (averaged over layers and heads) for the spread.
    ``disjoint``: the windows were drawn without overlap.
    """

    model: str
    mean: np.ndarray
    per_sample: np.ndarray
    starts: np.ndarray
    n_text_tokens: int
    seed: int
    elapsed: float = 0.0
    disjoint: bool = False

    @property
    def covered_tokens(self) -> int:
        """Distinct tokens of the text inside at least one window."""
        return window_coverage(self.starts, self.length)

    @property
    def overlap(self) -> float:
        """Mean number of windows each covered token is in (1.0: no overlap). Above 1, the windows
        are not independent samples and a spread over windows overstates the evidence."""
        return self.n_samples * self.length / max(1, self.covered_tokens)

    @property
    def length(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def n_samples(self) -> int:
        return int(self.per_sample.shape[0])


def long_text_attention(
    lm: "LoadedModel",
    text: str,
    n_samples: int = 40,
    length: int = 800,
    seed: int = 0,
    progress: Progress | None = None,
    window_fn: AttendFn = first_token_attention,
    disjoint: bool = False,
) -> LongTextAttention:
    """Mean attention to the first token against position, over random windows of a text
    (``disjoint``: non-overlapping windows, see ``sample_windows``).

    ``length`` is capped at the model's context. ``window_fn(lm, window_ids)`` returns
    [L, H, length] (inject a cached version); ``progress(done, total)`` after each window.
    """
    start_time = time.perf_counter()
    ids = text_ids(lm, text)
    length = min(int(length), lm.n_ctx)
    starts = sample_windows(ids, int(n_samples), length, seed, disjoint)
    total = np.zeros((lm.n_layers, lm.n_heads, length), dtype=np.float64)
    per_sample = np.zeros((len(starts), length), dtype=np.float32)
    for s, begin in enumerate(starts):
        weights = np.asarray(window_fn(lm, tuple(int(i) for i in ids[begin : begin + length])))
        total += weights
        per_sample[s] = weights.mean(axis=(0, 1))
        if progress is not None:
            progress(s + 1, len(starts))
    return LongTextAttention(
        model=lm.name,
        mean=(total / len(starts)).astype(np.float32),
        per_sample=per_sample,
        starts=starts,
        n_text_tokens=len(ids),
        seed=seed,
        elapsed=time.perf_counter() - start_time,
        disjoint=bool(disjoint),
    )


def long_text_curves(result: LongTextAttention) -> pd.DataFrame:
    """Tidy curves: ``position, layer, attention`` per layer (head mean) plus layer ``"mean"``.

    The average over layers and heads also gets ``q25, q75`` (quartiles over windows) and
    ``uniform`` = 1 / (position + 1), what evenly spread attention would give.
    """
    positions = np.arange(result.length)
    by_layer = result.mean.mean(axis=1)  # [L, M]
    frames = [pd.DataFrame({"position": positions, "layer": str(layer), "attention": by_layer[layer]})
              for layer in range(by_layer.shape[0])]
    frames.append(pd.DataFrame({
        "position": positions,
        "layer": "mean",
        "attention": result.mean.mean(axis=(0, 1)),
        "q25": np.quantile(result.per_sample, 0.25, axis=0),
        "q75": np.quantile(result.per_sample, 0.75, axis=0),
        "uniform": 1.0 / (positions + 1),
    }))
    return pd.concat(frames, ignore_index=True)


def long_text_heads(result: LongTextAttention, from_position: int = 0) -> pd.DataFrame:
    """Per layer and head: mean attention to the first token over positions >= ``from_position``."""
    start = min(max(int(from_position), 0), result.length - 1)
    values = result.mean[:, :, start:].mean(axis=-1)
    layer, head = np.indices(values.shape).reshape(2, -1)
    return pd.DataFrame({"layer": layer, "head": head, "attention": values.reshape(-1)})
