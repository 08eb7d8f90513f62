"""One-row graph calls (engine.model.run_rows): runners whose one-row calls are exact
(runner.one_row_exact: onnxruntime with per-row int8 matrices only) run one row as is; the others
pad it to two. The claim is checked where it is made: every decoder graph of the default model's
int8 onnxruntime artifact gives a row, alone, bit for bit what it gives that row in a call of
several rows (random rows of very different scales); and a padded runner is never asked for one
row."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.__main__ import example_image_path
from engine.runtime.ort_backend import per_row_int8_only


@pytest.fixture(scope="module")
def int8_ort(module_cache):
    m = engine.load(backend="onnxruntime", weights="int8", progress=False, decoder="graphs")
    yield m
    m.close()


def test_flag_per_backend_and_format(int8_ort, module_cache):
    assert int8_ort.runner.one_row_exact and per_row_int8_only(int8_ort.manifest)
    for backend, weights in (("onnxruntime", "fp32"), ("onnxruntime", "int4"), ("openvino", "int8")):
        m = engine.load(backend=backend, weights=weights, progress=False)
        try:
            assert not m.runner.one_row_exact, (backend, weights)
        finally:
            m.close()


def test_one_row_equals_its_row_in_a_batch(int8_ort):
    runner = int8_ort.runner
    rng = np.random.default_rng(7)
    graphs = [g for g in runner.graph_names if g.startswith("decoder_")]
    assert graphs
    for graph in graphs:
        names = runner.input_names(graph)
        width = {i.name: int(i.shape[-1]) for i in runner._sessions[graph].get_inputs()}
        for trial in range(4):
            batch = {n: (rng.standard_normal((5, width[n])) * rng.uniform(0.01, 40, (5, 1))).astype(np.float32)
                     for n in names}
            many = runner.run(graph, batch)
            for r in (0, 3):
                one = runner.run(graph, {n: v[r:r + 1] for n, v in batch.items()})
                for key in one:
                    assert np.array_equal(one[key][0], many[key][r]), (graph, key, r)


def test_padding_kept_where_not_exact(module_cache):
    m = engine.load(backend="onnxruntime", weights="fp32", progress=False)
    calls = []
    run = m.runner.run

    def counting_run(graph, inputs):
        if graph.startswith("decoder_"):
            calls.append(len(inputs["hidden"]))
        return run(graph, inputs)

    m.runner.run = counting_run
    try:
        m.generate(example_image_path(), "caption en", max_new_tokens=3)
    finally:
        m.runner.run = run
        m.close()
    assert calls and min(calls) >= 2     # decode rows padded to two; prefill rows are many
