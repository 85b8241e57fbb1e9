"""Batch tracing (resume, cancel, store) and the category analysis against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from factory import rows_trace
from tracing.__main__ import main
from tracing.analysis import transition_layer
from tracing.batch import (
    PromptResult,
    Tally,
    category_averages,
    category_summary,
    normalised_rows,
    plan_batch,
    prompt_table,
    run_batch,
    write_table,
)
from tracing.causal import causal_trace
from tracing.prompts import load_prompt_set, shipped_sets
from tracing.store import ResultStore


def fake(category: str, noised_row, final_row, low: float, high: float, correct: bool = True,
         n_tokens: int = 4, noised: int = 1) -> PromptResult:
    """A result whose trace has the given raw p rows (other rows 0)."""
    trace = rows_trace(noised_row, final_row, low, high, n_tokens=n_tokens, noised=noised, correct=correct)
    return PromptResult(0, category, "p", " yes", "s", status="computed", trace=trace)


def hand_set() -> list[PromptResult]:
    return [
        # normalised: noised [1, .5, 0], final [0, .5, 1]; transition at layer 2 (0.3 > 0.3 is false)
        fake("non_english", [0.5, 0.3, 0.1], [0.1, 0.3, 0.5], low=0.1, high=0.5),
        # normalised: noised [1, 1, 0], final [0, .5, 1]; transition at layer 2
        fake("non_english", [0.6, 0.6, 0.2], [0.2, 0.4, 0.6], low=0.2, high=0.6),
        # normalised: noised [1, 0, 0], final [0, 1, 1]; transition at layer 1
        fake("plain_english", [0.9, 0.1, 0.1], [0.1, 0.9, 0.9], low=0.1, high=0.9, n_tokens=6, noised=2),
        # wrong top-1: only in averages without correct_only
        fake("semantic", [0.5, 0.5, 0.5], [0.0, 0.0, 0.5], low=0.0, high=0.5, correct=False),
        # noise barely matters (high - low = 0.01 < 0.05): never averaged
        fake("semantic", [0.51, 0.5, 0.5], [0.5, 0.5, 0.51], low=0.5, high=0.51),
        PromptResult(9, "semantic", "skipped prompt", " x", "nowhere", status="skipped", message="not found"),
    ]


def values(frame: pd.DataFrame, group: str, row: str, column: str) -> list[float]:
    part = frame[(frame["group"] == group) & (frame["row"] == row)].sort_values("layer")
    return list(part[column])


# -- analysis ------------------------------------------------------------------------------------


def test_normalised_rows_and_transition_layer():
    r = hand_set()[0]
    noised, final = normalised_rows(r.trace)
    np.testing.assert_allclose(noised, [1.0, 0.5, 0.0])
    np.testing.assert_allclose(final, [0.0, 0.5, 1.0])
    assert transition_layer(r.trace) == 2
    assert transition_layer(hand_set()[2].trace) == 1
    assert transition_layer(fake("semantic", [1, 1], [0, 0], 0, 1).trace) is None
    # the final token wins at layer 1, loses at 2, wins for good from 3: the transition is 3,
    # (tracing.analysis.transition_layer, the trace page's rule too), not the first crossing
    wobbly = fake("semantic", [0.5, 0.2, 0.6, 0.1], [0.1, 0.3, 0.2, 0.9], low=0.1, high=0.9)
    assert transition_layer(wobbly.trace) == 3
    flat = fake("semantic", [0.2, 0.2], [0.2, 0.2], low=0.2, high=0.2)
    assert np.isnan(normalised_rows(flat.trace)[0]).all()


def test_category_averages_hand_computed():
    avg = category_averages(hand_set())
    assert list(dict.fromkeys(avg["group"])) == ["non_english", "plain_english", "semantic"]
    np.testing.assert_allclose(values(avg, "non_english", "noised token", "mean"), [1.0, 0.75, 0.0])
    np.testing.assert_allclose(values(avg, "non_english", "noised token", "std"), [0.0, np.sqrt(0.125), 0.0])
    np.testing.assert_allclose(values(avg, "non_english", "noised token", "sem"), [0.0, 0.25, 0.0])
    np.testing.assert_allclose(values(avg, "non_english", "final token", "mean"), [0.0, 0.5, 1.0])
    assert values(avg, "non_english", "final token", "n") == [2, 2, 2]
    # one prompt: std and sem undefined
    assert np.isnan(values(avg, "plain_english", "noised token", "std")).all()
    # semantic: only the wrong-top-1 prompt (the other has too small an effect)
    np.testing.assert_allclose(values(avg, "semantic", "final token", "mean"), [0.0, 0.0, 1.0])
    assert values(avg, "semantic", "final token", "n") == [1, 1, 1]
    assert set(avg["label"]) == {"Non-English regurgitation", "Plain-English regurgitation", "Semantic recall"}


def test_correct_only_combined_and_min_effect():
    avg = category_averages(hand_set(), correct_only=True, combine_regurgitation=True)
    assert set(avg["group"]) == {"regurgitation"}  # semantic: wrong or no effect, both out
    np.testing.assert_allclose(values(avg, "regurgitation", "noised token", "mean"), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(values(avg, "regurgitation", "final token", "mean"), [0.0, 2 / 3, 1.0])
    # noised layer 1 values 0.5, 1, 0: sample std 0.5
    np.testing.assert_allclose(values(avg, "regurgitation", "noised token", "std")[1], 0.5)
    np.testing.assert_allclose(values(avg, "regurgitation", "noised token", "sem")[1], 0.5 / np.sqrt(3))
    loose = category_averages(hand_set(), correct_only=True, min_effect=0.0)
    assert values(loose, "semantic", "noised token", "n") == [1, 1, 1]
    np.testing.assert_allclose(values(loose, "semantic", "noised token", "mean"), [1.0, 0.0, 0.0])
    assert category_averages([]).empty


def test_prompt_table_and_summary():
    table = prompt_table(hand_set())
    assert len(table) == 6
    first = table.iloc[0]
    assert first["token_distance"] == 2 and first["noised_index"] == 1 and first["final_index"] == 3
    assert first["clean_prob"] == 0.5 and first["corrupted_prob"] == 0.1 and bool(first["correct"])
    assert first["transition_layer"] == 2
    assert table.iloc[2]["token_distance"] == 3
    assert table.iloc[5]["status"] == "skipped" and pd.isna(table.iloc[5]["clean_prob"])
    summary = category_summary(hand_set())
    ne = summary.set_index("group").loc["non_english"]
    assert ne["prompts"] == 2 and ne["correct"] == 2
    assert ne["clean_prob"] == pytest.approx(0.55) and ne["transition_layer"] == 2
    assert list(category_summary(hand_set(), combine_regurgitation=True)["group"]) == ["regurgitation", "semantic"]


# -- batches on a tiny random model --------------------------------------------------------------


@pytest.fixture
def three_prompts() -> pd.DataFrame:
    frame = load_prompt_set(shipped_sets()["quick"])
    return frame.groupby("category").head(1).reset_index(drop=True)


SETTINGS = {"kind": "hidden", "noise": 0.5, "samples": 2}


def test_cancel_midway_then_resume_computes_only_the_missing(tiny, tmp_path, three_prompts):
    lm = tiny("llama")
    store = ResultStore(tmp_path)
    calls: list[str] = []

    def counting(lm, prompt, *args, **kwargs):
        calls.append(prompt)
        return causal_trace(lm, prompt, *args, **kwargs)

    finished: list[str] = []
    first = run_batch(lm, three_prompts, SETTINGS, store, should_stop=lambda: len(finished) >= 1,
                      progress=lambda done, total, r: finished.append(r.prompt), trace=counting)
    assert first.cancelled
    assert [r.status for r in first.results] == ["computed", "pending", "pending"]
    assert calls == [three_prompts["prompt"][0]]

    plan = plan_batch(lm, three_prompts, SETTINGS, store)
    assert [r.status for r in plan] == ["stored", "pending", "pending"]

    calls.clear()
    second = run_batch(lm, three_prompts, SETTINGS, ResultStore(tmp_path), trace=counting)
    assert not second.cancelled
    assert [r.status for r in second.results] == ["stored", "computed", "computed"]
    assert calls == list(three_prompts["prompt"][1:])
    np.testing.assert_array_equal(second.results[0].trace.scores, first.results[0].trace.scores)

    calls.clear()
    third = run_batch(lm, three_prompts, SETTINGS, ResultStore(tmp_path), trace=counting)
    assert third.counts == {"stored": 3} and calls == []
    other = run_batch(lm, three_prompts.head(1), {**SETTINGS, "noise": 0.6}, store)
    assert other.counts == {"computed": 1}  # new settings, new key


def test_cancel_inside_a_prompt_stores_nothing_for_it(tiny, tmp_path, three_prompts):
    lm = tiny("gpt2")
    store = ResultStore(tmp_path)
    seen: list[tuple[int, int]] = []

    def cells(done: int, total: int) -> bool:
        seen.append((done, total))
        return done == 0  # stop after the first chunk of cells

    batch = run_batch(lm, three_prompts, SETTINGS, store, prompt_progress=cells)
    assert batch.cancelled
    assert batch.results[0].status == "cancelled" and batch.results[0].trace is None
    assert seen[0][0] == 0 and seen[0][1] > 0
    assert not list(store.keys())


def test_bad_rows_are_skipped_with_a_reason(tiny, tmp_path, three_prompts):
    frame = three_prompts.copy()
    frame.loc[1, "subject"] = "not there"
    batch = run_batch(tiny("gpt2"), frame, SETTINGS, ResultStore(tmp_path))
    assert [r.status for r in batch.results] == ["computed", "skipped", "computed"]
    assert "does not occur in the prompt" in batch.results[1].message
    with pytest.raises(ValueError, match="target"):
        run_batch(tiny("gpt2"), frame, SETTINGS, ResultStore(tmp_path), target="best")


def test_batch_settings_and_target_are_checked(tiny, three_prompts):
    lm, frame = tiny("gpt2"), three_prompts.head(1)
    with pytest.raises(ValueError, match="target must be one of"):
        run_batch(lm, frame, {"samples": 1}, target="best")
    with pytest.raises(ValueError, match="Unknown trace settings"):
        run_batch(lm, frame, {"samples": 1, "colour": "red"})


def test_target_expected_vs_top1(tiny, tmp_path, three_prompts):
    lm = tiny("gpt2")
    expected = run_batch(lm, three_prompts.head(1), SETTINGS, ResultStore(tmp_path)).results[0].trace
    top1 = run_batch(lm, three_prompts.head(1), SETTINGS, ResultStore(tmp_path), target="top1").results[0].trace
    assert expected.target == lm.tokenizer.decode([lm.tokenizer(three_prompts["expected"][0])["input_ids"][0]])
    assert top1.target == top1.clean_top[0][0]


def test_cli_prompts_command(tmp_path, capsys):
    out = tmp_path / "checked.csv"
    assert main(["prompts", str(shipped_sets()["quick"]), "--write", str(out)]) == 0
    assert "9 prompts" in capsys.readouterr().out
    assert len(load_prompt_set(out)) == 9
    bad = tmp_path / "bad.csv"
    bad.write_text("category,prompt\nsemantic,x\n")
    assert main(["prompts", str(bad)]) == 2
    assert "line 1" in capsys.readouterr().err


# -- the embedded model --------------------------------------------------------------------------


@pytest.mark.slow
def test_real_batch_layer0_sanity_and_store(embedded, tmp_path, three_prompts):
    frame = three_prompts.head(2)
    cold = run_batch(embedded, frame, {"samples": 2}, ResultStore(tmp_path))
    assert cold.counts == {"computed": 2}
    for r in cold.results:
        noised, final = normalised_rows(r.trace)
        assert noised[0] == pytest.approx(1.0, abs=1e-4)  # restoring the only noised token at layer 0
        assert final[0] == pytest.approx(0.0, abs=1e-9)  # the final token's layer-0 input is clean
        assert np.asarray(r.trace.scores).shape == (len(r.trace.tokens), embedded.n_layers)
    warm = run_batch(embedded, frame, {"samples": 2}, ResultStore(tmp_path))
    assert warm.counts == {"stored": 2} and warm.elapsed < cold.elapsed
    table = prompt_table(warm.results)
    assert table["correct"].all() and (table["effect"] > 0).all()


@pytest.mark.slow
def test_cli_batch_writes_the_store(embedded, tmp_path, capsys):
    args = ["batch", "--prompts", str(shipped_sets()["quick"]), "--limit", "1", "--samples", "1",
            "--store", str(tmp_path / "store"), "--table", str(tmp_path / "t.csv"),
            "--averages", str(tmp_path / "a.csv")]
    assert main(args) == 0
    assert "computed" in capsys.readouterr().err
    assert len(list(ResultStore(tmp_path / "store").keys())) == 1
    assert len(pd.read_csv(tmp_path / "t.csv")) == 1
    assert set(pd.read_csv(tmp_path / "a.csv")["row"]) == {"noised token", "final token"}
    assert main(args) == 0
    assert "stored" in capsys.readouterr().err


# -- chart builders ------------------------------------------------------------------------------


def test_chart_builders_render():
    import vl_convert as vlc

    from tracing.charts.averages import heatmap_chart, line_chart, scatter_chart
    from tracing.charts.style import RAMPS

    averages = category_averages(hand_set())
    heat = heatmap_chart(averages).to_dict()
    assert heat["facet"]["column"]["field"] == "title"
    # the purples ramp from white (ROME's hidden-state palette, as on the trace page)
    ramp = heat["spec"]["encoding"]["color"]["scale"]["range"]
    assert ramp[0] == "#fcfbfd" and ramp[-1] == "#3f007d" and ramp == RAMPS["hidden"]
    titles = {row["title"] for row in heat["datasets"][next(iter(heat["datasets"]))]}
    assert titles == {"Non-English regurgitation (n=2)", "Plain-English regurgitation (n=1)", "Semantic recall (n=1)"}
    lines = line_chart(averages, spread="std")
    assert vlc.vegalite_to_svg(lines.to_json()).startswith("<svg")
    table = prompt_table(hand_set()).assign(n_layers=3)
    scatter = scatter_chart(table, "clean_prob").to_dict()
    assert scatter["encoding"]["y"]["scale"]["domain"] == [0, 2]
    assert scatter["encoding"]["color"]["scale"]["domain"] == [  # only categories present
        "Non-English regurgitation", "Plain-English regurgitation", "Semantic recall"]
    only_regurgitation = scatter_chart(table[table["category"] != "semantic"], "token_distance").to_dict()
    assert len(only_regurgitation["encoding"]["color"]["scale"]["domain"]) == 2
    with pytest.raises(ValueError):
        scatter_chart(table, "colour")
    with pytest.raises(ValueError):
        line_chart(averages, spread="iqr")


def test_explicit_noised_indices_override_the_subject(tiny, tmp_path, three_prompts):
    frame = three_prompts.head(2).copy()
    frame["noised"] = [[0], "-2"]  # a list from the parser, a string from the table editor
    batch = run_batch(tiny("gpt2"), frame, SETTINGS, ResultStore(tmp_path))
    n_tokens = len(batch.results[1].trace.tokens)
    assert batch.results[0].trace.noised == [0]
    assert batch.results[1].trace.noised == [n_tokens - 2]


# -- backends, progress tally, Parquet (no Ray started) -----------------------------------------


def test_backend_arguments_are_checked(tiny, three_prompts):
    lm, frame = tiny("gpt2"), three_prompts.head(1)
    with pytest.raises(ValueError, match="backend must be one of local, ray"):
        run_batch(lm, frame, SETTINGS, backend="spark")
    for bad in ({"workers": 2}, {"address": "10.0.0.1:6379"}, {"gpus_per_worker": 1}):
        with pytest.raises(ValueError, match="need backend='ray'"):
            run_batch(lm, frame, SETTINGS, **bad)
    for workers in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a whole number"):
            run_batch(lm, frame, SETTINGS, backend="ray", workers=workers)
    with pytest.raises(SystemExit):  # argparse: not a backend
        main(["batch", "--backend", "spark"])
    assert main(["batch", "--workers", "2"]) == 2  # Ray flags without --backend ray


def test_tally_counts_and_eta():
    tally = Tally(total=4, started=0.0)
    done = [PromptResult(0, "semantic", "a", " x", "s", status="stored"),
            PromptResult(1, "semantic", "b", " x", "s", status="computed", worker="w1", seconds=2.0, attempts=1),
            PromptResult(2, "semantic", "c", " x", "s", status="computed", worker="w2", seconds=4.0, attempts=2),
            PromptResult(3, "semantic", "d", " x", "s", status="failed", message="bad", attempts=1)]
    for r in done[:3]:
        tally.add(r)
    assert (tally.done, tally.failed, tally.retried, tally.computed) == (3, 0, 1, 2)
    assert tally.per_worker == {"w1": [1, 2.0], "w2": [1, 4.0]}
    eta = tally.eta()  # (now - 0) / 2 computed * 1 left
    assert eta is not None and eta > 0
    line = tally.line(width=4)
    assert line.startswith("[###.] 3/4 · 0 failed · 1 retried · w1 0.50/s w2 0.25/s · ETA ")
    tally.add(done[3])
    assert tally.failed == 1 and tally.eta() == 0
    assert Tally(total=2).eta() is None and "ETA" not in Tally(total=2).line()


def test_tables_as_parquet_and_csv(tmp_path):
    table = prompt_table(hand_set())
    parquet = write_table(table, tmp_path / "t.parquet")
    back = pd.read_parquet(parquet)
    assert list(back.columns) == list(table.columns) and len(back) == len(table)
    np.testing.assert_allclose(back["clean_prob"].astype(float), table["clean_prob"].astype(float), equal_nan=True)
    assert list(back["status"]) == list(table["status"])
    averages = write_table(category_averages(hand_set()), tmp_path / "a.csv")
    assert set(pd.read_csv(averages)["row"]) == {"noised token", "final token"}
