"""Tiny archives in the official cifar-10-python.tar.gz layout, made in the tests.

Each class has its own colour and a bright bar in a class-specific place, plus noise: a pattern
that a small network learns within an epoch or two, so later stages can show learning on it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PALETTE = np.array([
    [230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40], [230, 40, 230],
    [40, 230, 230], [140, 70, 20], [250, 250, 250], [20, 20, 20], [128, 128, 128],
], dtype=np.float32)


def make_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images and int labels, classes interleaved."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES)), per_class)
    images = rng.normal(0, 30, size=(len(labels), 32, 32, 3)) + PALETTE[labels][:, None, None, :] * 0.7
    for i, cls in enumerate(labels):
        row = 3 * cls
        images[i, row:row + 3, :, :] = 255  # a horizontal bar, flip-invariant
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane


def build_archive(
    out: Path,
    train_per_class: int = 30,
    test_per_class: int = 10,
    seed: int = 0,
    omit: tuple[str, ...] = (),
    extra_members: list[tarfile.TarInfo] = (),
) -> str:
    """Write the archive to `out`; return its md5."""
    x_train, y_train = make_images(train_per_class, seed)
    x_test, y_test = make_images(test_per_class, seed + 1)
    payloads = {"batches.meta": {"label_names": CLASSES, "num_cases_per_batch": len(y_train) // 5, "num_vis": 3072}}
    for b, idx in enumerate(np.array_split(np.arange(len(y_train)), 5)):
        payloads[f"data_batch_{b + 1}"] = {"batch_label": f"training batch {b + 1} of 5",
                                           "labels": y_train[idx].tolist(), "data": _rows(x_train[idx])}
    payloads["test_batch"] = {"batch_label": "testing batch 1 of 1", "labels": y_test.tolist(), "data": _rows(x_test)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in payloads.items():
            if name in omit:
                continue
            data = pickle.dumps(payload, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra_members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    out.write_bytes(buf.getvalue())
    return hashlib.md5(buf.getvalue()).hexdigest()
