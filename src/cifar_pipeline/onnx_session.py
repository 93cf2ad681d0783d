"""onnxruntime sessions on the best execution provider this machine really has.

onnxruntime-gpu lists CUDAExecutionProvider as available even where there is no GPU, then prints
errors at every session and quietly falls back to the CPU. So CUDA is used only after a tiny probe
session really got it; the probe runs once per process with onnxruntime's logging silenced.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cifar_pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
IMAGE_SHAPE = (32, 32, 3)
_ORT_DEFAULT_SEVERITY = 2  # warnings and worse: onnxruntime's own default


@functools.cache
def _ort():
    """onnxruntime, with the CUDA and cuDNN libraries of torch's nvidia wheels preloaded so that
    its CUDA provider can find them (a no-op where they are not installed)."""
    import onnxruntime

    with contextlib.suppress(Exception):
        onnxruntime.preload_dlls()
    return onnxruntime


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    ort = _ort()
    ort.set_default_logger_severity(4)  # fatal only: hides the provider-loading errors
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


@functools.cache
def usable_providers() -> tuple[str, ...]:
    """The providers a session really gets here, best first: (CUDA, CPU) or (CPU,)."""
    ort = _ort()
    if CUDA not in ort.get_available_providers():
        return (CPU,)
    with _quiet_onnxruntime():
        try:
            probe = ort.InferenceSession(_identity_model(), _options(ort, None, quiet=True), providers=[CUDA, CPU])
            got = probe.get_providers()
        except Exception as exc:  # a broken CUDA install must not break CPU inference
            log.debug("CUDA probe failed: %s", exc)
            got = [CPU]
    return (CUDA, CPU) if CUDA in got else (CPU,)


def create_session(path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                   spinning: bool = True):
    """An InferenceSession for the model at `path`.

    providers=None picks CUDA when it really works here, else the CPU. Explicit providers force the
    choice: each must be usable here, or this raises PipelineError instead of falling back.
    threads sets onnxruntime's intra-op threads (None: its default, one per core).
    spinning=False stops idle intra-op threads from busy-waiting for the next run, which leaves the
    cores to work done between runs (predict's image decoding: about 15% less CPU per image here).
    """
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: ONNX model not found; run `cifar-pipeline export` first or check the path")
    wanted = list(providers) if providers is not None else list(usable_providers())
    if providers is not None:
        _check_requested(wanted, ort.get_available_providers())
    try:
        with _quiet_onnxruntime():  # a failure raises or shows in get_providers(); no log spam
            session = ort.InferenceSession(str(path), _options(ort, threads, spinning=spinning), providers=wanted)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise PipelineError(f"{path}: onnxruntime cannot load the model ({_first_line(exc)}); export it again") from None
    missing = [p for p in wanted if p not in session.get_providers()]
    if providers is not None and missing:
        raise PipelineError(
            f"execution provider {missing[0]} was requested but cannot be used on this machine "
            f"(usable: {', '.join(usable_providers())}); choose another or leave the choice to the default"
        )
    log.debug("%s on %s", path, session.get_providers())
    return session


def default_workers() -> int:
    """One per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def predict(session, images: np.ndarray, batch_size: int = 256, workers: int = 1) -> np.ndarray:
    """Class probabilities float32 [N, classes] for uint8 images [N, 32, 32, 3], in batches.

    workers > 1 runs that many batches side by side (give such a session threads=1, one core per
    batch); workers=1 runs one batch at a time on all of the session's threads.
    """
    check_images(images)
    if len(images) == 0:
        raise PipelineError("no images to predict; give at least one")
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    if workers == 1 or len(batches) == 1:
        return np.concatenate([run_batch(session, b) for b in batches])
    with ThreadPoolExecutor(workers, thread_name_prefix="onnxruntime-batch") as pool:
        return np.concatenate(list(pool.map(functools.partial(run_batch, session), batches)))


def run_batch(session, images: np.ndarray) -> np.ndarray:
    """One onnxruntime call: the probabilities of one batch, unchecked."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def check_images(images: np.ndarray) -> None:
    """The serving contract's input: uint8 [N, 32, 32, 3] RGB, NHWC."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise PipelineError(f"images must be uint8 (0-255 RGB), got {got}; convert with np.asarray(images, np.uint8)")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise PipelineError(
            f"images must have shape [batch, 32, 32, 3] (NHWC RGB), got {list(images.shape)}; "
            "resize to 32x32 and put channels last"
        )


def _check_requested(wanted: list[str], available: list[str]) -> None:
    if not wanted:
        raise PipelineError("no execution provider given; name at least one, e.g. CPUExecutionProvider")
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise PipelineError(f"execution provider {unknown[0]} is not in this onnxruntime build (it has: {', '.join(available)})")


def _options(ort, threads: int | None, quiet: bool = False, spinning: bool = True):
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:
        opts.log_severity_level = 4
    return opts


@functools.cache
def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [tensor("x", TensorProto.FLOAT, [1])], [tensor("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # readable by every onnxruntime this project supports
    return model.SerializeToString()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
