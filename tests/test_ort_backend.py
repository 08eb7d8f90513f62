"""onnxruntime backend settings (engine/runtime/ort_backend.py) that the speed and memory figures
rely on: the vision graph returns its arena memory after each call, and that changes no result."""
from __future__ import annotations

import numpy as np

import engine
from engine.__main__ import example_image


def test_the_vision_graph_gives_its_arena_memory_back_with_the_same_outputs(module_cache):
    m = engine.load(backend="onnxruntime", weights="int8", threads=2, progress=False, vision="graph")
    try:
        runner = m.runner
        options = runner._run_options
        assert options["vision"].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
        assert set(options) == {"vision"}          # the decoder-side graphs keep their memory between calls
        pixels = m.processor.preprocess(example_image())[None]                   # [1, 3, S, S]
        shrunk = runner.run("vision", {"pixel_values": pixels})
        name = runner._outputs["vision"]
        plain = runner._sessions["vision"].run(name, runner._feed("vision", {"pixel_values": pixels}))
        for a, b in zip((shrunk[n] for n in name), plain):
            assert np.array_equal(a, b)
    finally:
        m.close()
