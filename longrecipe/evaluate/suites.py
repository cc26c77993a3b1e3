"""The suite runners of the evaluate stage: one model loaded at a time, each part
(model, suite, task, length) scored into `eval_results` rows.

- niah: needle grid (niah.py, on RULER's niah machinery), greedy answers scored by
  RULER's `all` rule.
- ruler: the 13 RULER tasks (ruler.py generates the inputs), RULER's metrics with
  RULER's arithmetic (metrics.py), no stop words unless configured.
- perplexity: held-out documents at each length; `value` holds the perplexity.
- retention: held-out documents at `retention_length` (short-context perplexity).

Prompts are `base` or `chat` form (evaluate.prompt_format) and every text is encoded by
the pipeline's one BOS rule (longrecipe.tokens.encode), as at ingest.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from longrecipe.config import EvaluateConfig, RuntimeConfig
from longrecipe.errors import InputError
from longrecipe.evaluate import niah as niah_mod
from longrecipe.evaluate.metrics import score as score_one
from longrecipe.models import ModelSource, is_cuda, load_model, load_tokenizer, pick_device
from longrecipe.tokens import encode

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

# RULER tasks with one short answer: a line break ends it. The others list several
# items, which a model may put on separate lines.
SINGLE_LINE_TASKS = frozenset(
    {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
     "niah_multikey_3", "qa_1", "qa_2"}
)


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


class SuiteRunner:
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
            self.cfg.dtype, torch.bfloat16 if is_cuda(self.device) else torch.float32
        )
        self.label, self.key = label, src.key
        self.tok = self.tokenizer(src)
        self.model = load_model(src, dtype=dtype, device=self.device)
        self._doc_ids = {}  # token ids depend on the tokenizer

    def unload(self) -> None:
        self.model = self.tok = None
        gc.collect()
        if is_cuda(self.device):
            import torch

            with torch.cuda.device(self.device):
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
