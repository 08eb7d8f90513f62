"""OpenVINO export and runtime: every graph vs the numpy twin, full logits vs the numpy reference
model, compressed weights kept compressed (in the saved IR and in the compiled model), the
export pipeline end to end, and bad inputs.

Oracles: graph_def.NumpyBuilder run on the reference-dequantized weights (export.quantize.
dequantize) and engine.reference.ReferenceModel (independent of graph_def) on the original fp32
weights; the attention between decoder graphs is engine.reference's numpy attention.

Measured on these tiny random models (tests/hf_tiny.py, f32 precision hint, int4 group 16):
full-sequence logits vs ReferenceModel on the original fp32 weights (PG1 / PG2), with the
artifact's embedding table (int8 per row for int8 / int4 / fp8):
    format  dynamic quantization off        runner defaults (dynamic quantization 32)
    fp32    max abs 1.2e-5 / 8.1e-6         same
    fp16    cosine 0.999999 / 0.999999      same
    bf16    cosine 0.99996 / 0.99998        same
    int8    cosine 0.99943 / 0.99961        0.99875 / 0.99939
    int4    cosine 0.98937 / 0.99199        0.98892 / 0.99120
    fp8     cosine 0.99036 / 0.99431        same
int4 is export/quantize.py's mixed precision (searched group scales; LM head, vision tower,
decoder layer 0 and v_proj at int8: 62% of these decoders' parameters are int4). With every
matrix int4 and round-to-nearest max / 7 scales it measured 0.933 / 0.949 here. These 3-layer
models, randomized at std 0.2 everywhere, amplify weight rounding: PG1 int4 at group 16 stays
just under 0.99 and is held to 0.988 (FORMAT_BOUND_PG1); every other format and model meets
FORMAT_BOUND. Groups 64 and 128 fall back to int8 on these models (K = 48, 80), so they are
measured on test_export_onnx's wide models (256-wide decoder, 2 / 3 layers, 49% / 63% int4),
dynamic quantization off / runner defaults:
    group 64   PG1 0.99868 / 0.99864    PG2 0.99165 / 0.99154
    group 128  PG1 0.99846 / 0.99843    PG2 0.99062 / 0.99055
Against the reference model on the dequantized weights every format is within 1e-4 (max abs).
"""
from types import SimpleNamespace

import numpy as np
import openvino as ov
import pytest

from engine.artifact import ArtifactError, load_manifest
from engine.checkpoint import Checkpoint
from engine.reference import ReferenceModel
from engine.runtime import open_runner
from engine.runtime.ov_backend import OvRunner, release_file_pages
from engine.synth import write_synthetic_checkpoint
import graph_oracle
from export import graph_def
from export.openvino_graphs import export_openvino_graphs, mark_decompression, pack_int4
from export.pipeline import linear_weight_formats
from export.quantize import dequantize, quantize

from hf_tiny import tiny_model

GROUP = 16          # tiny models: text K in {48, 64, 80} take int4; vision K in {40, 72, 588} fall back
FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """version -> (config, canonical fp32 weights) of a tiny random HF model (norms randomized)."""
    out = {}
    for version in (1, 2):
        d = tmp_path_factory.mktemp(f"hf{version}")
        tiny_model(version).save_pretrained(d)
        with Checkpoint.open(d) as ckpt:
            out[version] = ckpt.config, {k: np.array(v, np.float32) for k, v in ckpt.tensors.items()}
    return out


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """(version, format) -> (artifact dir, {graph: xml path}, quantization info), built on first use."""
    root = tmp_path_factory.mktemp("ov")
    cache = {}

    def get(version, fmt):
        if (version, fmt) not in cache:
            cfg, weights = tiny[version]
            art = root / f"pg{version}-{fmt}"
            files, info = export_openvino_graphs(cfg, weights, art / "openvino", fmt, GROUP, progress=False)
            cache[version, fmt] = art, files, info
        return cache[version, fmt]
    return get


def _graphs(**graphs):
    """What a runner reads of an artifact's Manifest: its graph files per backend."""
    return SimpleNamespace(graphs=graphs)


def _runner(art, files, **kwargs) -> OvRunner:
    return OvRunner(art, _graphs(openvino=files), threads=1, progress=False, **kwargs)


def _dequantized(weights, formats):
    out = {}
    for name, w in weights.items():
        if name in formats:
            w = dequantize(quantize(w.reshape(w.shape[0], -1), formats[name], GROUP)).reshape(w.shape)
        out[name] = w
    return out


