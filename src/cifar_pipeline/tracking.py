"""Where MLflow lives, and the hand-off of one run between stages (models/run.json).

The default store is sqlite:///mlflow.db in the project root with artifacts in mlartifacts/,
both anchored to absolute paths so that every stage, and the MLflow UI, see the same store.
MLFLOW_TRACKING_URI overrides it (a tracking server, say).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

from cifar_pipeline.atomic import write_json
from cifar_pipeline.errors import PipelineError

RUN_FILE = Path("models/run.json")


def project_root() -> Path:
    return Path.cwd().resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def setup_mlflow():
    """Import mlflow pointed at the tracking URI; returns the module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created with its artifacts under the project's mlartifacts/
    when it does not exist yet (only for a local store; a server decides for itself)."""
    mlflow = setup_mlflow()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri().startswith("sqlite:"):
        location = (project_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def write_run_handoff(run_id: str, experiment_id: str, path: Path = RUN_FILE) -> None:
    write_json(path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri()})


def read_run_handoff(path: Path = RUN_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found; run `cifar-pipeline train` (or `dvc repro train`) first")
    return json.loads(path.read_text())


def git_state() -> dict[str, str]:
    """The commit and whether the tree has uncommitted changes ('unknown' outside a git repo)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


@contextlib.contextmanager
def resume_run(path: Path = RUN_FILE):
    """Reopen the training's MLflow run (models/run.json) so a later stage appends to it;
    yields (mlflow, run). The run keeps its FINISHED status when the block ends."""
    handoff = read_run_handoff(path)
    mlflow = setup_mlflow()
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.start_run(run_id=handoff["run_id"])
    except MlflowException:
        raise PipelineError(
            f"MLflow run {handoff['run_id']} (from {path}) is not in the tracking store {tracking_uri()}; "
            f"set MLFLOW_TRACKING_URI to {handoff.get('tracking_uri')} or train again"
        ) from None
    with run:
        yield mlflow, run
