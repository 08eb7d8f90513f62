"""Fuzz target: engine.tokenizer.Tokenizer.decode of arbitrary id lists, with the bundled
default model's tokenizer.model. Ids range over negatives, every piece, the image token,
the padding rows past the vocabulary and huge values; only TokenizerError may escape."""
import atheris

with atheris.instrument_imports(include=["engine.tokenizer"]):
    from engine.errors import EngineError
    from engine.tokenizer import Tokenizer

import os

import numpy as np

from fuzz.harness import main

TOK = Tokenizer(os.path.join(os.path.dirname(__file__), "..", "engine", "default_model", "tokenizer.model"))
N = TOK.sp_vocab_size


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    as_array = fdp.ConsumeBool()
    ids = []
    while fdp.remaining_bytes() and len(ids) < 256:
        kind = fdp.ConsumeIntInRange(0, 15)
        if kind == 0:
            ids.append(fdp.ConsumeInt(8))               # anything, negative and huge included
        elif kind == 1:
            ids.append(fdp.ConsumeIntInRange(N - 2, N + 70))   # around the end of the vocabulary
        else:
            ids.append(fdp.ConsumeIntInRange(0, N - 1))
    try:
        if as_array:
            ids = np.asarray([min(max(i, -2**63), 2**63 - 1) for i in ids], dtype=np.int64)
        text = TOK.decode(ids)
        assert isinstance(text, str)
    except EngineError:
        pass


if __name__ == "__main__":
    main(test_one_input)
