"""The paper's comparison: one ingest and analysis, then for each method (full,
randomized, pose, longrecipe) its samples, training and evaluation with the same
number of samples and optimizer steps (so the same number of target windows
covered), or at equal training FLOPs (`compare.flops_of`, or steps by hand with
`compare.steps`: longrecipe.budget), then one report of scores and training cost
relative to full-length training. Shared stages have the same keys, so they are
computed once.

The branches (the base model's evaluation, then one per method) run through
Prefect's ThreadPoolTaskRunner, as many at a time as `compare.devices` names
devices, each branch on a device of its own (longrecipe.devices); with one device
they run one after another, in order. Where a branch ran never changes what it
made: same keys, same tables (docs/architecture.md, "Concurrent comparison").
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import analysis_tasks
from longrecipe.anneal import replay_build_config
from longrecipe.artifacts import ArtifactStore
from longrecipe.budget import method_budgets, method_config
from longrecipe.config import PipelineConfig, RuntimeConfig, load_config
from longrecipe.devices import DeviceSlots, branch_devices
from tasks import publish, stages


def _run_name() -> str:
    p = flow_run.parameters
    overrides = p.get("overrides") or []
    return ("compare " + Path(str(p.get("config", "run"))).stem
            + (f" [{', '.join(overrides)}]" if overrides else ""))


@flow(name="longrecipe-compare", flow_run_name=_run_name, log_prints=True)
def compare(
    config: str,
    overrides: list[str] | None = None,
    store: str | None = None,
    device: str = "auto",
) -> dict[str, dict]:
    """Compare extension methods on one recipe: full-length, RPES, PoSE, LongRecipe.

    One ingest and analysis, then each method in the recipe's `compare.methods` with the
    same samples and steps, evaluated, and one report of scores and training cost
    relative to full-length training.

    Args:
        config: Recipe file (YAML), relative to the project folder, e.g. configs/demo.yaml.
        overrides: Fields to change, each `key.path=value`, e.g. ["compare.methods=[full, longrecipe]"].
        store: Artifact store root; empty: the worker's LONGRECIPE_STORE, else data/artifacts.
        device: Where the shared stages run: auto (CUDA when there is one), cpu, cuda or cuda:N;
            the branches use the recipe's compare.devices.
    """
    cfg = load_config(config, overrides or [])
    return compare_methods(cfg, ArtifactStore(store).root, RuntimeConfig(device=device))


def compare_methods(cfg: PipelineConfig, store: str, runtime: RuntimeConfig) -> dict[str, dict]:
    t = stages.for_store(store)
    common = dict(store=store, runtime=runtime)

    def about(what: str | None = None) -> dict:
        return publish.about(cfg.name, cfg.model.source, what)

    out: dict[str, dict] = {"ingest": t["ingest"](cfg.ingest, cfg.model, **common, about=about())}
    if "longrecipe" in cfg.compare.methods or cfg.train.loss_weights:
        out.update(analysis_tasks(t, cfg, out["ingest"], common, about))
    replay = None
    if cfg.compare.through == "merge":
        replay = t["build"].with_options(task_run_name="build-replay")(
            replay_build_config(cfg), out["ingest"], None, **common, about=about("replay"))
    slots = DeviceSlots(branch_devices(cfg.compare.devices, runtime.device))
    shared = dict(cfg=cfg, store=store, runtime=runtime, slots=slots, documents=out["ingest"],
                  analysis=out.get("analyze"), replay=replay)
    names = ["base", *cfg.compare.methods]
    # each method's own recipe (its build method, samples and steps), made here and not in
    # the branch threads: reading the model's shape may build a tokenizer, and
    # transformers' lazy imports are not safe in two threads at once
    budgets = method_budgets(cfg)
    recipes = {m: method_config(cfg, m, budgets[m]) for m in cfg.compare.methods}
    with ThreadPoolTaskRunner(max_workers=len(slots.devices)) as runner:
        futures = [runner.submit(branch.with_options(task_run_name=f"branch-{name}"),
                                 {"name": name, **shared, "cfg": recipes.get(name, cfg)})
                   for name in names]
        done = dict(zip(names, (f.result() for f in futures), strict=True))
    for method in cfg.compare.methods:
        out[f"samples-{method}"], out[f"model-{method}"] = done[method]["samples"], done[method]["model"]
    out["evaluations"] = [done[name]["evaluation"] for name in names]
    trainings = {method: done[method]["trained"] for method in cfg.compare.methods}
    out["report"] = t["report"](cfg.report, out["evaluations"], trainings, store,
                                title=f"{cfg.name}: method comparison", about=about("comparison"))
    return out


@task(name="branch", cache_policy=NO_CACHE, persist_result=False)
def branch(name: str, cfg: PipelineConfig, store: str, runtime: RuntimeConfig, slots: DeviceSlots,
           documents: dict, analysis: dict | None, replay: dict | None) -> dict[str, dict]:
    """One branch on a free device: the base model's evaluation (`base`), or one method's
    samples, training (annealing and merging) and evaluation, `cfg` being that method's
    recipe (longrecipe.budget.method_config). Each stage is its own cached task."""
    t = stages.for_store(store)
    about = publish.about(cfg.name, cfg.model.source, name)
    with slots.take() as device:
        # concurrent branches are threads of this process: training runs in its own
        rt = runtime.model_copy(update={"device": device, "isolated": slots.concurrent})
        common = dict(store=store, runtime=rt, about=about)
        at = f" [{device}]" if slots.concurrent else ""
        if name == "base":
            return {"evaluation": t["evaluate"].with_options(task_run_name=f"evaluate-base{at}")(
                cfg.evaluate, {"base": cfg.model}, documents, **common)}
        samples = t["build"].with_options(task_run_name=f"build-{name}{at}")(
            cfg.build, documents, analysis if name == "longrecipe" else None, **common)
        model = trained = t["train"].with_options(task_run_name=f"train-{name}{at}")(
            cfg.train, samples, cfg.model, **common,
            analysis=analysis if cfg.train.loss_weights else None)
        if cfg.compare.through == "merge":
            annealed = t["anneal"].with_options(task_run_name=f"anneal-{name}{at}")(
                cfg.anneal, trained, replay, **common)
            model = t["merge"].with_options(task_run_name=f"merge-{name}{at}")(
                cfg.merge, cfg.model, annealed, **common)
        evaluation = t["evaluate"].with_options(task_run_name=f"evaluate-{name}{at}")(
            cfg.evaluate, {name: model}, documents, **common)
    return {"samples": samples, "model": model, "trained": trained, "evaluation": evaluation}


if __name__ == "__main__":
    import sys

    print(compare(sys.argv[1], sys.argv[2:]))
