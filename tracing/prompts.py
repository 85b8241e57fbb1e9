"""Prompt sets: the CSV format, loading with line-numbered errors, constraint checks, saving.

File format
-----------
A UTF-8 CSV file with a header row. Columns (any order, header names case-insensitive):

=============  ========  ===================================================================
column         required  meaning
=============  ========  ===================================================================
``category``   yes       ``non_english`` (non-English regurgitation: digits, URLs, code, Latin...),
                         ``plain_english`` (plain-English regurgitation: set phrases) or
                         ``semantic`` (fact recall). The display names ("Semantic recall") and
                         spellings with spaces or hyphens are accepted too.
``prompt``     yes       the prompt text, exactly as fed to the model.
``expected``   yes       the exact text that follows the prompt, *including* its leading space
                         when there is one (quote the field: ``" Cardiff"``). Only its first
                         token matters: it is the traced target.
``subject``    yes       the text whose **last token** is noised (first occurrence in the prompt).
``notes``      no        free text.
``noised``     no        explicit token indices to noise instead (``"3"`` or ``"3 4"``); leave
                         empty to use the subject.
``model_top1`` no        ``true``/``false``: whether the embedded model (SmolLM2-135M-Instruct)
                         ranks the expected first token top-1 on the clean prompt.
=============  ========  ===================================================================

Blank lines are skipped. A malformed file (missing column, wrong number of fields, unknown
category, empty prompt or expected, more than ``MAX_PROMPTS`` rows) raises ``PromptSetError``
listing every problem with its line number. Prompts that break one of the study's constraints
(the subject is missing from the prompt, the first or the last token would be noised, a
duplicate) are kept and described in the ``problems`` column ("" when fine).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable

import pandas as pd

from .categories import CATEGORIES
from .model import tokens
from .model.runner import Runner

if TYPE_CHECKING:
    from .model import LoadedModel

COLUMNS = ("category", "prompt", "expected", "subject", "notes")
REQUIRED = ("category", "prompt", "expected", "subject")
OPTIONAL = ("notes", "noised", "model_top1")
FRAME_COLUMNS = COLUMNS + ("noised", "model_top1", "problems")


def _prompts_dir() -> Path:
    """The shipped prompt sets: ``prompts/`` beside the package in a checkout (or an editable
    install), ``tracing/prompt_sets/`` when installed from a wheel (pyproject maps one to the
    other)."""
    checkout = Path(__file__).resolve().parent.parent / "prompts"
    return checkout if (checkout / "default.csv").is_file() else Path(__file__).resolve().parent / "prompt_sets"


PROMPTS_DIR = _prompts_dir()
DEFAULT_SET = PROMPTS_DIR / "default.csv"
LONG_TEXT = PROMPTS_DIR / "long_text_default.txt"  # the attention page's default long text
MAX_PROMPTS = 2000
MAX_BYTES = 1_000_000
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}


class PromptSetError(ValueError):
    """A malformed prompt-set file. ``errors`` holds (line number, message) pairs."""

    def __init__(self, errors: list[tuple[int, str]], source: str = "prompt set") -> None:
        self.errors = errors
        shown = "; ".join(f"line {line}: {msg}" if line else msg for line, msg in errors[:20])
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        super().__init__(f"{source}: {shown}{more}")


def shipped_sets() -> dict[str, Path]:
    """The prompt sets shipped in ``prompts/``: name -> path (``default`` first)."""
    paths = sorted(PROMPTS_DIR.glob("*.csv"), key=lambda p: (p.stem != "default", p.stem))
    return {p.stem: p for p in paths}


def normalise_category(value: str) -> str | None:
    """The category key for a key, a display name or a loose spelling; None if unknown."""
    text = re.sub(r"[\s\-]+", "_", str(value).strip().lower())
    if text in CATEGORIES:
        return text
    for key, label in CATEGORIES.items():
        if text == re.sub(r"[\s\-]+", "_", label.lower()):
            return key
    return None


def _parse_bool(value: str) -> bool | None:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in ("", "nan", "none", "<na>"):
        return None
    raise ValueError(f"model_top1 must be true or false, not '{value}'")


def _parse_noised(value: str) -> list[int] | None:
    text = str(value).strip()
    if text in ("", "nan", "none"):
        return None
    parts = [p for p in re.split(r"[\s;,]+", text.strip("[]")) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"noised must be token indices such as '3' or '3 4', not '{value}'") from None


def _read_text(source: Any) -> tuple[str, str]:
    """(text, name) from a path, bytes, str content wrapper or binary/text file object."""
    if source is None:
        source = DEFAULT_SET
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise PromptSetError([(0, f"no such file: {path}")], str(path))
        if path.stat().st_size > MAX_BYTES:
            raise PromptSetError([(0, f"file is larger than {MAX_BYTES // 1000} kB")], path.name)
        return _decode(path.read_bytes(), path.name), path.name
    if isinstance(source, bytes):
        return _decode(source, "upload"), "upload"
    name = getattr(source, "name", "upload")
    data = source.read()
    return (_decode(data, name) if isinstance(data, bytes) else data), name


def _decode(data: bytes, name: str) -> str:
    if len(data) > MAX_BYTES:
        raise PromptSetError([(0, f"file is larger than {MAX_BYTES // 1000} kB")], name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptSetError([(0, f"not UTF-8 text ({exc.reason} at byte {exc.start})")], name) from None


def load_prompt_set(path: str | os.PathLike | bytes | BinaryIO | None = None, lm: "LoadedModel | None" = None) -> pd.DataFrame:
    """Load a prompt set (None: the shipped ``prompts/default.csv``) into a DataFrame.

    Columns: ``category, prompt, expected, subject, notes, noised, model_top1, problems``.
    With a loaded model ``lm``, token-level constraints are checked as well.
    Raises ``PromptSetError`` (a ValueError) with line numbers for a malformed file.
    """
    text, name = _read_text(path)
    return parse_prompt_set(text, source=name, lm=lm)


def _header(row: list[str], source: str) -> list[str]:
    header = [h.strip().lower().lstrip("\ufeff") for h in row]
    errors = [(1, f"missing column '{c}'") for c in REQUIRED if c not in header]
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    errors += [(1, f"column '{h}' appears twice") for h in dupes]
    if errors:
        required, optional = ", ".join(REQUIRED), ", ".join(OPTIONAL)
        raise PromptSetError(errors + [(0, f"the header must contain {required} "
                                           f"(optional: {optional})")], source)
    return header


def _records(text: str, source: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and (first line number, fields) of every non-blank row."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    previous = 0
    try:
        for fields in reader:
            start, previous = previous + 1, reader.line_num
            if fields and any(f.strip() for f in fields):
                rows.append((start, fields))
    except csv.Error as exc:
        raise PromptSetError([(reader.line_num, f"not valid CSV ({exc})")], source) from None
    if not rows:
        raise PromptSetError([(0, "the file is empty (it needs a header row and prompts)")], source)
    (_, header_row), body = rows[0], rows[1:]
    header = _header(header_row, source)
    if not body:
        raise PromptSetError([(0, "the file has a header but no prompts")], source)
    if len(body) > MAX_PROMPTS:
        raise PromptSetError([(0, f"{len(body)} prompts: at most {MAX_PROMPTS} are allowed")], source)
    return header, body


def _row(line: int, header: list[str], fields: list[str]) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """One parsed row and its errors."""
    if len(fields) != len(header):
        return {}, [(line, f"{len(fields)} fields, the header has {len(header)} (quote fields that contain commas)")]
    raw = {h: f for h, f in zip(header, fields) if h}
    row: dict[str, Any] = {c: raw.get(c, "") for c in COLUMNS}
    errors: list[tuple[int, str]] = []
    category = normalise_category(row["category"])
    if category is None:
        errors.append((line, f"unknown category '{row['category']}' (use {', '.join(CATEGORIES)})"))
    row["category"] = category
    for column in ("prompt", "expected"):
        if not row[column].strip():
            errors.append((line, f"empty {column}"))
    for column, parse in (("noised", _parse_noised), ("model_top1", _parse_bool)):
        try:
            row[column] = parse(raw.get(column, ""))
        except ValueError as exc:
            errors.append((line, str(exc)))
    return row, errors


def parse_prompt_set(text: str, source: str = "prompt set", lm: "LoadedModel | None" = None) -> pd.DataFrame:
    """Parse CSV text in the prompt-set format (see the module docstring)."""
    header, body = _records(text, source)
    rows, lines, errors = [], [], []
    for line, fields in body:
        row, row_errors = _row(line, header, fields)
        errors += row_errors
        rows.append(row)
        lines.append(line)
    if errors:
        raise PromptSetError(errors, source)
    frame = pd.DataFrame(rows, columns=list(FRAME_COLUMNS[:-1]))
    frame["model_top1"] = frame["model_top1"].astype("boolean")
    frame["problems"] = find_problems(frame, lm=lm, lines=lines)
    return frame


def find_problems(frame: pd.DataFrame, lm: "LoadedModel | None" = None, lines: list[int] | None = None) -> list[str]:
    """For each row, "" or a description of the study's constraints it breaks."""
    lines = lines or [i + 2 for i in range(len(frame))]
    seen: dict[tuple[str, ...], int] = {}
    out = []
    for line, row in zip(lines, frame.itertuples(index=False)):
        problems = _text_problems(row)
        key = (row.category, row.prompt, row.expected, row.subject, str(getattr(row, "noised", None)))
        if key in seen:
            problems.append(f"duplicate of line {seen[key]}")
        seen.setdefault(key, line)
        if lm is not None and not problems:
            problems += _token_problems(lm, row)
        out.append("; ".join(problems))
    return out


