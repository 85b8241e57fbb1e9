"""Charts of traces (tracing/charts/trace.py) and the transition rule (tracing/analysis.py) on
hand-made traces (tests/factory.py): data, palettes, labels, transition."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from factory import make_trace
from tracing import analysis
from tracing.charts import style
from tracing.charts import trace as charts

def spec_data(chart) -> list[dict]:
    """Every row of every dataset in a chart's Vega-Lite spec."""
    spec = chart.to_dict()
    return [row for rows in spec.get("datasets", {}).values() for row in rows]


def walk(spec, key: str):
    """Every value of ``key`` anywhere in a nested spec."""
    if isinstance(spec, dict):
        for k, v in spec.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(spec, list):
        for v in spec:
            yield from walk(v, key)


@pytest.mark.parametrize("metric", ["prob", "normalised", "logprob", "kl"])
def test_heatmap_data_are_the_trace_numbers(metric):
    trace = make_trace()
    rows = spec_data(charts.heatmap(trace, metric))
    assert len(rows) == trace.scores.size
    expected = trace.metric(metric)
    for row in rows:
        assert row["value"] == pytest.approx(expected[row["token_index"], row["layer"]], abs=0, rel=1e-12)
        assert row["prob"] == trace.scores[row["token_index"], row["layer"]]
        assert row["noised"] == (row["token_index"] in trace.noised)


def test_labels_mark_noised_tokens_and_keep_order():
    trace = make_trace(noised=(2,))
    labels = charts.token_labels(trace)
    assert labels == ["0 The", "1 ␣E", "2 iffel*", "3 ␣Tower", "4 ␣is", "5 ␣in"]
    spec = charts.heatmap(trace).to_dict()
    assert spec["encoding"]["y"]["sort"] == labels
    assert spec["encoding"]["x"]["field"] == "layer"


def test_legend_title_tooltips_and_titles():
    trace = make_trace(contrast=" Rome")
    spec = charts.heatmap(trace).to_dict()
    assert spec["encoding"]["color"]["legend"]["title"] == 'p(" Paris")'
    tips = {t["field"]: t for t in spec["encoding"]["tooltip"]}
    assert tips["value"]["title"] == 'p(" Paris")' and tips["value"]["format"] == ".6g"
    assert {"token", "layer", "token_index", "noised"} <= set(tips)
    assert spec["autosize"]["type"] == "pad"  # natural size in Streamlit, not squeezed
    assert charts.metric_title(trace, "normalised") == 'normalised p(" Paris")'
    assert charts.metric_title(trace, "logprob") == 'log p(" Paris")'
    assert charts.metric_title(trace, "logit_diff") == 'logit(" Paris") − logit(" Rome")'
    assert "KL" in charts.metric_title(trace, "kl")
    norm = charts.heatmap(trace, "normalised").to_dict()
    assert {t["field"] for t in norm["encoding"]["tooltip"]} >= {"value", "prob"}
    assert "entering block l" in spec["encoding"]["x"]["title"]
    mlp = make_trace(kind="mlp")
    assert "10 restored MLP layers" in charts.heatmap(mlp).to_dict()["encoding"]["x"]["title"]


@pytest.mark.parametrize("kind,dark", [("hidden", "#3f007d"), ("mlp", "#00441b"), ("attn", "#67000d")])
def test_rome_palettes_from_white_at_the_corrupted_value(kind, dark):
    trace = make_trace(kind=kind)
    scale = charts.heatmap(trace).to_dict()["encoding"]["color"]["scale"]
    assert scale["range"][-1] == dark and scale["range"][0].startswith("#f")
    assert scale["domain"][0] == pytest.approx(trace.low)
    assert scale["domain"][-1] == pytest.approx(trace.scores.max())
    assert scale["clamp"] is True
    kl = charts.heatmap(trace, "kl").to_dict()["encoding"]["color"]["scale"]
    assert kl["range"][0] == dark  # lower KL is better: darkest at the low end
    assert kl["domain"][-1] == pytest.approx(trace.metric_low["kl"])


def test_transition_layer():
    trace = make_trace(noised=(2,), n_layers=8)
    assert analysis.transition_layer(trace) == 4
    assert analysis.transition_layer(trace, "normalised") == 4
    assert analysis.transition_layer(trace, "kl") == 4  # lower is better, same crossing
    scores = np.full((6, 5), 0.1)
    scores[2] = [0.5, 0.5, 0.5, 0.5, 0.5]
    scores[-1] = [0.0, 0.6, 0.6, 0.4, 0.6]  # wins, loses, then wins for good
    assert analysis.transition_layer(make_trace(noised=(2,), scores=scores)) == 4
    scores[-1, -1] = 0.2  # never wins at the last layer
    assert analysis.transition_layer(make_trace(noised=(2,), scores=scores)) is None
    scores[-1] = 0.9  # wins everywhere
    assert analysis.transition_layer(make_trace(noised=(2,), scores=scores)) == 0
    assert analysis.transition_layer(make_trace(noised=(2, 5), scores=scores)) is None


