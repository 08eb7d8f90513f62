"""HF PaliGemma checkpoint directory -> config + memory-mapped, validated tensors.

    with Checkpoint.open("paligemma2-3b-pt-224") as ckpt:
        ckpt.config                     # engine.config.PaliGemmaConfig
        ckpt.dtype                      # "fp32" / "fp16" / "bf16": dtype of the linear weights
        w = ckpt.tensors["text.layers.0.mlp.up_proj.weight"]   # read-only np.ndarray view

A directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and usually `tokenizer.model` and `preprocessor_config.json`.

What `open` checks, so that a bad checkpoint fails here with a message naming the file and the
tensor, never later as a crash or a silently wrong model:
  - the index: every listed shard exists, every tensor sits in the shard the index names, no
    tensor appears in two shards, no shard tensor is missing from the index;
  - every HF key maps to a canonical name (engine.layout.to_canonical; transformers 4.x keys,
    5.x in-memory keys and 5.x save_pretrained keys are all accepted) and no two keys map to
    the same name;
  - tensor dtypes are F32, F16 or BF16, and the linear weights all share one dtype;
  - the set of tensors and their shapes equal engine.layout.expected_tensors(config).
Skipped on purpose: the SigLIP pooling head (engine.layout.IGNORED_PREFIXES), and a tied
`lm_head.weight` (transformers 4.x files may carry a copy of the embedding).

Tensors are zero-copy views onto read-only memory maps: opening a 20 GB checkpoint reads only
the headers, and pages come in from disk as the tensors are used.
"""
from __future__ import annotations

import json
import os
import types
from collections.abc import Mapping

import numpy as np

from . import layout
from .config import PaliGemmaConfig
from .errors import CheckpointError, ConfigError
from .safetensors import SafetensorsFile, TensorNotFoundError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
PREPROCESSOR_FILE = "preprocessor_config.json"

# Safetensors dtype -> engine dtype name. Other dtypes (ints, fp8) are not PaliGemma weights.
_WEIGHT_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
# Suffixes of the matrix weights whose dtype is "the checkpoint dtype".
_LINEAR_SUFFIXES = ("_proj.weight", ".fc1.weight", ".fc2.weight")


def _is_linear(name: str) -> bool:
    return name == "projector.weight" or name.endswith(_LINEAR_SUFFIXES)


def _list(names, limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


class Checkpoint:
    """An opened, validated HF PaliGemma checkpoint. Use `Checkpoint.open(path)`."""

    def __init__(self, path: str, config: PaliGemmaConfig, files: list[SafetensorsFile],
                 sources: dict[str, tuple[SafetensorsFile, str]], tokenizer_path: str | None,
                 preprocessor_config: dict | None):
        self.path = path
        self.config = config
        self.tokenizer_path = tokenizer_path
        self.preprocessor_config = preprocessor_config
        self._files = files
        self._sources = sources                       # canonical name -> (file, HF key)
        self.names = list(sources)                    # expected_tensors order
        self._views = {name: f.get(key) for name, (f, key) in sources.items()}
        self.tensors: Mapping[str, np.ndarray] = types.MappingProxyType(self._views)
        linear = {self._sources[n][0].info(self._sources[n][1]).dtype for n in self.names if _is_linear(n)}
        self.dtype = _WEIGHT_DTYPES[linear.pop()] if linear else "fp32"

    # ------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Open and validate the HF checkpoint directory `path` (see the module docstring)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            hint = " (pass the directory holding it, with config.json)" if os.path.isfile(path) else ""
            raise CheckpointError(f"{path}: not a checkpoint directory{hint}")
        config = PaliGemmaConfig.from_file(os.path.join(path, "config.json"))
        files = _open_weight_files(path)
        try:
            sources = _check_against_config(path, files, _map_tensors(files, config), config)
            tok = os.path.join(path, TOKENIZER_FILE)
            return cls(path, config, files, sources,
                       tokenizer_path=tok if os.path.isfile(tok) else None,
                       preprocessor_config=_read_preprocessor_config(path))
        except BaseException:
            for f in files:
                f.close()
            raise

    # ------------------------------------------------------------------------- access
    def get(self, name: str) -> np.ndarray:
        """Read-only view of canonical tensor `name` (see engine.layout for the names)."""
        try:
            return self._views[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r}; canonical names look like "
                                      "'text.layers.0.mlp.up_proj.weight' (see engine.layout)") from None

    def source(self, name: str) -> tuple[str, str]:
        """(file path, HF key) a canonical tensor was read from: useful in error messages."""
        self.get(name)
        f, key = self._sources[name]
        return f.path, key

    def close(self) -> None:
        """Release the memory maps. Arrays already handed out stay valid until dropped."""
        self._views.clear()
        for f in self._files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpoint({self.path!r}, PaliGemma {self.config.version}, {self.dtype}, "
                f"{len(self.names)} tensors)")


# ----------------------------------------------------------------------------- helpers
def _load_json(path: str, what: str):
    """JSON file -> object, rejecting duplicate keys (a silent overwrite would hide a bug)."""
    def no_dups(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise CheckpointError(f"{path}: key {k!r} appears twice; the file is corrupt")
            d[k] = v
        return d
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=no_dups)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:   # Recursion: absurd nesting
        raise CheckpointError(f"{path}: cannot read the {what} ({type(e).__name__}: {e}); restore "
                              f"{os.path.basename(path)} from the checkpoint's repository") from None


