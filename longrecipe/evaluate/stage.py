"""The evaluate stage: every suite for every model, written in resumable parts.

One part of `eval_results` per (model, suite, task, length), in a fixed order,
so a killed evaluation restarts at the first unfinished part. After the last
part: `eval_summary` (one row per model, suite, task and length) and, for the
NIAH suite, a heatmap per model in `files/heatmap-<label>.png`.

Suites
- niah: needle grid (niah.py, on RULER's niah machinery), greedy answers scored by
  RULER's `all` rule.
- ruler: the 13 RULER tasks (ruler.py generates the inputs), RULER's metrics with
  RULER's arithmetic (metrics.py), no stop words unless configured.
Prompts are `base` or `chat` form (evaluate.prompt_format) and every text is encoded by
the pipeline's one BOS rule (longrecipe.tokens.encode), as at ingest.
- perplexity: held-out documents at each length; `value` holds the perplexity.
- retention: held-out documents at `retention_length` (short-context perplexity).
"""

from __future__ import annotations

import gc
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import EvaluateConfig, ModelSpec, RuntimeConfig
from longrecipe.data import RULER_FILES, ruler_dir
from longrecipe.digest import file_digest
from longrecipe.errors import InputError
from longrecipe.evaluate import niah as niah_mod
from longrecipe.evaluate.metrics import score as score_one
from longrecipe.evaluate.metrics import task_score
from longrecipe.models import ModelSource, load_model, load_tokenizer, pick_device, resolve
from longrecipe.progress import progress_bar
from longrecipe.tokens import encode, token_policy

STAGE = "evaluate"
STAGE_VERSION = "evaluate_v2"  # v2: RULER's arithmetic, no stop words, qa placement, formats

RESULTS_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("model_key", pa.string()),
        ("suite", pa.string()),
        ("task", pa.string()),
        ("length", pa.int32()),
        ("depth", pa.float64()),
        ("index", pa.int32()),
        ("doc_id", pa.string()),
        ("prompt", pa.large_string()),
        ("prediction", pa.string()),
        ("references", pa.list_(pa.string())),
        ("metric", pa.string()),
        ("score", pa.float64()),
        ("value", pa.float64()),
        ("n_input_tokens", pa.int32()),
        ("n_output_tokens", pa.int32()),
        ("stop", pa.string()),
        ("seconds", pa.float64()),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("model_key", pa.string()),
        ("suite", pa.string()),
        ("task", pa.string()),
        ("length", pa.int32()),
        ("n", pa.int32()),
        ("score", pa.float64()),
        ("perplexity", pa.float64()),
        ("seconds_per_sample", pa.float64()),
    ]
)

# RULER tasks with one short answer: a line break ends it. The others list several
# items, which a model may put on separate lines.
SINGLE_LINE_TASKS = frozenset(
    {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
     "niah_multikey_3", "qa_1", "qa_2"}
)
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EvaluateError(InputError):
    """Bad input to the evaluate stage (missing data, documents, labels, lengths)."""


