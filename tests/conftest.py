"""Test isolation: gin bindings of one test never leak into the next."""
from __future__ import annotations

import gin
import pytest


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()
