"""Altair charts for the attention page (no Streamlit)."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ..attention import TARGET_LABELS, TARGETS

from .style import LINE_LEGEND, TOKEN_COLOURS, group_label, group_scale

LOG_FLOOR = 1e-4  # attention weights below this are drawn at the floor on log scales
SCALES = {"linear": "linear", "log": "log"}


MAX_ROWS = 4800  # Altair refuses to embed more than 5000 rows


def thin_positions(length: int, n_lines: int = 1) -> np.ndarray:
    """At most MAX_ROWS / n_lines positions out of 0..length-1: every early one, then evenly spread."""
    budget = max(MAX_ROWS // max(n_lines, 1), 40)
    if length <= budget:
        return np.arange(length)
    head = np.arange(min(20, length))
    rest = np.linspace(20, length - 1, budget - len(head)).round().astype(int)
    return np.unique(np.concatenate([head, rest]))


def _thinned(data: pd.DataFrame, length: int, n_lines: int) -> pd.DataFrame:
    return data[data["position"].isin(thin_positions(length, n_lines))]


TOKEN_AXIS = alt.Axis(labelAngle=-50, labelOverlap=False, labelLimit=140)
PAD = alt.AutoSizeParams(type="pad")  # width/height are the plot area (Streamlit would fit the whole chart)




def _y_scale(scale: str, zero_ok: bool = True) -> alt.Scale:
    if scale == "log":
        return alt.Scale(type="log", clamp=True)
    return alt.Scale(type="linear", zero=zero_ok)


def _floored(frame: pd.DataFrame, columns: list[str], scale: str) -> pd.DataFrame:
    out = frame.copy()
    if scale == "log":
        for c in columns:
            out[c] = out[c].clip(lower=LOG_FLOOR)
    return out


def _with_labels(summary: pd.DataFrame) -> pd.DataFrame:
    out = summary.copy()
    out["prompt type"] = out["category"].map(group_label)
    out["attention to"] = out["target"].map(TARGET_LABELS)
    return out


def _category_sort(summary: pd.DataFrame) -> list[str]:
    return group_scale(summary["category"])[0]


def _target_colour() -> alt.Color:
    """First / noised / final token in the token palette (``style.TOKEN_COLOURS``), legend on top."""
    labels = [TARGET_LABELS[t] for t in TARGETS]
    return alt.Color("attention to:N", sort=labels,
                     scale=alt.Scale(domain=labels, range=[TOKEN_COLOURS[t] for t in TARGETS]),
                     legend=alt.Legend(title="Final token's attention to", orient="top", **LINE_LEGEND))


def layer_lines(summary: pd.DataFrame, scale: str = "linear", width: int = 300, height: int = 260) -> alt.Chart:
    """Per category (panels): mean attention to first / noised / final token against layer, IQR band."""
    data = _floored(_with_labels(summary), ["mean", "q25", "q75"], scale)
    color = _target_colour()
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1))
    y_title = "attention weight (mean over heads and prompts)" + (" · log" if scale == "log" else "")
    base = alt.Chart(data).encode(x=x, color=color)
    band = base.mark_area(opacity=0.15).encode(y=alt.Y("q25:Q", scale=_y_scale(scale)), y2="q75:Q")
    line = base.mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        y=alt.Y("mean:Q", title=y_title, scale=_y_scale(scale)),
        tooltip=["prompt type:N", "attention to:N", "layer:Q", alt.Tooltip("mean:Q", format=".3f"),
                 alt.Tooltip("std:Q", format=".3f"), alt.Tooltip("q25:Q", format=".3f"),
                 alt.Tooltip("q75:Q", format=".3f"), "n:Q"],
    )
    return (band + line).properties(width=width, height=height).facet(
        column=alt.Column("prompt type:N", sort=_category_sort(summary), title=None,
                          header=alt.Header(labelFontSize=13, labelFontWeight="bold")),
    ).properties(title=alt.TitleParams(
        "Final-token attention per layer, by prompt type",
        subtitle=["Line: mean over prompts of the head-averaged weight; band: interquartile range over prompts.",
                  "Un-noised prompts."]))


def prompt_heads(weights: np.ndarray) -> pd.DataFrame:
    """One prompt's final-token attention ``weights`` [layers, heads, 3] (``TARGETS`` order, as in
    ``PromptSetAttention.weights``) as a long table ``layer, head, target, attention``."""
    layer, head, target = np.indices(weights.shape).reshape(3, -1)
    return pd.DataFrame({"layer": layer, "head": head, "target": np.array(TARGETS)[target],
                         "attention": weights.reshape(-1).astype(float)})


def prompt_summary(weights: np.ndarray) -> pd.DataFrame:
    """Per layer and target of one prompt's ``weights`` [layers, heads, 3]: the mean over heads,
    the lowest and highest head and which head is highest (``layer, target, mean, min, max, top_head``)."""
    heads = prompt_heads(weights)
    grouped = heads.groupby(["layer", "target"], sort=False)["attention"]
    out = grouped.agg(["mean", "min", "max"]).reset_index()
    out["top_head"] = heads.loc[grouped.idxmax().to_numpy(), "head"].to_numpy()
    return out


def prompt_lines(weights: np.ndarray, title: str, subtitle: str | list[str] = "", scale: str = "linear",
                 width: int = 560, height: int = 260) -> alt.LayerChart:
    """One prompt: per layer the final token's attention to the first token, the noised tokens
    (summed) and itself; lines: mean over heads, dots: every head (hover for it)."""
    heads = _floored(prompt_heads(weights).assign(**{"attention to": lambda f: f["target"].map(TARGET_LABELS)}),
                     ["attention"], scale)
    summary = _floored(prompt_summary(weights).assign(**{"attention to": lambda f: f["target"].map(TARGET_LABELS)}),
                       ["mean"], scale)
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1))
    y_title = "attention weight" + (" · log" if scale == "log" else "")
    dots = alt.Chart(heads).mark_circle(size=18, opacity=0.3).encode(
        x=x, y=alt.Y("attention:Q", title=y_title, scale=_y_scale(scale)), color=_target_colour(),
        tooltip=["attention to:N", "layer:Q", "head:Q", alt.Tooltip("attention:Q", format=".4f")])
    line = alt.Chart(summary).mark_line(point=alt.OverlayMarkDef(size=20)).encode(
        x=x, y=alt.Y("mean:Q", title=y_title, scale=_y_scale(scale)), color=_target_colour(),
        tooltip=["attention to:N", "layer:Q", alt.Tooltip("mean:Q", format=".4f", title="mean over heads"),
                 alt.Tooltip("min:Q", format=".4f", title="lowest head"),
                 alt.Tooltip("max:Q", format=".4f", title="highest head"), alt.Tooltip("top_head:Q", title="head")])
    return (dots + line).properties(autosize=PAD, width=width, height=height,
                                    title=alt.TitleParams(title, subtitle=subtitle))


def category_lines(summary: pd.DataFrame, target: str, scale: str = "linear", width: int = 640,
                   height: int = 280) -> alt.Chart:
    """One target, categories overlaid: mean attention against layer with IQR bands."""
    data = _floored(_with_labels(summary[summary["target"] == target]), ["mean", "q25", "q75"], scale)
    color = alt.Color("prompt type:N", sort=_category_sort(summary), scale=group_scale(summary["category"])[1],
                      legend=alt.Legend(title="Prompt type", orient="top", **LINE_LEGEND))
    base = alt.Chart(data).encode(x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)), color=color)
    band = base.mark_area(opacity=0.12).encode(y=alt.Y("q25:Q", scale=_y_scale(scale)), y2="q75:Q")
    line = base.mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        y=alt.Y("mean:Q", title=f"attention to the {TARGET_LABELS[target]}" + (" · log" if scale == "log" else ""),
                scale=_y_scale(scale)),
        tooltip=["prompt type:N", "layer:Q", alt.Tooltip("mean:Q", format=".4f"),
                 alt.Tooltip("q25:Q", format=".4f"), alt.Tooltip("q75:Q", format=".4f"), "n:Q"],
    )
    return (band + line).properties(autosize=PAD, width=width, height=height, title=alt.TitleParams(
        f"Final-token attention to the {TARGET_LABELS[target]}: prompt types compared",
        subtitle="Mean over heads and prompts; band: interquartile range over prompts."))


def _color_scale(scale: str, domain_max: float) -> alt.Scale:
    if scale == "log":
        return alt.Scale(type="log", scheme="viridis", domain=[LOG_FLOOR, max(domain_max, LOG_FLOOR * 10)],
                         clamp=True)
    return alt.Scale(scheme="viridis", domain=[0, max(domain_max, 1e-6)])


def _outline(chart: alt.Chart, selection: alt.Parameter) -> alt.Chart:
    """Clickable cells; the clicked one gets a black outline."""
    return chart.add_params(selection).encode(
        stroke=alt.condition(selection, alt.value("black"), alt.value(None), empty=False),
        strokeWidth=alt.condition(selection, alt.value(2.5), alt.value(0), empty=False),
    )


def _value_scale(scale: str, values: pd.Series) -> alt.Scale:
    """Attention weights: viridis from 0 (log: from the floor); effects may be negative: from the minimum."""
    low = float(np.nanmin(values)) if len(values) else 0.0
    if scale == "log" or low >= 0:
        return _color_scale(scale, float(np.nanmax(values)) if len(values) else 1.0)
    return alt.Scale(scheme="viridis", domain=[low, max(float(np.nanmax(values)), low + 1e-6)])


def head_grids(heads: pd.DataFrame, scale: str = "linear", selection: alt.Parameter | None = None,
               cell: int = 13, title: str | None = None, subtitle: str | None = None,
               value: str = "attention") -> alt.Chart:
    """Layers x heads heatmaps of a per-head mean (``category, layer, head, mean, std, n``), one
    panel per category, shared colours. Default titles: attention to ``heads["target"]``."""
    if title is None:
        title = f"Final-token attention to the {TARGET_LABELS[heads['target'].iloc[0]]}, per layer and head"
    if subtitle is None:
        subtitle = "Mean over the prompts of each type (un-noised). Layer 0 at the bottom. Click a cell for its prompts."
    data = _floored(heads.assign(**{"prompt type": heads["category"].map(group_label)}), ["mean"], scale)
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    chart = alt.Chart(data).mark_rect().encode(
        x=alt.X("head:O", title="head"),
        y=alt.Y("layer:O", title="layer", sort="descending"),
        color=alt.Color("mean:Q", title=["mean", value], scale=_value_scale(scale, heads["mean"])),
        tooltip=["prompt type:N", "layer:O", "head:O", alt.Tooltip("mean:Q", format=".4f"),
                 alt.Tooltip("std:Q", format=".4f"), "n:Q"],
    ).properties(width=max(200, cell * n_heads), height=max(160, cell * n_layers))
    if selection is not None:
        chart = _outline(chart, selection)
    return chart.facet(
        column=alt.Column("prompt type:N", sort=_category_sort(heads), title=None,
                          header=alt.Header(labelFontSize=13, labelFontWeight="bold")),
    ).properties(title=alt.TitleParams(title, subtitle=subtitle))


def difference_grid(diff: pd.DataFrame, a: str, b: str, selection: alt.Parameter | None = None,
                    cell: int = 13, title: str | None = None) -> alt.Chart:
    """Layers x heads heatmap of the mean in category ``a`` minus ``b`` (diverging colours).
    Default title: attention to ``diff["target"]``."""
    if title is None:
        title = f"Attention to the {TARGET_LABELS[diff['target'].iloc[0]]}: A − B"
    bound = float(np.nanmax(np.abs(diff["difference"]))) or 1e-6
    la, lb = group_label(a), group_label(b)
    data = diff.rename(columns={"mean_a": "mean A", "mean_b": "mean B"})
    n_layers, n_heads = int(diff["layer"].max()) + 1, int(diff["head"].max()) + 1
    chart = alt.Chart(data).mark_rect().encode(
        x=alt.X("head:O"),
        y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("difference:Q", title=["A − B"],
                        scale=alt.Scale(scheme="redblue", reverse=True, domain=[-bound, bound], domainMid=0)),
        tooltip=["layer:O", "head:O", alt.Tooltip("difference:Q", format="+.4f"),
                 alt.Tooltip("mean A:Q", format=".4f"), alt.Tooltip("mean B:Q", format=".4f")],
    ).properties(autosize=PAD, width=max(200, cell * n_heads), height=max(160, cell * n_layers), title=alt.TitleParams(
        title, subtitle=[f"A = {la}", f"B = {lb}", "red: more in A, blue: more in B"]))
    return chart if selection is None else _outline(chart, selection)


def per_prompt_strip(values: pd.DataFrame, title: str, column: str = "attention",
                     axis_title: str = "attention weight") -> alt.Chart:
    """Every prompt's ``column`` value as a dot, one row per category; mean as a tick."""
    data = values.assign(**{"prompt type": values["category"].map(group_label)})
    sort = _category_sort(values)
    y = alt.Y("prompt type:N", sort=sort, title=None, axis=alt.Axis(labelLimit=260))
    dots = alt.Chart(data).mark_circle(size=60, opacity=0.7).encode(
        x=alt.X(f"{column}:Q", title=axis_title),
        y=y,
        yOffset=alt.YOffset("jitter:Q"),
        color=alt.Color("prompt type:N", sort=sort, legend=None, scale=group_scale(values["category"])[1]),
        tooltip=["prompt type:N", "prompt:N", "subject:N", alt.Tooltip(f"{column}:Q", format=".4f")],
    ).transform_calculate(jitter="(random() - 0.5) * 16")
    means = alt.Chart(data).mark_tick(color="black", thickness=2, size=26).encode(
        x=f"mean({column}):Q", y=y, tooltip=[alt.Tooltip(f"mean({column}):Q", format=".4f", title="mean")])
    return (dots + means).properties(autosize=PAD, width=560, height=60 * max(1, len(sort)), title=alt.TitleParams(
        title, subtitle="Dots: prompts (hover for the prompt); black tick: mean of the type."))