@dataclass(frozen=True)
class Part:
    """One resumable unit of work: a model's suite, task and length."""

    index: int
    label: str
    suite: str
    task: str
    length: int


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
    return StageSpec(STAGE, STAGE_VERSION, cfg, inputs)


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
    `data_dir` holds RULER's files (default: `longrecipe.data.ruler_dir()`).
    """
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

    def body(w: StageWriter) -> None:
        todo = [p for p in parts if not w.has_part("eval_results", p.index)]
        runner = _Runner(cfg, runtime, data, heldout)
        if "niah" in cfg.suites:  # fail before any model loads, not at the first short length
            for label in sorted({p.label for p in todo}):
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
            _check_ruler_lengths(cfg, tasks, [sources[x] for x in sorted({p.label for p in todo})],
                                 runner, data)
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
        results = pa.concat_tables([w.read_part("eval_results", p.index) for p in parts])
        w.write_table("eval_summary", summarize(results))
        heatmaps = _write_heatmaps(w, results, sorted(sources)) if "niah" in cfg.suites else []
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
            seconds_per_sample=_seconds_per_sample(results),
        )

    return store.produce(spec, body)


class _Runner:
    """Holds the loaded model, its tokenizer and what is built once (haystack, documents)."""

    def __init__(self, cfg: EvaluateConfig, runtime: RuntimeConfig, data_dir: Path,
                 heldout: list[tuple[str, str]]):
        self.cfg, self.runtime, self.data_dir, self.heldout = cfg, runtime, data_dir, heldout
        self.device = pick_device(runtime.device)
        self.model = self.tok = self.label = self.key = None
        self.bar = None
        self._haystack: niah_mod.Haystack | None = None
        self._doc_ids: dict[int, list[int]] = {}
        self._tokenizers: dict[str, object] = {}

    def tokenizer(self, src: ModelSource):
        """A model's tokenizer, loaded once (a GGUF tokenizer takes seconds to parse)."""
        if src.key not in self._tokenizers:
            self._tokenizers[src.key] = load_tokenizer(src)
        return self._tokenizers[src.key]

    def expected(self, p: Part) -> int:
        """Samples a part will score (for the progress total; documents: an upper bound)."""
        c = self.cfg
        if p.suite == "niah":
            return c.depths * c.niah_samples
        if p.suite == "ruler":
            return c.samples
        return min(c.max_documents, len(self.heldout))

    def load(self, label: str, src: ModelSource) -> None:
        import torch

        if self.runtime.threads:
            torch.set_num_threads(self.runtime.threads)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            self.cfg.dtype, torch.bfloat16 if self.device == "cuda" else torch.float32
        )
        self.label, self.key = label, src.key
        self.tok = self.tokenizer(src)
        self.model = load_model(src, dtype=dtype, device=self.device)
        self._doc_ids = {}  # token ids depend on the tokenizer

    def unload(self) -> None:
        self.model = self.tok = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _advance(self, n: int, _seconds: float) -> None:
        if self.bar is not None:
            self.bar.advance(n)

    # -- suites
    def run(self, p: Part) -> pa.Table:
        if p.suite == "niah":
            return self._niah(p)
        if p.suite == "ruler":
            return self._ruler(p)
        return self._perplexity(p)

    def _generate(self, prompts: list[str], max_new: int, stop_at_newline: bool):
        from longrecipe.evaluate.generate import generate

        return generate(self.model, self.tok, prompts, max_new, batch_size=self.cfg.batch_size,
                        stop_at_newline=stop_at_newline, on_batch=self._advance)

    def _niah(self, p: Part) -> pa.Table:
        c = self.cfg
        try:
            samples = niah_mod.niah_samples(
                p.length, niah_mod.depth_grid(c.depths), self.tok, self.haystack(),
                samples=c.niah_samples, seed=c.seed, max_new_tokens=c.niah_max_new_tokens,
                prompt_format=c.prompt_format,
            )
        except niah_mod.HaystackError as e:
            raise EvaluateError(f"evaluate.lengths: {e}") from None
        gens = self._generate([s.prompt for s in samples], c.niah_max_new_tokens, c.stop_at_newline)
        return self._rows(p, [
            dict(depth=s.depth, index=s.index, prompt=s.prompt, prediction=g.text,
                 references=s.references, metric="all",
                 score=score_one("all", g.text, s.references),
                 n_input_tokens=g.n_input_tokens, n_output_tokens=len(g.token_ids),
                 stop=g.stop, seconds=g.seconds)
            for s, g in zip(samples, gens, strict=True)
        ])

    def _ruler(self, p: Part) -> pa.Table:
        from longrecipe.evaluate.ruler import generate_samples

        c = self.cfg
        samples = generate_samples(p.task, p.length, self.tok, n=c.samples, seed=c.seed,
                                   data_dir=self.data_dir, prompt_format=c.prompt_format)
        stop_nl = c.stop_at_newline and p.task in SINGLE_LINE_TASKS
        by_budget: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            by_budget[s.max_new_tokens].append(i)
        gen_of: dict[int, object] = {}
        for max_new, idx in sorted(by_budget.items()):
            for i, g in zip(idx, self._generate([samples[i].input for i in idx], max_new, stop_nl),
                            strict=True):
                gen_of[i] = g
        gens = [gen_of[i] for i in range(len(samples))]
        return self._rows(p, [
            dict(index=s.index, prompt=s.input, prediction=g.text, references=list(s.references),
                 metric=s.metric, score=score_one(s.metric, g.text, list(s.references)),
                 n_input_tokens=g.n_input_tokens, n_output_tokens=len(g.token_ids),
                 stop=g.stop, seconds=g.seconds)
            for s, g in zip(samples, gens, strict=True)
        ])

    def _perplexity(self, p: Part) -> pa.Table:
        from longrecipe.evaluate.perplexity import perplexities

        picked = self._documents(p.length)
        scored = perplexities(self.model, [(i, self._ids(i)[: p.length]) for i in picked],
                              batch_size=self.cfg.batch_size, on_batch=self._advance)
        return self._rows(p, [
            dict(index=n, doc_id=self.heldout[s.doc_index][0],
                 prompt=self.tok.decode(self._ids(s.doc_index)[: p.length]),
                 metric="perplexity", value=s.perplexity, n_input_tokens=s.n_tokens,
                 n_output_tokens=0, seconds=s.seconds)
            for n, s in enumerate(scored)
        ])

    # -- inputs
    def haystack(self) -> niah_mod.Haystack:
        if self._haystack is None:
            kind = self.cfg.haystack
            try:
                if kind == "essay":
                    self._haystack = niah_mod.essay_haystack(self.data_dir)
                elif kind == "corpus":
                    # Enough text for the longest length with any tokenizer (>= 1 char a token).
                    need, texts = 4 * max(self.cfg.lengths), []
                    for _, text in self.heldout:
                        texts.append(text)
                        need -= len(text)
                        if need <= 0:
                            break
                    self._haystack = niah_mod.corpus_haystack(texts)
                else:
                    self._haystack = niah_mod.noise_haystack()
            except niah_mod.HaystackError as e:
                raise EvaluateError(str(e)) from None
        return self._haystack

    def _ids(self, i: int) -> list[int]:
        if i not in self._doc_ids:
            self._doc_ids[i] = encode(self.tok, self.heldout[i][1])
        return self._doc_ids[i]

    def _documents(self, length: int) -> list[int]:
        """The first `max_documents` held-out documents with at least `length` tokens."""
        out = []
        for i, (_, text) in enumerate(self.heldout):
            # A byte-level tokenizer never makes more tokens than bytes (+ special tokens):
            # skip tokenizing documents that cannot be long enough.
            if len(text.encode()) + 8 < length:
                continue
            if len(self._ids(i)) >= length:
                out.append(i)
                if len(out) == self.cfg.max_documents:
                    break
        return out

    def _rows(self, p: Part, rows: list[dict]) -> pa.Table:
        cols: dict[str, list] = {f.name: [] for f in RESULTS_SCHEMA}
        for r in rows:
            base = dict(model=self.label, model_key=self.key, suite=p.suite, task=p.task,
                        length=p.length, references=[], prediction=None)
            base.update(r)
            for name in cols:
                cols[name].append(base.get(name))
        return pa.Table.from_pydict(cols, schema=RESULTS_SCHEMA)


