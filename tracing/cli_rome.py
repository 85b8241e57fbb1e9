"""``python -m tracing rome``: ROME's average indirect effects by token position over a fact set.

Example (ROME Fig. 2 on GPT-2 XL, given internet and a GPU)::

    python -m tracing rome --prompts prompts/facts.csv --model gpt2-xl --kind hidden --out aie-hidden.csv

Traces go through the result store: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import add_backend_arguments, backend_options
from .settings import DEFAULTS, KINDS

KIND_CHOICES = KINDS + ("all",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``rome`` command to ``python -m tracing``'s subparsers."""
    p = subparsers.add_parser("rome", help="ROME's average indirect effects by token position (Fig. 2)")
    p.add_argument("--prompts", default=None, help="prompt-set CSV (default: prompts/facts.csv)")
    p.add_argument("--kind", default="hidden", choices=KIND_CHOICES, help="restored kind ('all': each in turn)")
    p.add_argument("--model", default=None, help="model name (default: the embedded model)")
    p.add_argument("--noise", type=float, default=None,
                   help="noise std (default: ROME's 3 x std of the subject-token embeddings)")
    p.add_argument("--samples", type=int, default=DEFAULTS.samples)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--window", type=int, default=DEFAULTS.window, help="mlp/attn window")
    p.add_argument("--sever", default=None, choices=["mlp", "attn"], help="hidden kind: sever later MLP/attention")
    p.add_argument("--all-prompts", action="store_true", help="also average prompts the model gets wrong")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--store", default=None, help="result-store folder (default: cache/results)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default=None, help="write the AIE table (with a kind column) to this CSV")
    p.add_argument("--quiet", action="store_true")
    add_backend_arguments(p)
    p.set_defaults(handler=main)
    return p


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 2 on bad input, 130 when interrupted (finished traces stay)."""
    import pandas as pd

    from .model.loading import DEFAULT_MODEL, load_model
    from .prompts import PROMPTS_DIR, load_prompt_set
    from .rome import average_indirect_effects, correct_mask, peaks
    from .store import ResultStore

    try:
        backend = backend_options(args)
        frame = load_prompt_set(args.prompts or PROMPTS_DIR / "facts.csv")
        frame = frame.head(args.limit) if args.limit else frame
        lm = load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _say(args, f"model {lm.name} ({lm.n_layers} layers) on {lm.device}; {len(frame)} prompts")
    store, tables = ResultStore(args.store), []
    try:
        correct = None if args.all_prompts else correct_mask(lm, frame)  # once for every kind
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for kind in KINDS if args.kind == "all" else (args.kind,):
        def progress(done: int, total: int, result, kind: str = kind) -> None:
            extra = f" {result.seconds:.1f} s" if result.status == "computed" else ""
            _say(args, f"[{kind} {done}/{total}] {result.status:9} {result.prompt!r}{extra}")

        try:
            table = average_indirect_effects(
                lm, frame, kind=kind, noise=args.noise, samples=args.samples, seed=args.seed, window=args.window,
                sever=args.sever, correct_only=not args.all_prompts, progress=progress, store=store,
                correct=correct, batch_options=backend)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: finished traces are stored; run again to resume", file=sys.stderr)
            return 130
        a = table.attrs
        print(f"{kind}: {a['used']} prompts averaged ({len(a['skipped'])} left out), noise {a['noise']:g} "
              f"({a['noise_rule']}), p clean {a['high']:.3f}, corrupted {a['low']:.3f}, "
              f"total effect {a['total_effect']:.3f}; {a['elapsed']:.1f} s")
        best = peaks(table)
        print(best.assign(layer=best["layer"].astype(int)).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        tables.append(table.assign(kind=kind, noise=a["noise"], model=lm.name))
    if args.out:
        out = pd.concat(tables, ignore_index=True)
        out = out[["model", "kind", "noise"] + [c for c in out.columns if c not in ("model", "kind", "noise")]]
        out.to_csv(args.out, index=False)
        _say(args, f"wrote {args.out}")
    return 0
