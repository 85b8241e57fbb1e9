"""Altair charts of causal traces (no Streamlit).

- ``heatmap``: tokens down (noised tokens marked ``*``), layers across, ROME's palettes (hidden
  purple, MLP green, attention red), exact numbers in tooltips, the legend titled with the metric
  and target, e.g. ``p(" Paris")``.
- ``compact``: only the (last) noised token and the final token, as in the seed study's figures,
  with the transition layer (``transition_layer``).
- ``noise_sweep``: the same trace at several noise levels on one colour scale.
- ``kinds_side_by_side``: hidden / MLP / attention traces next to each other.
- ``ab_pair``, ``difference_heatmap``, ``compact_pair``: the A/B comparison (two traces on one
  colour scale, B − A, and both compact curves on one chart).

A heatmap made with ``pick=True`` has a click selection named ``PICK`` over (token_index, layer):
Streamlit's ``on_select`` reports the clicked cell.

Colour scales start at the corrupted run's value (ROME's ``vmin = low``): white = no better than
the corrupted run. For the KL divergence, where lower is better, the scale is reversed.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

from ..analysis import ab_difference, followed_token, transition_layer
from ..causal import Trace
from ..settings import lower_is_better
from .style import (KIND_LABELS, RAMPS, SHORT_KIND, TOKEN_COLOURS, ellipsis, pad, quote_token, show_token,
                    token_labels as style_token_labels)

ROW_COLORS = {"noised token": TOKEN_COLOURS["noised"], "final token": TOKEN_COLOURS["final"]}
CELL_WIDTH = 21
CELL_HEIGHT = 24
PLOT_BUDGET = 760  # px of plot width that composite charts spread over their panels
MAX_TITLE = 90
PICK = "cell"  # the click selection of a pickable heatmap
DIFFERENCE_SCHEME = "redblue"  # B − A: red where B is lower, blue where B is higher


# ---------------------------------------------------------------------------------------------
# Labels


def token_labels(trace: Trace) -> list[str]:
    """One unique label per token: its index, the token, and ``*`` when it is noised."""
    return style_token_labels(trace.tokens, trace.noised)


def contrast_label(trace: Trace) -> str:
    """The contrast answer of a logit-difference trace, as given."""
    contrast = trace.settings.get("contrast")
    if isinstance(contrast, str):
        return quote_token(contrast)
    return f"token {contrast}"


def metric_title(trace: Trace, metric: str) -> str:
    """Legend title of a metric for this trace's target, e.g. ``p(" Paris")``."""
    target = quote_token(trace.target)
    titles = {
        "prob": f"p({target})",
        "normalised": f"normalised p({target})",
        "logprob": f"log p({target})",
        "logit_diff": f"logit({target}) − logit({contrast_label(trace)})",
        "kl": "KL(clean ‖ restored)",
    }
    if metric not in titles:
        raise ValueError(f"Unknown metric '{metric}'.")
    return titles[metric]


def layer_title(trace: Trace) -> str:
    """What a column of the heatmap means for this trace's kind and convention."""
    if trace.kind == "hidden":
        where = "entering" if trace.convention == "input" else "leaving"
        return f"layer l: clean hidden state {where} block l restored"
    return f"layer l: centre of {trace.window} restored {KIND_LABELS[trace.kind]} layers"


def kind_title(trace: Trace) -> str:
    """Chart title: what was restored."""
    if trace.kind == "hidden" and trace.sever:
        part = {"mlp": "MLP", "attn": "attention"}[trace.sever]
        return f"Restoring one clean hidden state, its later {part} outputs kept corrupted (severed)"
    if trace.kind == "hidden":
        return "Restoring one clean hidden state"
    return f"Restoring clean {KIND_LABELS[trace.kind]} outputs ({trace.window}-layer window)"


