"""models/checkpoint.pt: what a training needs to resume after its last finished epoch.

Rank 0 writes it after every epoch: the weights, the optimizer's and the schedule's state, the RNG
states, every epoch's row of the curve so far, the model and train params it was trained with
(a resume with other params is refused) and the MLflow run id (a resume continues that run).
models/model.pt (checkpoint.py) is the trained model; this file is the training's state.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cifar_pipeline.atomic import atomic_file
from cifar_pipeline.errors import PipelineError

CHECKPOINT_PATH = Path("models/checkpoint.pt")


def save_checkpoint(path: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, history: list[dict], config: dict, run_id: str) -> None:
    payload = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "history": history,
        "config": config,
        "run_id": run_id,
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(config: dict, path: Path = CHECKPOINT_PATH) -> dict:
    """The checkpoint to resume from; it must have been written with the same model and train params."""
    if not path.exists():
        raise PipelineError(f"{path} not found: nothing to resume; run `cifar-pipeline train` without --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"{path} is unreadable ({type(exc).__name__}); delete it and train without --resume") from None
    for section in ("model", "train"):
        for key, value in config[section].items():
            saved = checkpoint["config"][section].get(key)
            if saved != value:
                raise PipelineError(
                    f"{section}.{key} is {value!r} in params but {saved!r} in {path}; "
                    "restore it to resume, or train without --resume to start over"
                )
    return checkpoint


def restore_checkpoint(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> None:
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])  # moves its state to the parameters' device
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
