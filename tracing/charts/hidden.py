"""Altair charts for hidden-state trajectories and the logit lens (no Streamlit)."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ..hidden import MEASURE_HELP, MEASURES, LogitLens, measure_layers
from .style import LINE_LEGEND, ellipsis, group_label, group_scale, quote_token, show_token

SPREADS = {"std": "± 1 standard deviation", "sem": "± 1 standard error", "none": "no band"}
BOUNDS = {"norm": (0.0, None), "step": (0.0, None), "cosine": (-1.0, 1.0),
          "step_cosine": (-1.0, 1.0), "target_prob": (0.0, 1.0)}
Y_TITLES = {"norm": "|h(l)|", "cosine": "cos(h(l), h(l+1))", "step": "|h(l+1) − h(l)|",
            "step_cosine": "cos(step l−1, step l)", "target_prob": "p(expected)"}
CURRENT = "current prompt"  # the study's prompt drawn over the prompt types
CURRENT_COLOUR = "#222222"  # dark, dashed: apart from every category colour


def current_frame(measures: dict[str, np.ndarray], n_layers: int) -> pd.DataFrame:
    """One prompt's trajectory (``hidden.prompt_trajectory``) as a long table ``measure, layer, value``."""
    return pd.concat([pd.DataFrame({"measure": name, "layer": measure_layers(name, n_layers),
                                    "value": np.asarray(values, dtype=float)})
                      for name, values in measures.items()], ignore_index=True)


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["category"] = out["group"].map(group_label)
    return out


def _color(groups: list[str], current: bool = False) -> alt.Color:
    labels, scale = group_scale(groups)
    if current:
        scale = alt.Scale(domain=[*labels, CURRENT], range=[*scale.range, CURRENT_COLOUR])
        labels = [*labels, CURRENT]
    return alt.Color("category:N", sort=labels, scale=scale,
                     legend=alt.Legend(title="Prompt type", **LINE_LEGEND))


def _rows(frame: pd.DataFrame | None, measure: str, crop: tuple[int, int] | None) -> pd.DataFrame | None:
    """The rows of one measure (within the ``crop`` layers)."""
    if frame is None:
        return None
    rows = frame[frame["measure"] == measure]
    return rows[rows["layer"].between(*crop)] if crop is not None else rows


def _measure_chart(summary: pd.DataFrame, prompts: pd.DataFrame | None, measure: str,
                   spread: str, crop: tuple[int, int] | None, width: int, height: int,
                   current: pd.DataFrame | None = None) -> alt.Chart:
    """One measure against layer: mean line per group, a spread band, optional per-prompt lines
    and the current prompt's own line."""
    data, lines, mine = (_rows(f, measure, crop) for f in (summary, prompts, current))
    data = _labelled(data)
    color = _color(sorted(summary["group"].unique()), current is not None)
    domain = [crop[0], crop[1]] if crop is not None else [0, int(summary["layer"].max())]
    x = alt.X("layer:Q", title="layer", scale=alt.Scale(domain=domain, nice=False),
              axis=alt.Axis(tickMinStep=1, format="d"))
    y_title = Y_TITLES[measure]
    y = alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False))
    tooltip = ["category:N", "layer:Q", alt.Tooltip("mean:Q", format=".4g"),
               alt.Tooltip("std:Q", format=".3g"), "n:Q"]
    layers = []
    if spread in ("std", "sem"):
        low, high = BOUNDS.get(measure, (None, None))
        band = data.assign(lower=(data["mean"] - data[spread]).clip(lower=low),
                           upper=(data["mean"] + data[spread]).clip(upper=high))
        layers.append(alt.Chart(band).mark_area(opacity=0.18).encode(
            x=x, y=alt.Y("lower:Q", title=y_title, scale=alt.Scale(zero=False)), y2="upper:Q",
            color=color))
    if lines is not None and not lines.empty:
        lines = _labelled(lines)
        layers.append(alt.Chart(lines).mark_line(opacity=0.3, strokeWidth=0.8).encode(
            x=x, y=alt.Y("value:Q", title=y_title, scale=alt.Scale(zero=False)), color=color,
            detail="prompt_index:N", tooltip=["category:N", "prompt:N", "layer:Q",
                                              alt.Tooltip("value:Q", format=".4g")]))
    layers.append(alt.Chart(data).mark_line(strokeWidth=2.2, point=alt.OverlayMarkDef(size=14))
                  .encode(x=x, y=y, color=color, tooltip=tooltip))
    if mine is not None and not mine.empty:
        layers.append(alt.Chart(mine.assign(category=CURRENT)).mark_line(
            strokeWidth=2.2, strokeDash=[6, 3], point=alt.OverlayMarkDef(size=14, filled=True)).encode(
            x=x, y=alt.Y("value:Q", title=y_title, scale=alt.Scale(zero=False)), color=color,
            tooltip=["category:N", "layer:Q", alt.Tooltip("value:Q", format=".4g")]))
    if crop is None:
        title = alt.TitleParams(MEASURES[measure], subtitle=_wrap(MEASURE_HELP[measure], 80),
                                fontSize=13, subtitleFontSize=10, anchor="start")
    else:
        title = alt.TitleParams(f"{MEASURES[measure]}: middle layers {crop[0]}–{crop[1]}",
                                subtitle=["zoomed in: own y range"], fontSize=13,
                                subtitleFontSize=10, anchor="start")
    return alt.layer(*layers).properties(width=width, height=height, title=title)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def trajectory_figure(summary: pd.DataFrame, measures: list[str], crop: tuple[int, int],
                      spread: str = "std", prompts: pd.DataFrame | None = None,
                      width: int = 400, height: int = 170,
                      current: pd.DataFrame | None = None) -> alt.VConcatChart:
    """One row per measure: every layer on the left, layers ``crop`` (inclusive) on the right.

    ``summary`` comes from ``hidden.summarise``; ``prompts`` (optional per-prompt lines) is the
    long table of ``hidden.prompt_set_trajectories`` with a ``group`` column; ``current``
    (optional, ``current_frame``) one more prompt, drawn dashed as "current prompt".
    """
    if not measures:
        raise ValueError("Pick at least one measure.")
    rows = [
        alt.hconcat(*[_measure_chart(summary, prompts, m, spread, c, width, height, current)
                      for c in (None, tuple(crop))])
        for m in measures
    ]
    return alt.vconcat(*rows, spacing=28).resolve_scale(color="shared").configure_axis(
        labelFontSize=11, titleFontSize=11).configure_legend(orient="top", labelLimit=300,
                                                             labelFontSize=12, titleFontSize=12)


