"""Fuzz target: engine.checkpoint.Checkpoint.open on a tiny checkpoint with one file replaced.

The first input byte picks the file, the rest is its content:
  0  config.json
  1  model.safetensors: the rest is the JSON header; the real data area follows it
  2  model.safetensors.index.json of a sharded copy (the shards stay real)
  3  preprocessor_config.json
Only EngineError may escape.
"""
import shutil

import atheris

with atheris.instrument_imports(include=["engine"]):
    from engine.checkpoint import Checkpoint
    from engine.errors import EngineError

from fuzz.harness import main, scratch, tiny_checkpoint, write

SINGLE, SHARDED = tiny_checkpoint(), tiny_checkpoint(sharded=True)
WORK = {0: scratch("w-single"), 1: scratch("w-single"), 2: scratch("w-sharded"), 3: scratch("w-single")}
shutil.copytree(SINGLE, WORK[0])
shutil.copytree(SHARDED, WORK[2])
FILE = {0: "config.json", 1: "model.safetensors", 2: "model.safetensors.index.json", 3: "preprocessor_config.json"}
ORIGINAL = {m: ((SHARDED if m == 2 else SINGLE) / name).read_bytes() for m, name in FILE.items()}
_raw = ORIGINAL[1]
DATA_AREA = _raw[8 + int.from_bytes(_raw[:8], "little"):]     # the real tensor bytes


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    d = WORK[mode]
    if mode == 1:
        body = len(body).to_bytes(8, "little") + body + DATA_AREA
    target = d / FILE[mode]
    write(target, body)
    try:
        with Checkpoint.open(d) as ckpt:
            for name in ckpt.names[:3]:
                ckpt.get(name).sum()
    except EngineError:
        pass
    finally:
        write(target, ORIGINAL[mode])


if __name__ == "__main__":
    main(test_one_input)