def pattern_heatmap(pattern: np.ndarray, labels: list[str], title: str, subtitle: str,
                    scale: str = "linear") -> alt.Chart:
    """A tokens x tokens attention pattern [queries, keys]; cells after the query are left out."""
    q, k = np.tril_indices(len(labels))
    data = pd.DataFrame({"query": np.array(labels)[q], "key": np.array(labels)[k],
                         "attention": pattern[q, k]})
    data = _floored(data, ["attention"], scale)
    size = max(300, min(30 * len(labels), 900))
    return alt.Chart(data).mark_rect().encode(
        x=alt.X("key:N", sort=labels, title="key token (attended to)", axis=TOKEN_AXIS),
        y=alt.Y("query:N", sort=labels, title="query token (attending)", axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("attention:Q", scale=_color_scale(scale, float(pattern.max()))),
        tooltip=["query:N", "key:N", alt.Tooltip("attention:Q", format=".4f")],
    ).properties(autosize=PAD, width=size, height=size, title=alt.TitleParams(title, subtitle=subtitle))


def final_rows_heatmap(rows: np.ndarray, labels: list[str], title: str, scale: str = "linear") -> alt.Chart:
    """The final token's attention row [heads, keys] for every head of one layer."""
    h, k = np.indices(rows.shape).reshape(2, -1)
    data = pd.DataFrame({"head": h, "key": np.array(labels)[k], "attention": rows.reshape(-1)})
    data = _floored(data, ["attention"], scale)
    return alt.Chart(data).mark_rect().encode(
        x=alt.X("key:N", sort=labels, title="key token (attended to)", axis=TOKEN_AXIS),
        y=alt.Y("head:O", title="head"),
        color=alt.Color("attention:Q", scale=_color_scale(scale, float(rows.max()))),
        tooltip=["head:O", "key:N", alt.Tooltip("attention:Q", format=".4f")],
    ).properties(autosize=PAD, width=max(300, min(40 * len(labels), 900)), height=max(120, 20 * rows.shape[0]),
                 title=alt.TitleParams(title, subtitle="Each row sums to 1 over the key tokens."))


def long_text_mean(curves: pd.DataFrame, log_x: bool = False, log_y: bool = False, width: int = 640,
                   height: int = 300) -> alt.Chart:
    """Mean over layers, heads and windows of attention to the first token against position i."""
    data = curves[(curves["layer"] == "mean") & (curves["position"] >= 1)]
    data = _thinned(data, int(curves["position"].max()) + 1, 1).copy()
    for c in ("attention", "q25", "q75", "uniform"):
        data[c] = data[c].clip(lower=LOG_FLOOR) if log_y else data[c]
    x = alt.X("position:Q", title="position i of the attending token in the window",
              scale=alt.Scale(type="log") if log_x else alt.Scale())
    y_scale = alt.Scale(type="log") if log_y else alt.Scale(domain=[0, 1])
    base = alt.Chart(data).encode(x=x)
    band = base.mark_area(opacity=0.2, color="#1f77b4").encode(y=alt.Y("q25:Q", scale=y_scale), y2="q75:Q")
    line = base.mark_line(color="#1f77b4").encode(
        y=alt.Y("attention:Q", title="attention to the first token", scale=y_scale),
        tooltip=["position:Q", alt.Tooltip("attention:Q", format=".3f"), alt.Tooltip("q25:Q", format=".3f"),
                 alt.Tooltip("q75:Q", format=".3f"), alt.Tooltip("uniform:Q", format=".4f")])
    uniform = base.mark_line(color="gray", strokeDash=[4, 4]).encode(y="uniform:Q")
    return (band + uniform + line).properties(autosize=PAD, width=width, height=height, title=alt.TitleParams(
        "Attention the i-th token pays to the first token (mean over layers and heads)",
        subtitle=["Blue: mean over windows; band: interquartile range over windows.",
                  "Dashed grey: 1/(i+1), what evenly spread attention would give."]))


def long_text_layers(curves: pd.DataFrame, log_x: bool = False, log_y: bool = False, width: int = 640,
                     height: int = 320) -> alt.Chart:
    """One line per layer (mean over heads and windows) of attention to the first token against i."""
    data = curves[(curves["layer"] != "mean") & (curves["position"] >= 1)]
    data = _thinned(data, int(curves["position"].max()) + 1, data["layer"].nunique()).copy()
    data["layer"] = data["layer"].astype(int)
    if log_y:
        data["attention"] = data["attention"].clip(lower=LOG_FLOOR)
    pick = alt.selection_point(fields=["layer"], bind="legend", name="layers")
    return alt.Chart(data).mark_line(strokeWidth=1.3).encode(
        x=alt.X("position:Q", title="position i of the attending token in the window",
                scale=alt.Scale(type="log") if log_x else alt.Scale()),
        y=alt.Y("attention:Q", title="attention to the first token (mean over heads)",
                scale=alt.Scale(type="log") if log_y else alt.Scale(domain=[0, 1])),
        color=alt.Color("layer:O", scale=alt.Scale(scheme="turbo"), legend=alt.Legend(columns=2, symbolLimit=100)),
        opacity=alt.condition(pick, alt.value(0.95), alt.value(0.08)),
        detail="layer:O",
        tooltip=["layer:O", "position:Q", alt.Tooltip("attention:Q", format=".3f")],
    ).add_params(pick).properties(autosize=PAD, width=width, height=height, title=alt.TitleParams(
        "Attention to the first token, per layer",
        subtitle="Mean over heads and windows. Click a layer in the legend to highlight it (shift-click for more)."))


def long_text_layer_heatmap(curves: pd.DataFrame, width: int = 640) -> alt.Chart:
    """Layers x positions heatmap of attention to the first token (positions averaged in bins)."""
    data = curves[curves["layer"] != "mean"][["position", "layer", "attention"]].copy()
    data["layer"] = data["layer"].astype(int)
    n_layers, length = data["layer"].nunique(), int(data["position"].max()) + 1
    n_bins = max(1, min(length, 100, MAX_ROWS // max(n_layers, 1)))
    step = int(np.ceil(length / n_bins))
    data["from"] = data["position"] // step * step
    data = data.groupby(["layer", "from"], as_index=False)["attention"].mean()
    data["to"] = np.minimum(data["from"] + step, length)
    return alt.Chart(data).mark_rect().encode(
        x=alt.X("from:Q", bin="binned", title="position i of the attending token in the window",
                scale=alt.Scale(domain=[0, length], nice=False)),
        x2="to:Q",
        y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("attention:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]),
                        title=["attention to", "first token"]),
        tooltip=["layer:O", alt.Tooltip("from:Q", title="positions from"), alt.Tooltip("to:Q", title="to (excl.)"),
                 alt.Tooltip("attention:Q", format=".3f")],
    ).properties(autosize=PAD, width=width, height=max(160, 12 * n_layers), title=alt.TitleParams(
        "Attention to the first token, per layer",
        subtitle=f"Mean over heads, windows and positions in bins of {step}. Layer 0 at the bottom."))


def long_text_heads(heads: pd.DataFrame, from_position: int, cell: int = 14) -> alt.Chart:
    """Layers x heads heatmap of mean attention to the first token over positions >= from_position."""
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    return alt.Chart(heads).mark_rect().encode(
        x=alt.X("head:O"),
        y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("attention:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]),
                        title=["attention to", "first token"]),
        tooltip=["layer:O", "head:O", alt.Tooltip("attention:Q", format=".3f")],
    ).properties(autosize=PAD, width=max(140, cell * n_heads), height=max(140, cell * n_layers), title=alt.TitleParams(
        "Per head", subtitle=f"Mean over positions i ≥ {from_position} and windows."))
