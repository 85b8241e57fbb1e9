"""Altair charts of category averages (no Streamlit): the seed's two-row heatmaps, line charts with
a spread band (± sem, ± std or a bootstrap interval), scatter plots of the transition layer against
its confounds (jittered, clickable), and the human column labels of the category tables."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ..batch import ROWS
from .style import RAMPS, TOKEN_COLOURS, ellipsis, group_label, group_scale

ROW_COLOURS = [TOKEN_COLOURS["noised"], TOKEN_COLOURS["final"]]  # in ROWS order
SPREADS = {"sem": "± standard error", "std": "± std", "ci": "bootstrap 95% interval"}
PICK = "pick"  # the scatter plots' click selection: its points carry the prompt's "row" (table position)
TOOLTIP_CHARS = 100  # prompts and answers longer than this are cut in the scatter plots' tooltips

# Human column labels of the category tables (the data and CSV downloads keep the raw names).
SUMMARY_LABELS = {
    "label": "category", "prompts": "prompts", "correct": "model right", "clean_prob": "mean clean p",
    "transition_layer": "mean transition layer", "transition_std": "transition layer std",
    "token_distance": "mean noised→final tokens",
}
PROMPT_LABELS = {
    "averaged": "in averages", "category": "category", "prompt": "prompt", "expected": "expected",
    "target": "target token", "noised_token": "noised token", "noised_index": "noised index",
    "final_index": "final index", "token_distance": "noised→final tokens", "clean_prob": "clean p",
    "corrupted_prob": "corrupted p", "effect": "effect of noise", "correct": "model right",
    "transition_layer": "transition layer", "n_layers": "layers", "status": "status", "message": "message",
}
COMPARISON_LABELS = {
    "label_b": "B", "label_a": "A", "difference": "B − A (layers)", "ci_low": "95% CI low",
    "ci_high": "95% CI high", "p_value": "p (permutation)", "mean_b": "mean B", "mean_a": "mean A",
    "n_b": "prompts B", "n_a": "prompts A", "none_b": "B: no transition", "none_a": "A: no transition",
}


def labelled(table: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The columns of ``labels`` (in its order, those present) renamed to their human labels;
    ``category`` keys shown as category names."""
    out = table[[c for c in labels if c in table.columns]].copy()
    if "category" in out:
        out["category"] = [group_label(c) for c in out["category"]]
    return out.rename(columns=labels)


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


def line_chart(averages: pd.DataFrame, spread: str = "sem", width: int = 260,
               bands: pd.DataFrame | None = None) -> alt.FacetChart:
    """Per group: mean normalised p by layer for both rows, with a band: mean ± ``spread``
    ("sem", "std"), or with ``spread="ci"`` the bootstrap interval of ``bands``
    (``tracing.stats.bootstrap_bands``: ci_low, ci_high per group, row and layer)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(SPREADS)}, not {spread!r}")
    if spread == "ci" and bands is None:
        raise ValueError("spread='ci' needs the bootstrap bands (tracing.stats.bootstrap_bands)")
    data, order = _titled(averages)
    if spread == "ci":
        keys = ["group", "row", "layer"]
        data = data.merge(bands[keys + ["ci_low", "ci_high"]], on=keys, how="left")
        data["lo"], data["hi"] = data["ci_low"], data["ci_high"]
    else:
        data["lo"] = data["mean"] - data[spread]
        data["hi"] = data["mean"] + data[spread]
    shown = ["ci_low", "ci_high"] if spread == "ci" else [spread]
    colour = alt.Color("row:N", sort=list(ROWS), title="restored token",
                       scale=alt.Scale(range=ROW_COLOURS))
    base = alt.Chart().encode(x=alt.X("layer:Q", title="layer"), color=colour)
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("lo:Q", title="normalised p"), y2="hi:Q")
    line = base.mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        y="mean:Q",
        tooltip=[alt.Tooltip("label:N", title="category"), "row:N", "layer:Q",
                 alt.Tooltip("mean:Q", format=".3f"),
                 *[alt.Tooltip(f"{c}:Q", format=".3f") for c in shown], "n:Q"],
    )
    return (
        alt.layer(band, line, data=data)
        .properties(width=width, height=200)
        .facet(column=alt.Column("title:N", sort=order, title=None))
        .properties(title=f"Mean normalised p by layer (band: {SPREADS[spread]})")
    )


def jitter(n: int, amount: float, seed: int = 0) -> np.ndarray:
    """``n`` reproducible offsets, uniform in [-amount, amount] (the same points every rerun)."""
    return np.random.default_rng(seed).uniform(-amount, amount, n)


def scatter_chart(table: pd.DataFrame, x: str = "token_distance") -> alt.Chart:
    """Transition layer of each prompt against ``token_distance`` or ``clean_prob``: translucent,
    jittered points (up to a quarter layer / token, so prompts on equal values stay visible), the
    prompt's details on hover, and a click selection ``PICK`` whose points carry ``row`` (the
    prompt's index label in ``table``: its position in ``prompt_table``'s results, also when a
    filtered part of it is drawn). Prompts and answers are cut to ``TOOLTIP_CHARS`` in hovers."""
    titles = {"token_distance": "tokens from the noised to the final token", "clean_prob": "clean p(target)"}
    if x not in titles:
        raise ValueError(f"x must be one of {', '.join(titles)}")
    data = table.assign(row=table.index.to_numpy()).dropna(subset=["transition_layer"])
    data["category label"] = [group_label(c) for c in data["category"]]
    for column in ("prompt", "expected"):  # a very long prompt would make a tooltip (and the chart) huge
        data[column] = [ellipsis(str(v), TOOLTIP_CHARS) for v in data[column]]
    # jitter in axis units (Vega-Lite ignores offset channels on quantitative axes); hover shows the true values
    data["x_shown"] = data[x] + (jitter(len(data), 0.25, seed=1) if x == "token_distance" else 0.0)
    data["y_shown"] = data["transition_layer"] + jitter(len(data), 0.25, seed=2)
    present, colours = group_scale(data["category"])
    layers = int(table["n_layers"].max()) if table["n_layers"].notna().any() else None
    y_scale = alt.Scale(domain=[0, layers - 1]) if layers else alt.Undefined
    pick = alt.selection_point(name=PICK, fields=["row"], on="click", clear="dblclick")
    tooltip = [alt.Tooltip("prompt:N"), alt.Tooltip("expected:N"), alt.Tooltip("target:N", title="target token"),
               alt.Tooltip("category label:N", title="category"),
               alt.Tooltip("noised_token:N", title="noised token"),
               alt.Tooltip("transition_layer:Q", title="transition layer"),
               alt.Tooltip("token_distance:Q", title="noised→final tokens"),
               alt.Tooltip("clean_prob:Q", title="clean p", format=".3f"),
               alt.Tooltip("effect:Q", title="effect of noise", format=".3f")]
    return (
        alt.Chart(data[[c for c in data.columns if c != "message"]])
        .mark_circle(size=60, stroke="white", strokeWidth=0.5, cursor="pointer")
        .encode(
            x=alt.X("x_shown:Q", title=titles[x]),
            y=alt.Y("y_shown:Q", title="transition layer", scale=y_scale),
            color=alt.Color("category label:N", title="category", scale=colours),
            opacity=alt.condition(pick, alt.value(0.6), alt.value(0.25)),
            tooltip=[t for t in tooltip if t.shorthand.split(":")[0] in data.columns],
        )
        .add_params(pick)
        .properties(width=360, height=260, title=f"Transition layer vs {titles[x]} (click a point to open its trace)")
    )
