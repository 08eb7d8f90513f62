"""engine.batch pieces that need no Ray: COCO RLE, input listing, output parts / merge / resume
state, the command line's user errors. (Ray jobs: tests/test_batch.py.)"""
import json

import numpy as np
import pytest

from engine import rle

pa = pytest.importorskip("pyarrow", reason="engine.batch needs pyarrow (pip install -e '.[batch]')")
pq = pytest.importorskip("pyarrow.parquet")

from engine.batch.rows import OUTPUT_SCHEMA  # noqa: E402
from engine.batch.sink import OutputStore  # noqa: E402
from engine.batch.sources import read_inputs  # noqa: E402
from engine.batch.spec import BatchError, JobSpec, TaskSpec  # noqa: E402


# --------------------------------------------------------------------------- RLE
def test_rle_hand_computed():
    m = np.array([[0, 1], [0, 1]], dtype=bool)          # column-major: 0 0 1 1
    assert rle.encode(m) == {"size": [2, 2], "counts": [2, 2]}
    m = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)    # column-major: 1 1 0 1 0 0
    assert rle.encode(m) == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}
    assert rle.encode(np.zeros((3, 4), bool)) == {"size": [3, 4], "counts": [12]}
    assert rle.encode(np.ones((2, 2), bool)) == {"size": [2, 2], "counts": [0, 4]}


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 33), (224, 224)]:
        m = rng.random(shape) < 0.3
        enc = rle.encode(m)
        assert sum(enc["counts"]) == m.size
        np.testing.assert_array_equal(rle.decode(enc), m)


def test_rle_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="sum to"):
        rle.decode({"size": [2, 2], "counts": [1, 1]})


# --------------------------------------------------------------------------- sources
def _png(path, colour=(200, 30, 30)):
    from PIL import Image
    Image.new("RGB", (8, 6), colour).save(path)


def _spec(inp, out="out.parquet", **kw):
    return JobSpec(TaskSpec("caption"), str(inp), str(out), **kw)


def test_sources_dir_glob_tables(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _png(d / "b.png")
    _png(d / "sub" / "a.jpg")
    (d / "notes.txt").write_text("not an image")
    t = read_inputs(_spec(d))
    assert t.column("id").to_pylist() == ["b.png", "sub/a.jpg"]
    assert t.column("path").to_pylist() == [str((d / "b.png").resolve()), str((d / "sub" / "a.jpg").resolve())]
    assert t.column("index").to_pylist() == [0, 1]

    t = read_inputs(_spec(str(d / "**" / "*.jpg")))
    assert t.column("path").to_pylist() == [str((d / "sub" / "a.jpg").resolve())]

    rows = [{"path": "imgs/b.png", "key": "x"}, {"path": "imgs/sub/a.jpg", "key": "y"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = read_inputs(_spec(tmp_path / "t.jsonl", id_column="key"))
    assert t.column("id").to_pylist() == ["x", "y"]
    assert t.column("path").to_pylist()[0] == str((d / "b.png").resolve())    # relative to the table

    data = (d / "b.png").read_bytes()
    pq.write_table(pa.table({"img": [data, b"junk"]}), tmp_path / "t.parquet")
    t = read_inputs(_spec(tmp_path / "t.parquet", bytes_column="img"))
    assert t.column("id").to_pylist() == ["0", "1"]
    assert t.column("data").to_pylist() == [data, b"junk"]
    assert t.column("path").to_pylist() == [None, None]


def test_sources_user_errors(tmp_path):
    with pytest.raises(BatchError, match="no file matches"):
        read_inputs(_spec(tmp_path / "nothing*.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchError, match="no image files"):
        read_inputs(_spec(tmp_path / "empty"))
    (tmp_path / "t.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(BatchError, match="--path-column or --bytes-column"):
        read_inputs(_spec(tmp_path / "t.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"path": "a.png"}\n{"path": "a.png"}\n')
    with pytest.raises(BatchError, match="twice"):
        read_inputs(_spec(tmp_path / "d.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.png"}\nnot json\n')
    with pytest.raises(BatchError, match="line 2"):
        read_inputs(_spec(tmp_path / "bad.jsonl"))


# --------------------------------------------------------------------------- output parts, merge
def _rows(ids, text="t", error=None):
    return pa.Table.from_pylist([{"index": int(i), "id": str(i), "task": "caption", "prompt": "caption en",
                                  "text": None if error else f"{text}{i}", "error": error,
                                  "masks": [rle.encode(np.eye(3, dtype=bool))]} for i in ids], schema=OUTPUT_SCHEMA)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_store_parts_merge_keep_one_row_per_id(tmp_path, fmt):
    store = OutputStore(tmp_path / f"out.{fmt}")
    store.write_part(_rows([3, 1]))
    store.write_part(_rows([0, 2], error="ImageError: bad"))
    # a part torn by a kill mid-write is a hidden temporary file: never read
    (store.parts_dir / f".part-000003.{fmt}.999.tmp").write_bytes(b"\x00garbage")
    assert sorted(store.read_all().column("id").to_pylist()) == ["0", "1", "2", "3"]
    merged = store.merge()
    assert merged.column("id").to_pylist() == ["0", "1", "2", "3"]      # sorted by index
    assert not store.parts_dir.exists()
    # a later run (e.g. --retry-errors) writes rows again: the latest wins, no duplicates
    store.write_part(_rows([2], text="again"))
    # as if a run was killed after its merge renamed OUT but before the parts were removed
    store.write_part(_rows([1]))
    merged = store.merge()
    got = dict(zip(merged.column("id").to_pylist(), merged.column("text").to_pylist()))
    assert got == {"0": None, "1": "t1", "2": "again2", "3": "t3"}
    assert merged.column("masks").to_pylist()[0] == [rle.encode(np.eye(3, dtype=bool))]
    assert OutputStore(tmp_path / f"out.{fmt}").read_all().num_rows == 4


def test_store_user_errors(tmp_path):
    with pytest.raises(BatchError, match=".parquet or .jsonl"):
        OutputStore(tmp_path / "out.csv")
    with pytest.raises(BatchError, match="does not exist"):
        OutputStore(tmp_path / "no" / "out.jsonl")
    (tmp_path / "out.jsonl").write_text("this is not json\n")
    with pytest.raises(BatchError, match="cannot read it"):
        OutputStore(tmp_path / "out.jsonl").read_all()


def test_job_refuses_an_output_of_another_task(tmp_path):
    from engine.batch.job import run_job
    _png(tmp_path / "a.png")
    OutputStore(tmp_path / "out.jsonl").write_part(_rows([0]))          # caption rows
    spec = JobSpec(TaskSpec("detect", labels="cat"), str(tmp_path / "a.png"), str(tmp_path / "out.jsonl"))
    with pytest.raises(BatchError, match="another --output"):
        run_job(spec)


def test_cli_user_errors(tmp_path, capsys):
    from engine.batch.__main__ import main
    _png(tmp_path / "a.png")
    assert main(["detect", "--input", str(tmp_path), "--output", str(tmp_path / "o.parquet")]) == 2
    assert "needs --labels" in capsys.readouterr().err
    assert main(["caption", "--input", str(tmp_path), "--output", str(tmp_path / "o.csv")]) == 2
    assert ".parquet or .jsonl" in capsys.readouterr().err
    assert main(["caption", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "no file matches" in capsys.readouterr().err
