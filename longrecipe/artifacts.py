"""The artifact store: content-keyed, immutable stage outputs.

Layout under the root (local folder or any fsspec URL):

    <stage>/<key>/manifest.json            written last; without it a folder is not an artifact
    <stage>/<key>/<table>/part-00000.parquet
    <stage>/<key>/files/...                 model folders and other files
    <stage>/<key>.partial/                  work in progress; finished parts survive a kill
    <stage>/<key>.scratch/                  resume state (checkpoints), dropped once committed
    <stage>/<key>.lock                      cross-process lock (local roots)
    <stage>/<key>.corrupt-*, .broken-*      quarantined folders, kept until removed by name

A stage calls ``store.produce(spec, body)``: when the artifact exists it is
returned at once; otherwise the key is locked, the partial folder is opened
(fragments of killed writes and damaged parts are dropped), ``body(writer)``
fills it (skipping parts a killed run already finished), and the commit hashes
and fsyncs every file, writes the manifest (every file's size, mtime, rows and
sha256, the config, inputs, code version, timings) last and renames the folder
into place. Only then is the scratch folder dropped, so a kill at any moment
loses no finished part and no checkpoint. A cache hit costs the manifest and a
stat per file (`check`); `verify` rereads every byte.
"""

from __future__ import annotations

import contextlib
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

from longrecipe.digest import file_digest, sha256_file
from longrecipe.durable import (
    FRAGMENT,
    StageWriter,
    damaged,
    fsync,
    is_local,
    is_part,
    seal,
    write_durably,
    write_text,
)
from longrecipe.errors import InputError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "longrecipe.manifest/1"
STORE_ENV = "LONGRECIPE_STORE"
DEFAULT_ROOT = "data/artifacts"
KEY_HEX = 16
log = logging.getLogger("longrecipe")


class ArtifactError(RuntimeError):
    """A missing, incomplete or corrupt artifact."""


class StoreNotFound(InputError):
    """A store root that does not exist, given to a command that only reads."""


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


# --------------------------------------------------------------------------- store


