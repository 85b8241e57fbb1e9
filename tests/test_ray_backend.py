"""The Ray backend of run_batch and the CLI on a local 2-worker Ray instance, embedded model.

One private local Ray instance (``distributed.LocalRay``, loopback only) serves the module; each
test starts its own two worker actors through ``run_batch`` and checks that they are gone when it
returns, so a fault in one test (a killed worker) cannot reach another. The module checks at the
end that every Ray process it saw has exited. The reference is a serial run (local backend) of
the same prompts and settings, computed with the workers' thread count (one each on two cores):
with the same thread count the numbers agree bit for bit; with different ones, to float rounding.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch

pytest.importorskip("ray")
import ray  # noqa: E402

from tracing.__main__ import main  # noqa: E402
from tracing.batch import TABLE_COLUMNS, prompt_table, run_batch  # noqa: E402
from tracing.causal import causal_trace  # noqa: E402
from tracing.distributed import LocalRay  # noqa: E402
from tracing.prompts import load_prompt_set, shipped_sets  # noqa: E402
from tracing.store import ResultStore  # noqa: E402

pytestmark = pytest.mark.slow

SETTINGS = {"samples": 2}
ROWS = "noised_final"
WORKERS = 2
NUMBERS = ["noised_index", "final_index", "token_distance", "clean_prob", "corrupted_prob", "effect",
           "transition_layer", "n_layers"]

# The stand-in trace functions below travel to the workers by value (this module is not
# importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def logged_trace(log: str, bad: str = ""):
    """causal_trace that appends each prompt it is given to the file ``log`` (in the worker), and
    raises ValueError for the prompt ``bad``."""

    def trace(lm, prompt, **kwargs):
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(prompt.replace("\n", " ") + "\n")
        if prompt == bad:
            raise ValueError("a bad prompt, for the test")
        return causal_trace(lm, prompt, **kwargs)

    return trace


def calls(log: Path) -> list[str]:
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


@pytest.fixture(scope="module")
def prompts() -> pd.DataFrame:
    """Four short prompts, one per category and one more."""
    frame = load_prompt_set(shipped_sets()["quick"])
    return pd.concat([frame.groupby("category").head(1), frame.tail(1)]).drop_duplicates("prompt").head(4)\
        .reset_index(drop=True)


@pytest.fixture(scope="module")
def serial(embedded, prompts, tmp_path_factory):
    """The serial run of the prompts (local backend), with the workers' thread count. The engine's
    cached clean and corrupted runs are dropped first: earlier tests may have made them with
    another thread count, which changes the numbers at float rounding."""
    from tracing.causal import _clean_cache, _corrupted_cache

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
    _clean_cache.items.clear()
    _corrupted_cache.items.clear()
    try:
        batch = run_batch(embedded, prompts, SETTINGS, ResultStore(tmp_path_factory.mktemp("serial")), rows=ROWS)
    finally:
        torch.set_num_threads(threads)
        _clean_cache.items.clear()  # made with one thread: not for the tests that follow
        _corrupted_cache.items.clear()
    assert batch.counts == {"computed": len(prompts)}
    return batch


@pytest.fixture(scope="module")
def cluster(model_cache):
    """One local Ray instance for the module; afterwards every process it started has exited."""
    with LocalRay(WORKERS) as local:
        seen = set(_ray_processes())
        yield local
        seen |= set(_ray_processes())
    _, alive = psutil.wait_procs(list(seen), timeout=30)
    assert not alive, f"Ray processes left running: {[(p.pid, p.name()) for p in alive]}"


def _ray_processes() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _same_as_serial(batch, serial, prompts: pd.DataFrame) -> None:
    """Per-prompt table equal to the serial one to 1e-6; every computed trace's cells too."""
    mine = prompt_table(batch.results).set_index("prompt")
    theirs = prompt_table(serial.results).set_index("prompt")
    for prompt in prompts["prompt"]:
        if mine.loc[prompt, "status"] != "computed" and mine.loc[prompt, "status"] != "stored":
            continue
        np.testing.assert_allclose(mine.loc[prompt, NUMBERS].astype(float), theirs.loc[prompt, NUMBERS].astype(float),
                                   atol=1e-6, rtol=0, err_msg=prompt)
        assert mine.loc[prompt, "target"] == theirs.loc[prompt, "target"]
    by_prompt = {r.prompt: r.trace for r in serial.results}
    for r in batch.traced():
        for name, cells in r.trace.metrics.items():
            np.testing.assert_allclose(cells, by_prompt[r.prompt].metrics[name], atol=1e-6, rtol=0, equal_nan=True)