def _open_weight_files(path: str) -> list[SafetensorsFile]:
    """Open model.safetensors, or the shards the index lists and check the index against them."""
    single = os.path.join(path, SINGLE_FILE)
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):   # transformers prefers the single file too
        return [SafetensorsFile(single)]
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found; download the "
                              "safetensors weights of the checkpoint (.bin files are not supported)")

    index = _load_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    files: list[SafetensorsFile] = []
    try:
        shards: dict[str, SafetensorsFile] = {}
        for key, shard in weight_map.items():
            if shard in shards:
                continue
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index_path}: tensor {key!r} names shard {shard!r}, which is not "
                                      "a plain file name in the checkpoint directory")
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index_path}: tensor {key!r} lives in {shard!r}, but {shard_path} "
                                      "does not exist; the download is incomplete")
            shards[shard] = SafetensorsFile(shard_path)
            files.append(shards[shard])

        found_in: dict[str, list[str]] = {}   # HF key -> shards holding it
        for shard, f in shards.items():
            for key in f.keys():
                found_in.setdefault(key, []).append(shard)
        for key, where in found_in.items():
            if len(where) > 1:
                raise CheckpointError(f"{path}: tensor {key!r} appears in several shards ({_list(where)}); "
                                      "each tensor must be stored once")
            shard_path = shards[where[0]].path
            if key not in weight_map:
                raise CheckpointError(f"{shard_path}: tensor {key!r} is not listed in {index_path}; "
                                      "the index and the shards disagree")
            if weight_map[key] != where[0]:
                raise CheckpointError(f"{index_path}: tensor {key!r} is listed in "
                                      f"{weight_map[key]!r} but found in {shard_path}")
        for key, shard in weight_map.items():
            if key not in found_in:
                raise CheckpointError(f"{index_path}: tensor {key!r} is listed in {shard!r}, but "
                                      f"{os.path.join(path, shard)} does not hold it")
        return files
    except BaseException:
        for f in files:
            f.close()
        raise


def _map_tensors(files: list[SafetensorsFile], config: PaliGemmaConfig) -> dict[str, tuple[SafetensorsFile, str]]:
    """HF keys -> canonical names. Rejects unknown keys, duplicate names and non-float dtypes."""
    found: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        for key in f.keys():
            name = layout.to_canonical(key)
            if name is None:
                raise CheckpointError(f"{f.path}: unexpected tensor {key!r}, which matches no known "
                                      "PaliGemma key layout (transformers 4.x or 5.x); is this a "
                                      "PaliGemma checkpoint?")
            if name.startswith(layout.IGNORED_PREFIXES):
                continue
            if name == "lm_head.weight" and config.text.tie_word_embeddings:
                continue   # tied to the embedding; 4.x files may carry a copy
            if name in found:
                other_file, other_key = found[name]
                raise CheckpointError(f"{f.path}: tensor {key!r} and {other_key!r} (in {other_file.path}) "
                                      f"both map to {name!r}; the checkpoint mixes key layouts, "
                                      "keep only one of them")
            dtype = f.info(key).dtype
            if dtype not in _WEIGHT_DTYPES:
                raise CheckpointError(f"{f.path}: tensor {key!r} has dtype {dtype}; PaliGemma weights "
                                      "must be F32, F16 or BF16 (quantized checkpoints go through export)")
            found[name] = (f, key)
    return found


def _check_against_config(path: str, files: list[SafetensorsFile],
                          found: dict[str, tuple[SafetensorsFile, str]], config: PaliGemmaConfig
                          ) -> dict[str, tuple[SafetensorsFile, str]]:
    """Same names and shapes as expected_tensors(config); one dtype for the linear weights.
    Returns `found` in the expected order."""
    expected = layout.expected_tensors(config)
    where = files[0].path if len(files) == 1 else f"{path} ({len(files)} shards)"
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        f, key = found[unexpected[0]]
        raise CheckpointError(f"{f.path}: unexpected tensor {key!r} (canonical {unexpected[0]!r}) is not "
                              f"part of the model config.json describes; {len(unexpected)} unexpected "
                              f"in all: {_list(found[n][1] for n in unexpected)}. Does config.json "
                              "match the weights?")
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r} (HF key "
                              f"{layout.to_hf(missing[0], '4.x')!r} or {layout.to_hf(missing[0], '5.x')!r}, "
                              f"shape {expected[missing[0]]}); {len(missing)} missing in all: "
                              f"{_list(missing)}. The checkpoint is incomplete or config.json does not "
                              "match it")
    for name, shape in expected.items():
        f, key = found[name]
        got = f.info(key).shape
        if got != shape:
            raise CheckpointError(f"{f.path}: tensor {key!r} has shape {got}, but config.json implies "
                                  f"{shape} for {name!r}; config.json does not match the weights: use the "
                                  "config.json that came with them")
    linear = {}
    for name in expected:
        if _is_linear(name):
            f, key = found[name]
            linear.setdefault(f.info(key).dtype, (f.path, key))
    if len(linear) > 1:
        detail = "; ".join(f"{key!r} in {p} is {dt}" for dt, (p, key) in linear.items())
        raise CheckpointError(f"{path}: linear weights mix dtypes ({detail}); convert the checkpoint "
                              "to a single dtype")
    return {name: found[name] for name in expected}


def _read_preprocessor_config(path: str) -> dict | None:
    p = os.path.join(path, PREPROCESSOR_FILE)
    if not os.path.isfile(p):
        return None
    try:
        d = _load_json(p, "preprocessor config")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: must hold a JSON object")
    return d
