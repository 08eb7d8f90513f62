"""Fixtures shared by several test files."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Every test runs against a temporary engine cache ($PALIGEMMA_EDGE_CACHE, inherited by the
    subprocesses tests start): the suite neither reads nor writes the user's ~/.cache. A module
    (module_cache) or a test (monkeypatch.setenv) may set its own on top."""
    root = tmp_path_factory.mktemp("session-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PALIGEMMA_EDGE_CACHE", str(root))
    yield root
    mp.undo()


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
