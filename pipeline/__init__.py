"""Prefect flows that orchestrate the DVC pipeline (flow.py) and parameter sweeps (sweep.py),
and the servers they scale out to (servers.py)."""
