"""Shared fixtures: a tiny CIFAR-10 archive served over HTTP on 127.0.0.1, and a project
directory (params.yaml pointing at that archive) to run stages in."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cifar_fixture import build_archive

REPO = Path(__file__).resolve().parents[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="session")
def http_root(tmp_path_factory) -> Path:
    """A directory served over HTTP; put files here and fetch them from `http_server`."""
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="session")
def http_server(http_root) -> str:
    """Base URL of a threaded HTTP server on 127.0.0.1 serving `http_root`."""
    handler = functools.partial(_QuietHandler, directory=str(http_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def tiny_archive(http_root) -> tuple[Path, str]:
    """The default tiny archive (300 train, 100 test images) and its md5."""
    path = http_root / "cifar-10-python.tar.gz"
    return path, build_archive(path)


def write_params(project: Path, **sections) -> None:
    """Update params.yaml in `project`: write_params(p, data={"train_size": 100})."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def training_run_id(project: Path) -> str:
    """The MLflow run id the train stage handed on in `project`'s models/run.json."""
    return json.loads((project / "models/run.json").read_text())["run_id"]


def init_project(root: Path, monkeypatch, tiny_archive, http_server) -> Path:
    """Make `root` a project (params.yaml downloading the tiny archive from the local HTTP server,
    with fast retries; its own MLflow store) and the cwd."""
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_params(
        root,
        data={"url": f"{http_server}/{tiny_archive[0].name}", "md5": tiny_archive[1],
              "retries": 1, "retry_backoff_s": 0.01, "timeout_s": 10},
    )
    use_project(root, monkeypatch)
    return root


def use_project(root: Path, monkeypatch) -> None:
    monkeypatch.chdir(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if "mlflow" in sys.modules:  # set_tracking_uri is process-wide and outranks the variable
        sys.modules["mlflow"].set_tracking_uri(uri)


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_archive, http_server) -> Path:
    """An empty project directory (the cwd during the test) whose params.yaml downloads the
    tiny archive from the local HTTP server, with fast retries."""
    return init_project(tmp_path, monkeypatch, tiny_archive, http_server)


@pytest.fixture
def prepared(project) -> Path:
    """`project` after the download stage has run: data/prepared exists."""
    from cifar_pipeline.cli import main

    assert main(["download"]) == 0
    return project / "data" / "prepared"


# A short fp32 training that learns the tiny data (test accuracy near 1) in about a second:
# small batches for enough steps, and a low learning rate so BatchNorm's running statistics
# keep up with the weights.
TINY_TRAINING = {"epochs": 2, "batch_size": 32, "lr": 0.01, "precision": "fp32", "eval_every": 1}


@pytest.fixture
def trained(prepared) -> Path:
    """`prepared` after `cifar-pipeline train` (TINY_TRAINING): models/model.pt, models/run.json,
    reports/train.json and the MLflow run exist. Returns the project directory."""
    from cifar_pipeline.cli import main

    project = prepared.parents[1]
    write_params(project, train=TINY_TRAINING)
    assert main(["train"]) == 0
    return project


@pytest.fixture(scope="session")
def exported_project(tmp_path_factory, tiny_archive, http_server) -> Path:
    """A project after download, train (TINY_TRAINING), evaluate and export, built once per session.
    Use it through `exported`; tests must not change its files, and a test that registers uses a
    register.model_name of its own."""
    from cifar_pipeline.cli import main

    with pytest.MonkeyPatch.context() as monkeypatch:
        root = init_project(tmp_path_factory.mktemp("exported"), monkeypatch, tiny_archive, http_server)
        write_params(root, train=TINY_TRAINING)
        for stage in ("download", "train", "evaluate", "export"):
            assert main([stage]) == 0, stage
    return root


@pytest.fixture
def exported(exported_project, monkeypatch) -> Path:
    """The shared `exported_project` as the cwd, with its MLflow store."""
    use_project(exported_project, monkeypatch)
    return exported_project


def run_dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real `dvc` CLI, with this venv's `cifar-pipeline` first on PATH."""
    from pipeline.dvc_stages import dvc_command, dvc_env

    out = subprocess.run(dvc_command(*args), cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture
def dvc_repo(project) -> Path:
    """`project` made into a copy of this repository (dvc.yaml, code, a fresh DVC repo in git),
    so the real `dvc repro` can run the stages there."""
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for tool in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"]):
        subprocess.run(tool, cwd=project, check=True)
    run_dvc(project, "init", "-q")
    run_dvc(project, "config", "core.analytics", "false")
    return project


def register_model(project: Path, tmp_path: Path, **settings) -> dict:
    """Run `cifar-pipeline register` in `project` (the cwd) with register.* `settings` from a copy of
    its params.yaml in `tmp_path`, so the shared project's params stay as they are. Returns
    reports/registry.json. In `exported`, give each test a model_name of its own."""
    from cifar_pipeline.cli import main

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["register"].update(settings)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["--params", str(path), "register"]) == 0
    return json.loads((project / "reports/registry.json").read_text())
