"""engine.batch on a local Ray with 2 CPUs and the default model: every output row equals a
serial engine.load() run (both output formats), a worker that dies mid-job costs no row, an
interrupted job resumes without duplicates, bad rows are recorded and leave the others alone.

One Ray instance serves the module (starting Ray costs ~15 s on the 2-core CI machine)."""
import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="engine.batch needs Ray Data: pip install -e '.[batch]'")
pytest.importorskip("ray.data", reason="engine.batch needs Ray Data: pip install -e '.[batch]'")
pa = pytest.importorskip("pyarrow")

from engine.batch import JobSpec, TaskSpec, run_job  # noqa: E402
from engine.batch.sink import read_rows  # noqa: E402

N_SCENES = 200
DETECT_LABELS = "red circle"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process by another test module")
    # workers import engine from this checkout, installed or not
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    from engine import scenes
    d = tmp_path_factory.mktemp("scenes")
    for i in range(N_SCENES):
        scenes.make_scene(1000 + i).image.save(d / f"scene{i:03d}.png")
    return d


@pytest.fixture(scope="module")
def serial(scenes_dir):
    """The oracle: one engine.load() model, one image at a time. id -> caption / detections."""
    import engine
    model = engine.load()
    out = {}
    for p in sorted(scenes_dir.glob("*.png")):
        dets = model.detect(str(p), DETECT_LABELS)
        out[p.name] = {"caption": model.caption(str(p)).text,
                       "labels": [d.label for d in dets], "boxes": [list(d.box) for d in dets]}
    model.close()
    return out


def _job(task: TaskSpec, inp, out, **kw) -> "object":
    kw.setdefault("workers", 2)
    kw.setdefault("threads_per_worker", 1)
    return run_job(JobSpec(task, str(inp), str(out), progress=False, **kw))


def _by_id(path) -> dict:
    rows = read_rows(Path(path)).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids in the output"
    return {r["id"]: r for r in rows}


def _assert_caption_rows(rows: dict, serial: dict, ids=None):
    ids = sorted(serial) if ids is None else ids
    assert sorted(rows) == sorted(ids)
    for i in ids:
        r = rows[i]
        assert r["error"] is None, (i, r["error"])
        assert (r["task"], r["prompt"], r["width"], r["height"]) == ("caption", "caption en", 224, 224)
        assert r["text"] == serial[i]["caption"], i


def _assert_detect_rows(rows: dict, serial: dict, ids=None):
    ids = sorted(serial) if ids is None else ids
    assert sorted(rows) == sorted(ids)
    for i in ids:
        r = rows[i]
        assert r["error"] is None and r["prompt"] == "detect red circle"
        assert (r["labels"], r["boxes"]) == (serial[i]["labels"], serial[i]["boxes"]), i   # pixels, exact floats
        assert r["masks"] is None
    assert sum(len(serial[i]["boxes"]) for i in ids) > 3      # the comparison covers real boxes


# Both tasks in both formats: caption / parquet and detect / jsonl over all 200 scenes here; caption /
# jsonl in the resume test and detect / parquet in the dying-worker test, on fewer rows (CI time).
@pytest.mark.parametrize("task,fmt", [("caption", "parquet"), ("detect", "jsonl")])
def test_200_scenes_equal_serial_runs(local_ray, scenes_dir, serial, tmp_path, task, fmt):
    spec = TaskSpec("caption") if task == "caption" else TaskSpec("detect", labels=DETECT_LABELS)
    out = tmp_path / f"{task}.{fmt}"
    s = _job(spec, scenes_dir, out)
    assert (s.rows, s.errors, s.skipped, s.total) == (N_SCENES, 0, 0, N_SCENES)
    assert sum(s.rows_per_worker.values()) == N_SCENES
    rows = _by_id(out)
    (_assert_caption_rows if task == "caption" else _assert_detect_rows)(rows, serial)
    if fmt == "jsonl":              # one JSON object per line, readable without pyarrow
        lines = out.read_text().splitlines()
        assert len(lines) == N_SCENES and all(json.loads(line)["id"] for line in lines)


