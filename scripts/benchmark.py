"""Speed of the tracing engine against the one-forward-per-cell loop, in the same run.

Prints absolute seconds and ratios (never asserts): `make bench` or
`.venv/bin/python scripts/benchmark.py [--samples 10] [--kinds hidden mlp attn] [--quick]`.
With --random-gpt2-xl (for a GPU box) it times GPT-2-XL-sized models with random weights.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["hidden", "mlp", "attn"])
    parser.add_argument("--quick", action="store_true", help="time the naive loop on a third of the cells and extrapolate")
    parser.add_argument("--random-gpt2-xl", action="store_true", help="GPT-2-XL-sized random model (GPU box)")
    args = parser.parse_args()
    if args.random_gpt2_xl:
        from transformers import AutoConfig, AutoTokenizer

        lm = tracing.load_model(tracing.DEFAULT_MODEL)
        config = AutoConfig.for_model("gpt2", n_layer=48, n_head=25, n_embd=1600, vocab_size=len(lm.tokenizer))
        lm = tracing.models.model_from_config(config, lm.tokenizer, name="random gpt2-xl")
        lm.model.to(tracing.models.pick_device())
        lm.device = tracing.models.pick_device()
    else:
        lm = tracing.load_model(tracing.DEFAULT_MODEL)
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


if __name__ == "__main__":
    main()
