"""Fixtures shared by several test files."""
import os

import pytest


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A fresh engine cache directory ($PALIGEMMA_EDGE_CACHE) for the tests of one module, so that
    their exports are made here and reused within the module, never taken from the user's cache."""
    root = tmp_path_factory.mktemp("engine-cache")
    old = os.environ.get("PALIGEMMA_EDGE_CACHE")
    os.environ["PALIGEMMA_EDGE_CACHE"] = str(root)
    yield root
    if old is None:
        del os.environ["PALIGEMMA_EDGE_CACHE"]
    else:
        os.environ["PALIGEMMA_EDGE_CACHE"] = old
