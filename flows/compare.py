"""The paper's comparison: one ingest and analysis, then for each method (full,
randomized, pose, longrecipe) its samples, training and evaluation with the same
number of samples and optimizer steps (so the same number of target windows
covered), then one report of scores and training cost relative to full-length
training. Shared stages have the same keys, so they are computed once.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.pipeline import analysis_tasks
from longrecipe.anneal import replay_build_config
from longrecipe.artifacts import ArtifactStore
from longrecipe.config import PipelineConfig, RuntimeConfig, load_config
from tasks import stages


def _run_name() -> str:
    p = flow_run.parameters
    return "compare " + Path(str(p.get("config", "run"))).stem


@flow(name="longrecipe-compare", flow_run_name=_run_name, log_prints=True)
def compare(
    config: str,
    overrides: list[str] | None = None,
    store: str | None = None,
    device: str = "auto",
) -> dict[str, dict]:
    """Compare the methods in `compare.methods` on the recipe in CONFIG."""
    cfg = load_config(config, overrides or [])
    return compare_methods(cfg, ArtifactStore(store).root, RuntimeConfig(device=device))


def compare_methods(cfg: PipelineConfig, store: str, runtime: RuntimeConfig) -> dict[str, dict]:
    t = stages.for_store(store)
    common = dict(store=store, runtime=runtime)
    out: dict[str, dict] = {"ingest": t["ingest"](cfg.ingest, cfg.model, **common)}
    if "longrecipe" in cfg.compare.methods:
        out.update(analysis_tasks(t, cfg, out["ingest"], common))
    evaluations = [t["evaluate"].with_options(task_run_name="evaluate-base")(
        cfg.evaluate, {"base": cfg.model}, out["ingest"], **common)]
    trainings = {}
    replay = None
    for method in cfg.compare.methods:
        bcfg = cfg.build.model_copy(update={"method": method})
        analysis = out.get("analyze") if method == "longrecipe" else None
        samples = t["build"].with_options(task_run_name=f"build-{method}")(bcfg, out["ingest"], analysis, **common)
        model = t["train"].with_options(task_run_name=f"train-{method}")(cfg.train, samples, cfg.model, **common)
        trainings[method] = model
        if cfg.compare.through == "merge":
            if replay is None:
                replay = t["build"].with_options(task_run_name="build-replay")(
                    replay_build_config(cfg), out["ingest"], None, **common)
            annealed = t["anneal"].with_options(task_run_name=f"anneal-{method}")(cfg.anneal, model, replay, **common)
            model = t["merge"].with_options(task_run_name=f"merge-{method}")(cfg.merge, cfg.model, annealed, **common)
        out[f"samples-{method}"], out[f"model-{method}"] = samples, model
        evaluations.append(t["evaluate"].with_options(task_run_name=f"evaluate-{method}")(
            cfg.evaluate, {method: model}, out["ingest"], **common))
    out["evaluations"] = evaluations
    out["report"] = t["report"](cfg.report, evaluations, trainings, store, title=f"{cfg.name}: method comparison")
    return out


if __name__ == "__main__":
    import sys

    print(compare(sys.argv[1], sys.argv[2:]))
