"""Coming soon."""

import streamlit as st

st.title("trace")
st.info("This page is being built.")
