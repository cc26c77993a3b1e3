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
    # gc keeps a quarantined folder (it holds finished parts) until it is named
    assert [a.action for a in store.gc() if ".corrupt-" in a.path] == ["keep"]
    assert [a.action for a in store.gc(names=[f"demo/{aside[0]}"])] == ["remove"]
    assert not (ref.path.parent / aside[0]).exists()
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
    (stage_dir / "deadbeefdeadbeef.tmp-123").mkdir()  # empty: nothing to keep
    (stage_dir / f"{spec.key}.partial").mkdir()  # finished key: its partial is a leftover
    (stage_dir / "0123456789abcdef.partial" / "t").mkdir(parents=True)
    (stage_dir / "0123456789abcdef.partial" / "t" / ".part-00000.parquet.inprogress-ab").write_text("x")
    (stage_dir / "fedcba9876543210").mkdir()  # no manifest, empty
    removed = [a.path for a in store.gc() if a.action == "remove"]
    names = sorted(os.path.basename(p) for p in removed)
    assert names == sorted([
        "deadbeefdeadbeef.tmp-123", f"{spec.key}.partial", f"{spec.key}.lock",
        ".part-00000.parquet.inprogress-ab", "fedcba9876543210"])
    assert (stage_dir / "0123456789abcdef.partial").exists()  # resume state kept
    assert store.get("demo", spec.key) is not None
    assert any("0123456789abcdef.partial" in a.path for a in store.gc(partial=True) if a.action == "remove")


def test_store_root_is_a_url(tmp_path):
    s = ArtifactStore(f"file://{tmp_path}/viaurl")
    ref = s.produce(StageSpec("demo", "v", {}, {}), lambda w: w.write_table("t", _table(2)))
    assert s.verify(ref) == [] and json.loads((tmp_path / "viaurl/demo" / ref.key / MANIFEST).read_text())


# --------------------------------------------------------------------------- findings of issue 14


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "longrecipe", *args], capture_output=True, text=True)


def _model_artifact(store, name="m"):
    """An artifact holding 'weights' (a model folder), like train/anneal/merge."""
    def body(w):
        folder = w.local_dir / "files" / "model"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(os.urandom(1 << 16))
        (folder / "config.json").write_text('{"model_type": "llama"}')
        w.write_table("train_metrics", _table(3))
    return store.produce(StageSpec("train", "train_v1", {"name": name}, {}), body)


def test_finding_5_verify_reports_every_non_artifact_and_gc_keeps_weights(tmp_path, store):
    """Finding 5: verify names broken and missing manifests, stray files and quarantined
    folders and exits 1; gc never deletes a folder with weights or parts (it quarantines);
    a store path that does not exist is an error and is not created."""
    good = _model_artifact(store, "good")
    broken = _model_artifact(store, "broken")
    (broken.path / MANIFEST).write_text("{not json")
    gone = _model_artifact(store, "gone")
    (gone.path / MANIFEST).unlink()
    (good.path / "notes.txt").write_text("left here by hand")
    (store.fs.makedirs(f"{store.root}/train/0123456789abcdef.weird", exist_ok=True))
    r = _cli("artifacts", "verify", "--store", store.root)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(good.key in x and x.rstrip().endswith("ok") for x in lines), lines
    assert any(broken.key in x and "BROKEN" in x and "unreadable" in x for x in lines), lines
    assert any(gone.key in x and "BROKEN" in x and "no manifest.json" in x for x in lines), lines
    assert any("notes.txt" in x and "STRAY" in x for x in lines), lines
    assert any("0123456789abcdef.weird" in x and "STRAY" in x for x in lines), lines
    # gc: the weights survive, set aside under a name that says why
    r = _cli("artifacts", "gc", "--store", store.root)
    assert r.returncode == 0, r.stderr
    for ref in (broken, gone):
        aside = [p for p in os.listdir(ref.path.parent) if p.startswith(f"{ref.key}.broken-")]
        assert len(aside) == 1, os.listdir(ref.path.parent)
        assert (ref.path.parent / aside[0] / "files/model/model.safetensors").stat().st_size == 1 << 16
    assert (good.path / "notes.txt").exists() and store.verify(good) == []
    r = _cli("artifacts", "gc", "--store", store.root)
    assert "kept" in r.stdout and ".broken-" in r.stdout and "gc train/" in r.stdout
    aside = next(p for p in os.listdir(broken.path.parent) if p.startswith(f"{broken.key}.broken-"))
    r = _cli("artifacts", "gc", f"train/{aside}", "--store", store.root)
    assert r.returncode == 0 and not (broken.path.parent / aside).exists()
    r = _cli("artifacts", "gc", "../../etc", "--store", store.root)
    assert r.returncode == 2
    # a missing store: an error naming it, and nothing created
    missing = tmp_path / "no-such-store"
    for args in (["artifacts", "verify"], ["artifacts", "ls"], ["artifacts", "gc"],
                 ["query", "SELECT 1"]):
        r = _cli(*args, "--store", str(missing))
        assert r.returncode == 2 and "does not exist" in r.stderr and str(missing) in r.stderr, args
    assert not missing.exists()


