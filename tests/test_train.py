"""The train stage on the tiny fixture: outputs, the MLflow record, resume, the NaN guard."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_pipeline import engine, train_tracking
from cifar_pipeline.checkpoint import load_model
from cifar_pipeline.cli import main
from cifar_pipeline.loader import DeviceLoader
from cifar_pipeline.tracking import tracking_uri
from conftest import TINY_TRAINING, training_run_id, write_params

# Enough to test the mechanics of resuming, at a quarter of the default model's compute.
SMALL_MODEL = {"blocks_per_stage": [1, 1, 1], "widths": [8, 16, 32]}
QUICK_TRAINING = {**TINY_TRAINING, "batch_size": 64}

METRICS = ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "epoch_seconds", "images_per_s",
           "peak_memory_mb", "grad_norm_first_stage", "grad_norm_last_stage"]


def client() -> MlflowClient:
    """A client of this test's store (mlflow.set_tracking_uri, called by an earlier test in this
    process, would otherwise win over MLFLOW_TRACKING_URI)."""
    return MlflowClient(tracking_uri())


def run_of(project):
    return client().get_run(training_run_id(project))


def logged_steps(run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, metric))


def test_two_epochs_lower_the_loss_and_write_every_output(trained):
    curve = list(csv.DictReader((trained / "reports/train_curve.csv").open()))
    assert [row["epoch"] for row in curve] == ["1", "2"]
    assert float(curve[1]["train_loss"]) < float(curve[0]["train_loss"])

    report = json.loads((trained / "reports/train.json").read_text())
    assert report["epochs"] == 2 and report["num_parameters"] == 175_258
    assert report["test_accuracy"] > 0.5 and report["images_per_s"] > 0 and report["precision"] == "fp32"
    assert (trained / "models/checkpoint.pt").exists() and (trained / "reports/train_curve.png").stat().st_size > 0

    payload = torch.load(trained / "models/model.pt", weights_only=True)
    assert payload["class_names"][0] == "airplane" and payload["model_config"]["blocks_per_stage"] == [2, 2, 2]
    model, _, _ = load_model(trained / "models/model.pt")
    assert sum(p.numel() for p in model.parameters()) == 175_258


def test_the_mlflow_run_holds_params_curves_tags_and_datasets(trained):
    run = run_of(trained)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(TINY_TRAINING["lr"])
    assert run.data.params["model.blocks_per_stage"] == "[2, 2, 2]" and "data.url" in run.data.params
    for metric in METRICS:
        assert logged_steps(run.info.run_id, metric) == [1, 2], metric
    manifest = json.loads((trained / "data/prepared/manifest.json").read_text())
    tags = run.data.tags
    assert tags["data_digest"] == manifest["digest"]
    assert tags["torch_version"] == torch.__version__ and tags["device"].startswith("cpu")
    assert {"git_commit", "git_dirty"} <= set(tags)
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"cifar10-train", "cifar10-test"}
    assert manifest["digest"].removeprefix("sha256:").startswith(inputs["cifar10-train"].digest)
    artifacts = {a.path for a in client().list_artifacts(run.info.run_id)}
    assert {"train.json", "train_curve.csv", "train_curve.png"} <= artifacts


def interrupt_at(monkeypatch, where: str, epoch: int) -> None:
    """Raise KeyboardInterrupt in epoch `epoch`: mid-epoch (at its third batch), or after its
    checkpoint was written but before MLflow logged it."""
    if where == "mid-epoch":
        original = DeviceLoader.__iter__

        def batches(self):
            for i, batch in enumerate(original(self)):
                if self.augment and self.epoch == epoch and i == 2:
                    raise KeyboardInterrupt
                yield batch

        monkeypatch.setattr(DeviceLoader, "__iter__", batches)
    else:
        original = train_tracking.TrainingRun.log_epoch

        def log_epoch(self, row):
            if row["epoch"] == epoch:
                raise KeyboardInterrupt
            original(self, row)

        monkeypatch.setattr(train_tracking.TrainingRun, "log_epoch", log_epoch)


@pytest.mark.parametrize("where", ["mid-epoch", "between checkpoint and log"])
def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(prepared, monkeypatch, where):
    project = prepared.parents[1]
    write_params(project, model=SMALL_MODEL, train={**QUICK_TRAINING, "epochs": 3})
    assert main(["train"]) == 0
    uninterrupted = torch.load(project / "models/model.pt", weights_only=True)["state_dict"]
    (project / "models/model.pt").unlink()

    with monkeypatch.context() as patch:
        interrupt_at(patch, where, epoch=2)
        assert main(["train"]) == 130
    checkpoint = torch.load(project / "models/checkpoint.pt", weights_only=True)
    run_id = checkpoint["run_id"]
    assert checkpoint["epoch"] == (1 if where == "mid-epoch" else 2)
    assert client().get_run(run_id).info.status == "KILLED"
    assert not (project / "models/model.pt").exists()

    assert main(["train", "--resume"]) == 0
    assert run_of(project).info.run_id == run_id and run_of(project).info.status == "FINISHED"
    for metric in METRICS:
        assert logged_steps(run_id, metric) == [1, 2, 3], metric
    resumed = torch.load(project / "models/model.pt", weights_only=True)["state_dict"]
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert len((project / "reports/train_curve.csv").read_text().splitlines()) == 1 + 3


def test_resume_refuses_changed_params_and_a_missing_checkpoint(prepared, capsys):
    project = prepared.parents[1]
    write_params(project, model=SMALL_MODEL, train=QUICK_TRAINING)
    assert main(["train", "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train"]) == 0
    capsys.readouterr()
    write_params(project, train={"lr": 0.5})
    assert main(["train", "--resume"]) == 1
    assert capsys.readouterr().err == (
        "error: train.lr is 0.5 in params but 0.01 in models/checkpoint.pt; "
        "restore it to resume, or train without --resume to start over\n"
    )


def test_a_diverging_loss_stops_training_with_one_line(prepared, capsys):
    project = prepared.parents[1]
    write_params(project, model=SMALL_MODEL, train={**QUICK_TRAINING, "lr": 1e30})
    assert main(["train"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the loss became NaN or infinite in epoch 1, step ")
    assert "lower train.lr" in err
    assert not (project / "models/model.pt").exists() and not (project / "models/checkpoint.pt").exists()
    run = client().search_runs([client().get_experiment_by_name("cifar10-resnet").experiment_id])[0]
    assert run.info.status == "FAILED" and "NaN" in run.data.tags["error"]


@pytest.mark.parametrize("section, change, expected", [
    ("model", {"blocks_per_stage": []}, "model.blocks_per_stage"),
    ("model", {"widths": [16, 32]}, "one width per stage"),
    ("train", {"lr": -0.1}, "train.lr"),
    ("train", {"nesterov": True, "momentum": 0}, "nesterov needs momentum > 0"),
])
def test_bad_params_are_rejected_in_one_line(prepared, capsys, section, change, expected):
    project = prepared.parents[1]
    write_params(project, **{section: change})
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (project / "models").exists()


def test_step_schedule_matches_the_seeds_per_epoch_steplr():
    model = torch.nn.Linear(1, 1)
    ours = engine.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0, nesterov=False)
    scheduler = engine.make_scheduler(ours, schedule="step", epochs=7, steps_per_epoch=3, lr=0.1, step_size=2, gamma=0.5)
    seeds = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    seed_scheduler = torch.optim.lr_scheduler.StepLR(seeds, step_size=2, gamma=0.5)
    for _ in range(7):
        assert ours.param_groups[0]["lr"] == pytest.approx(seeds.param_groups[0]["lr"])
        for _ in range(3):
            ours.step()  # no gradients: changes nothing, but keeps the optimizer-then-schedule order
            scheduler.step()
        seeds.step()
        seed_scheduler.step()


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert engine.resolve_precision("auto", cpu) == (torch.bfloat16 if engine.cpu_has_native_bf16() else None)
    assert engine.resolve_precision("fp32", cpu) is None
    assert engine.resolve_precision("bf16", cpu) == torch.bfloat16


@pytest.mark.slow
def test_a_killed_training_resumes_with_every_epoch_logged_once(prepared):
    """The real thing: SIGKILL of the CLI process (no clean-up at all), then --resume."""
    project = prepared.parents[1]
    write_params(project, model=SMALL_MODEL, train={**QUICK_TRAINING, "epochs": 3, "batch_size": 32})
    command = [sys.executable, "-m", "cifar_pipeline", "train"]
    log = (project / "killed.log").open("w")
    process = subprocess.Popen(command, cwd=project, env=os.environ, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (project / "models/checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    assert (project / "models/checkpoint.pt").exists(), (project / "killed.log").read_text()[-2000:]
    checkpoint = torch.load(project / "models/checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] < 3, "training finished before it could be killed"

    resumed = subprocess.run([*command, "--resume"], cwd=project, env=os.environ, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run_id = checkpoint["run_id"]
    assert run_of(project).info.run_id == run_id
    for metric in METRICS:
        assert logged_steps(run_id, metric) == [1, 2, 3], metric


def test_the_core_imports_only_torch_and_numpy():
    """model, loader and engine run where only torch is installed (a bare GPU machine)."""
    code = ("import sys; import cifar_pipeline.model, cifar_pipeline.loader, cifar_pipeline.engine; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'pydantic', 'yaml', 'matplotlib', 'dvc', 'prefect'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
