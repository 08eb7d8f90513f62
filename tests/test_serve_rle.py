"""COCO RLE of the server's segment masks (engine/rle.py, shared with engine.batch and the CLI)
against hand-computed cases, and the stop-string cutter of the server's streams."""
import numpy as np
import pytest

from engine.serve.generation import StopMatcher
from engine.rle import decode, encode


def test_hand_computed_column_major():
    # columns top to bottom, then left to right: col0 = 0,1,0; col1 = 1,1,0 -> 0 1 0 1 1 0
    mask = np.array([[0, 1],
                     [1, 1],
                     [0, 0]], dtype=bool)
    assert encode(mask) == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}


def test_first_pixel_set_starts_with_zero_run():
    assert encode(np.array([[1, 0]], dtype=bool))["counts"] == [0, 1, 1]
    assert encode(np.ones((2, 2), dtype=bool))["counts"] == [0, 4]
    assert encode(np.zeros((2, 3), dtype=bool))["counts"] == [6]


def test_decode_hand_computed():
    got = decode({"size": [2, 3], "counts": [2, 3, 1]})        # flat F-order: 0 0 1 1 1 0
    want = np.array([[0, 1, 1],
                     [0, 1, 0]], dtype=bool)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (16, 33), (64, 1)])
def test_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    for p in (0.0, 0.1, 0.5, 1.0):
        mask = rng.random(shape) < p
        rle = encode(mask)
        assert sum(rle["counts"]) == mask.size
        assert np.array_equal(decode(rle), mask)


def test_decode_refuses_malformed():
    with pytest.raises(ValueError, match="sum to"):
        decode({"size": [2, 2], "counts": [1, 1]})


def test_stop_matcher_holds_back_a_possible_stop():
    s = StopMatcher(("square",))
    out = [s.feed(p) for p in ["a green", " squ", "are, a blue"]]
    assert "".join(out) == "a green "
    assert s.stopped


def test_stop_matcher_without_match_lets_everything_out():
    s = StopMatcher(("XYZ",))
    text = "".join(s.feed(p) for p in ["a red ", "circle", " X"]) + s.flush()
    assert text == "a red circle X" and not s.stopped
    assert StopMatcher(("b",)).cut("aabba") == ("aa", True)