def test_finding_8_no_fragment_in_an_artifact_and_a_damaged_part_is_recomputed(store, monkeypatch):
    """Finding 8: a killed write leaves a fragment and a 0-byte part in the partial folder;
    the rerun recomputes the damaged part, commits no fragment (the table folder reads as a
    dataset), and every part and the manifest went through fsync."""
    import pyarrow.parquet as pq

    spec = StageSpec("build", "build_v1", {"n": 3}, {})
    computed = []

    def body(w):
        for i in range(3):
            if not w.has_part("samples", i):
                computed.append(i)
                w.write_part("samples", i, _table(2, 2 * i))

    with pytest.raises(RuntimeError):
        def killed(w):
            w.write_part("samples", 0, _table(2, 0))
            w.write_part("samples", 1, _table(2, 2))
            raise RuntimeError("killed")
        store.produce(spec, killed)
    work = f"{store.dir('build', spec.key)}.partial/samples"
    open(f"{work}/part-00001.parquet", "wb").close()  # lost to a power cut: 0 bytes
    for name in ("part-00002.parquet.inprogress-1a2b3c4d", ".part-00002.parquet.inprogress-5e6f"):
        with open(f"{work}/{name}", "wb") as fh:
            fh.write(b"PAR1 half a part")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ref = store.produce(spec, body)
    assert computed == [1, 2]  # part 0 resumed, the damaged part 1 recomputed
    assert sorted(os.listdir(ref.path / "samples")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert pq.read_table(str(ref.path / "samples")).num_rows == 6
    assert ref.read_table("samples").column("x").to_pylist() == list(range(6))
    assert not any("inprogress" in f["path"] for f in ref.manifest["files"])
    names = {os.path.basename(p) for p in synced}
    assert {"part-00001.parquet", "part-00002.parquet", MANIFEST} <= {n.split(".inprogress")[0].lstrip(".")
                                                                      for n in names}
    assert any(p.endswith(f"{spec.key}.partial/samples/part-00000.parquet") for p in synced)  # at commit


_KILL_IN_COMMIT = r"""
import hashlib, os, sys
from longrecipe.artifacts import ArtifactStore, StageSpec
import pyarrow as pa
state = {"body_done": False, "calls": 0}
real = hashlib.sha256
def sha256(*a, **k):
    if state["body_done"]:
        state["calls"] += 1
        if state["calls"] == 2:
            os._exit(9)  # killed while the commit hashes the files
    return real(*a, **k)
hashlib.sha256 = sha256
store = ArtifactStore(sys.argv[1])
def body(w):
    for i in range(2):
        w.write_part("train_metrics", i, pa.table({"x": [i]}))
    (w.scratch / "ckpt-00000002").mkdir()
    (w.scratch / "ckpt-00000002" / "state.json").write_text("{}")
    state["body_done"] = True
store.produce(StageSpec("train", "train_v1", {"k": 1}, {}), body)
"""


def test_finding_9_a_kill_during_commit_keeps_finished_parts_and_checkpoints(store):
    """Finding 9: a process killed while its commit hashes loses nothing: the rerun finds
    both parts and the checkpoint, recomputes nothing, and drops the checkpoint only once
    the artifact is in place."""
    r = subprocess.run([sys.executable, "-c", _KILL_IN_COMMIT, store.root], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    spec = StageSpec("train", "train_v1", {"k": 1}, {})
    assert store.get("train", spec.key) is None
    seen = {}

    def body(w):
        seen["parts"] = [w.has_part("train_metrics", i) for i in range(2)]
        seen["ckpt"] = (w.scratch / "ckpt-00000002" / "state.json").exists()
        for i in range(2):
            if not w.has_part("train_metrics", i):
                w.write_part("train_metrics", i, pa.table({"x": [i]}))

    ref = store.produce(spec, body)
    assert seen == {"parts": [True, True], "ckpt": True}
    assert ref.read_table("train_metrics").column("x").to_pylist() == [0, 1]
    assert not os.path.exists(store.scratch_dir("train", spec.key))  # dropped after the commit
    assert store.verify(ref) == []


def test_finding_9_a_kill_after_the_manifest_only_renames(store):
    """The manifest is in the partial folder, the rename did not happen: the rerun finishes
    the commit without running the body."""
    spec = StageSpec("merge", "merge_v1", {}, {})
    ref = store.produce(spec, lambda w: w.write_table("t", _table(4)))
    os.rename(ref.path, f"{ref.path}.partial")  # as if killed just before the final rename
    again = store.produce(spec, lambda w: pytest.fail("the body ran again"))
    assert again.key == ref.key and store.verify(again) == []


def test_finding_10_a_cache_hit_reads_the_manifests_not_the_bytes(tmp_path, monkeypatch):
    """Finding 10: a cache hit opens no artifact or model file (stat only), also in a new
    process (digests persist in LONGRECIPE_DIGEST_CACHE); an edited file is hashed once."""
    import builtins

    from longrecipe import digest
    from longrecipe.models import resolve

    monkeypatch.setenv(digest.CACHE_ENV, str(tmp_path / "cache" / "digests.sqlite"))
    store = ArtifactStore(tmp_path / "store")
    ref = _model_artifact(store)
    model_dir = ref.path / "files" / "model"
    first = resolve(str(model_dir)).key
    opened = []
    real_open = builtins.open

    def spy(file, mode="r", *a, **k):
        if "r" in mode and "b" in mode and str(file).startswith(str(tmp_path / "store")) \
                and not str(file).endswith(MANIFEST):
            opened.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(digest, "_memo", {})  # a new process: only the persistent cache is left
    spec = StageSpec("train", "train_v1", {"name": "m"}, {})
    assert store.produce(spec, lambda w: pytest.fail("recomputed")).key == ref.key
    assert store.get("train", ref.key) is not None
    assert resolve(str(model_dir)).key == first
    assert opened == []
    weights = model_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # e.g. a copied store
    assert store.get("train", ref.key) is not None
    assert opened == [str(weights)]  # hashed once, found equal
    assert store.get("train", ref.key) is not None and resolve(str(model_dir)).key == first
    assert opened == [str(weights)]  # and never again
