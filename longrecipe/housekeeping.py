"""What a store holds besides finished artifacts: `artifacts verify` reports all of it,
`artifacts gc` cleans what is safe to clean.

Each entry of a stage folder is one of

    <key>             an artifact (valid manifest), else a broken folder
    <key>.partial     work of a run that did not finish (finished parts: resume state)
    <key>.scratch     resume state (training checkpoints)
    <key>.lock        the key's lock file
    <key>.tmp-*       a commit of the previous store layout that a kill interrupted
    <key>.corrupt-*   quarantined: failed its check, recomputed since
    <key>.broken-*    quarantined: no valid manifest

and anything else is stray; `_` folders at the root (Prefect's results, the digest
cache) are not stages. gc never deletes the only copy of finished parts or weights
unless told by name: it removes fragments of killed writes, leftovers of keys that
finished since, empty folders and stale locks, quarantines broken and corrupt folders,
and with `partial=True` drops the resume state of unfinished keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from longrecipe.artifacts import MANIFEST, ArtifactError
from longrecipe.durable import FRAGMENT
from longrecipe.errors import InputError

if TYPE_CHECKING:
    from longrecipe.artifacts import ArtifactStore

# Kinds of finding; the first two are healthy states, the rest make `verify` fail.
OK, UNFINISHED = "ok", "unfinished"
HEALTHY = (OK, UNFINISHED, "in use")


@dataclass(frozen=True)
class Finding:
    """One entry of the store and what it is."""

    path: str
    """Relative to the store root: `<stage>/<entry>` (or a file inside an artifact)."""
    kind: str
    """ok, unfinished, in use, corrupt, broken, fragment, leftover, interrupted, quarantined, stray."""
    detail: str = ""

    @property
    def healthy(self) -> bool:
        return self.kind in HEALTHY


@dataclass(frozen=True)
class GcAction:
    """What gc did (or would do) with one entry: remove, quarantine or keep (and why)."""

    action: str
    path: str
    detail: str = ""


def audit(store: ArtifactStore, *, deep: bool = True) -> list[Finding]:
    """Every entry under the store with what it is; deep=True rehashes every artifact's files
    (`verify`), deep=False checks sizes and mtimes only (gc)."""
    out: list[Finding] = []
    fs, root = store.fs, store.root
    for top in sorted(fs.ls(root, detail=False)):
        name = _base(top)
        if name.startswith(("_", ".")):
            continue
        if not fs.isdir(top):
            out.append(Finding(name, "stray", "a file at the store root"))
            continue
        entries = sorted(_base(e) for e in fs.ls(top, detail=False))
        finished = {e for e in entries if "." not in e and store.load(name, e) is not None}
        for entry in entries:
            out += _classify(store, name, entry, finished, deep)
    return out


def _classify(store: ArtifactStore, stage: str, entry: str, finished: set[str], deep: bool) -> list[Finding]:
    rel, key = f"{stage}/{entry}", entry.split(".")[0]
    if "." not in entry:
        return _artifact(store, stage, key, deep)
    if entry.endswith(".lock"):
        return []
    if store.is_locked(stage, key):
        return [Finding(rel, "in use", "a run holds this key's lock")]
    if key in finished and (entry.endswith((".partial", ".scratch")) or ".tmp-" in entry):
        return [Finding(rel, "leftover", f"{stage}/{key} is finished; this copy is redundant")]
    if entry.endswith((".partial", ".scratch")):
        folder = f"{store.root}/{rel}"
        fragments = [Finding(p[len(store.root) + 1 :], "fragment", "temp file of a killed write")
                     for p in store.fs.find(folder) if FRAGMENT in p[len(folder):]]
        return [Finding(rel, UNFINISHED, "resume state of a run that did not finish "
                                         "(the next run resumes from it; `gc --partial` drops it)"),
                *fragments]
    if ".tmp-" in entry:
        return [Finding(rel, "interrupted", "a commit killed midway; the next run resumes from it")]
    if ".corrupt-" in entry or ".broken-" in entry:
        return [Finding(rel, "quarantined", f"kept for inspection; `longrecipe artifacts gc {rel}` "
                                            "removes it")]
    return [Finding(rel, "stray", "not an artifact, resume state or lock of this store")]


def _artifact(store: ArtifactStore, stage: str, key: str, deep: bool) -> list[Finding]:
    rel, folder = f"{stage}/{key}", store.dir(stage, key)
    ref = store.load(stage, key)
    if ref is None:
        if not store.fs.exists(f"{folder}/{MANIFEST}"):
            why = "no manifest.json"
        else:
            why = "manifest.json unreadable, of another format or of another key"
        n = len(store.fs.find(folder))
        return [Finding(rel, "broken", f"{why} ({n} files); not an artifact")]
    out = []
    problems = store.verify(ref) if deep else store.check(ref)
    out.append(Finding(rel, "corrupt", "; ".join(problems)) if problems else Finding(rel, OK))
    listed = {f["path"] for f in ref.manifest["files"]} | {MANIFEST}
    for p in store.fs.find(folder):
        inner = p[len(folder) + 1 :]
        if inner in listed:
            continue
        if FRAGMENT in inner:
            out.append(Finding(f"{rel}/{inner}", "fragment", "temp file of a killed write"))
        else:
            out.append(Finding(f"{rel}/{inner}", "stray", "a file the manifest does not list"))
    return out


def gc(store: ArtifactStore, *, partial: bool = False, dry_run: bool = False,
       names: list[str] | None = None) -> list[GcAction]:
    """Clean the store (see the module docstring); `names` removes exactly those entries."""
    if names:
        return [_remove(store, _named(store, n), "named", dry_run) for n in names]
    actions = []
    for f in audit(store, deep=False):
        path = f"{store.root}/{f.path}"
        if f.kind in ("leftover", "fragment") or (partial and f.kind in (UNFINISHED, "interrupted")):
            actions.append(_remove(store, path, f.detail, dry_run))
        elif f.kind in ("broken", "corrupt"):
            if dry_run:
                actions.append(GcAction("quarantine", path, f.detail))
            else:
                aside = store.set_aside(path, f.kind, [f.detail])
                actions.append(GcAction("quarantine", path, f"-> {aside}") if aside
                               else GcAction("remove", path, "empty"))
        elif f.kind in ("interrupted", "quarantined") and not store.fs.find(path):
            actions.append(_remove(store, path, "empty", dry_run))
        elif not f.healthy:
            actions.append(GcAction("keep", path, f"{f.kind}: {f.detail}"))
    actions += _stale_locks(store, dry_run)
    return actions


def _stale_locks(store: ArtifactStore, dry_run: bool) -> list[GcAction]:
    """Lock files of keys that are finished or have nothing left, and that no one holds."""
    out = []
    for lock in store.fs.glob(f"{store.root}/*/*.lock"):
        stage, name = lock.split("/")[-2:]
        key = name[: -len(".lock")]
        if stage.startswith(("_", ".")) or store.is_locked(stage, key):
            continue
        rest = [p for p in store.fs.glob(f"{store.root}/{stage}/{key}.*") if not p.endswith(".lock")]
        if store.load(stage, key) is not None or not rest:
            out.append(_remove(store, lock, "stale lock", dry_run))
    return out


def _named(store: ArtifactStore, name: str) -> str:
    """An entry named on the command line: `<stage>/<entry>` or a path inside the store."""
    root = os.path.realpath(store.root) if store.is_local else store.root
    path = os.path.realpath(name) if store.is_local and os.path.isabs(name) else f"{root}/{name.strip('/')}"
    path = os.path.normpath(path)
    rel = path[len(root) + 1 :] if path.startswith(root + "/") else None
    if rel is None or rel.count("/") != 1 or rel.startswith(("_", ".")):
        raise InputError(f"gc {name}: name an entry of a stage folder, as `<stage>/<entry>` "
                         f"under {store.root}")
    if not store.fs.exists(path):
        raise InputError(f"gc {name}: no such entry under {store.root}")
    return path


def _remove(store: ArtifactStore, path: str, why: str, dry_run: bool) -> GcAction:
    if not dry_run:
        try:
            store.fs.rm(path, recursive=store.fs.isdir(path))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ArtifactError(f"cannot remove {path}: {e}") from None
    return GcAction("remove", path, why)


def _base(p: str) -> str:
    return p.rstrip("/").split("/")[-1]
