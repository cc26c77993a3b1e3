"""The evaluate stage: every suite for every model, written in resumable parts.

One part of `eval_results` per (model, suite, task, length), in a fixed order,
so a killed evaluation restarts at the first unfinished part. After the last
part: `eval_summary` (one row per model, suite, task and length) and, for the
NIAH suite, a heatmap per model in `files/heatmap-<label>.png`
(longrecipe.evaluate.summary). The suites themselves (niah, ruler, perplexity,
retention) are run by longrecipe.evaluate.suites.

With `num_processes` N the stage runs under `accelerate launch` (longrecipe.launch):
each process scores its share of the parts (`assign_shares` by expected samples x
length, the same plan in every process) on its own device, process 0 writes the
summary and heatmaps once every part exists. The artifact is the same (key and
tables) for any N, and a killed run resumes with any N from its finished parts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import EvaluateConfig, ModelSpec, RuntimeConfig, config_digest
from longrecipe.data import RULER_FILES, ruler_dir
from longrecipe.digest import file_digest
from longrecipe.evaluate import niah as niah_mod
from longrecipe.evaluate.suites import RESULTS_SCHEMA, EvaluateError, Part, SuiteRunner
from longrecipe.evaluate.summary import (
    SUMMARY_SCHEMA,
    seconds_per_sample,
    summarize,
    write_heatmaps,
)
from longrecipe.launch import (
    Job,
    assign_shares,
    launch,
    process_runtime,
    produce,
    rank_and_world,
    resolve_processes,
)
from longrecipe.models import ModelSource, resolve
from longrecipe.progress import progress_bar
from longrecipe.tokens import token_policy

__all__ = [
    "RESULTS_SCHEMA", "STAGE", "STAGE_VERSION", "SUMMARY_SCHEMA", "EvaluateError", "Part",
    "evaluate_spec", "plan", "run_evaluate", "summarize",
]

STAGE = "evaluate"
STAGE_VERSION = "evaluate_v2"  # v2: RULER's arithmetic, no stop words, qa placement, formats
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- spec


def evaluate_spec(
    cfg: EvaluateConfig,
    models: Mapping[str, ModelSource],
    documents: ArtifactRef | None,
    data_dir: str | Path | None = None,
) -> StageSpec:
    """The key: config, each model's identity under its label, the documents (when a
    suite reads them) and the content of the RULER data files (when a suite reads them)."""
    _check_labels(models)
    inputs = {f"model:{label}": src.key for label, src in sorted(models.items())}
    if _needs_documents(cfg):
        if documents is None:
            raise EvaluateError(
                f"evaluate: suites {cfg.suites} with haystack {cfg.haystack!r} need the ingest "
                "artifact (held-out documents), and none was given"
            )
        inputs["documents"] = documents.key
    for name, digest in _data_digests(cfg, Path(data_dir) if data_dir else ruler_dir()).items():
        inputs[f"data:{name}"] = digest
    return StageSpec(STAGE, STAGE_VERSION, config_digest(cfg), inputs)


def plan(cfg: EvaluateConfig, labels: Sequence[str], ruler_tasks: Sequence[str]) -> list[Part]:
    """Every part in its fixed order (the order is the part number, so resume finds it)."""
    todo: list[tuple[str, str, str, int]] = []
    for label in labels:
        for suite in cfg.suites:
            if suite == "niah":
                todo += [(label, "niah", "niah", n) for n in cfg.lengths]
            elif suite == "ruler":
                todo += [(label, "ruler", t, n) for t in ruler_tasks for n in cfg.lengths]
            elif suite == "perplexity":
                todo += [(label, "perplexity", "heldout", n) for n in cfg.lengths]
            elif suite == "retention":
                todo.append((label, "retention", "heldout", cfg.retention_length))
    return [Part(i, *t) for i, t in enumerate(todo)]


# --------------------------------------------------------------------------- run


def run_evaluate(
    cfg: EvaluateConfig,
    models: Mapping[str, ModelSpec | ModelSource | ArtifactRef],
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
    documents: ArtifactRef | None = None,
    data_dir: str | Path | None = None,
) -> ArtifactRef:
    """Evaluate each labelled model on the configured suites; returns the artifact.

    `models` maps a label ("base", "merged", ...) to a model; `documents` is the ingest
    artifact whose `heldout` rows feed perplexity, retention and the corpus haystack;
    `data_dir` holds RULER's files (default: `longrecipe.data.ruler_dir()`). With
    cfg.num_processes > 1 (or an accelerate config) the stage runs under `accelerate
    launch`, each process scoring its share of the parts.
    """
    return _run_evaluate(cfg, models, store, runtime, documents, data_dir, job=None)


def run_launched(job: Job) -> ArtifactRef:
    """One process of a launched evaluation (longrecipe.launched's entry)."""
    cfg = EvaluateConfig.model_validate(job.config)
    models = {k.split(":", 1)[1]: v for k, v in job.inputs.items() if k.startswith("model:")}
    return _run_evaluate(cfg, models, job.store, process_runtime(job.runtime),
                         job.inputs.get("documents"), job.inputs.get("data_dir"), job=job)


def _run_evaluate(cfg, models, store, runtime, documents, data_dir, *, job: Job | None) -> ArtifactRef:
    if not models:
        raise EvaluateError("evaluate: no models given")
    sources = {label: m if isinstance(m, ModelSource) else resolve(m) for label, m in models.items()}
    data = Path(data_dir) if data_dir else ruler_dir()
    spec = evaluate_spec(cfg, sources, documents, data)
    done = store.get(STAGE, spec.key)
    if done is not None:
        return done
    heldout = _heldout(documents) if _needs_documents(cfg) else []
    tasks = _ruler_tasks(cfg) if "ruler" in cfg.suites else []
    parts = plan(cfg, sorted(sources), tasks)
    runner = SuiteRunner(cfg, runtime, data, heldout)
    if job is None:  # the launched processes were checked by their parent
        _check_lengths(cfg, sources, tasks, runner, data)  # before any model loads
        if (cfg.num_processes or 1) > 1 or cfg.accelerate_config is not None:
            inputs = {f"model:{label}": m for label, m in sorted(models.items())}
            inputs.update({"documents": documents} if documents is not None else {}, data_dir=data)
            return launch(spec, cfg, inputs, store, runtime,
                          processes=resolve_processes(cfg.num_processes, cfg.accelerate_config),
                          accelerate_config=cfg.accelerate_config, mixed_precision="no")
    rank, world = rank_and_world() if job is not None else (0, 1)

    def run_my_parts(w: StageWriter) -> dict:
        """This process's share of the parts (all of them in one process), model by model."""
        owner = assign_shares([runner.expected(p) * p.length for p in parts], world)
        todo = [p for p in parts if owner[p.index] == rank
                and not w.has_part("eval_results", p.index)]
        with progress_bar("evaluate", runtime.progress, unit="samples",
                          total=sum(runner.expected(p) for p in todo) or None) as bar:
            runner.bar = bar
            for label in sorted(sources):
                mine = [p for p in todo if p.label == label]
                if not mine:
                    continue
                runner.load(label, sources[label])
                for p in mine:
                    bar.note(f"{label} {p.suite}/{p.task} @ {p.length}")
                    w.write_part("eval_results", p.index, runner.run(p))
                runner.unload()
        return {"device": runner.device, "parts_computed": len(todo)}

    def finish(w: StageWriter, shares: list[dict]) -> None:
        """Once every part exists: the summary, the heatmaps, the facts."""
        results = pa.concat_tables([w.read_part("eval_results", p.index) for p in parts])
        w.write_table("eval_summary", summarize(results))
        heatmaps = write_heatmaps(w, results, sorted(sources)) if "niah" in cfg.suites else []
        w.info.update(
            models={label: src.key for label, src in sorted(sources.items())},
            prompt_format=cfg.prompt_format,
            stop_at_newline=cfg.stop_at_newline,
            special_tokens={label: token_policy(runner.tokenizer(src)).as_info()
                            for label, src in sorted(sources.items())},
            parts=len(parts),
            rows=results.num_rows,
            heatmaps=heatmaps,
            empty_parts=[f"{p.label}/{p.suite}/{p.task}/{p.length}" for p in parts
                         if w.read_part("eval_results", p.index).num_rows == 0],
            seconds_per_sample=seconds_per_sample(results),
            processes=len(shares),
            devices=[sh["device"] for sh in shares],
            parts_computed=sum(sh["parts_computed"] for sh in shares),
        )

    return produce(store, spec, run_my_parts, job, finish=finish)


def _check_lengths(cfg: EvaluateConfig, sources: Mapping[str, ModelSource], tasks: list[str],
                   runner: SuiteRunner, data_dir: Path) -> None:
    """Fail before any model loads when the shortest length cannot hold a NIAH prompt or
    a RULER task with a model's tokenizer (not at the first short length)."""
    if "niah" in cfg.suites:
        for label in sorted(sources):
            try:
                need = niah_mod.min_length(runner.tokenizer(sources[label]),
                                           cfg.niah_max_new_tokens, cfg.prompt_format)
            except niah_mod.HaystackError as e:
                raise EvaluateError(f"model {label!r}: {e}") from None
            if min(cfg.lengths) < need:
                raise EvaluateError(
                    f"evaluate.lengths: {min(cfg.lengths)} is too short for a NIAH prompt with "
                    f"model {label!r}'s tokenizer: the template, needle and question take "
                    f"{need - cfg.niah_max_new_tokens} tokens plus niah_max_new_tokens="
                    f"{cfg.niah_max_new_tokens}; use lengths of at least {need + 64}"
                )
    if tasks:
        _check_ruler_lengths(cfg, tasks, [sources[x] for x in sorted(sources)], runner, data_dir)


# --------------------------------------------------------------------------- inputs


def _check_labels(models: Mapping[str, object]) -> None:
    for label in models:
        if not _LABEL.match(label):
            raise EvaluateError(
                f"evaluate: model label {label!r} must be letters, digits, '_', '.' or '-' "
                "(it names the heatmap file)"
            )


def _needs_documents(cfg: EvaluateConfig) -> bool:
    return bool({"perplexity", "retention"} & set(cfg.suites)) or (
        "niah" in cfg.suites and cfg.haystack == "corpus"
    )


def _data_files(cfg: EvaluateConfig) -> list[str]:
    files: list[str] = []
    if "ruler" in cfg.suites:
        files += RULER_FILES
    elif "niah" in cfg.suites and cfg.haystack == "essay":
        files.append(niah_mod.ESSAYS)
    return files


def _data_digests(cfg: EvaluateConfig, data_dir: Path) -> dict[str, str]:
    out = {}
    for name in _data_files(cfg):
        path = data_dir / name
        if not path.exists():
            raise EvaluateError(
                f"{path} is missing: RULER's data is fetched at run time, "
                "run `longrecipe data fetch ruler` first"
            )
        out[name] = file_digest(path)[:16]
    return out


def _heldout(documents: ArtifactRef) -> list[tuple[str, str]]:
    """(doc_id, text) of the held-out documents, in store order."""
    out = []
    for part in documents.iter_parts("documents", columns=["doc_id", "split", "text"]):
        for doc_id, split, text in zip(*(part.column(c).to_pylist()
                                         for c in ("doc_id", "split", "text")), strict=True):
            if split == "heldout":
                out.append((doc_id, text))
    if not out:
        raise EvaluateError(
            f"documents artifact {documents.stage}/{documents.key} has no held-out documents: "
            "set ingest.heldout_fraction above 0 (perplexity, retention and the corpus haystack "
            "read only documents training never saw)"
        )
    return out


def _check_ruler_lengths(cfg: EvaluateConfig, tasks: list[str], sources: list[ModelSource],
                         runner: SuiteRunner, data_dir: Path) -> None:
    """Fail before any model loads when a RULER task cannot fit the shortest length."""
    from longrecipe.evaluate.ruler import RulerLengthError, generate_samples

    length = min(cfg.lengths)
    for src in sources:
        short = []
        for task in tasks:
            try:
                generate_samples(task, length, runner.tokenizer(src), n=1, seed=cfg.seed,
                                 data_dir=data_dir, prompt_format=cfg.prompt_format)
            except RulerLengthError as e:
                short.append(str(e))
        if short:
            raise EvaluateError(f"evaluate.lengths: {length} is too short for "
                                + "; ".join(short))


def _ruler_tasks(cfg: EvaluateConfig) -> list[str]:
    try:
        from longrecipe.evaluate.ruler import RULER_TASKS
    except ModuleNotFoundError as e:
        if e.name != "longrecipe.evaluate.ruler":
            raise
        raise EvaluateError("the ruler suite needs longrecipe/evaluate/ruler.py, missing here") from None
    return list(cfg.ruler_tasks) or list(RULER_TASKS)
