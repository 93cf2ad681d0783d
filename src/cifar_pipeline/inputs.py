"""What `predict` reads: image files in any format Pillow opens, and uint8 image arrays.

Every image becomes uint8 [32, 32, 3] RGB, the serving contract's input:
- the first frame, turned upright by its EXIF orientation;
- transparent pixels composited onto white; 16-bit grayscale reduced to its top 8 bits; any other
  mode (grayscale, palette, CMYK, ...) converted to RGB by Pillow;
- the whole image resized to 32x32, aspect ratio not kept, with Pillow's bilinear filter, which
  averages over the source pixels when shrinking (antialiased). JPEGs larger than 64x64 are first
  shrunk by the JPEG decoder itself (DCT scaling, to no less than 64x64), which is much faster.
Images that already are 32x32 RGB (CIFAR itself) go straight through, pixel for pixel.

Arrays: .npy or .npz files of uint8 [N, 32, 32, 3]. A .npy file is memory-mapped, so it may be
larger than memory; an .npz file is read one member at a time: its `images` member, or its only one.

plan_batches turns the files into batches of image files and of array rows, each read only when
a worker calls its `read`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from cifar_pipeline.errors import ConfigError

SIZE = (32, 32)
RESAMPLE = Image.Resampling.BILINEAR
DRAFT_SIZE = (64, 64)
BACKGROUND = (255, 255, 255)
ARRAY_SUFFIXES = (".npy", ".npz")
NPZ_MEMBER = "images"


class UnreadableInput(Exception):
    """A file that cannot be read or decoded; the message is the reason, for the errors file."""


# --- finding the input ----------------------------------------------------------------------

def iter_files(root: Path) -> Iterator[Path]:
    """`root` itself if it is a file, else every file below it (recursively, in sorted order,
    hidden files and folders skipped), one at a time."""
    root = check_input(root)
    if root.is_file():
        yield root
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder, name)


def check_input(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root}: no such file or directory; give an image folder, an image, or a .npy/.npz file")
    return root


def is_array_file(path: Path) -> bool:
    return path.suffix.lower() in ARRAY_SUFFIXES


# --- images ---------------------------------------------------------------------------------

def load_image(path: Path) -> np.ndarray:
    """The image at `path` as uint8 [32, 32, 3] RGB; raises UnreadableInput with the reason."""
    try:
        with Image.open(path) as img:
            if img.size == SIZE and img.mode == "RGB" and "exif" not in img.info:
                return np.asarray(img)
            return np.asarray(_to_rgb_32(img))
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        raise UnreadableInput(_reason(exc)) from None


def _to_rgb_32(img: Image.Image) -> Image.Image:
    img.draft("RGB", DRAFT_SIZE)  # a no-op for anything but a JPEG larger than DRAFT_SIZE
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits (Pillow's convert would clip at 255)
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    img = img.convert("RGB")
    return img.resize(SIZE, RESAMPLE) if img.size != SIZE else img


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- arrays ---------------------------------------------------------------------------------

def open_array(path: Path) -> np.ndarray:
    """The uint8 [N, 32, 32, 3] images of a .npy (memory-mapped) or .npz file."""
    try:
        if path.suffix.lower() == ".npy":
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                images = npz[_npz_member(npz.files)]
    except UnreadableInput:
        raise
    except Exception as exc:  # numpy raises ValueError, OSError, zipfile.BadZipFile, EOFError, ...
        raise UnreadableInput(_reason(exc)) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (*SIZE, 3):
        raise UnreadableInput(
            f"expected uint8 [N, 32, 32, 3] RGB images, got {images.dtype} {list(images.shape)}"
        )
    return images


def _npz_member(names: list[str]) -> str:
    if NPZ_MEMBER in names:
        return NPZ_MEMBER
    if len(names) == 1:
        return names[0]
    raise UnreadableInput(f"an .npz needs a member named '{NPZ_MEMBER}' or exactly one member; it has {', '.join(names) or 'none'}")


# --- batches: what predict's workers read ----------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """An input that could not be read, and why."""

    path: str
    reason: str


@dataclass
class BatchPlan:
    """A batch to be: its items, how to read their images, and failures found while planning."""

    paths: list[str]
    indices: list[int | None]
    read: Callable[[], tuple[np.ndarray, dict[int, str]]]  # the images, and {position: reason} for unreadable ones
    failures: list[Failure] = field(default_factory=list)


def plan_batches(files: Iterable[Path], batch_size: int) -> Iterator[BatchPlan]:
    """Batches of image files and of array rows, in input order, planned lazily."""
    images: list[Path] = []
    for path in files:
        if not is_array_file(path):
            images.append(path)
            if len(images) == batch_size:
                yield _image_plan(images)
                images = []
            continue
        if images:
            yield _image_plan(images)
            images = []
        yield from _array_plans(path, batch_size)
    if images:
        yield _image_plan(images)


def _image_plan(paths: list[Path]) -> BatchPlan:
    return BatchPlan([str(p) for p in paths], [None] * len(paths), functools.partial(_decode, paths))


def _decode(paths: list[Path]) -> tuple[np.ndarray, dict[int, str]]:
    images, failed = np.empty((len(paths), *SIZE, 3), np.uint8), {}
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path)
        except UnreadableInput as exc:
            failed[i] = str(exc)
    return images, failed


def _array_plans(path: Path, batch_size: int) -> Iterator[BatchPlan]:
    try:
        array = open_array(path)
    except UnreadableInput as exc:
        yield BatchPlan([], [], _no_images, failures=[Failure(str(path), str(exc))])
        return
    for start in range(0, len(array), batch_size):
        rows = array[start:start + batch_size]  # of a memory-map: read by the worker, not here
        yield BatchPlan([str(path)] * len(rows), list(range(start, start + len(rows))), functools.partial(_read_rows, rows))


def _read_rows(rows: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    return np.array(rows), {}


def _no_images() -> tuple[np.ndarray, dict[int, str]]:
    return np.empty((0, *SIZE, 3), np.uint8), {}
