"""Causal tracing explorer: entry point (`streamlit run app.py`).

The pages are the files of `pages/`, registered here with explicit URL paths (unchanged: `/`,
also `/trace`, `/categories`, `/attention`, `/hidden_states`). Each page ends with
`common.run_page(main)`, which hands a fresh server's very first run over to this script when
Streamlit's legacy `pages/` mode ran the page on its own.
"""

import streamlit as st

from pages import common

st.set_page_config(page_title="Causal tracing", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page("pages/trace.py", title="Single-prompt trace", icon=":material/grid_on:",
            url_path=common.PATHS["trace"], default=True),
    st.Page("pages/categories.py", title="Category averages", icon=":material/stacked_line_chart:",
            url_path=common.PATHS["categories"]),
    st.Page("pages/attention.py", title="Attention", icon=":material/visibility:",
            url_path=common.PATHS["attention"]),
    st.Page("pages/hidden_states.py", title="Hidden states", icon=":material/timeline:",
            url_path=common.PATHS["hidden_states"]),
]

page = st.navigation(PAGES, position="top")
common.land(page.url_path or common.PATHS["trace"])
common.model_sidebar()
page.run()
