"""Fuzz target: engine.tasks.parse_detections and parse_segments on arbitrary model output.

The first byte picks the text form: raw UTF-8 (odd) or a sequence of answer pieces (even:
each byte picks <locNNNN>, <segNNN>, " ; ", a label word, a newline, ... so that well-formed
and almost-well-formed instances are common). Image sizes come from the input too; segments
are decoded with a miniature mask decoder. The parsers must never raise on any text.
"""
import atheris

with atheris.instrument_imports(include=["engine.tasks", "engine.masks"]):
    from engine.masks import SegDecoder
    from engine.tasks import parse_detections, parse_segments

from fuzz.harness import main, tiny_decoder_arrays

DECODER = SegDecoder(tiny_decoder_arrays(), source="tiny decoder")
WORDS = ("cat", "blue square", " ", "  ", "\n", ";", " ; ", "<", ">", "<eos>", "<unk>", "loc", "seg",
         "<loc", "<seg", "0", "1023", "9", "\t", "é", "\u2028")


def piece(fdp: atheris.FuzzedDataProvider) -> str:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 3:
        return f"<loc{fdp.ConsumeIntInRange(0, 1100):04d}>"
    if kind <= 6:
        return f"<seg{fdp.ConsumeIntInRange(0, 140):03d}>"
    return WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    width, height = fdp.ConsumeIntInRange(1, 300), fdp.ConsumeIntInRange(1, 300)
    if mode & 1:
        text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    else:
        parts = []
        while fdp.remaining_bytes() and len(parts) < 400:
            parts.append(piece(fdp))
        text = "".join(parts)
    for d in parse_detections(text, width, height):
        assert 0 <= d.box[0] <= d.box[2] <= width and 0 <= d.box[1] <= d.box[3] <= height, d
    for s in parse_segments(text, width, height, DECODER if mode & 2 else None):
        assert s.mask is None or s.mask.shape == (height, width)


if __name__ == "__main__":
    main(test_one_input)
