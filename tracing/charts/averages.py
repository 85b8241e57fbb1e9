"""Altair charts of category averages (no Streamlit): the seed's two-row heatmaps, line charts with
a spread band, and scatter plots of the transition layer against its confounds."""

from __future__ import annotations

import altair as alt
import pandas as pd

from ..batch import ROWS
from .style import RAMPS, TOKEN_COLOURS, group_label, group_scale

ROW_COLOURS = [TOKEN_COLOURS["noised"], TOKEN_COLOURS["final"]]  # in ROWS order


def _titled(averages: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Averages with a facet title "<label> (n=<prompts>)", and the titles in group order."""
    data = averages.copy()
    n = data.groupby("group")["n"].transform("max")
    data["title"] = data["label"] + " (n=" + n.astype(int).astype(str) + ")"
    return data, list(dict.fromkeys(data["title"]))


def heatmap_chart(averages: pd.DataFrame, width: int = 260) -> alt.FacetChart:
    """Per group, side by side: noised-token and final-token rows x layers, normalised, purple."""
    data, order = _titled(averages)
    return (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0, labelOverlap=True)),
            y=alt.Y("row:N", sort=list(ROWS), title=None),
            color=alt.Color(
                "mean:Q", title="normalised p",
                scale=alt.Scale(range=RAMPS["hidden"], domain=[0, 1], clamp=True, interpolate="lab"),
            ),
            tooltip=[
                alt.Tooltip("label:N", title="category"), alt.Tooltip("row:N"), alt.Tooltip("layer:Q"),
                alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("std:Q", format=".3f"),
                alt.Tooltip("sem:Q", format=".3f"), alt.Tooltip("n:Q"),
            ],
        )
        .properties(width=width, height=70)
        .facet(column=alt.Column("title:N", sort=order, title=None))
        .properties(title="Normalised trace of the noised and final tokens, averaged per category")
    )


def line_chart(averages: pd.DataFrame, spread: str = "sem", width: int = 260) -> alt.FacetChart:
    """Per group: mean normalised p by layer for both rows, with a mean ± spread band."""
    if spread not in ("sem", "std"):
        raise ValueError("spread must be 'sem' or 'std'")
    data, order = _titled(averages)
    data["lo"] = data["mean"] - data[spread]
    data["hi"] = data["mean"] + data[spread]
    colour = alt.Color("row:N", sort=list(ROWS), title="restored token",
                       scale=alt.Scale(range=ROW_COLOURS))
    base = alt.Chart().encode(x=alt.X("layer:Q", title="layer"), color=colour)
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("lo:Q", title="normalised p"), y2="hi:Q")
    line = base.mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        y="mean:Q",
        tooltip=[alt.Tooltip("label:N", title="category"), "row:N", "layer:Q",
                 alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip(f"{spread}:Q", format=".3f"), "n:Q"],
    )
    return (
        alt.layer(band, line, data=data)
        .properties(width=width, height=200)
        .facet(column=alt.Column("title:N", sort=order, title=None))
        .properties(title=f"Mean normalised p by layer (band: ± {'standard error' if spread == 'sem' else 'std'})")
    )


def scatter_chart(table: pd.DataFrame, x: str = "token_distance") -> alt.Chart:
    """Transition layer of each prompt against ``token_distance`` or ``clean_prob``."""
    titles = {"token_distance": "tokens from the noised to the final token", "clean_prob": "clean p(target)"}
    if x not in titles:
        raise ValueError(f"x must be one of {', '.join(titles)}")
    data = table.dropna(subset=["transition_layer"]).copy()
    data["category label"] = [group_label(c) for c in data["category"]]
    present, colours = group_scale(data["category"])
    layers = int(table["n_layers"].max()) if table["n_layers"].notna().any() else None
    y_scale = alt.Scale(domain=[0, layers - 1]) if layers else alt.Undefined
    return (
        alt.Chart(data)
        .mark_circle(size=70, opacity=0.8)
        .encode(
            x=alt.X(f"{x}:Q", title=titles[x]),
            y=alt.Y("transition_layer:Q", title="transition layer", scale=y_scale),
            color=alt.Color("category label:N", title="category",
                            scale=colours),
            tooltip=["prompt:N", "target:N", "category label:N", "transition_layer:Q",
                     "token_distance:Q", alt.Tooltip("clean_prob:Q", format=".3f")],
        )
        .properties(width=360, height=260, title=f"Transition layer vs {titles[x]}")
    )
