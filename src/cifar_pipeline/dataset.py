"""The prepared dataset on disk: data/prepared/{train,test}_{images,labels}.npy + manifest.json.

Images are uint8 [N, 32, 32, 3] (RGB, NHWC), labels int64 [N]. np.load of a whole split takes a
fraction of a second, so every stage reads the arrays directly, with no decoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_pipeline.errors import PipelineError

PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def split_files(prepared: Path, split: str) -> tuple[Path, Path]:
    return prepared / f"{split}_images.npy", prepared / f"{split}_labels.npy"


def load_split(split: str, prepared: Path = PREPARED_DIR) -> Split:
    images_path, labels_path = split_files(Path(prepared), split)
    if not images_path.exists() or not labels_path.exists():
        raise PipelineError(f"{images_path} not found; run `cifar-pipeline download` (or `dvc repro download`) first")
    return Split(np.load(images_path), np.load(labels_path))


def load_manifest(prepared: Path = PREPARED_DIR) -> dict:
    path = Path(prepared) / "manifest.json"
    if not path.exists():
        raise PipelineError(f"{path} not found; run `cifar-pipeline download` (or `dvc repro download`) first")
    return json.loads(path.read_text())


def content_digest(splits: dict[str, Split]) -> str:
    """sha256 over every array's shape, dtype and bytes, splits in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(splits):
        for arr in (splits[name].images, splits[name].labels):
            h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()
