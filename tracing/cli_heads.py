"""``python -m tracing heads``: per-head restoration (``tracing.head_trace``) over a prompt set,
through the result store (resumable), written as the per-category grid table.

Example::

    python -m tracing heads --prompts prompts/default.csv --where final --samples 10 --out heads.csv
"""

from __future__ import annotations

import argparse
import sys

from .settings import DEFAULTS, SAMPLES_RANGE

METRICS = ("normalised", "prob", "logprob", "kl")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``heads`` command to ``python -m tracing``'s subparsers."""
    from .heads import TOKENS

    p = subparsers.add_parser("heads", help="restore one attention head at a time over a prompt set")
    p.add_argument("--prompts", default=None, help="prompt-set CSV (default: prompts/default.csv)")
    p.add_argument("--model", default=None, help="model name (default: the embedded model)")
    p.add_argument("--where", default="final", choices=TOKENS,
                   help="restore the heads at the final token or at the last noised token")
    p.add_argument("--noise", type=float, default=DEFAULTS.noise)
    p.add_argument("--samples", type=int, default=DEFAULTS.samples)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--metric", default="normalised", choices=METRICS, help="the grid's value")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--store", default=None, help="result-store folder (default: cache/results)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--out", default=None, help="write the per-category (layer, head) table to this CSV")
    p.add_argument("--quiet", action="store_true")
    return p


def main(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 2 on bad input, 130 when interrupted (finished traces stay)."""
    from .heads import head_summary, plan_heads, run_heads
    from .model.loading import DEFAULT_MODEL, load_model
    from .prompts import load_prompt_set
    from .settings import TraceSettings
    from .store import ResultStore

    try:
        if not SAMPLES_RANGE[0] <= args.samples <= SAMPLES_RANGE[1]:
            raise ValueError(f"--samples must be from {SAMPLES_RANGE[0]} to {SAMPLES_RANGE[1]}")
        frame = load_prompt_set(args.prompts)
        frame = frame.head(args.limit) if args.limit else frame
        lm = load_model(args.model or DEFAULT_MODEL, device=args.device)
        settings = TraceSettings(noise=args.noise, samples=args.samples, seed=args.seed)
        store = ResultStore(args.store)
        plan = plan_heads(lm, frame, settings, store, where=args.where)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def progress(done: int, total: int, result) -> None:
        if not args.quiet:
            note = f" ({result.message})" if getattr(result, "message", "") else ""
            print(f"[{done}/{total}] {result.status:9} {result.prompt!r}{note}", file=sys.stderr)

    try:
        run_heads(lm, plan, store, progress=progress)
    except KeyboardInterrupt:
        print("interrupted: finished head traces are stored; run again to resume", file=sys.stderr)
        return 130
    summary = head_summary(plan, args.metric)
    if summary.empty:
        print("error: no prompt could be traced", file=sys.stderr)
        return 2
    top = summary.sort_values("mean", ascending=False).groupby("category", sort=False).head(5)
    print(f"top heads by mean {args.metric} (restored at the {args.where} token):")
    print(top.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        summary.to_csv(args.out, index=False)
        if not args.quiet:
            print(f"wrote {args.out}", file=sys.stderr)
    return 0
