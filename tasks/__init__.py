"""Prefect tasks: thin, retryable wrappers over the core's operations."""
