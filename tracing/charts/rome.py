"""Altair charts of ROME's average indirect effects (no Streamlit): the six-row heatmap over layers
(ROME Fig. 2) and line plots of the last subject token and the last token with 95 % CI bands."""

from __future__ import annotations

import altair as alt
import pandas as pd

from ..rome import POSITION_LABELS, POSITIONS
from .style import KIND_LABELS, RAMPS, TOKEN_COLOURS, pad

LINE_POSITIONS = ("last_subject", "last")
LINE_COLOURS = {"last_subject": TOKEN_COLOURS["noised"], "last": TOKEN_COLOURS["final"]}


def _labelled(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a row label "<position label> (n=<prompts>)" and percentages."""
    data = table.copy()
    data["row"] = [f"{POSITION_LABELS[p]} (n={int(n)})" for p, n in zip(data["position"], data["n"])]
    for column in ("aie", "ci_low", "ci_high"):
        data[f"{column}_pct"] = 100 * data[column]
    return data


def _row_order(data: pd.DataFrame) -> list[str]:
    first = data.drop_duplicates("position").set_index("position")["row"]
    return [first[p] for p in POSITIONS if p in first.index]


def _title(kind: str, table: pd.DataFrame, what: str) -> str:
    used = table.attrs.get("used")
    tail = f" over {used} prompts" if used is not None else ""
    return f"{what} of restoring the {KIND_LABELS.get(kind, kind)}{tail}"


def heatmap(table: pd.DataFrame, kind: str = "hidden", width: int = 420) -> alt.Chart:
    """Six rows (ROME's token positions) x layers, colour = AIE (the kind's ROME palette)."""
    return pad(_heatmap(table, kind, width))


def lines(table: pd.DataFrame, kind: str = "hidden", width: int = 420) -> alt.LayerChart:
    """AIE by layer of the last subject token and the last token, with 95 % CI bands (in %)."""
    return pad(_lines(table, kind, width))


def _heatmap(table: pd.DataFrame, kind: str, width: int) -> alt.Chart:
    data = _labelled(table.dropna(subset=["aie"]))
    top = max(float(data["aie"].max()) if len(data) else 0.0, 1e-6)
    return (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0, labelOverlap=True)),
            y=alt.Y("row:N", sort=_row_order(data), title=None),
            color=alt.Color("aie:Q", title="AIE",
                            scale=alt.Scale(range=RAMPS.get(kind, RAMPS["hidden"]), domain=[0, top], clamp=True,
                                            interpolate="lab")),
            tooltip=[alt.Tooltip("row:N", title="position"), "layer:Q", alt.Tooltip("aie:Q", format=".4f"),
                     alt.Tooltip("ci_low:Q", format=".4f"), alt.Tooltip("ci_high:Q", format=".4f"), "n:Q"],
        )
        .properties(width=width, height=6 * 22, title=_title(kind, table, "Average indirect effect"))
    )


def _lines(table: pd.DataFrame, kind: str, width: int) -> alt.LayerChart:
    data = _labelled(table[table["position"].isin(LINE_POSITIONS)].dropna(subset=["aie"]))
    order = _row_order(data)
    colours = [LINE_COLOURS[p] for p in LINE_POSITIONS if p in set(data["position"])]
    colour = alt.Color("row:N", sort=order, title="restored token", scale=alt.Scale(domain=order, range=colours))
    base = alt.Chart(data).encode(x=alt.X("layer:Q", title="layer"), color=colour)
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("ci_low_pct:Q", title="AIE (%)"), y2="ci_high_pct:Q")
    line = base.mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        y="aie_pct:Q",
        tooltip=[alt.Tooltip("row:N", title="position"), "layer:Q",
                 alt.Tooltip("aie_pct:Q", format=".2f", title="AIE %"),
                 alt.Tooltip("ci_low_pct:Q", format=".2f", title="CI low %"),
                 alt.Tooltip("ci_high_pct:Q", format=".2f", title="CI high %"), "n:Q"],
    )
    return alt.layer(band, line).properties(width=width, height=200, title=_title(kind, table, "AIE with 95 % CI"))


def figure(tables: dict[str, pd.DataFrame], width: int = 420) -> alt.VConcatChart:
    """Per kind (``tables``: kind -> AIE table), the heatmap above its line plot; kinds side by side."""
    if not tables:
        raise ValueError("no AIE table to draw")
    columns = [alt.vconcat(_heatmap(t, k, width), _lines(t, k, width)).resolve_scale(color="independent")
               for k, t in tables.items()]
    return pad(alt.hconcat(*columns).resolve_scale(color="independent"))
