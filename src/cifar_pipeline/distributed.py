"""Training in several processes with DistributedDataParallel, started by torchrun.

    cifar-pipeline train --nproc N          runs torchrun --standalone --nproc-per-node N on itself
    torchrun [options] -m cifar_pipeline train   any torchrun launch, several machines included

torchrun gives each process RANK, WORLD_SIZE and LOCAL_RANK; a process that finds them joins the
process group (NCCL on CUDA, each process on the GPU of its LOCAL_RANK; gloo on the CPU). Every
process trains on its slice of each global batch (loader.py), DistributedDataParallel averages
the gradients, and rank 0 alone logs and writes files; the other ranks stay quiet.

When a process fails, torchrun stops the others. The failing process writes its one-line error
to the file torchrun names in TORCHELASTIC_ERROR_FILE: torchrun's report shows it, and
`--nproc` raises it again as this command's error. A collective that waits longer than
COLLECTIVE_TIMEOUT fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import tempfile
import time
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist
from torch import nn

from cifar_pipeline import engine
from cifar_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes and its device. One process alone is
    rank 0 of 1, and every method below is then a no-op."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that logs, tracks and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def per_process_batch(self, batch_size: int) -> int:
        if batch_size % self.world_size:
            raise PipelineError(f"train.batch_size {batch_size} does not split evenly over {self.world_size} processes; "
                                f"make it a multiple of {self.world_size}")
        return batch_size // self.world_size

    def describe(self, batch_size: int) -> str:
        """For the log: how the global batch is split; nothing for one process."""
        if not self.distributed:
            return ""
        return f", in {self.world_size} processes of {self.per_process_batch(batch_size)} images per step"

    def wrap(self, net: nn.Module) -> nn.Module:
        """The module the training steps call: `net`, or its DistributedDataParallel wrapper,
        which averages the gradients over the processes during the backward pass."""
        if not self.distributed:
            return net
        device_ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=device_ids)

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor averaged over the processes (engine.Average)."""
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def combine(self, stats: engine.EpochStats) -> engine.EpochStats:
        """An epoch's statistics over every process: accuracy and images of the whole epoch, and
        the seconds of the slowest process. (Losses and gradient norms are already global: the
        losses were averaged at each check, the gradients by DistributedDataParallel.)"""
        if not self.distributed:
            return stats
        counts = torch.tensor([stats.accuracy * stats.images, stats.images], dtype=torch.float64, device=self.device)
        seconds = torch.tensor([stats.seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        correct, images = counts.tolist()
        return dataclasses.replace(stats, accuracy=correct / images, images=round(images), seconds=seconds.item())

    def share_buffers(self, model: nn.Module) -> None:
        """Give every process rank 0's BatchNorm running statistics (with per-process BatchNorm
        each process has updated its own), so that all evaluate the model rank 0 saves."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


def sync_batchnorm(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The model with every BatchNorm normalizing over the whole global batch (all processes)."""
    if ranks.distributed and ranks.device.type != "cuda":
        raise PipelineError("train.sync_batchnorm needs CUDA: torch's SyncBatchNorm runs on GPUs only; "
                            "set it to false to train on the CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if ranks.distributed else model


# --- joining and leaving the process group ----------------------------------------------------

def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Ranks]:
    """This process's Ranks, for train.device `device_name`. Under torchrun with several
    processes: inside the process group, joined here and left on the way out."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        yield Ranks(engine.resolve_device(device_name))
        return
    try:
        yield join(device_name)
    except PipelineError as exc:
        record_error(exc)
        raise
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        cause = re.sub(r"^\[[^\]]*\]\s*", "", str(exc)).split(". ")[0][:200]  # gloo's: "[file:line] what. advice"
        raise PipelineError(f"another training process stopped, so this one did too ({cause})") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def join(device_name: str) -> Ranks:
    """Join the process group torchrun set up in the environment, on this process's device."""
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = engine.resolve_device(device_name)
    if device.type == "cuda":
        if local_world_size > torch.cuda.device_count():
            raise PipelineError(f"{local_world_size} processes on this machine need as many GPUs, but it has "
                                f"{torch.cuda.device_count()}; start at most that many")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:  # the processes share the cores (torchrun alone would give each one thread)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return Ranks(device, rank, world_size, local_rank)


def lost_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because another process went away (which reports why)."""
    return isinstance(exc, dist.DistError) or any(
        sign in str(exc) for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def record_error(exc: PipelineError) -> None:
    """Leave the one-line error where torchrun reads a failed process's error (the format of
    torch.distributed.elastic's error files, with a precise time: the earliest error wins)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": str(exc), "timestamp": time.time(), "exit_code": exc.exit_code}, f)


# --- launching: cifar-pipeline train --nproc N -------------------------------------------------

def launch(nproc: int, cli_args: list[str]) -> None:
    """Run `cifar-pipeline CLI_ARGS` in `nproc` processes on this machine under torchrun (its own
    code, in this process) and wait for them. If one fails, raise its error."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # Set first, so that torchrun does not set 1 with a warning; join() sets the same again.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    with tempfile.TemporaryDirectory(prefix="torchrun-") as logs:
        args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", f"--log-dir={logs}",
                                    "--module", "cifar_pipeline", *cli_args])
        try:
            torchrun.run(args)
        except ChildFailedError as exc:
            raise first_error(exc, nproc) from None
        except SignalException:
            raise KeyboardInterrupt from None


def first_error(exc: ChildFailedError, nproc: int) -> PipelineError:
    """The earliest error a process recorded (record_error); failing that, the first failure
    torchrun saw (a crash with a traceback, a signal)."""
    recorded = {rank: failure.error_file_data for rank, failure in exc.failures.items()
                if "exit_code" in failure.error_file_data}
    if recorded:
        rank = min(recorded, key=lambda r: recorded[r]["timestamp"])
        error = PipelineError(f"{recorded[rank]['message']} (process {rank} of {nproc})")
        error.exit_code = recorded[rank]["exit_code"]
        return error
    rank, failure = exc.get_first_failure()
    cause = failure.message if failure.exitcode < 0 else "its traceback is above"
    return PipelineError(f"training process {rank} of {nproc} failed with exit code {failure.exitcode}; {cause}")
