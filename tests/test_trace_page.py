"""AppTest of the single-prompt trace page (the app's default page) with the embedded model.

Most tests use a short prompt, one noise sample and a fixed seed; every test gets its own empty
result store (conftest), so a test traces what it asks for, and repeated settings within a test
come from the session cache or the store (as on the page).
"""

from __future__ import annotations

import io
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from pages.trace import TAB_NAMES
from tracing import runcard
from tracing.charts import trace as charts
from tracing.charts.style import to_png, to_svg

APP = str(Path(__file__).resolve().parents[1] / "app.py")
SEED = 1234
SHORT = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "samples": "1",
         "seed": str(SEED)}

pytestmark = pytest.mark.slow


def open_page(params: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    at.query_params.update(params or {})
    return at.run()


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning]


def charts_of(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def chart_rows(element) -> pd.DataFrame:
    """The first dataset of a rendered Altair chart."""
    return pa.ipc.open_stream(element.proto.datasets[0].data.data).read_pandas()


def heatmap(at: AppTest) -> tuple[dict, pd.DataFrame]:
    element = charts_of(at)[0]
    return json.loads(element.proto.spec), chart_rows(element)


def shown(at: AppTest) -> dict:
    return at.session_state["trace_shown"]


def metric(at: AppTest, starts: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(starts))


def show_tab(at: AppTest, name: str) -> AppTest:
    """Open one of the result tabs (they rerun the page when switched; only the open one runs)."""
    at.session_state["trace_tab"] = TAB_NAMES[name]
    return at.run()


def cached_from(at: AppTest) -> str:
    return " ".join(c.value for c in at.caption if "Best cell" in c.value)


def test_first_load_shows_the_eiffel_heatmap():
    at = open_page()
    assert not at.exception, at.exception
    assert not errors(at)
    assert at.title[0].value == "Causal trace of one prompt"
    assert at.text_area(key="trace_prompt").value == "The Eiffel Tower is located in the city of"
    chips = " ".join(h.proto.body for h in at.get("html"))
    assert "iffel*" in chips and "␣Tower*" in chips and ">9<" in chips  # chips with indices
    spec, rows = heatmap(at)
    assert spec["mark"]["type"] == "rect"
    assert spec["encoding"]["color"]["legend"]["title"] == 'p(" Paris")'
    assert len(rows) == 10 * 30
    trace = shown(at)["traces"]["hidden"]
    assert trace.settings["noise"] == 0.4 and trace.settings["samples"] == 3
    assert metric(at, "Clean p") == f"{trace.high:.4g}"
    assert at.query_params["noise"] == ["0.4"] or at.query_params["noise"] == "0.4"
    assert {b.label for b in at.get("download_button")} >= {"PNG", "SVG", "CSV"}
    assert all(b.proto.ignore_rerun for b in at.get("download_button"))  # a download never reruns
    assert at.query_params["tab"] in (["heatmap"], "heatmap")
    show_tab(at, "export")  # only the open tab runs
    assert {b.label for b in at.get("download_button")} >= {"JSON", "CSV"}
    assert not any(b.label == "PNG" for b in at.get("download_button"))
    assert at.query_params["tab"] in (["export"], "export")
    assert all(b.proto.ignore_rerun for b in at.get("download_button"))


def test_moving_the_noise_slider_retraces_and_returning_is_instant():
    at = open_page(SHORT)
    assert not at.exception and not errors(at)
    _, before = heatmap(at)
    corrupted = metric(at, "Corrupted")
    at.slider(key="trace_noise").set_value(1.0).run()
    assert not at.exception and not errors(at)
    _, after = heatmap(at)
    assert shown(at)["traces"]["hidden"].settings["noise"] == 1.0
    assert shown(at)["source"] in ("computed", "store")
    assert not before["value"].equals(after["value"])
    assert metric(at, "Corrupted") != corrupted
    assert "1" in str(at.query_params["noise"])
    # back to 0.4: from this session's cache, the same numbers
    started = time.perf_counter()
    at.slider(key="trace_noise").set_value(0.4).run()
    assert time.perf_counter() - started < 60
    _, again = heatmap(at)
    assert again["value"].equals(before["value"])
    assert "this session's cache" in cached_from(at)


def test_url_reproduces_the_settings_in_a_new_session():
    params = {**SHORT, "subject_tokens": "last", "noise": "0.25", "metric": "normalised",
              "convention": "output", "target": " Paris"}
    at = open_page(params)
    assert not at.exception and not errors(at), errors(at)
    assert at.slider(key="trace_noise").value == 0.25
    assert at.radio(key="trace_convention").value == "output"
    assert at.selectbox(key="trace_metric").value == "normalised"
    assert at.text_input(key="trace_target").value == " Paris"
    trace = shown(at)["traces"]["hidden"]
    assert trace.noised == [3] and trace.convention == "output" and trace.settings["target"] == " Paris"
    spec, rows = heatmap(at)
    assert spec["encoding"]["color"]["legend"]["title"] == 'normalised p(" Paris")'
    assert rows["value"].tolist() == pytest.approx(trace.normalised().ravel().tolist())
    # the page's own URL, opened in a new session, shows the same trace from the result store
    url = {k: (v[-1] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    again = open_page(url)
    assert not again.exception and not errors(again)
    assert heatmap(again)[1]["value"].equals(rows["value"])
    assert "result store" in cached_from(again)


def test_garbage_in_the_url_warns_and_falls_back():
    params = {**SHORT, "noise": "loud", "kind": "neurons", "metric": "42", "noise_by": "tokens",
              "tokens": "1,2,3,99"}
    params.pop("subject")
    at = open_page(params)
    assert not at.exception, at.exception
    said = " ".join(warnings(at))
    assert "`noise=loud` ignored" in said and "`kind=neurons` ignored" in said and "`metric=42`" in said
    assert any("Token index 99 is out of range" in e for e in errors(at))
    assert at.slider(key="trace_noise").value == 0.4
    assert shown(at)["traces"]["hidden"].noised == [1, 2, 3]
    assert charts_of(at)


def test_bad_inputs_show_errors_and_keep_the_last_result():
    at = open_page(SHORT)
    assert not at.exception and charts_of(at)
    good = heatmap(at)[1]
    cases = [
        (lambda: at.text_area(key="trace_prompt").set_value(""), "The prompt is empty"),
        (lambda: at.text_area(key="trace_prompt").set_value("word " * 9000), "context"),
        (lambda: at.text_area(key="trace_prompt").set_value("The Colosseum is in"), "does not occur"),
    ]
    for change, message in cases:
        change()
        at.run()
        assert not at.exception, at.exception
        assert any(message in e for e in errors(at)), (message, errors(at))
        assert any("last result that worked" in w for w in warnings(at))
        assert heatmap(at)[1]["value"].equals(good["value"])
    at.text_area(key="trace_prompt").set_value(SHORT["prompt"]).run()
    at.text_input(key="trace_subject").set_value("").run()
    assert any("subject is empty" in e for e in errors(at))
    at.text_input(key="trace_subject").set_value("Eiffel Tower").run()
    at.radio(key="trace_corruption").set_value("replace").run()
    at.text_input(key="trace_replacement").set_value("Rome is").run()
    assert any("replacement prompt has" in e for e in errors(at)), errors(at)
    at.radio(key="trace_corruption").set_value("gaussian").run()
    at.selectbox(key="trace_metric").set_value("logit_diff").run()
    assert any("contrast" in e for e in errors(at))
    assert charts_of(at) and not at.exception
    at.selectbox(key="trace_metric").set_value("prob").run()
    assert not errors(at) and not any("last result" in w for w in warnings(at))
    assert heatmap(at)[1]["value"].equals(good["value"])


def test_exports_and_loading_a_run_card_back():
    at = open_page(SHORT)
    assert not at.exception
    trace = shown(at)["traces"]["hidden"]
    keys = {b.key for b in at.get("download_button")}
    assert {"trace_heatmap-png", "trace_heatmap-svg", "trace_heatmap-csv"} <= keys
    show_tab(at, "compact")
    assert "trace_compact_hidden-png" in {b.key for b in at.get("download_button")}
    show_tab(at, "export")
    assert {"trace_json_hidden", "trace_csv_hidden"} <= {b.key for b in at.get("download_button")}
    # the exported files are valid and carry the trace's numbers
    assert to_png(charts.heatmap(trace))[:8] == b"\x89PNG\r\n\x1a\n"
    ET.fromstring(to_svg(charts.compact(trace)))
    frame = pd.read_csv(io.StringIO(runcard.to_csv(trace)))
    assert frame["prob"].tolist() == trace.scores.ravel().tolist()
    state = at.session_state["trace_state"]
    payload = json.loads(runcard.to_json(trace, "prob", trace.model, state))
    assert payload["run_card"]["model"]["name"] == "SmolLM2-135M-Instruct"
    # a card for settings never traced (another seed) shows its own numbers without tracing
    other = SEED + 1
    payload["run_card"]["page"]["seed"] = other
    payload["trace"]["settings"]["seed"] = other
    at.file_uploader(key="trace_card_upload").upload("card.json", json.dumps(payload).encode(),
                                                     "application/json")
    started = time.perf_counter()
    at.run()
    assert time.perf_counter() - started < 60
    assert not at.exception and not errors(at), errors(at)
    assert at.number_input(key="trace_seed").value == other
    assert any("Loaded card.json" in s.value for s in at.success)
    assert shown(at)["traces"]["hidden"].settings["seed"] == other
    assert "this session's cache" in cached_from(at)
    # malformed, or from another model: a clear error, the page keeps working
    at.file_uploader(key="trace_card_upload").upload("bad.json", b"{not json", "application/json")
    at.run()
    assert any("bad.json" in e and "not JSON" in e for e in errors(at))
    payload["run_card"]["model"]["name"] = "gpt2"
    at.file_uploader(key="trace_card_upload").upload("gpt2.json", json.dumps(payload).encode(),
                                                     "application/json")
    at.run()
    assert any("from the model 'gpt2'" in e for e in errors(at))
    assert not at.exception
    show_tab(at, "heatmap")  # the page keeps working
    assert charts_of(at) and not at.exception


def test_stop_and_resume(embedded):
    from tracing.store import ResultStore

    params = {**SHORT, "seed": str(SEED + 2), "noise": "0.6"}
    state = runcard.parse_state(params)[0]
    request = runcard.trace_request(embedded, state)
    key = ResultStore().key(embedded, request.prompt, request.settings)
    at = AppTest.from_file(APP, default_timeout=600)
    at.query_params.update(params)
    at.session_state["trace_stopped"] = key  # as if Stop had been pressed during this trace
    at.run()
    assert not at.exception
    assert any(i.value.startswith("Stopped") for i in at.info)
    assert not charts_of(at)
    at.button(key="trace_resume").click().run()
    assert not at.exception and not errors(at)
    assert shown(at)["traces"]["hidden"].settings["seed"] == SEED + 2
    assert charts_of(at)


def test_all_three_kinds_side_by_side():
    params = {**SHORT, "noise_by": "tokens", "tokens": "3", "kind": "all"}
    at = open_page(params)
    assert not at.exception and not errors(at), errors(at)
    traces = shown(at)["traces"]
    assert list(traces) == ["hidden", "mlp", "attn"]
    spec = json.loads(charts_of(at)[0].proto.spec)
    ranges = [p["encoding"]["color"]["scale"]["range"][-1] for p in spec["hconcat"]]
    assert ranges == [charts.RAMPS[k][-1] for k in ("hidden", "mlp", "attn")]
    show_tab(at, "export")
    assert {"trace_json_mlp", "trace_json_attn"} <= {b.key for b in at.get("download_button")}


def test_noise_sweep_on_one_colour_scale():
    params = {**SHORT, "noise_by": "tokens", "tokens": "3", "sweep": "0.1,0.4", "tab": "sweep"}
    params.pop("subject")
    at = open_page(params)
    assert not at.exception and not errors(at), errors(at)
    sweeps = [c for c in charts_of(at) if "several noise levels" in c.proto.spec]
    assert len(sweeps) == 1
    spec = json.loads(sweeps[0].proto.spec)
    panels = [{**p, "data": p.get("data", row.get("data"))}
              for row in spec["vconcat"] for p in row["hconcat"]]
    assert [p["title"]["text"] for p in panels] == ["noise 0.1", "noise 0.4"]
    domains = {json.dumps(p["encoding"]["color"]["scale"]["domain"]) for p in panels}
    assert len(domains) == 1
    # the 0.4 panel is the main trace (same settings, same numbers)
    main = shown(at)["traces"]["hidden"]
    panel = panels[1]["data"]["name"]
    rows = next(pa.ipc.open_stream(d.data.data).read_pandas() for d in sweeps[0].proto.datasets
                if d.name == panel)
    assert rows["value"].tolist() == pytest.approx(main.scores.ravel().tolist())
    at.text_input(key="trace_sweep").set_value("0.1, lots").run()
    assert any("Bad noise levels" in e for e in errors(at))


def test_rows_choice_computes_only_those_rows():
    at = open_page({**SHORT, "rows": "noised_final"})
    assert not at.exception and not errors(at), errors(at)
    trace = shown(at)["traces"]["hidden"]
    n = len(trace.tokens)
    computed = sorted(set(trace.noised) | {n - 1})
    assert trace.settings["rows"] == computed
    skipped = [i for i in range(n) if i not in computed]
    assert np.isnan(trace.scores[skipped]).all() and not np.isnan(trace.scores[computed]).any()
    _, rows = heatmap(at)
    empty = rows[rows["value"].isna()]["token_index"].unique().tolist()
    assert sorted(empty) == skipped  # skipped rows are drawn empty, not faked
    assert at.query_params["rows"] in (["noised_final"], "noised_final")
    # chosen rows, and a bad choice says so
    at.radio(key="trace_rows").set_value("chosen").run()
    assert any("No rows to compute" in e for e in errors(at))
    at.multiselect(key="trace_row_tokens").set_value([0, n - 1]).run()
    assert not errors(at), errors(at)
    assert shown(at)["traces"]["hidden"].settings["rows"] == [0, n - 1]


def test_an_expensive_trace_asks_first_and_offers_cheaper_choices(monkeypatch):
    monkeypatch.setenv("CAUSAL_TRACING_ASK_S", "0.000001")  # every exact trace counts as expensive
    at = open_page({**SHORT, "seed": str(SEED + 7), "samples": "2"})
    assert not at.exception
    asked = [w for w in warnings(at) if "would take about" in w]
    assert asked, warnings(at)
    assert "trace_shown" not in at.session_state  # nothing exact yet
    assert any("APPROXIMATE PREVIEW" in c.proto.spec for c in charts_of(at))  # the preview shows
    labels = {b.key: b.label for b in at.button}
    assert {"trace_cost_go", "trace_cost_rows", "trace_cost_samples"} <= set(labels)
    at.button(key="trace_cost_samples").click().run()  # take the cheaper choice: 1 sample
    assert at.number_input(key="trace_samples").value == 1
    assert any("would take about" in w for w in warnings(at))  # still above the (tiny) limit
    at.button(key="trace_cost_go").click().run()
    assert not at.exception and not errors(at), errors(at)
    assert shown(at)["traces"]["hidden"].settings["samples"] == 1
    assert not any("would take about" in w for w in warnings(at))


def test_a_completion_without_its_leading_space_is_flagged_with_a_fix():
    at = open_page({**SHORT, "target": "Paris"})
    assert not at.exception
    assert any("no leading space" in w for w in warnings(at)), warnings(at)
    at.button(key="trace_spaced_target").click().run()
    assert at.text_input(key="trace_target").value == " Paris"
    assert not any("no leading space" in w for w in warnings(at))


def test_my_pick_starts_from_the_subjects_tokens_and_shows_them_once():
    at = open_page(SHORT)
    subject = list(shown(at)["traces"]["hidden"].noised)
    at.radio(key="trace_noise_by").set_value("tokens").run()
    assert not at.exception and not errors(at), errors(at)
    assert list(at.session_state["trace_tokens"]) == subject
    assert not [h for h in at.get("html") if "iffel" in h.proto.body]  # pills only, no chips
    # the subject is still there when coming back to it
    at.radio(key="trace_noise_by").set_value("subject").run()
    assert at.text_input(key="trace_subject").value == "Eiffel Tower" and not errors(at)


def test_all_three_kinds_each_have_their_own_summary():
    at = open_page({**SHORT, "kind": "all"})
    assert not at.exception and not errors(at), errors(at)
    traces = shown(at)["traces"]
    table = next(d.value for d in at.dataframe if "transition layer" in d.value.columns)
    assert table["restored"].tolist() == ["Hidden state", "MLP", "Attention"]
    for (_, row), trace in zip(table.iterrows(), traces.values()):
        assert row["clean"] == pytest.approx(trace.high) and row["corrupted"] == pytest.approx(trace.low)
        assert row["best restoration"] == pytest.approx(float(np.nanmax(trace.scores)))


def test_severed_paths_tab_compares_three_exact_rows(embedded):
    from tracing.causal import causal_trace

    at = open_page({**SHORT, "tab": "severed"})
    assert not at.exception and not errors(at), errors(at)
    chart = next(c for c in charts_of(at) if "Severed paths at token" in c.proto.spec)
    rows = chart_rows(chart) if "effect" in chart_rows(chart) else next(
        pa.ipc.open_stream(d.data.data).read_pandas() for d in chart.proto.datasets
        if "effect" in pa.ipc.open_stream(d.data.data).read_pandas())
    main = shown(at)["traces"]["hidden"]
    token = max(main.noised)  # the default: the last noised token
    for part in (None, "mlp", "attn"):
        expected = causal_trace(embedded, main.prompt, main.noised, settings=main.trace_settings.replace(sever=part),
                                rows=[token]).scores[token]
        got = rows[rows["sever"] == (part or "none")].sort_values("layer")["value"].to_numpy()
        assert got == pytest.approx(expected, abs=1e-6), part
    assert at.query_params["tab"] in (["severed"], "severed")
    # severing as the main trace's own setting: a severed heatmap
    at.selectbox(key="trace_sever").set_value("mlp").run()
    assert not at.exception and not errors(at), errors(at)
    assert shown(at)["traces"]["hidden"].sever == "mlp"
    assert at.query_params["sever"] in (["mlp"], "mlp")


def test_the_page_never_pushes_a_value_back_to_a_widget_the_user_moves():
    """A re-set of a widget's own value sends it back to the browser and undoes a slider the user
    is still moving (arrow keys during a rerun): after a user's change no widget is told a value,
    and a widget in a closed tab keeps what the user set."""
    at = open_page(SHORT)
    at.slider(key="trace_noise").set_value(0.5).run()
    pushed = [w.key for w in (*at.slider, *at.number_input, *at.text_input, *at.radio, *at.selectbox)
              if w.proto.set_value and not w.proto.disabled]  # a disabled widget: nothing to undo
    assert pushed == []
    show_tab(at, "compare")
    at.radio(key="trace_compare").set_value("noise").run()
    show_tab(at, "heatmap")
    show_tab(at, "compare")
    assert at.radio(key="trace_compare").value == "noise"
    assert not at.exception and not errors(at)
