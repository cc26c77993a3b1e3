"""The artifact store: content-keyed, immutable stage outputs.

Layout under the root (local folder or any fsspec URL):

    <stage>/<key>/manifest.json            written last; without it a folder is not an artifact
    <stage>/<key>/<table>/part-00000.parquet
    <stage>/<key>/files/...                 model folders and other files
    <stage>/<key>.partial/                  work in progress of a run; finished parts survive a kill
    <stage>/<key>.tmp-<unique>/             the commit in flight (renamed into place)
    <stage>/<key>.lock                      cross-process lock (local roots)

A stage calls ``store.produce(spec, body)``: when the artifact exists it is
returned at once; otherwise the key is locked, ``body(writer)`` fills the
partial folder (skipping parts a killed run already finished), then the
folder is renamed to a unique temp name, the manifest (every file's size,
rows and sha256, the config, inputs, code version, timings) is written last,
and the temp folder is renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "longrecipe.manifest/1"
STORE_ENV = "LONGRECIPE_STORE"
DEFAULT_ROOT = "data/artifacts"
KEY_HEX = 16
log = logging.getLogger("longrecipe")


class ArtifactError(RuntimeError):
    """A missing, incomplete or corrupt artifact."""


# --------------------------------------------------------------------------- keys


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set | frozenset):
        return [_jsonable(x) for x in (sorted(obj) if isinstance(obj, set | frozenset) else obj)]
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(x) for x in obj]
    return obj


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators: the same bytes in every process."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stage_key(stage: str, stage_version: str, config: Any, inputs: Mapping[str, str]) -> str:
    """First 16 hex digits of sha256 over {stage, stage_version, config, input keys}."""
    payload = canonical_json(
        {"stage": stage, "stage_version": stage_version, "config": config, "inputs": dict(inputs)}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_HEX]


@dataclass(frozen=True)
class StageSpec:
    """What identifies one stage output: its key is derived from all of it."""

    stage: str
    stage_version: str
    config: Any
    inputs: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return stage_key(self.stage, self.stage_version, self.config, self.inputs)


# --------------------------------------------------------------------------- refs


@dataclass(frozen=True)
class ArtifactRef:
    """A finished artifact: where it is and what its manifest says."""

    stage: str
    key: str
    uri: str
    manifest: Mapping[str, Any]
    fs: Any = field(repr=False, compare=False, default=None)

    @property
    def path(self) -> Path:
        """Local path of the folder (local stores only)."""
        return Path(self.uri)

    def files(self, table: str) -> list[str]:
        """Paths of a table's Parquet parts, in order."""
        return [
            f"{self.uri}/{f['path']}"
            for f in self.manifest["files"]
            if f.get("table") == table
        ]

    def tables(self) -> list[str]:
        return sorted(self.manifest.get("tables", {}))

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        files = self.files(table)
        if not files:
            raise ArtifactError(f"{self.stage}/{self.key} has no table {table!r}")
        return pa.concat_tables(
            [pq.read_table(f, columns=columns, filesystem=self.fs) for f in files]
        )

    def iter_parts(self, table: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for f in self.files(table):
            yield pq.read_table(f, columns=columns, filesystem=self.fs)

    def file(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    @property
    def info(self) -> Mapping[str, Any]:
        return self.manifest.get("info", {})


# --------------------------------------------------------------------------- writer


class StageWriter:
    """Fills the partial folder of one key. Parts written here survive a killed run."""

    def __init__(self, store: ArtifactStore, spec: StageSpec, work: str):
        self.store, self.spec, self.work = store, spec, work
        self.fs = store.fs
        self.info: dict[str, Any] = {}
        """Stage-specific facts merged into the manifest's `info`."""
        self.resumed_parts = 0

    def _part_path(self, table: str, index: int) -> str:
        return f"{self.work}/{table}/part-{index:05d}.parquet"

    def has_part(self, table: str, index: int) -> bool:
        """True when a previous run already finished this part."""
        done = self.fs.exists(self._part_path(table, index))
        if done:
            self.resumed_parts += 1
        return done

    def read_part(self, table: str, index: int) -> pa.Table:
        return pq.read_table(self._part_path(table, index), filesystem=self.fs)

    def write_part(self, table: str, index: int, data: pa.Table) -> None:
        """Write one part atomically: a part file exists only once complete."""
        final = self._part_path(table, index)
        tmp = f"{final}.inprogress-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(f"{self.work}/{table}", exist_ok=True)
        # Dictionary encoding only pays for flat columns; on long list columns (token ids)
        # it costs time and bytes.
        flat = [f.name for f in data.schema if not pa.types.is_nested(f.type)]
        pq.write_table(data, tmp, filesystem=self.fs, compression="zstd", use_dictionary=flat)
        self.fs.mv(tmp, final)

    def write_table(self, table: str, data: pa.Table) -> None:
        """A table written in one go (a single part)."""
        self.write_part(table, 0, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.fs.makedirs(os.path.dirname(f"{self.work}/{rel}") or self.work, exist_ok=True)
        with self.fs.open(f"{self.work}/{rel}", "w") as fh:
            json.dump(_jsonable(obj), fh, indent=2, sort_keys=True)

    @property
    def local_dir(self) -> Path:
        """The work folder as a local path (model files, checkpoints). Local stores only."""
        if not self.store.is_local:
            raise ArtifactError("model files need a local store root in this version")
        return Path(self.work)

    @property
    def scratch(self) -> Path:
        """Resume state (training checkpoints): kept across runs, dropped at commit."""
        p = self.local_dir / "_scratch"
        p.mkdir(parents=True, exist_ok=True)
        return p


# --------------------------------------------------------------------------- store


class ArtifactStore:
    """Versioned, content-keyed stage outputs under one root."""

    def __init__(self, root: str | os.PathLike | None = None):
        root = str(root or os.environ.get(STORE_ENV) or DEFAULT_ROOT)
        self.fs, path = fsspec.core.url_to_fs(root)
        self.is_local = "file" in _protocols(self.fs)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # -- paths
    def dir(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    # -- lookup
    def get(self, stage: str, key: str, *, verify: bool = False) -> ArtifactRef | None:
        """The finished artifact for a key, or None. verify=True also rechecks hashes."""
        ref = self.load(stage, key)
        if ref is None:
            return None
        if verify and self.verify(ref):
            return None
        if not verify and self._sizes_wrong(ref):
            return None
        return ref

    def require(self, stage: str, key: str) -> ArtifactRef:
        ref = self.get(stage, key)
        if ref is None:
            raise ArtifactError(f"no finished artifact {stage}/{key} under {self.root}")
        return ref

    def load(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact its manifest describes, without checking its files (see `get`)."""
        mpath = f"{self.dir(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open(mpath, "r") as fh:
                manifest = json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("key") != key:
            return None
        return ArtifactRef(stage, key, self.dir(stage, key), manifest, self.fs)

    def _sizes_wrong(self, ref: ArtifactRef) -> bool:
        for f in ref.manifest["files"]:
            try:
                if self.fs.size(f"{ref.uri}/{f['path']}") != f["size"]:
                    return True
            except (FileNotFoundError, OSError):
                return True
        return False

    def find(self, key: str) -> ArtifactRef:
        """An artifact by key (or unique key prefix), whatever its stage."""
        hits = [r for r in self.iter_refs() if r.key.startswith(key)]
        if len(hits) != 1:
            raise ArtifactError(
                f"key {key!r} matches {len(hits)} artifacts under {self.root}"
                + (": " + ", ".join(f"{r.stage}/{r.key}" for r in hits) if hits else "")
            )
        return hits[0]

    def iter_refs(self, stage: str | None = None) -> Iterator[ArtifactRef]:
        """Every finished artifact (valid manifest), sorted by stage then creation time."""
        pattern = f"{self.root}/{stage or '*'}/*/{MANIFEST}"
        refs = []
        for m in self.fs.glob(pattern):
            parts = m.rstrip("/").split("/")
            st, key = parts[-3], parts[-2]
            if "." in key:
                continue
            ref = self.load(st, key)
            if ref is not None:
                refs.append(ref)
        refs.sort(key=lambda r: (r.stage, r.manifest.get("created_at", "")))
        return iter(refs)

    # -- verify
    def verify(self, ref: ArtifactRef) -> list[str]:
        """Problems found when rechecking every file's size and sha256 (empty: intact)."""
        problems = []
        for f in ref.manifest["files"]:
            p = f"{ref.uri}/{f['path']}"
            try:
                size = self.fs.size(p)
            except (FileNotFoundError, OSError):
                problems.append(f"{f['path']}: missing")
                continue
            if size != f["size"]:
                problems.append(f"{f['path']}: size {size} != {f['size']}")
                continue
            if _sha256(self.fs, p) != f["sha256"]:
                problems.append(f"{f['path']}: sha256 differs")
        return problems

    # -- produce
    def produce(
        self,
        spec: StageSpec,
        body: Callable[[StageWriter], None],
        *,
        lock_timeout: float | None = None,
    ) -> ArtifactRef:
        """Return the artifact for `spec`, computing it with `body` when missing.

        Two processes asking for the same key: the second waits on the lock and then
        reuses the first one's artifact. A body that raises leaves the partial folder
        (finished parts) for the next run and nothing that looks finished.
        """
        key = spec.key
        ref = self.get(spec.stage, key, verify=True)
        if ref is not None:
            return ref
        with self._lock(spec.stage, key, lock_timeout):
            final = self.dir(spec.stage, key)
            ref = self.load(spec.stage, key)
            if ref is not None:
                problems = self.verify(ref)
                if not problems:
                    return ref  # another process finished it while we waited
                self._quarantine(ref, problems)
            elif self.fs.exists(final):  # a manifest-less leftover: never reused
                self.fs.rm(final, recursive=True)
            work = f"{final}.partial"
            self.fs.makedirs(work, exist_ok=True)
            writer = StageWriter(self, spec, work)
            started = time.time()
            body(writer)
            return self._commit(spec, writer, started)

    def _quarantine(self, ref: ArtifactRef, problems: list[str]) -> str:
        """Move a corrupt artifact aside (kept for inspection until `gc`) so it is recomputed."""
        aside = f"{ref.uri}.corrupt-{uuid.uuid4().hex[:8]}"
        self.fs.mv(ref.uri, aside, recursive=True)
        log.warning("%s/%s failed verification (%s): moved to %s, recomputing",
                    ref.stage, ref.key, "; ".join(problems), aside)
        return aside

    def _commit(self, spec: StageSpec, w: StageWriter, started: float) -> ArtifactRef:
        final = self.dir(spec.stage, spec.key)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        self.fs.mv(w.work, tmp, recursive=True)
        scratch = f"{tmp}/_scratch"
        if self.fs.exists(scratch):
            self.fs.rm(scratch, recursive=True)
        files, tables = [], {}
        for p in sorted(self.fs.find(tmp)):
            rel = p[len(tmp) + 1 :]
            if rel == MANIFEST or ".inprogress-" in rel:
                continue
            entry = {"path": rel, "size": self.fs.size(p), "sha256": _sha256(self.fs, p)}
            if rel.endswith(".parquet") and "/" in rel and not rel.startswith("files/"):
                table = rel.split("/")[0]
                rows = pq.ParquetFile(p, filesystem=self.fs).metadata.num_rows
                entry.update(table=table, rows=rows)
                t = tables.setdefault(table, {"rows": 0, "parts": 0, "bytes": 0})
                t["rows"] += rows
                t["parts"] += 1
                t["bytes"] += entry["size"]
            files.append(entry)
        finished = time.time()
        manifest = {
            "format": MANIFEST_FORMAT,
            "stage": spec.stage,
            "key": spec.key,
            "stage_version": spec.stage_version,
            "config": _jsonable(spec.config),
            "inputs": dict(spec.inputs),
            "code_version": code_version(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "timings": {
                "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "seconds": round(finished - started, 3),
                "resumed_parts": w.resumed_parts,
            },
            "tables": tables,
            "files": files,
            "info": _jsonable(w.info),
        }
        with self.fs.open(f"{tmp}/{MANIFEST}", "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
        self.fs.mv(tmp, final, recursive=True)
        ref = self.load(spec.stage, spec.key)
        assert ref is not None
        return ref

    # -- locking
    @contextlib.contextmanager
    def _lock(self, stage: str, key: str, timeout: float | None) -> Iterator[None]:
        if not self.is_local:
            # Object stores have no flock; a second writer of the same key would redo the
            # work and its final rename would lose to the first. Documented in README.
            yield
            return
        lock_path = Path(self.root, stage, f"{key}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise ArtifactError(f"{stage}/{key} is locked by another process") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def is_locked(self, stage: str, key: str) -> bool:
        if not self.is_local:
            return False
        lock_path = Path(self.root, stage, f"{key}.lock")
        if not lock_path.exists():
            return False
        with open(lock_path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    # -- garbage collection
    def gc(self, *, partial: bool = False, dry_run: bool = False) -> list[str]:
        """Remove leftovers: temp folders, stray `.inprogress` parts, partial folders of keys
        that finished since, corrupt folders without a manifest, stale lock files. With
        partial=True also the resume state of unfinished keys. Locked keys are left alone."""
        removed = []
        for stage_dir in self.fs.ls(self.root, detail=False):
            if not self.fs.isdir(stage_dir):
                continue
            stage = stage_dir.rstrip("/").split("/")[-1]
            if stage.startswith(("_", ".")):  # not a stage (e.g. _prefect results)
                continue
            for entry in self.fs.ls(stage_dir, detail=False):
                name = entry.rstrip("/").split("/")[-1]
                key = name.split(".")[0]
                if self.is_locked(stage, key):
                    continue
                finished = self.load(stage, key) is not None
                drop = (
                    ".tmp-" in name
                    or ".corrupt-" in name
                    or (name.endswith(".partial") and (finished or partial))
                    or (name.endswith(".lock") and (finished or partial))
                    or ("." not in name and not finished)
                )
                if not drop and name.endswith(".partial"):
                    for p in self.fs.find(entry):
                        if ".inprogress-" in p:
                            removed.append(p)
                            if not dry_run:
                                self.fs.rm(p)
                if drop:
                    removed.append(entry)
                    if not dry_run:
                        self.fs.rm(entry, recursive=self.fs.isdir(entry))
        return removed


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _sha256(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


_CODE_VERSION: str | None = None


def code_version() -> str:
    """Package version plus the git commit of the source tree (and `.dirty`), when known."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from longrecipe import __version__

        version = __version__
        src = Path(__file__).resolve().parent
        try:
            sha = subprocess.run(
                ["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(src), "status", "--porcelain", "--", "."],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()
            version += f"+g{sha}" + (".dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
        _CODE_VERSION = version
    return _CODE_VERSION

