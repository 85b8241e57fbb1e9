"""Security and durability: the result store, safe model loading, uploads and the server binding.

- Result store: atomic writes (a process killed mid-write never leaves a file that is later read
  as an entry), damaged entries detected, reported and recomputed, a format version, JSON and
  safetensors only, keys that cannot leave the store folder.
- Loading: never ``trust_remote_code``, safetensors only unless ``allow_pickle=True`` (then a
  warning), no pickle or ``torch.load`` anywhere in the library.
- Server: bound to 127.0.0.1 by default, uploads capped.
"""

from __future__ import annotations

import ast
import json
import logging
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tracing
from tracing import store as store_module
from tracing.causal import causal_trace
from tracing.store import FORMAT_VERSION, ResultStore, result_key

from test_charts import make_trace

ROOT = Path(__file__).resolve().parents[1]


def page_files() -> list[Path]:
    """The page scripts app.py registers with st.Page (wherever their folder is)."""
    tree = ast.parse((ROOT / "app.py").read_text(encoding="utf-8"))
    return [ROOT / node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Page"
            and node.args and isinstance(node.args[0], ast.Constant)]


PAGES_DIR = page_files()[0].parent
SOURCES = sorted([*(ROOT / "tracing").glob("*.py"), *PAGES_DIR.glob("*.py"), ROOT / "app.py",
                  *(ROOT / "scripts").glob("*.py")])
LIBRARY = sorted((ROOT / "tracing").glob("*.py"))
CONFIG = ROOT / ".streamlit" / "config.toml"
EIFFEL = "The Eiffel Tower is located in the city of"
KEY_A = "a" * 64
KEY_B = "b" * 64


# ---------------------------------------------------------------------------------------------
# Helpers


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def check_safetensors(data: bytes) -> dict:
    """Parse a safetensors file by hand: 8-byte little-endian header size, JSON header, raw data."""
    assert len(data) >= 8
    (size,) = struct.unpack("<Q", data[:8])
    assert 0 < size <= len(data) - 8
    header = json.loads(data[8:8 + size])
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    assert 8 + size + end == len(data), "the data section does not match the header"
    return header


def assert_not_pickle(path: Path, data: bytes) -> None:
    assert not data.startswith(b"\x80"), f"{path} looks like a pickle (protocol 2+)"
    assert not data.startswith(b"PK\x03\x04"), f"{path} looks like a zip (torch.save)"
    assert b"cnumpy\n" not in data and b"ctorch\n" not in data, f"{path} has pickle globals"


def assert_same_trace(got, want) -> None:
    assert got is not None
    assert got.metrics.keys() == want.metrics.keys()
    for name in want.metrics:
        np.testing.assert_array_equal(got.metrics[name], want.metrics[name])
    assert got.settings == want.settings and got.tokens == want.tokens
    assert got.metric_low == want.metric_low and got.metric_high == want.metric_high


def entry_paths(root: Path, key: str) -> tuple[Path, Path]:
    return root / key[:2] / f"{key}.json", root / key[:2] / f"{key}.safetensors"


# ---------------------------------------------------------------------------------------------
# Result store: what is written