def _noised_given(row) -> bool:
    noised = getattr(row, "noised", None)
    return isinstance(noised, list) and len(noised) > 0


def _text_problems(row) -> list[str]:
    if _noised_given(row):
        return []
    subject = str(row.subject or "")
    if not subject.strip():
        return ["no subject: nothing to noise"]
    if subject not in row.prompt:
        return [f"subject '{subject}' is not in the prompt"]
    if not row.prompt[row.prompt.find(subject) + len(subject) :].strip():
        return ["the subject ends the prompt: the last token would be noised"]
    return []


def _token_problems(lm: "LoadedModel", row) -> list[str]:
    try:
        positions = resolve_noised(lm, row.prompt, row.subject, getattr(row, "noised", None))
        n_tokens = len(tokens.tokenize(lm, row.prompt))
        expected_token_id(lm, row.prompt, row.expected)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    if 0 in positions:
        problems.append("the first token would be noised")
    if n_tokens - 1 in positions:
        problems.append("the last token would be noised")
    return problems


def noised_positions(lm: "LoadedModel", prompt: str, subject: str) -> list[int]:
    """The token(s) the study noises: the last token of the subject's first occurrence."""
    return tokens.subject_positions(lm, prompt, subject, "last")


def resolve_noised(lm: "LoadedModel", prompt: str, subject: str, noised: Iterable[int] | None = None) -> list[int]:
    """Explicit ``noised`` indices (negative ones count from the end) or the subject's last token."""
    if isinstance(noised, str):
        noised = _parse_noised(noised)
    elif noised is not None and not isinstance(noised, (list, tuple)) and pd.isna(noised):
        noised = None
    if not noised:
        return noised_positions(lm, prompt, str(subject or ""))
    n = len(tokens.tokenize(lm, prompt))
    positions = sorted({i + n if i < 0 else i for i in (int(x) for x in noised)})
    bad = [i for i in positions if not 0 <= i < n]
    if bad:
        raise ValueError(f"noised index {bad[0]} is out of range (the prompt has {n} tokens)")
    return positions