def _graph_inputs(cfg, graph, rng, rows=5):
    t = cfg.text
    if graph == "vision":
        s = cfg.vision.image_size
        return {"pixel_values": rng.uniform(-1, 1, (2, 3, s, s)).astype(np.float32)}
    inputs = {"hidden": rng.standard_normal((rows, t.hidden_size)).astype(np.float32)}
    if graph.startswith("decoder_") and graph != "decoder_0":
        inputs["attn"] = rng.standard_normal((rows, t.num_attention_heads * t.head_dim)).astype(np.float32)
    return inputs


def _numpy_graph(cfg, weights, graph, inputs):
    b = graph_def.NumpyBuilder(weights, inputs)
    if graph == "vision":
        patch = weights["vision.embeddings.patch_embedding.weight"]
        graph_def.build_vision(b, cfg, patch.reshape(patch.shape[0], -1))
    elif graph == "lm_head":
        graph_def.build_lm_head(b, cfg)
    else:
        graph_def.build_decoder_boundary(b, cfg, int(graph.split("_")[1]))
    return b.outputs


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------- graphs vs numpy twin
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_graph_matches_numpy_builder(tiny, exported, version, fmt):
    """Each graph on the same inputs as NumpyBuilder on the dequantized weights: this checks the
    weight encoding (int4 nibbles, scale layouts, fp8 / bf16 bits) and every op, to 1e-4."""
    cfg, weights = tiny[version]
    art, files, info = exported(version, fmt)
    assert list(files) == ["vision", *graph_def.decoder_graph_names(cfg), "lm_head"]
    assert all(rel == f"openvino/{name}.xml" for name, rel in files.items())
    runner = _runner(art, files, dynamic_quantization=0)
    ref_weights = _dequantized(weights, info["formats"])
    rng = np.random.default_rng(0)
    for graph in runner.graph_names:
        for rows in (5, 1):
            inputs = _graph_inputs(cfg, graph, rng, rows)
            got = runner.run(graph, inputs)
            want = _numpy_graph(cfg, ref_weights, graph, inputs)
            assert set(got) == set(want)
            for name in want:
                assert got[name].shape == want[name].shape, (graph, name)
                diff = float(np.abs(got[name] - want[name]).max())
                assert diff <= 1e-4, (graph, name, diff)


