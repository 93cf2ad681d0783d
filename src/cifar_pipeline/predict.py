"""Batch inference with onnxruntime: images or arrays in, one prediction per image out.

The Python API that `cifar-pipeline predict` wraps:

    predictor = Predictor("models:/cifar10-resnet@champion")   # or a path to an .onnx file
    probabilities = predictor.predict(images)                  # uint8 [N, 32, 32, 3] -> [N, 10]
    for batch in predictor.iter_batches("photos/"):            # streams a folder, file by file
        ...                                                    # BatchResult: paths, probabilities, failures
    summary = predict_to_file(predictor, "photos/", "predictions.csv")

It streams: a pool of worker threads reads and runs batches side by side (one decodes while
another is in onnxruntime), and only those few batches are ever in memory. A file that cannot be read goes into the errors file and the run
goes on (or, with strict=True, stops). Nothing here imports torch: a serving host needs
onnxruntime, numpy and Pillow (and MLflow for registry sources).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import logging
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from cifar_pipeline import model_source
from cifar_pipeline.atomic import atomic_file
from cifar_pipeline.errors import ConfigError, PipelineError
from cifar_pipeline.inputs import BatchPlan, Failure, check_input, iter_files, plan_batches
from cifar_pipeline.onnx_session import check_images, create_session, default_workers, run_batch
from cifar_pipeline.onnx_session import predict as predict_batches
from cifar_pipeline.prediction_writers import writer_for

log = logging.getLogger(__name__)

BATCH_SIZE = 256
PREFETCH_BATCHES = 2  # queued beyond the ones the workers are busy with
OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class BatchResult:
    """Predictions for the readable items of one batch, in input order, and the unreadable ones."""

    paths: list[str]                # the file of each prediction
    indices: list[int | None]       # its row in an array file; None for an image file
    probabilities: np.ndarray       # float32 [len(paths), classes]
    failures: list[Failure] = field(default_factory=list)


@dataclass
class Summary:
    images: int = 0       # scored
    errors: int = 0       # files that could not be read
    seconds: float = 0.0
    labelled: int = 0     # scored images that lie in a folder named after a class
    correct: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def exit_code(self) -> int:
        """0: every image scored; 1: some could not be; 2: none could be."""
        if self.images == 0:
            return 2
        return 1 if self.errors else 0

    def line(self) -> str:
        text = f"{self.images:,} images, {self.errors:,} errors, {self.images_per_s:,.0f} images/s ({self.seconds:.1f} s)"
        if self.accuracy is not None:
            text += f"; accuracy {self.accuracy:.4f} on {self.labelled:,} labelled images"
        return text


class Predictor:
    """An onnxruntime session on a model that honours the serving contract, its class names, and
    how batches run: `workers` batches at once, each read and run in its own thread with `threads`
    onnxruntime threads. On a CPU, batches side by side on one thread each beat one batch at a time
    on all the cores: nothing waits at onnxruntime's per-operator barriers while another batch is
    being decoded (bench/inference.py compares the two). The default is one worker more than the
    cores: decoding mostly holds Python's GIL, so two workers decoding at once leave a core idle
    unless a third has a batch ready to run (measured on 2 cores over 10,000 JPEG files: 20% more
    images/s than one worker per core, and no change on arrays)."""

    def __init__(self, source: str | Path, providers: Sequence[str] | None = None, threads: int = 1,
                 workers: int | None = None):
        if threads < 1 or (workers is not None and workers < 1):
            raise ConfigError(f"threads and workers must be at least 1, got {threads} and {workers}")
        with tempfile.TemporaryDirectory(prefix="cifar-predict-") as tmp:  # the session keeps the model in memory
            path, self.description = model_source.resolve(str(source), Path(tmp))
            # no spinning: idle onnxruntime threads would take the cores other batches need
            self.session = create_session(path, providers, threads, spinning=False)
        self.class_names = _class_names(self.session)
        self.workers = workers or default_workers() + 1

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def predict(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Class probabilities float32 [N, classes] for uint8 images [N, 32, 32, 3]."""
        check_images(images)
        if len(images) == 0:
            return np.empty((0, len(self.class_names)), np.float32)
        return predict_batches(self.session, images, batch_size, self.workers)

    def iter_batches(self, input: str | Path, batch_size: int = BATCH_SIZE, strict: bool = False) -> Iterator[BatchResult]:
        """Predictions for every file under `input` (a folder, searched recursively, or one file), a
        batch at a time, in input order. strict=True raises PipelineError at the first file that
        cannot be read."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        with ThreadPoolExecutor(self.workers, thread_name_prefix="predict") as pool, _cancel_on_exit(pool):
            pending: collections.deque[Future[BatchResult]] = collections.deque()
            for plan in plan_batches(iter_files(Path(input)), batch_size):
                pending.append(pool.submit(self._process, plan))
                if len(pending) > self.workers + PREFETCH_BATCHES:
                    yield _checked(pending.popleft().result(), strict)
            while pending:
                yield _checked(pending.popleft().result(), strict)

    def _process(self, plan: BatchPlan) -> BatchResult:
        """Read one batch and run it (in a worker thread)."""
        images, failed = plan.read()
        failures = plan.failures + [Failure(plan.paths[i], reason) for i, reason in sorted(failed.items())]
        paths, indices = plan.paths, plan.indices
        if failed:
            keep = [i for i in range(len(paths)) if i not in failed]
            images, paths, indices = images[keep], [paths[i] for i in keep], [indices[i] for i in keep]
        probabilities = run_batch(self.session, images) if len(images) else np.empty((0, len(self.class_names)), np.float32)
        return BatchResult(paths, indices, probabilities, failures)


def _checked(batch: BatchResult, strict: bool) -> BatchResult:
    if strict and batch.failures:
        first = batch.failures[0]
        raise PipelineError(f"{first.path}: cannot read it ({first.reason}); stopped there (--strict)")
    return batch


def _class_names(session) -> list[str]:
    classes = session.get_outputs()[0].shape[-1]
    raw = session.get_modelmeta().custom_metadata_map.get("class_names")
    names = json.loads(raw) if raw else None
    if not isinstance(classes, int):
        classes = len(names) if names else 0
    if not names or len(names) != classes:
        log.warning("the model carries no class names for its %d classes; naming them by index", classes)
        return [str(i) for i in range(classes)]
    return [str(n) for n in names]


@contextlib.contextmanager
def _cancel_on_exit(pool: ThreadPoolExecutor) -> Iterator[None]:
    """Drop queued batches when iteration stops early (strict, an error, a closed generator)."""
    try:
        yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- writing predictions --------------------------------------------------------------------

def predict_to_file(
    predictor: Predictor,
    input: str | Path,
    output: str | Path,
    *,
    errors: str | Path | None = None,
    top_k: int = 1,
    labels_from_folders: bool = False,
    batch_size: int = BATCH_SIZE,
    strict: bool = False,
    progress: bool | None = None,
) -> Summary:
    """Predict every file under `input`; write the predictions to `output` (CSV, or JSON Lines for
    .jsonl) and the unreadable files to `errors` (default: OUTPUT.errors.csv beside it). Both are
    written atomically: a failed or stopped run leaves no partial file. progress=None shows a
    progress bar only on a terminal."""
    output = Path(output)
    errors = Path(errors) if errors is not None else errors_path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"{output}: the output must end in .csv or .jsonl")
    if not 1 <= top_k <= len(predictor.class_names):
        raise ConfigError(f"--top-k must be between 1 and {len(predictor.class_names)}, got {top_k}")
    summary = Summary()
    started = time.perf_counter()
    with atomic_file(output) as out_tmp, atomic_file(errors) as err_tmp, \
            open(out_tmp, "w", newline="") as out_file, open(err_tmp, "w", newline="") as err_file, \
            tqdm(desc="predict", unit="img", disable=None if progress is None else not progress, leave=False) as bar:
        writer = writer_for(output, out_file, predictor.class_names, top_k, labels_from_folders)
        error_rows = csv.writer(err_file)
        error_rows.writerow(["path", "reason"])
        for batch in predictor.iter_batches(input, batch_size, strict):
            labels = _folder_labels(batch, predictor.class_names) if labels_from_folders else None
            writer.write(batch, labels)
            error_rows.writerows((f.path, f.reason) for f in batch.failures)
            _count(summary, batch, labels)
            bar.update(len(batch.paths) + len(batch.failures))
    summary.seconds = time.perf_counter() - started
    return summary


def errors_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.errors.csv")


def _count(summary: Summary, batch: BatchResult, labels: np.ndarray | None) -> None:
    summary.images += len(batch.paths)
    summary.errors += len(batch.failures)
    if labels is not None and len(labels):
        known = labels >= 0
        summary.labelled += int(known.sum())
        summary.correct += int((batch.probabilities.argmax(1)[known] == labels[known]).sum())


def _folder_labels(batch: BatchResult, class_names: list[str]) -> np.ndarray:
    """The class index of each image file's folder name; -1 where the folder is not named after a
    class, and for rows of array files."""
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index.get(Path(p).parent.name, -1) if row is None else -1
                     for p, row in zip(batch.paths, batch.indices)], dtype=np.int64)


# --- the command ----------------------------------------------------------------------------

PROVIDER_SHORTHANDS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def parse_providers(text: str | None) -> list[str] | None:
    """`--providers`: auto (None), cpu, cuda (CUDA with the CPU for any node CUDA lacks), or a
    comma-separated list of onnxruntime provider names."""
    if text is None or text == "auto":
        return None
    if text.lower() in PROVIDER_SHORTHANDS:
        return PROVIDER_SHORTHANDS[text.lower()]
    return [p.strip() for p in text.split(",") if p.strip()]


def run(model: str, input: str | Path, output: str | Path, *, providers: str | None = None,
        threads: int = 1, workers: int | None = None, **options) -> Summary:
    """`cifar-pipeline predict`: predict_to_file with a model source, logging what it did.
    Returns the summary; its exit_code is the command's exit status."""
    check_input(input)  # before the model: loading one from the registry takes seconds
    try:
        predictor = Predictor(model, parse_providers(providers), threads, workers)
    except PipelineError as exc:  # no usable model, so nothing scored: predict's status for that is 2
        raise ConfigError(str(exc)) from None
    log.info("model %s on %s; %d workers, %d onnxruntime thread(s) each", predictor.description,
             ", ".join(predictor.providers), predictor.workers, threads)
    summary = predict_to_file(predictor, input, output, **options)
    errors = options.get("errors") or errors_path(Path(output))
    log.info("predict: %s", summary.line())
    log.info("wrote %s and %s", output, errors)
    if summary.images == 0:
        found = f"none of the {summary.errors:,} files could be read (see {errors})" if summary.errors else f"no files under {input}"
        log.error("error: no image scored: %s", found)
    elif summary.errors:
        log.warning("warning: %s of %s files could not be read; their paths and reasons are in %s",
                    f"{summary.errors:,}", f"{summary.images + summary.errors:,}", errors)
    if options.get("labels_from_folders") and summary.images and summary.accuracy is None:
        log.warning("warning: no scored image lies in a folder named after a class (%s); no accuracy",
                    ", ".join(predictor.class_names))
    return summary
