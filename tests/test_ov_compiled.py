"""OpenVINO's compiled-model cache (engine/runtime/ov_compiled.py) and the load-time warm-up
(engine/runtime/ov_backend.py): graphs imported from the cache and warmed graphs compute exactly
what freshly compiled, cold graphs compute; entries are written once, checked by their stamps,
rebuilt when damaged or stale, and never make a load fail."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import pytest

import engine
from engine.__main__ import example_image
from engine.runtime import ov_compiled, row_blocks, stamped_dir
from runtime_cache_helpers import assert_same_outputs, recorded_calls


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh engine cache for one test (the default model is exported into it first)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PALIGEMMA_EDGE_CACHE", str(root))
    monkeypatch.delenv(ov_compiled.ENV_SWITCH, raising=False)
    return root / ov_compiled.SUBDIR


def load(**kw):
    return engine.load(backend="openvino", threads=2, progress=False, **kw)


def blob_of(entry):
    return next(p for p in entry.iterdir() if p.name != stamped_dir.STAMP)


def entry_mtimes(cache):
    return {p.name: blob_of(p).stat().st_mtime_ns for p in ov_compiled.entries(cache)}


def test_imported_graphs_compute_exactly_what_compiled_graphs_compute(cache, caplog):
    plain = load(prepacked_cache=False, warm_up=False)
    assert not cache.exists()                                  # off: nothing written
    calls, expected = recorded_calls(plain)
    with caplog.at_level(logging.WARNING, logger="engine"):
        first = load()                                         # compiles and writes the entries
        written = entry_mtimes(cache)
        second = load()                                        # imports them
    assert not [r.getMessage() for r in caplog.records if r.name == "engine"]
    assert sorted(n.rsplit("-", 1)[0] for n in written) == sorted(first.runner.graph_names)
    assert entry_mtimes(cache) == written, "a second load rewrote cache entries"
    assert sorted(second.runner.cache_entries()) == ov_compiled.entries(cache) and not plain.runner.cache_entries()
    assert not ov_compiled.leftovers(cache)
    assert all(stamped_dir.check(p) is None for p in ov_compiled.entries(cache))
    assert {g for g, _ in calls} == set(plain.runner.graph_names)
    for model in (first, second):                              # bit-exact, every graph, every call
        assert_same_outputs(model, plain, calls)
        assert list(model.generate(example_image(), "caption en", max_new_tokens=5).tokens) == list(expected.tokens)
    for m in (plain, first, second):
        m.close()


def test_warm_up_runs_every_graph_once_and_changes_no_result(cache, monkeypatch):
    from engine.runtime.ov_backend import OvRunner
    cold = load(prepacked_cache=False, warm_up=False)
    seen: dict[str, list] = {}
    run = OvRunner.run

    def record(self, graph, inputs):
        seen.setdefault(graph, []).append(next(iter(inputs.values())).shape[0])
        return run(self, graph, inputs)
    monkeypatch.setattr(OvRunner, "run", record)
    warmed = load(prepacked_cache=False)
    monkeypatch.setattr(OvRunner, "run", run)
    assert cold.runner.warmup_seconds == 0.0 and warmed.runner.warmup_seconds > 0.0
    # each graph once: the vision tower on one image, the others on one row block
    block = warmed.runner.row_block
    assert seen == {g: [1 if g in ("vision", "lm_head") else block] for g in warmed.runner.graph_names}
    # a graph's first run releases its weight pages; warm-up did it for all of them
    assert warmed.runner._mapped == {}
    assert sorted(cold.runner._mapped) == sorted(cold.runner.graph_names)
    calls, expected = recorded_calls(cold)
    warm_calls, got = recorded_calls(warmed)
    assert list(got.tokens) == list(expected.tokens) and got.text == expected.text
    assert [g for g, _ in warm_calls] == [g for g, _ in calls]
    assert_same_outputs(warmed, cold, calls)
    cold.close()
    warmed.close()


def test_full_warm_up_runs_every_graph_at_a_prompt_size_and_changes_no_result(cache, monkeypatch):
    """warm_up="full": the vision tower on a zero image, then every other graph on zeros of the row
    counts of a prompt's calls, the image tokens plus 8 rows in row blocks (the plugin's first-run
    work at a prompt's size, done at load)."""
    from engine.runtime.ov_backend import OvRunner
    cold = load(prepacked_cache=False, warm_up=False)
    seen: dict[str, set] = {}
    run = OvRunner.run

    def record(self, graph, inputs):
        seen.setdefault(graph, set()).update(v.shape[0] for v in inputs.values() if v.ndim == 2)
        return run(self, graph, inputs)
    monkeypatch.setattr(OvRunner, "run", record)
    full = load(prepacked_cache=False, warm_up="full")
    monkeypatch.setattr(OvRunner, "run", run)
    rows = full.config.num_image_tokens + 8
    sizes = {b - a for a, b in row_blocks(rows, full.runner.row_block)}   # the row counts of run_rows' calls
    assert full.runner.warmup_seconds > 0.0 and full.runner._mapped == {}   # every graph ran once
    assert set(seen) == set(full.runner.graph_names)
    assert all(seen[g] == sizes for g in seen if g.startswith("decoder_")), (seen, sizes)
    assert seen.get("lm_head", {1}) == {1}
    _, expected = recorded_calls(cold)
    _, got = recorded_calls(full)
    assert list(got.tokens) == list(expected.tokens) and got.text == expected.text
    with pytest.raises(ValueError, match="warm_up must be True, False or 'full'"):
        load(prepacked_cache=False, warm_up="yes")
    cold.close()
    full.close()


