"""Row blocks (engine.runtime.row_blocks, RunnerBase.row_block): engine.model.run_rows gives a
row-wise graph at most runner.row_block rows per call (OpenVINO: 64, so that the plugin's
per-graph activation memory stays that of 64 rows; ov_backend.py). The blocks cover the rows in
order, none has one row, and the results are bit for bit those of one call: checked on the default
model's OpenVINO int8 graphs, whose one-row calls are not exact, against the whole-call outputs
and through generate."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.__main__ import example_image_path
from engine.runtime import row_blocks


def test_blocks_cover_the_rows_in_order_without_one_row_blocks():
    assert row_blocks(260, 64) == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 260)]
    assert row_blocks(65, 64) == [(0, 63), (63, 65)]         # a one-row tail takes a row
    assert row_blocks(64, 64) == [(0, 64)]
    assert row_blocks(7, 3) == [(0, 3), (3, 5), (5, 7)]
    for block in (3, 4, 5, 64):
        for n in range(2, 3 * block + 2):
            blocks = row_blocks(n, block)
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert all(2 <= stop - start <= block for start, stop in blocks), (n, block, blocks)


def test_blocks_below_three_rows_are_refused():
    with pytest.raises(ValueError, match="at least 3 rows"):
        row_blocks(10, 2)


@pytest.fixture(scope="module")
def ov_int8(module_cache):
    m = engine.load(backend="openvino", weights="int8", progress=False)
    yield m
    m.close()


def test_which_runners_block(ov_int8, module_cache):
    assert ov_int8.runner.row_block == 64
    m = engine.load(backend="onnxruntime", weights="int8", progress=False)
    try:
        assert m.runner.row_block is None
    finally:
        m.close()


def test_blocked_calls_equal_one_call(ov_int8):
    m, runner = ov_int8, ov_int8.runner
    t = m.config.text
    rng = np.random.default_rng(11)
    inputs = {"hidden": (rng.standard_normal((10, t.hidden_size)) * rng.uniform(0.01, 30, (10, 1))).astype(np.float32),
              "attn": rng.standard_normal((10, t.num_attention_heads * t.head_dim)).astype(np.float32)}
    calls = []
    run = runner.run

    def recording_run(graph, feed):
        calls.append(len(feed["hidden"]))
        return run(graph, feed)

    runner.run = recording_run
    try:
        runner.row_block = None
        whole = m.run_rows("decoder_1", inputs)
        runner.row_block = 3
        blocked = m.run_rows("decoder_1", inputs)
    finally:
        runner.run = run
        runner.row_block = 64
    assert calls == [10, 3, 3, 2, 2]
    assert sorted(blocked) == sorted(whole)
    for key in whole:
        assert np.array_equal(blocked[key], whole[key]), key


def test_generate_is_the_same_in_blocks(ov_int8):
    runner = ov_int8.runner
    try:
        runner.row_block = None
        whole = ov_int8.generate(example_image_path(), "caption en", max_new_tokens=6)
        ov_int8.image_cache.clear()
        runner.row_block = 5
        blocked = ov_int8.generate(example_image_path(), "caption en", max_new_tokens=6)
    finally:
        runner.row_block = 64
    assert blocked.tokens == whole.tokens and blocked.text == whole.text


def test_openvino_refuses_a_bad_row_block(ov_int8):
    from engine.runtime.ov_backend import OvRunner
    for bad in (2, 0, 3.5, True):
        with pytest.raises(ValueError, match="row_block must be an integer >= 3 or None"):
            OvRunner(ov_int8.artifact_dir, ov_int8.manifest, row_block=bad)