def test_store_writes_only_json_and_safetensors(tiny, tmp_path):
    lm = tiny("gpt2")
    trace = causal_trace(lm, EIFFEL, [1, 2, 3], samples=1, contrast=" London")
    store = ResultStore(tmp_path)
    key = store.key(lm, EIFFEL, trace.settings)
    store.put(key, trace)
    store.put(KEY_B, make_trace())
    files = stored_files(tmp_path)
    assert {p.suffix for p in files} == {".json", ".safetensors"}, files
    assert len(files) == 4
    for path in files:
        data = path.read_bytes()
        assert_not_pickle(path, data)
        if path.suffix == ".json":
            meta = json.loads(data)
            assert meta["format"] == FORMAT_VERSION and meta["key"] == path.stem
        else:
            header = check_safetensors(data)
            assert {k for k in header if k != "__metadata__"} == {f"metric.{m}" for m in
                                                                   (trace.metrics if path.stem == key else make_trace().metrics)}
    assert_same_trace(ResultStore(tmp_path).get(key), trace)  # a fresh store (new process) reads it back


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {"torch.load", "pd.read_pickle", "pandas.read_pickle", "eval", "exec"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_torch_load_or_remote_code_in_the_sources(path):
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            problems.append(node.module)
    for call in _calls(tree):
        name = _dotted(call.func)
        if name in UNSAFE_CALLS or name.endswith((".to_pickle", "torch.load")) or name.startswith("pickle."):
            problems.append(f"line {call.lineno}: {name}()")
        for kw in call.keywords:
            if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                problems.append(f"line {call.lineno}: trust_remote_code={ast.unparse(kw.value)}")
            if kw.arg == "allow_pickle" and name.endswith("load") and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False):
                problems.append(f"line {call.lineno}: {name}(allow_pickle=...)")
            if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                problems.append(f"line {call.lineno}: weights_only={ast.unparse(kw.value)}")
    # and a plain grep, for anything the AST walk could miss (e.g. getattr tricks in strings)
    for needle in ("torch.load(", "pickle.load", "pickle.loads", "trust_remote_code=True"):
        for number, line in enumerate(text.splitlines(), 1):
            if needle in line and not line.lstrip().startswith("#"):
                problems.append(f"line {number}: {line.strip()}")
    assert not problems, f"{path.relative_to(ROOT)}: {problems}"


# ---------------------------------------------------------------------------------------------
# Result store: crashes, damage, versions, keys

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_charts import make_trace
    from tracing import store

    mode, root, key, noise = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    fsyncs = {{"n": 0}}
    real_fsync, real_fdopen = os.fsync, os.fdopen

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def fsync(fd):
        fsyncs["n"] += 1
        if mode == "fsync-arrays" and fsyncs["n"] == 1 or mode == "fsync-meta" and fsyncs["n"] == 2:
            die()
        return real_fsync(fd)

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)
        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            die()
        def __getattr__(self, name):
            return getattr(self.handle, name)

    calls = {{"n": 0}}

    def fdopen(fd, *args, **kwargs):
        calls["n"] += 1
        handle = real_fdopen(fd, *args, **kwargs)
        if mode == "half-arrays" and calls["n"] == 1 or mode == "half-meta" and calls["n"] == 2:
            return HalfWriter(handle)
        return handle

    store.os.fsync = fsync
    store.os.fdopen = fdopen
    store.ResultStore(root).put(key, make_trace(noise=noise, seed=int(noise * 100)))
    print("finished")
