"""Fixtures for the pure core's unit tests.

The container/network/state builders live in `tests/unit/builders.py`, not here: parametrize
tables call them at import time, and a conftest module is not meant to be imported.
"""

from __future__ import annotations

import jinja2
import pytest

from controlplane.templating import load_template


@pytest.fixture(scope="session")
def template() -> jinja2.Template:
    """The shipped nginx template, loaded the way the daemon loads it."""
    return load_template()
