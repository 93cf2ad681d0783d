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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

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
