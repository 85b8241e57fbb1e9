"""Prompt sets: the shipped set, parsing good and malformed files, constraint flags, saving."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from tracing.prompts import (
    CATEGORIES,
    MAX_BYTES,
    MAX_PROMPTS,
    PromptSetError,
    check_prompt_set,
    expected_token_id,
    load_prompt_set,
    model_top1,
    noised_positions,
    parse_prompt_set,
    prompt_set_to_csv,
    save_prompt_set,
    shipped_sets,
)

HEADER = "category,prompt,expected,subject,notes\n"


def parse(body: str, header: str = HEADER, **kw) -> pd.DataFrame:
    return parse_prompt_set(header + body, **kw)


def error_of(text: str) -> PromptSetError:
    with pytest.raises(PromptSetError) as info:
        parse_prompt_set(text)
    return info.value


# -- the shipped sets ----------------------------------------------------------------------------


def test_shipped_set_size_and_categories():
    frame = load_prompt_set()
    assert len(frame) >= 45
    counts = frame["category"].value_counts()
    assert set(counts.index) == set(CATEGORIES)
    assert (counts >= 15).all()
    assert list(frame.columns[:6]) == ["category", "prompt", "expected", "subject", "notes", "noised"]
    assert "problems" in frame and (frame["problems"] == "").all()
    assert frame["model_top1"].notna().all()
    assert frame["model_top1"].mean() >= 0.8  # most of the set is right on the embedded model
    assert not frame.duplicated(["prompt", "expected"]).any()


def test_shipped_set_has_gpt2_prompts_from_the_seed():
    frame = load_prompt_set()
    pairs = set(zip(frame["prompt"], frame["expected"]))
    assert ("From Wikipedia, the free", " encyclopedia") in pairs
    assert ("The capital city of Wales is called", " Cardiff") in pairs
    assert any(p.endswith(".co.") and e == "uk" for p, e in pairs)


def test_shipped_sets_listed_default_first():
    sets = shipped_sets()
    assert list(sets)[0] == "default" and "quick" in sets
    quick = load_prompt_set(sets["quick"])
    assert set(quick["category"]) == set(CATEGORIES)


# -- parsing -------------------------------------------------------------------------------------


def test_parse_keeps_leading_spaces_quotes_and_aliases():
    frame = parse(
        'semantic,"The capital of France is"," Paris",France,capital\n'
        '"Non-English regurgitation","a, b, c,"," d",b,"comma, inside"\n'
        'Plain English,Once upon a, time,upon,\n'
    )
    assert list(frame["category"]) == ["semantic", "non_english", "plain_english"]
    assert list(frame["expected"]) == [" Paris", " d", " time"]
    assert frame.loc[1, "prompt"] == "a, b, c,"
    assert frame.loc[1, "notes"] == "comma, inside"
    assert (frame["problems"] == "").all()
    assert frame["model_top1"].isna().all()


def test_optional_columns_any_order_and_bom():
    text = "\ufeffPrompt,Category,Expected,Subject,model_top1,noised\nOnce upon a,plain_english, time,upon,yes,1\n"
    frame = parse_prompt_set(text)
    assert frame.loc[0, "notes"] == ""
    assert bool(frame.loc[0, "model_top1"]) is True
    assert frame.loc[0, "noised"] == [1]


def test_blank_lines_skipped_and_multiline_field_line_numbers():
    text = HEADER + "\n" + 'semantic,"two\nlines",x,two,\n' + "\n" + "bogus,p,e,p,\n"
    err = error_of(text)
    # header line 1, blank line 2, the quoted field spans lines 3-4, blank 5, bad row on line 6
    assert err.errors == [(6, "unknown category 'bogus' (use non_english, plain_english, semantic)")]
    assert "line 6" in str(err)


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("category,prompt,subject\nsemantic,a,a\n", 1, "missing column 'expected'"),
        ("category,prompt,expected,subject,subject\n", 1, "appears twice"),
        (HEADER + "semantic,a b,c,a\n", 2, "4 fields, the header has 5"),
        (HEADER + "semantic,a b, c,a,\nsemantic,x y,z,x,,extra\n", 3, "6 fields"),
        (HEADER + "semantic,,x,a,\n", 2, "empty prompt"),
        (HEADER + "semantic,a b,,a,\n", 2, "empty expected"),
        (HEADER + "trivia,a b,c,a,\n", 2, "unknown category 'trivia'"),
        ("category,prompt,expected,subject,model_top1\nsemantic,a b,c,a,maybe\n", 2, "model_top1"),
        ("category,prompt,expected,subject,noised\nsemantic,a b,c,a,first\n", 2, "noised must be"),
    ],
)
def test_malformed_rows_name_their_line(text, line, fragment):
    err = error_of(text)
    assert isinstance(err, ValueError)
    assert any(ln == line and fragment in msg for ln, msg in err.errors), err.errors
    assert f"line {line}" in str(err)


def test_every_bad_row_is_reported():
    err = error_of(HEADER + "semantic,,x,a,\nfoo,a b,c,a,\nsemantic,ok,c,ok,\nsemantic,a b,,a,\n")
    assert [line for line, _ in err.errors] == [2, 3, 5]


@pytest.mark.parametrize("text", ["", "\n\n", HEADER])
def test_empty_files(text):
    assert error_of(text).errors[0][0] == 0


def test_too_many_rows_and_not_utf8(tmp_path):
    rows = "".join(f"semantic,p{i} x,y,x,\n" for i in range(MAX_PROMPTS + 1))
    assert "at most" in str(error_of(HEADER + rows))
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "semantic,caf\xe9 x,y,x,\n").encode("latin-1"))
    with pytest.raises(PromptSetError, match="not UTF-8"):
        load_prompt_set(path)
    with pytest.raises(PromptSetError, match="no such file"):
        load_prompt_set(tmp_path / "missing.csv")


def test_load_accepts_bytes_and_file_objects(tmp_path):
    import io

    data = (HEADER + "semantic,The capital of France is, Paris,France,\n").encode()
    assert load_prompt_set(data).loc[0, "expected"] == " Paris"
    assert load_prompt_set(io.BytesIO(data)).loc[0, "subject"] == "France"


# Other ways a prompt file can be wrong (four columns, no notes).
FOUR = "category,prompt,expected,subject\n"


@pytest.mark.parametrize("text, message", [
    (FOUR + 'semantic,"The Eiffel, Paris,x\n', "line 2: 2 fields"),  # an unclosed quote
    (FOUR + "semantic,a b, c,a\n" + "semantic,a b, c\n" * 2, "line 3: 3 fields"),
    ("Category , PROMPT,Expected,subject\nSemantic recall,a b, c,a\n", None),  # loose spellings are fine
])
def test_prompt_file_errors_name_the_file_and_line(text, message):
    if message is None:
        assert parse_prompt_set(text, source="mine.csv")["category"].tolist() == ["semantic"]
        return
    with pytest.raises(PromptSetError) as info:
        parse_prompt_set(text, source="mine.csv")
    assert str(info.value).startswith("mine.csv: ") and message in str(info.value), str(info.value)


def test_missing_column_message_lists_only_required_columns_as_required():
    message = str(error_of("category,prompt,subject\nsemantic,a b,a\n"))
    assert "line 1: missing column 'expected'" in message
    assert "the header must contain category, prompt, expected, subject (optional: notes, noised, " \
           "model_top1)" in message, message
    assert "missing column 'notes'" not in message
    required = message.split("must contain ")[1].split(" (optional")[0]
    assert "notes" not in required  # issue 12 item 12: notes is optional


def test_many_problems_are_listed_with_a_count():
    text = FOUR + "".join(f"bogus{i},a b, c,a\n" for i in range(25))
    with pytest.raises(PromptSetError) as info:
        parse_prompt_set(text)
    assert len(info.value.errors) == 25
    assert "line 2: unknown category 'bogus0'" in str(info.value) and "(and 5 more)" in str(info.value)
    assert "bogus24" not in str(info.value)  # the message stays readable


@pytest.mark.parametrize("source, message", [
    (b"\xff\xfe" + FOUR.encode("utf-16-le"), "not UTF-8"),  # a UTF-16 export
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),  # a picture uploaded by mistake
    (FOUR.encode() + b"x" * MAX_BYTES, "larger than"),
])
def test_unreadable_prompt_uploads(source, message):
    for given in (source, io.BytesIO(source)):
        with pytest.raises(PromptSetError, match=message):
            load_prompt_set(given)


def test_prompt_file_that_is_a_folder_or_too_large(tmp_path):
    with pytest.raises(PromptSetError, match="no such file"):
        load_prompt_set(tmp_path)
    big = tmp_path / "big.csv"
    big.write_bytes(FOUR.encode() + b"semantic,a b, c,a\n" * (MAX_BYTES // 10))
    with pytest.raises(PromptSetError, match="larger than"):
        load_prompt_set(big)


def test_constraint_breaks_are_flagged_not_dropped():
    frame = parse(
        "semantic,The capital of France is, Paris,Germany,\n"  # subject missing
        "semantic,The capital of France, is,France,\n"  # subject ends the prompt
        "semantic,The capital of France is, Paris,,\n"  # no subject
        "semantic,The capital of France is, Paris,France,\n"  # fine
        "semantic,The capital of France is, Paris,France,again\n"  # duplicate of line 5
    )
    assert len(frame) == 5
    problems = list(frame["problems"])
    assert "not in the prompt" in problems[0]
    assert "last token" in problems[1]
    assert "no subject" in problems[2]
    assert problems[3] == ""
    assert problems[4] == "duplicate of line 5"


# -- saving --------------------------------------------------------------------------------------


def test_save_and_reload_round_trip(tmp_path):
    frame = load_prompt_set()
    path = save_prompt_set(frame, tmp_path / "copy.csv")
    again = load_prompt_set(path)
    pd.testing.assert_frame_equal(frame, again)
    assert not list(tmp_path.glob(".*tmp*"))


def test_edited_frame_is_revalidated():
    frame = load_prompt_set().head(3).copy()
    frame.loc[1, "subject"] = "nowhere"
    frame.loc[2, "notes"] = None
    checked = check_prompt_set(frame)
    assert "not in the prompt" in checked.loc[1, "problems"]
    assert checked.loc[2, "notes"] == ""
    frame.loc[0, "category"] = "nonsense"
    with pytest.raises(PromptSetError, match="line 2"):
        check_prompt_set(frame)
    assert prompt_set_to_csv(frame).splitlines()[0].startswith('"category","prompt","expected"')


# -- token level (the embedded model's tokenizer) -------------------------------------------------


@pytest.mark.slow
def test_noised_positions_last_subject_token(embedded):
    assert noised_positions(embedded, "The Eiffel Tower is located in the city of", "Eiffel Tower") == [3]
    assert noised_positions(embedded, "The capital city of Wales is called", "Wales") == [4]
    assert noised_positions(embedded, "The capital city of Wales is called", " Wales ") == [4]
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        noised_positions(embedded, "The capital city of Wales is called", "Scotland")
    assert expected_token_id(embedded, "The capital of France is", " Paris") == embedded.tokenizer(" Paris")["input_ids"][0]


@pytest.mark.slow
def test_token_constraints_with_model(embedded):
    frame = parse(
        "semantic,Paris is the capital of, France,Paris,\n"  # first token noised
        "semantic,The capital of France is, Paris,France,\n",
        lm=embedded,
    )
    assert frame.loc[0, "problems"] == "the first token would be noised"
    assert frame.loc[1, "problems"] == ""


@pytest.mark.slow
def test_shipped_set_constraints_and_recorded_top1_hold(embedded):
    frame = load_prompt_set(lm=embedded)
    assert (frame["problems"] == "").all(), frame.loc[frame["problems"] != "", ["prompt", "problems"]]
    for prompt, subject in zip(frame["prompt"], frame["subject"]):
        (position,) = noised_positions(embedded, prompt, subject)
        token = embedded.tokenizer.decode([embedded.tokenizer(prompt)["input_ids"][position]])
        assert subject.strip().endswith(token.strip()), (prompt, subject, token)  # its last token
    top = model_top1(embedded, frame)
    assert list(top["correct"]) == list(frame["model_top1"].astype(bool))