def test_warm_up_feeds_one_row_of_zeros_per_dynamic_dimension(cache):
    model = load(prepacked_cache=False, warm_up=False)
    runner = model.runner
    for graph in runner.graph_names:
        feed = runner._zero_rows(graph, 1)
        assert set(feed) == set(runner.input_names(graph))
        for port in runner._compiled[graph].inputs:
            arr, shape = feed[port.get_any_name()], port.get_partial_shape()
            assert arr.dtype == np.float32 and not arr.any()
            assert list(arr.shape) == [d.get_length() if d.is_static else 1 for d in shape]
    model.close()


def test_env_switch_turns_the_cache_off(cache, monkeypatch):
    monkeypatch.setenv(ov_compiled.ENV_SWITCH, "0")
    load().close()
    assert not cache.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "stamp", "extra"])
def test_a_damaged_entry_is_written_again_and_the_load_goes_on(cache, caplog, damage):
    load().close()
    entry = next(p for p in ov_compiled.entries(cache) if p.name.startswith("vision-"))
    blob = blob_of(entry)
    if damage == "flip":                      # same size, one byte changed
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        os.chmod(blob, 0o644)
        blob.write_bytes(bytes(raw))
    elif damage == "truncate":
        os.chmod(blob, 0o644)
        blob.write_bytes(blob.read_bytes()[:-100])
    elif damage == "remove":
        blob.unlink()
    elif damage == "stamp":
        (entry / stamped_dir.STAMP).write_text("{not json")
    else:
        (entry / "123.blob").write_bytes(b"not a blob")
    assert stamped_dir.check(entry) is not None
    with caplog.at_level(logging.WARNING, logger="engine"):
        model = load()
    warned = [r.getMessage() for r in caplog.records if "cached OpenVINO blob" in r.getMessage()]
    assert len(warned) == 1 and str(entry) in warned[0] and "bad" in warned[0], warned
    assert stamped_dir.check(entry) is None                   # rebuilt and sealed
    reference = load(prepacked_cache=False)
    calls, _ = recorded_calls(reference, 2)
    assert_same_outputs(model, reference, calls, {"vision"})
    model.close()
    reference.close()


