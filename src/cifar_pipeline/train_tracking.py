"""The MLflow record of one training: a run started (or reopened on --resume), fed one row of
metrics per epoch, and ended FINISHED, FAILED (an error) or KILLED (an interrupt).

Kept apart from the loop so that the loop reads as training only and the core never imports
MLflow.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np

from cifar_pipeline.dataset import Split
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.tracking import ensure_experiment, setup_mlflow, tracking_uri

# The metric whose history says which epochs a run has already logged (every row has it).
EPOCH_MARKER = "train_loss"


class TrainingRun:
    def __init__(self, mlflow, run):
        self._mlflow = mlflow
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id

    def logged_epochs(self) -> set[int]:
        history = self._mlflow.tracking.MlflowClient().get_metric_history(self.run_id, EPOCH_MARKER)
        return {m.step for m in history}

    def log_epoch(self, row: dict) -> None:
        """All of an epoch's metrics in one call (one transaction in the store), at step = epoch."""
        metrics = {k: float(v) for k, v in row.items() if k != "epoch" and v is not None}
        self._mlflow.log_metrics(metrics, step=int(row["epoch"]))

    def log_artifacts(self, *paths: Path) -> None:
        for path in paths:
            self._mlflow.log_artifact(str(path))


@contextlib.contextmanager
def training_run(
    experiment: str,
    *,
    resume_run_id: str | None,
    params: dict[str, dict],
    tags: dict[str, str],
    datasets: dict[str, Split],
    data_digest: str,
    data_source: Path,
) -> Iterator[TrainingRun]:
    """A new run holding every param (flattened as section.key), the tags and the datasets as
    inputs; or, with `resume_run_id`, that run reopened. The run ends KILLED on an interrupt,
    FAILED on any other exception, FINISHED otherwise."""
    mlflow = setup_mlflow()
    if resume_run_id is not None:
        try:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=True)
        except mlflow.exceptions.MlflowException:
            raise PipelineError(
                f"the checkpoint's MLflow run {resume_run_id} is not in the store {tracking_uri()}; "
                "point MLFLOW_TRACKING_URI at the store it was started in, or train without --resume"
            ) from None
    else:
        run = mlflow.start_run(experiment_id=ensure_experiment(experiment), log_system_metrics=True)
        mlflow.log_params(flatten_params(params))
        _log_datasets(mlflow, datasets, data_digest, data_source)
    mlflow.set_tags(tags)
    try:
        yield TrainingRun(mlflow, run)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag("error", str(exc)[:5000])
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


class Untracked:
    """What the processes other than rank 0 of a distributed training track: nothing."""
    run_id = None

    def logged_epochs(self) -> set[int]:
        return set()

    def log_epoch(self, row: dict) -> None:
        pass

    def log_artifacts(self, *paths: Path) -> None:
        pass


@contextlib.contextmanager
def untracked_run() -> Iterator[Untracked]:
    yield Untracked()


def flatten_params(params: dict[str, dict]) -> dict[str, object]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}; lists become their text."""
    return {f"{section}.{key}": value for section, values in params.items() for key, value in values.items()}


def _log_datasets(mlflow, datasets: dict[str, Split], digest: str, source: Path) -> None:
    """Each split as a run input, named by split, carrying the prepared data's digest (the store
    keeps 36 characters of it; the full digest is the data_digest tag)."""
    from mlflow.data.sources import LocalArtifactDatasetSource

    short = digest.removeprefix("sha256:")[:32]
    for name, split in datasets.items():
        dataset = mlflow.data.from_numpy(
            features=split.images, targets=np.asarray(split.labels),
            source=LocalArtifactDatasetSource(str(source.resolve())), name=f"cifar10-{name}", digest=short,
        )
        mlflow.log_input(dataset, context="training" if name == "train" else "testing")