class ArtifactStore:
    """Versioned, content-keyed stage outputs under one root."""

    def __init__(self, root: str | os.PathLike | None = None, *, create: bool = True):
        root = str(root or os.environ.get(STORE_ENV) or DEFAULT_ROOT)
        self.fs, path = fsspec.core.url_to_fs(root)
        self.is_local = is_local(self.fs)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        if self.is_local and not os.path.isdir(self.root):
            if not create:
                raise StoreNotFound(f"store {self.root} does not exist (--store DIR or ${STORE_ENV})")
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # -- paths
    def dir(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def scratch_dir(self, stage: str, key: str) -> str:
        return f"{self.dir(stage, key)}.scratch"

    # -- lookup
    def get(self, stage: str, key: str, *, verify: bool = False) -> ArtifactRef | None:
        """The finished artifact for a key, or None. Accepted on its manifest and every
        file's size (and mtime, local stores: `check`); verify=True rereads every byte."""
        ref = self.load(stage, key)
        if ref is None:
            return None
        return None if (self.verify(ref) if verify else self.check(ref)) else ref

    def require(self, stage: str, key: str) -> ArtifactRef:
        ref = self.get(stage, key)
        if ref is None:
            raise ArtifactError(f"no finished artifact {stage}/{key} under {self.root}")
        return ref

    def load(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact its manifest describes, without checking its files (see `get`)."""
        folder = self.dir(stage, key)
        manifest = self._read_manifest(folder, key)
        return None if manifest is None else ArtifactRef(stage, key, folder, manifest, self.fs)

    def _read_manifest(self, folder: str, key: str) -> dict | None:
        try:
            with self.fs.open(f"{folder}/{MANIFEST}", "r") as fh:
                manifest = json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
                or manifest.get("key") != key or not isinstance(manifest.get("files"), list):
            return None
        return manifest

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
            if "." in key or st.startswith(("_", ".")):
                continue
            ref = self.load(st, key)
            if ref is not None:
                refs.append(ref)
        refs.sort(key=lambda r: (r.stage, r.manifest.get("created_at", "")))
        return iter(refs)

    # -- checks
    def check(self, ref: ArtifactRef, table: str | None = None) -> list[str]:
        """The cheap check of a cache hit (empty: accepted): every file there with the size
        the manifest records and, on a local store, its mtime. A file whose mtime differs
        (a copied store, an edited file) is hashed, once per (path, size, mtime)."""
        problems = []
        for f in ref.manifest["files"]:
            if table is not None and f.get("table") != table:
                continue
            p = f"{ref.uri}/{f['path']}"
            try:
                if self.is_local:
                    st = os.stat(p)
                    size, mtime = st.st_size, st.st_mtime_ns
                else:
                    size, mtime = self.fs.size(p), None
            except OSError:
                problems.append(f"{f['path']}: missing")
                continue
            if size != f["size"]:
                problems.append(f"{f['path']}: size {size} != {f['size']}")
            elif mtime is not None and mtime != f.get("mtime_ns") and file_digest(p) != f["sha256"]:
                problems.append(f"{f['path']}: sha256 differs")
        return problems

    def verify(self, ref: ArtifactRef) -> list[str]:
        """The deep check: every file's size and sha256, reread now (empty: intact)."""
        problems = []
        for f in ref.manifest["files"]:
            p = f"{ref.uri}/{f['path']}"
            try:
                size = self.fs.size(p)
                if size != f["size"]:
                    problems.append(f"{f['path']}: size {size} != {f['size']}")
                elif sha256_file(p, self.fs) != f["sha256"]:
                    problems.append(f"{f['path']}: sha256 differs")
            except OSError:
                problems.append(f"{f['path']}: missing")
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
        reuses the first one's artifact. A body that raises (or a kill at any moment)
        leaves the partial folder and the scratch folder for the next run, and nothing
        that looks finished.
        """
        key = spec.key
        ref = self.get(spec.stage, key)
        if ref is not None:
            return ref
        with self._lock(spec.stage, key, lock_timeout):
            final = self.dir(spec.stage, key)
            ref = self.load(spec.stage, key)
            if ref is not None:
                problems = self.check(ref)
                if not problems:
                    return ref  # another process finished it while we waited
                self.set_aside(final, "corrupt", problems)
            elif self.fs.exists(final):  # no valid manifest: never reused, never deleted
                self.set_aside(final, "broken", ["no valid manifest"])
            work = self._open_partial(spec)
            ref = self._finish_commit(spec, work)
            if ref is not None:
                return ref
            writer = StageWriter(self, spec, work)
            started = time.time()
            body(writer)
            return self._commit(spec, writer, started)

    def set_aside(self, folder: str, kind: str, problems: list[str]) -> str | None:
        """Quarantine a folder that is not a usable artifact (`<key>.<kind>-<unique>`), kept
        for inspection until removed by name; an empty one is simply removed."""
        if not self.fs.find(folder):
            self.fs.rm(folder, recursive=True)
            return None
        aside = f"{folder}.{kind}-{uuid.uuid4().hex[:8]}"
        self.fs.mv(folder, aside, recursive=True)
        log.warning("%s (%s): moved to %s, recomputing", folder.removeprefix(self.root + "/"),
                    "; ".join(problems), aside)
        return aside

    def _open_partial(self, spec: StageSpec) -> str:
        """The key's partial folder, ready for a body: a commit of the previous layout
        (`<key>.tmp-*`) killed midway is taken back, fragments of killed writes and damaged
        parts (0 bytes, no Parquet footer) are dropped, so they are recomputed."""
        final = self.dir(spec.stage, spec.key)
        work, scratch = f"{final}.partial", self.scratch_dir(spec.stage, spec.key)
        if not self.fs.exists(work) and (old := sorted(self.fs.glob(f"{final}.tmp-*"))):
            self.fs.mv(old[0], work, recursive=True)
        self.fs.makedirs(work, exist_ok=True)
        if self.fs.exists(legacy := f"{work}/_scratch"):  # resume state of the previous layout
            if self.fs.exists(scratch):
                self.fs.rm(legacy, recursive=True)
            else:
                self.fs.mv(legacy, scratch, recursive=True)
        for p in self.fs.find(work):
            rel = p[len(work) + 1 :]
            if FRAGMENT in rel:
                self.fs.rm(p)
            elif is_part(rel) and (problem := damaged(self.fs, p)):
                log.warning("%s/%s: part %s is damaged (%s): recomputing it",
                            spec.stage, spec.key, rel, problem)
                self.fs.rm(p)
        return work

    def _finish_commit(self, spec: StageSpec, work: str) -> ArtifactRef | None:
        """A commit killed after its manifest was written: finish it (a rename) instead of
        redoing the work, when every file still matches that manifest."""
        if not self.fs.exists(f"{work}/{MANIFEST}"):
            return None
        manifest = self._read_manifest(work, spec.key)
        if manifest is None or self.check(ArtifactRef(spec.stage, spec.key, work, manifest, self.fs)):
            self.fs.rm(f"{work}/{MANIFEST}")
            return None
        return self._publish(spec, work)

    def _commit(self, spec: StageSpec, w: StageWriter, started: float) -> ArtifactRef:
        files, tables = [], {}
        for p in sorted(self.fs.find(w.work)):
            rel = p[len(w.work) + 1 :]
            if FRAGMENT in rel:  # a killed writer's temp file is never part of an artifact
                self.fs.rm(p)
                continue
            if rel == MANIFEST:
                continue
            entry = {"path": rel, **seal(self.fs, p)}
            if is_part(rel):
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
        text = json.dumps(manifest, indent=2, sort_keys=True)
        write_durably(self.fs, f"{w.work}/{MANIFEST}", lambda tmp: write_text(self.fs, tmp, text))
        return self._publish(spec, w.work)

    def _publish(self, spec: StageSpec, work: str) -> ArtifactRef:
        final = self.dir(spec.stage, spec.key)
        if self.is_local:
            os.rename(work, final)
            fsync(os.path.dirname(final))
        else:
            self.fs.mv(work, final, recursive=True)
        # Only now, with the artifact in place, is the resume state dropped.
        if self.fs.exists(scratch := self.scratch_dir(spec.stage, spec.key)):
            self.fs.rm(scratch, recursive=True)
        ref = self.load(spec.stage, spec.key)
        if ref is None:
            raise ArtifactError(f"{spec.stage}/{spec.key}: committed, but its manifest does not read back")
        return ref

    # -- locking
    @contextlib.contextmanager
    def _lock(self, stage: str, key: str, timeout: float | None) -> Iterator[None]:
        if not self.is_local:
            # Object stores have no flock; a second writer of the same key would redo the
            # work and its final rename would lose to the first. Documented in README.
            yield
            return
        from filelock import FileLock, Timeout

        path = Path(self.root, stage, f"{key}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=-1 if timeout is None else timeout)
        try:
            lock.acquire()
        except Timeout:
            raise ArtifactError(f"{stage}/{key} is locked by another process") from None
        try:
            yield
        finally:
            lock.release()

    def is_locked(self, stage: str, key: str) -> bool:
        """True while another process (or this one) holds the key's lock."""
        if not self.is_local:
            return False
        from filelock import FileLock, Timeout

        path = Path(self.root, stage, f"{key}.lock")
        if not path.exists():
            return False
        try:
            FileLock(str(path), timeout=0).acquire().lock.release()
        except Timeout:
            return True
        return False

    # -- garbage collection
    def gc(self, *, partial: bool = False, dry_run: bool = False, names: list[str] | None = None):
        """Clean leftovers; list of GcAction (see longrecipe.housekeeping)."""
        from longrecipe.housekeeping import gc

        return gc(self, partial=partial, dry_run=dry_run, names=names)


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

