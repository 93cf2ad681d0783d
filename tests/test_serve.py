"""REST serving: the registered model behind `mlflow models serve`, answering as the ONNX session
does, and stopped with every process it started."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import psutil
import pytest

from cifar_fixture import make_images
from conftest import register_model

MODEL_NAME = "serve-test"  # a name of its own in the shared project's registry
MODEL_URI = f"models:/{MODEL_NAME}@champion"
STARTUP_TIMEOUT_S = 120  # 10 to 25 s on two idle cores; more when the tests share them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def processes_in_group(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes whose process group is `pgid`."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def stop_group(server: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM to the server's whole process group, SIGKILL to whatever is left after grace_s."""
    with_signal = signal.SIGTERM
    deadline = time.monotonic() + grace_s
    while processes_in_group(server.pid):
        try:
            os.killpg(server.pid, with_signal)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            with_signal = signal.SIGKILL
    server.wait(timeout=10)


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_the_onnx_session(exported, tmp_path):
    """The shared project's model (real train, evaluate and export stages), registered by the real
    register stage, served over REST."""
    registry = register_model(exported, tmp_path, model_name=MODEL_NAME)
    assert "champion" in registry["aliases"]
    port = free_port()
    log = tmp_path / "serve.log"
    venv_bin = Path(sys.executable).parent  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(venv_bin / "mlflow"), "models", "serve", "-m", MODEL_URI, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as log_file:
        server = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
        assert processes_in_group(server.pid), "the server's process group is empty"
        images = make_images(1, seed=3)[0][:2]
        answer = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()})
    finally:
        stop_group(server)
    assert processes_in_group(server.pid) == []

    session = onnxruntime.InferenceSession(str(exported / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(["probabilities"], {"images": images})[0]
    served = np.asarray(answer["predictions"]["probabilities"], dtype=np.float32)
    assert served.shape == (2, 10)
    np.testing.assert_allclose(served, expected, atol=1e-6)

    # and batch inference from the same registered version agrees
    from cifar_pipeline.cli import main

    np.save(tmp_path / "two.npy", images)
    assert main(["predict", "--model", MODEL_URI, "--input", str(tmp_path / "two.npy"), "--output", str(tmp_path / "two.csv")]) == 0
    with open(tmp_path / "two.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["class_index"]) for r in rows] == expected.argmax(1).tolist()
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], expected.max(1), rtol=1e-5)
