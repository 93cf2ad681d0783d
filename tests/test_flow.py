"""The Prefect flow over the real DVC pipeline, and the sweep, under prefect_test_harness."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import yaml

from conftest import run_dvc, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def quick_repo(dvc_repo):
    """The repository copy with a one-epoch training on the tiny data, committed (dvc exp needs a commit)."""
    write_params(dvc_repo, train={"epochs": 1, "batch_size": 64}, register={"min_accuracy": 0.0})
    subprocess.run(["git", "add", "-A"], cwd=dvc_repo, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "fixture"], cwd=dvc_repo, check=True)
    return dvc_repo


def dvc_yaml_stages(root):
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def test_stage_order_comes_from_dvc(quick_repo):
    from pipeline.dvc_stages import stage_order

    assert stage_order(quick_repo) == dvc_yaml_stages(quick_repo)
    assert stage_order(quick_repo)[0] == "download"


def test_flow_runs_every_stage_then_skips_cached(quick_repo, prefect_harness):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    from pipeline.flow import pipeline

    first = pipeline(root=str(quick_repo), download_retries=0)
    assert [r.stage for r in first] == dvc_yaml_stages(quick_repo)
    assert not any(r.cached for r in first)
    assert "Running stage 'train'" in first[1].output  # DVC's own output reached the task

    run = json.loads((quick_repo / "models/run.json").read_text())
    tags = MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).data.tags
    assert len(tags["prefect.flow_run_id"]) == 36

    summary = Artifact.get("cifar10-pipeline-summary")
    assert summary is not None and run["run_id"] in summary.data
    assert "test accuracy" in summary.data
    assert "| ONNX top-1 agreement | 100.00% |" in summary.data  # the figures were read, not left as "-"
    assert "| aliases | challenger, champion |" in summary.data

    second = pipeline(root=str(quick_repo), download_retries=0)
    assert [r.stage for r in second] == [r.stage for r in first]
    assert all(r.cached for r in second)


def test_failing_stage_fails_the_flow_and_stops_it(quick_repo, prefect_harness):
    from pipeline.flow import pipeline

    write_params(quick_repo, data={"md5": "0" * 31 + "1"})
    state = pipeline(root=str(quick_repo), download_retries=1, retry_delay_s=0.1, return_state=True)
    assert state.is_failed()
    assert "checksum mismatch" in state.message and "expected md5 00000000000000000000000000000001" in state.message
    assert not (quick_repo / "models").exists()
    assert not (quick_repo / "dvc.lock").exists()


def test_sweep_writes_one_row_and_one_mlflow_run_per_variant(quick_repo, prefect_harness):
    import mlflow

    from pipeline.sweep import sweep

    params_before = (quick_repo / "params.yaml").read_text()
    rows = sweep(residual=[True, False], blocks=[[1, 1, 1]], epochs=1, root=str(quick_repo))
    with open(quick_repo / "reports/sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["residual", "plain"]
    assert {r["depth"] for r in table} == {"8"}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in table)
    assert len({r["mlflow_run_id"] for r in rows}) == 2
    # Both runs landed in the workspace's store, the one the MLflow UI reads.
    mlflow.set_tracking_uri(f"sqlite:///{quick_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cifar10-resnet"], output_format="list")
    assert {r.info.run_id for r in runs} >= {r["mlflow_run_id"] for r in rows}
    assert {r.data.params["model.residual"] for r in runs} == {"True", "False"}
    assert (quick_repo / "params.yaml").read_text() == params_before
    assert len(run_dvc(quick_repo, "exp", "show", "--csv").stdout.strip().splitlines()) >= 3
