"""Dagster code location for Blues (Dagster only; logic lives in blues_train)."""
