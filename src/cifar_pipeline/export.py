"""The export stage: models/model.onnx, the serving contract, checked against PyTorch.

The ONNX graph takes raw images (uint8 [batch, 32, 32, 3], RGB, NHWC) and returns class
probabilities (float32 [batch, classes]): scaling, normalization and softmax are inside it, so a
client needs onnxruntime and nothing else. Class names and the model config travel in its metadata.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from cifar_pipeline import checkpoint, dataset
from cifar_pipeline.atomic import atomic_file, write_json
from cifar_pipeline.config import ExportConfig, ModelConfig
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.model import input_normalization
from cifar_pipeline.onnx_session import CPU, IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME, create_session, predict, usable_providers
from cifar_pipeline.throughput import images_per_second, onnx_runners, throughput_report

log = logging.getLogger(__name__)

ONNX_PATH = Path("models/model.onnx")
INT8_PATH = Path("models/model.int8.onnx")
EXPORT_JSON = Path("reports/export.json")
LOGGED_MODEL_NAME = "onnx_model"
# int8 where it pays (measured); Softmax stays fp32 so probabilities keep their precision
QUANTIZED_OPS = ["Conv", "Relu", "Add", "Gemm", "MatMul"]  # not Softmax, nor the input normalization
INPUT_FORMAT = "uint8 [batch, 32, 32, 3], RGB, NHWC, 0-255"


class ServingModel(nn.Module):
    """uint8 NHWC images in, probabilities out: the trained network with its preprocessing."""

    def __init__(self, model: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.model = model
        # The normalization's constants spelled out over the whole image: the int8 model's
        # convolutions run channels-last, so onnxruntime moves this arithmetic after the
        # NHWC->NCHW transpose is cancelled, where a per-channel [1,1,1,3] constant broadcasts three
        # floats at a time (measured: 14% of the int8 model's time at batch 256). A [1,3,H,W]
        # constant broadcasts over the batch only.
        height, width, _ = IMAGE_SHAPE
        for name, constant in zip(("scale", "shift"), input_normalization(mean, std)):
            self.register_buffer(name, constant.expand(1, 3, height, width).clone())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.model(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(images), dim=1)


def serving_model(model: nn.Module, model_cfg: ModelConfig) -> ServingModel:
    """A CPU copy of `model` wrapped with its preprocessing and softmax, in eval mode."""
    return ServingModel(copy.deepcopy(model).float().cpu(), model_cfg.mean, model_cfg.std).eval()


def export_onnx(model: nn.Module, model_cfg: ModelConfig, class_names: list[str], dest: Path, opset: int = 18) -> None:
    """Write the serving ONNX model (weights inside the file, dynamic batch) to `dest`, atomically."""
    wrapped = serving_model(model, model_cfg)
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)  # batch 2: a batch of 1 would be specialized
    with warnings.catch_warnings(), torch.no_grad(), _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not ours to act on
        program = torch.onnx.export(
            wrapped, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=True, opset_version=opset, external_data=False, verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    proto = program.model_proto
    metadata = {
        "class_names": json.dumps(list(class_names)),
        "model_config": json.dumps(model_cfg.model_dump(mode="json")),
        "input_format": INPUT_FORMAT,
    }
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "CIFAR-10 SimpleResNet: uint8 NHWC RGB images in, class probabilities out"
    import onnx

    with atomic_file(dest) as tmp:
        onnx.save_model(proto, tmp)
    log.debug("exported %s (%.0f KiB, opset %d)", dest, Path(dest).stat().st_size / 1024, opset)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --- checks -----------------------------------------------------------------------------------

def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise PipelineError(f"the exported model fails onnx.checker ({str(exc).splitlines()[0]}); try another export.opset") from None


@torch.no_grad()
def torch_probabilities(serving: ServingModel, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The PyTorch reference, fp32 on the CPU: what the ONNX model must reproduce."""
    return torch.cat([serving(torch.from_numpy(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]).numpy()


def compare(probs: np.ndarray, reference: np.ndarray) -> dict:
    return {
        "top1_agreement": round(float((probs.argmax(1) == reference.argmax(1)).mean()), 6),
        "max_prob_diff": float(np.abs(probs - reference).max()),
    }


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return round(float((probs.argmax(1) == labels).mean()), 6)


def check_parity_gates(parity: dict, cfg: ExportConfig) -> None:
    if parity["top1_agreement"] < cfg.min_agreement:
        raise PipelineError(
            f"ONNX parity gate failed: top-1 agreement with PyTorch is {parity['top1_agreement']:.4%}, "
            f"below export.min_agreement {cfg.min_agreement:.4%}; check the export (opset) before lowering the gate"
        )
    if parity["max_prob_diff"] > cfg.max_prob_diff:
        raise PipelineError(
            f"ONNX parity gate failed: max probability difference from PyTorch is {parity['max_prob_diff']:.3g}, "
            f"above export.max_prob_diff {cfg.max_prob_diff:.3g}; check the export (opset) before raising the gate"
        )


# --- int8 -------------------------------------------------------------------------------------

def calibration_images(count: int, seed: int = 0) -> np.ndarray:
    """`count` training images (never test images: the test split stays unseen), seeded."""
    train = dataset.load_split("train")
    index = np.random.default_rng(seed).choice(len(train), size=min(count, len(train)), replace=False)
    return train.images[np.sort(index)]


def quantize_int8(src: Path, dest: Path, calibration: np.ndarray, batch_size: int = 64) -> None:
    """Static int8 quantization of `src` (QDQ, per-channel weights, MinMax ranges from `calibration`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    # The exporter already optimized the graph, so quant_pre_process measured no gain here.
    # uint8 activations with int8 weights (U8S8) are what x86's VNNI kernels run fastest.
    with _quiet_loggers("onnxruntime.quantization", "root"):
        quantize_static(
            str(src), str(dest), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
        )


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Hide the INFO chatter and advice of the exporter's and quantizer's loggers (the quantizer
    logs through the root logger)."""
    loggers = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --- the stage --------------------------------------------------------------------------------

def run(cfg: ExportConfig) -> dict:
    from cifar_pipeline.tracking import read_run_handoff

    read_run_handoff()  # fail before the work, not after it, when there is no run to append to
    model, model_cfg, class_names = checkpoint.load_model()
    test = dataset.load_split("test")
    serving = serving_model(model, model_cfg)
    reference = torch_probabilities(serving, test.images, cfg.batch_size)
    report: dict = {"images": len(test), "opset": cfg.opset, "providers": list(usable_providers())}

    with contextlib.ExitStack() as outputs:  # the models land only if every check passed
        onnx_tmp = outputs.enter_context(atomic_file(ONNX_PATH))
        export_onnx(model, model_cfg, class_names, onnx_tmp, cfg.opset)
        check_onnx(onnx_tmp)
        fp32 = create_session(onnx_tmp, providers=[CPU])  # parity on the CPU: deterministic
        probs = predict(fp32, test.images, cfg.batch_size)
        parity = compare(probs, reference)
        check_parity_gates(parity, cfg)
        report |= {"pytorch_accuracy": accuracy(reference, test.labels), "onnx_accuracy": accuracy(probs, test.labels), **parity,
                   "onnx_bytes": onnx_tmp.stat().st_size, "onnx_sha256": file_digest(onnx_tmp)}
        runners = {"pytorch": lambda images: torch_probabilities(serving, images, cfg.batch_size)}
        runners |= onnx_runners("onnx", onnx_tmp, cfg.batch_size)
        if cfg.int8:
            int8_tmp = outputs.enter_context(atomic_file(INT8_PATH))
            quantize_int8(onnx_tmp, int8_tmp, calibration_images(cfg.calibration_images))
            int8 = create_session(int8_tmp, providers=[CPU])
            int8_probs = predict(int8, test.images, cfg.batch_size)
            report |= {"int8_accuracy": accuracy(int8_probs, test.labels),
                       "int8_top1_agreement": compare(int8_probs, probs)["top1_agreement"],
                       "int8_bytes": int8_tmp.stat().st_size}
            runners |= onnx_runners("int8", int8_tmp, cfg.batch_size)
        report |= throughput_report(images_per_second(runners, test.images), ["onnx", "int8"] if cfg.int8 else ["onnx"])
        if cfg.int8:
            report["int8_speedup"] = round(report["int8_images_per_s"] / report["onnx_images_per_s"], 2)
    if not cfg.int8:
        INT8_PATH.unlink(missing_ok=True)  # a stale int8 model must not pass for this one's

    report["mlflow"] = log_to_mlflow(report, test.images[:2], probs[:2], class_names)
    write_json(EXPORT_JSON, report)
    _log_summary(report)
    return report


def log_to_mlflow(report: dict, example: np.ndarray, example_probs: np.ndarray, class_names: list[str]) -> dict:
    """Log the fp32 ONNX model (and the figures) to the training's run; returns where it went."""
    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    from cifar_pipeline.tracking import resume_run

    with resume_run() as (_, run):  # the same mlflow module, its tracking store set up
        info = mlflow.onnx.log_model(
            onnx.load(str(ONNX_PATH)), name=LOGGED_MODEL_NAME,
            signature=infer_signature(example, example_probs), input_example=example,
            # onnxruntime-gpu only: MLflow's inferred list would add plain onnxruntime, which clobbers it
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"onnx=={onnx.__version__}",
                              f"onnxruntime-gpu=={onnxruntime.__version__}"],
            onnx_execution_providers=list(usable_providers()),
            save_as_external_data=False,
            metadata={"class_names": class_names, "input_format": INPUT_FORMAT},
        )
        mlflow.log_metrics({f"export_{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if INT8_PATH.exists():
            mlflow.log_artifact(str(INT8_PATH), artifact_path="int8")
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "model_id": info.model_id}


def _log_summary(r: dict) -> None:
    log.info("ONNX vs PyTorch on %d test images: top-1 agreement %.2f%%, max prob diff %.2g; accuracy %.2f%%, %.0f images/s (PyTorch %.0f)",
             r["images"], 100 * r["top1_agreement"], r["max_prob_diff"], 100 * r["onnx_accuracy"], r["onnx_images_per_s"], r["pytorch_images_per_s"])
    if "int8_accuracy" in r:
        log.info("int8: accuracy %.2f%%, %.0f images/s (%.2fx fp32)", 100 * r["int8_accuracy"], r["int8_images_per_s"], r["int8_speedup"])