""")


def _put_in_child(mode: str, root: Path, key: str, noise: float) -> subprocess.CompletedProcess:
    script = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"))
    return subprocess.run([sys.executable, "-c", script, mode, str(root), key, str(noise)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("mode", ["half-arrays", "fsync-arrays", "half-meta", "fsync-meta"])
def test_a_process_killed_mid_write_leaves_no_entry_that_is_read(tmp_path, mode, caplog):
    """SIGKILL while writing: a new entry is missing; an old entry is read whole or not at all."""
    old = make_trace(noise=0.3, seed=30)
    ResultStore(tmp_path).put(KEY_A, old)  # an entry that the killed process overwrites
    for key in (KEY_A, KEY_B):
        done = _put_in_child(mode, tmp_path, key, noise=0.9)
        assert done.returncode == -9 and "finished" not in done.stdout, (done.returncode, done.stderr[-2000:])
    leftovers = [p for p in stored_files(tmp_path) if p.name.endswith(".tmp")]
    assert leftovers, "the kill happened before anything was written: the test did not test"
    fresh = ResultStore(tmp_path)
    assert fresh.get(KEY_B) is None  # never written completely: missing
    got = fresh.get(KEY_A)
    if got is not None:  # the old entry, whole, never old metadata with new arrays
        assert_same_trace(got, old)
    if mode in ("half-arrays", "fsync-arrays"):  # nothing was renamed into place yet
        assert_same_trace(got, old)
    assert all(".tmp" not in k for k in fresh.keys())
    # the store writes over the leftovers as usual
    new = make_trace(noise=0.9, seed=90)
    fresh.put(KEY_B, new)
    assert_same_trace(ResultStore(tmp_path).get(KEY_B), new)


def _damage(kind: str, root: Path) -> None:
    meta_path, array_path = entry_paths(root, KEY_A)
    if kind == "empty arrays":
        array_path.write_bytes(b"")
    elif kind == "arrays of another entry":  # valid safetensors, wrong numbers
        shutil.copy(entry_paths(root, KEY_B)[1], array_path)
    elif kind == "empty metadata":
        meta_path.write_bytes(b"")
    elif kind == "binary metadata":
        meta_path.write_bytes(b"\x80\x04\x95garbage\xff\xfe")
    elif kind == "metadata without checksums":
        meta = json.loads(meta_path.read_text())
        del meta["trace_sha256"], meta["arrays_sha256"]
        meta_path.write_text(json.dumps(meta))
    else:
        raise AssertionError(kind)


# tests/test_store.py covers truncation, a missing arrays file, an edited value, "[]" and an
# entry copied from another key; these are the other ways an entry can be damaged.
DAMAGE = ["empty arrays", "arrays of another entry", "empty metadata", "binary metadata",
          "metadata without checksums"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_entries_are_detected_reported_and_treated_as_missing(tmp_path, caplog, kind):
    ResultStore(tmp_path).put(KEY_A, make_trace(noise=0.3))
    ResultStore(tmp_path).put(KEY_B, make_trace(noise=0.7, seed=7))
    _damage(kind, tmp_path)
    fresh = ResultStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tracing.store"):
        assert fresh.get(KEY_A) is None
    assert any(KEY_A in r.getMessage() for r in caplog.records), "the damage was not reported"
    assert_same_trace(fresh.get(KEY_B), make_trace(noise=0.7, seed=7))  # others unaffected


@pytest.mark.parametrize("kind", ["truncated arrays", "edited metadata"])
def test_a_batch_recomputes_a_damaged_entry(tiny, tmp_path, kind):
    """run_batch reads finished traces from the store; a damaged one is traced again, not used."""
    from tracing.batch import run_batch

    lm = tiny("llama")
    frame = pd.DataFrame([{"category": "semantic", "prompt": EIFFEL, "expected": " Paris",
                           "subject": "Eiffel Tower", "notes": "", "noised": None}])
    settings = {"samples": 1, "noise": 0.4}
    first = run_batch(lm, frame, settings, ResultStore(tmp_path))
    assert [r.status for r in first.results] == ["computed"]
    key = first.results[0].key
    again = run_batch(lm, frame, settings, ResultStore(tmp_path))
    assert [r.status for r in again.results] == ["stored"]
    meta_path, array_path = entry_paths(tmp_path, key)
    if kind == "truncated arrays":
        array_path.write_bytes(array_path.read_bytes()[:100])
    else:
        meta = json.loads(meta_path.read_text())
        meta["trace"]["metric_high"]["prob"] = 0.123
        meta_path.write_text(json.dumps(meta))
    redo = run_batch(lm, frame, settings, ResultStore(tmp_path))
    assert [r.status for r in redo.results] == ["computed"]
    assert_same_trace(redo.results[0].trace, first.results[0].trace)
    assert_same_trace(ResultStore(tmp_path).get(key), first.results[0].trace)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, str(FORMAT_VERSION), None])
def test_other_format_versions_are_not_misread(tmp_path, caplog, version):
    ResultStore(tmp_path).put(KEY_A, make_trace())
    meta_path = entry_paths(tmp_path, KEY_A)[0]
    meta = json.loads(meta_path.read_text())
    meta["format"] = version
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="tracing.store"):
        assert ResultStore(tmp_path).get(KEY_A) is None
    assert any("format" in r.getMessage() for r in caplog.records)


def test_the_format_version_is_part_of_the_key(tiny, monkeypatch):
    lm = tiny("gpt2")
    settings = {"noised": [1, 2, 3], "samples": 2}
    key = result_key(lm, EIFFEL, settings)
    monkeypatch.setattr(store_module, "FORMAT_VERSION", FORMAT_VERSION + 1)
    assert result_key(lm, EIFFEL, settings) != key


# tests/test_store.py tries "../", upper case, wrong lengths, non-hex, "" and None with get/put.
BAD_KEYS = ["/etc/passwd", "..", "a" * 58 + "/../..", "./" + "a" * 62, "a" * 65, "a" * 64 + "\n",
            "a" * 64 + "\x00", " " + "a" * 63, 123, b"a" * 64]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_keys_cannot_escape_the_store_folder(tmp_path, key):
    root = tmp_path / "store"
    store = ResultStore(root)
    for call in (lambda: store.put(key, make_trace()), lambda: store.get(key), lambda: store.delete(key)):
        with pytest.raises(ValueError, match="Invalid result key"):
            call()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "something was written"


def test_store_keys_lists_only_well_formed_entries(tmp_path):
    store = ResultStore(tmp_path)
    store.put(KEY_A, make_trace())
    (tmp_path / "aa" / "notes.json").write_text("{}")
    (tmp_path / "aa" / f".{KEY_B}.json.123.tmp").write_text("{}")
    assert list(store.keys()) == [KEY_A]


# ---------------------------------------------------------------------------------------------
# Safe loading


@pytest.fixture
def tiny_folder(tiny, tmp_path) -> Path:
    """A tiny llama saved in Hugging Face layout (safetensors) with the embedded tokenizer."""
    lm = tiny("llama")
    folder = tmp_path / "tiny-llama"
    lm.model.save_pretrained(folder)  # transformers 5 writes safetensors only
    lm.tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    return folder


def _logits(lm, text: str = EIFFEL) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        return lm.model(ids).logits


def test_load_model_never_trusts_remote_code_and_asks_for_safetensors(tiny, tiny_folder, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    seen: list[tuple[str, dict]] = []

    def spy(cls, name: str):
        original = getattr(cls, "from_pretrained")

        def wrapper(_cls, *args, **kwargs):
            seen.append((name, dict(kwargs)))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(wrapper))

    spy(AutoModelForCausalLM, "model")
    spy(AutoTokenizer, "tokenizer")
    spy(AutoConfig, "config")
    lm = tracing.load_model(str(tiny_folder))
    names = [name for name, _ in seen]
    assert "model" in names and "tokenizer" in names, names
    for name, kwargs in seen:
        assert kwargs.get("trust_remote_code", False) is False, (name, kwargs)
    model_kwargs = next(k for n, k in seen if n == "model")
    assert model_kwargs.get("trust_remote_code") is False  # said explicitly
    assert model_kwargs.get("use_safetensors") is True
    torch.testing.assert_close(_logits(lm), _logits(tiny("llama")), rtol=0, atol=0)


def test_a_folder_asking_for_remote_code_does_not_run_it(tiny_folder, tmp_path):
    marker = tmp_path / "REMOTE_CODE_RAN"
    (tiny_folder / "evil_model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaForCausalLM as EvilForCausalLM, LlamaConfig as EvilConfig\n")
    config = json.loads((tiny_folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig",
                          "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (tiny_folder / "config.json").write_text(json.dumps(config))
    try:
        lm = tracing.load_model(str(tiny_folder))
    except tracing.ModelLoadError:
        lm = None
    assert not marker.exists(), "the folder's Python code was run"
    if lm is not None:
        assert type(lm.model).__module__.startswith("transformers.")


def test_pickle_checkpoints_need_an_explicit_opt_in(tiny, tiny_folder):
    from safetensors.torch import load_file

    weights = load_file(str(tiny_folder / "model.safetensors"))
    (tiny_folder / "model.safetensors").unlink()
    torch.save(weights, tiny_folder / "pytorch_model.bin")  # the test writes a pickle; the app never
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(tracing.ModelLoadError, match="allow_pickle"):
            tracing.load_model(str(tiny_folder))
    assert not [w for w in caught if "pickle" in str(w.message).lower()]  # not even tried
    with pytest.warns(UserWarning, match="pickle"):
        lm = tracing.load_model(str(tiny_folder), allow_pickle=True)
    torch.testing.assert_close(_logits(lm), _logits(tiny("llama")), rtol=0, atol=0)


@pytest.mark.parametrize("payload", ["weights", "code"])
def test_a_config_naming_a_pickle_file_is_refused_without_opt_in(tiny_folder, tmp_path, payload):
    """config.json may name its weights file (``transformers_weights``); transformers then reads
    that file even with use_safetensors=True. A pickle named there must be refused as well."""
    from safetensors.torch import load_file

    marker = tmp_path / "PICKLE_CODE_RAN"
    weights = load_file(str(tiny_folder / "model.safetensors"))
    (tiny_folder / "model.safetensors").unlink()
    if payload == "weights":
        torch.save(weights, tiny_folder / "adapter_model.bin")
    else:
        class Evil:
            def __reduce__(self):
                return (Path.touch, (marker,))
        (tiny_folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    config = json.loads((tiny_folder / "config.json").read_text())
    config["transformers_weights"] = "adapter_model.bin"
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(tracing.ModelLoadError, match="allow_pickle"):
        tracing.load_model(str(tiny_folder))
    assert not marker.exists()


@pytest.mark.slow
def test_the_converted_embedded_model_is_safetensors_and_json_only(embedded):
    from tracing.model.loading import _converted_gguf_folder, embedded_gguf_path

    folder = _converted_gguf_folder(embedded_gguf_path())
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "model.safetensors") in files
    for path in files:
        data = path.read_bytes()
        assert_not_pickle(path, data)
        if path.suffix == ".safetensors":
            check_safetensors(data)
        elif path.suffix == ".json":
            json.loads(data)
        else:
            assert path.suffix in (".jinja", ".txt", ".model"), path


# ---------------------------------------------------------------------------------------------
# Server configuration and uploads


def _config() -> dict:
    return tomllib.loads(CONFIG.read_text(encoding="utf-8"))


def test_server_binds_localhost_and_keeps_its_protections():
    server = _config()["server"]
    assert server["address"] == "127.0.0.1"
    assert server.get("enableXsrfProtection", True) is True
    assert server.get("enableCORS", True) is True
    assert _config().get("browser", {}).get("gatherUsageStats") is False
    assert not _config().get("global", {}).get("developmentMode", False)


def _uploaders() -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(PAGES_DIR.glob("*.py")):
        for call in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            if _dotted(call.func).endswith("file_uploader"):
                found.append((path.name, call))
    return found


def test_uploads_are_capped_and_typed():
    limit_mb = _config()["server"]["maxUploadSize"]
    assert isinstance(limit_mb, int) and 1 <= limit_mb <= 50, limit_mb
    uploaders = _uploaders()
    assert uploaders, f"no file_uploader found in {PAGES_DIR.name}/"
    for page, call in uploaders:
        keywords = {kw.arg for kw in call.keywords}
        assert "type" in keywords, f"{page} line {call.lineno}: file_uploader without type="
    from tracing import prompts

    assert prompts.MAX_BYTES <= limit_mb * 1_000_000
    with pytest.raises(prompts.PromptSetError, match="larger than"):
        prompts.load_prompt_set(b"category,prompt,expected,subject\n" + b"x" * prompts.MAX_BYTES)


def test_upload_cap_constants_of_the_pages():
    """Per-file caps inside the pages are no larger than the server's cap."""
    limit = _config()["server"]["maxUploadSize"] * 1_000_000
    for path in sorted(PAGES_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                if name.startswith("MAX_") and name.endswith("BYTES"):
                    value = eval(compile(ast.Expression(node.value), str(path), "eval"),
                                 {"__builtins__": {}})  # constant arithmetic only
                    assert value <= limit, f"{path.name}: {name} = {value} is above maxUploadSize"


@pytest.mark.slow
def test_the_running_server_listens_on_loopback_only():
    psutil = pytest.importorskip("psutil")
    from browser import AppServer, http_get

    with AppServer("security_server") as server:
        status, _ = http_get(f"{server.url}/_stcore/health")
        assert status == 200
        listening = [c for c in psutil.Process(server.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening, "the server listens nowhere?"
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
