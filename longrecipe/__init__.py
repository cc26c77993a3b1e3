"""longrecipe: cheap context-window extension (LongRecipe, arXiv 2409.00509) as cached stages.

Public names are re-exported here; heavy modules (torch, transformers) load
only when a stage that needs them runs.
"""

__version__ = "0.1.0"

from longrecipe.analyze import AnalyzeError, run_analyze  # noqa: E402
from longrecipe.anneal import replay_build_config, run_anneal  # noqa: E402
from longrecipe.artifacts import (  # noqa: E402
    ArtifactError,
    ArtifactRef,
    ArtifactStore,
    StageSpec,
    StageWriter,
    stage_key,
)
from longrecipe.budget import MethodBudget, method_budgets  # noqa: E402
from longrecipe.build import BuildError, check_samples, run_build  # noqa: E402
from longrecipe.config import (  # noqa: E402
    AnalyzeConfig,
    AnnealConfig,
    BuildConfig,
    CompareConfig,
    ConfigError,
    EvaluateConfig,
    IngestConfig,
    LossWeightsConfig,
    MergeConfig,
    ModelSpec,
    OptimConfig,
    PipelineConfig,
    PlanConfig,
    ReportConfig,
    RopeConfig,
    RuntimeConfig,
    SourceSpec,
    TinyModelConfig,
    TrainConfig,
    load_config,
)
from longrecipe.devices import DeviceSlots, branch_devices  # noqa: E402
from longrecipe.evaluate import EvaluateError, run_evaluate  # noqa: E402
from longrecipe.ingest import IngestError, run_ingest  # noqa: E402
from longrecipe.launch import LaunchConfigError, LaunchError  # noqa: E402
from longrecipe.merge import MergeError, run_merge  # noqa: E402
from longrecipe.models import ModelError, load_model, load_tokenizer, pick_device, resolve  # noqa: E402
from longrecipe.plan import plan_recipe  # noqa: E402
from longrecipe.positions import InvariantError  # noqa: E402
from longrecipe.rope import RopeError, apply_rope  # noqa: E402
from longrecipe.train import TrainError, run_train  # noqa: E402

__all__ = [
    "AnalyzeConfig",
    "AnalyzeError",
    "AnnealConfig",
    "ArtifactError",
    "ArtifactRef",
    "ArtifactStore",
    "BuildConfig",
    "BuildError",
    "CompareConfig",
    "ConfigError",
    "DeviceSlots",
    "EvaluateConfig",
    "EvaluateError",
    "IngestConfig",
    "IngestError",
    "InvariantError",
    "LaunchConfigError",
    "LaunchError",
    "LossWeightsConfig",
    "MergeConfig",
    "MethodBudget",
    "MergeError",
    "ModelError",
    "ModelSpec",
    "OptimConfig",
    "PipelineConfig",
    "PlanConfig",
    "ReportConfig",
    "RopeConfig",
    "RopeError",
    "RuntimeConfig",
    "SourceSpec",
    "StageSpec",
    "StageWriter",
    "TinyModelConfig",
    "TrainConfig",
    "TrainError",
    "__version__",
    "apply_rope",
    "branch_devices",
    "check_samples",
    "load_config",
    "load_model",
    "load_tokenizer",
    "method_budgets",
    "pick_device",
    "plan_recipe",
    "resolve",
    "run_analyze",
    "replay_build_config",
    "run_anneal",
    "run_build",
    "run_evaluate",
    "run_ingest",
    "run_merge",
    "run_train",
    "stage_key",
]