def test_a_touched_graph_rewrites_its_entry_quietly(cache, caplog):
    model = load()
    xml = model.artifact_dir / model.manifest.graphs["openvino"]["vision"]
    model.close()
    entry = next(p for p in ov_compiled.entries(cache) if p.name.startswith("vision-"))
    old = json.loads((entry / stamped_dir.STAMP).read_text())["source"]
    later = time.time() + 5
    os.utime(xml, (later, later))             # OpenVINO would compile again: the entry follows it
    with caplog.at_level(logging.WARNING, logger="engine"):
        load().close()
    assert not [r.getMessage() for r in caplog.records if "OpenVINO" in r.getMessage()]
    stamp = json.loads((entry / stamped_dir.STAMP).read_text())
    assert stamp["source"] != old and stamp["source"] == ov_compiled.source_tag(xml)
    assert stamped_dir.check(entry) is None and len(list(entry.iterdir())) == 2


def test_entries_are_keyed_by_runtime_cpu_options_path_and_content(cache, monkeypatch, tmp_path):
    model = load(prepacked_cache=False)
    manifest, rel = model.manifest, model.manifest.graphs["openvino"]["vision"]
    xml = model.artifact_dir / rel
    cfg = {"NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    base = ov_compiled.entry_dir(cache, "vision", manifest, rel, xml, "2026.1", cfg)
    assert base == ov_compiled.entry_dir(cache, "vision", manifest, rel, xml, "2026.1", {**cfg, "CACHE_DIR": "x"})
    assert base != ov_compiled.entry_dir(cache, "vision", manifest, rel, xml, "2026.2", cfg)
    assert base != ov_compiled.entry_dir(cache, "vision", manifest, rel, xml, "2026.1", {**cfg, "NUM_STREAMS": 2})
    assert base != ov_compiled.entry_dir(cache, "vision", manifest, rel, tmp_path / "moved.xml", "2026.1", cfg)
    monkeypatch.setattr(stamped_dir, "cpu_tag", lambda: "x86_64|avx512f")
    assert base != ov_compiled.entry_dir(cache, "vision", manifest, rel, xml, "2026.1", cfg)
    monkeypatch.undo()
    bin_rel = rel.replace(".xml", ".bin")
    monkeypatch.setitem(manifest.files, bin_rel, dataclasses.replace(manifest.files[bin_rel], sha256="0" * 64))
    assert base != ov_compiled.entry_dir(cache, "vision", manifest, rel, xml, "2026.1", cfg)
    assert ov_compiled.graph_files(manifest, rel) == [rel, rel.replace(".xml", ".bin")]
    model.close()


def test_no_room_or_an_unwritable_cache_loads_without_it(cache, caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(stamped_dir, "has_room", lambda root, size: False)
    with caplog.at_level(logging.WARNING, logger="engine"):
        model = load()
    assert not ov_compiled.entries(cache)
    lines = [r.getMessage() for r in caplog.records if "without the compiled-model cache" in r.getMessage()]
    assert len(lines) == 1 and "GiB would stay free" in lines[0]
    model.close()
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PALIGEMMA_EDGE_CACHE", str(tmp_path / "cache"))      # the default model's export
    monkeypatch.setattr(ov_compiled, "cache_root", lambda: blocker / "ov-compiled")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine"):
        model = load()
    lines = [r.getMessage() for r in caplog.records if "without the compiled-model cache" in r.getMessage()]
    assert len(lines) == 1 and "PALIGEMMA_EDGE_OV_COMPILED=0" in lines[0]
    assert list(model.generate(example_image(), "caption en", max_new_tokens=3).tokens)
    model.close()


def test_cache_command_lists_and_clears_the_entries(cache, capsys):
    from engine.__main__ import main
    load().close()
    n = len(ov_compiled.entries(cache))
    assert n > 0
    assert main(["cache", "list"]) == 0
    assert f"OpenVINO compiled blobs: {n} graphs" in capsys.readouterr().out
    assert main(["cache", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ov_compiled"]["graphs"] == n
    assert main(["cache", "clear", "--older-than", "1h"]) == 0        # just used: kept
    assert len(ov_compiled.entries(cache)) == n
    (ov_compiled.entries(cache)[0] / stamped_dir.STAMP).unlink()
    capsys.readouterr()
    assert main(["cache", "clear", "--corrupt"]) == 0
    assert len(ov_compiled.entries(cache)) == n - 1 and "OpenVINO compiled blobs of 1 graphs" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert not ov_compiled.entries(cache)
