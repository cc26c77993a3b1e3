"""Writing a stage's files so that a kill or a power cut never leaves a half-written file
that looks finished: a temp name in the same folder, fsync, rename, fsync the folder.

`StageWriter` is what a stage body writes through; `seal` is what the commit records of
each file (size, mtime, sha256, flushed to disk); `damaged` tells a part a killed run
left unreadable (0 bytes, no Parquet footer) so that it is recomputed.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from longrecipe.digest import sha256_file
from longrecipe.errors import DiskFullError, is_disk_full

if TYPE_CHECKING:
    from longrecipe.artifacts import ArtifactStore, StageSpec

FRAGMENT = ".inprogress-"
"""Marks a temp file: `.<name>.inprogress-<unique>`, never listed in a manifest."""


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
        """True when a previous run already finished this part (damaged parts were dropped
        when the partial folder was opened)."""
        done = self.fs.exists(self._part_path(table, index))
        if done:
            self.resumed_parts += 1
        return done

    def read_part(self, table: str, index: int) -> pa.Table:
        return pq.read_table(self._part_path(table, index), filesystem=self.fs)

    def write_part(self, table: str, index: int, data: pa.Table) -> None:
        """Write one part atomically: a part file exists only once complete."""
        # Dictionary encoding only pays for flat columns; on long list columns (token ids)
        # it costs time and bytes.
        flat = [f.name for f in data.schema if not pa.types.is_nested(f.type)]
        write_durably(self.fs, self._part_path(table, index), lambda tmp: pq.write_table(
            data, tmp, filesystem=self.fs, compression="zstd", use_dictionary=flat))

    def write_table(self, table: str, data: pa.Table) -> None:
        """A table written in one go (a single part)."""
        self.write_part(table, 0, data)

    def write_json(self, rel: str, obj: Any) -> None:
        from longrecipe.artifacts import _jsonable

        text = json.dumps(_jsonable(obj), indent=2, sort_keys=True)
        write_durably(self.fs, f"{self.work}/{rel}", lambda tmp: write_text(self.fs, tmp, text))

    @property
    def local_dir(self) -> Path:
        """The work folder as a local path (model files). Local stores only."""
        if not self.store.is_local:
            from longrecipe.artifacts import ArtifactError

            raise ArtifactError("model files need a local store root in this version")
        return Path(self.work)

    @property
    def scratch(self) -> Path:
        """Resume state (training checkpoints): `<key>.scratch` beside the partial folder,
        kept across runs and dropped only once the artifact is committed."""
        _ = self.local_dir  # local stores only
        p = Path(self.store.scratch_dir(self.spec.stage, self.spec.key))
        p.mkdir(parents=True, exist_ok=True)
        return p


def write_durably(fs: Any, final: str, write: Callable[[str], None]) -> None:
    """Write a file under a temp name in its folder (dot-prefixed, so table readers skip
    it), fsync it, rename it into place, fsync the folder. A full disk names the path."""
    folder, name = final.rsplit("/", 1)
    tmp = f"{folder}/.{name}{FRAGMENT}{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(folder, exist_ok=True)
        write(tmp)
        if is_local(fs):
            fsync(tmp)
            os.replace(tmp, final)
            fsync(folder)
        else:
            fs.mv(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            if fs.exists(tmp):
                fs.rm(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            raise DiskFullError(final) from e
        raise


def seal(fs: Any, path: str) -> dict[str, Any]:
    """What the manifest records of a file about to be committed (size, sha256 and, local
    stores, mtime), its bytes flushed to disk."""
    if not is_local(fs):
        return {"size": fs.size(path), "sha256": sha256_file(path, fs)}
    sha = sha256_file(path, fsync=True)
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}


def damaged(fs: Any, path: str) -> str | None:
    """Why a Parquet part cannot be used (0 bytes, no footer), or None."""
    try:
        if fs.size(path) == 0:
            return "0 bytes"
        pq.read_metadata(path, filesystem=fs)
    except Exception as e:  # pyarrow says why in its own error types
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def is_part(rel: str) -> bool:
    """A table part (`<table>/part-*.parquet`), not a file under `files/`."""
    return rel.endswith(".parquet") and "/" in rel and not rel.startswith("files/")


def write_text(fs: Any, path: str, text: str) -> None:
    with fs.open(path, "w") as fh:
        fh.write(text)


def fsync(path: str) -> None:
    """Flush a file or folder to disk (folders: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def is_local(fs: Any) -> bool:
    p = fs.protocol
    return "file" in ((p,) if isinstance(p, str) else tuple(p))
