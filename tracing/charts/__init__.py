"""Altair charts (no Streamlit): ``trace`` (heatmaps, compact view, noise sweep), ``averages``
(category averages), ``attention`` and ``hidden``, all drawn with the shared ``style``."""
