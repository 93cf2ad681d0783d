"""REST serving: the registered model behind `mlflow models serve`, answering as the ONNX session
does, and stopped with every process it started."""

from __future__ import annotations

import csv
import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from cifar_fixture import make_images
from conftest import register_model
from pipeline.process_groups import free_port, group_members, start_group, stop_group, wait_for_http

MODEL_NAME = "serve-test"  # a name of its own in the shared project's registry
MODEL_URI = f"models:/{MODEL_NAME}@champion"
STARTUP_TIMEOUT_S = 120  # 10 to 25 s on two idle cores; more when the tests share them


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
    env = {"PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [venv_bin / "mlflow", "models", "serve", "-m", MODEL_URI, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = start_group(command, log, env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, STARTUP_TIMEOUT_S, log)
        assert group_members(server.pid), "the server's process group is empty"
        images = make_images(1, seed=3)[0][:2]
        answer = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()})
    finally:
        stop_group(server)
    assert group_members(server.pid) == []

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
