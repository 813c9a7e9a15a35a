"""How the flows are deployed: `python -m deployments.serve`, or prefect.yaml with a worker."""
