"""The onnxruntime prepacked-weights cache (engine/runtime/ort_prepacked.py): sessions made from
it compute exactly what sessions made from the artifact's graphs compute; the entries are
written once, checked by their stamps, rebuilt when damaged, and never make a load fail."""
from __future__ import annotations

import json
import logging
import threading

import pytest

import engine
from engine.__main__ import example_image
from engine.runtime import ort_prepacked
from runtime_cache_helpers import assert_same_outputs, recorded_calls


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh engine cache for one test; the default model is exported into it once per test
    module run by the session cache, so only the prepacked entries start empty here."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PALIGEMMA_EDGE_CACHE", str(root))
    monkeypatch.delenv(ort_prepacked.ENV_SWITCH, raising=False)
    return root / ort_prepacked.SUBDIR


def load(**kw):
    # vision="graph": these tests follow the vision graph's entry too (auto may compute it natively)
    return engine.load(backend="onnxruntime", threads=2, progress=False, **{"vision": "graph", **kw})


def entry_mtimes(cache):
    return {p.name: (p / ort_prepacked.DATA).stat().st_mtime_ns for p in ort_prepacked.entries(cache)}


def test_cached_sessions_compute_exactly_what_the_artifact_graphs_compute(cache, caplog):
    plain = load(prepacked_cache=False)
    assert not cache.exists()                                  # off: nothing written
    calls, expected = recorded_calls(plain)
    with caplog.at_level(logging.WARNING, logger="engine"):
        first = load()                                         # writes the entries
        written = entry_mtimes(cache)
        second = load()                                        # maps them
    assert not [r.getMessage() for r in caplog.records if r.name == "engine"]
    assert sorted(n.rsplit("-", 1)[0] for n in written) == sorted(first.runner.graph_names)
    assert entry_mtimes(cache) == written, "a second load rewrote cache entries"
    assert not ort_prepacked.leftovers(cache)
    assert {g for g, _ in calls} == set(plain.runner.graph_names)
    for model in (first, second):
        assert_same_outputs(model, plain, calls)              # bit-exact, every graph, every call
        assert list(model.generate(example_image(), "caption en", max_new_tokens=5).tokens) == list(expected.tokens)
    for m in (plain, first, second):
        m.close()


def test_env_switch_turns_the_cache_off(cache, monkeypatch):
    monkeypatch.setenv(ort_prepacked.ENV_SWITCH, "0")
    load().close()
    assert not cache.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "stamp"])
def test_a_damaged_entry_is_written_again_and_the_load_goes_on(cache, caplog, damage):
    load().close()
    entry = next(p for p in ort_prepacked.entries(cache) if p.name.startswith("vision-"))
    data = entry / ort_prepacked.DATA
    if damage == "flip":                      # same size, one byte changed
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "remove":
        data.unlink()
    else:
        (entry / ort_prepacked.STAMP).write_text("{not json")
    assert ort_prepacked.check_entry(entry) is not None
    with caplog.at_level(logging.WARNING, logger="engine"):
        model = load()
    warned = [r.getMessage() for r in caplog.records if "cached onnxruntime weights" in r.getMessage()]
    assert len(warned) == 1 and str(entry) in warned[0], warned
    assert ort_prepacked.check_entry(entry) is None           # rebuilt and sealed
    reference = load(prepacked_cache=False)
    calls, _ = recorded_calls(reference, 2)
    assert_same_outputs(model, reference, calls, {"vision"})
    model.close()
    reference.close()


def test_a_touched_but_unchanged_file_is_hashed_not_rebuilt(cache):
    load().close()
    entry = ort_prepacked.entries(cache)[0]
    data = entry / ort_prepacked.DATA
    before = json.loads((entry / ort_prepacked.STAMP).read_text())["files"][ort_prepacked.DATA]
    data.write_bytes(data.read_bytes())                       # same bytes, new mtime / ctime
    assert ort_prepacked.check_entry(entry) is None
    after = json.loads((entry / ort_prepacked.STAMP).read_text())["files"][ort_prepacked.DATA]
    assert after["sha256"] == before["sha256"] and after["key"] != before["key"]   # stamp refreshed
    assert after["key"] == ort_prepacked._file_key(data.stat())


def test_entries_are_keyed_by_runtime_cpu_and_content(cache, monkeypatch):
    model = load()
    manifest, rel = model.manifest, model.manifest.graphs["onnx"]["vision"]
    base = ort_prepacked.entry_dir(cache, "vision", manifest, rel, "1.0", "tag")
    assert base == ort_prepacked.entry_dir(cache, "vision", manifest, rel, "1.0", "tag")
    assert base != ort_prepacked.entry_dir(cache, "vision", manifest, rel, "1.1", "tag")
    assert base != ort_prepacked.entry_dir(cache, "vision", manifest, rel, "1.0", "other")
    monkeypatch.setattr(ort_prepacked, "cpu_tag", lambda: "x86_64|avx512f")
    assert base != ort_prepacked.entry_dir(cache, "vision", manifest, rel, "1.0", "tag")
    assert ort_prepacked.graph_files(manifest, rel) == [rel, rel.replace(".onnx", ".data")]
    model.close()


def test_no_room_or_an_unwritable_cache_loads_without_it(cache, caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(ort_prepacked, "has_room", lambda root, size: False)
    with caplog.at_level(logging.WARNING, logger="engine"):
        model = load()
    assert not ort_prepacked.entries(cache)
    assert any("without the prepacked-weights cache" in r.getMessage() and "GiB would stay free" in r.getMessage()
               for r in caplog.records)
    model.close()
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PALIGEMMA_EDGE_CACHE", str(tmp_path / "cache"))      # the default model's export
    monkeypatch.setattr(ort_prepacked, "cache_root", lambda: blocker / "ort-prepacked")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine"):
        model = load()
    lines = [r.getMessage() for r in caplog.records if "without the prepacked-weights cache" in r.getMessage()]
    assert len(lines) == 1 and "PALIGEMMA_EDGE_ORT_PREPACKED=0" in lines[0]
    assert list(model.generate(example_image(), "caption en", max_new_tokens=3).tokens)
    model.close()


def test_racing_loads_write_each_entry_once(cache):
    models, errors = [], []

    def go():
        try:
            models.append(load())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    names = [p.name for p in ort_prepacked.entries(cache)]
    assert len(names) == len(models[0].runner.graph_names) == len(set(names))
    assert not ort_prepacked.leftovers(cache)
    assert all(ort_prepacked.check_entry(p) is None for p in ort_prepacked.entries(cache))
    tokens = {tuple(m.generate(example_image(), "caption en", max_new_tokens=4).tokens) for m in models}
    assert len(tokens) == 1
    for m in models:
        m.close()


def test_cache_command_lists_and_clears_the_entries(cache, capsys):
    from engine.__main__ import main
    load().close()
    n = len(ort_prepacked.entries(cache))
    assert main(["cache", "list"]) == 0
    assert f"onnxruntime prepacked weights: {n} graphs" in capsys.readouterr().out
    assert main(["cache", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ort_prepacked"]["graphs"] == n
    assert main(["cache", "clear", "--older-than", "1h"]) == 0        # just used: kept
    assert len(ort_prepacked.entries(cache)) == n
    entry = ort_prepacked.entries(cache)[0]
    (entry / ort_prepacked.STAMP).unlink()
    capsys.readouterr()
    assert main(["cache", "clear", "--corrupt"]) == 0
    assert len(ort_prepacked.entries(cache)) == n - 1 and "of 1 graphs" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert not ort_prepacked.entries(cache)
