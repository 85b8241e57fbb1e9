"""The trace page's linked views: a clicked heatmap cell's side panel (attention per head, logit
lens) and the A/B comparison (two traces on one scale, B − A, both compact curves), with the
library rules under them (``analysis.ab_difference``, ``runcard.b_state``, ``ab_card``).

Numbers are checked against independent computations: plain numpy on the traces' own arrays,
``tracing.attention.attention_to`` and ``tracing.hidden.logit_lens`` called directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from factory import make_trace
from pages.trace import TAB_NAMES, lens_row
from tracing import analysis, runcard
from tracing.attention import attention_to
from tracing.charts import trace as charts
from tracing.hidden import logit_lens

APP = str(Path(__file__).resolve().parents[1] / "app.py")
SHORT = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "samples": "1", "seed": "7"}


# ---------------------------------------------------------------------------------------------
# Library rules


def test_ab_difference_token_by_token_is_b_minus_a_cell_by_cell():
    a = make_trace(seed=1)
    b = make_trace(seed=2, noised=(3,), tokens=["The", " E", "iffel", " Building", " is", " in"])
    frame = analysis.ab_difference(a, b, "prob")
    assert set(frame["aligned"]) == {"token"}
    for t in range(len(a.tokens)):
        for layer in range(a.n_layers):
            row = frame[(frame["order"] == t) & (frame["layer"] == layer)].iloc[0]
            assert row["difference"] == pytest.approx(b.scores[t, layer] - a.scores[t, layer])
    labels = list(dict.fromkeys(frame["row"]))
    assert labels[3] == "3  Tower /  Building" and labels[0] == "0 The"


def test_ab_difference_of_different_lengths_uses_romes_positions():
    a = make_trace(seed=1)  # 6 tokens, subject 1..3
    tokens = ["The", " Col", "os", "se", "um", " is", " in", " the", " city"]
    b = make_trace(seed=3, tokens=tokens, prompt="".join(tokens), noised=(1, 2, 3, 4))
    frame = analysis.ab_difference(a, b, "prob")
    assert set(frame["aligned"]) == {"position"}
    groups = {"first noised token": ([1], [1]), "middle noised tokens": ([2], [2, 3]),
              "last noised token": ([3], [4]), "first token after": ([4], [5]),
              "last token": ([5], [8])}  # "further tokens": A has none, so it is left out
    assert list(dict.fromkeys(frame["row"])) == list(groups)
    for label, (rows_a, rows_b) in groups.items():
        got = frame[frame["row"] == label].sort_values("layer")
        want = np.mean([b.scores[r] for r in rows_b], axis=0) - np.mean([a.scores[r] for r in rows_a], axis=0)
        np.testing.assert_allclose(got["difference"], want)


def test_ab_difference_refuses_other_models():
    with pytest.raises(ValueError, match="layers"):
        analysis.ab_difference(make_trace(n_layers=6), make_trace(n_layers=4))


def test_b_state_changes_only_what_compare_says():
    state = {**runcard.DEFAULTS, "rows": "chosen", "row_tokens": [2]}
    b = runcard.b_state({**state, "compare": "prompt"})
    assert (b["prompt"], b["subject"], b["noise_by"], b["rows"]) == (
        runcard.EXAMPLE_B_PROMPT, runcard.EXAMPLE_B_SUBJECT, "subject", "noised_final")
    assert runcard.b_state({**state, "compare": "noise", "b_noise": 0.9})["noise"] == 0.9
    seeded = runcard.b_state({**state, "compare": "seed", "b_seed": 5})
    assert seeded["seed"] == 5 and seeded["prompt"] == state["prompt"]
    with pytest.raises(ValueError, match="replacement"):
        runcard.b_state({**state, "compare": "prompt", "corruption": "replace"})
    with pytest.raises(ValueError, match="subject"):
        runcard.b_state({**state, "compare": "prompt", "b_subject": " "})


def test_b_fields_are_in_the_url_only_for_the_open_comparison():
    query = runcard.state_to_query({**runcard.DEFAULTS, "tab": "compare", "compare": "seed", "b_seed": 3})
    assert query["compare"] == "seed" and query["b_seed"] == "3" and "b_prompt" not in query
    assert "compare" not in runcard.state_to_query(runcard.DEFAULTS)
    state, problems = runcard.parse_state({"b_noise": "banana", "b_seed": "-4", "compare": "x"})
    assert len(problems) == 3 and state["b_noise"] == runcard.DEFAULTS["b_noise"]


def test_lens_row_follows_the_layer_convention():
    assert lens_row(make_trace(convention="input"), 3) == 3  # the state entering block 3
    assert lens_row(make_trace(convention="output"), 3) == 4  # leaving block 3
    assert lens_row(make_trace(kind="mlp"), 5) == 6  # an MLP's output is in the state leaving its block


def test_ab_charts_render_with_one_colour_scale():
    a, b = make_trace(seed=1), make_trace(seed=2)
    spec = charts.ab_pair(a, b, "prob").to_dict()
    assert spec["resolve"]["scale"]["color"] == "shared"
    diff = charts.difference_heatmap(a, b, "prob").to_dict()
    assert diff["encoding"]["color"]["scale"]["domainMid"] == 0
    charts.compact_pair(a, b, "prob").to_dict()
    stroke = charts.heatmap(a, pick=True).to_dict()["encoding"]["stroke"]
    assert stroke["condition"]["empty"] is False  # nothing outlined until a cell is clicked
    picked = charts.kinds_side_by_side({"hidden": a, "mlp": make_trace(kind="mlp")}, pick=True).to_dict()
    assert [p["name"] for p in picked["params"]] == [charts.PICK] and len(picked["params"][0]["views"]) == 2


# ---------------------------------------------------------------------------------------------
# The page (embedded model)


def _open(params: dict[str, str]) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    at.query_params.update(params)
    return at.run()


@pytest.mark.slow
def test_clicked_cell_opens_its_side_panel(embedded):
    at = _open(SHORT)
    assert not at.exception
    trace = at.session_state["trace_shown"]["traces"]["hidden"]
    token, layer = 3, 12
    at.session_state["trace_heatmap_pick"] = {"selection": {charts.PICK: [{"token_index": token, "layer": layer}]}}
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    panel = [m.value for m in at.markdown if m.value.startswith(f"**Token {token}")]
    assert panel, "no side panel"
    heads = next(d.value for d in at.dataframe if "head" in d.value.columns)
    want = attention_to(embedded, SHORT["prompt"], [token])[layer, :, 0]
    np.testing.assert_allclose(heads["weight"].to_numpy(), want, rtol=1e-5)
    lens = logit_lens(embedded, SHORT["prompt"], k=5, target=trace.target_id)
    row = lens_row(trace, layer)
    top = next(d.value for d in at.dataframe if "next token" in d.value.columns and len(d.value) == 5
               and np.allclose(d.value["probability"], lens.top_probs[row], rtol=1e-5))
    assert top["next token"].iloc[0] == json.dumps(lens.top_tokens[row][0], ensure_ascii=False)
    assert any(f"rank {int(lens.target_ranks[row])}" in c.value for c in at.caption)
    # a cell outside the trace (a stale selection) shows no panel and no error
    at.session_state["trace_heatmap_pick"] = {"selection": {charts.PICK: [{"token_index": 99, "layer": 0}]}}
    at.run()
    assert not at.exception and not [m for m in at.markdown if m.value.startswith("**Token 99")]


@pytest.mark.slow
def test_ab_comparison_of_two_seeds(embedded):
    at = _open({**SHORT, "tab": "compare", "compare": "seed", "b_seed": "8"})
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["trace_tab"] == TAB_NAMES["compare"]
    cache = at.session_state["trace_cache"]
    traces = {t.settings["seed"]: t for t in cache.values()}
    assert {7, 8} <= set(traces)
    a, b = traces[7], traces[8]
    diff = next(c for c in at.get("vega_lite_chart")
                if json.loads(c.proto.spec).get("title", {}).get("text") == "B − A")
    import pyarrow as pa
    rows = pa.ipc.open_stream(diff.proto.datasets[0].data.data).read_pandas()
    want = (b.scores - a.scores).ravel()  # same prompt: token by token, tokens x layers
    got = rows.sort_values(["order", "layer"])["difference"].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-9)
    query = {k: v[0] if isinstance(v, list) else v for k, v in dict(at.query_params).items()}
    assert query["compare"] == "seed" and query["b_seed"] == "8"
    # the run card of A and B says what B changes
    card = runcard.ab_card(a, b, "prob", None, {"compare": "seed"})
    assert card["compare"] == "seed" and card["A"]["seed"] == 7 and card["B"]["seed"] == 8


@pytest.mark.slow
def test_ab_bad_b_prompt_says_so_and_keeps_the_page(embedded):
    at = _open({**SHORT, "tab": "compare", "compare": "prompt", "b_prompt": "Nothing here",
                "b_subject": "Colosseum"})
    assert not at.exception
    assert any("Cannot trace B" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state["trace_shown"] is not None  # A's result is still shown
