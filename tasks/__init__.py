"""Prefect tasks: one per stage (tasks.stages); shared helpers in tasks.common."""
