"""Coming soon."""

import streamlit as st

st.title("hidden_states")
st.info("This page is being built.")
