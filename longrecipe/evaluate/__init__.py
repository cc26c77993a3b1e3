"""The evaluate stage: NIAH grid, RULER tasks, perplexity by length, retention.

Only torch-free modules load here; models load when the stage runs.
"""

from longrecipe.evaluate.stage import (
    STAGE,
    STAGE_VERSION,
    EvaluateError,
    evaluate_spec,
    run_evaluate,
)

__all__ = ["STAGE", "STAGE_VERSION", "EvaluateError", "evaluate_spec", "run_evaluate"]
