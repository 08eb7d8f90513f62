"""Fuzz target: engine.artifact.load_manifest on a tiny ONNX artifact with manifest.json
replaced, and read_preprocessing (the artifact's preprocessor_config.json) on arbitrary JSON.

The first input byte: bit 0 picks the file (0 manifest.json, 1 preprocessor_config.json, read
directly: through load_manifest the size check would stop every change), bit 1
verify_checksums. Only EngineError may escape.
"""
import shutil

import atheris

with atheris.instrument_imports(include=["engine"]):
    from engine import artifact
    from engine.errors import EngineError

from fuzz.harness import main, scratch, tiny_artifact, write

ART = tiny_artifact()
WORK = scratch("w-art")
shutil.copytree(ART, WORK, ignore=shutil.ignore_patterns(".verified*"))
FILES = ("manifest.json", "preprocessor_config.json")
ORIGINAL = {name: (ART / name).read_bytes() for name in FILES}
CONFIG = artifact.load_manifest(ART, verify_checksums=False).config


def test_one_input(data: bytes) -> None:
    if not data:
        return
    name, verify = FILES[data[0] & 1], bool(data[0] & 2)
    target = WORK / name
    write(target, data[1:])
    try:
        if name == "manifest.json":
            artifact.load_manifest(WORK, verify_checksums=verify)
        else:
            artifact.read_preprocessing(target, CONFIG)
    except EngineError:
        pass
    finally:
        write(target, ORIGINAL[name])


if __name__ == "__main__":
    main(test_one_input)
