"""Prefect flows: the pipeline, the comparison, evaluate-only."""
