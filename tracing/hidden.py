"""Hidden states of the final token: trajectory measures and the logit lens.

States are numbered like the causal traces: state ``l`` (l < L) is the *input* of block ``l`` at the
final token, state ``L`` is the output of the last block before the final norm (L = n_layers).

Trajectory measures (all float64, one value per layer; see ``MEASURES``):

- ``norm``        l = 0..L:   |h(l)|
- ``cosine``      l = 0..L-1: cos(h(l), h(l+1)), how much block l turns the state
- ``step``        l = 0..L-1: |h(l+1) - h(l)|, the size of block l's update
- ``step_cosine`` l = 1..L-1: cos(d(l-1), d(l)) with d(l) = h(l+1) - h(l): does block l keep moving
                  the state in the direction block l-1 moved it (1), sideways (0) or back (-1)?
- ``target_prob`` l = 0..L:   logit-lens probability of the target token (see ``logit_lens``)

A cosine with a zero vector is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch

from .analysis import describe
from .categories import group_of
from .model.runner import Runner
from .model.tokens import answer_token, tokenize

if TYPE_CHECKING:
    from .model import LoadedModel

MEASURES: dict[str, str] = {
    "norm": "Norm |h(l)|",
    "cosine": "Cosine of consecutive states",
    "step": "Step size |h(l+1) − h(l)|",
    "step_cosine": "Cosine of consecutive steps",
    "target_prob": "Logit-lens p(expected)",
}
MEASURE_HELP: dict[str, str] = {
    "norm": "Length of the final token's state entering layer l "
    "(layer L: the last block's output).",
    "cosine": "cos(h(l), h(l+1)): 1 = block l leaves the direction unchanged.",
    "step": "|h(l+1) − h(l)|: how far block l moves the state.",
    "step_cosine": "cos(step l−1, step l): 1 = block l pushes on in the same direction as "
    "block l−1.",
    "target_prob": "Probability of the expected completion's first token when the state entering "
    "layer l is put through the final norm and unembedding.",
}

Progress = Callable[[int, int], None]


def _ids(lm: "LoadedModel", prompt: str) -> torch.Tensor:
    """Token ids [1, T] of a prompt (``tokenize``: checked for empty and too long)."""
    return torch.tensor([tokenize(lm, prompt)])


def _states(runner: Runner, ids: torch.Tensor) -> torch.Tensor:
    """The final token's L + 1 states, [L + 1, d], on the model's device."""
    with torch.inference_mode():
        return torch.stack([h[0, -1] for h in runner.hidden_states(ids)])


def final_token_states(lm: "LoadedModel", prompt: str) -> np.ndarray:
    """[n_layers + 1, d_model]: inputs of blocks 0..L-1 at the final token, then the last output."""
    ids = _ids(lm, prompt)
    return _states(Runner(lm), ids).float().cpu().numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; NaN where either row is zero."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def trajectory_measures(states: np.ndarray) -> dict[str, np.ndarray]:
    """``norm`` [L+1], ``cosine`` [L], ``step`` [L], ``step_cosine`` [L-1] of states [L+1, d]."""
    h = np.asarray(states, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] < 2:
        raise ValueError(f"Expected states [layers + 1, d] with at least 2 rows, got {h.shape}.")
    steps = np.diff(h, axis=0)
    return {
        "norm": np.linalg.norm(h, axis=-1),
        "cosine": _cosine(h[:-1], h[1:]),
        "step": np.linalg.norm(steps, axis=-1),
        "step_cosine": _cosine(steps[:-1], steps[1:]),
    }


def measure_layers(measure: str, n_layers: int) -> np.ndarray:
    """The layer index of each value of a measure (see the module docstring)."""
    if measure in ("norm", "target_prob"):
        return np.arange(n_layers + 1)
    if measure in ("cosine", "step"):
        return np.arange(n_layers)
    if measure == "step_cosine":
        return np.arange(1, n_layers)
    raise ValueError(f"Unknown measure {measure!r}; choose from {', '.join(MEASURES)}.")


@dataclass
class LogitLens:
    """The final token's state at every layer put through the final norm and the unembedding.

    Row l is the state entering layer l; row L (the last) is the model's own prediction.
    """

    prompt: str
    tokens: list[str]
    top_ids: np.ndarray  # [L + 1, k]
    top_tokens: list[list[str]]  # [L + 1][k]
    top_probs: np.ndarray  # [L + 1, k]
    target_id: int
    target: str
    target_probs: np.ndarray  # [L + 1]
    target_ranks: np.ndarray  # [L + 1], 1 = top token

    @property
    def n_layers(self) -> int:
        return len(self.target_probs) - 1

    def table(self) -> pd.DataFrame:
        """Long table: layer, rank, token, token_id, prob (one row per layer and rank)."""
        rows = [
            (layer, rank + 1, self.top_tokens[layer][rank], int(self.top_ids[layer, rank]),
             float(self.top_probs[layer, rank]))
            for layer in range(self.n_layers + 1)
            for rank in range(self.top_ids.shape[1])
        ]
        return pd.DataFrame(rows, columns=["layer", "rank", "token", "token_id", "prob"])

    def target_frame(self) -> pd.DataFrame:
        """layer, target, target_prob, target_rank."""
        layers = np.arange(self.n_layers + 1)
        return pd.DataFrame({"layer": layers, "target": self.target,
                             "target_prob": self.target_probs, "target_rank": self.target_ranks})


def _lens_probs(runner: Runner, states: torch.Tensor) -> torch.Tensor:
    """Softmax of the logit lens, [L + 1, vocab], float32."""
    with torch.inference_mode():
        return runner.logits(states).float().softmax(-1)


MAX_LENS_K = 100  # top tokens per layer a person can read (more would only take time)


def logit_lens(lm: "LoadedModel", prompt: str, k: int = 5, target: str | int | None = None) -> LogitLens:
    """Top-k tokens and the target's probability and rank at every layer for the final token.

    ``target``: None = the model's top prediction on the prompt; a completion string = its first
    token (its first token after the prompt, as ``completion_token``); an int = a token id.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_LENS_K:
        raise ValueError(f"The logit lens shows 1 to {MAX_LENS_K} top tokens per layer, not {k!r}.")
    ids = _ids(lm, prompt)
    runner = Runner(lm)
    probs = _lens_probs(runner, _states(runner, ids)).cpu()
    k = min(int(k), probs.shape[-1])
    target_id = _resolve_target(lm, prompt, target, probs[-1])
    top = probs.topk(k, dim=-1)
    target_probs = probs[:, target_id]
    ranks = (probs > target_probs[:, None]).sum(-1) + 1
    decode = lm.tokenizer.decode
    return LogitLens(
        prompt=prompt,
        tokens=[decode([int(i)]) for i in ids[0]],
        top_ids=top.indices.numpy(),
        top_tokens=[[decode([int(i)]) for i in row] for row in top.indices],
        top_probs=top.values.numpy().astype(np.float64),
        target_id=target_id,
        target=decode([target_id]),
        target_probs=target_probs.numpy().astype(np.float64),
        target_ranks=ranks.numpy(),
    )


