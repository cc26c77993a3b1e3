"""What every stage task shares: the cache key (our stage key), retry rule, ref passing,
progress in the run log, and the hook that republishes a reused stage's artifact
(tasks/publish.py makes the artifacts).

Prefect's default cache policies hash a path as text and see only a task's own
source (PREFECT_NOTES.md), so the cache key is the stage's content key (which holds
the content identity of every input file), and a key whose artifact is missing or
fails its check is turned into a miss. The check of a hit is the cheap one (manifest,
file sizes and mtimes: `ArtifactStore.check`); `longrecipe artifacts verify` rehashes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger

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
    from tasks.publish import when_cached

    return dict(
        cache_key_fn=stage_cache_key(spec_of),
        persist_result=True,
        result_serializer="json",
        retries=1,
        retry_delay_seconds=2,
        retry_condition_fn=retry_unless_bad_input,
        on_completion=[when_cached],
    )


@contextlib.contextmanager
def stage_progress() -> Iterator[None]:
    """Around a stage's library call: its progress lines also go to the run log (to
    Prefect's API only; the terminal already shows the bar or the plain lines), and
    Hugging Face's own bars stay off."""
    from longrecipe.progress import progress_lines, quiet_hf

    with progress_lines(_progress_logger().info), quiet_hf():
        yield


def _progress_logger() -> logging.Logger:
    """`longrecipe.progress`: INFO records to Prefect's API handler alone (no console), so
    the UI's run log shows progress whatever PREFECT_LOGGING_LEVEL the console has."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("longrecipe.progress")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _log(msg: str) -> None:
    try:
        get_run_logger().warning(msg)
    except Exception:
        import logging

        logging.getLogger("longrecipe").warning(msg)


class InjectedFailure(RuntimeError):
    """Raised once by FAIL_ONCE_ENV (resume tests). Never retried."""


FAIL_ONCE_ENV = "LONGRECIPE_FAIL_ONCE_AT"
"""Testing aid, read by the task layer only (never a flow parameter): the stage named in
this environment variable raises once; a marker file in the store remembers it did."""


def maybe_fail(stage: str, store_root: str) -> None:
    """Raise once for the stage named in $LONGRECIPE_FAIL_ONCE_AT."""
    if os.environ.get(FAIL_ONCE_ENV) != stage:
        return
    marker = Path(store_root) / "_prefect" / f"failed-once-{stage}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("injected failure happened\n")
        raise InjectedFailure(f"injected failure in stage {stage} ({FAIL_ONCE_ENV})")
