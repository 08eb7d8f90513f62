"""Smoke test of the declared dependency floors (run by tests/compat/run_floor_versions.sh in a
venv holding exactly the floor versions of onnxruntime, openvino, onnx and numpy; it also
passes with the current versions).

What it checks, with whatever versions are installed:
  1. export with the installed onnx / openvino: tiny-pg1 and tiny-pg2 synthetic checkpoints
     (fp32), and the bundled default model (int8 and int4: MatMulIntegerToFloat, MatMulNBits
     with bits 4 and 8 at accuracy_level 4, OpenVINO i8 / i4 weights), both formats;
  2. the exported ONNX graphs carry the pinned IR version and opset (export/onnx_graphs.py);
  3. every artifact loads on both backends and its greedy tokens equal the numpy reference
     (engine/reference.py) on the same processor inputs: exactly, for fp32 and for the
     default model's int8 / int4 on text prompts (a trained model: its quantized captions and
     answers keep the reference's tokens; detection boxes move by a few loc bins, so they are
     not compared).

    python tests/compat/floor_smoke.py WORKDIR                      # export + check
    python tests/compat/floor_smoke.py WORKDIR --load-also OTHERDIR  # + OTHERDIR's artifacts
Exit status 0 when everything holds; every failure is printed before exiting 1.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import engine  # noqa: E402
from engine.processor import Processor  # noqa: E402
from engine.reference import ReferenceModel  # noqa: E402
from engine.synth import write_synthetic_checkpoint  # noqa: E402
from export import onnx_graphs  # noqa: E402
from export.pipeline import export_checkpoint  # noqa: E402

BACKENDS = ("onnxruntime", "openvino")
IMAGE = REPO / "engine" / "default_model" / "example.png"
TINY_PROMPTS = ("caption en", "answer en what is this")
DEFAULT_PROMPTS = ("caption en", "answer en how many shapes are there")   # text: wide margins


def versions() -> dict[str, str]:
    import ml_dtypes
    import onnx
    import onnxruntime
    import openvino
    return {"numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.get_version(), "ml_dtypes": ml_dtypes.__version__,
            "python": sys.version.split()[0]}


def reference_tokens(ckpt: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens of the numpy reference model on the engine processor's inputs."""
    proc = Processor.from_pretrained(ckpt)
    x = proc(IMAGE, prompt)
    ref = ReferenceModel.from_pretrained(ckpt)
    return [int(t) for t in ref.generate(x["input_ids"], x["pixel_values"], max_new_tokens,
                                         token_type_ids=x["token_type_ids"], eos_token_id=ref.config.eos_token_id)]


def check_graph_versions(art: Path, failures: list[str]) -> None:
    import onnx
    for path in sorted((art / "onnx").glob("*.onnx")):
        m = onnx.load(str(path), load_external_data=False)
        opset = {o.domain: o.version for o in m.opset_import}.get("", None)
        if m.ir_version != onnx_graphs.IR_VERSION or opset != onnx_graphs.OPSET:
            failures.append(f"{path}: IR {m.ir_version} opset {opset}, expected IR {onnx_graphs.IR_VERSION} "
                            f"opset {onnx_graphs.OPSET}")


def cases(work: Path) -> list[tuple[str, Path, str, tuple[str, ...], int]]:
    """(label, checkpoint, weights, prompts, max_new_tokens) of every artifact checked."""
    out = []
    for version in (1, 2):
        ckpt = work / f"tiny-pg{version}"
        if not (ckpt / "config.json").is_file():
            write_synthetic_checkpoint(f"tiny-pg{version}", ckpt, seed=version, dtype="fp32", progress=False)
        out.append((f"tiny-pg{version}", ckpt, "fp32", TINY_PROMPTS, 8))
    default = engine.default_model_path()
    return out + [("default", default, w, DEFAULT_PROMPTS, 24) for w in ("int8", "int4")]


def check_artifact(art: Path, label: str, ckpt: Path, prompts, n: int, refs: dict, failures: list[str]) -> None:
    """Load `art` on both backends; greedy tokens must equal the reference's."""
    check_graph_versions(art, failures)
    for backend in BACKENDS:
        try:
            model = engine.load(art, backend=backend, threads=2, progress=False)
            for prompt in prompts:
                key = (str(ckpt), prompt, n)
                if key not in refs:
                    refs[key] = reference_tokens(ckpt, prompt, n)
                got = list(model.generate(IMAGE, prompt, max_new_tokens=n).tokens)
                ok = got == refs[key]
                line = f"{art.name} {backend} {prompt!r}: {got}" + ("" if ok else f" != reference {refs[key]}")
                print(("ok   " if ok else "FAIL ") + line, flush=True)
                if not ok:
                    failures.append(line)
            model.close()
        except Exception as e:
            failures.append(f"{art.name} {backend}: {type(e).__name__}: {e}")
            print(f"FAIL {art.name} {backend}: {type(e).__name__}: {e}", flush=True)


def main(argv: list[str]) -> int:
    """floor_smoke.py WORKDIR [--load-also DIR]: export every case into WORKDIR with the installed
    versions and check it; --load-also DIR also checks the artifacts another environment (the
    current versions) exported into DIR, so an exporter that stamps a too-new IR fails here."""
    if not argv or argv[0].startswith("-") or (len(argv) > 1 and (argv[1] != "--load-also" or len(argv) != 3)):
        print(__doc__, file=sys.stderr)
        return 2
    work = Path(argv[0])
    also = Path(argv[2]) if len(argv) == 3 else None
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PALIGEMMA_EDGE_CACHE"] = str(work / "cache")
    print("versions:", " ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
    failures: list[str] = []
    refs: dict = {}
    for label, ckpt, weights, prompts, n in cases(work):
        t0 = time.perf_counter()
        art = work / f"{label}-{weights}"
        try:
            export_checkpoint(ckpt, art, formats=("onnx", "openvino"), weights=weights, force=True, progress=False)
        except Exception as e:
            failures.append(f"{label} {weights}: export failed: {type(e).__name__}: {e}")
            print(f"FAIL {label} {weights}: export failed: {type(e).__name__}: {e}", flush=True)
            continue
        check_artifact(art, label, ckpt, prompts, n, refs, failures)
        if also is not None:
            other = also / art.name
            if not (other / "manifest.json").is_file():
                failures.append(f"{other}: missing (run floor_smoke.py {also} with the current versions first)")
            else:
                check_artifact(other, label, ckpt, prompts, n, refs, failures)
        print(f"     {label} {weights}: {time.perf_counter() - t0:.1f} s", flush=True)
    if failures:
        print(f"\n{len(failures)} failure(s):", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print("floor smoke: all artifacts exported, loaded and matched the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