# --------------------------------------------------------------------------- summary


def summarize(results: pa.Table) -> pa.Table:
    """One row per (model, suite, task, length): the score as RULER's metric_fn computes it
    from the predictions (metrics.task_score: rounded to 2 decimals), or perplexity (the
    exp of the mean log perplexity, i.e. of the mean token NLL over equal-length windows);
    RULER also gets a `mean` task per length, the mean of its task scores."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results.to_pylist():
        groups[(r["model"], r["model_key"], r["suite"], r["task"], r["length"])].append(r)
    rows = []
    for (model, key, suite, task, length), rs in groups.items():
        scored = [r for r in rs if r["score"] is not None]
        values = [r["value"] for r in rs if r["value"] is not None]
        metrics = {r["metric"] for r in scored}
        if len(metrics) > 1:
            raise EvaluateError(f"{model}/{suite}/{task}/{length}: rows mix metrics {metrics}")
        rows.append(dict(
            model=model, model_key=key, suite=suite, task=task, length=length, n=len(rs),
            score=task_score(metrics.pop(), [r["prediction"] for r in scored],
                             [r["references"] for r in scored]) if scored else None,
            perplexity=math.exp(sum(math.log(v) for v in values) / len(values)) if values else None,
            seconds_per_sample=sum(r["seconds"] for r in rs) / len(rs),
        ))
    ruler = defaultdict(list)
    for r in rows:
        if r["suite"] == "ruler" and r["score"] is not None:
            ruler[(r["model"], r["model_key"], r["length"])].append(r)
    for (model, key, length), rs in ruler.items():
        rows.append(dict(
            model=model, model_key=key, suite="ruler", task="mean", length=length,
            n=sum(r["n"] for r in rs), score=sum(r["score"] for r in rs) / len(rs),
            perplexity=None,
            seconds_per_sample=sum(r["seconds_per_sample"] * r["n"] for r in rs)
            / sum(r["n"] for r in rs),
        ))
    rows.sort(key=lambda r: (r["model"], r["suite"], r["task"], r["length"]))
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def _seconds_per_sample(results: pa.Table) -> dict[str, float]:
    out: dict[str, list[float]] = defaultdict(list)
    for m, s, t, n, sec in zip(*(results.column(c).to_pylist()
                                 for c in ("model", "suite", "task", "length", "seconds")),
                               strict=True):
        out[f"{m}/{s}/{t}/{n}"].append(sec)
    return {k: round(sum(v) / len(v), 4) for k, v in out.items()}


def _write_heatmaps(w: StageWriter, results: pa.Table, labels: list[str]) -> list[str]:
    from longrecipe.evaluate.heatmap import heatmap_png

    niah = results.filter(pc.equal(results.column("suite"), "niah"))
    written = []
    for label in labels:
        mine = niah.filter(pc.equal(niah.column("model"), label))
        if mine.num_rows == 0:
            continue
        rows = list(zip(*(mine.column(c).to_pylist() for c in ("depth", "length", "score")),
                        strict=True))
        mean = sum(r[2] for r in rows) / len(rows)
        png = heatmap_png(rows, f"NIAH: {label} (mean {mean:.1f})")
        rel = f"files/heatmap-{label}.png"
        w.fs.makedirs(f"{w.work}/files", exist_ok=True)
        with w.fs.open(f"{w.work}/{rel}", "wb") as fh:
            fh.write(png)
        written.append(rel)
    return written


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
                         runner: _Runner, data_dir: Path) -> None:
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
