"""AppTest smoke test: the app renders every page with the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.mark.slow
def test_app_renders_with_embedded_model():
    at = AppTest.from_file(APP, default_timeout=300).run()
    assert not at.exception
    assert any("SmolLM2-135M-Instruct" in c.value for c in at.sidebar.caption)
