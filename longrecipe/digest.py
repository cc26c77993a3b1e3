"""Content identity of files: one sha256 helper for manifests, models, corpora and data.

`file_digest(path)` hashes a local file once per (path, size, mtime, inode): an
unchanged file is looked up, not re-read. The lookup lives in this process and,
when `LONGRECIPE_DIGEST_CACHE` names a file (`longrecipe run` sets it to
`<store>/_cache/digests.sqlite`), in SQLite across processes, so a no-op rerun
stats its inputs instead of reading them. A damaged cache file is ignored, never
an error. `sha256_file` always reads the bytes (commit and `artifacts verify`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CACHE_ENV = "LONGRECIPE_DIGEST_CACHE"
CHUNK = 1 << 22
log = logging.getLogger("longrecipe")

_memo: dict[tuple, str] = {}
_lock = threading.Lock()
_db: dict[str, sqlite3.Connection | None] = {}


def sha256_file(path: str | os.PathLike, fs: Any = None, *, fsync: bool = False) -> str:
    """sha256 of a file's bytes, read now (fsspec `fs` for remote stores). With fsync=True
    the file's data is also flushed to disk (local files; commit uses it)."""
    h = hashlib.sha256()
    if fs is not None and not _is_local(fs):
        with fs.open(str(path), "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    digest = h.hexdigest()
    remember(path, digest)
    return digest


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a local file, computed once per (path, size, mtime, inode)."""
    path = os.path.realpath(path)
    st = os.stat(path)
    sig = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _memo.get(sig) or _db_get(sig)
    if digest is None:
        digest = sha256_file(path)  # remembers it
    else:
        _memo[sig] = digest
    return digest


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record a digest just computed from the bytes (so the next look-up is free)."""
    path = os.path.realpath(path)
    st = os.stat(path)
    sig = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    _memo[sig] = digest
    _db_put(sig, digest)


def tree_digest(files: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """16 hex digits over (name, content digest) pairs: the identity of a set of files."""
    h = hashlib.sha256()
    for name, path in files:
        h.update(f"{name}\0{file_digest(path)}\n".encode())
    return h.hexdigest()[:16]


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every file under a folder, sorted: what tree_digest takes."""
    return [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]


# --------------------------------------------------------------------------- persistence


def _conn() -> sqlite3.Connection | None:
    target = os.environ.get(CACHE_ENV)
    if not target:
        return None
    if target not in _db:
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(target, timeout=5, check_same_thread=False, isolation_level=None)
            con.execute(
                "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                "mtime_ns INTEGER, ino INTEGER, sha256 TEXT)"
            )
            _db[target] = con
        except (sqlite3.Error, OSError) as e:
            log.debug("digest cache %s unusable (%s): hashing without it", target, e)
            _db[target] = None
    return _db[target]


def _db_get(sig: tuple) -> str | None:
    with _lock:
        con = _conn()
        if con is None:
            return None
        try:
            row = con.execute("SELECT size, mtime_ns, ino, sha256 FROM digests WHERE path = ?",
                              (sig[0],)).fetchone()
        except sqlite3.Error:
            return None
    return row[3] if row is not None and tuple(row[:3]) == sig[1:] else None


def _db_put(sig: tuple, digest: str) -> None:
    with _lock:
        con = _conn()
        if con is None:
            return
        try:
            con.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", (*sig, digest))
        except sqlite3.Error as e:  # a full disk or a locked file: the cache is only a saving
            log.debug("digest cache write failed: %s", e)


def _is_local(fs: Any) -> bool:
    p = fs.protocol
    return "file" in ((p,) if isinstance(p, str) else tuple(p))
