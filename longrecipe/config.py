"""Typed, frozen configs: one model per stage, a PipelineConfig made of them,
and a RuntimeConfig that never enters a key.

Every field carries a docstring (pydantic reads them with
``use_attribute_docstrings``), unknown keys are rejected, and a bad value
fails at load with the field path, the file and the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Frozen(BaseModel):
    """Base of every config: immutable, strict about unknown keys, documented fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names file, field and line."""


# --------------------------------------------------------------------------- models


class TinyModelConfig(Frozen):
    """A randomly initialised Llama built in-process (unit tests, seconds)."""

    hidden_size: int = Field(64, ge=8)
    """Width of the residual stream."""
    intermediate_size: int = Field(128, ge=8)
    """Width of the MLP."""
    num_hidden_layers: int = Field(2, ge=1)
    """Number of decoder layers."""
    num_attention_heads: int = Field(4, ge=1)
    """Query heads."""
    num_key_value_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    max_position_embeddings: int = Field(256, ge=8)
    """The model's native window."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base."""
    seed: int = 0
    """Seed of the random initialisation."""


class ModelSpec(Frozen):
    """Where a model comes from. Nothing is ever loaded from a hub."""

    source: str = "tiny"
    """`tiny` (the in-process preset), a local Hugging Face folder, or a `.gguf` file."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the `tiny` preset (ignored for other sources)."""
    trust_remote_code: bool = False
    """Allow a local folder's own modelling code to run. Off unless you turn it on."""


class RopeConfig(Frozen):
    """A RoPE change applied before training and saved with the model."""

    type: Literal["default", "linear", "yarn", "llama3", "dynamic"] = "default"
    """RoPE variant. `dynamic` is refused for training (it rescales per batch, so gapped
    position ids make results depend on batch order)."""
    theta: float | None = Field(None, gt=0)
    """New RoPE base; None keeps the model's."""
    factor: float | None = Field(None, gt=0)
    """Scaling factor for linear / yarn / llama3 / dynamic."""
    original_max_position_embeddings: int | None = Field(None, ge=1)
    """The window the model was trained at (yarn, llama3); None takes the model's current one."""
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""


# --------------------------------------------------------------------------- stages


class SourceSpec(Frozen):
    """One corpus source."""

    path: str
    """A JSONL file, a Parquet file, a text file, a folder of text files, or a folder written
    by `datasets.Dataset.save_to_disk`. Relative paths are taken from the working directory."""
    format: Literal["auto", "jsonl", "parquet", "text", "datasets"] = "auto"
    """How to read it; `auto` decides from the suffix or folder content."""
    text_field: str = "text"
    """Column or JSON key holding the text (JSONL, Parquet, datasets)."""
    glob: str = "**/*.txt"
    """Files taken from a folder of text files."""