def _resolve_target(lm: "LoadedModel", prompt: str, target: str | int | None, final_probs: torch.Tensor) -> int:
    if target is None:
        return int(final_probs.argmax())
    return answer_token(lm, target, "target", prompt)


def _measures(states: torch.Tensor, probs: torch.Tensor, target_id: int) -> dict[str, np.ndarray]:
    measures = trajectory_measures(states.float().cpu().numpy())
    measures["target_prob"] = probs[:, target_id].cpu().numpy().astype(np.float64)
    return measures


def prompt_trajectory(lm: "LoadedModel", prompt: str, target: str | int | None = None) -> dict[str, np.ndarray]:
    """All measures of ``MEASURES`` for one prompt (target: see ``logit_lens``)."""
    runner = Runner(lm)
    states = _states(runner, _ids(lm, prompt))
    probs = _lens_probs(runner, states)
    return _measures(states, probs, _resolve_target(lm, prompt, target, probs[-1]))


def _same_length_batches(encoded: list[torch.Tensor], size: int) -> list[list[int]]:
    """Indices of prompts grouped by token count (no padding needed), at most ``size`` per batch."""
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(ids.shape[-1], []).append(i)
    return [group[j:j + size] for group in by_length.values() for j in range(0, len(group), size)]


def _batch_states(runner: Runner, ids: torch.Tensor) -> torch.Tensor:
    """[batch, L + 1, d] final-token states of same-length prompts ids [batch, T]."""
    with torch.inference_mode():
        return torch.stack([h[:, -1] for h in runner.hidden_states(ids)], dim=1)


