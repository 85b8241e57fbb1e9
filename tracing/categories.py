"""The seed study's prompt categories: keys, labels, order, the combined group and colours.

Every page, chart and table names, orders and colours categories through this module.
"""

from __future__ import annotations

from typing import Iterable

CATEGORIES = {
    "non_english": "Non-English regurgitation",
    "plain_english": "Plain-English regurgitation",
    "semantic": "Semantic recall",
}
REGURGITATION = ("non_english", "plain_english")
COMBINED = "regurgitation"  # the two regurgitation categories averaged together
GROUP_LABELS = {**CATEGORIES, COMBINED: "Regurgitation (combined)"}
GROUP_ORDER = ("non_english", "plain_english", COMBINED, "semantic")
# One colour per group, used by every chart (none of them is a restored-token colour).
GROUP_COLOURS = {
    "non_english": "#1b9e77",
    "plain_english": "#a6761d",
    COMBINED: "#e7298a",
    "semantic": "#7570b3",
}
OTHER_COLOUR = "#7f7f7f"


def group_of(category: str, combine_regurgitation: bool = False) -> str:
    """The averaging group of a category (the two regurgitation ones merge when combined)."""
    if combine_regurgitation and category in REGURGITATION:
        return COMBINED
    return category


def group_label(group: str) -> str:
    """Display name of a category or group (unknown ones as given)."""
    return GROUP_LABELS.get(group, str(group))


def ordered(groups: Iterable[str]) -> list[str]:
    """Distinct groups in the study's order, unknown ones last in alphabetical order."""
    distinct = list(dict.fromkeys(groups))
    known = [g for g in GROUP_ORDER if g in distinct]
    return known + sorted(g for g in distinct if g not in GROUP_ORDER)


def group_colour(group: str) -> str:
    """The colour of a group (grey for unknown ones)."""
    return GROUP_COLOURS.get(group, OTHER_COLOUR)
