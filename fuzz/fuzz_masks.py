"""Fuzz target: engine.masks.SegDecoder.from_npz (the mask decoder .npz loader) on arbitrary
file bytes; a decoder that loads decodes one set of 16 codes. Only EngineError may escape."""
import atheris

with atheris.instrument_imports(include=["engine.masks"]):
    from engine.errors import EngineError
    from engine.masks import SegDecoder

import numpy as np

from fuzz.harness import main, scratch, write

PATH = scratch("decoder.npz")


def test_one_input(data: bytes) -> None:
    write(PATH, data)
    try:
        dec = SegDecoder.from_npz(PATH)
    except EngineError:
        return
    if dec.codebook.shape[1] * dec.conv_in[0].shape[0] > 4096:
        return      # a valid but big decoder: decoding it is slow and proves nothing more
    out = dec.decode(np.arange(16) % dec.num_codes)
    assert out.shape == (64, 64)


if __name__ == "__main__":
    main(test_one_input)
