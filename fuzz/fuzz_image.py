"""Fuzz target: the image decode path, engine.processor.load_image on arbitrary bytes, then
preprocess_image to a 14x14 model input. Only ImageError (an EngineError) may escape.

PIL's decompression-bomb limit is lowered to 4 Mpixels here, so that a header claiming a huge
image is refused fast instead of decoding for seconds (the check itself is what is tested)."""
import atheris

with atheris.instrument_imports(include=["engine.processor"]):
    from PIL import Image

    from engine.errors import EngineError
    from engine.processor import load_image, preprocess_image

from fuzz.harness import main

Image.MAX_IMAGE_PIXELS = 2_000_000     # the bomb error starts at twice this


def test_one_input(data: bytes) -> None:
    try:
        im = load_image(data)
        assert im.mode == "RGB", im.mode
        x = preprocess_image(im, 14)
        assert x.shape == (3, 14, 14)
    except EngineError:
        pass


if __name__ == "__main__":
    main(test_one_input)
