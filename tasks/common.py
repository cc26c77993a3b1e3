"""What every stage task shares: the cache key (our stage key), retry rule, ref passing,
and the Prefect artifact that summarises a stage.

Prefect's default cache policies hash a path as text and see only a task's own
source (PREFECT_NOTES.md), so the cache key is the stage's content key (which holds
the content identity of every input file), and a key whose artifact is missing or
fails its check is turned into a miss. The check of a hit is the cheap one (manifest,
file sizes and mtimes: `ArtifactStore.check`); `longrecipe artifacts verify` rehashes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec
from longrecipe.errors import InputError, is_disk_full

RefDict = dict[str, str]
"""How an artifact travels between tasks (JSON-serialisable): stage, key, uri."""


def results_dir(store_root: str) -> Path:
    """Prefect's persisted task results (JSON, tiny) live beside the artifacts."""
    return Path(store_root) / "_prefect" / "results"


def ref_dict(ref: ArtifactRef) -> RefDict:
    return {"stage": ref.stage, "key": ref.key, "uri": ref.uri}


def load_ref(store: ArtifactStore, ref: RefDict | None) -> ArtifactRef | None:
    return None if ref is None else store.require(ref["stage"], ref["key"])


def stage_cache_key(spec_of: Callable[[ArtifactStore, dict[str, Any]], StageSpec]):
    """A cache_key_fn returning `<stage>-<key>`; an artifact that is missing or fails its
    check first has its stale Prefect record removed, so the task runs."""

    def key_fn(context, parameters: dict[str, Any]) -> str:
        store = ArtifactStore(parameters["store"])
        spec = spec_of(store, parameters)
        cache_key = f"{spec.stage}-{spec.key}"
        record = results_dir(parameters["store"]) / cache_key
        ref = store.load(spec.stage, spec.key)
        problems = ["missing"] if ref is None else store.check(ref)
        if problems and record.exists():
            _log(f"{spec.stage}/{spec.key}: cached result dropped, artifact "
                 f"{'; '.join(problems)}: recomputing")
            record.unlink()
        return cache_key

    return key_fn


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry failures that can pass (I/O, memory, interruptions), never bad input and
    never a full disk (the same call would fail the same way)."""
    try:
        state.result(raise_on_failure=True)
    except (InputError, InjectedFailure):
        return False
    except Exception as e:
        return not is_disk_full(e)
    return False


def stage_task_options(spec_of) -> dict[str, Any]:
    return dict(
        cache_key_fn=stage_cache_key(spec_of),
        persist_result=True,
        result_serializer="json",
        retries=1,
        retry_delay_seconds=2,
        retry_condition_fn=retry_unless_bad_input,
    )


def summarize(ref: ArtifactRef) -> None:
    """One Markdown Prefect artifact per stage: key, rows, sizes, time, folder."""
    m = ref.manifest
    size = sum(f["size"] for f in m["files"])
    rows = "\n".join(
        f"| {t} | {v['rows']:,} | {v['parts']} | {v['bytes']:,} |" for t, v in m.get("tables", {}).items()
    )
    info = "\n".join(f"- **{k}**: {v}" for k, v in sorted(m.get("info", {}).items()) if not isinstance(v, dict | list))
    md = (
        f"# {ref.stage} `{ref.key}`\n\n"
        f"- folder: [{ref.uri}](file://{ref.uri})\n- stage version: {m['stage_version']}\n"
        f"- seconds: {m['timings']['seconds']}\n- resumed parts: {m['timings'].get('resumed_parts', 0)}\n"
        f"- files: {len(m['files'])}, {size:,} bytes\n- code: {m['code_version']}\n\n"
        + (f"| table | rows | parts | bytes |\n|---|---|---|---|\n{rows}\n\n" if rows else "")
        + info
    )
    try:
        create_markdown_artifact(md, key=f"{ref.stage}-{ref.key}", description=f"{ref.stage} {ref.key}")
    except Exception as e:  # an artifact is a nicety; never fail a stage for it
        _log(f"could not create Prefect artifact: {e}")


def _log(msg: str) -> None:
    try:
        get_run_logger().warning(msg)
    except Exception:
        import logging

        logging.getLogger("longrecipe").warning(msg)


class InjectedFailure(RuntimeError):
    """Raised once by `RuntimeConfig.fail_once_at` (resume tests). Never retried."""


def maybe_fail(stage: str, store_root: str, runtime) -> None:
    """Raise once for the named stage: a marker file in the store remembers it happened."""
    if getattr(runtime, "fail_once_at", None) != stage:
        return
    marker = Path(store_root) / "_prefect" / f"failed-once-{stage}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("injected failure happened\n")
        raise InjectedFailure(f"injected failure in stage {stage} (runtime.fail_once_at)")
