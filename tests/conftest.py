"""Shared fixtures: a temp store, the tiny model spec, a small ingested corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from longrecipe import (  # noqa: E402
    ArtifactStore,
    IngestConfig,
    ModelSpec,
    RuntimeConfig,
    SourceSpec,
    TinyModelConfig,
    run_ingest,
)
from longrecipe.synthetic import write_filler_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_GGUF = ROOT / "data/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUIET = RuntimeConfig(progress=False, device="cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return ModelSpec(source="tiny", tiny=TinyModelConfig(max_position_embeddings=256))


def write_corpus(folder: Path, n_docs: int = 12, sentences: int = 40, seed: int = 0) -> Path:
    """A synthetic JSONL corpus we wrote ourselves (longrecipe.synthetic)."""
    return write_filler_corpus(folder / "corpus.jsonl", n_docs, sentences, seed)


@pytest.fixture
def documents(tmp_path, store, tiny_spec):
    """A finished `documents` artifact of 12 synthetic documents (about 1,000 tokens each)."""
    corpus = write_corpus(tmp_path)
    cfg = IngestConfig(sources=[SourceSpec(path=str(corpus))], shard_size=5, heldout_fraction=0.2)
    return run_ingest(cfg, tiny_spec, store, QUIET)