def prompt_set_trajectories(lm: "LoadedModel", prompts: pd.DataFrame, progress: Progress | None = None,
                            batch_size: int = 8) -> pd.DataFrame:
    """Long table of every measure for every prompt of a prompt set.

    ``prompts`` needs columns ``category`` and ``prompt`` (``expected`` is the target when present;
    otherwise the model's top prediction). Prompts of equal token count run together in batches.
    Returns columns ``category, prompt_index, prompt, measure, layer, value``.
    """
    if prompts.empty:
        raise ValueError("The prompt set has no prompts.")
    rows = list(prompts.itertuples(index=False))
    encoded = [_encode_row(lm, i, row.prompt) for i, row in enumerate(rows)]
    runner, frames, done = Runner(lm), {}, 0
    for batch in _same_length_batches(encoded, batch_size):
        states = _batch_states(runner, torch.cat([encoded[i] for i in batch]))
        for i, h in zip(batch, states):
            probs = _lens_probs(runner, h)
            target = _target_or_none(getattr(rows[i], "expected", None))
            target_id = _resolve_target(lm, rows[i].prompt, target, probs[-1])
            frames[i] = _long(rows[i], i, _measures(h, probs, target_id), lm.n_layers)
        done += len(batch)
        if progress is not None:
            progress(done, len(rows))
    return pd.concat([frames[i] for i in range(len(rows))], ignore_index=True)


def _target_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _encode_row(lm: "LoadedModel", index: int, prompt: str) -> torch.Tensor:
    try:
        return _ids(lm, prompt)
    except ValueError as exc:
        raise ValueError(f"Prompt {index + 1}: {exc}") from None


def _long(row, index: int, measures: dict[str, np.ndarray], n_layers: int) -> pd.DataFrame:
    return pd.concat([
        pd.DataFrame({"category": row.category, "prompt_index": index, "prompt": row.prompt,
                      "measure": name, "layer": measure_layers(name, n_layers), "value": values})
        for name, values in measures.items()
    ], ignore_index=True)


def group_categories(trajectories: pd.DataFrame, combine_regurgitation: bool = True
                     ) -> pd.DataFrame:
    """A copy with a ``group`` column: the category, or "regurgitation" for both kinds when
    ``combine_regurgitation``."""
    out = trajectories.copy()
    out["group"] = [group_of(c, combine_regurgitation) for c in out["category"]]
    return out


def summarise(trajectories: pd.DataFrame, combine_regurgitation: bool = True) -> pd.DataFrame:
    """Mean and spread per group, measure and layer (``analysis.describe``: sample std, NaN for a
    single prompt; NaN values left out). Columns ``group, measure, layer, mean, std, sem, n``."""
    grouped = group_categories(trajectories, combine_regurgitation)
    rows = []
    for (group, measure, layer), values in grouped.groupby(["group", "measure", "layer"], sort=False)["value"]:
        stats = describe(values.to_numpy())
        rows.append({"group": group, "measure": measure, "layer": layer, "mean": float(stats["mean"]),
                     "std": float(stats["std"]), "sem": float(stats["sem"]), "n": int(stats["n"])})
    return pd.DataFrame(rows, columns=["group", "measure", "layer", "mean", "std", "sem", "n"])
