"""Speed of the tracing engine against the one-forward-per-cell loop, in the same run.

Prints absolute seconds and ratios (never asserts): `make bench` or
`.venv/bin/python scripts/benchmark.py [--samples 10] [--kinds hidden mlp attn] [--quick]`.
With --random-gpt2-xl (for a GPU box) it times GPT-2-XL-sized models with random weights.
Then (unless --no-preview) it times the first-order preview (tracing.preview) on the Eiffel prompt,
measures its accuracy against the exact engine over the whole shipped prompt set (--limit N prompts:
fewer), and how soon a running trace notices a cancel. --preview runs only those parts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tracing  # noqa: E402
from tracing.causal import _clean_cache, _corrupted_cache, causal_trace  # noqa: E402
from tracing.reference import naive_trace  # noqa: E402

EIFFEL = "The Eiffel Tower is located in the city of"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def clear_caches() -> None:
    _clean_cache.items.clear()
    _corrupted_cache.items.clear()


def bench_kind(lm, kind: str, samples: int, noised: list[int], naive_cells) -> dict:
    """Fast trace (cold and warm caches) vs the naive loop on the same settings."""
    clear_caches()
    fast, fast_s = timed(lambda: causal_trace(lm, EIFFEL, noised, kind=kind, noise=0.4, samples=samples))
    _, new_noise_s = timed(lambda: causal_trace(lm, EIFFEL, noised, kind=kind, noise=0.5, samples=samples))
    (ref, low, high, _), naive_s = timed(
        lambda: naive_trace(lm, EIFFEL, noised, kind=kind, noise=0.4, samples=samples, window=10, cells=naive_cells)
    )
    done = ~np.isnan(ref)
    n_cells = fast.scores.size
    naive_full_s = naive_s * n_cells / done.sum()
    return {
        "kind": kind,
        "fast_s": fast_s,
        "fast_new_noise_s": new_noise_s,
        "naive_s": naive_full_s,
        "naive_measured_cells": int(done.sum()),
        "speedup": naive_full_s / fast_s,
        "max_abs_diff": float(np.abs(fast.scores[done] - ref[done]).max()),
    }


def bench_preview(lm, kinds: list[str], limit: int | None, samples: int = 3, noise: float = 0.4) -> None:
    """Preview seconds (cold: a new noise level, clean run cached; warm) and accuracy against
    the exact trace over the shipped prompt set."""
    from tracing.causal import clean_run
    from tracing.model.tokens import tokenize
    from tracing.preview import preview_trace
    from tracing.prompts import expected_token_id, resolve_noised

    noised = tracing.subject_positions(lm, EIFFEL, "Eiffel Tower")
    clean_run(lm, tokenize(lm, EIFFEL))
    print(f"preview, Eiffel prompt, noised {noised}, {samples} samples")
    print(f"{'kind':8} {'cold s':>8} {'warm s':>8} {'exact s':>8}")
    for i, kind in enumerate(kinds):
        level = noise + 0.01 * (i + 1)  # a noise level not traced before
        _, cold = timed(lambda: preview_trace(lm, EIFFEL, noised, kind=kind, noise=level, samples=samples))
        _, warm = timed(lambda: preview_trace(lm, EIFFEL, noised, kind=kind, noise=level, samples=samples))
        _, exact = timed(lambda: causal_trace(lm, EIFFEL, noised, kind=kind, noise=level, samples=samples))
        print(f"{kind:8} {cold:8.3f} {warm:8.3f} {exact:8.2f}")

    rows = tracing.load_prompt_set()
    if limit is not None and limit < len(rows):  # spread over the set (it is sorted by category)
        rows = rows.iloc[np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    print(f"accuracy over {len(rows)} prompts of the shipped set (noise {noise}, {samples} samples, "
          f"target = expected completion)")
    print(f"{'kind':8} {'n':>3} {'median r':>9} {'worst r':>8} {'MAE':>8} {'top cell':>9} "
          f"{'MAE noised<L/3':>15} {'MAE rest':>9}")
    for kind in kinds:
        rs, maes, tops, early, rest = [], [], [], [], []
        for _, row in rows.iterrows():
            try:
                positions = resolve_noised(lm, row["prompt"], row["subject"], row.get("noised"))
                target = expected_token_id(lm, row["prompt"], row["expected"])
            except ValueError:
                continue
            kwargs = dict(kind=kind, noise=noise, samples=samples, target=target)
            exact = causal_trace(lm, row["prompt"], positions, **kwargs).scores
            approx = preview_trace(lm, row["prompt"], positions, **kwargs).scores
            rs.append(np.corrcoef(exact.ravel(), approx.ravel())[0, 1])
            maes.append(np.abs(exact - approx).mean())
            te, le = np.unravel_index(exact.argmax(), exact.shape)
            tp, lp = np.unravel_index(approx.argmax(), approx.shape)
            tops.append(te == tp and abs(le - lp) <= 1)
            mask = np.zeros(exact.shape, bool)
            mask[positions, : exact.shape[1] // 3] = True
            early.append(np.abs(exact - approx)[mask].mean())
            rest.append(np.abs(exact - approx)[~mask].mean())
        print(f"{kind:8} {len(rs):3d} {np.median(rs):9.3f} {np.min(rs):8.3f} {np.mean(maes):8.4f} "
              f"{np.mean(tops):9.0%} {np.mean(early):15.4f} {np.mean(rest):9.4f}")
    print("r: Pearson over all cells of p(target), per prompt; top cell: the preview's largest cell is "
          "the exact one's (same token, within one layer)")


def bench_cancel(lm, kinds: list[str], samples: int = 3, seconds: float = 0.4) -> None:
    """How soon a trace notices a cancel: the longest and the 95th-percentile gap between two
    progress calls (the page checks for a new setting at each), with the page's work cap per
    chunk (``chunk_work_for(lm, seconds)``) and without one, and what the cap costs in total time."""
    from tracing.causal import chunk_work_for

    noised = tracing.subject_positions(lm, EIFFEL, "Eiffel Tower")
    causal_trace(lm, EIFFEL, noised, kind="hidden", noise=0.41, samples=samples)  # measure the speed once
    print(f"cancel latency, Eiffel prompt, {samples} samples: gaps between progress calls "
          f"(cap = chunk_work_for(lm, {seconds}) = {chunk_work_for(lm, seconds)} block-positions)")
    print(f"{'kind':8} {'cap':>4} {'max gap s':>10} {'p95 gap s':>10} {'total s':>8}")
    for i, kind in enumerate(kinds):
        totals = {}
        for capped in (False, True):
            stamps = [time.perf_counter()]

            def progress(done: int, total: int) -> bool:
                stamps.append(time.perf_counter())
                return True

            level = 0.45 + 0.01 * i + (0.005 if capped else 0)  # a new noise level each time
            cap = chunk_work_for(lm, seconds) if capped else None
            _, total = timed(lambda: causal_trace(lm, EIFFEL, noised, kind=kind, noise=level, samples=samples,
                                                  progress=progress, max_chunk_work=cap))
            gaps = np.diff(stamps)
            totals[capped] = total
            print(f"{kind:8} {'yes' if capped else 'no':>4} {gaps.max():10.3f} {np.percentile(gaps, 95):10.3f} "
                  f"{total:8.2f}")
        print(f"{'':8} the cap costs {totals[True] / totals[False]:.2f}x the uncapped time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["hidden", "mlp", "attn"])
    parser.add_argument("--quick", action="store_true", help="time the naive loop on a third of the cells and extrapolate")
    parser.add_argument("--random-gpt2-xl", action="store_true", help="GPT-2-XL-sized random model (GPU box)")
    parser.add_argument("--preview", action="store_true",
                        help="only the first-order preview's speed and accuracy, and the cancel latency")
    parser.add_argument("--no-preview", action="store_true", help="only the engine against the naive loop")
    parser.add_argument("--limit", type=int, default=None, help="--preview: only the first N prompts of the set")
    args = parser.parse_args()
    if args.random_gpt2_xl:
        from transformers import AutoConfig

        lm = tracing.load_model(tracing.DEFAULT_MODEL)
        config = AutoConfig.for_model("gpt2", n_layer=48, n_head=25, n_embd=1600, vocab_size=len(lm.tokenizer))
        lm = tracing.model.loading.model_from_config(config, lm.tokenizer, name="random gpt2-xl")
        lm.model.to(tracing.model.loading.pick_device())
        lm.device = tracing.model.loading.pick_device()
    else:
        lm = tracing.load_model(tracing.DEFAULT_MODEL)
    if args.preview:
        bench_preview(lm, args.kinds, args.limit)
        bench_cancel(lm, args.kinds)
        return
    noised = [1, 2, 3]
    n_tokens = len(lm.tokenizer(EIFFEL)["input_ids"])
    cells = None
    if args.quick:
        cells = [(t, l) for t in range(n_tokens) for l in range(lm.n_layers) if (t + l) % 3 == 0]
    print(f"model {lm.name}: {lm.n_layers} layers, {n_tokens} tokens, {args.samples} samples, "
          f"{torch.get_num_threads()} threads, device {lm.device}")
    print(f"{'kind':8} {'fast s':>8} {'new-noise s':>12} {'naive s':>9} {'speedup':>8} {'max |diff|':>11}")
    for kind in args.kinds:
        r = bench_kind(lm, kind, args.samples, noised, cells)
        print(f"{r['kind']:8} {r['fast_s']:8.1f} {r['fast_new_noise_s']:12.1f} {r['naive_s']:9.1f} "
              f"{r['speedup']:7.1f}x {r['max_abs_diff']:11.2e}")
    print("naive = one whole-model forward per cell with hooks"
          + (" (timed on a third of the cells, extrapolated)" if args.quick else ""))
    if not args.no_preview and not args.random_gpt2_xl:
        print()
        bench_preview(lm, args.kinds, args.limit)
        print()
        bench_cancel(lm, args.kinds)


if __name__ == "__main__":
    main()
