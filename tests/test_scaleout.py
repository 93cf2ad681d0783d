"""The pipeline on the engines a team scales out to, each for real on loopback: an MLflow tracking
server on PostgreSQL, a DVC remote (a local directory), a Prefect server with a work pool.
Every server a test starts is stopped with all its children, and the test checks none is left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cifar_pipeline.errors import PipelineError
from conftest import REPO, TINY_TRAINING, run_dvc, training_run_id, write_params
from pipeline.process_groups import free_port, group_members, stop_group
from pipeline.servers import Postgres, postgres_bin, start_mlflow_server, start_prefect_server

pytestmark = pytest.mark.slow


def get_json(url: str, body: dict | None = None):
    """GET `url`, or POST `body` as JSON; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def stop_and_check(what: str, pgid: int, stop) -> None:
    """Stop a server (`stop()` returns the processes it had to SIGKILL) and check that it had
    processes before, that SIGTERM (or pg_ctl) ended them all, and that none is left."""
    before = group_members(pgid)
    killed = stop()
    assert before, f"{what}: no process in group {pgid} to stop"
    assert killed == [], f"{what}: processes outlived the stop and had to be killed: {killed}"
    assert group_members(pgid) == [], f"{what}: processes left running"


def file_hashes(root: Path, *dirs: str) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for d in dirs for path in sorted((root / d).rglob("*")) if path.is_file()
    }


# --- MLflow on PostgreSQL ---------------------------------------------------------------------------

@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port, stopped (immediate) afterwards."""
    try:
        postgres_bin()
    except PipelineError as exc:  # `make test` installs it; a missing server is a failure, not a skip
        pytest.fail(str(exc))
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    cluster = Postgres(root, free_port())
    try:
        cluster.start()
        yield cluster
        stop_and_check("PostgreSQL", cluster.pid, lambda: cluster.stop("immediate"))
    finally:
        cluster.stop("immediate")  # a no-op once stopped
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on `postgres`, artifacts proxied to a temp directory; yields (url, artifacts)."""
    work = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = start_mlflow_server(postgres.uri, str(work / "artifacts"), port, work / "server.log")
    try:
        yield f"http://127.0.0.1:{port}", work / "artifacts"
        stop_and_check("mlflow server", server.pid, lambda: stop_group(server))
    finally:
        stop_group(server)  # a no-op once stopped


