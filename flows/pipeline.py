"""The LongRecipe pipeline as a Prefect flow:
ingest -> analyze -> build -> train -> anneal -> merge -> evaluate -> report.

Each stage is a task whose cache key is the stage's content key, so a rerun
(or `prefect flow-run retry`) finds finished stages Cached and resumes the
unfinished one from its last part or checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from longrecipe.anneal import replay_build_config
from longrecipe.artifacts import ArtifactStore
from longrecipe.config import PipelineConfig, RuntimeConfig, load_config
from tasks import publish, stages

STAGES = stages.STAGES


def _run_name() -> str:
    p = flow_run.parameters
    name = Path(str(p.get("config", "run"))).stem
    overrides = p.get("overrides") or []
    return name + (f" [{', '.join(overrides)}]" if overrides else "")


@flow(name="longrecipe-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(
    config: str,
    overrides: list[str] | None = None,
    store: str | None = None,
    until: str | None = None,
    device: str = "auto",
) -> dict[str, dict]:
    """Run a LongRecipe recipe: ingest, analyze, build, train, anneal, merge, evaluate, report.

    Finished stages are reused from the store (Cached); an unfinished one resumes from
    its last finished part or checkpoint.

    Args:
        config: Recipe file (YAML), relative to the project folder, e.g. configs/demo.yaml.
        overrides: Fields to change, each `key.path=value`, e.g. ["train.optim.max_steps=8"].
        store: Artifact store root; empty: the worker's LONGRECIPE_STORE, else data/artifacts.
        until: Stop after this stage (ingest, analyze, build, train, anneal, merge, evaluate, report).
        device: Where models run: auto (CUDA when there is one), cpu, cuda or cuda:N.
    """
    cfg = load_config(config, overrides or [])
    return run_stages(cfg, ArtifactStore(store).root, RuntimeConfig(device=device), until)


def run_stages(cfg: PipelineConfig, store: str, runtime: RuntimeConfig, until: str | None = None) -> dict[str, dict]:
    """Wire the stage tasks; returns every finished stage's artifact (stage, key, uri)."""
    last = STAGES.index(until) if until else len(STAGES) - 1
    t = stages.for_store(store)
    out: dict[str, dict] = {}
    common = dict(store=store, runtime=runtime)
    method = cfg.build.method

    def about(what: str | None = None) -> dict:
        return publish.about(cfg.name, cfg.model.source, what)

    out["ingest"] = t["ingest"](cfg.ingest, cfg.model, **common, about=about())
    if last >= 1:
        out.update(analysis_tasks(t, cfg, out["ingest"], common, about))
    if last >= 2:
        analysis = out["analyze"] if method == "longrecipe" else None
        out["build"] = t["build"](cfg.build, out["ingest"], analysis, **common, about=about(method))
    if last >= 3:
        weights_from = out["analyze"] if cfg.train.loss_weights else None  # LongCE
        out["train"] = t["train"](cfg.train, out["build"], cfg.model, **common, about=about(method),
                                  analysis=weights_from)
    if last >= 4:
        replay_docs = out["ingest"]
        if cfg.anneal.replay.sources:
            replay_docs = t["ingest"].with_options(task_run_name="ingest-replay")(
                cfg.anneal.replay, cfg.model, **common, about=about("replay")
            )
        out["replay"] = t["build"].with_options(task_run_name="build-replay")(
            replay_build_config(cfg), replay_docs, None, **common, about=about("replay")
        )
        out["anneal"] = t["anneal"](cfg.anneal, out["train"], out["replay"], **common, about=about(method))
    if last >= 5:
        out["merge"] = t["merge"](cfg.merge, cfg.model, out["anneal"], **common, about=about(method))
    if last >= 6:
        models = {"base": cfg.model, "merged": out["merge"]}
        out["evaluate"] = t["evaluate"](cfg.evaluate, models, out["ingest"], **common, about=about())
    if last >= 7:
        trainings = {"train": out["train"], "anneal": out["anneal"]}
        out["report"] = t["report"](cfg.report, [out["evaluate"]], trainings, store,
                                    title=f"{cfg.name} report", about=about())
    return out


def analysis_tasks(t: dict, cfg: PipelineConfig, documents: dict, common: dict,
                   about: Callable[[str | None], dict]) -> dict[str, dict]:
    """The analyze task, after H' is made (build and train tasks, cached like any stage)
    when analyze.reference_training is set. `about(method)` names what each task made."""
    out: dict[str, dict] = {}
    rt = cfg.analyze.reference_training
    if cfg.analyze.method == "logit_delta" and rt is not None:
        out["reference_build"] = t["build"].with_options(task_run_name="build-reference")(
            rt.build, documents, None, **common, about=about("reference"))
        out["reference"] = t["train"].with_options(task_run_name="train-reference")(
            rt.train, out["reference_build"], cfg.model, **common, about=about("reference"))
    out["analyze"] = t["analyze"](cfg.analyze, documents, cfg.model, reference=out.get("reference"),
                                  **common, about=about(None))
    return out


def run_pipeline(cfg_path: str | Path, overrides: list[str] | None = None, store: str | None = None,
                 until: str | None = None, device: str = "auto") -> dict[str, dict]:
    """Entry point of `longrecipe run`: the flow on the temporary local API."""
    return pipeline(config=str(cfg_path), overrides=list(overrides or []), store=store, until=until,
                    device=device)


if __name__ == "__main__":
    import sys

    print(run_pipeline(sys.argv[1], sys.argv[2:]))
