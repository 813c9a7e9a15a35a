"""The `zdr` command line (typer + rich). It calls the core and, for pipelines, the flows."""
