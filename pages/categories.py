"""Coming soon."""

import streamlit as st

st.title("categories")
st.info("This page is being built.")