class IngestConfig(Frozen):
    """Corpus ingest: read sources, tokenize, split into sentences, write `documents`."""

    sources: list[SourceSpec] = []
    """Where the text comes from."""
    min_tokens: int = Field(1, ge=1)
    """Documents with fewer tokens are dropped."""
    max_tokens: int | None = Field(None, ge=1)
    """Longer documents are truncated to this many tokens (at a sentence end when one exists)."""
    dedup: bool = True
    """Drop exact duplicate texts (same sha256)."""
    heldout_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of documents (chosen by text hash, so stable) put in split `heldout`: never
    trained on, used by the perplexity evaluation."""
    max_documents: int | None = Field(None, ge=1)
    """Stop after this many documents (after dedup)."""
    shard_size: int = Field(256, ge=1)
    """Documents per Parquet part."""


class AnalyzeConfig(Frozen):
    """Impactful-token analysis (token-level log-probabilities)."""

    method: Literal["logit_delta", "lsd", "digits"] = "lsd"
    """`logit_delta` (the paper: reference minus base log-prob), `lsd` (one model, LongPPL:
    long minus short context), `digits` (the public code's heuristic)."""
    reference: ModelSpec | None = None
    """Reference long-context model for `logit_delta`; None means the base model with
    `reference_rope` applied."""
    reference_rope: RopeConfig | None = None
    """RoPE change that turns the base model into the reference (logit_delta without a
    reference model)."""
    max_context: int = Field(4096, ge=8)
    """Longest context of one long pass; longer documents are chunked (the manifest records
    the context each token really had)."""
    short_window: int = Field(256, ge=1)
    """W: tokens of context in the short pass (lsd)."""
    short_stride: int = Field(64, ge=1)
    """S: targets scored per short window (smaller is closer to exact, slower)."""
    selection: Literal["top_fraction", "threshold"] = "top_fraction"
    """How impactful tokens are picked from the scores."""
    top_fraction: float = Field(0.2, gt=0, le=1)
    """Share of each document's tokens flagged impactful (selection=top_fraction)."""
    threshold: float = 2.0
    """Score above which a token is impactful (logit_delta, selection=threshold)."""
    lsd_alpha: float = 2.0
    """lsd threshold: LSD must exceed it (selection=threshold)."""
    lsd_beta: float = -2.0
    """lsd threshold: the long log-probability must exceed it (selection=threshold)."""
    batch_size: int = Field(4, ge=1)
    """Sequences per forward pass."""
    shard_docs: int = Field(16, ge=1)
    """Documents per resumable part."""
    max_documents: int | None = Field(None, ge=1)
    """Analyse only the first N training documents."""


class BuildConfig(Frozen):
    """Position-index sample building."""

    method: Literal["full", "randomized", "pose", "longrecipe"] = "longrecipe"
    """Sampling scheme (see docs and REFERENCE)."""
    train_len: int = Field(300, ge=2)
    """Tokens per training sample (full uses target_len)."""
    target_len: int = Field(1024, ge=2)
    """The context window to extend to; every position id is below it."""
    seed: int = 2027
    """Seed of every random choice of the stage."""
    keep_ratio: float = Field(0.5, ge=0, le=1)
    """longrecipe: probability of keeping a sentence with no impactful token."""
    head_rule: Literal["random", "fixed", "none"] = "random"
    """longrecipe: the first rt tokens keep positions 0..rt-1; `random` draws rt uniform in
    [1, (train_len+1)//2] (the public code), `fixed` uses head_len, `none` means rt = 1."""
    head_len: int = Field(1, ge=1)
    """rt for head_rule=fixed."""
    gap_rule: Literal["random", "source"] = "random"
    """longrecipe: `random` spreads the remaining positions as random gaps between kept
    sentences; `source` gives each token its real offset in the document, scaled into the
    target window when the document is longer."""
    num_samples: int | None = Field(None, ge=1)
    """Stop after this many samples."""
    num_tokens: int | None = Field(None, ge=1)
    """Stop after this many tokens (whichever of num_samples/num_tokens comes first)."""
    split: Literal["train", "heldout", "all"] = "train"
    """Which documents to draw from."""
    shard_samples: int = Field(256, ge=1)
    """Samples per resumable part."""


class OptimConfig(Frozen):
    """The training loop's optimisation settings (train and anneal)."""

    lr: float = Field(5e-5, gt=0)
    """Peak learning rate (AdamW)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warmup: constant, cosine to zero, or linear to zero."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from zero, in optimizer steps."""
    max_steps: int = Field(10, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(1, ge=1)
    """Samples per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping (None: off)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    seed: int = 2027
    """Seed of initialisation-free randomness (data order, dropout)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast with fp32 master weights, or plain fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a resumable checkpoint every N optimizer steps (0: never)."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto: flash_attention_2 with CUDA and flash-attn, else sdpa."""


class TrainConfig(Frozen):
    """Context-extension training (the paper's stage 0)."""

    optim: OptimConfig = OptimConfig()
    """Optimisation settings."""
    rope: RopeConfig | None = None
    """RoPE change applied before training (None: keep the model's)."""
    max_position_embeddings: int | None = Field(None, ge=1)
    """Saved with the model; None takes build.target_len."""
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the saved weights."""


class AnnealConfig(Frozen):
    """Annealing on replay data with a learning rate that decays to zero (stage 1)."""

    optim: OptimConfig = OptimConfig(lr=5e-6, schedule="linear")
    """Optimisation settings; the schedule must end at zero (linear or cosine)."""
    replay: IngestConfig = IngestConfig()
    """The general replay corpus."""
    train_len: int = Field(256, ge=2)
    """Length of replay samples (contiguous positions)."""
    num_samples: int | None = Field(None, ge=1)
    """Replay samples to build (None: as many as max_steps needs)."""
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the saved weights."""

    @model_validator(mode="after")
    def _decays_to_zero(self) -> AnnealConfig:
        if self.optim.schedule == "constant":
            raise ValueError("anneal.optim.schedule must decay to zero: use 'linear' or 'cosine'")
        return self


class MergeConfig(Frozen):
    """Weighted average of the original and the annealed weights (stage 2)."""

    weight: float = Field(0.5, ge=0, le=1)
    """Weight of the annealed model; the original gets 1 - weight (paper code: 0.5)."""


class EvaluateConfig(Frozen):
    """Long-context evaluation."""

    suites: list[Literal["niah", "ruler", "perplexity", "retention"]] = ["niah", "perplexity"]
    """Which suites to run."""
    lengths: list[int] = [256, 512, 1024]
    """Context lengths (tokens, input plus answer)."""
    depths: int = Field(10, ge=1)
    """NIAH: evenly spaced needle depths from 0 to 100%."""
    haystack: Literal["essay", "corpus", "noise"] = "noise"
    """NIAH haystack: RULER's essays (fetched at run time), the ingested corpus, or RULER's
    noise line."""
    ruler_tasks: list[str] = []
    """RULER tasks to run (empty: all 13)."""
    samples: int = Field(4, ge=1)
    """Samples per RULER task and length (RULER uses 500)."""
    seed: int = 42
    """Seed of every generated input."""
    batch_size: int = Field(1, ge=1)
    """Prompts per generation batch."""
    retention_length: int = Field(256, ge=8)
    """Context length of the retention (short-context perplexity) suite."""
    max_documents: int = Field(8, ge=1)
    """Held-out documents used by perplexity and retention."""


class ReportConfig(Frozen):
    """The final report."""

    format: Literal["markdown", "html"] = "markdown"
    """Output format."""


class PipelineConfig(Frozen):
    """A whole recipe: the base model and one section per stage."""

    name: str = "longrecipe"
    """Name of the run (used for the Prefect flow-run name)."""
    model: ModelSpec = ModelSpec()
    """The base model to extend (also the tokenizer used at ingest)."""
    ingest: IngestConfig = IngestConfig()
    """Corpus ingest."""
    analyze: AnalyzeConfig = AnalyzeConfig()
    """Impactful-token analysis."""
    build: BuildConfig = BuildConfig()
    """Sample building."""
    train: TrainConfig = TrainConfig()
    """Context-extension training."""
    anneal: AnnealConfig = AnnealConfig()
    """Annealing on replay data."""
    merge: MergeConfig = MergeConfig()
    """Weight merging."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluation."""
    report: ReportConfig = ReportConfig()
    """Report."""


class RuntimeConfig(Frozen):
    """How to run, never what to compute: it never enters a key."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run."""
    workers: int = Field(1, ge=1)
    """Parallel workers where a stage can use them."""
    progress: bool = True
    """Show progress bars."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads (None: torch's default)."""


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML recipe, apply `key.path=value` overrides, validate.

    Raises ConfigError naming the file, the field and (where known) the line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    try:
        data = yaml.safe_load(text) or {}
        lines = _line_index(yaml.compose(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(data, item, path)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path, lines, overrides)) from None


def _apply_override(data: dict, item: str, path: Path) -> None:
    if "=" not in item:
        raise ConfigError(f"{path}: override {item!r} is not of the form key.path=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{path}: override {item!r}: {k!r} is not a section")
        node = nxt
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: override {item!r}: value is not valid YAML: {e}") from e


def _line_index(node: Any, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            p = (*prefix, k.value)
            out[p] = k.start_mark.line + 1
            out.update(_line_index(v, p))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            p = (*prefix, i)
            out[p] = v.start_mark.line + 1
            out.update(_line_index(v, p))
    return out


def _describe(err: ValidationError, path: Path, lines: dict[tuple, int], overrides) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(str(x) if not isinstance(x, int) else x for x in e["loc"])
        field = ".".join(str(x) for x in loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{path}:{line}" if line else str(path)
        from_set = any(o.split("=", 1)[0].strip() == field for o in overrides)
        if from_set:
            where = f"{path} (--set {field})"
        value = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        msgs.append(f"{where}: field {field}: {e['msg']}{value}")
    return "\n".join(msgs)


def config_digest(cfg: BaseModel) -> dict:
    """The JSON form of a config as it enters a key."""
    return cfg.model_dump(mode="json")
