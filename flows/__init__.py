"""Prefect flows: the zero-downtime replay pipeline and the smaller jobs around it."""