def noise_text(trace: Trace) -> str:
    """The corruption in a few words: 'Gaussian noise σ = 0.4', 'replaced by ...'."""
    s = trace.settings
    corruption = s.get("corruption", "gaussian")
    if corruption == "replace":
        return f"tokens replaced by {ellipsis(str(s.get('replacement')), 40)!r}"
    level = f"{s.get('noise', 0):g}"
    if s.get("noise_mode") == "sigma":
        level = f"{level} × embedding σ = {trace.noise_std:.3g}"
    name = "uniform noise ±" if corruption == "uniform" else "Gaussian noise σ = "
    return f"{name}{level}, {s.get('samples')} samples, seed {s.get('seed')}"


# ---------------------------------------------------------------------------------------------
# Data


PREVIEW_NOTE = ("APPROXIMATE PREVIEW (attribution patching): faded cells are first-order estimates, "
                "replaced by exact ones as they are computed")


def _preview_lines(traces: Sequence[Trace]) -> list[str]:
    """The preview mark for a composed chart's title, when any of its traces is a preview."""
    return [PREVIEW_NOTE] if any(t.approximate for t in traces) else []


def trace_frame(trace: Trace, metric: str = "prob") -> pd.DataFrame:
    """Long table, one row per (token, layer): the chosen metric as ``value`` plus every metric."""
    values = trace.metric(metric)
    labels = token_labels(trace)
    n_tokens, n_layers = values.shape
    tokens, layers = np.meshgrid(np.arange(n_tokens), np.arange(n_layers), indexing="ij")
    frame = pd.DataFrame({
        "token_index": tokens.ravel(),
        "token": [trace.tokens[i] for i in tokens.ravel()],
        "label": [labels[i] for i in tokens.ravel()],
        "noised": np.isin(tokens.ravel(), trace.noised),
        "layer": layers.ravel(),
        "value": values.ravel().astype(float),
    })
    for name in ("prob", "normalised", "logprob", "kl", "logit_diff"):
        if name == "normalised" or name in trace.metrics:
            frame[name] = trace.metric(name).ravel().astype(float)
    return frame


def metric_domain(traces: Sequence[Trace], metric: str) -> list[float]:
    """Colour domain shared by ``traces``: from the corrupted run's value to the best cell."""
    lows = [trace.metric_bounds(metric)[0] for trace in traces]
    values = np.concatenate([trace.metric(metric).ravel() for trace in traces])
    if lower_is_better(metric):
        low, high = float(np.nanmin(values)), float(max(lows))
    else:
        low, high = float(min(lows)), float(np.nanmax(values))
    if not high > low:
        high = low + 1e-9
    return [low, high]


# ---------------------------------------------------------------------------------------------
# Heatmaps


def color_scale(kind: str, metric: str, domain: Sequence[float]) -> alt.Scale:
    """The kind's ramp (white = the corrupted run's value) spread over ``domain``, clamped."""
    ramp = RAMPS[kind][::-1] if lower_is_better(metric) else RAMPS[kind]
    stops = np.linspace(float(domain[0]), float(domain[1]), len(ramp)).tolist()
    return alt.Scale(domain=stops, range=ramp, clamp=True, interpolate="lab")


def _color(trace: Trace, metric: str, domain: Sequence[float], legend: bool,
           length: int | None = None, bottom: bool = False) -> alt.Color:
    if not legend:
        return alt.Color("value:Q", scale=color_scale(trace.kind, metric, domain), legend=None)
    length = length or max(120, CELL_HEIGHT * len(trace.tokens))
    where = dict(orient="bottom", direction="horizontal") if bottom else dict(orient="right")
    legend_spec = alt.Legend(title=metric_title(trace, metric), gradientLength=length,
                             format=".3~g", titleLimit=400, **where)
    return alt.Color("value:Q", scale=color_scale(trace.kind, metric, domain), legend=legend_spec)