def _gone(pids) -> None:
    """The worker processes have exited (waits a little: ray.kill is asynchronous)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"workers still running: {[p.pid for p in alive]}"


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _sockets() -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """(listening sockets, remote ends of connections) of this process and every Ray process."""
    listening, remote = [], []
    for proc in [psutil.Process(), *_ray_processes()]:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN:
                listening.append((proc.name(), c.laddr.ip, c.laddr.port))
            elif c.raddr:
                remote.append((proc.name(), c.raddr.ip))
    return listening, remote


# -- tests -----------------------------------------------------------------------------------------


def test_two_workers_give_the_serial_table_on_loopback_and_report_bad_prompts(
        embedded, prompts, serial, cluster, tmp_path):
    """2 workers: same table as serial; a prompt failing in its worker and one skipped by the
    driver are each reported once and the rest complete; every Ray socket is on loopback."""
    frame = prompts.copy()
    frame.loc[len(frame)] = {**frame.iloc[0].to_dict(), "prompt": "Nothing to see", "subject": "absent"}
    bad = frame["prompt"][1]
    log = tmp_path / "calls.txt"
    reported: list[str] = []
    network: dict[str, list] = {}

    def progress(done, total, result):
        reported.append(result.prompt)
        if result.status == "computed" and not network:
            network["listening"], network["remote"] = _sockets()  # while both workers are alive
            network["workers"] = _trace_workers()

    batch = run_batch(embedded, frame, SETTINGS, ResultStore(tmp_path / "store"), rows=ROWS, backend="ray",
                      workers=WORKERS, progress=progress, trace=logged_trace(str(log), bad))
    status = {r.prompt: r for r in batch.results}
    assert status["Nothing to see"].status == "skipped" and "does not occur" in status["Nothing to see"].message
    assert status[bad].status == "failed" and status[bad].message == "a bad prompt, for the test"
    assert batch.counts == {"computed": len(prompts) - 1, "failed": 1, "skipped": 1}
    assert sorted(reported) == sorted(frame["prompt"])  # every prompt reported once
    assert sorted(calls(log)) == sorted(prompts["prompt"])  # each sent once; the skipped one never
    assert {r.worker for r in batch.traced()} <= {"w1", "w2"} and batch.retried == 0
    assert len(list(ResultStore(tmp_path / "store").keys())) == len(prompts) - 1
    _same_as_serial(batch, serial, prompts)
    assert list(prompt_table(batch.results).columns) == TABLE_COLUMNS

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert network["listening"], "no listening sockets found"
    assert len(network["workers"]) == WORKERS
    outside = [s for s in network["listening"] if not _is_loopback(s[1])]
    assert not outside, f"listening beyond loopback: {outside}"
    talking = [s for s in network["remote"] if not _is_loopback(s[1])]
    assert not talking, f"talking beyond loopback: {talking}"
    _gone([w.pid for w in batch.workers])


def test_a_killed_worker_is_replaced_and_its_prompt_retried(embedded, prompts, serial, cluster, tmp_path):
    """Kill a worker (SIGKILL, by pid) right after it was handed its second prompt: the batch
    completes, that prompt is retried elsewhere, every prompt is stored once, equal to serial."""
    log = tmp_path / "calls.txt"
    killed: dict[str, int] = {}
    reported: list[str] = []
    events: list[str] = []

    def progress(done, total, result):
        reported.append(result.prompt)
        if result.status == "computed" and not killed:
            killed["pid"] = result.worker_pid  # this worker was just given the next prompt
            os.kill(result.worker_pid, signal.SIGKILL)

    store = ResultStore(tmp_path / "store")
    batch = run_batch(embedded, prompts, SETTINGS, store, rows=ROWS, backend="ray", workers=WORKERS,
                      progress=progress, notify=events.append, trace=logged_trace(str(log)))
    assert batch.counts == {"computed": len(prompts)} and not batch.cancelled
    assert sorted(reported) == sorted(prompts["prompt"])
    retried = [r for r in batch.results if r.attempts > 1]
    assert batch.retried == 1 and len(retried) == 1 and retried[0].attempts == 2
    assert retried[0].worker_pid != killed["pid"]  # finished by another worker
    sent = calls(log)  # a prompt is logged when a worker starts it: the lost one once or twice
    assert sorted(set(sent)) == sorted(prompts["prompt"]) and 1 <= sent.count(retried[0].prompt) <= 2
    assert all(sent.count(p) == 1 for p in prompts["prompt"] if p != retried[0].prompt)
    assert len(list(store.keys())) == len(prompts)  # one entry per prompt, none twice
    assert len(batch.workers) == WORKERS + 1 and not batch.workers[0].alive  # a replacement was started
    assert any("died" in e for e in events) and any("retrying" in e for e in events)
    _same_as_serial(batch, serial, prompts)
    _gone([w.pid for w in batch.workers if w.pid])
    print(f"\nkilled pid {killed['pid']}; retried {retried[0].prompt!r}; events: {events}")


def test_interrupted_batch_keeps_its_work_and_the_cli_resumes_only_the_missing(
        embedded, prompts, serial, cluster, tmp_path, capsys):
    """Ctrl-C (KeyboardInterrupt in the driver) after the first prompt keeps it stored; the CLI on
    2 Ray workers then traces only the missing prompts and writes the serial table as Parquet."""
    prompts_file = tmp_path / "prompts.csv"
    prompts[["category", "prompt", "expected", "subject"]].to_csv(prompts_file, index=False)
    store_dir, log = tmp_path / "store", tmp_path / "calls.txt"
    first: list = []

    def interrupt(done, total, result):
        first.append(result)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(embedded, prompts, SETTINGS, ResultStore(store_dir), rows=ROWS, backend="ray", workers=WORKERS,
                  progress=interrupt, trace=logged_trace(str(log)))
    assert len(first) == 1 and first[0].status == "computed"
    assert len(list(ResultStore(store_dir).keys())) == 1
    capsys.readouterr()

    table = tmp_path / "table.parquet"
    args = ["batch", "--prompts", str(prompts_file), "--samples", "2", "--rows", ROWS, "--store", str(store_dir),
            "--backend", "ray", "--workers", str(WORKERS), "--table", str(table)]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.err.count("] stored ") == 1 and out.err.count("] computed ") == len(prompts) - 1
    assert repr(first[0].prompt) in next(line for line in out.err.splitlines() if "] stored " in line)
    assert "retried" in out.err and "ETA" in out.err
    traced = sum(int(line.split(": ")[1].split(" prompts")[0]) for line in out.out.splitlines()
                 if line.startswith("  w") and " prompts, " in line)
    assert traced == len(prompts) - 1  # the workers traced only the missing prompts
    assert len(list(ResultStore(store_dir).keys())) == len(prompts)

    written = pd.read_parquet(table)
    expected = prompt_table(serial.results)
    assert list(written.columns) == TABLE_COLUMNS and list(written["prompt"]) == list(expected["prompt"])
    np.testing.assert_allclose(written[NUMBERS].astype(float), expected[NUMBERS].astype(float), atol=1e-6, rtol=0)
    assert list(written["target"]) == list(expected["target"])


def test_more_gpus_than_the_cluster_has_is_a_clear_error(embedded, prompts, cluster):
    with pytest.raises(ValueError, match="GPUs"):
        run_batch(embedded, prompts.head(1), SETTINGS, backend="ray", workers=2, gpus_per_worker=1)


def test_a_model_the_workers_cannot_load_stops_the_batch_with_its_reason(tiny, prompts, cluster, tmp_path):
    """A random test model has no name a worker could load: a clear error, nothing stored, no
    worker left running."""
    with pytest.raises(RuntimeError, match="could not load the model"):
        run_batch(tiny("gpt2"), prompts.head(2), SETTINGS, ResultStore(tmp_path), rows=ROWS, backend="ray",
                  workers=WORKERS)
    assert not list(ResultStore(tmp_path).keys())
    _, alive = psutil.wait_procs(_trace_workers(), timeout=30)
    assert not alive


def _trace_workers() -> list[psutil.Process]:
    """Running processes of TraceWorker actors (Ray titles them ``ray::TraceWorker...``)."""
    out = []
    for proc in _ray_processes():
        try:
            if "TraceWorker" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out
