"""Shared fixtures: a tiny CIFAR-10 archive served over HTTP on 127.0.0.1, and a project
directory (params.yaml pointing at that archive) to run stages in."""

from __future__ import annotations

import functools
import http.server
import os
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


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_archive, http_server) -> Path:
    """An empty project directory (the cwd during the test) whose params.yaml downloads the
    tiny archive from the local HTTP server, with fast retries."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    write_params(
        tmp_path,
        data={"url": f"{http_server}/{tiny_archive[0].name}", "md5": tiny_archive[1],
              "retries": 1, "retry_backoff_s": 0.01, "timeout_s": 10},
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def prepared(project) -> Path:
    """`project` after the download stage has run: data/prepared exists."""
    from cifar_pipeline.cli import main

    assert main(["download"]) == 0
    return project / "data" / "prepared"


def run_dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real `dvc` CLI, with this venv's `cifar-pipeline` first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([Path(sys.executable).parent / "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
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