def test_worker_dying_mid_job_loses_no_row(local_ray, scenes_dir, serial, tmp_path):
    marker = tmp_path / "died"
    ids = sorted(serial)[:40]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"path": str(scenes_dir / i), "id": i}) + "\n" for i in ids))
    s = _job(TaskSpec("detect", labels=DETECT_LABELS), inp, tmp_path / "out.parquet", id_column="id",
             batch_size=8, fault_marker=str(marker))
    assert marker.exists(), "the injected fault did not fire"
    assert (s.rows, s.errors, s.total) == (40, 0, 40)
    _assert_detect_rows(_by_id(tmp_path / "out.parquet"), serial, ids)


def test_interrupted_job_resumes_without_duplicates(local_ray, scenes_dir, serial, tmp_path):
    ids = sorted(serial)[:48]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"path": str(scenes_dir / i)}) + "\n" for i in ids))
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _job(TaskSpec("caption"), inp, out, batch_size=8, interrupt_after_rows=16)
    parts_dir = tmp_path / "out.jsonl.parts"
    assert not out.exists() and parts_dir.is_dir()
    saved = {r["id"] for p in sorted(parts_dir.glob("part-*")) for r in read_rows(p).to_pylist()}
    assert 16 <= len(saved) < 48
    (parts_dir / ".part-000099.jsonl.123.tmp").write_text('{"id": "torn')     # a write cut by a kill

    s = _job(TaskSpec("caption"), inp, out, batch_size=8)
    assert (s.skipped, s.rows, s.total) == (len(saved), 48 - len(saved), 48)
    rows = _by_id(out)
    # the ids of the input table are the paths as given
    _assert_caption_rows({Path(k).name: v for k, v in rows.items()}, serial, ids)
    assert not parts_dir.exists()

    s = _job(TaskSpec("caption"), inp, out)       # all done: nothing runs, nothing changes
    assert (s.skipped, s.rows, s.total) == (48, 0, 48)
    assert len(out.read_text().splitlines()) == 48


def test_bad_rows_are_recorded_and_the_others_unaffected(local_ray, scenes_dir, serial, tmp_path):
    good = sorted(serial)[:6]
    png = (scenes_dir / good[0]).read_bytes()
    cells = [(scenes_dir / i).read_bytes() for i in good]
    cells[1:1] = [b"not an image", png[: len(png) // 2]]         # garbage, and a truncated PNG
    ids = [good[0], "garbage", "truncated"] + good[1:]
    pa_table = pa.table({"name": ids, "image": cells})
    import pyarrow.parquet as pq
    pq.write_table(pa_table, tmp_path / "in.parquet")
    s = _job(TaskSpec("caption"), tmp_path / "in.parquet", tmp_path / "out.parquet", bytes_column="image",
             id_column="name", batch_size=4)
    assert (s.rows, s.errors, s.total) == (8, 2, 8)
    rows = _by_id(tmp_path / "out.parquet")
    for bad in ("garbage", "truncated"):
        assert rows[bad]["error"].startswith("ImageError:") and rows[bad]["text"] is None
    _assert_caption_rows({k: v for k, v in rows.items() if k in good}, serial, good)

    # a prompt overflowing the context fails each row with the reason, and the job completes
    s = _job(TaskSpec("caption", max_new_tokens=100_000), tmp_path / "in.parquet", tmp_path / "o.jsonl",
             bytes_column="image", id_column="name")
    assert (s.rows, s.errors) == (8, 8)
    assert all("exceeds the model's context" in r["error"] or r["error"].startswith("ImageError")
               for r in _by_id(tmp_path / "o.jsonl").values())


def test_segment_masks_are_coco_rle_of_serial_masks(local_ray, scenes_dir, tmp_path):
    import engine
    from engine import rle
    names = sorted(p.name for p in scenes_dir.glob("*.png"))[:6]
    model = engine.load()
    want = {n: model.segment(str(scenes_dir / n), DETECT_LABELS) for n in names}
    model.close()
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"path": str(scenes_dir / n), "n": n}) + "\n" for n in names))
    s = _job(TaskSpec("segment", labels=DETECT_LABELS), inp, tmp_path / "out.parquet", id_column="n")
    assert s.errors == 0
    rows = _by_id(tmp_path / "out.parquet")
    assert sum(len(v) for v in want.values()) > 0
    for n, segs in want.items():
        r = rows[n]
        assert r["boxes"] == [list(g.box) for g in segs]
        assert len(r["masks"]) == len(segs)
        for m, g in zip(r["masks"], segs):
            assert (rle.decode(m) == g.mask).all()
