"""Causal tracing explorer: entry point (`streamlit run app.py`)."""

import streamlit as st

from pages import common

st.set_page_config(page_title="Causal tracing", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page("pages/trace.py", title="Single-prompt trace", icon=":material/grid_on:", default=True),
    st.Page("pages/categories.py", title="Category averages", icon=":material/stacked_line_chart:"),
    st.Page("pages/attention.py", title="Attention", icon=":material/visibility:"),
    st.Page("pages/hidden_states.py", title="Hidden states", icon=":material/timeline:"),
]

page = st.navigation(PAGES, position="top")
common.model_sidebar()
page.run()
