"""On-disk result store for traces: JSON metadata + safetensors arrays, atomic, versioned, no pickle.

It holds causal traces (``causal.Trace``) and per-head traces (``heads.HeadTrace``): the JSON says
which (``record``: "trace" or "head"; entries written before it existed are traces), and a head
trace's key includes that it is one and its restored ``token``, so the two never share a key.

Layout: ``root/<key[:2]>/<key>.json`` and ``root/<key[:2]>/<key>.safetensors``. The key is the
sha256 of a canonical JSON of the model (name, revision, dtype), the prompt and every trace setting,
a target or contrast given as text (" Paris") written as the token id it names, so a trace asked for
by completion and by id is one entry. Entries filed by older versions under the text (``legacy_key``)
are still found: ``get`` of a key made by ``ResultStore.key`` falls back to its legacy key and
re-files the entry under the new one.
The JSON holds the format version, the trace metadata and sha256 checksums of itself and of the
arrays file. Each file is written to a temporary name and renamed into place (arrays first), so a
reader never sees a partial or mixed entry: an interrupted write reads as missing. An entry whose checksum, version or content
does not match is logged as a warning and treated as missing (it is recomputed and overwritten).
A small in-memory LRU layer sits in front of the disk. All methods are thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .model.loading import cache_root
from .settings import TraceSettings

if TYPE_CHECKING:
    from .model import LoadedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KEY = re.compile(r"^[0-9a-f]{64}$")
LEGACY_ITEMS = 4096  # keys whose legacy key a store remembers (see ResultStore.key)


RECORDS = ("trace", "head")  # record types: causal.Trace, heads.HeadTrace


def record_type(result: Any) -> str:
    """The record type of a stored result: "head" for a HeadTrace, else "trace"."""
    from .heads import HeadTrace

    return "head" if isinstance(result, HeadTrace) else "trace"


def _record_class(name: str):
    if name == "head":
        from .heads import HeadTrace

        return HeadTrace
    from .causal import Trace

    return Trace


def canonical_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Every trace setting (``TraceSettings``, defaults filled in, validated and normalised), the
    sorted noised positions and, when not every row is computed, the sorted ``rows``: the stable
    form that keys are made of. A head trace's settings (``record="head"``) also keep ``record``
    and the restored ``token`` (a position >= 0); a causal trace's have neither (their keys are
    what they always were)."""
    if settings.get("noised") is None:
        raise ValueError("settings need the noised token indices ('noised')")
    record = settings.get("record") or "trace"
    if record not in RECORDS:
        raise ValueError(f"Unknown record type {record!r}: use one of {', '.join(RECORDS)}.")
    token = settings.get("token")
    if record == "head" and (isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0):
        raise ValueError(f"A head trace's settings need the restored token as a position >= 0, not {token!r}.")
    if record == "trace" and token is not None:
        raise ValueError("'token' is a head-trace setting: give record='head' with it.")
    settings = {k: v for k, v in settings.items() if k not in ("record", "token")}
    whole = {k: int(v) for k, v in settings.items()
             if k in ("samples", "seed", "window") and isinstance(v, float) and v.is_integer()}
    out = TraceSettings.from_dict({**settings, **whole}).to_dict()
    out["noised"] = sorted({int(i) for i in settings["noised"]})
    if settings.get("rows") is not None:
        out["rows"] = sorted({int(i) for i in settings["rows"]})
    if record == "head":
        out["record"], out["token"] = record, int(token)
    return out


def _canonical_json(value: Any, allow_nan: bool = False) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_root() -> Path:
    """Where results go: env ``CAUSAL_TRACING_RESULTS``, else ``cache_root()/results``."""
    return Path(os.environ.get("CAUSAL_TRACING_RESULTS") or cache_root() / "results")


def model_identity(lm: "LoadedModel") -> dict[str, str]:
    """What identifies a model's numbers: name, revision and dtype."""
    return {
        "name": str(getattr(lm, "name", "")),
        "revision": str(getattr(lm, "revision", "")),
        "dtype": str(getattr(lm, "dtype", "")).replace("torch.", ""),
    }