def expected_token_id(lm: "LoadedModel", prompt: str, expected: str) -> int:
    """The first token of ``expected`` as it is tokenized after ``prompt`` (the traced target)."""
    return tokens.completion_token(lm, prompt, expected, "expected completion")


def model_top1(lm: "LoadedModel", frame: pd.DataFrame) -> pd.DataFrame:
    """Clean next-token prediction for each prompt: columns ``top1`` (token), ``top1_prob``,
    ``expected_prob`` and ``correct`` (top-1 == expected first token)."""
    import torch

    rows, runner = [], Runner(lm)
    for prompt, expected in zip(frame["prompt"], frame["expected"]):
        ids = torch.tensor([tokens.tokenize(lm, prompt)], device=lm.device)
        target = expected_token_id(lm, prompt, expected)
        with torch.inference_mode():
            probs = runner.logits(runner.hidden_states(ids)[-1][0, -1]).softmax(-1)
        top = int(probs.argmax())
        rows.append(
            {
                "top1": lm.tokenizer.decode([top]),
                "top1_prob": float(probs[top]),
                "expected_prob": float(probs[target]),
                "correct": top == target,
            }
        )
    return pd.DataFrame(rows, index=frame.index)


def prompt_set_to_csv(frame: pd.DataFrame) -> str:
    """CSV text of a prompt set (the derived ``problems`` column is not written)."""
    columns = list(COLUMNS) + [c for c in ("noised", "model_top1") if c in frame and frame[c].notna().any()]
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(columns)
    for row in frame.to_dict("records"):
        writer.writerow([_cell(column, row.get(column)) for column in columns])
    return buf.getvalue()


def _cell(column: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(int(v)) for v in value)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if column == "model_top1":
        return "true" if bool(value) else "false"
    return str(value)


def save_prompt_set(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a prompt set to ``path`` atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(prompt_set_to_csv(frame), encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_prompt_set(frame: pd.DataFrame, lm: "LoadedModel | None" = None) -> pd.DataFrame:
    """Re-validate an edited DataFrame (e.g. from a table editor); line numbers refer to its CSV."""
    return parse_prompt_set(prompt_set_to_csv(frame), source="edited set", lm=lm)
