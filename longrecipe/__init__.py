"""longrecipe: cheap context-window extension (LongRecipe, arXiv 2409.00509) as cached stages.

Public names are re-exported here; heavy modules (torch, transformers) load
only when a stage that needs them runs.
"""

__version__ = "0.1.0"

from longrecipe.artifacts import (  # noqa: E402
    ArtifactError,
    ArtifactRef,
    ArtifactStore,
    StageSpec,
    StageWriter,
    stage_key,
)
from longrecipe.config import (  # noqa: E402
    AnalyzeConfig,
    AnnealConfig,
    BuildConfig,
    ConfigError,
    EvaluateConfig,
    IngestConfig,
    MergeConfig,
    ModelSpec,
    OptimConfig,
    PipelineConfig,
    ReportConfig,
    RopeConfig,
    RuntimeConfig,
    SourceSpec,
    TinyModelConfig,
    TrainConfig,
    load_config,
)
from longrecipe.ingest import IngestError, run_ingest  # noqa: E402
from longrecipe.models import ModelError, load_model, load_tokenizer, resolve  # noqa: E402

__all__ = [
    "AnalyzeConfig",
    "AnnealConfig",
    "ArtifactError",
    "ArtifactRef",
    "ArtifactStore",
    "BuildConfig",
    "ConfigError",
    "EvaluateConfig",
    "IngestConfig",
    "IngestError",
    "MergeConfig",
    "ModelError",
    "ModelSpec",
    "OptimConfig",
    "PipelineConfig",
    "ReportConfig",
    "RopeConfig",
    "RuntimeConfig",
    "SourceSpec",
    "StageSpec",
    "StageWriter",
    "TinyModelConfig",
    "TrainConfig",
    "__version__",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve",
    "run_ingest",
    "stage_key",
]
