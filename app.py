"""Causal tracing explorer: entry point (`streamlit run app.py`).

The pages are the files of `pages/`, registered here with explicit URL paths (unchanged: `/`,
also `/trace`, `/categories`, `/attention`, `/hidden_states`, `/rome`). Each page ends with
`common.run_page(main)`, which hands a fresh server's very first run over to this script when
Streamlit's legacy `pages/` mode ran the page on its own.
"""

from pathlib import Path

import streamlit as st

from pages import common

# A shipped favicon: a ":material/...:" page icon would make the browser fetch it from Google's
# font servers (the app requests nothing from any host but its own).
FAVICON = str(Path(__file__).resolve().parent / ".streamlit" / "favicon.png")
st.set_page_config(page_title="Causal tracing", page_icon=FAVICON, layout="wide")

PAGES = [
    st.Page("pages/trace.py", title="Single-prompt trace", icon=":material/grid_on:",
            url_path=common.PATHS["trace"], default=True),
    st.Page("pages/categories.py", title="Category averages", icon=":material/stacked_line_chart:",
            url_path=common.PATHS["categories"]),
    st.Page("pages/attention.py", title="Attention", icon=":material/visibility:",
            url_path=common.PATHS["attention"]),
    st.Page("pages/hidden_states.py", title="Hidden states", icon=":material/timeline:",
            url_path=common.PATHS["hidden_states"]),
    st.Page("pages/rome.py", title="ROME averages", icon=":material/insights:",
            url_path=common.PATHS["rome"]),
]

page = st.navigation(PAGES, position="top")
common.land(page.url_path or common.PATHS["trace"])
common.show_problems(common.restore_study(page.url_path or common.PATHS["trace"]))
common.model_sidebar()
page.run()
