"""Streamlit pages (thin: widgets in, library calls, charts out)."""
