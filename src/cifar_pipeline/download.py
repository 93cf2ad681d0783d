"""The download stage: fetch the CIFAR-10 archive, verify it, and write data/prepared/.

Nothing is replaced until everything succeeded: the archive is fetched to a temporary file,
verified and parsed from there, the prepared arrays are written to a temporary directory, and
only then are both moved into place. Any failure leaves data/ as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from http.client import HTTPException
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cifar_pipeline.atomic import atomic_dir, atomic_file, write_json
from cifar_pipeline.config import DataConfig
from cifar_pipeline.dataset import PREPARED_DIR, Split, content_digest, split_files
from cifar_pipeline.errors import PipelineError

log = logging.getLogger(__name__)

RAW_DIR = Path("data/raw")
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
META = "batches.meta"
CHUNK = 1 << 20


class TransientError(Exception):
    """A network failure worth retrying."""


# --- fetching -------------------------------------------------------------------------------

def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: Path, *, retries: int, backoff_s: float, timeout_s: float) -> None:
    """Stream `url` into `dest`, retrying transient failures with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, dest, timeout_s)
            return
        except TransientError as exc:
            if attempt == retries:
                raise PipelineError(
                    f"cannot download {url}: {exc} (gave up after {retries + 1} attempts); "
                    "check the network, or point data.url at a mirror or a local file:// archive"
                ) from None
            wait = backoff_s * 2**attempt
            log.warning("download attempt %d failed (%s); retrying in %.1f s", attempt + 1, exc, wait)
            time.sleep(wait)


def _fetch_once(url: str, dest: Path, timeout_s: float) -> None:
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise TransientError(f"HTTP {exc.code} {exc.reason}") from None
        raise PipelineError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; check data.url") from None
    except urllib.error.URLError as exc:
        if url.startswith("file:"):
            raise PipelineError(f"cannot read {url}: {exc.reason}; check data.url") from None
        raise TransientError(str(exc.reason)) from None
    except (socket.timeout, ConnectionError, HTTPException) as exc:
        raise TransientError(str(exc) or type(exc).__name__) from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        try:
            with open(dest, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc="download", disable=None, leave=False
            ) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (socket.timeout, ConnectionError, HTTPException) as exc:
            raise TransientError(f"connection broke after {received} bytes: {exc or type(exc).__name__}") from None
    if total is not None and received != total:
        raise TransientError(f"connection closed after {received} of {total} bytes")


# --- reading the archive --------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts, lists, numpy arrays) and refuses anything else,
    since a pickle can otherwise run arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _check_members(tar: tarfile.TarFile, archive: Path) -> dict[str, tarfile.TarInfo]:
    """Every member must stay inside the extraction directory (tarfile's 'data' filter rules)."""
    members = {}
    for member in tar.getmembers():
        try:
            if member.name.startswith("/"):  # the 'data' filter would quietly strip the slash
                raise tarfile.AbsolutePathError(member)
            tarfile.data_filter(member, "/extract")
        except tarfile.FilterError as exc:
            raise PipelineError(
                f"{archive}: unsafe archive member {member.name!r} ({type(exc).__name__}: {exc}); "
                "refusing to extract it: use the official CIFAR-10 archive"
            ) from None
        members[member.name] = member
    return members


