"""Command line: ``python -m tracing batch ...`` (headless batch tracing into the result store),
``python -m tracing rome ...`` (ROME's average indirect effects on a fact set; ``tracing.cli_rome``),
``python -m tracing heads ...`` (per-head restoration over a prompt set; ``tracing.cli_heads``)
and ``python -m tracing prompts FILE`` (check a prompt set).

Examples::

    python -m tracing batch --model gpt2-xl --prompts prompts/default.csv --noise 0.5 --samples 10
    python -m tracing batch --prompts my.csv --kind mlp --window 10 --table table.csv --averages avg.csv
    python -m tracing batch --prompts prompts/default.csv --backend ray --workers 2 --table table.parquet
    python -m tracing batch --model gpt2-xl --backend ray --address 10.0.0.1:6379 --workers 8 --gpus-per-worker 1
    python -m tracing prompts prompts/default.csv --model SmolLM2-135M-Instruct --write checked.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import cli_heads, cli_rome
from .cli_common import add_backend_arguments, backend_options
from .causal import ROW_CHOICES
from .settings import CONVENTIONS, CORRUPTIONS, DEFAULTS, KINDS, NOISE_MODES, TraceSettings


def _batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="trace every prompt of a set into the result store")
    p.add_argument("--model", default=None, help="model name (default: the embedded model)")
    p.add_argument("--prompts", default=None, help="prompt-set CSV (default: prompts/default.csv)")
    p.add_argument("--kind", default=DEFAULTS.kind, choices=KINDS)
    p.add_argument("--noise", type=float, default=DEFAULTS.noise, help="noise level (absolute std, or x sigma)")
    p.add_argument("--noise-mode", default=DEFAULTS.noise_mode, choices=NOISE_MODES)
    # token replacement needs a second prompt per row: not offered for prompt sets
    p.add_argument("--corruption", default=DEFAULTS.corruption, choices=[c for c in CORRUPTIONS if c != "replace"])
    p.add_argument("--samples", type=int, default=DEFAULTS.samples)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--window", type=int, default=DEFAULTS.window, help="mlp/attn window")
    p.add_argument("--convention", default=DEFAULTS.convention, choices=CONVENTIONS)
    p.add_argument("--rows", default="all", choices=ROW_CHOICES,
                   help="token rows to compute: every token, or only the noised and final tokens "
                        "(all the category averages use; much cheaper on long prompts)")
    p.add_argument("--target", default="expected", choices=["expected", "top1"],
                   help="trace p(expected first token) or p(clean top-1 token)")
    p.add_argument("--category", action="append", help="only these categories (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--store", default=None, help="result-store folder (default: cache/results)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--table", default=None, help="write the per-prompt table to this CSV (or .parquet)")
    p.add_argument("--averages", default=None, help="write the category averages to this CSV (or .parquet)")
    p.add_argument("--correct-only", action="store_true", help="averages over correct prompts only")
    p.add_argument("--combine", action="store_true", help="combine the regurgitation categories")
    p.add_argument("--quiet", action="store_true")
    add_backend_arguments(p)


def _prompts_parser(sub) -> None:
    p = sub.add_parser("prompts", help="check a prompt set (format, constraints, model top-1)")
    p.add_argument("file", nargs="?", default=None, help="prompt-set CSV (default: the shipped set)")
    p.add_argument("--model", default=None, help="also check tokens and top-1 with this model")
    p.add_argument("--write", default=None, help="write the set with an updated model_top1 column")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m tracing`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m tracing",
        description="Headless batch tracing into the result store (batch), ROME's average indirect "
                    "effects on a fact set (rome), per-head restoration (heads) and prompt-set "
                    "checks (prompts).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _batch_parser(sub)
    cli_rome.add_parser(sub)
    cli_heads.add_parser(sub)
    _prompts_parser(sub)
    return parser


def _load(name: str | None, device: str | None = None, dtype: str | None = None):
    from .model.loading import DEFAULT_MODEL, load_model

    lm = load_model(name or DEFAULT_MODEL, device=device, dtype=dtype)
    print(f"model {lm.name} ({lm.n_layers} layers) on {lm.device}, {lm.dtype}", file=sys.stderr)
    return lm


def _select(frame, categories: list[str] | None, limit: int | None):
    from .prompts import normalise_category

    if categories:
        keys = {normalise_category(c) or c for c in categories}
        frame = frame[frame["category"].isin(keys)]
    return frame.head(limit) if limit else frame


def run_batch_command(args: argparse.Namespace) -> int:
    """``batch``: trace the set, print progress and a summary, optionally write CSV or Parquet."""
    from .batch import category_averages, category_summary, plan_batch, prompt_table, run_batch, write_table
    from .prompts import load_prompt_set
    from .store import ResultStore

    backend = backend_options(args)
    frame = _select(load_prompt_set(args.prompts), args.category, args.limit)
    lm = _load(args.model, args.device, args.dtype)
    store = ResultStore(args.store)
    settings = TraceSettings(kind=args.kind, noise=args.noise, noise_mode=args.noise_mode,
                             samples=args.samples, seed=args.seed, window=args.window,
                             convention=args.convention, corruption=args.corruption)
    if not args.quiet:
        print(_estimate_text(lm, plan_batch(lm, frame, settings, store, args.target, args.rows)), file=sys.stderr)
    try:
        batch = run_batch(lm, frame, settings, store, target=args.target, rows=args.rows,
                          **_progress_options(args, len(frame), bool(backend)), **backend)
    except KeyboardInterrupt:
        print("interrupted: finished prompts are stored; run again to resume", file=sys.stderr)
        return 130
    print(f"{len(batch.results)} prompts in {batch.elapsed:.1f} s: {batch.counts}; store {store.root}")
    if batch.backend == "ray":
        print(_workers_text(batch))
    options = dict(correct_only=args.correct_only, combine_regurgitation=args.combine)
    print(category_summary(batch.results, **options).to_string(index=False))
    if args.table:
        write_table(prompt_table(batch.results), args.table)
    if args.averages:
        write_table(category_averages(batch.results, **options), args.averages)
        print(_comparison_text(prompt_table(batch.results), options))
    return 0


def _comparison_text(table, options: dict) -> str:
    """The seed's claim with statistics: per pair of categories, the difference in mean transition
    layer with its bootstrap 95% CI and permutation p-value (``stats.compare_transitions``)."""
    from .batch import MIN_EFFECT
    from .stats import compare_transitions

    try:
        pairs = compare_transitions(table, **options, min_effect=MIN_EFFECT, seed=0, resamples=10_000)
    except ValueError as exc:
        return f"no comparison of categories: {exc}"
    if pairs.empty:
        return "no comparison of categories (fewer than two categories with transitions)"
    columns = ["pair", "difference", "ci_low", "ci_high", "p_value", "n_a", "n_b"]
    return ("difference in mean transition layer (b - a), bootstrap 95% CI, permutation p (seed 0):\n"
            + pairs[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _progress_options(args: argparse.Namespace, total: int, ray: bool) -> dict:
    """run_batch's ``progress`` (one line per prompt; with Ray also done / failed / retried,
    per-worker throughput and ETA) and ``notify`` (worker deaths and retries)."""
    from .batch import Tally

    tally = Tally(total)

    def progress(done: int, total: int, result) -> None:
        tally.add(result)
        if not args.quiet:
            extra = f" {result.seconds:.1f} s" if result.status == "computed" else ""
            note = f" ({result.message})" if result.message else ""
            where = f" on {result.worker}" if ray and result.worker else ""
            print(f"[{done}/{total}] {result.status:9} {result.prompt!r}{extra}{where}{note}", file=sys.stderr)
            if ray:
                print(f"  {tally.line()}", file=sys.stderr)

    def notify(text: str) -> None:
        print(f"ray: {text}", file=sys.stderr)

    return {"progress": progress, **({"notify": notify} if ray else {})}


def _workers_text(batch) -> str:
    """One line per Ray worker: where it ran, what it traced, its throughput."""
    lines = [f"ray: {len(batch.workers)} workers, {batch.retried} prompts retried"
             + (f", local instance started in {batch.start_seconds:.1f} s" if batch.start_seconds else "")]
    for w in batch.workers:
        lines.append(f"  {w.label} pid {w.pid} on {w.host} ({w.device}): {w.prompts} prompts, "
                     f"{w.throughput():.2f} prompts/s, model loaded in {w.load_seconds:.1f} s"
                     + ("" if w.prompts or w.pid else " (never started)"))
    return "\n".join(lines)


def _estimate_text(lm, plan) -> str:
    """One line: what the pending prompts of a batch will cost (``causal.estimate_trace``)."""
    from .causal import estimate_trace

    pending = [r for r in plan if r.status == "pending"]
    cells = seconds = 0.0
    for result in pending:
        settings = dict(result.settings)
        estimate = estimate_trace(lm, result.prompt, settings.pop("noised"), rows=settings.pop("rows", None),
                                  **settings)
        cells, seconds = cells + estimate.cells, seconds + estimate.seconds
    stored = sum(r.status == "stored" for r in plan)
    return (f"estimate: {len(pending)} prompts to trace ({stored} already stored), {int(cells)} restorations, "
            f"about {seconds:.0f} s on {lm.device}")


def run_prompts_command(args: argparse.Namespace) -> int:
    """``prompts``: load a set, report problems (and top-1 with a model), optionally rewrite it."""
    from .prompts import load_prompt_set, model_top1, save_prompt_set

    lm = _load(args.model) if args.model else None
    frame = load_prompt_set(args.file, lm=lm)
    counts = frame["category"].value_counts().to_dict()
    print(f"{len(frame)} prompts: {counts}")
    for row in frame.itertuples():
        if row.problems:
            print(f"  {row.category}: {row.prompt!r}: {row.problems}")
    if lm is not None:
        top = model_top1(lm, frame)
        frame["model_top1"] = top["correct"].astype("boolean")
        print(f"{int(top['correct'].sum())}/{len(frame)} right on {lm.name}")
        for (prompt, expected), (_, t) in zip(frame[["prompt", "expected"]].values, top.iterrows()):
            if not t["correct"]:
                print(f"  wrong: {prompt!r} -> {t['top1']!r} (expected {expected!r}, p={t['expected_prob']:.3f})")
    if args.write:
        print(f"wrote {save_prompt_set(frame, Path(args.write))}")
    return 1 if (frame["problems"] != "").any() else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tracing``."""
    args = build_parser().parse_args(argv)
    if args.command in ("rome", "heads"):  # they report their own errors
        return (cli_rome if args.command == "rome" else cli_heads).main(args)
    started = time.perf_counter()
    try:
        code = run_batch_command(args) if args.command == "batch" else run_prompts_command(args)
    except ValueError as exc:  # PromptSetError, ModelLoadError-like bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # ModelLoadError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "batch":
        print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
