"""How the flows are deployed: `python -m zdr.deployments.serve`, or prefect.yaml with a worker."""
