"""What a stage shows in Prefect's UI.

Every stage publishes one Markdown artifact whose key and description name the recipe,
the method and the model (`demo-train-longrecipe`: recipe demo, stage train, method
LongRecipe), so the Artifacts page reads as a list of what was made; an evaluation adds
its score table, and the report is published with its figures embedded (the UI cannot
read the store). When a rerun reuses a stage (Cached), the same artifact is published
again, marked reused, so the rerun's Artifacts tab lists everything it used.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from longrecipe.artifacts import ArtifactRef, ArtifactStore

About = dict[str, str]
"""What a task's artifact is about: recipe (name), method (or model label), model (base)."""

STAGE_TITLES = {
    "ingest": "Documents", "analyze": "Impactful-token analysis", "build": "Training samples",
    "train": "Stage 0 (extension) training", "anneal": "Stage 1 annealing",
    "merge": "Stage 2 merge", "evaluate": "Evaluation", "report": "Report",
}
METHODS = {"full": "full-length (FLT)", "randomized": "randomized (RPES)", "pose": "PoSE",
           "longrecipe": "LongRecipe", "replay": "replay for annealing",
           "reference": "H' (the analysis's reference training)"}


def about(recipe: str, model: str, method: str | None = None) -> About:
    """The `about` a flow passes to a task: recipe name, base model name, method or label."""
    name = Path(model).name if model != "tiny" else "tiny"
    return {"recipe": recipe, "model": Path(name).stem if name.endswith(".gguf") else name,
            **({"method": method} if method else {})}


def artifact_key(kind: str, about: About | None) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes): recipe-kind-method.
    The same key in a later run is a new version of the same thing."""
    a = about or {}
    raw = "-".join(x for x in (a.get("recipe", "longrecipe"), kind, a.get("method")) if x)
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", raw.lower())).strip("-") or kind


def title(ref: ArtifactRef, about: About | None) -> str:
    """E.g. 'Stage 0 (extension) training, LongRecipe: recipe demo, model passkey-llama'."""
    a = about or {}
    method = a.get("method") or ref.manifest.get("config", {}).get("method")
    what = STAGE_TITLES.get(ref.stage, ref.stage)
    if method:
        what += f", {METHODS.get(method, method)}"
    where = [f"recipe {a['recipe']}"] if a.get("recipe") else []
    where += [f"model {a['model']}"] if a.get("model") else []
    return what + (": " + ", ".join(where) if where else "")


def publish_summary(ref: ArtifactRef, about: About | None, reused: bool = False) -> None:
    """One Markdown artifact per stage: what it is, key, rows, sizes, time, where."""
    m = ref.manifest
    size = sum(f["size"] for f in m["files"])
    rows = "\n".join(
        f"| {t} | {v['rows']:,} | {v['parts']} | {v['bytes']:,} |" for t, v in m.get("tables", {}).items()
    )
    info = "\n".join(f"- **{k}**: {v}" for k, v in sorted(m.get("info", {}).items())
                     if not isinstance(v, dict | list))
    store = str(Path(ref.uri).parent.parent)
    md = (
        f"# {title(ref, about)}\n\n" + (_reused_line(ref) if reused else "")
        + f"- artifact: `{ref.stage}/{ref.key}` in the store `{store}` "
        f"(`longrecipe artifacts show {ref.key} --store {store}`)\n"
        f"- stage version: {m['stage_version']}\n- created: {m.get('created_at', '?')}\n"
        f"- seconds: {m['timings']['seconds']}\n- resumed parts: {m['timings'].get('resumed_parts', 0)}\n"
        f"- files: {len(m['files'])}, {size:,} bytes\n- code: {m['code_version']}\n\n"
        + (f"| table | rows | parts | bytes |\n|---|---|---|---|\n{rows}\n\n" if rows else "")
        + info
    )
    _markdown(md, artifact_key(ref.stage, about), _description(ref, about, reused))


def publish_evaluation(ref: ArtifactRef, about: About | None, reused: bool = False) -> None:
    """The summary, and a table artifact of the mean score per model, suite and length."""
    from prefect.artifacts import create_table_artifact

    from longrecipe.report import score_table

    publish_summary(ref, about, reused)
    try:
        create_table_artifact(score_table(ref), key=artifact_key("scores", about),
                              description=_description(ref, about, reused, "Scores of "))
    except Exception as e:  # a nicety, never a failure
        _warn(f"could not create the score table artifact: {e}")


def publish_report(ref: ArtifactRef, about: About | None, reused: bool = False) -> None:
    """The report's Markdown with its figures embedded (data URIs): the UI shows them."""
    from longrecipe.report import embedded_markdown

    files = ref.path / "files"
    md = embedded_markdown((files / "report.md").read_text(), files)
    note = _reused_line(ref) if reused else ""
    where = (f"\n\n---\nStore: `{Path(ref.uri).parent.parent}`; this page is "
             f"`report/{ref.key}/files/report.md` (also `report.html`, self-contained).\n")
    head, _, rest = md.partition("\n")
    _markdown(head + "\n\n" + note + rest + where, artifact_key("report", about),
              _description(ref, about, reused))


