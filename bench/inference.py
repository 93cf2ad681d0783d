"""Inference throughput: PyTorch eager against onnxruntime fp32 and int8, and `predict` end to end.

    python bench/inference.py [--checkpoint models/model.pt] [--images DIR] [--threads N]

One model, one machine, one run:
  eager       the serving module (uint8 in, preprocessing, network, softmax) in PyTorch, fp32
  ort fp32    the same module exported by export_onnx, in onnxruntime on the CPU
  ort int8    that model statically quantized by the export stage's quantize_int8
each ort model run two ways (throughput.onnx_runners): one batch at a time with every operator split
across the cores (onnxruntime's default), and one batch per core side by side on one thread each
(predict's default); the ratios take each model's faster way.
each at batch 1 and batch 256 on decoded images (runners take turns; each reports its best pass),
then `predict` over a folder of JPEG files: listing, decoding, inference and writing the CSV, as
images/s and as images per CPU-second (times the cores: what the CPU time allows on an idle
machine, the figure to trust when other work shares the cores; the load average is printed).

The model is --checkpoint when it exists (a trained one gives a meaningful int8 agreement),
else an untrained seed SimpleResNet: speed does not depend on the weights. The JPEG files are
--images, or the test/ folder of ../shared/datasets/cifar10-jpeg.tar.gz extracted to a temporary
directory. Targets on 2 CPU cores: ort fp32 >= 2x eager; ort int8 >= 2x fp32 (batch 256);
predict >= 3,000 images/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from cifar_pipeline import checkpoint, export, throughput  # noqa: E402
from cifar_pipeline.config import parse_section  # noqa: E402
from cifar_pipeline.inputs import iter_files, load_image  # noqa: E402
from cifar_pipeline.model import build_model  # noqa: E402
from cifar_pipeline.onnx_session import CPU, create_session, predict as ort_predict  # noqa: E402
from cifar_pipeline.predict import Predictor, predict_to_file  # noqa: E402

JPEG_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CALIBRATION = 512
BATCH_1_IMAGES = 256  # per timed pass at batch 1
TARGET_ORT_RATIO = 2.0
TARGET_INT8_RATIO = 2.0
ROWS = {  # runner: label
    "eager": "PyTorch eager (fp32)",
    "fp32_op_parallel": "ort fp32, one batch on all cores",
    "fp32_batch_parallel": "ort fp32, a batch per core",
    "int8_op_parallel": "ort int8, one batch on all cores",
    "int8_batch_parallel": "ort int8, a batch per core",
}
TARGET_PREDICT = 3000


def jpeg_folder(images: Path | None, scratch: Path) -> Path:
    if images is not None:
        return images
    if not JPEG_ARCHIVE.exists():
        sys.exit(f"no --images folder given and {JPEG_ARCHIVE} not found")
    with tarfile.open(JPEG_ARCHIVE) as tar:
        tar.extractall(scratch, members=[m for m in tar.getmembers() if m.name.startswith("test/")], filter="data")
    return scratch / "test"


def load_bench_model(path: Path):
    if path.exists():
        model, cfg, names = checkpoint.load_model(path)
        return model, cfg, names, f"{path} (trained)"
    torch.manual_seed(0)
    cfg = parse_section("model", {"blocks_per_stage": [2, 2, 2], "widths": [16, 32, 64], "residual": True,
                                  "mean": [0.5] * 3, "std": [0.5] * 3})
    return build_model(cfg).eval(), cfg, CLASSES, "the seed SimpleResNet, untrained"


def sample_images(folder: Path, count: int) -> np.ndarray:
    files = []
    for path in iter_files(folder):
        files.append(path)
        if len(files) == count:
            break
    rng = np.random.default_rng(0)
    return np.stack([load_image(p) for p in rng.permutation(files)])


def predict_rate(model: Path, folder: Path, out: Path, workers: int | None = None, threads: int = 1,
                 passes: int = 2) -> tuple[float, float, int]:
    """Images/s (wall clock) and images per CPU-second of the best of `passes` end-to-end runs (the
    first also warms the file cache); by default with predict's defaults: one worker per core, one
    onnxruntime thread each. On a machine shared with other work the wall-clock rate drops, while
    images per CPU-second times the cores estimates the rate on the machine alone."""
    predictor = Predictor(model, providers=[CPU], threads=threads, workers=workers)
    best = (0.0, 0.0, 0)
    for _ in range(passes):
        cpu = time.process_time()
        summary = predict_to_file(predictor, folder, out, progress=False)
        per_cpu_s = summary.images / (time.process_time() - cpu)
        best = max(best, (summary.images_per_s, per_cpu_s, summary.images))
    return best


def best(rates: dict, model: str, batch: int) -> float:
    return max(rates[f"{model}_op_parallel", batch], rates[f"{model}_batch_parallel", batch])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--images", type=Path, help="a folder of JPEG files (default: the real test set, extracted)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch's threads, and onnxruntime's in `predict, one batch` (default: one per core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        tmp = Path(tmp)
        folder = jpeg_folder(args.images, tmp)
        images = sample_images(folder, throughput.BENCH_IMAGES)
        model, cfg, names, described = load_bench_model(args.checkpoint)
        fp32_path, int8_path = tmp / "model.onnx", tmp / "model.int8.onnx"
        export.export_onnx(model, cfg, names, fp32_path)
        export.quantize_int8(fp32_path, int8_path, images[:CALIBRATION])
        serving = export.serving_model(model, cfg)
        print(f"model: {described}; {args.threads} threads; torch {torch.__version__}; {os.cpu_count()} cores")

        rates = {}
        for batch, sample in ((1, images[:BATCH_1_IMAGES]), (256, images)):
            runners = {"eager": lambda b: export.torch_probabilities(serving, b, batch)}
            runners |= throughput.onnx_runners("fp32", fp32_path, batch) | throughput.onnx_runners("int8", int8_path, batch)
            with torch.inference_mode():
                for name, rate in throughput.images_per_second(runners, sample).items():
                    rates[name, batch] = rate
        fp32, int8 = create_session(fp32_path, [CPU]), create_session(int8_path, [CPU])
        agreement = (ort_predict(int8, images).argmax(1) == ort_predict(fp32, images).argmax(1)).mean()

        count = sum(1 for _ in iter_files(folder))
        print(f"predict over {count:,} JPEG files in {folder} ...", flush=True)
        e2e = {
            "predict, JPEG, fp32": predict_rate(fp32_path, folder, tmp / "out.csv"),
            "predict, JPEG, int8": predict_rate(int8_path, folder, tmp / "out.csv"),
            "predict, one batch": predict_rate(fp32_path, folder, tmp / "out.csv", workers=1, threads=args.threads),
        }

    print()
    print(f"{'images/s':<34}{'batch 1':>10}{'batch 256':>12}")
    for name, label in ROWS.items():
        print(f"{label:<34}{rates[name, 1]:>10,.0f}{rates[name, 256]:>12,.0f}")
    print()
    print(f"over {count:,} JPEG files, decoding and writing the CSV included:")
    print(f"{'':<22}{'images/s':>10}{'per CPU-s':>12}{'x cores':>10}")
    for name, (wall, per_cpu_s, _) in e2e.items():
        print(f"{name:<22}{wall:>10,.0f}{per_cpu_s:>12,.0f}{per_cpu_s * cores:>10,.0f}")
    print(f"('predict, one batch': fp32 with --workers 1 --threads {args.threads}; 'x cores': the rate the CPU time "
          f"allows on {cores} idle cores)")
    print()
    for batch in (1, 256):
        fp32, int8 = best(rates, "fp32", batch), best(rates, "int8", batch)
        fp32_ratio = fp32 / rates["eager", batch]
        verdict = "met" if fp32_ratio >= TARGET_ORT_RATIO else "MISSED"
        int8_verdict = "" if batch == 1 else f" (target >= {TARGET_INT8_RATIO:.0f}x: {'met' if int8 / fp32 >= TARGET_INT8_RATIO else 'MISSED'})"
        print(f"batch {batch:>3}, each model its faster way: ort fp32 / eager {fp32_ratio:.2f}x (target >= {TARGET_ORT_RATIO:.0f}x: "
              f"{verdict}); ort int8 / fp32 {int8 / fp32:.2f}x{int8_verdict}")
    print(f"int8 top-1 agreement with fp32 on {len(images):,} images: {agreement:.2%}")
    e2e_fp32 = e2e["predict, JPEG, fp32"][0]
    print(f"predict fp32 over JPEG: {e2e_fp32:,.0f} images/s (target >= {TARGET_PREDICT:,}: "
          f"{'met' if e2e_fp32 >= TARGET_PREDICT else 'MISSED'}); "
          f"{e2e_fp32 / rates['fp32_batch_parallel', 256]:.0%} of bare ort fp32 run the same way at batch 256")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (above {cores} means other work shared the cores)")


if __name__ == "__main__":
    main()
