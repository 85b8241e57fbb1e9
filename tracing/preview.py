"""A fast first-order preview of a causal trace: attribution patching (Nanda 2023; Kramár et al.
2024, "AtP*").

The exact engine (:func:`tracing.causal.causal_trace`) scores every cell by a forward pass with
one clean state restored: cell (t, l) = mean_s f_s(h_s with the cell's state at token t set to
its clean value), where f_s is a metric of sample s's last-position logits and h_s its corrupted
run. The preview replaces each of those forwards by its first-order Taylor expansion around the
corrupted run:

    cell(t, l) ~= low + mean_s  grad f_s(h_s)[t] . (clean[t] - h_s[t])

for the hidden kind (the state the engine restores for the column and the layer convention), and
the same summed over the cell's window of layers with the MLP / attention outputs for those
kinds. All gradients come from one corrupted forward with autograd and one backward per
logit-space direction (prob and logprob share one: d log p_s = d p_s / p_s per sample; the KL
divergence and the logit difference take one each), so a preview costs about as much as three
or four forwards instead of one per cell.

Contract: the same settings, noise, target, ``low`` and ``high`` as ``causal_trace`` (the clean
run is the engine's cached one; the corrupted run is recomputed with autograd from the same
noise); cells before the first corrupted
token, and hidden-state cells whose clean and corrupted states are equal, are exactly ``low``;
every other cell is an estimate whose error falls like noise**2 as the noise shrinks (for
mlp / attn only with window 1: wider windows sum single-module estimates, see docs/PREVIEW.md). The
result is a :class:`~tracing.causal.Trace` with ``approximate=True``.

No preview for severed traces (``sever="mlp"|"attn"``): ValueError. Its first-order estimate
needs, for each token row t, the gradient with the MLP (attention) outputs at t held fixed: a
different graph per row, so one corrupted forward and backward per token (about 3 n L S
block-positions against the exact trace's n^2 L^2 S / 4: only ~L / 12 times cheaper, 2.5x on the
embedded model), not the three or four passes that make the preview worth showing first.

Gradients are taken with respect to activations only (``torch.autograd.grad`` with the
activations as inputs), under ``torch.enable_grad()`` in the calling thread: no parameter gets a
``.grad`` and no ``requires_grad`` flag changes, so the shared model keeps serving other threads.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .causal import Progress, Trace, TraceCancelled, TraceInputs, _module_map, _rows, _Scorer, corrupted_input
from .model.hooks import edit_outputs
from .model.runner import Runner
from .settings import UNSET, TraceSettings

if TYPE_CHECKING:
    from .model import LoadedModel


def preview_trace(
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
) -> Trace:
    """A first-order estimate of ``causal_trace(...)`` with the same arguments (see the module
    docstring). ``progress(done, total)`` is called before and after (returning False raises
    :class:`TraceCancelled`). ValueError for a severed trace (no preview for those)."""
    started = time.perf_counter()
    s = TraceSettings.merged(settings, kind=kind, noise=noise, samples=samples, seed=seed,
                             target=target, window=window, corruption=corruption,
                             noise_mode=noise_mode, replacement=replacement, contrast=contrast,
                             convention=convention, sever=sever)
    if s.sever is not None:
        raise ValueError("No preview for severed traces: compute the exact trace (sever='mlp'/'attn').")
    inputs = TraceInputs.make(lm, prompt, noised, s)
    if progress is not None and progress(0, 1) is False:
        raise TraceCancelled()
    # the corrupted run itself is made here with autograd (the engine's cached one cannot be
    # differentiated); its states and logits equal the engine's on the CPU
    start, first_changed, sigma, noise_std = corrupted_input(
        lm, inputs.ids, inputs.noised, s.corruption, s.noise, s.noise_mode, s.effective_samples, s.seed,
        inputs.replacement_ids)
    run = _corrupted_gradients(Runner(lm), start, s.kind, inputs.scorer)
    low = inputs.low(run.logits)
    cells = _first_order_cells(lm.n_layers, inputs.clean, run, first_changed, s, low)
    if progress is not None and progress(1, 1) is False:
        raise TraceCancelled()
    return inputs.trace(lm, cells, low, run.logits, sigma, noise_std, started, approximate=True)


@dataclass
class _GradientRun:
    """The corrupted run with autograd: the restorable activations [A, S, n, d] (hidden: the
    L + 1 states, block inputs then the last block's output; mlp / attn: the L module outputs),
    each objective's gradients with respect to them, and the last-position logits [S, V]."""

    activations: torch.Tensor
    grads: dict[str, torch.Tensor]
    logits: torch.Tensor
    target_probs: torch.Tensor  # [S] p(target) per sample


def _objectives(logits: torch.Tensor, scorer: _Scorer) -> dict[str, torch.Tensor]:
    """Scalars whose gradients the preview needs, each summed over samples (samples are
    independent rows, so the gradient of a sum is every sample's own gradient). prob's gradient
    also gives logprob's: d log p_s = d p_s / p_s."""
    logp = torch.log_softmax(logits.float(), -1)
    clean_p, clean_logp = scorer.clean_p.clone(), scorer.clean_logp.clone()  # not inference tensors
    out = {
        "prob": logp[:, scorer.target].exp().sum(),
        "kl": (clean_p * (clean_logp - logp)).sum(),
    }
    if scorer.contrast is not None:
        out["logit_diff"] = (logits[:, scorer.target] - logits[:, scorer.contrast]).float().sum()
    return out


def _corrupted_gradients(runner: Runner, start: torch.Tensor, kind: str, scorer: _Scorer) -> _GradientRun:
    """One corrupted forward with autograd from the block-0 input ``start``, then one backward
    per objective, differentiating with respect to activations only."""
    positions = torch.arange(start.shape[1], device=start.device)
    modules = _module_map(runner, kind) if kind != "hidden" else {}
    outputs: dict[int, torch.Tensor] = {}
    states: list[torch.Tensor] = []
    # a graph in this thread only, also when the caller runs under inference_mode or no_grad
    with torch.inference_mode(False), torch.enable_grad():
        hidden = start.clone().requires_grad_(True)
        with edit_outputs(modules, lambda layer, output: outputs.__setitem__(layer, output)):
            context = runner.context(positions)
            for layer in range(runner.n_layers):
                states.append(hidden)
                hidden = runner.run_block(layer, hidden, context)
            states.append(hidden)
        logits = runner.logits(hidden[:, -1])
        objectives = _objectives(logits, scorer)
        inputs = states if kind == "hidden" else [outputs[layer] for layer in range(runner.n_layers)]
        grads: dict[str, torch.Tensor] = {}
        for i, (name, objective) in enumerate(objectives.items()):
            got = torch.autograd.grad(objective, inputs, retain_graph=i < len(objectives) - 1)
            grads[name] = torch.stack(got)
    logits = logits.detach()
    probs = torch.softmax(logits.float(), -1)[:, scorer.target]
    return _GradientRun(torch.stack([x.detach() for x in inputs]), grads, logits, probs)


def _first_order_cells(n_layers: int, clean, run: _GradientRun, first: int, s: TraceSettings,
                       low: dict[str, float]) -> dict[str, np.ndarray]:
    """Every metric's cells: low + mean over samples of the directional derivative along
    (clean - corrupted), summed over the cell's restored activations."""
    n_tokens = len(clean.states[0])
    cells = {k: np.full((n_tokens, n_layers), v, dtype=np.float64) for k, v in low.items()}
    if first >= n_tokens:
        return cells
    with torch.no_grad():
        if s.kind == "hidden":
            target = torch.stack(list(clean.states))[:, None]  # [L + 1, 1, n, d]
        else:
            target = clean.modules[s.kind][:, None]  # [L, 1, n, d]
        delta = (target.double() - run.activations.double())[:, :, first:]  # [A, S, n', d]
        dots = {name: (g[:, :, first:].double() * delta).sum(-1) for name, g in run.grads.items()}  # [A, S, n']
        same = (delta == 0).all(-1).all(1)  # [A, n']: clean and corrupted activations equal
        per_metric = {"prob": dots["prob"], "kl": dots["kl"]}
        per_metric["logprob"] = dots["prob"] / run.target_probs.double()[None, :, None]
        if "logit_diff" in dots:
            per_metric["logit_diff"] = dots["logit_diff"]
        for row in _rows(s.kind, s.convention, n_layers, s.window):
            index = [row.restore_state] if s.kind == "hidden" else list(row.patch_layers)
            unchanged = same[index].all(0)
            for name, dot in per_metric.items():
                change = dot[index].sum(0).mean(0)  # summed over the window, mean over samples
                change = torch.where(unchanged, torch.zeros_like(change), change)
                cells[name][first:, row.column] = low[name] + change.cpu().numpy()
    return cells


class Refinement:
    """A preview being replaced by exact rows as they arrive (``causal_trace(on_rows=...)``).

    ``add(block)`` puts a ``RowBlock``'s exact cells in; ``trace`` is the current picture (a copy
    of the preview with every exact cell so far, ``approximate`` until every cell is exact) and
    ``exact`` the [T, L] mask of exact cells.
    """

    def __init__(self, preview: Trace) -> None:
        self.preview = preview
        self.metrics = {k: np.array(v, dtype=np.float64, copy=True) for k, v in preview.metrics.items()}
        self.exact = np.zeros(preview.scores.shape, dtype=bool)

    def add(self, block) -> None:
        """Exact cells of one ``RowBlock`` replace the preview's."""
        layers = list(block.layers)
        for name, values in block.values.items():
            if name in self.metrics:
                self.metrics[name][block.token, layers] = values
        self.exact[block.token, layers] = True

    @property
    def done(self) -> float:
        """The fraction of cells that are exact."""
        return float(self.exact.mean())

    @property
    def trace(self) -> Trace:
        """The picture so far, as a Trace (``approximate`` until every cell is exact)."""
        return dataclasses.replace(self.preview, metrics={k: v.copy() for k, v in self.metrics.items()},
                                   approximate=not bool(self.exact.all()))