def read_archive(archive: Path) -> tuple[list[str], dict[str, Split]]:
    """Class names and the train/test splits from an archive in the official python layout."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _check_members(tar, archive)
            needed = [f"{BATCH_DIR}/{name}" for name in (META, *TRAIN_BATCHES, *TEST_BATCHES)]
            missing = [name for name in needed if name not in members or not members[name].isfile()]
            if missing:
                raise PipelineError(
                    f"{archive}: not a CIFAR-10 python archive: missing {', '.join(missing)}; "
                    "check that data.url points at cifar-10-python.tar.gz"
                )
            batches = {name: _ArrayUnpickler(tar.extractfile(members[name]), encoding="latin1").load() for name in needed}
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError, ValueError) as exc:
        raise PipelineError(
            f"{archive}: the archive is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "delete it and download it again"
        ) from None
    try:
        class_names = list(batches[f"{BATCH_DIR}/{META}"]["label_names"])
        splits = {
            "train": _to_split([batches[f"{BATCH_DIR}/{b}"] for b in TRAIN_BATCHES]),
            "test": _to_split([batches[f"{BATCH_DIR}/{b}"] for b in TEST_BATCHES]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(
            f"{archive}: a batch does not have the CIFAR-10 layout ({type(exc).__name__}: {exc}); "
            "check that data.url points at cifar-10-python.tar.gz"
        ) from None
    return class_names, splits


def _to_split(batches: list[dict]) -> Split:
    """CIFAR rows (3072 bytes: the R, G, then B plane) into NHWC uint8 images."""
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Split(images, labels)


# --- preparing ------------------------------------------------------------------------------

def balanced_subset(split: Split, size: int | None, num_classes: int, seed: int, name: str) -> Split:
    """`size` images with classes as equal as they can be (the first classes take the remainder),
    chosen with a seeded generator and kept in their original order."""
    if size is None or size == len(split):
        return split
    if size > len(split):
        raise PipelineError(f"data.{name}_size is {size} but the {name} split has only {len(split)} images; lower it or use null")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(num_classes):
        want = size // num_classes + (1 if cls < size % num_classes else 0)
        pool = np.flatnonzero(split.labels == cls)
        if want > len(pool):
            raise PipelineError(f"data.{name}_size {size} needs {want} images of class {cls}, but the split has {len(pool)}")
        chosen.append(rng.choice(pool, size=want, replace=False))
    index = np.sort(np.concatenate(chosen))
    return Split(split.images[index], split.labels[index])


def write_prepared(dest: Path, class_names: list[str], splits: dict[str, Split], source: dict) -> dict:
    for name, split in splits.items():
        images_path, labels_path = split_files(dest, name)
        np.save(images_path, split.images)
        np.save(labels_path, split.labels)
    manifest = {
        "class_names": class_names,
        "splits": {
            name: {
                "count": len(split),
                "per_class": {c: int((split.labels == i).sum()) for i, c in enumerate(class_names)},
            }
            for name, split in splits.items()
        },
        "digest": "sha256:" + content_digest(splits),
        "format": "{split}_images.npy uint8 [N,32,32,3] RGB; {split}_labels.npy int64 [N]",
        "source": source,
    }
    write_json(dest / "manifest.json", manifest)
    return manifest


def run(cfg: DataConfig, raw_dir: Path = RAW_DIR, prepared_dir: Path = PREPARED_DIR) -> dict:
    archive = Path(raw_dir) / ARCHIVE_NAME
    with contextlib.ExitStack() as stack:
        source = archive
        if archive.exists() and (cfg.md5 is None or md5sum(archive) == cfg.md5):
            log.info("reusing %s (checksum verified)", archive)
        else:
            source = stack.enter_context(atomic_file(archive))
            log.info("downloading %s", cfg.url)
            fetch(cfg.url, source, retries=cfg.retries, backoff_s=cfg.retry_backoff_s, timeout_s=cfg.timeout_s)
            actual = md5sum(source)
            if cfg.md5 is not None and actual != cfg.md5:
                raise PipelineError(
                    f"checksum mismatch for {cfg.url}: expected md5 {cfg.md5}, got {actual}; "
                    "the file is corrupt or data.md5 is wrong"
                )
        class_names, splits = read_archive(source)
        splits = {
            name: balanced_subset(split, getattr(cfg, f"{name}_size"), len(class_names), cfg.subset_seed, name)
            for name, split in splits.items()
        }
        with atomic_dir(prepared_dir) as tmp:
            manifest = write_prepared(tmp, class_names, splits, {"url": cfg.url, "md5": cfg.md5})
    counts = ", ".join(f"{n} {s['count']}" for n, s in manifest["splits"].items())
    log.info("prepared %s: %s images (%s)", prepared_dir, counts, manifest["digest"][:19])
    return manifest
