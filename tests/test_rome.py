"""ROME's average indirect effects (tracing.rome): position grouping, the Student-t interval and
the AIE table against hand averages of traces computed independently (reference.naive_trace: one
hooked forward per cell), the noise rule against the embedding matrix, the store, the CLI."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest

from tracing import rome
from tracing.charts import rome as rome_charts
from tracing.prompts import expected_token_id, parse_prompt_set
from tracing.reference import naive_trace
from tracing.store import ResultStore

# Subjects of 1, 2, 3 and 4 tokens of the embedded tokenizer, with the token indices written out by
# hand ("The| capital| of| France| is"; "Leon|ardo| da| Vinci| was| a| famous").
FACTS = [
    # prompt, subject, expected, subject token indices, number of tokens
    ("The capital of France is", "France", " Paris", [3], 5),
    ("The capital of South Korea is", "South Korea", " Seoul", [3, 4], 6),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris", [1, 2, 3], 10),
    ("Leonardo da Vinci was a famous", "Leonardo da Vinci", " painter", [0, 1, 2, 3], 7),
]


def frame(rows=FACTS) -> pd.DataFrame:
    text = "category,prompt,expected,subject\n" + "".join(
        f'semantic,"{p}","{e}","{s}"\n' for p, s, e, *_ in rows)
    return parse_prompt_set(text)


def test_subject_tokens_are_as_written(tiny):
    from tracing.model.tokens import subject_positions, tokenize

    lm = tiny("llama")
    for prompt, subject, _, positions, n in FACTS:
        assert subject_positions(lm, prompt, subject, "all") == positions
        assert len(tokenize(lm, prompt)) == n


def test_position_groups_one_two_and_four_subject_tokens():
    one = rome.position_groups([3], 5)  # "The capital of France is"
    assert one == {"first_subject": [3], "middle_subject": [], "last_subject": [3], "first_after": [4],
                   "further": [], "last": [4]}  # first after is the last token: in both rows
    two = rome.position_groups([0, 1], 6)
    assert two == {"first_subject": [0], "middle_subject": [], "last_subject": [1], "first_after": [2],
                   "further": [3, 4], "last": [5]}
    four = rome.position_groups([2, 3, 4, 5], 10)
    assert four == {"first_subject": [2], "middle_subject": [3, 4], "last_subject": [5], "first_after": [6],
                    "further": [7, 8], "last": [9]}
    with pytest.raises(ValueError, match="ends the prompt"):
        rome.position_groups([3, 4], 5)


def test_t_quantile_matches_the_table():
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (1000, 1.962)):
        assert rome.t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    with pytest.raises(ValueError):
        rome.t_quantile(0.3, 4)


def test_confidence_interval_by_hand():
    values = np.array([[0.1, 0.5], [0.3, 0.2], [0.2, 0.8], [0.6, 0.1]])
    out = rome.confidence_interval(values)
    for layer in range(2):
        column = values[:, layer].tolist()
        mean = sum(column) / 4
        sd = math.sqrt(sum((v - mean) ** 2 for v in column) / 3)
        half = 3.182 * sd / 2  # t(0.975, 3) = 3.182 (table), sqrt(4) = 2
        assert out["mean"][layer] == pytest.approx(mean)
        assert out["low"][layer] == pytest.approx(mean - half, abs=1e-3)
        assert out["high"][layer] == pytest.approx(mean + half, abs=1e-3)
    single = rome.confidence_interval(values[:1])
    assert np.isnan(single["low"]).all() and single["mean"][0] == pytest.approx(0.1)


def hand_effects(lm, prompt, subject_tokens, n_tokens, expected, noise, samples, kind, window):
    """One prompt's effect per position by hand, from an independent one-forward-per-cell trace."""
    target = expected_token_id(lm, prompt, expected)
    scores, low, _, _ = naive_trace(lm, prompt, subject_tokens, kind=kind, noise=noise, samples=samples,
                                    seed=0, window=window, convention="output", target=target)
    effect = np.asarray(scores, dtype=np.float64) - float(low)
    first, last = subject_tokens[0], subject_tokens[-1]
    rows = {"first_subject": [first], "middle_subject": list(range(first + 1, last)), "last_subject": [last],
            "first_after": [last + 1], "further": list(range(last + 2, n_tokens - 1)), "last": [n_tokens - 1]}
    return {k: effect[v].mean(axis=0) if v else None for k, v in rows.items()}


