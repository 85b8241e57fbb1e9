"""What every chart shares: token display (visible whitespace, escaping, quoting, ellipsis),
palettes (per restored kind, per token role, per category), kind labels, sizing, PNG/SVG export."""

from __future__ import annotations

import threading
from pathlib import Path

import altair as alt

from ..categories import GROUP_COLOURS, GROUP_LABELS, group_colour, group_label, ordered

# ColorBrewer / matplotlib ramps (ROME's cmaps), from white: Vega's own schemes start tinted.
RAMPS = {
    "hidden": ["#fcfbfd", "#efedf5", "#dadaeb", "#bcbddc", "#9e9ac8", "#807dba", "#6a51a3",
               "#54278f", "#3f007d"],
    "mlp": ["#f7fcf5", "#e5f5e0", "#c7e9c0", "#a1d99b", "#74c476", "#41ab5d", "#238b45",
            "#006d2c", "#00441b"],
    "attn": ["#fff5f0", "#fee0d2", "#fcbba1", "#fc9272", "#fb6a4a", "#ef3b2c", "#cb181d",
             "#a50f15", "#67000d"],
}
KIND_LABELS = {"hidden": "hidden state", "mlp": "MLP", "attn": "attention"}
SHORT_KIND = {"hidden": "Hidden states", "mlp": "MLP outputs", "attn": "Attention outputs"}
# One colour per token role, in every chart that shows tokens (traces, attention).
TOKEN_COLOURS = {"first": "#636363", "noised": "#e6550d", "other noised": "#fdae6b", "final": "#3182bd"}
LINE_LEGEND = dict(symbolType="stroke", symbolStrokeWidth=3, symbolOpacity=1)
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥"}

__all__ = [
    "GROUP_COLOURS", "GROUP_LABELS", "KIND_LABELS", "LINE_LEGEND", "RAMPS", "SHORT_KIND",
    "TOKEN_COLOURS", "ellipsis", "group_colour", "group_label", "group_scale", "pad",
    "quote_token", "show_token", "to_png", "to_svg", "token_label", "token_labels",
]


def show_token(token: str) -> str:
    """A token with visible whitespace (" Paris" -> "␣Paris"), other invisible characters escaped
    (no-break space -> "\\xa0") and "∅" for an empty token."""
    shown = "".join(VISIBLE.get(c) or (c if c.isprintable() else _escape(c)) for c in token)
    return shown or "∅"


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def quote_token(token: str) -> str:
    """A token in double quotes with escaped newlines and tabs: " Paris" -> '" Paris"'."""
    return '"' + token.replace("\n", "\\n").replace("\t", "\\t") + '"'


def token_label(index: int, token: str, noised: bool = False) -> str:
    """A unique axis label: index, visible token, ``*`` when noised ("3 ␣Tower*")."""
    return f"{index} {show_token(token)}{'*' if noised else ''}"


def token_labels(tokens, noised=()) -> list[str]:
    """``token_label`` of every token of a prompt."""
    marked = set(noised)
    return [token_label(i, t, i in marked) for i, t in enumerate(tokens)]


def ellipsis(text: str, limit: int) -> str:
    """``text`` on one line (newlines as ↵), cut to ``limit`` characters with "…"."""
    text = text.replace("\n", "↵")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def group_scale(groups) -> tuple[list[str], alt.Scale]:
    """(labels in study order, colour scale) for a colour channel on group labels."""
    keys = ordered(groups)
    labels = [group_label(g) for g in keys]
    return labels, alt.Scale(domain=labels, range=[group_colour(g) for g in keys])


def pad(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """Natural size (the plot gets its width and height; titles and legends add to them): Streamlit
    otherwise squeezes everything into the width and height ("fit")."""
    return chart.properties(autosize=alt.AutoSizeParams(type="pad", contains="padding"))


FONT = "DejaVu Sans"  # shipped in charts/fonts (it has every glyph the token labels use, e.g. ␣)
FONT_DIR = Path(__file__).with_name("fonts")
_fonts_lock = threading.Lock()
_fonts_registered = False


def _converter():
    """vl-convert, with the shipped font registered once (exports look the same on any machine)."""
    global _fonts_registered
    import vl_convert as vlc

    with _fonts_lock:
        if not _fonts_registered:
            vlc.register_font_directory(str(FONT_DIR))
            _fonts_registered = True
    return vlc


def _export_config() -> dict:
    return {"font": FONT}


def to_png(chart: alt.TopLevelMixin, scale: float = 2) -> bytes:
    """PNG bytes of a chart (vl-convert), every text in the shipped font."""
    return _converter().vegalite_to_png(chart.to_json(), scale=scale, config=_export_config())


def to_svg(chart: alt.TopLevelMixin) -> str:
    """SVG text of a chart (vl-convert), every text in the shipped font's family."""
    return _converter().vegalite_to_svg(chart.to_json(), config=_export_config())
