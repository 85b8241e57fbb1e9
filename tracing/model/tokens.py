"""Prompt tokens: checked tokenization, answer tokens and subject positions (one rule for all)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from .loading import LoadedModel


def tokenize(lm: "LoadedModel", prompt: str) -> list[int]:
    """Token ids of a prompt (the tokenizer's default special tokens), with clear errors for
    an empty prompt or one longer than the model's context."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("The prompt is empty.")
    ids = [int(i) for i in lm.tokenizer(prompt)["input_ids"]]
    if not ids:
        raise ValueError("The prompt tokenizes to nothing.")
    if len(ids) > lm.n_ctx:
        raise ValueError(
            f"The prompt has {len(ids)} tokens, more than the model's context of {lm.n_ctx}."
        )
    return ids


def token_strings(lm: "LoadedModel", ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own."""
    return [lm.tokenizer.decode([int(i)]) for i in ids]


def completion_token(lm: "LoadedModel", prompt: str | None, completion: str, what: str = "completion") -> int:
    """The first token of ``completion`` as tokenized right after ``prompt`` (include its leading
    space, e.g. " Paris"); the completion tokenized alone when the two merge across the boundary."""
    if not isinstance(completion, str) or completion == "":
        raise ValueError(f"The {what} is empty.")
    if prompt:
        prompt_ids = lm.tokenizer(prompt)["input_ids"]
        full = lm.tokenizer(prompt + completion)["input_ids"]
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return int(full[len(prompt_ids)])
    alone = lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not alone:
        raise ValueError(f"The {what} '{completion}' tokenizes to nothing.")
    return int(alone[0])


def spacing_hint(lm: "LoadedModel", prompt: str | None, completion: str) -> str | None:
    """The spaced form of a completion typed without its leading space (``"Beijing"`` ->
    ``" Beijing"``) when the two start with different tokens (the unspaced one is usually a piece of
    a word, such as "Be"); None when the completion is fine as typed."""
    if not isinstance(completion, str) or not completion.strip() or completion[0].isspace():
        return None
    if prompt and prompt[-1].isspace():
        return None
    spaced = " " + completion
    try:
        differs = completion_token(lm, prompt, completion) != completion_token(lm, prompt, spaced)
    except ValueError:
        return None
    return spaced if differs else None


def answer_token(lm: "LoadedModel", answer: int | str, what: str = "target", prompt: str | None = None) -> int:
    """A token id from an id, or from a completion string (its first token after ``prompt``)."""
    vocab = lm.model.get_submodule(lm.adapter.unembed).weight.shape[0]
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        if not 0 <= int(answer) < vocab:
            raise ValueError(f"The {what} token id {answer} is outside the vocabulary (0..{vocab - 1}).")
        return int(answer)
    if isinstance(answer, str):
        return completion_token(lm, prompt, answer, what)
    raise ValueError(f"The {what} must be a token id or a completion string, not {type(answer).__name__}.")


def resolve_positions(positions: Sequence[int], n_tokens: int, what: str = "token position") -> list[int]:
    """Absolute positions, in the order given; negative ones count from the end (-1 = the final
    token). ValueError for none, non-integers or positions outside the prompt."""
    if len(positions) == 0:
        raise ValueError(f"No {what}s given: pick at least one.")
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
            raise ValueError(f"{what.capitalize()}s must be integers, not {p!r}.")
        q = int(p) + n_tokens if p < 0 else int(p)
        if not 0 <= q < n_tokens:
            raise ValueError(f"{what.capitalize()} {int(p)} is out of range: the prompt has {n_tokens} tokens.")
        out.append(q)
    return out


def token_spans(lm: "LoadedModel", prompt: str, ids: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Character span of each token (offsets if the tokenizer has them, else prefix decoding)."""
    ids = list(ids) if ids is not None else tokenize(lm, prompt)
    try:
        offsets = lm.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == len(ids):
            return [(int(a), int(b)) for a, b in offsets]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass
    spans, previous = [], 0
    for i in range(len(ids)):
        length = len(lm.tokenizer.decode(ids[: i + 1]))
        spans.append((previous, length))
        previous = length
    return spans


def subject_positions(lm: "LoadedModel", prompt: str, subject: str, which: str = "all") -> list[int]:
    """Indices of the tokens covering the first occurrence of ``subject`` in ``prompt``.

    ``which="last"`` returns only the last of them (the seed study's single noised token).
    """
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("The subject is empty.")
    if which not in ("all", "last"):
        raise ValueError("which must be 'all' or 'last'.")
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"'{subject}' does not occur in the prompt.")
    stripped = subject.strip()
    start += subject.find(stripped)
    end = start + len(stripped)
    spans = token_spans(lm, prompt)
    positions = [i for i, (a, b) in enumerate(spans) if a < end and b > start and b > a]
    if not positions:
        raise ValueError(f"'{subject}' covers no whole token of the prompt.")
    return positions[-1:] if which == "last" else positions