def test_aie_table_equals_hand_average_of_reference_traces(tiny, tmp_path):
    """MLP restorations (window 2, so windows are cut at both ends); every kind shares the grouping
    and averaging (one kind keeps this test short; the engine's kinds are checked in test_causal)."""
    lm, kind = tiny("llama"), "mlp"
    store = ResultStore(tmp_path / "store")
    table = rome.average_indirect_effects(lm, frame(), kind=kind, noise=0.5, samples=2, window=2,
                                          correct_only=False, store=store)
    assert list(table.columns) == rome.COLUMNS
    assert list(dict.fromkeys(table["position"])) == list(rome.POSITIONS)
    assert len(table) == 6 * lm.n_layers and table.attrs["noise"] == 0.5 and table.attrs["used"] == 4
    hands = [hand_effects(lm, p, s, n, e, 0.5, 2, kind, 2) for p, _, e, s, n in FACTS]
    for position in rome.POSITIONS:
        rows = [h[position] for h in hands if h[position] is not None]
        got = table[table["position"] == position]
        assert (got["n"] == len(rows)).all()
        mean = sum(rows) / len(rows)
        assert np.allclose(got["aie"], mean, atol=1e-5)
        if len(rows) > 1:
            sd = np.sqrt(sum((r - mean) ** 2 for r in rows) / (len(rows) - 1))
            t = {2: 12.706, 3: 4.303, 4: 3.182}[len(rows)]
            assert np.allclose(got["ci_high"] - got["aie"], t * sd / np.sqrt(len(rows)), atol=1e-3 * t)
    counts = dict(zip(table.drop_duplicates("position")["position"], table.drop_duplicates("position")["n"]))
    assert counts == {"first_subject": 4, "middle_subject": 2, "last_subject": 4, "first_after": 4,
                      "further": 2, "last": 4}
    again = rome.average_indirect_effects(lm, frame(), kind=kind, noise=0.5, samples=2, window=2,
                                          correct_only=False, store=store)
    assert again.attrs["counts"] == {"stored": 4}  # resumable: nothing recomputed
    pd.testing.assert_frame_equal(again, table)


def test_rome_noise_is_three_embedding_stds_of_the_subject_tokens(tiny):
    lm = tiny("gpt2")
    weight = lm.model.get_submodule(lm.adapter.token_embedding).weight.detach().double()
    ids = [lm.tokenizer(p)["input_ids"][i] for p, _, _, positions, _ in FACTS for i in positions]
    expected = 3 * float(weight[ids].flatten().std())
    assert rome.rome_noise(lm, frame()) == pytest.approx(expected, rel=1e-3)
    table = rome.average_indirect_effects(lm, frame(FACTS[:2]), samples=1, correct_only=False)
    assert table.attrs["noise"] == rome.rome_noise(lm, frame(FACTS[:2])) and "3 x std" in table.attrs["noise_rule"]


def test_correct_only_keeps_the_facts_the_model_gets_right(tiny):
    from tracing.prompts import model_top1

    lm = tiny("qwen2")
    facts = frame()
    top = model_top1(lm, facts)
    facts.loc[1, "expected"] = top.loc[1, "top1"]  # the model's own answer: right by construction
    table = rome.average_indirect_effects(lm, facts, noise=0.3, samples=1, correct_only=True)
    right = int(model_top1(lm, facts)["correct"].sum())
    assert table.attrs["used"] == right >= 1
    assert sum("top-1" in why for _, why in table.attrs["skipped"]) == len(facts) - right


def test_bad_input_is_a_clear_value_error(tiny):
    lm = tiny("gpt2")
    with pytest.raises(ValueError, match="lacks the column"):
        rome.average_indirect_effects(lm, pd.DataFrame({"prompt": ["x"]}))
    ends = frame([("The capital of France", "France", " is", [3], 4)])
    with pytest.raises(ValueError, match="ends the prompt"):
        rome.average_indirect_effects(lm, ends, noise=0.1, correct_only=False)
    assert "sever" not in rome.fact_settings() and rome.fact_settings(sever="mlp")["sever"] == "mlp"


