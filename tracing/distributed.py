"""The Ray backend of ``batch.run_batch``: trace a batch's pending prompts on a pool of Ray actors.

Each worker is a Ray actor (:class:`TraceWorker`) that loads the driver's model once, by the same
name and dtype (its revision is checked against the driver's), and traces the prompts sent to it.
Workers return plain records (``Trace.to_record``: JSON-able metadata and numpy arrays); the
driver rebuilds each trace and writes it into the result store, so workers never touch the store
and nothing on disk is pickled. Noise depends only on the seed (``causal``), so a trace is the same
whichever worker ran it, and the same as a serial run.

Faults: when a worker process dies (killed, out of memory, node lost) its unfinished prompt goes
back to the front of the queue, is retried by the next free worker and the dead worker is
replaced by a new actor (at most ``2 * workers`` replacements). A prompt that has lost its worker
``MAX_ATTEMPTS`` times is reported failed. A prompt whose trace raises (bad input) is reported
failed once with its error; the rest of the batch goes on. Interrupting the driver (Ctrl-C,
``should_stop``) kills the actors; every prompt received until then is stored.

``address=None`` starts a private local Ray instance (:class:`LocalRay`) that listens on loopback
only: node IP 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, without which Ray on Linux takes
the interface address), no dashboard, no usage statistics, no worker logs echoed to the driver, and
a random authentication token in the environment (no token file written). An address
connects to an existing cluster (``ray start --head`` / ``ray start --address=...``); an already
initialised Ray session in this process is used as it is. Ray is imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .batch import PromptResult
    from .model import LoadedModel
    from .store import ResultStore

MAX_ATTEMPTS = 3  # a prompt whose worker died this many times is reported failed
WAIT_SECONDS = 0.25  # how often the driver checks should_stop while waiting
# Forwarded to the workers of a local instance, so they read the same model cache and hub settings.
FORWARDED_ENV = ("CAUSAL_TRACING_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP 127.0.0.1 as asked (Linux)
    "RAY_USAGE_STATS_ENABLED": "0",
}
LOOPBACK = "127.0.0.1"
# Local instances authenticate with this process's random token, given in the environment (Ray
# turns token authentication on for new local instances; with a token in RAY_AUTH_TOKEN it writes
# no ~/.ray/auth_token). One per process: Ray caches the token it has read.
_TOKEN = secrets.token_hex(32)


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        raise RuntimeError("The Ray backend needs the 'ray' package: pip install 'ray==2.60.*'.") from exc
    return ray


# ---------------------------------------------------------------------------------------------
# The Ray session


class LocalRay:
    """A private local Ray instance on loopback (context manager): ``cpus`` logical CPUs, the
    machine's GPUs. The environment it needs is set while it runs and restored afterwards."""

    def __init__(self, cpus: int, object_store_mb: int = 256) -> None:
        self.cpus, self.object_store_mb = int(cpus), int(object_store_mb)
        self._saved: dict[str, str | None] = {}
        self.seconds = 0.0  # how long the start took

    def __enter__(self) -> "LocalRay":
        import logging

        ray = _ray()
        env = {**LOCAL_ENV, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or _TOKEN}
        self._saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        started = time.perf_counter()
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level, notice.level = notice.level, logging.ERROR  # "token authentication is enabled": as wanted
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: the driver may have
        # imported it before the variable was set (Ray's child processes read it from the env).
        from ray._private import ray_constants

        cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(address="local", num_cpus=self.cpus, include_dashboard=False, log_to_driver=False,
                     _node_ip_address=LOOPBACK, object_store_memory=self.object_store_mb * 2**20,
                     logging_level=logging.WARNING)
        except BaseException:
            self._restore()
            raise
        finally:
            notice.setLevel(level)
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        self.seconds = time.perf_counter() - started
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            _ray().shutdown()
        finally:
            self._restore()

    def _restore(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _session(address: str | None, workers: int):
    """The Ray session to use: the current one, a connection to ``address``, or a new local one.
    Returns (context manager or None, whether it is local)."""
    ray = _ray()
    if ray.is_initialized():
        return None, address is None
    if address is None:
        return LocalRay(max(workers, os.cpu_count() or 1)), True
    return _Connection(address), False


class _Connection:
    """A connection to an existing cluster (context manager)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __enter__(self) -> "_Connection":
        import logging

        try:
            _ray().init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ValueError(f"Could not connect to the Ray cluster at {self.address!r}: {exc}") from exc
        return self

    def __exit__(self, *exc_info) -> None:
        _ray().shutdown()


# ---------------------------------------------------------------------------------------------
# The worker


class TraceWorker:
    """A Ray actor: the model loaded once (``spec``: name, revision, dtype, device, threads, env),
    then one trace per call."""

    def __init__(self, spec: dict[str, Any]) -> None:
        os.environ.update(spec.get("env") or {})
        import torch

        from .model.loading import load_model
        from .store import model_identity

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        self.lm = load_model(spec["name"], device=spec.get("device"), dtype=spec.get("dtype"))
        mine, wanted = model_identity(self.lm), spec["identity"]
        if mine != wanted:
            raise RuntimeError(f"this worker loaded {mine}, the driver has {wanted}: install the same "
                               "model (name, revision) on every machine and give the same dtype")

    def info(self) -> dict[str, Any]:
        """pid, host, device and model load time of this worker."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.lm.device),
                "load_seconds": float(getattr(self.lm, "load_seconds", 0.0) or 0.0)}

    def trace(self, prompt: str, settings: dict[str, Any], trace: Callable | None = None) -> dict[str, Any]:
        """One trace as a record: ``{"meta", "arrays", "seconds"}``, or ``{"error"}`` when the
        prompt is bad (ValueError)."""
        import torch

        from .causal import causal_trace

        started = time.perf_counter()
        try:
            with torch.inference_mode():
                result = (trace or causal_trace)(self.lm, prompt, **settings)
        except ValueError as exc:
            return {"error": str(exc) or type(exc).__name__}
        meta, arrays = result.to_record()
        return {"meta": meta, "arrays": arrays, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class WorkerStats:
    """One actor of the pool: where it runs and what it did."""

    label: str
    pid: int | None = None
    host: str = ""
    device: str = ""
    load_seconds: float = 0.0
    prompts: int = 0
    seconds: float = 0.0  # trace time spent in the worker
    alive: bool = True

    def throughput(self) -> float:
        """Prompts per second of trace time (0 before the first)."""
        return self.prompts / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Slot:
    stats: WorkerStats
    handle: Any
    ready: bool = False


@dataclass
class RayRun:
    """What the Ray backend did: its workers, how many retries, whether it was cancelled."""

    workers: list[WorkerStats] = field(default_factory=list)
    retried: int = 0
    cancelled: bool = False
    start_seconds: float = 0.0  # starting the local Ray instance (0 when one was running)
    events: list[str] = field(default_factory=list)


def worker_spec(lm: "LoadedModel", device: str | None, threads: int | None, local: bool) -> dict[str, Any]:
    """What every worker needs to load the driver's model (name, dtype, device, identity)."""
    from .store import model_identity

    identity = model_identity(lm)
    env = {k: os.environ[k] for k in FORWARDED_ENV if local and k in os.environ}
    return {"name": lm.name, "dtype": identity["dtype"], "device": device, "threads": threads,
            "identity": identity, "env": env}


def _gpus(ray, lm: "LoadedModel", workers: int, gpus_per_worker: float | None) -> float:
    """GPUs per actor: as asked, else 1 when the cluster has GPUs and the driver's model is on CUDA
    (or the driver has none: a GPU cluster run from a CPU head); checked against the cluster."""
    available = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_worker is None:
        on_gpu = getattr(getattr(lm, "device", None), "type", "cpu") == "cuda"
        gpus_per_worker = 1.0 if available >= workers and (on_gpu or not _has_cuda()) else 0.0
    if gpus_per_worker < 0:
        raise ValueError("gpus_per_worker must be 0 or more")
    if gpus_per_worker * workers > available + 1e-9:
        raise ValueError(f"{workers} workers x {gpus_per_worker:g} GPUs need {workers * gpus_per_worker:g} GPUs; "
                         f"the Ray cluster has {available:g}")
    return float(gpus_per_worker)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_on_ray(
    lm: "LoadedModel",
    pending: list["PromptResult"],
    store: "ResultStore",
    *,
    workers: int,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    trace: Callable | None = None,
    finished: Callable[["PromptResult"], "bool | None"] | None = None,
    should_stop: Callable[[], bool] | None = None,
    notify: Callable[[str], None] | None = None,
) -> RayRun:
    """Trace the ``pending`` prompts (``PromptResult``s with key and settings) on ``workers`` Ray
    actors; store each trace as it arrives and set the result's status (computed / failed /
    cancelled), ``worker``, ``worker_pid``, ``attempts`` and ``seconds``. ``finished(result)`` is
    called once per prompt as it finishes (False cancels); ``notify(text)`` hears of deaths and
    retries. ``trace``: None for ``causal_trace``, or a picklable stand-in (tests)."""
    session, local = _session(address, workers)
    run = RayRun()
    with session or contextlib.nullcontext():
        run.start_seconds = getattr(session, "seconds", 0.0)
        pool = _Pool(lm, workers, local, gpus_per_worker, run, notify)
        try:
            pool.start()
            pool.serve(deque(pending), store, trace, finished, should_stop or (lambda: False))
        finally:
            pool.close()
    return run


class _Pool:
    """The actors, the queue and the in-flight prompts (one per actor) of one batch."""

    def __init__(self, lm, workers: int, local: bool, gpus_per_worker, run: RayRun, notify) -> None:
        self.ray = _ray()
        self.lm, self.workers, self.run = lm, int(workers), run
        self.notify = notify or (lambda text: None)
        gpus = _gpus(self.ray, lm, self.workers, gpus_per_worker)
        cpus = os.cpu_count() or 1
        threads = max(1, cpus // self.workers) if local and not gpus else None
        self.spec = worker_spec(lm, "cuda" if gpus else "cpu", threads, local)
        self.options = {"num_cpus": 1, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0}
        self.actor_class = self.ray.remote(TraceWorker)
        self.slots: list[_Slot] = []
        self.inflight: dict[Any, tuple[_Slot, Any]] = {}  # ref -> (slot, PromptResult or None: loading)
        self.replacements = 2 * self.workers

    # -- actors -----------------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.workers):
            self._new_actor()

    def _new_actor(self) -> None:
        stats = WorkerStats(label=f"w{len(self.slots) + 1}")
        handle = self.actor_class.options(**self.options).remote(self.spec)
        slot = _Slot(stats, handle)
        self.slots.append(slot)
        self.run.workers.append(stats)
        self.inflight[handle.info.remote()] = (slot, None)

    def _replace(self, slot: _Slot, why: str) -> None:
        slot.stats.alive = False
        self.ray.kill(slot.handle, no_restart=True)
        if self.replacements > 0:
            self.replacements -= 1
            self._new_actor()
            self._event(f"{slot.stats.label} died ({why}); replaced by {self.slots[-1].stats.label}")
        else:
            self._event(f"{slot.stats.label} died ({why}); no replacements left")

    def close(self) -> None:
        for slot in self.slots:
            try:
                self.ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or Ray is shutting down
                pass
            slot.stats.alive = False

    def _event(self, text: str) -> None:
        self.run.events.append(text)
        self.notify(text)

    # -- the loop ---------------------------------------------------------------------------------

    def serve(self, queue: deque, store, trace, finished, should_stop) -> None:
        """Hand out prompts one per ready actor until every prompt is finished."""
        self.queue, self.store, self.trace = queue, store, trace
        left = len(queue)
        while left:
            if should_stop():
                return self._cancel()
            if not self.inflight:
                raise RuntimeError(f"every Ray worker died; {left} prompts were not traced "
                                   "(the finished ones are stored: run again to resume)")
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=WAIT_SECONDS)
            for ref in ready:
                result = self._receive(ref)
                if result is not None:
                    left -= 1
                    if finished is not None and finished(result) is False:
                        return self._cancel()

    def _submit(self, slot: _Slot) -> None:
        if self.queue and slot.stats.alive:
            result = self.queue.popleft()
            result.attempts += 1
            result.worker, result.worker_pid = slot.stats.label, slot.stats.pid
            self.inflight[slot.handle.trace.remote(result.prompt, result.settings, self.trace)] = (slot, result)

    def _receive(self, ref):
        """Handle one finished call; returns the PromptResult when a prompt is finished."""
        slot, result = self.inflight.pop(ref)
        exceptions = self.ray.exceptions
        try:
            out = self.ray.get(ref)
        except exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                raise RuntimeError(f"a Ray worker could not load the model: {exc}") from None
            return self._lost(slot, result, exc)
        except exceptions.RayTaskError as exc:  # an unexpected error of this prompt's trace
            if result is None:
                raise RuntimeError(f"a Ray worker could not start: {exc}") from None
            out = {"error": f"{type(exc.cause).__name__}: {exc.cause}" if exc.cause else str(exc)}
        if result is None:  # the actor is loaded
            slot.ready = True
            slot.stats.pid, slot.stats.host, slot.stats.device = out["pid"], out["host"], out["device"]
            slot.stats.load_seconds = out["load_seconds"]
            self._submit(slot)
            return None
        self._submit(slot)
        self._finish(slot, result, out)
        return result

    def _finish(self, slot: _Slot, result, out: dict[str, Any]) -> None:
        from .causal import Trace

        if "error" in out:
            result.status, result.message = "failed", out["error"]
            return
        traced = Trace.from_record(out["meta"], out["arrays"])
        self.store.put(result.key, traced)
        result.trace, result.status, result.seconds = traced, "computed", float(out["seconds"])
        slot.stats.prompts += 1
        slot.stats.seconds += result.seconds

    def _lost(self, slot: _Slot, result, exc) -> "Any | None":
        """A worker died: retry its prompt elsewhere (or fail it after MAX_ATTEMPTS) and replace it."""
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._replace(slot, why)
        if result is None:
            return None
        if result.attempts >= MAX_ATTEMPTS:
            result.status = "failed"
            result.message = f"its worker died {result.attempts} times ({why})"
            return result
        self.run.retried += 1
        self._event(f"retrying {result.prompt!r} (attempt {result.attempts + 1})")
        self.queue.appendleft(result)
        idle = [s for s in self.slots if s.ready and s.stats.alive and not self._busy(s)]
        for other in idle[:1]:
            self._submit(other)
        return None

    def _busy(self, slot: _Slot) -> bool:
        return any(s is slot for s, _ in self.inflight.values())

    def _cancel(self) -> None:
        self.run.cancelled = True
        for slot, result in self.inflight.values():
            if result is not None:
                result.status, result.message = "cancelled", "cancelled"
        self.inflight.clear()
