"""Training throughput: the project's loop against the seed article's own loop, same data, one run.

    python bench/train_throughput.py [ARCHIVE] [--steps 100] [--device auto]      (or: make bench-train ARGS=...)

ARCHIVE is a CIFAR-10 archive in the official python layout (cifar-10-python.tar.gz, or a
rebuilt one such as ../shared/datasets' build_cifar10_archive.py makes), or the
cifar-10-batches-py directory extracted from one. Both loops train the same SimpleResNet
(175,258 parameters) with SGD at batch 128, for --warmup untimed then --steps timed steps:

  seed     torchvision CIFAR10 + DataLoader(num_workers=2, shuffle) + PIL RandomHorizontalFlip,
           RandomCrop(32, padding=4), ToTensor, Normalize; fp32; loss.item() every step
  project  cifar_pipeline's DeviceLoader + engine.train_epoch: uint8 data on the device,
           batched crop/flip there; channels_last and bf16 autocast where --precision auto picks it
  model    the project's step on one fixed batch, no loader at all: the ceiling for the project

The loops run --rounds times, interleaved, and each keeps its best rate: on a shared machine
other processes only ever slow a loop down. Needs only torch, torchvision and numpy (and the
package's core modules), so it runs on a bare GPU machine too. Prints images/s for each, the
project/seed ratio, and seconds per 50,000-image epoch.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cifar_pipeline import engine  # noqa: E402
from cifar_pipeline.loader import DeviceLoader  # noqa: E402
from cifar_pipeline.model import SimpleResNet  # noqa: E402

BATCH = 128
MEAN = STD = (0.5, 0.5, 0.5)  # the seed's normalization
EPOCH_IMAGES = 50_000


class RebuiltCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10, loading exactly as the seed's does, minus the md5 checks of the
    official files (a rebuilt archive has the same layout but other bytes; md5 None skips them)."""

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


def dataset_root(source: Path, scratch: Path) -> Path:
    """A directory holding cifar-10-batches-py/, extracting the archive into `scratch` if needed."""
    if source.is_dir():
        return source.parent if source.name == "cifar-10-batches-py" else source
    with tarfile.open(source) as tar:
        tar.extractall(scratch, filter="data")
    return scratch


class Steps:
    """The first `n` batches of a DeviceLoader, running on into further epochs when needed."""

    def __init__(self, loader: DeviceLoader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        done, epoch = 0, 0
        while True:
            epoch += 1
            self.loader.set_epoch(epoch)
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.n:
                    return


def seed_loop(root: Path, device: torch.device, warmup: int, steps: int) -> float:
    """The seed article's loop, verbatim but for the step limit; returns images/s."""
    transform = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4), T.ToTensor(), T.Normalize(MEAN, STD)])
    trainset = RebuiltCIFAR10(root=str(root), train=True, download=False, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=BATCH, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    model = SimpleResNet().to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    running_loss, done, images, start = 0.0, 0, 0, None
    while done < warmup + steps:
        for inputs, labels in trainloader:
            if done == warmup:
                start = time.perf_counter()
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done += 1
            images += len(labels) if done > warmup else 0
            if done == warmup + steps:
                break
    return images / (time.perf_counter() - start)


def project_setup(device: torch.device, precision: str, channels_last: bool, compile: bool):
    torch.manual_seed(0)
    model = SimpleResNet()
    net = engine.prepare_model(model, device, channels_last=channels_last, compile=compile)
    optimizer = engine.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    scheduler = engine.make_scheduler(optimizer, schedule="step", epochs=50, steps_per_epoch=391, lr=0.1,
                                      step_size=30, gamma=0.1)
    dtype = engine.resolve_precision(precision, device)

    def run(batches) -> engine.EpochStats:
        return engine.train_epoch(net, batches, optimizer, scheduler, device=device, dtype=dtype,
                                  watched_stages=(model.stage(0), model.stage(-1)))

    return run, dtype


def project_loop(dataset: RebuiltCIFAR10, device, warmup, steps, precision, channels_last, compile) -> float:
    train, _ = project_setup(device, precision, channels_last, compile)
    loader = DeviceLoader(dataset.data, dataset.targets, BATCH, device=device, mean=MEAN, std=STD, augment=True,
                          crop_padding=4, flip=True, seed=0, channels_last=channels_last)
    train(Steps(loader, warmup))
    return train(Steps(loader, steps)).images_per_s


def model_alone(device, warmup, steps, precision, channels_last, compile) -> float:
    train, _ = project_setup(device, precision, channels_last, compile)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), device=device)
    train([(x, y)] * warmup)
    return train([(x, y)] * steps).images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, nargs="?", default=Path("data/raw/cifar-10-python.tar.gz"),
                        help="cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ "
                             "(default: the download stage's data/raw/cifar-10-python.tar.gz)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per loop (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="the project's loop")
    parser.add_argument("--no-channels-last", action="store_true", help="the project's loop in NCHW")
    parser.add_argument("--compile", action="store_true", help="torch.compile the project's model")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run the loops this many times, interleaved, and keep each one's best "
                             "(other processes on a shared machine only ever slow a loop down; default 3)")
    parser.add_argument("--skip-seed", action="store_true", help="only the project's loop and the model alone")
    args = parser.parse_args()
    if not args.archive.exists():
        parser.error(f"{args.archive} not found; run `cifar-pipeline download` or pass an archive's path")

    device = engine.resolve_device(args.device)
    dtype = engine.resolve_precision(args.precision, device)
    channels_last = not args.no_channels_last
    print(f"device {engine.device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"project: {engine.precision_name(dtype)}, channels_last={channels_last}, compile={args.compile}; "
          f"batch {BATCH}, {args.warmup} warm-up + {args.steps} timed steps, best of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as scratch:
        root = dataset_root(args.archive, Path(scratch))
        dataset = RebuiltCIFAR10(root=str(root), train=True, download=False)
        loops = {
            "seed": lambda: seed_loop(root, device, args.warmup, args.steps),
            "project": lambda: project_loop(dataset, device, args.warmup, args.steps, args.precision, channels_last,
                                            args.compile),
            "model": lambda: model_alone(device, args.warmup, args.steps, args.precision, channels_last, args.compile),
        }
        if args.skip_seed:
            del loops["seed"]
        results = {key: 0.0 for key in loops}
        for round in range(1, args.rounds + 1):
            for key, loop in loops.items():
                rate = loop()
                results[key] = max(results[key], rate)
                print(f"  round {round}: {key:8s} {rate:8,.0f} images/s", flush=True)
    labels = {"seed": "seed loop (DataLoader x2 + PIL, fp32)", "project": "project loop (device loader)",
              "model": "model alone (no loader)"}
    for key, rate in results.items():
        print(f"{labels[key]:40s} {rate:10,.0f} images/s  {EPOCH_IMAGES / rate:8.1f} s/epoch")
    if "seed" in results:
        print(f"project / seed: {results['project'] / results['seed']:.2f}x   "
              f"(loader costs {1 - results['project'] / results['model']:.0%} of the model-alone rate)")


if __name__ == "__main__":
    main()
