"""Command-line pieces the ``batch`` and ``rome`` commands share: the Ray backend's arguments."""

from __future__ import annotations

import argparse


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """``--backend``, ``--workers``, ``--address``, ``--gpus-per-worker`` (batch and rome)."""
    from .batch import BACKENDS

    g = p.add_argument_group("Ray backend (docs/CLUSTER.md)")
    g.add_argument("--backend", default="local", choices=BACKENDS,
                   help="local: one prompt after another here; ray: a pool of Ray workers")
    g.add_argument("--workers", type=int, default=None, help="Ray workers (default 1)")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (ray start --head); default: a private local instance on loopback")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker (default: 1 when the cluster has GPUs and the model is on CUDA)")


def backend_options(args: argparse.Namespace) -> dict:
    """run_batch keywords from the backend arguments (ValueError for Ray flags without --backend ray)."""
    if args.backend == "local":
        if args.workers not in (None, 1) or args.address or args.gpus_per_worker is not None:
            raise ValueError("--workers, --address and --gpus-per-worker need --backend ray")
        return {}
    return {"backend": "ray", "workers": args.workers or 1, "address": args.address,
            "gpus_per_worker": args.gpus_per_worker}
