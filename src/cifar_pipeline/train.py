"""The train stage: the seed's network and recipe on device-resident data, tracked in MLflow.

    data/prepared  ->  models/model.pt         weights + model config + class names
                       models/checkpoint.pt    everything needed to resume (each epoch)
                       models/run.json         the MLflow run, for the stages after this one
                       reports/train.json      final metrics, wall time, images/s
                       reports/train_curve.csv one row per epoch (and train_curve.png)

Each epoch: train (engine.train_epoch), evaluate every `eval_every` epochs, write the
checkpoint, then log the epoch to MLflow. The checkpoint holds every epoch's row, so a resumed
training logs what the interruption left unlogged and never logs an epoch twice.

Under torchrun (distributed.py) every process runs this same loop on its slice of each batch;
rank 0 alone tracks the run in MLflow and writes the checkpoint and the outputs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from cifar_pipeline import distributed, engine
from cifar_pipeline.atomic import write_csv, write_json
from cifar_pipeline.checkpoint import MODEL_PATH, save_model
from cifar_pipeline.config import DataConfig, ModelConfig, TrainConfig
from cifar_pipeline.dataset import PREPARED_DIR, Split, load_manifest, load_split
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.figures import pyplot, save_png
from cifar_pipeline.loader import DeviceLoader
from cifar_pipeline.model import build_model, count_parameters
from cifar_pipeline.training_checkpoint import CHECKPOINT_PATH, load_checkpoint, restore_checkpoint, save_checkpoint
from cifar_pipeline.tracking import git_state, write_run_handoff

log = logging.getLogger(__name__)

REPORT_PATH = Path("reports/train.json")
CURVE_PATH = Path("reports/train_curve.csv")
CURVE_PNG_PATH = Path("reports/train_curve.png")
EVAL_BATCH_SIZE = 500

CURVE_COLUMNS = [
    "epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds",
    "eval_seconds", "images_per_s", "peak_memory_mb", "grad_norm_first_stage", "grad_norm_last_stage",
]


@dataclass
class Training:
    """What one training works with: the model (and the module to call, compiled or not; and
    the one training steps call, the latter wrapped for distributed training), the device
    loaders, the optimizer and the schedule."""
    model: nn.Module
    net: nn.Module
    train_net: nn.Module
    train_batches: DeviceLoader
    test_batches: DeviceLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def run(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig | None = None, *,
        resume: bool = False) -> dict | None:
    """Train, alone or as one of the processes torchrun started. Returns reports/train.json's
    contents (None in the processes other than rank 0)."""
    with distributed.process_group(train_cfg.device) as ranks:
        return train(ranks, model_cfg, train_cfg, data_cfg, resume=resume)


def train(ranks: distributed.Ranks, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig | None, *,
          resume: bool) -> dict | None:
    config = {"model": model_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json")}
    checkpoint = load_checkpoint(config) if resume else None
    device = ranks.device
    dtype = engine.resolve_precision(train_cfg.precision, device)
    manifest = load_manifest()
    splits = {"train": load_split("train"), "test": load_split("test")}
    t = build_training(model_cfg, train_cfg, splits, len(manifest["class_names"]), ranks)
    history: list[dict] = []
    if checkpoint is not None:
        restore_checkpoint(checkpoint, t.model, t.optimizer, t.scheduler, device)
        history = checkpoint["history"]
        log.info("resuming after epoch %d of %d", checkpoint["epoch"], train_cfg.epochs)
    log.info("training on %s (%s, %s), %s parameters, %d epochs of %d steps%s",
             device, engine.device_name(device), engine.precision_name(dtype), f"{count_parameters(t.model):,}",
             train_cfg.epochs, len(t.train_batches), ranks.describe(train_cfg.batch_size))

    from cifar_pipeline.train_tracking import training_run, untracked_run  # MLflow only here, not in the core

    params = {**config, **({"data": data_cfg.model_dump(mode="json")} if data_cfg is not None else {})}
    tags = {**git_state(), "data_digest": manifest["digest"], "device": engine.device_name(device),
            "precision": engine.precision_name(dtype), "torch_version": torch.__version__,
            "num_parameters": str(count_parameters(t.model)), "processes": str(ranks.world_size)}
    tracked = training_run(
        train_cfg.experiment, resume_run_id=checkpoint["run_id"] if checkpoint else None, params=params,
        tags=tags, datasets=splits, data_digest=manifest["digest"], data_source=PREPARED_DIR,
    ) if ranks.is_main else untracked_run()
    with sigterm_as_interrupt(), tracked as mlrun:
        logged = mlrun.logged_epochs()
        for row in history:  # rows checkpointed before an interruption stopped them being logged
            if row["epoch"] not in logged:
                mlrun.log_epoch(row)

        for epoch in range(len(history) + 1, train_cfg.epochs + 1):
            history.append(run_epoch(epoch, t, train_cfg, ranks, dtype))
            if ranks.is_main:
                save_checkpoint(CHECKPOINT_PATH, epoch, t.model, t.optimizer, t.scheduler, history, config, mlrun.run_id)
            mlrun.log_epoch(history[-1])
            log.info(epoch_line(history[-1], train_cfg.epochs))

        if not ranks.is_main:
            return None
        report = write_outputs(t.model, model_cfg, manifest["class_names"], history, device, dtype)
        write_run_handoff(mlrun.run_id, mlrun.experiment_id)
        mlrun.log_artifacts(REPORT_PATH, CURVE_PATH, CURVE_PNG_PATH)
    return report


def build_training(model_cfg: ModelConfig, train_cfg: TrainConfig, splits: dict[str, Split], num_classes: int,
                   ranks: distributed.Ranks) -> Training:
    """Every process builds the same model (same seed) and loaders that yield its slices."""
    ranks.per_process_batch(train_cfg.batch_size)  # fails unless the global batch splits evenly
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, num_classes=num_classes)
    if train_cfg.sync_batchnorm:
        model = distributed.sync_batchnorm(model, ranks)
    net = engine.prepare_model(model, ranks.device, channels_last=train_cfg.channels_last, compile=train_cfg.compile)
    common = dict(device=ranks.device, mean=model_cfg.mean, std=model_cfg.std, channels_last=train_cfg.channels_last,
                  rank=ranks.rank, world_size=ranks.world_size)
    train_batches = DeviceLoader(splits["train"].images, splits["train"].labels, train_cfg.batch_size, augment=True,
                                 crop_padding=train_cfg.crop_padding, flip=train_cfg.flip, seed=train_cfg.seed, **common)
    test_batches = DeviceLoader(splits["test"].images, splits["test"].labels, EVAL_BATCH_SIZE, **common)
    optimizer = engine.make_optimizer(model, lr=train_cfg.lr, momentum=train_cfg.momentum,
                                      weight_decay=train_cfg.weight_decay, nesterov=train_cfg.nesterov)
    scheduler = engine.make_scheduler(optimizer, schedule=train_cfg.schedule, epochs=train_cfg.epochs,
                                      steps_per_epoch=len(train_batches), lr=train_cfg.lr,
                                      step_size=train_cfg.step_size, gamma=train_cfg.gamma)
    return Training(model, net, ranks.wrap(net), train_batches, test_batches, optimizer, scheduler)


def run_epoch(epoch: int, t: Training, cfg: TrainConfig, ranks: distributed.Ranks, dtype: torch.dtype | None) -> dict:
    """Train one epoch (and evaluate when due); returns its row of the curve, over all processes."""
    device = ranks.device
    lr = t.optimizer.param_groups[0]["lr"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t.train_batches.set_epoch(epoch)
    with progress_bar(epoch, cfg.epochs, len(t.train_batches), show=ranks.is_main) as progress:
        try:
            stats = ranks.combine(engine.train_epoch(
                t.train_net, t.train_batches, t.optimizer, t.scheduler, device=device, dtype=dtype,
                label_smoothing=cfg.label_smoothing, watched_stages=(t.model.stage(0), t.model.stage(-1)),
                progress=progress, average=ranks.average,
            ))
        except engine.NonFiniteLoss as exc:
            raise PipelineError(
                f"the loss became NaN or infinite in epoch {epoch}, step {exc.step}; lower train.lr (now {cfg.lr})"
            ) from None
    row = {"epoch": epoch, "lr": lr, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
           "test_loss": None, "test_accuracy": None, "epoch_seconds": stats.seconds, "eval_seconds": 0.0,
           "images_per_s": stats.images_per_s, "peak_memory_mb": engine.peak_memory_mb(device),
           "grad_norm_first_stage": stats.grad_norm_first_stage, "grad_norm_last_stage": stats.grad_norm_last_stage}
    if should_evaluate(epoch, cfg):
        start = time.perf_counter()
        ranks.share_buffers(t.model)
        row["test_loss"], row["test_accuracy"] = engine.evaluate(t.net, t.test_batches, device=device, dtype=dtype,
                                                                 average=ranks.average)
        row["eval_seconds"] = time.perf_counter() - start
    return row


def should_evaluate(epoch: int, cfg: TrainConfig) -> bool:
    """Every `eval_every` epochs, and always after the last one."""
    return epoch == cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0)


# --- outputs ----------------------------------------------------------------------------------

def write_outputs(model, model_cfg: ModelConfig, class_names: list[str], history: list[dict],
                  device: torch.device, dtype: torch.dtype | None) -> dict:
    save_model(MODEL_PATH, model, model_cfg, class_names)
    write_csv(CURVE_PATH, history, CURVE_COLUMNS)
    write_curve_png(history, CURVE_PNG_PATH)
    last = history[-1]
    train_seconds = sum(r["epoch_seconds"] for r in history)
    report = {
        "epochs": last["epoch"],
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "test_loss": last["test_loss"],
        "test_accuracy": last["test_accuracy"],
        "train_seconds": train_seconds,
        "wall_seconds": train_seconds + sum(r["eval_seconds"] for r in history),
        "images_per_s": sum(r["images_per_s"] * r["epoch_seconds"] for r in history) / train_seconds,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
        "device": engine.device_name(device),
        "precision": engine.precision_name(dtype),
        "num_parameters": count_parameters(model),
    }
    write_json(REPORT_PATH, report)
    return report


def write_curve_png(history: list[dict], path: Path) -> None:
    """Loss and accuracy against epoch, viewable without a browser or the internet."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    evaluated = [r for r in history if r["test_accuracy"] is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot([r["epoch"] for r in evaluated], [r["test_loss"] for r in evaluated], label="test")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train (augmented)")
    ax_acc.plot([r["epoch"] for r in evaluated], [r["test_accuracy"] for r in evaluated], label="test")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


# --- progress and interrupts ------------------------------------------------------------------

@contextlib.contextmanager
def progress_bar(epoch: int, epochs: int, steps: int, *, show: bool = True) -> Iterator[engine.Progress]:
    """A tqdm bar on a terminal (nothing otherwise: the epoch's log line says it all)."""
    with tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", disable=None if show else True, leave=False,
              dynamic_ncols=True) as bar:
        def update(done: int, total: int, loss: float, accuracy: float, images_per_s: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", img_s=f"{images_per_s:,.0f}", refresh=False)
            bar.update(done - bar.n)

        yield update


def epoch_line(row: dict, epochs: int) -> str:
    test = "" if row["test_accuracy"] is None else f", test loss {row['test_loss']:.4f}, test acc {row['test_accuracy']:.4f}"
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, train acc {row['train_accuracy']:.4f}"
            f"{test}, lr {row['lr']:.4g}, {row['epoch_seconds']:.1f} s, {row['images_per_s']:,.0f} images/s")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a `kill`, a stopped job) like Ctrl-C, so the run is marked KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