def answer_ids(lm: "LoadedModel", prompt: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Canonical ``settings`` with a text ``target`` / ``contrast`` replaced by the token id it
    names (its first token after ``prompt``, as the engine resolves it), so a trace asked for by
    completion (" Paris") and by id (its token) share a key. Kept as text when ``lm`` has no
    tokenizer or the text names no token (the engine then reports it)."""
    from .model.tokens import completion_token

    out = dict(settings)
    if getattr(lm, "tokenizer", None) is None:
        return out
    for name in ("target", "contrast"):
        if isinstance(out.get(name), str):
            try:
                out[name] = completion_token(lm, prompt, out[name], name)
            except (ValueError, TypeError):
                pass
    return out


def _key(lm: "LoadedModel", prompt: str, settings: dict[str, Any]) -> str:
    payload = {"format": FORMAT_VERSION, "model": model_identity(lm), "prompt": prompt, "settings": settings}
    return _sha256(_canonical_json(payload).encode("utf-8"))


def result_key(lm: "LoadedModel", prompt: str, settings: dict[str, Any]) -> str:
    """sha256 hex key of (model identity, prompt, canonical settings with answers as token ids
    (``answer_ids``), store format)."""
    return _key(lm, prompt, answer_ids(lm, prompt, canonical_settings(settings)))


def legacy_key(lm: "LoadedModel", prompt: str, settings: dict[str, Any]) -> str:
    """The key the store used before ``answer_ids``: a text target or contrast kept as text.
    Equal to ``result_key`` when the settings name no answer by its text."""
    return _key(lm, prompt, canonical_settings(settings))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """Traces on disk by key, with an in-memory LRU in front. ``root`` defaults to
    ``default_root()`` (env ``CAUSAL_TRACING_RESULTS``, else ``cache_root()/results``)."""

    def __init__(self, root: str | os.PathLike | None = None, memory_items: int = 512) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.memory_items = memory_items
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._legacy: OrderedDict[str, str] = OrderedDict()  # key -> the key an older store used
        self._lock = threading.Lock()

    # -- keys and paths -------------------------------------------------------------------------

    def key(self, lm: "LoadedModel", prompt: str, settings: dict[str, Any]) -> str:
        """The key of a trace of ``prompt`` on ``lm`` with ``settings`` (see ``result_key``).
        When an older store would have filed it under another key (``legacy_key``), ``get``
        looks there too."""
        key, old = result_key(lm, prompt, settings), legacy_key(lm, prompt, settings)
        if old != key:
            with self._lock:
                self._legacy[key] = old
                self._legacy.move_to_end(key)
                while len(self._legacy) > LEGACY_ITEMS:
                    self._legacy.popitem(last=False)
        return key

    def _paths(self, key: str) -> tuple[Path, Path]:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"Invalid result key {key!r}: expected 64 lowercase hex characters.")
        folder = self.root / key[:2]
        return folder / f"{key}.json", folder / f"{key}.safetensors"

    # -- reading --------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str):
        """The stored ``Trace`` or ``HeadTrace`` (as its record type says) or None (missing,
        corrupted or from another format version)."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        trace = self._read(key)
        if trace is None:
            return self._migrate(key)
        self._remember(key, trace)
        return trace

    def _migrate(self, key: str):
        """The entry an older store filed under ``key``'s legacy key (see ``key``), re-filed
        under ``key`` (written there, then removed from the old place); None when there is none."""
        with self._lock:
            old = self._legacy.get(key)
        trace = self._read(old) if old is not None else None
        if trace is None:
            return None
        try:
            self.put(key, trace)
            self.delete(old)
        except OSError as exc:  # a read-only store still serves the entry
            log.warning("Could not re-file result %s under %s (%s).", old, key, exc)
            self._remember(key, trace)
        return trace

    def _read(self, key: str):
        meta_path, array_path = self._paths(key)
        if not meta_path.is_file():
            return None
        try:
            meta = self._read_meta(key, meta_path)
            data = array_path.read_bytes()
            if _sha256(data) != meta["arrays_sha256"]:
                raise ValueError("the arrays file does not match its checksum")
            from safetensors.numpy import load

            record = meta.get("record", "trace")
            if record not in RECORDS:
                raise ValueError(f"unknown record type {record!r}")
            return _record_class(record).from_record(meta["trace"], load(data))
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute
            log.warning("Ignoring damaged result %s (%s); it will be recomputed.", key, exc)
            return None

    def _read_meta(self, key: str, path: Path) -> dict[str, Any]:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format')!r}, this program reads {FORMAT_VERSION}")
        if meta.get("key") != key:
            raise ValueError("the entry belongs to another key")
        if _sha256(_canonical_json(meta["trace"], True).encode("utf-8")) != meta.get("trace_sha256"):
            raise ValueError("the metadata does not match its checksum")
        return meta

    # -- writing --------------------------------------------------------------------------------

    def put(self, key: str, trace) -> None:
        """Store a trace or head trace under ``key`` (arrays first, then metadata; each renamed
        into place)."""
        from safetensors.numpy import save

        meta_path, array_path = self._paths(key)
        record, arrays = trace.to_record()
        record = json.loads(_canonical_json(record, True))  # JSON-able check; tuples become lists
        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "record": record_type(trace),
            "trace": record,
            "trace_sha256": _sha256(_canonical_json(record, True).encode("utf-8")),
            "arrays_sha256": _sha256(data),
        }
        _atomic_write(array_path, data)
        _atomic_write(meta_path, json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8"))
        self._remember(key, trace)

    def _remember(self, key: str, trace) -> None:
        with self._lock:
            self._memory[key] = trace
            self._memory.move_to_end(key)
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)

    def delete(self, key: str) -> None:
        """Remove an entry (memory and disk); missing entries are fine."""
        meta_path, array_path = self._paths(key)
        with self._lock:
            self._memory.pop(key, None)
        meta_path.unlink(missing_ok=True)
        array_path.unlink(missing_ok=True)

    def forget_memory(self) -> None:
        """Empty the in-memory layer (the disk is untouched)."""
        with self._lock:
            self._memory.clear()

    def keys(self) -> Iterator[str]:
        """Keys of the entries on disk (not checked)."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("??/*.json")):
            if _KEY.fullmatch(path.stem):
                yield path.stem