def lens_frame(lens: LogitLens) -> pd.DataFrame:
    """The logit lens's long table with display labels and a target flag."""
    table = lens.table()
    table["label"] = [f"{show_token(t)}  {p:.2f}" for t, p in zip(table["token"], table["prob"])]
    table["shown"] = table["token"].map(show_token)
    table["is_target"] = table["token_id"] == lens.target_id
    return table


def lens_heatmap(lens: LogitLens, cell_width: int = 124, row_height: int = 20) -> alt.LayerChart:
    """Layers down, ranks across; each cell a top token coloured by its probability."""
    data = lens_frame(lens)
    k, n = int(data["rank"].max()), lens.n_layers + 1
    x = alt.X("rank:O", title="rank (1 = most probable)", axis=alt.Axis(orient="top", labelAngle=0))
    y = alt.Y("layer:O", title="state entering layer (last row: model output)",
              sort="ascending")
    base = alt.Chart(data).encode(x=x, y=y)
    tooltip = ["layer:O", "rank:O", alt.Tooltip("token:N", title="token"), "token_id:Q",
               alt.Tooltip("prob:Q", format=".4f")]
    cells = base.mark_rect(stroke="white", strokeWidth=0.5).encode(
        color=alt.Color("prob:Q", title="probability",
                        scale=alt.Scale(scheme="blues", domain=[0, 1])), tooltip=tooltip)
    marked = base.transform_filter(alt.datum.is_target).mark_rect(
        fill=None, stroke="#d62728", strokeWidth=2)
    text = base.mark_text(fontSize=11, limit=cell_width - 6).encode(
        text="label:N",
        color=alt.condition(alt.datum.prob > 0.5, alt.value("white"), alt.value("black")),
        tooltip=tooltip)
    title = alt.TitleParams(
        f"Logit lens: top {k} next tokens at each layer",
        subtitle=[f"Prompt: {ellipsis(lens.prompt, 90)}",
                  f"Red box: the target {quote_token(lens.target)}. ␣ marks a space."],
        anchor="start")
    return alt.layer(cells, marked, text).properties(
        width=cell_width * k, height=row_height * n, title=title)


CURVE_SCALES = {"linear": "probability", "log": "probability, log scale", "rank": "rank, log scale"}


def target_curve(lens: LogitLens, scale: str = "linear", width: int = 380,
                 height: int = 300) -> alt.Chart:
    """The target token's logit-lens probability (or rank) against layer."""
    data = lens.target_frame()
    if scale == "rank":
        y = alt.Y("target_rank:Q", title="rank of the target (1 = top)",
                  scale=alt.Scale(type="log", reverse=True))
    elif scale == "log":
        data["plotted"] = data["target_prob"].clip(lower=1e-30)  # exact zeros only
        y = alt.Y("plotted:Q", title="p(target), log scale", scale=alt.Scale(type="log"))
    else:
        y = alt.Y("target_prob:Q", title="p(target)", scale=alt.Scale(domain=[0, 1]))
    title = alt.TitleParams(f"Target {quote_token(lens.target)} through the layers",
                            subtitle=["logit lens of the final token's state entering each layer",
                                      "(last point: the model's output)"], anchor="start")
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d")), y=y,
        tooltip=["layer:Q", alt.Tooltip("target_prob:Q", format=".3g", title="probability"),
                 alt.Tooltip("target_rank:Q", title="rank")],
    ).properties(width=width, height=height, title=title)


def lens_wide_table(lens: LogitLens) -> pd.DataFrame:
    """One row per layer: the top tokens with probabilities, then the target's p and rank."""
    rows = []
    for layer in range(lens.n_layers + 1):
        row = {"layer": layer}
        for rank, (tok, p) in enumerate(zip(lens.top_tokens[layer], lens.top_probs[layer]), 1):
            row[f"#{rank}"] = f"{show_token(tok)} ({p:.3f})"
        row[f"p({quote_token(lens.target)})"] = float(lens.target_probs[layer])
        row["target rank"] = int(lens.target_ranks[layer])
        rows.append(row)
    return pd.DataFrame(rows)
