"""The artifact store: keys, atomic commit, manifest, verify, parts/resume, lock, gc."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from longrecipe.artifacts import MANIFEST, ArtifactStore, StageSpec, stage_key
from longrecipe.config import BuildConfig, IngestConfig


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"x": list(range(offset, offset + n))})


def test_key_is_stable_across_processes_and_hash_seeds():
    cfg = BuildConfig(train_len=300, target_len=1024)
    here = stage_key("build", "build_v1", cfg, {"documents": "abc", "analysis": "def"})
    code = (
        "from longrecipe.artifacts import stage_key; from longrecipe.config import BuildConfig;"
        "print(stage_key('build','build_v1',BuildConfig(train_len=300,target_len=1024),"
        "{'analysis':'def','documents':'abc'}))"
    )
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        assert out == here
    assert len(here) == 16 and int(here, 16) >= 0


def test_key_independent_of_dict_order_and_changed_by_everything_that_matters():
    base = stage_key("s", "s_v1", {"a": 1, "b": {"c": 2, "d": 3}}, {"x": "1", "y": "2"})
    assert base == stage_key("s", "s_v1", {"b": {"d": 3, "c": 2}, "a": 1}, {"y": "2", "x": "1"})
    assert base != stage_key("s", "s_v2", {"a": 1, "b": {"c": 2, "d": 3}}, {"x": "1", "y": "2"})
    assert base != stage_key("s", "s_v1", {"a": 2, "b": {"c": 2, "d": 3}}, {"x": "1", "y": "2"})
    assert base != stage_key("s", "s_v1", {"a": 1, "b": {"c": 2, "d": 3}}, {"x": "1", "y": "3"})
    assert base != stage_key("t", "s_v1", {"a": 1, "b": {"c": 2, "d": 3}}, {"x": "1", "y": "2"})
    # any config field, including nested ones, changes the key
    a = stage_key("ingest", "v", IngestConfig(), {})
    assert a != stage_key("ingest", "v", IngestConfig(shard_size=7), {})


def test_produce_writes_manifest_last_and_returns_existing(store):
    spec = StageSpec("demo", "demo_v1", {"n": 3}, {"up": "k0"})
    calls = []

    def body(w):
        calls.append(1)
        w.write_part("numbers", 0, _table(3))
        w.write_part("numbers", 1, _table(2, 3))
        w.write_json("files/meta.json", {"hello": 1})
        w.info["made"] = 5

    ref = store.produce(spec, body)
    m = ref.manifest
    assert m["key"] == spec.key and m["stage_version"] == "demo_v1"
    assert m["config"] == {"n": 3} and m["inputs"] == {"up": "k0"}
    assert m["tables"]["numbers"]["rows"] == 5 and m["tables"]["numbers"]["parts"] == 2
    assert {f["path"] for f in m["files"]} == {
        "numbers/part-00000.parquet", "numbers/part-00001.parquet", "files/meta.json"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m["files"])
    assert m["info"]["made"] == 5 and m["timings"]["seconds"] >= 0 and m["code_version"]
    assert ref.read_table("numbers").column("x").to_pylist() == [0, 1, 2, 3, 4]
    # manifest is the newest file of the folder
    folder = ref.path
    newest = max(folder.rglob("*"), key=lambda p: p.stat().st_mtime_ns if p.is_file() else 0)
    assert newest.name == MANIFEST
    # second call: no work
    assert store.produce(spec, body).key == ref.key and len(calls) == 1
    # no leftovers
    assert sorted(os.listdir(folder.parent)) == [spec.key, f"{spec.key}.lock"]


def test_failure_leaves_nothing_that_looks_finished_and_resumes_parts(store):
    spec = StageSpec("demo", "demo_v1", {"n": 4}, {})
    written = []

    def body(fail_at):
        def run(w):
            for i in range(4):
                if w.has_part("t", i):
                    continue
                if i == fail_at:
                    raise RuntimeError("killed")
                w.write_part("t", i, _table(1, i))
                written.append(i)
        return run

    with pytest.raises(RuntimeError):
        store.produce(spec, body(2))
    assert store.get("demo", spec.key) is None
    assert list(store.iter_refs()) == []
    ref = store.produce(spec, body(None))
    assert written == [0, 1, 2, 3]  # parts 0 and 1 were not redone
    assert ref.manifest["timings"]["resumed_parts"] == 2
    assert ref.read_table("t").column("x").to_pylist() == [0, 1, 2, 3]


def test_verify_detects_flipped_byte_and_get_treats_it_as_missing(store):
    spec = StageSpec("demo", "demo_v1", {}, {})
    ref = store.produce(spec, lambda w: w.write_table("t", _table(100)))
    assert store.verify(ref) == []
    part = ref.path / "t" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    problems = store.verify(ref)
    assert problems == ["t/part-00000.parquet: sha256 differs"]
    assert store.get("demo", spec.key, verify=True) is None
    # produce() never reuses it: the corrupt folder is moved aside and the stage recomputed
    fixed = store.produce(spec, lambda w: w.write_table("t", _table(100)))
    assert store.verify(fixed) == [] and fixed.read_table("t").num_rows == 100
    aside = [p for p in os.listdir(ref.path.parent) if ".corrupt-" in p]
    assert len(aside) == 1
    assert any(".corrupt-" in p for p in store.gc())
    part.unlink()
    assert store.get("demo", spec.key) is None  # size check alone catches a missing file


def test_manifestless_folder_is_not_an_artifact_and_is_replaced(store):
    spec = StageSpec("demo", "demo_v1", {}, {})
    (store_dir := ArtifactStore(store.root)).fs.makedirs(f"{store.root}/demo/{spec.key}", exist_ok=True)
    assert store_dir.get("demo", spec.key) is None
    ref = store.produce(spec, lambda w: w.write_table("t", _table(1)))
    assert store.verify(ref) == []


def _produce_slow(root, q):
    s = ArtifactStore(root)
    spec = StageSpec("demo", "demo_v1", {"slow": True}, {})

    def body(w):
        q.put(("start", os.getpid()))
        time.sleep(1.0)
        w.write_table("t", _table(3))

    ref = s.produce(spec, body)
    q.put(("done", ref.manifest["created_at"]))


def test_two_processes_same_key_compute_once(tmp_path):
    root = str(tmp_path / "store")
    q = mp.get_context("spawn").Queue()
    ps = [mp.get_context("spawn").Process(target=_produce_slow, args=(root, q)) for _ in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    events = [q.get(timeout=5) for _ in range(3)]
    assert sum(e[0] == "start" for e in events) == 1  # the second waited, then reused
    dones = [e[1] for e in events if e[0] == "done"]
    assert len(dones) == 2 and dones[0] == dones[1]


def test_gc_removes_leftovers_but_not_artifacts(store):
    spec = StageSpec("demo", "demo_v1", {}, {})
    ref = store.produce(spec, lambda w: w.write_table("t", _table(1)))
    stage_dir = ref.path.parent
    (stage_dir / "deadbeefdeadbeef.tmp-123").mkdir()
    (stage_dir / f"{spec.key}.partial").mkdir()  # finished key: its partial is a leftover
    (stage_dir / "0123456789abcdef.partial" / "t").mkdir(parents=True)
    (stage_dir / "0123456789abcdef.partial" / "t" / "part-00000.parquet.inprogress-ab").write_text("x")
    (stage_dir / "fedcba9876543210").mkdir()  # no manifest
    removed = store.gc()
    names = sorted(os.path.basename(p) for p in removed)
    assert names == sorted([
        "deadbeefdeadbeef.tmp-123", f"{spec.key}.partial", f"{spec.key}.lock",
        "part-00000.parquet.inprogress-ab", "fedcba9876543210"])
    assert (stage_dir / "0123456789abcdef.partial").exists()  # resume state kept
    assert store.get("demo", spec.key) is not None
    assert any("0123456789abcdef.partial" in p for p in store.gc(partial=True))


def test_store_root_is_a_url(tmp_path):
    s = ArtifactStore(f"file://{tmp_path}/viaurl")
    ref = s.produce(StageSpec("demo", "v", {}, {}), lambda w: w.write_table("t", _table(2)))
    assert s.verify(ref) == [] and json.loads((tmp_path / "viaurl/demo" / ref.key / MANIFEST).read_text())
