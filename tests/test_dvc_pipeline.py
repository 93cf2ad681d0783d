"""`dvc repro` of the pipeline in a temporary copy of the repository."""

from __future__ import annotations

import json

from conftest import run_dvc


def test_dvc_repro_runs_download_then_does_nothing(dvc_repo):
    run_dvc(dvc_repo, "repro", "download")
    manifest = json.loads((dvc_repo / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 300
    lock = (dvc_repo / "dvc.lock").read_text()
    assert "download:" in lock and "data/prepared" in lock

    again = run_dvc(dvc_repo, "repro", "download")
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout
    assert "Running stage 'download'" not in again.stdout
    status = run_dvc(dvc_repo, "status", "download")
    assert "up to date" in status.stdout