def test_followed_noised_token_is_compared():
    scores = np.full((6, 4), 0.1)
    scores[1] = 0.2
    scores[3] = [0.6, 0.6, 0.2, 0.1]
    scores[-1] = [0.1, 0.1, 0.5, 0.6]
    trace = make_trace(noised=(1, 3), scores=scores)
    assert analysis.followed_token(trace) == 3
    assert analysis.transition_layer(trace) == 2
    assert analysis.transition_layer(trace, token=1) == 2
    frame = charts.compact_frame(trace)
    assert list(dict.fromkeys(frame["row"])) == ["other noised token", "noised token", "final token"]
    final = frame[frame["row"] == "final token"]
    assert final["value"].tolist() == scores[-1].tolist()


def test_compact_chart():
    trace = make_trace(noised=(2,), n_layers=8)
    spec = charts.compact(trace, "normalised").to_dict()
    assert "transition at layer 4" in " ".join(spec["title"]["subtitle"])
    rows = spec_data(charts.compact(trace, "normalised"))
    cells = [r for r in rows if "row" in r and r.get("row") == "final token"]
    assert [r["value"] for r in cells][:8] == pytest.approx(trace.normalised()[-1].tolist())
    assert any(r.get("text") == "transition: layer 4" for r in rows)
    never = make_trace(noised=(2,), scores=np.full((6, 4), 0.1))
    assert "no transition" in " ".join(charts.compact(never).to_dict()["title"]["subtitle"])


def panels_of(spec: dict, data: dict | None = None) -> list[dict]:
    """The heatmap panels of a composite chart in reading order (each with its data)."""
    data = spec.get("data", data)
    if "hconcat" in spec or "vconcat" in spec:
        parts = spec.get("hconcat", spec.get("vconcat"))
        return [p for part in parts for p in panels_of(part, data)]
    return [{**spec, "data": data}]


def test_noise_sweep_shares_one_colour_scale():
    traces = {level: make_trace(noise=level, seed=i, low=0.3 - 0.1 * i)
              for i, level in enumerate([1.0, 0.1, 0.5])}
    spec = charts.noise_sweep(traces).to_dict()
    panels = panels_of(spec)
    assert [p["title"]["text"] for p in panels] == ["noise 0.1", "noise 0.5", "noise 1"]
    assert [len(row["hconcat"]) for row in spec["vconcat"]] == [2, 1]
    domains = [p["encoding"]["color"]["scale"]["domain"] for p in panels]
    assert all(d == domains[0] for d in domains)
    assert domains[0][0] == pytest.approx(min(t.low for t in traces.values()))
    assert domains[0][-1] == pytest.approx(max(t.scores.max() for t in traces.values()))
    legends = [p["encoding"]["color"].get("legend") for p in panels]
    assert all(legend == legends[0] for legend in legends) and legends[0]  # one legend, merged
    assert spec["resolve"]["scale"]["color"] == "shared"
    import vl_convert as vlc
    svg = vlc.vegalite_to_svg(charts.noise_sweep(traces).to_json())
    assert svg.count('role-legend-title') == 1  # drawn once, without Vega's "conflicting legend" warning
    values = {p["title"]["text"]: [r["value"] for r in spec["datasets"][p["data"]["name"]]]
              for p in panels}
    assert values["noise 0.5"] == traces[0.5].scores.ravel().tolist()
    row = charts.noise_sweep(traces, per_row=4).to_dict()
    assert [len(r["hconcat"]) for r in row["vconcat"]] == [3]
    with pytest.raises(ValueError):
        charts.noise_sweep({})


def test_kinds_side_by_side_use_their_palettes():
    traces = {k: make_trace(kind=k) for k in ("hidden", "mlp", "attn")}
    spec = charts.kinds_side_by_side(traces).to_dict()
    ranges = [p["encoding"]["color"]["scale"]["range"][-1] for p in spec["hconcat"]]
    assert ranges == ["#3f007d", "#00441b", "#67000d"]
    assert [p["title"]["text"] for p in spec["hconcat"]] == [
        "Hidden states", "MLP outputs (window 10)", "Attention outputs (window 10)"]
    assert all(p["width"] * 3 <= charts.PLOT_BUDGET for p in spec["hconcat"])  # fits a page
    assert spec["resolve"]["scale"]["color"] == "independent"


def test_png_and_svg_exports_are_valid():
    trace = make_trace()
    for chart in (charts.heatmap(trace), charts.compact(trace), charts.noise_sweep({0.1: trace})):
        png = style.to_png(chart, scale=1)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        svg = style.to_svg(chart)
        root = ET.parse(io.StringIO(svg)).getroot()
        assert root.tag.endswith("svg")
    assert "Paris" in style.to_svg(charts.heatmap(trace))
