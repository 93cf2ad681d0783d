"""The training core: device and precision choices, one epoch of SGD, and evaluation.

Imports only torch (and the standard library), so it runs, benchmarks and tests anywhere torch
runs. Everything that touches params.yaml, files or MLflow lives in train.py around it.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cifar_pipeline.errors import PipelineError

# On a GPU the per-step losses stay on the device and are read back (a sync) only every
# GPU_SYNC_EVERY steps: often enough to stop a diverging run at once, rare enough not to stall
# the GPU. On the CPU a read-back costs nothing, so the loss is checked at every step.
GPU_SYNC_EVERY = 10


# --- where and how to compute ---------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is cuda but no CUDA device is available; set train.device to auto or cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Without it oneDNN
    emulates bf16 and autocast makes training slower, not faster."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.precision, or None for plain fp32.
    auto: bf16 on CUDA devices that support it and on CPUs with native bf16."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu: {model or platform.processor() or platform.machine()}"


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool, compile: bool) -> nn.Module:
    """Move the model to the device and layout it trains in; returns the module to call
    (compiled when asked; the original's weights are shared with it)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    return torch.compile(model) if compile else model


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors held since the last reset. CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- optimizer and schedule -----------------------------------------------------------------

def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.SGD:
    # Weight decay on every parameter, BatchNorm's included, as in the seed.
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def make_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, epochs: int, steps_per_epoch: int,
                   lr: float, step_size: int, gamma: float) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule stepped after every optimizer step. `step` decays every `step_size` epochs,
    so its learning rate in each epoch is exactly that of the seed's per-epoch StepLR."""
    total = epochs * steps_per_epoch
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size * steps_per_epoch, gamma=gamma)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    raise ValueError(f"unknown schedule {schedule!r}")


# --- training and evaluation ----------------------------------------------------------------

class NonFiniteLoss(PipelineError):
    def __init__(self, step: int):
        super().__init__(f"the loss became NaN or infinite at step {step}")
        self.step = step


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    images: int
    grad_norm_first_stage: float  # mean over the epoch's steps
    grad_norm_last_stage: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


# progress(steps done, steps in the epoch, mean loss so far, accuracy so far, images/s so far)
Progress = Callable[[int, int, float, float, float], None]

# In distributed training: a tensor averaged over all the processes (an all-reduce).
Average = Callable[[torch.Tensor], torch.Tensor]


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    label_smoothing: float = 0.0,
    watched_stages: tuple[nn.Module, nn.Module] | None = None,
    progress: Progress | None = None,
    average: Average | None = None,
) -> EpochStats:
    """One pass over `batches`. Raises NonFiniteLoss (naming the 1-based step) when the loss
    stops being finite. `watched_stages` (first, last) get their gradient norms averaged.
    `average` (distributed training) turns each step's loss into the whole global batch's before
    it is checked, so every process sees the same losses and all stop at the same step.
    Accuracy, images and seconds stay this process's own."""
    model.train()
    steps = len(batches)
    losses = torch.zeros(steps, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    grad_norms = torch.zeros(2, device=device)
    images, checked = 0, 0
    sync_every = 1 if device.type == "cpu" else GPU_SYNC_EVERY
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        with autocast(device, dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if watched_stages is not None:
            grad_norms += torch.stack([stage_grad_norm(stage) for stage in watched_stages])
        optimizer.step()
        scheduler.step()

        losses[step] = loss.detach()
        correct += (logits.argmax(1) == y).sum()
        images += len(y)
        if step + 1 == steps or (step + 1) % sync_every == 0:
            if average is not None:
                losses[checked:step + 1] = average(losses[checked:step + 1])
            checked = _check_finite(losses, checked, step + 1)
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(step + 1, steps, losses[:step + 1].mean().item(), correct.item() / images, images / elapsed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    mean_norms = (grad_norms / steps).tolist()
    return EpochStats(losses.mean().item(), correct.item() / images, seconds, images, *mean_norms)


def stage_grad_norm(stage: nn.Module) -> torch.Tensor:
    """The L2 norm of all of a stage's gradients together."""
    return torch.nn.utils.get_total_norm([p.grad for p in stage.parameters() if p.grad is not None])


def _check_finite(losses: torch.Tensor, checked: int, upto: int) -> int:
    """Raise NonFiniteLoss at the first non-finite loss in losses[checked:upto]; returns upto."""
    bad = (~torch.isfinite(losses[checked:upto])).nonzero()
    if len(bad):
        raise NonFiniteLoss(checked + int(bad[0]) + 1)
    return upto


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             device: torch.device, dtype: torch.dtype | None, average: Average | None = None) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over `batches`, in eval mode; with `average`, over
    every process's batches."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in batches:
        with autocast(device, dtype):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(count, dtype=torch.float64, device=device)])
    if average is not None:
        totals = average(totals)  # means of the sums: their ratios are those of the sums
    loss_total, correct_total, count_total = totals.tolist()
    return loss_total / count_total, correct_total / count_total
