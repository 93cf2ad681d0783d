"""Distributed training: two gloo processes under torchrun on the CPU, held against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from cifar_pipeline import engine
from cifar_pipeline.cli import main
from cifar_pipeline.config import load_section
from cifar_pipeline.dataset import load_manifest, load_split
from cifar_pipeline.distributed import Ranks, sync_batchnorm
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.loader import DeviceLoader, rank_slice
from cifar_pipeline.tracking import tracking_uri
from cifar_pipeline.train import build_training
from conftest import training_run_id, write_params

# 300 training images: 5 steps of 60, 30 per process. fp32, so that two processes and one agree.
TWO_PROCESS_TRAINING = {"epochs": 1, "batch_size": 60, "lr": 0.01, "precision": "fp32", "eval_every": 1}


def runs_in(experiment: str = "cifar10-resnet") -> list:
    client = MlflowClient(tracking_uri())
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def cifar_pipeline(project, *args: str, launcher: tuple[str, ...] = ("-m", "cifar_pipeline"), env: dict | None = None):
    command = [sys.executable, *launcher, *args]
    return subprocess.run(command, cwd=project, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


# --- the loader's shards ----------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3])
def test_the_processes_slices_make_up_the_single_process_batches(world_size):
    images = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    options = dict(device="cpu", mean=(0.5,) * 3, std=(0.5,) * 3, augment=True, seed=7)
    whole = DeviceLoader(images, np.arange(100), 32, **options)
    parts = [DeviceLoader(images, np.arange(100), 32, rank=r, world_size=world_size, **options) for r in range(world_size)]
    for loader in (whole, *parts):
        loader.set_epoch(3)
    seen = []
    for (x, y), *slices in zip(whole, *parts, strict=True):
        assert torch.equal(torch.cat([s[0] for s in slices]), x)  # the same images, crops and flips
        assert torch.equal(torch.cat([s[1] for s in slices]), y)
        seen += [s[1].tolist() for s in slices]
    assert sorted(sum(seen, [])) == list(range(100))  # disjoint shards that make up the epoch
    assert [len(s) for s in seen[:world_size]] == [len(range(32)[rank_slice(32, r, world_size)]) for r in range(world_size)]


def test_the_global_batch_must_split_evenly_and_syncbatchnorm_needs_cuda():
    ranks = Ranks(torch.device("cpu"), rank=0, world_size=3)
    assert ranks.per_process_batch(66) == 22
    with pytest.raises(PipelineError, match="train.batch_size 64 does not split evenly over 3 processes"):
        ranks.per_process_batch(64)
    with pytest.raises(PipelineError, match="sync_batchnorm needs CUDA"):
        sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), ranks)


def test_nproc_under_torchrun_is_refused(project, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2"]) == 1
    assert "under torchrun leave it out" in capsys.readouterr().err


# --- two processes against one ----------------------------------------------------------------

class PerProcessBatchNorm(nn.Module):
    """One process computing what `world_size` DistributedDataParallel processes with per-process
    BatchNorm compute: each process's slice of the batch normalized by its own statistics, and the
    running statistics those rank 0's slice leaves (DDP gives every process rank 0's buffers at
    each forward pass). The loss over the whole batch is then the mean of the slices' losses, and
    its gradient the average DDP takes."""

    def __init__(self, model: nn.Module, world_size: int):
        super().__init__()
        self.model, self.world_size = model, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slices = [x[rank_slice(len(x), r, self.world_size)] for r in range(self.world_size)]
        outputs = [self.model(slices[0])]
        rank0_buffers = {(module, name): buffer for module in self.model.modules()
                         for name, buffer in module.named_buffers(recurse=False)}
        for (module, name), buffer in rank0_buffers.items():  # the other slices update copies, thrown away
            setattr(module, name, buffer.clone())
        outputs += [self.model(s) for s in slices[1:]]
        for (module, name), buffer in rank0_buffers.items():
            setattr(module, name, buffer)
        return torch.cat(outputs)


def train_one_process(world_size: int) -> tuple[dict, float]:
    """One epoch in this process, as `world_size` processes with per-process BatchNorm would
    train it: (the weights and buffers, the epoch's loss). It computes with as many threads as
    each of those processes (distributed.join): oneDNN's results depend on the thread count, by
    up to 1e-3 in these weights after five steps."""
    model_cfg, train_cfg = load_section("model"), load_section("train")
    splits = {"train": load_split("train"), "test": load_split("test")}
    t = build_training(model_cfg, train_cfg, splits, len(load_manifest()["class_names"]), Ranks(torch.device("cpu")))
    t.train_batches.set_epoch(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    try:
        stats = engine.train_epoch(PerProcessBatchNorm(t.net, world_size), t.train_batches, t.optimizer, t.scheduler,
                                   device=torch.device("cpu"), dtype=None)
    finally:
        torch.set_num_threads(threads)
    return t.model.state_dict(), stats.loss


@pytest.mark.slow
def test_two_processes_log_one_run_and_train_the_weights_one_process_would(prepared):
    """BatchNorm is per process here (SyncBatchNorm runs on CUDA only), so the one process it is
    held against normalizes each process's half of a batch on its own (PerProcessBatchNorm)."""
    project = prepared.parents[1]
    write_params(project, train=TWO_PROCESS_TRAINING)
    out = cifar_pipeline(project, "train", "--nproc", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "in 2 processes of 30 images per step" in out.stderr

    [run] = runs_in()
    assert run.info.status == "FINISHED" and run.data.tags["processes"] == "2"
    assert training_run_id(project) == run.info.run_id
    assert [m.step for m in MlflowClient(tracking_uri()).get_metric_history(run.info.run_id, "train_loss")] == [1]
    report = json.loads((project / "reports/train.json").read_text())
    assert report["epochs"] == 1 and report["images_per_s"] > 0 and report["test_accuracy"] is not None

    trained = torch.load(project / "models/model.pt", weights_only=True)["state_dict"]
    expected, loss = train_one_process(world_size=2)
    assert trained.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor.float() if tensor.is_floating_point() else tensor,
                                   atol=1e-5, rtol=1e-4, msg=name)
    assert report["train_loss"] == pytest.approx(loss, abs=1e-5)


FAIL_IN_RANK_1 = """
    import os
    if os.environ.get("RANK") == "1":  # only in the training process of rank 1 that torchrun starts
        from cifar_pipeline import loader
        from cifar_pipeline.errors import PipelineError

        batches = loader.DeviceLoader.__iter__

        def failing(self):
            for i, batch in enumerate(batches(self)):
                if self.augment and self.epoch == 2 and i == 1:
                    raise PipelineError("rank 1 was told to fail")
                yield batch

        loader.DeviceLoader.__iter__ = failing
"""


@pytest.mark.slow
def test_a_failing_process_stops_all_with_its_error_and_torchrun_resumes(prepared, tmp_path):
    project = prepared.parents[1]
    write_params(project, train={**TWO_PROCESS_TRAINING, "epochs": 2})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(FAIL_IN_RANK_1))
    start = time.monotonic()
    failed = cifar_pipeline(project, "train", "--nproc", "2", env={"PYTHONPATH": str(hook)})
    assert failed.returncode == 1 and time.monotonic() - start < 90, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == "error: rank 1 was told to fail (process 1 of 2)"
    assert not (project / "models/model.pt").exists()
    checkpoint = torch.load(project / "models/checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1

    # A plain torchrun launch picks the training up where it stopped, in the same MLflow run.
    resumed = cifar_pipeline(project, "train", "--resume",
                             launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                       "-m", "cifar_pipeline"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [run] = runs_in()
    assert run.info.run_id == checkpoint["run_id"] and run.info.status == "FINISHED"
    history = MlflowClient(tracking_uri()).get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert (project / "models/model.pt").exists()
