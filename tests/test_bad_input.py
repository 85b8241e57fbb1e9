"""Bad input that used to slip through (issue 12, item 14): each gets a clear message."""

from __future__ import annotations

import pytest

import tracing
from tracing.hidden import MAX_LENS_K, logit_lens
from tracing.model.tokens import spacing_hint


@pytest.mark.parametrize("name", ["x" * 5000, "b" * 300, "/" + "c" * 300 + "/model.gguf", "gpt2\x00"])
def test_model_names_too_long_or_odd_get_the_model_name_message(name):
    with pytest.raises(tracing.ModelLoadError) as caught:
        tracing.load_model(name)
    message = str(caught.value)
    assert "not a model name" in message and "hub id" in message
    assert len(message) < 400  # the name is cut, not echoed whole


@pytest.mark.parametrize("k", [0, -1, MAX_LENS_K + 1, 1_000_000, 2.5, True])
def test_logit_lens_refuses_a_top_k_no_one_can_read(embedded, k):
    with pytest.raises(ValueError, match=f"1 to {MAX_LENS_K} top tokens"):
        logit_lens(embedded, "The Eiffel Tower is in", k=k)


def test_logit_lens_takes_the_largest_readable_k(embedded):
    lens = logit_lens(embedded, "The Eiffel Tower is in", k=MAX_LENS_K)
    assert lens.top_ids.shape[-1] == MAX_LENS_K


def test_a_completion_without_its_leading_space_gets_the_spaced_form(embedded):
    prompt = "The capital of China is"
    assert spacing_hint(embedded, prompt, "Beijing") == " Beijing"
    assert spacing_hint(embedded, prompt, " Beijing") is None  # already spaced
    assert spacing_hint(embedded, prompt + " ", "Beijing") is None  # the prompt ends with the space
    assert spacing_hint(embedded, prompt, "") is None and spacing_hint(embedded, prompt, "   ") is None
