"""The library installs as a package, not only from the source tree: the wheel holds every
subpackage's modules and the shipped prompt sets (as ``tracing/prompt_sets/``), and an installed
copy, away from the checkout, finds those prompt sets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for pattern in ("*.csv", "*.txt") for p in (ROOT / "prompts").glob(pattern))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the project (so the build leaves nothing in the checkout),
    offline: no build isolation, the venv's setuptools."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("tracing", "prompts"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = base / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out)],
        cwd=base, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(out.glob("causal_tracing-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_holds_every_module_and_the_shipped_prompt_sets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tracing").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert {"tracing/__init__.py", "tracing/model/__init__.py", "tracing/charts/__init__.py"} <= modules
    assert modules <= names, sorted(modules - names)
    packaged = {n for n in names if n.endswith(".py")}
    assert packaged == modules, sorted(packaged - modules)  # nothing else (no app, pages, tests)
    assert {"default.csv", "quick.csv", "long_text_default.txt"} <= set(SHIPPED)
    assert {"tracing/charts/fonts/DejaVuSans.ttf", "tracing/charts/fonts/LICENSE.txt"} <= set(names)  # exports' font
    data = {n.removeprefix("tracing/prompt_sets/") for n in names if n.startswith("tracing/prompt_sets/")}
    assert data == set(SHIPPED)
    for name in SHIPPED:  # byte for byte the checkout's files
        assert zipfile.ZipFile(wheel).read(f"tracing/prompt_sets/{name}") == (ROOT / "prompts" / name).read_bytes()


CHECK = """
import json, sys
import tracing, tracing.model.loading, tracing.charts.trace, tracing.charts.averages
from tracing import prompts
frame = prompts.load_prompt_set()
print(json.dumps({
    "tracing": tracing.__file__,
    "prompts_dir": str(prompts.PROMPTS_DIR),
    "shipped": {name: str(path) for name, path in prompts.shipped_sets().items()},
    "default": frame["prompt"].tolist(),
    "categories": sorted(set(frame["category"])),
    "long_text": prompts.LONG_TEXT.is_file(),
}))
"""


def test_installed_copy_finds_the_shipped_prompt_sets(wheel, tmp_path):
    """The wheel unpacked into a folder on PYTHONPATH (the venv supplies the dependencies), run
    from another folder: the library and its prompt sets come from the installed copy."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=elsewhere, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    installed = (site / "tracing").resolve()
    assert Path(got["tracing"]).resolve() == installed / "__init__.py"
    assert Path(got["prompts_dir"]).resolve() == installed / "prompt_sets"
    assert list(got["shipped"]) == ["default", "facts", "quick"]  # default first
    assert all(Path(p).resolve().parent == installed / "prompt_sets" for p in got["shipped"].values())
    assert got["long_text"]
    # the default set as read from the checkout by this process
    from tracing.prompts import load_prompt_set

    want = load_prompt_set(ROOT / "prompts" / "default.csv")
    assert got["default"] == want["prompt"].tolist() and len(got["default"]) == 54
    assert got["categories"] == ["non_english", "plain_english", "semantic"]
