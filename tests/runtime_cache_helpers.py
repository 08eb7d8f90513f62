"""What the runtime-cache tests share (test_ort_prepacked.py, test_ov_compiled.py)."""
from __future__ import annotations

import numpy as np

from engine.__main__ import example_image


def recorded_calls(model, n_tokens=5):
    """Every (graph, inputs) the model's runner got during one generate, and its result."""
    calls, run = [], model.runner.run

    def spy(graph, inputs):
        calls.append((graph, {k: np.array(v, copy=True) for k, v in inputs.items()}))
        return run(graph, inputs)
    model.runner.run = spy
    result = model.generate(example_image(), "caption en", max_new_tokens=n_tokens)
    model.runner.run = run
    return calls, result


def assert_same_outputs(model, reference, calls, graphs=None):
    """`model`'s runner gives bit-identical outputs to `reference`'s on the recorded calls."""
    for graph, inputs in calls:
        if graphs is None or graph in graphs:
            want, got = reference.runner.run(graph, inputs), model.runner.run(graph, inputs)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{graph}:{name}")