def test_int4_mixed_precision_and_fallback_are_recorded(tiny, exported, tmp_path):
    cfg, weights = tiny[2]
    _, _, info = exported(2, "int4")
    assert info["formats"] == linear_weight_formats(cfg, "int4", GROUP)
    assert info["formats"]["text.layers.1.mlp.up_proj.weight"] == "int4"          # K = 48
    assert info["formats"]["text.layers.0.mlp.up_proj.weight"] == "int8"          # layer 0: by design
    assert info["formats"]["text.layers.2.self_attn.v_proj.weight"] == "int8"     # v_proj: by design
    assert info["fallbacks"] == {}                   # every text K (48, 64, 80) divides by 16
    assert info["groups"] == {"vision": "int8", "projector": "int8", "lm_head": "int8",
                              "text.layers.0": "int8", "text.v_proj": "int8", "text": "int4"}
    _, info = export_openvino_graphs(cfg, weights, tmp_path / "ov", "int4", 32, progress=False)
    # group 32: K 48 (q, k, gate, up) and 80 (down) fall back in layers 1-2; o_proj (K 64) stays int4
    assert sorted(info["fallbacks"]) == sorted(f"text.layers.{i}.{m}.weight" for i in (1, 2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert info["formats"]["text.layers.1.self_attn.o_proj.weight"] == "int4"     # K = 64


# ---------------------------------------------------------------------------- full logits
def compose_logits(runner, cfg, embed, ids, pixel_values, token_type_ids):
    """Full-sequence logits from the OpenVINO graphs with the numpy attention in between."""
    h = embed[ids] * np.float32(graph_def.embedding_scale(cfg, "fp32"))
    return graph_oracle.compose_logits(runner, cfg, h, ids, pixel_values, token_type_ids)


def _prompt(cfg, rng, n_suffix=4):
    n_img = cfg.num_image_tokens
    ids = np.array([cfg.image_token_index] * n_img + [2] + list(rng.integers(4, 300, 7)) + [5]
                   + list(rng.integers(4, 300, n_suffix)))   # longer than the PG2 window (6)
    tt = np.array([0] * (n_img + 9) + [1] * n_suffix)
    s = cfg.vision.image_size
    return ids, rng.uniform(-1, 1, (1, 3, s, s)).astype(np.float32), tt


def _artifact_embedding(table, fmt):
    """The embedding table an artifact of this format ships (export/pipeline.py): fp32, fp16
    (for fp16 / bf16), or int8 per row (for int8 / int4 / fp8)."""
    if fmt == "fp32":
        return table
    if fmt in ("fp16", "bf16"):
        return table.astype(np.float16).astype(np.float32)
    return dequantize(quantize(table, "int8"))


# Bounds vs the reference model on the ORIGINAL fp32 weights, dynamic quantization off: the
# format's own rounding (weights and the artifact's embedding table); measured values in the
# module docstring. Against the dequantized weights every format is held to 1e-4 max abs diff.
FORMAT_BOUND = {"fp32": ("maxabs", 1e-4), "fp16": ("cosine", 0.99999), "bf16": ("cosine", 0.9999),
                "int8": ("cosine", 0.999), "fp8": ("cosine", 0.99), "int4": ("cosine", 0.99)}
# int4 on the PG1 model at group 16 measures 0.98937 (module docstring): below 0.99
FORMAT_BOUND_PG1 = {"int4": ("cosine", 0.988)}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_logits_match_reference_model(tiny, exported, version, fmt):
    cfg, weights = tiny[version]
    art, files, info = exported(version, fmt)
    ids, pv, tt = _prompt(cfg, np.random.default_rng(version))
    original = ReferenceModel(cfg, weights).logits(ids, pv, tt)
    effective_weights = _dequantized(weights, info["formats"])
    effective = ReferenceModel(cfg, effective_weights).logits(ids, pv, tt)

    exact_runner = _runner(art, files, dynamic_quantization=0)
    exact = compose_logits(exact_runner, cfg, effective_weights["text.embed_tokens.weight"], ids, pv, tt)
    assert exact.shape == original.shape
    assert float(np.abs(exact - effective).max()) <= 1e-4

    embed = _artifact_embedding(weights["text.embed_tokens.weight"], fmt)
    got = compose_logits(exact_runner, cfg, embed, ids, pv, tt)
    default = compose_logits(_runner(art, files), cfg, embed, ids, pv, tt)   # dynamic quantization on
    diff, cos = float(np.abs(got - original).max()), _cosine(got, original)
    print(f"PG{version} {fmt}: vs original weights max abs diff {diff:.2e} cosine {cos:.6f}; "
          f"runner defaults: cosine {_cosine(default, original):.6f} (vs dynamic quantization off "
          f"{_cosine(default, got):.6f})")
    kind, bound = (FORMAT_BOUND_PG1 if version == 1 else {}).get(fmt, FORMAT_BOUND[fmt])
    assert (diff <= bound) if kind == "maxabs" else (cos >= bound), (diff, cos)
    # int8 activations for int8 / int4 weights (the CPU plugin's dynamic quantization) change
    # the logits by a cosine of ~1e-3 at most; every other format is unaffected
    assert _cosine(default, got) >= (0.998 if fmt in ("int8", "int4") else 0.999999)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """version -> (config, fp32 weights) of test_export_onnx's wide models (every decoder K a
    multiple of 128, so int4 with group 64 / 128 is really int4)."""
    from test_export_onnx import write_tiny_checkpoint
    out = {}
    for version in (1, 2):
        d = write_tiny_checkpoint(version, tmp_path_factory.mktemp(f"wide{version}") / "ckpt", wide=True)
        with Checkpoint.open(d) as ckpt:
            out[version] = ckpt.config, {k: np.array(v, np.float32) for k, v in ckpt.tensors.items()}
    return out


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("group", [64, 128])
def test_int4_group_sizes_on_a_wider_model(wide, tmp_path, version, group):
    """int4 with group 64 and 128 on the wide models, vs the reference model on the original fp32
    weights (module docstring: measured values)."""
    cfg, weights = wide[version]
    files, info = export_openvino_graphs(cfg, weights, tmp_path / "openvino", "int4", group, progress=False)
    assert info["fallbacks"] == {} and info["groups"]["text"] == "int4"
    ids, pv, tt = _prompt(cfg, np.random.default_rng(version))
    original = ReferenceModel(cfg, weights).logits(ids, pv, tt)
    effective_weights = {n: (dequantize(quantize(w.reshape(w.shape[0], -1), info["formats"][n], group)).reshape(w.shape)
                             if n in info["formats"] else w) for n, w in weights.items()}
    effective = ReferenceModel(cfg, effective_weights).logits(ids, pv, tt)
    embed = _artifact_embedding(weights["text.embed_tokens.weight"], "int4")
    exact = compose_logits(_runner(tmp_path, files, dynamic_quantization=0), cfg,
                           effective_weights["text.embed_tokens.weight"], ids, pv, tt)
    assert float(np.abs(exact - effective).max()) <= 1e-4
    got = compose_logits(_runner(tmp_path, files, dynamic_quantization=0), cfg, embed, ids, pv, tt)
    default = compose_logits(_runner(tmp_path, files), cfg, embed, ids, pv, tt)
    cos, cos_default = _cosine(got, original), _cosine(default, original)
    print(f"wide PG{version} int4 group {group}: cosine vs original {cos:.6f}, runner defaults {cos_default:.6f}")
    assert cos >= 0.99 and cos_default >= 0.99


# ---------------------------------------------------------------------------- compressed weights
def _linear_weight_constants(model: ov.Model) -> list[ov.Node]:
    """The Constant at the root of each MatMul's weight input (through Convert/Multiply/Reshape)."""
    roots = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or not op.get_attributes()["transpose_b"]:
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() in ("Reshape", "Multiply", "Convert"):
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant":
            roots.append(node)
    return roots


# graph -> {weight constant type: count} per format. int4 keeps decoder layer 0, every v_proj and
# the LM head at int8: decoder_1 = layer 0's o/gate/up/down (i8) + layer 1's q/k (i4) and v (i8);
# decoder_2 = layer 1's o/gate/up/down + layer 2's q/k (i4) and v (i8).
COMPRESSED = {
    "int8": {"decoder_1": {"i8": 7}, "lm_head": {"i8": 1}},
    "int4": {"decoder_1": {"i8": 5, "i4": 2}, "decoder_2": {"i4": 6, "i8": 1}, "lm_head": {"i8": 1}},
    "bf16": {"decoder_1": {"bf16": 7}, "lm_head": {"bf16": 1}},
    "fp16": {"decoder_1": {"f16": 7}, "lm_head": {"f16": 1}},
}


@pytest.mark.parametrize("fmt", list(COMPRESSED))
def test_compressed_weights_stay_compressed(exported, tiny, fmt):
    """The saved IR holds int8 / int4 / 16-bit constants (no f32 copy of any matrix), and the CPU
    plugin compiles int8 / int4 matrices into FullyConnected layers with i8 / i4 weights (in
    PG2's lm_head too, whose softcap multiply would otherwise defeat the pattern)."""
    cfg, _ = tiny[2]
    art, files, _ = exported(2, fmt)
    core = ov.Core()
    for graph, types in COMPRESSED[fmt].items():
        model = core.read_model(art / files[graph])
        roots = _linear_weight_constants(model)
        got: dict[str, int] = {}
        for r in roots:
            got[r.get_element_type().to_string()] = got.get(r.get_element_type().to_string(), 0) + 1
        assert got == types, (graph, got)
        biggest = max(int(np.prod(r.get_output_shape(0))) for r in roots)
        f32_sizes = [int(np.prod(op.get_output_shape(0))) for op in model.get_ordered_ops()
                     if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f32]
        assert max(f32_sizes) < biggest   # scales, norms: never a full matrix
        if fmt in ("bf16", "fp16"):
            converts = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convert"]
            assert converts and all(any(k.startswith("decompression") for k in op.get_rt_info().keys())
                                    for op in converts)
    if fmt in ("int8", "int4"):
        runner = _runner(art, files)
        for graph, types in COMPRESSED[fmt].items():
            runner.run(graph, _graph_inputs(cfg, graph, np.random.default_rng(0)))
            assert runner.runtime_weight_precisions(graph) == types, graph


def test_int4_packing_matches_openvino_layout():
    q = np.array([[-8, -1, 0, 1, 2, 3, 7, -5]], np.int8)
    assert pack_int4(q).tolist() == [0xF8, 0x10, 0x32, 0xB7]


def test_mark_decompression_only_marks_16bit_and_fp8(exported):
    art, files, _ = exported(1, "int8")
    assert mark_decompression(art / files["decoder_1"]) == 0          # i8 Converts stay unmarked
    model = ov.Core().read_model(art / files["decoder_1"])
    assert not any(k.startswith("decompression") for op in model.get_ordered_ops() for k in op.get_rt_info().keys())


def test_weight_pages_are_released_without_changing_results(exported, tiny):
    cfg, _ = tiny[1]
    art, files, _ = exported(1, "int8")
    runner = _runner(art, files)
    inputs = _graph_inputs(cfg, "lm_head", np.random.default_rng(1))
    first = runner.run("lm_head", inputs)["logits"]         # releases lm_head.bin's pages
    assert runner.run("lm_head", inputs)["logits"].tolist() == first.tolist()
    assert release_file_pages(art / "openvino" / "lm_head.bin") >= 0   # again: harmless
    assert release_file_pages(art / "no-such-file.bin") == 0


# ---------------------------------------------------------------------------- pipeline end to end
def test_export_pipeline_and_open_runner(tmp_path):
    from export.pipeline import export_checkpoint
    ckpt = write_synthetic_checkpoint("tiny-pg2", tmp_path / "ckpt", dtype="fp32", progress=False)
    art = export_checkpoint(ckpt, tmp_path / "art", formats=("openvino",), weights="int8", progress=False)
    manifest = load_manifest(art)
    assert set(manifest.graphs) == {"openvino"}
    assert manifest.weights["backends"]["openvino"]["patterns"]["int8"].startswith("Constant i8")
    runner = open_runner("openvino", art, manifest, threads=1)
    cfg = manifest.config
    out = runner.run("lm_head", {"hidden": np.ones((2, cfg.text.hidden_size), np.float32)})
    assert out["logits"].shape == (2, cfg.text.vocab_size) and np.isfinite(out["logits"]).all()


# ---------------------------------------------------------------------------- bad inputs
def test_runner_rejects_bad_calls(exported, tiny):
    cfg, _ = tiny[1]
    art, files, _ = exported(1, "fp32")
    runner = _runner(art, files)
    D = cfg.text.hidden_size
    with pytest.raises(ValueError, match="unknown graph 'decoder_99'"):
        runner.run("decoder_99", {"hidden": np.zeros((1, D), np.float32)})
    with pytest.raises(ValueError, match=r"takes inputs \['hidden', 'attn'\]"):
        runner.run("decoder_1", {"hidden": np.zeros((1, D), np.float32)})
    with pytest.raises(ValueError, match="takes inputs"):
        runner.run("decoder_0", {"hidden": np.zeros((1, D), np.float32), "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="failed on inputs"):
        runner.run("decoder_0", {"hidden": np.zeros((1, D + 1), np.float32)})
    assert runner.input_names("decoder_1") == ["hidden", "attn"]
    assert runner.output_names("decoder_1") == ["hidden_out", "q", "k", "v"]


def test_runner_rejects_bad_artifacts_and_options(exported, tmp_path):
    art, files, _ = exported(1, "fp32")
    with pytest.raises(ArtifactError, match="no OpenVINO graphs"):
        OvRunner(art, _graphs(onnx={"vision": "onnx/vision.onnx"}))
    with pytest.raises(ValueError, match="precision"):
        _runner(art, files, precision="fp64")
    with pytest.raises(ValueError, match="threads"):
        OvRunner(art, _graphs(openvino=files), threads=0)
    with pytest.raises(ValueError, match="dynamic_quantization"):
        _runner(art, files, dynamic_quantization=-1)
    bad = tmp_path / "bad"
    (bad / "openvino").mkdir(parents=True)
    (bad / "openvino" / "lm_head.xml").write_text("<net>not an IR")
    (bad / "openvino" / "lm_head.bin").write_bytes(b"")
    with pytest.raises(ArtifactError, match="re-export"):
        OvRunner(bad, _graphs(openvino={"lm_head": "openvino/lm_head.xml"}))
    with pytest.raises(ArtifactError, match="missing"):
        OvRunner(bad, _graphs(openvino={"vision": "openvino/vision.xml"}))


def test_export_rejects_bad_arguments(tiny, tmp_path):
    cfg, weights = tiny[1]
    with pytest.raises(ValueError, match="unknown weight format"):
        export_openvino_graphs(cfg, weights, tmp_path / "a", "int3", 128, progress=False)
    with pytest.raises(ValueError, match="group size"):
        export_openvino_graphs(cfg, weights, tmp_path / "b", "int4", 12, progress=False)
    broken = dict(weights)
    broken["text.layers.0.mlp.up_proj.weight"] = np.full_like(broken["text.layers.0.mlp.up_proj.weight"], np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        export_openvino_graphs(cfg, broken, tmp_path / "c", "int8", 128, progress=False)
