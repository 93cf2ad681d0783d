"""Throughput on a shared machine: images/s of several ways of predicting, measured side by side.

The export stage measures PyTorch and both ONNX models with it (reports/export.json), and
bench/inference.py the same runners at other batch sizes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from cifar_pipeline.onnx_session import CPU, create_session, default_workers, predict

BENCH_IMAGES = 2048    # per timed pass
BENCH_MIN_ROUNDS = 3
BENCH_SECONDS = 1.0    # all runners together, at least


def images_per_second(runners: dict[str, Callable[[np.ndarray], object]], images: np.ndarray) -> dict[str, float]:
    """Throughput of each runner (a function that predicts a whole array, in its own batches) over
    passes of BENCH_IMAGES images.

    The runners take turns, pass after pass, and each reports its fastest pass: on a shared
    machine the best pass is the one least disturbed by other work, and taking turns exposes
    every runner to the same disturbances.
    """
    sample = images[:BENCH_IMAGES]
    best = dict.fromkeys(runners, 0.0)
    for infer in runners.values():
        infer(sample[:1])  # warm-up: allocations, thread pools, caches
    start, rounds = time.perf_counter(), 0
    while rounds < BENCH_MIN_ROUNDS or time.perf_counter() - start < BENCH_SECONDS:
        for name, infer in runners.items():
            t = time.perf_counter()
            infer(sample)
            best[name] = max(best[name], len(sample) / (time.perf_counter() - t))
        rounds += 1
    return {name: round(rate, 1) for name, rate in best.items()}


def onnx_runners(name: str, path: Path, batch_size: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The two ways a CPU serves many batches, as images_per_second runners: one batch at a time
    with each operator split across the cores (onnxruntime's default), and one batch per core side
    by side on one thread each (predict's default). Which is faster depends on the model and on the
    machine's moment (on this project's 2 cores, either way by up to 15% for the int8 model), so
    each model is measured both ways and judged by its faster one."""
    op_parallel = create_session(path, providers=[CPU])
    batch_parallel = create_session(path, providers=[CPU], threads=1)
    workers = default_workers()
    return {
        f"{name}_op_parallel": lambda images: predict(op_parallel, images, batch_size),
        f"{name}_batch_parallel": lambda images: predict(batch_parallel, images, batch_size, workers),
    }


def throughput_report(rates: dict[str, float], models: list[str]) -> dict[str, float]:
    """images/s per runner, and each model's best way as `<model>_images_per_s`."""
    report = {f"{runner}_images_per_s": rate for runner, rate in rates.items()}
    for model in models:
        report[f"{model}_images_per_s"] = max(rate for runner, rate in rates.items() if runner.startswith(f"{model}_"))
    return report