def test_train_to_register_against_an_mlflow_server_on_postgres(prepared, postgres, mlflow_server, monkeypatch):
    import psycopg

    from cifar_pipeline.cli import main

    url, artifacts = mlflow_server
    project = prepared.parents[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the only change: where MLflow lives
    write_params(project, train={**TINY_TRAINING, "epochs": 1}, export={"int8": False},
                 register={"model_name": "scaleout-test", "min_accuracy": 0.0})
    for stage in ("train", "evaluate", "export", "register"):
        assert main([stage]) == 0, stage

    registry = json.loads((project / "reports/registry.json").read_text())
    run_id = training_run_id(project)
    query = urllib.parse.urlencode({"name": "scaleout-test", "alias": "champion"})
    champion = get_json(f"{url}/api/2.0/mlflow/registered-models/alias?{query}")["model_version"]
    assert (champion["version"], champion["run_id"]) == (registry["version"], run_id) == ("1", run_id)

    # The run and the version are rows in PostgreSQL; the ONNX model is in the server's artifact store.
    with psycopg.connect(postgres.uri) as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
        versions = conn.execute("SELECT version FROM model_versions WHERE name = 'scaleout-test'").fetchall()
    assert status == ("FINISHED",) and versions == [(1,)]
    assert list(artifacts.rglob("model.onnx")), "the ONNX model did not reach the server's artifact store"
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()


# --- DVC remote -------------------------------------------------------------------------------------

def test_dvc_push_then_pull_restores_the_outputs_bit_for_bit(dvc_repo, tmp_path_factory):
    outputs = ("data/raw", "data/prepared")
    run_dvc(dvc_repo, "repro", "download")
    before = file_hashes(dvc_repo, *outputs)
    assert any(name.startswith("data/raw/") for name in before) and any(name.startswith("data/prepared/") for name in before)

    remote = tmp_path_factory.mktemp("dvc-remote")
    run_dvc(dvc_repo, "remote", "add", "-d", "local", str(remote))
    run_dvc(dvc_repo, "push")
    assert any(p.is_file() for p in remote.rglob("*"))

    for path in (".dvc/cache", *outputs):
        shutil.rmtree(dvc_repo / path)
    run_dvc(dvc_repo, "pull", "download")  # only that stage has run (a bare `dvc pull` wants them all)
    assert file_hashes(dvc_repo, *outputs) == before


# --- Prefect server and a work pool -----------------------------------------------------------------

@pytest.fixture
def prefect_api(tmp_path_factory):
    """`prefect server start` on a free loopback port; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    server = start_prefect_server(home, port, home / "server.log")
    try:
        yield f"http://127.0.0.1:{port}/api"
        stop_and_check("prefect server", server.pid, lambda: stop_group(server))
    finally:
        stop_group(server)  # a no-op once stopped


@pytest.fixture
def flow_repo(dvc_repo):
    """The repository copy, with the flows, a one-epoch training and no int8 model."""
    shutil.copytree(REPO / "pipeline", dvc_repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(dvc_repo, train={"epochs": 1, "batch_size": 64}, export={"int8": False}, register={"min_accuracy": 0.0})
    dvc_yaml = dvc_repo / "dvc.yaml"
    lines = dvc_yaml.read_text().splitlines(keepends=True)
    dvc_yaml.write_text("".join(line for line in lines if "models/model.int8.onnx" not in line))  # as dvc.yaml says
    return dvc_repo


PREFECT = str(Path(sys.executable).parent / "prefect")


def run_client(repo: Path, env: dict, *command: str) -> None:
    """Run `command` in `repo` as a client of the Prefect server that env's PREFECT_API_URL names."""
    out = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(command[1:])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def flow_runs(api: str) -> list[dict]:
    return get_json(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["cifar10-pipeline"]}}, "sort": "START_TIME_ASC"})


def task_runs(api: str, flow_run_id: str) -> list[dict]:
    return get_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


def test_flow_runs_against_a_prefect_server_and_from_a_work_pool(flow_repo, prefect_api, tmp_path_factory):
    # A subprocess: Prefect reads PREFECT_API_URL when it is imported.
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-client")),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    run_client(flow_repo, env, sys.executable, "-m", "pipeline.flow", "--download-retries", "0")

    [run] = flow_runs(prefect_api)
    assert run["state_type"] == "COMPLETED"
    tasks = task_runs(prefect_api, run["id"])
    assert sorted(t["name"] for t in tasks) == sorted(f"dvc repro {s}" for s in ("download", "train", "evaluate", "export", "register"))
    assert {t["state_type"] for t in tasks} == {"COMPLETED"}

    # The README's work pool: a deployment, and a worker that runs it (every stage cached by now).
    run_client(flow_repo, env, PREFECT, "work-pool", "create", "gpu", "--type", "process")
    run_client(flow_repo, env, PREFECT, "--no-prompt", "deploy", "pipeline/flow.py:pipeline", "--name", "cifar10-pipeline", "--pool", "gpu")
    run_client(flow_repo, env, PREFECT, "deployment", "run", "cifar10-pipeline/cifar10-pipeline")
    run_client(flow_repo, env, PREFECT, "worker", "start", "--pool", "gpu", "--run-once")
    _, deployed = flow_runs(prefect_api)
    assert deployed["deployment_id"] and deployed["state_type"] == "COMPLETED", deployed["state"]
    assert len(task_runs(prefect_api, deployed["id"])) == 5