def _cell_width(n_layers: int, panels: int, budget: int = PLOT_BUDGET) -> int:
    """Cell width that fits ``panels`` heatmaps of ``n_layers`` side by side in ``budget`` px."""
    return int(max(4, min(CELL_WIDTH, budget // (panels * n_layers))))


def fitted_cell_width(n_layers: int, budget: int) -> int:
    """Cell width of one heatmap of ``n_layers`` in ``budget`` px of plot width."""
    return _cell_width(n_layers, 1, budget)


def _tooltip(trace: Trace, metric: str) -> list[alt.Tooltip]:
    tips = [alt.Tooltip("token_index:Q", title="token #"), alt.Tooltip("token:N", title="token"),
            alt.Tooltip("noised:N", title="noised"), alt.Tooltip("layer:Q", title="layer"),
            alt.Tooltip("value:Q", title=metric_title(trace, metric), format=".6g")]
    if metric != "prob":
        tips.append(alt.Tooltip("prob:Q", title=f"p({quote_token(trace.target)})", format=".6g"))
    return tips


def heatmap(trace: Trace, metric: str = "prob", **options) -> alt.Chart:
    """ROME-style heatmap of one trace in one metric (options: see ``heatmap_layer``)."""
    return pad(heatmap_layer(trace, metric, **options))


def heatmap_layer(trace: Trace, metric: str = "prob", *, domain: Sequence[float] | None = None,
                  title: str | None = None, subtitle: list[str] | None = None,
                  legend: bool = True, legend_bottom: bool = False, y_labels: bool = True,
                  x_title: str | None = None, cell_width: int = CELL_WIDTH,
                  cell_height: int = CELL_HEIGHT, exact: np.ndarray | None = None,
                  pick: bool | alt.Parameter = False) -> alt.Chart:
    """The heatmap without top-level settings, for composing: colour ``domain`` (default from the
    corrupted run's value to the best cell), titles, legend, y labels and cell size. An
    approximate trace (a preview) is titled so, and its cells are faded except where ``exact``
    ([T, L] booleans: cells already computed exactly) is True. ``pick``: a click selects a cell
    (selection ``PICK``, outlined); a selection parameter instead of True: the composed chart
    that holds this one adds it (one selection over several panels)."""
    data = trace_frame(trace, metric)
    domain = domain or metric_domain([trace], metric)
    low, high = trace.metric_bounds(metric)
    panel = subtitle is not None  # a panel of a composed chart: short titles
    if subtitle is None:
        subtitle = [f"{ellipsis(trace.prompt, MAX_TITLE)}  ·  * = noised",
                    f"{noise_text(trace)}  ·  corrupted {low:.4g}, clean {high:.4g}"]
    if trace.approximate:
        data["exact"] = (np.zeros(trace.scores.shape, bool) if exact is None else np.asarray(exact)).ravel()
        share = f"{data['exact'].mean():.0%} exact so far" if data["exact"].any() else "no cell exact yet"
        subtitle = [f"PREVIEW ({share})" if panel else PREVIEW_NOTE + f" ({share})", *subtitle]
    width = cell_width * trace.n_layers
    y = alt.Y("label:N", sort=token_labels(trace), title=None,
              axis=alt.Axis(labels=y_labels, ticks=y_labels, labelLimit=160))
    step = 1 if cell_width >= 16 else 2 if cell_width >= 9 else 5
    x = alt.X("layer:O", title=x_title or layer_title(trace),
              axis=alt.Axis(labelAngle=0, titleLimit=width + 40,
                            values=list(range(0, trace.n_layers, step))))
    color = _color(trace, metric, domain, legend, length=int(width * 0.7) if legend_bottom else None,
                   bottom=legend_bottom)
    encoding = dict(x=x, y=y, color=color, tooltip=_tooltip(trace, metric))
    if trace.approximate:
        encoding["opacity"] = alt.condition("datum.exact", alt.value(1.0), alt.value(0.4))
    chart = alt.Chart(data).mark_rect(stroke="white", strokeWidth=0.3).encode(**encoding)
    if pick is not False:
        cell = pick_cell() if pick is True else pick
        chart = (chart.add_params(cell) if pick is True else chart).encode(
            stroke=alt.condition(cell, alt.value("black"), alt.value("white"), empty=False),
            strokeWidth=alt.condition(cell, alt.value(2.0), alt.value(0.3), empty=False))
    return chart.properties(
        width=width, height=cell_height * len(trace.tokens),
        title=alt.TitleParams((title or kind_title(trace)) + (" · preview" if trace.approximate else ""),
                              subtitle=subtitle, anchor="start", subtitleColor="#555"))


def pick_cell() -> alt.Parameter:
    """The click selection of a heatmap cell (``PICK``: token_index and layer; double-click clears)."""
    return alt.selection_point(name=PICK, fields=["token_index", "layer"], on="click", clear="dblclick")


def kinds_side_by_side(traces: Mapping[str, Trace], metric: str = "prob",
                       exact: Mapping[str, np.ndarray | None] | None = None,
                       pick: bool = False, budget: int = PLOT_BUDGET) -> alt.HConcatChart:
    """Hidden, MLP and attention traces next to each other, each on its own palette (``exact``:
    per kind, the exact-cell mask of a preview being refined; see ``heatmap_layer``; ``pick``: a
    click in any panel selects a cell, ``PICK``; ``budget``: px of plot width for all panels)."""
    first = next(iter(traces.values()))
    cell = pick_cell() if pick else False
    width = _cell_width(first.n_layers, len(traces), budget)
    charts = []
    for i, (name, trace) in enumerate(traces.items()):
        window = "" if trace.kind == "hidden" else f" (window {trace.window})"
        charts.append(heatmap_layer(
            trace, metric, title=SHORT_KIND[trace.kind] + window, subtitle=[], legend_bottom=True,
            y_labels=i == 0, x_title="layer" if trace.kind == "hidden" else "centre layer",
            cell_width=width, cell_height=CELL_HEIGHT - 4, exact=(exact or {}).get(name), pick=cell))
    combined = alt.hconcat(*charts)
    if cell is not False:  # one top-level selection over every panel (Altair's add_params would warn)
        names = [f"{PICK}_panel_{i}" for i in range(len(charts))]
        combined.hconcat = [panel.properties(name=name) for panel, name in zip(charts, names)]
        combined.params = [alt.TopLevelSelectionParameter(name=PICK, select=cell.param.select, views=names)]
    return pad(combined.resolve_scale(color="independent")).properties(
        title=alt.TitleParams(
            "Restoring hidden states, MLP outputs and attention outputs",
            subtitle=[*_preview_lines(list(traces.values())),
                      f"{ellipsis(first.prompt, MAX_TITLE)}  ·  * = noised", noise_text(first)],
            anchor="start", subtitleColor="#555"))


def shared_scale_panels(panels: Mapping[str, Trace], metric: str = "prob", per_row: int = 2,
                        exact: Mapping[str, np.ndarray | None] | None = None) -> alt.VConcatChart:
    """Heatmaps titled by ``panels``' keys on one colour scale, ``per_row`` a row, one merged
    legend (``exact``: per panel, the exact-cell mask of a preview being refined)."""
    if not panels:
        raise ValueError("Nothing to draw: give at least one trace.")
    ordered = list(panels.values())
    domain = metric_domain(ordered, metric)
    per_row = max(1, min(per_row, len(ordered)))
    width = _cell_width(ordered[0].n_layers, per_row)
    charts = []
    for i, (name, trace) in enumerate(panels.items()):
        low = trace.metric_bounds(metric)[0]
        charts.append(heatmap_layer(
            trace, metric, domain=domain, title=name, subtitle=[f"corrupted {low:.4g}"], legend=True,
            y_labels=i % per_row == 0 or list(trace.tokens) != list(ordered[0].tokens), x_title="layer",
            cell_width=width, cell_height=CELL_HEIGHT - 4, exact=(exact or {}).get(name)))
    rows = [alt.hconcat(*charts[i:i + per_row]) for i in range(0, len(charts), per_row)]
    return pad(alt.vconcat(*rows).resolve_scale(color="shared"))


def noise_sweep(traces: Mapping[float, Trace], metric: str = "prob", per_row: int = 2,
                exact: Mapping[float, np.ndarray | None] | None = None) -> alt.VConcatChart:
    """The same trace at several noise levels on one colour scale, ``per_row`` panels a row
    (``exact``: per level, the exact-cell mask of a preview being refined)."""
    if not traces:
        raise ValueError("The noise sweep needs at least one noise level.")
    levels = sorted(traces)
    unit = " × σ" if traces[levels[0]].settings.get("noise_mode") == "sigma" else ""
    names = {level: f"noise {traces[level].settings.get('noise', 0):g}{unit}" for level in levels}
    first = traces[levels[0]]
    chart = shared_scale_panels({names[level]: traces[level] for level in levels}, metric, per_row,
                                {names[level]: (exact or {}).get(level) for level in levels})
    return chart.properties(
        title=alt.TitleParams(
            f"{kind_title(first)} at several noise levels (one colour scale)",
            subtitle=[*_preview_lines([traces[k] for k in levels]), ellipsis(first.prompt, MAX_TITLE) + "  ·  * = noised",
                      f"{first.settings.get('samples')} samples, seed {first.settings.get('seed')}"],
            anchor="start", subtitleColor="#555"))


# ---------------------------------------------------------------------------------------------
# A/B comparison


def ab_pair(a: Trace, b: Trace, metric: str = "prob", names: Sequence[str] = ("A", "B"),
            exact: Mapping[str, np.ndarray | None] | None = None) -> alt.VConcatChart:
    """Traces A and B side by side on one colour scale (``names``: their panel titles)."""
    chart = shared_scale_panels(dict(zip(names, (a, b))), metric, per_row=2, exact=exact)
    return chart.properties(title=alt.TitleParams(
        f"A/B: {kind_title(a)} (one colour scale)",
        subtitle=[*_preview_lines([a, b]), f"A: {ellipsis(a.prompt, MAX_TITLE)}  ·  {noise_text(a)}",
                  f"B: {ellipsis(b.prompt, MAX_TITLE)}  ·  {noise_text(b)}"],
        anchor="start", subtitleColor="#555"))


def pair_title(a: Trace, b: Trace, metric: str) -> str:
    """The metric's title for two traces: ``p(" Paris")``, or "prob of each one's target"."""
    return metric_title(a, metric) if a.target_id == b.target_id else f"{metric} of each one's target"


def difference_frame(a: Trace, b: Trace, metric: str = "prob") -> pd.DataFrame:
    """``analysis.ab_difference`` with tokens shown as in every chart (visible spaces)."""
    return ab_difference(a, b, metric, token_text=show_token)


def difference_heatmap(a: Trace, b: Trace, metric: str = "prob") -> alt.Chart:
    """B − A per row and layer on a diverging scale centred on 0 (rows: tokens when the prompts
    have as many tokens, else ROME's six positions)."""
    data = difference_frame(a, b, metric)
    limit = float(np.nanmax(np.abs(data["difference"]))) if len(data) else 0.0
    limit = limit if limit > 0 else 1e-9
    title = pair_title(a, b, metric)
    by = "token by token" if data["aligned"].iloc[0] == "token" else "on ROME's six positions (mean per position)"
    order = list(dict.fromkeys(data.sort_values("order")["row"]))
    tips = [alt.Tooltip("row:N", title="row"), alt.Tooltip("layer:Q", title="layer"),
            alt.Tooltip("a:Q", title=f"A {title}", format=".4g"), alt.Tooltip("b:Q", title=f"B {title}", format=".4g"),
            alt.Tooltip("difference:Q", title="B − A", format=".4g")]
    chart = alt.Chart(data).mark_rect(stroke="white", strokeWidth=0.3).encode(
        x=alt.X("layer:O", title=layer_title(a), axis=alt.Axis(labelAngle=0, labelOverlap=True)),
        y=alt.Y("row:N", sort=order, title=None, axis=alt.Axis(labelLimit=220)),
        color=alt.Color("difference:Q", title=f"B − A ({title})", legend=alt.Legend(format=".3~g", titleLimit=400),
                        scale=alt.Scale(scheme=DIFFERENCE_SCHEME, domain=[-limit, limit], domainMid=0)),
        tooltip=tips,
    ).properties(width=CELL_WIDTH * a.n_layers, height=CELL_HEIGHT * len(order))
    return pad(chart).properties(title=alt.TitleParams(
        "B − A", subtitle=[f"aligned {by}", "blue: B higher, red: A higher"], anchor="start",
        subtitleColor="#555"))


def compact_pair(a: Trace, b: Trace, metric: str = "prob", names: Sequence[str] = ("A", "B")) -> alt.LayerChart:
    """The noised-token and final-token curves of A (solid) and B (dashed) on one chart."""
    parts = []
    for name, trace in zip(names, (a, b)):
        if trace.last_token_noised:
            raise ValueError(f"{name}: the final token is noised, so there is no noised-vs-final curve.")
        data = compact_frame(trace, metric)
        parts.append(data[data["row"] != "other noised token"].assign(trace=name))
    data = pd.concat(parts, ignore_index=True)
    title = pair_title(a, b, metric)
    color = alt.Color("row:N", title=None, scale=alt.Scale(domain=list(ROW_COLORS), range=list(ROW_COLORS.values())),
                      legend=alt.Legend(orient="bottom", symbolType="stroke"))
    dash = alt.StrokeDash("trace:N", title=None, scale=alt.Scale(domain=list(names), range=[[1, 0], [5, 3]]),
                          legend=alt.Legend(orient="bottom", symbolType="stroke", symbolStrokeColor="#444",
                                            symbolStrokeWidth=2, labelLimit=300))
    lines = alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=16)).encode(
        x=alt.X("layer:Q", title=layer_title(a), scale=alt.Scale(domain=[0, a.n_layers - 1], nice=False),
                axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("value:Q", title=title), color=color, strokeDash=dash, detail="trace:N",
        tooltip=["trace:N", "row:N", "token:N", "layer:Q", alt.Tooltip("value:Q", title=title, format=".6g")],
    ).properties(width=CELL_WIDTH * a.n_layers, height=200)
    said = []
    for name, trace in zip(names, (a, b)):
        layer = transition_layer(trace, metric)
        said.append(f"{name}: transition at layer {layer}" if layer is not None else f"{name}: no transition")
    return pad(lines).properties(title=alt.TitleParams(
        "Noised token vs final token, A and B", subtitle=["  ·  ".join(said)], anchor="start", subtitleColor="#555"))


# ---------------------------------------------------------------------------------------------
# Noised token vs final token


def compact_frame(trace: Trace, metric: str = "prob") -> pd.DataFrame:
    """Rows of the noised tokens and the final token, long: row, label, token_index, token, layer,
    value, prob. ``row`` is "noised token" for the strongest noised token, "final token" for the
    last one and "other noised token" for the rest."""
    values = trace.metric(metric)
    final = len(trace.tokens) - 1
    strongest = followed_token(trace, metric)
    parts = []
    for index in [i for i in trace.noised if i != final] + [final]:
        row = ("final token" if index == final else
               "noised token" if index == strongest else "other noised token")
        name = "final" if index == final else "noised"
        parts.append(pd.DataFrame({
            "row": row, "token_index": index, "token": trace.tokens[index],
            "label": f"{name}: {index} {show_token(trace.tokens[index])}",
            "layer": np.arange(trace.n_layers), "value": values[index].astype(float),
            "prob": trace.scores[index].astype(float)}))
    return pd.concat(parts, ignore_index=True)


def compact(trace: Trace, metric: str = "prob", width: int | None = None) -> alt.VConcatChart:
    """Heatmap rows of the noised tokens and the final token over the curves of the strongest
    noised token and the final token, with the transition layer."""
    data = compact_frame(trace, metric)
    width = width or CELL_WIDTH * trace.n_layers
    layer = transition_layer(trace, metric)
    title = metric_title(trace, metric)
    order = list(dict.fromkeys(data["label"]))
    tips = [alt.Tooltip("label:N", title="row"), alt.Tooltip("layer:Q", title="layer"),
            alt.Tooltip("value:Q", title=title, format=".6g")]
    x = alt.X("layer:O", title=None, axis=alt.Axis(labelAngle=0, labelOverlap=True))
    cells = alt.Chart(data).mark_rect(stroke="white", strokeWidth=0.3).encode(
        x=x, y=alt.Y("label:N", sort=order, title=None, axis=alt.Axis(labelLimit=200)),
        color=_color(trace, metric, metric_domain([trace], metric), legend=True, length=60),
        tooltip=tips,
    ).properties(width=width, height=CELL_HEIGHT * len(order))
    strongest = data.loc[data["row"] == "noised token", "label"].iloc[0]
    lines = _compact_lines(data[data["row"] != "other noised token"], trace, metric, layer, width)
    said = (f"transition at layer {layer}" if layer is not None
            else "no transition: restoring the final token never wins for good")
    heading = alt.TitleParams(f"Noised token vs final token ({KIND_LABELS[trace.kind]})",
                              subtitle=[ellipsis(trace.prompt, MAX_TITLE),
                                        f"{noise_text(trace)}  ·  {said} (against {strongest})"],
                              anchor="start", subtitleColor="#555")
    return pad(alt.vconcat(cells, lines).resolve_scale(color="independent")).properties(title=heading)


def _compact_lines(data: pd.DataFrame, trace: Trace, metric: str, layer: int | None,
                   width: int) -> alt.LayerChart:
    title = metric_title(trace, metric)
    low, high = trace.metric_bounds(metric)
    color = alt.Color("row:N", title=None, scale=alt.Scale(domain=list(ROW_COLORS),
                                                             range=list(ROW_COLORS.values())),
                      legend=alt.Legend(orient="bottom", symbolType="stroke"))
    tips = ["row:N", "token:N", "layer:Q", alt.Tooltip("value:Q", title=title, format=".6g")]
    x = alt.X("layer:Q", title=layer_title(trace), scale=alt.Scale(domain=[0, trace.n_layers - 1],
                                                                    nice=False),
              axis=alt.Axis(tickMinStep=1, format="d"))
    lines = alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=x, y=alt.Y("value:Q", title=title), color=color, tooltip=tips)
    bounds = pd.DataFrame({"y": [low, high], "what": ["corrupted run", "clean run"]})
    rules = alt.Chart(bounds).mark_rule(strokeDash=[2, 2], color="#999").encode(
        y="y:Q", tooltip=[alt.Tooltip("what:N", title=""), alt.Tooltip("y:Q", format=".6g", title=title)])
    layers = [rules, lines]
    if layer is not None:
        mark = pd.DataFrame({"layer": [layer], "text": [f"transition: layer {layer}"]})
        base = alt.Chart(mark).encode(x="layer:Q")
        layers += [base.mark_rule(color="black", strokeDash=[5, 3], strokeWidth=1.5),
                   base.mark_text(align="left", dx=4, dy=-4, baseline="top", fontSize=11).encode(
                       text="text:N", y=alt.value(0))]
    return alt.layer(*layers).properties(width=width, height=170)


__all__ = [
    "PICK", "ab_pair", "compact", "compact_frame", "compact_pair", "difference_frame", "difference_heatmap",
    "heatmap", "pick_cell", "shared_scale_panels", "heatmap_layer", "kinds_side_by_side", "metric_domain",
    "metric_title", "noise_sweep", "token_labels", "trace_frame",
]
