"""ROME's severed-path comparison (Meng et al. 2022, Fig. 3), no Streamlit.

At one token, the effect per layer of restoring the clean hidden state with nothing severed, with
the later MLP outputs severed and with the later attention outputs severed
(``causal_trace(..., kind="hidden", sever=None | "mlp" | "attn")``), as lines on one chart. The
effect is restored minus corrupted (ROME's indirect effect; for the KL divergence, where lower is
better, corrupted minus restored), so 0 = no better than the corrupted run.
"""

from __future__ import annotations

from typing import Mapping

import altair as alt
import numpy as np
import pandas as pd

from ..causal import Trace
from ..settings import lower_is_better
from .style import LINE_LEGEND, RAMPS, ellipsis, pad, token_label
from .trace import MAX_TITLE, layer_title, metric_title, noise_text

SEVER_ORDER = (None, "mlp", "attn")
SEVER_LABELS = {None: "nothing severed", "mlp": "MLP severed", "attn": "attention severed"}
# ROME's Fig. 3 colours: the kinds' ramps (hidden purple, MLP green, attention red)
SEVER_COLOURS = {None: RAMPS["hidden"][-3], "mlp": RAMPS["mlp"][-3], "attn": RAMPS["attn"][-3]}


def default_token(trace: Trace) -> int:
    """The token the comparison starts at: the last noised token (ROME's last subject token)."""
    return max(trace.noised)


def _checked(traces: Mapping[str | None, Trace], token: int) -> tuple[list[str | None], int]:
    """The severed parts in chart order and the token index (negative counts from the end);
    ValueError when the traces cannot be compared."""
    if not traces:
        raise ValueError("The severed-path comparison needs at least one trace.")
    unknown = [k for k in traces if k not in SEVER_ORDER]
    if unknown:
        raise ValueError(f"Unknown severed part {unknown[0]!r}: use None, 'mlp' or 'attn'.")
    first = next(iter(traces.values()))
    for part, trace in traces.items():
        if trace.kind != "hidden":
            raise ValueError(f"Severed paths compare hidden-state traces, not {trace.kind!r} ones.")
        if trace.sever != part:
            raise ValueError(f"The trace given for {SEVER_LABELS[part]} was made with sever={trace.sever!r}.")
        if trace.tokens != first.tokens or trace.convention != first.convention:
            raise ValueError("The traces to compare must share the prompt and the layer convention.")
    n = len(first.tokens)
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not -n <= token < n:
        raise ValueError(f"Token {token!r} is out of range: the prompt has {n} tokens (0..{n - 1}).")
    return [k for k in SEVER_ORDER if k in traces], int(token) % n


def severed_frame(traces: Mapping[str | None, Trace], token: int, metric: str = "prob") -> pd.DataFrame:
    """Long table, one row per (severed part, layer) at ``token``: ``sever`` ("none", "mlp",
    "attn"), ``label``, ``layer``, ``value`` (the metric with that cell restored), ``low`` (the
    corrupted run's value) and ``effect`` (value - low; low - value where lower is better)."""
    parts, token = _checked(traces, token)
    sign = -1.0 if lower_is_better(metric) else 1.0
    frames = []
    for part in parts:
        trace = traces[part]
        values = trace.metric(metric)[token].astype(float)
        if np.isnan(values).any():
            raise ValueError(f"Token {token} was not computed in the {SEVER_LABELS[part]} trace.")
        low = trace.metric_bounds(metric)[0]
        frames.append(pd.DataFrame({
            "sever": part or "none", "label": SEVER_LABELS[part], "layer": np.arange(trace.n_layers),
            "value": values, "low": low, "effect": sign * (values - low)}))
    return pd.concat(frames, ignore_index=True)


def severed_comparison(traces: Mapping[str | None, Trace], token: int, metric: str = "prob",
                       width: int = 460, height: int = 220) -> alt.Chart:
    """Effect per layer at ``token`` with nothing severed, MLP severed and attention severed
    (whichever of the three ``traces`` holds, keyed by their ``sever``), lines on one chart."""
    data = severed_frame(traces, token, metric)
    index = _checked(traces, token)[1]
    first = next(iter(traces.values()))
    labels = [SEVER_LABELS[k] for k in SEVER_ORDER if k in traces]
    colour = alt.Color("label:N", title=None, sort=labels,
                       scale=alt.Scale(domain=labels, range=[SEVER_COLOURS[k] for k in SEVER_ORDER if k in traces]),
                       legend=alt.Legend(orient="bottom", **LINE_LEGEND))
    title = metric_title(first, metric)
    effect = f"{title} − corrupted" if not lower_is_better(metric) else f"corrupted − {title}"
    tips = [alt.Tooltip("label:N", title="severed"), alt.Tooltip("layer:Q", title="layer"),
            alt.Tooltip("effect:Q", title=effect, format=".6g"),
            alt.Tooltip("value:Q", title=title, format=".6g")]
    x = alt.X("layer:Q", title=layer_title(first), scale=alt.Scale(domain=[0, first.n_layers - 1], nice=False),
              axis=alt.Axis(tickMinStep=1, format="d", titleLimit=width + 40))
    lines = alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=x, y=alt.Y("effect:Q", title=f"effect: {effect}"), color=colour, tooltip=tips)
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(strokeDash=[2, 2], color="#999").encode(y="y:Q")
    heading = alt.TitleParams(
        f"Severed paths at token {token_label(index, first.tokens[index], index in first.noised)}",
        subtitle=[ellipsis(first.prompt, MAX_TITLE) + "  ·  * = noised",
                  f"{noise_text(first)}  ·  later MLP / attention outputs at that token kept corrupted"],
        anchor="start", subtitleColor="#555")
    return pad(alt.layer(zero, lines).properties(width=width, height=height, title=heading))


__all__ = ["SEVER_COLOURS", "SEVER_LABELS", "default_token", "severed_comparison", "severed_frame"]
