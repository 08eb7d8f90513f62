"""Fuzz target: engine.safetensors.SafetensorsFile on arbitrary file bytes.

Opens the bytes as a file, then reads every tensor it claims to hold and sums it (so every
view is really touched). Only EngineError may escape.
"""
import atheris

with atheris.instrument_imports(include=["engine.safetensors"]):
    from engine.errors import EngineError
    from engine.safetensors import SafetensorsFile

from fuzz.harness import main, scratch, write

PATH = scratch("fuzz.safetensors")


def test_one_input(data: bytes) -> None:
    write(PATH, data)
    try:
        with SafetensorsFile(PATH) as f:
            for name in f.keys():
                a = f.get(name)
                if a.size:
                    a.reshape(-1)[[0, -1]].astype("float64").sum()
    except EngineError:
        pass


if __name__ == "__main__":
    main(test_one_input)