PUBLISH = {"evaluate": publish_evaluation, "report": publish_report}
"""Stages whose artifact is more than the summary."""


def when_cached(task, task_run, state) -> None:
    """on_completion hook of every stage task: a reused (Cached) stage publishes its
    artifact again, marked reused, so a cached rerun links what it used."""
    if state.name != "Cached":
        return
    try:
        from prefect.runtime import task_run as current

        params = current.parameters
        ref_dict = state.result()
        ref = ArtifactStore(params["store"]).require(ref_dict["stage"], ref_dict["key"])
        PUBLISH.get(ref.stage, publish_summary)(ref, params.get("about"), reused=True)
    except Exception as e:  # never fail a run for its artifacts
        _warn(f"could not republish a reused artifact: {e}")
        return
    _log(logging.INFO, f"reused {ref.stage}/{ref.key} (made {ref.manifest.get('created_at', '?')}); its "
                       f"artifact {artifact_key(ref.stage, params.get('about'))} is published again, marked reused")


class QuietHook(logging.Filter):
    """Drops Prefect's two INFO lines around `when_cached` ("Running hook ..." and "Hook
    ... finished running successfully"): every stage task runs the hook, so they were two
    of the three lines Prefect logs per stage. Its errors still pass, and a reused stage
    logs its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"'{when_cached.__name__}'" not in record.getMessage()


def quiet_hook_lines() -> None:
    """Install QuietHook on Prefect's task-run logger (once; Prefect's logging setup keeps
    a logger's filters)."""
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, QuietHook) for f in logger.filters):
        logger.addFilter(QuietHook())


quiet_hook_lines()


def _description(ref: ArtifactRef, about: About | None, reused: bool, what: str = "") -> str:
    """'Reused (Cached): ' first where reused (the card's first words), then what it is."""
    info = ref.manifest.get("info", {})
    facts = []
    if ref.stage in ("train", "anneal") and "steps" in info:
        facts.append(f"{info['steps']} steps")
    for t, v in ref.manifest.get("tables", {}).items():
        if t in ("documents", "samples", "eval_results"):
            facts.append(f"{v['rows']:,} {t.replace('_', ' ')}")
    facts.append(f"{ref.manifest['timings']['seconds']:.0f} s")
    return (("Reused (Cached): " if reused else "") + f"{what}**{title(ref, about)}**. " + ", ".join(facts)
            + f"; `{ref.stage}/{ref.key}`")


def _reused_line(ref: ArtifactRef) -> str:
    return (f"> Reused: this run found the stage's artifact finished (Cached) and did not recompute "
            f"it; it was made at {ref.manifest.get('created_at', '?')}.\n\n")


def _markdown(md: str, key: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(md, key=key, description=description)
    except Exception as e:  # an artifact is a nicety; never fail a stage for it
        _warn(f"could not create Prefect artifact {key}: {e}")


def _warn(msg: str) -> None:
    _log(logging.WARNING, msg)


def _log(level: int, msg: str) -> None:
    """To the run log where there is a run, else to `longrecipe`."""
    try:
        from prefect import get_run_logger

        logger = get_run_logger()
    except Exception:
        logger = logging.getLogger("longrecipe")
    logger.log(level, msg)
