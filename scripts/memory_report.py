"""Peak resident memory of the app after tracing the shipped prompt set on the embedded model.

Two ways to measure (both trace into a temporary result store, so every trace is computed):

``--mode server`` (default): start the app (``streamlit run app.py``) as a subprocess, drive it
with headless Chromium (Playwright): open the trace page, trace the whole shipped prompt set on
the categories page, then open the attention and hidden-states pages (both run the shipped set).
Reports the server process's peak resident set size (``VmHWM`` in ``/proc/<pid>/status``) after
each step. Chromium runs in its own processes and is not counted.

``--mode library``: the same work in this process through the library (``tracing.batch.run_batch``,
``prompt_set_attention``, ``prompt_set_trajectories``), reporting this process's ``VmHWM`` and
``getrusage`` peak after each step.

    .venv/bin/python scripts/memory_report.py                 # server, samples=2
    .venv/bin/python scripts/memory_report.py --mode library --samples 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes (Linux /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def mib(n: int | float) -> str:
    return f"{n / 2**20:,.0f} MiB"


class Report:
    def __init__(self, read) -> None:
        self.read, self.rows, self.started = read, [], time.perf_counter()

    def step(self, what: str) -> None:
        status = self.read()
        row = {"step": what, "seconds": round(time.perf_counter() - self.started, 1),
               "rss_bytes": status["VmRSS"], "peak_rss_bytes": status["VmHWM"]}
        self.rows.append(row)
        print(f"{row['seconds']:8.1f} s  rss {mib(row['rss_bytes']):>10}  peak {mib(row['peak_rss_bytes']):>10}"
              f"  after {what}", flush=True)


# ---------------------------------------------------------------------------------------------


def run_library(args) -> Report:
    import tracing
    from tracing import attention, batch, hidden, prompts
    from tracing.store import ResultStore

    report = Report(lambda: proc_status())
    report.step("imports")
    lm = tracing.load_model(tracing.DEFAULT_MODEL)
    report.step(f"loading {lm.name}")
    frame = prompts.load_prompt_set(prompts.shipped_sets()[args.set])
    with tempfile.TemporaryDirectory() as store_dir:
        done = batch.run_batch(lm, frame, {"samples": args.samples, "kind": args.kind}, ResultStore(store_dir))
        report.step(f"tracing {len(frame)} prompts of '{args.set}' ({done.counts}, samples={args.samples}, "
                    f"kind={args.kind})")
    attention.prompt_set_attention(lm, frame)
    report.step("attention on the prompt set")
    hidden.prompt_set_trajectories(lm, frame)
    report.step("hidden-state trajectories of the prompt set")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"getrusage ru_maxrss: {mib(ru)}")
    return report


def run_server(args) -> Report:
    from playwright.sync_api import sync_playwright

    from browser import AppServer, launch_chromium, wait_idle

    wait_s = args.timeout
    with tempfile.TemporaryDirectory() as store_dir, \
            AppServer("memory_report_server", env={"CAUSAL_TRACING_RESULTS": store_dir}) as server, \
            sync_playwright() as p:
        report = Report(lambda: proc_status(server.pid))
        report.step("server start")
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.url}/?samples={args.samples}")
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=wait_s * 1000)
        wait_idle(page, wait_s)
        report.step("trace page (model loaded, one trace)")

        page.goto(f"{server.url}/categories")
        page.get_by_text("Category averages").first.wait_for(timeout=wait_s * 1000)
        wait_idle(page, wait_s)
        box = page.locator('[data-testid="stSelectbox"]').filter(has_text="Prompt set").first
        box.click()
        page.get_by_role("option", name=args.set, exact=True).first.click()
        wait_idle(page, wait_s)
        if args.kind != "hidden":
            restore = page.locator('[data-testid="stSelectbox"]').filter(has_text="Restore").first
            restore.click()
            page.get_by_role("option", name={"mlp": "MLP outputs", "attn": "attention outputs"}[args.kind]).click()
            wait_idle(page, wait_s)
        samples = page.get_by_label("Samples", exact=True).first
        samples.fill(str(args.samples))
        samples.press("Enter")
        wait_idle(page, wait_s)
        button = page.get_by_role("button", name="missing prompt")
        started = time.perf_counter()
        button.first.click()
        page.wait_for_timeout(2000)
        wait_idle(page, wait_s)
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=wait_s * 1000)
        summary = page.get_by_text("Computed ").first.inner_text() if page.get_by_text("Computed ").count() else ""
        report.step(f"categories page: traced the '{args.set}' set, samples={args.samples}, kind={args.kind} "
                    f"({time.perf_counter() - started:.0f} s; {summary.strip()})")

        for path, what in (("attention", "attention page (prompt set)"),
                           ("hidden_states", "hidden-states page (prompt set)")):
            page.goto(f"{server.url}/{path}")
            page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=wait_s * 1000)
            wait_idle(page, wait_s)
            report.step(what)
        problems = page.locator('[data-testid="stException"]').count()
        browser.close()
        if problems:
            print("warning: the last page showed an exception", file=sys.stderr)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("server", "library"), default="server")
    parser.add_argument("--set", default="default", help="shipped prompt set (default: default)")
    parser.add_argument("--samples", type=int, default=2, help="noise samples per trace (page default 10)")
    parser.add_argument("--kind", choices=("hidden", "mlp", "attn"), default="hidden")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for one step")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    report = run_server(args) if args.mode == "server" else run_library(args)
    peak = max(row["peak_rss_bytes"] for row in report.rows)
    who = "app server process" if args.mode == "server" else "this process"
    print(f"\nPeak resident memory of the {who}: {mib(peak)} ({peak / 1e9:.2f} GB)")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "set": args.set, "samples": args.samples,
                                         "kind": args.kind, "peak_rss_bytes": peak, "steps": report.rows,
                                         "cpu_count": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