def test_charts_have_six_rows_and_two_lines(tiny):
    lm = tiny("gpt2")
    table = rome.average_indirect_effects(lm, frame(), noise=0.3, samples=1, correct_only=False)
    heat = rome_charts.heatmap(table, "hidden").to_dict()
    assert len({r["row"] for r in heat["datasets"][next(iter(heat["datasets"]))]}) == 6
    lines = rome_charts.lines(table, "attn").to_dict()
    assert {r["position"] for r in lines["datasets"][next(iter(lines["datasets"]))]} == {"last_subject", "last"}
    rome_charts.figure({"hidden": table, "mlp": table}).to_dict()
    best = rome.peaks(table)
    assert list(best["position"]) == list(rome.POSITIONS)
    card = rome.run_card(table, lm, "facts.csv", frame())
    assert card["noise"] == 0.3 and card["used"] == 4 and len(card["prompt_set_sha256"]) == 64


def test_cli_writes_the_table_and_resumes(tiny, tmp_path, monkeypatch, capsys):
    import tracing.model.loading
    from tracing import cli_rome

    lm = tiny("llama")
    monkeypatch.setattr(tracing.model.loading, "load_model", lambda *a, **k: lm)
    path = tmp_path / "facts.csv"
    path.write_text("category,prompt,expected,subject\n" + "".join(
        f'semantic,"{p}","{e}","{s}"\n' for p, s, e, *_ in FACTS[:2]))
    parser = argparse.ArgumentParser()
    cli_rome.add_parser(parser.add_subparsers(dest="command"))
    argv = ["rome", "--prompts", str(path), "--kind", "all", "--samples", "1", "--all-prompts",
            "--store", str(tmp_path / "store"), "--out", str(tmp_path / "aie.csv")]
    assert cli_rome.main(parser.parse_args(argv)) == 0
    out = pd.read_csv(tmp_path / "aie.csv")
    assert set(out["kind"]) == {"hidden", "mlp", "attn"} and len(out) == 3 * 6 * lm.n_layers
    first = capsys.readouterr()
    assert "3 x std" in first.out and "computed" in first.err
    assert cli_rome.main(parser.parse_args(argv)) == 0
    second = capsys.readouterr().err
    assert "stored" in second and "computed" not in second
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "aie.csv"), out)
    bad = parser.parse_args(["rome", "--prompts", str(tmp_path / "missing.csv")])
    assert cli_rome.main(bad) == 2


def test_sever_is_passed_to_the_engine(tiny, tmp_path):
    """A severed-path average (hidden kind, MLP severed) equals the reference loop's severed trace."""
    lm = tiny("gpt2")
    prompt, _, expected, positions, _ = FACTS[0]
    table = rome.average_indirect_effects(lm, frame(FACTS[:1]), noise=0.5, samples=2, sever="mlp",
                                          correct_only=False, store=ResultStore(tmp_path / "store"))
    scores, low, _, _ = naive_trace(lm, prompt, positions, kind="hidden", noise=0.5, samples=2, seed=0,
                                    convention="output", target=expected_token_id(lm, prompt, expected), sever="mlp")
    got = table[table["position"] == "last_subject"]["aie"].to_numpy()
    assert np.allclose(got, np.asarray(scores[positions[-1]]) - low, atol=1e-6)
    assert table.attrs["settings"]["sever"] == "mlp"


def test_the_rome_command_passes_the_ray_backend_to_the_batch(monkeypatch, tmp_path):
    """``python -m tracing rome --backend ray --workers 2`` hands the backend to ``run_batch``
    (the Ray path itself is tested in test_ray_backend.py); Ray flags without it are refused."""
    import pandas as pd

    import tracing.rome
    from tracing.__main__ import build_parser, main

    seen = {}

    def fake(lm, frame, **kwargs):
        seen.update(kwargs)
        table = pd.DataFrame({"position": ["last"], "layer": [0], "aie": [0.0], "ci_low": [0.0],
                              "ci_high": [0.0], "n": [1]})
        table.attrs.update(used=1, skipped=[], noise=0.1, noise_rule="given", high=0.5, low=0.1,
                           total_effect=0.4, elapsed=0.0)
        return table

    monkeypatch.setattr(tracing.rome, "average_indirect_effects", fake)
    args = ["rome", "--limit", "1", "--all-prompts", "--quiet", "--store", str(tmp_path)]
    assert main(args + ["--backend", "ray", "--workers", "2"]) == 0
    assert seen["batch_options"] == {"backend": "ray", "workers": 2, "address": None, "gpus_per_worker": None}
    assert main(args) == 0 and seen["batch_options"] == {}
    assert main(args + ["--workers", "2"]) == 2  # Ray flags need --backend ray
    assert build_parser().parse_args(args).backend == "local"
