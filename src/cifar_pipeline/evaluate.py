"""The evaluate stage: honest test-set figures for models/model.pt.

The test split goes through the served computation (export.ServingModel: raw uint8 images,
normalization inside) with no augmentation; `evaluate.tta` averages each image's probabilities
with its mirror image's. Writes reports/eval.json, reports/confusion.csv (one row per image, for
DVC's confusion template), reports/confusion.png and reports/wrong.png (the most confidently
wrong images), and appends the figures and pictures to the training's MLflow run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_pipeline import checkpoint, dataset
from cifar_pipeline.atomic import write_json, write_text
from cifar_pipeline.config import EvaluateConfig
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.figures import pyplot, save_png
from cifar_pipeline.export import ServingModel, serving_model

log = logging.getLogger(__name__)

REPORTS = Path("reports")
EVAL_JSON = REPORTS / "eval.json"
CONFUSION_CSV = REPORTS / "confusion.csv"
CONFUSION_PNG = REPORTS / "confusion.png"
WRONG_PNG = REPORTS / "wrong.png"


@dataclass(frozen=True)
class Predictions:
    log_probs: np.ndarray  # float32 [N, classes]
    labels: np.ndarray     # int64 [N]

    @property
    def predicted(self) -> np.ndarray:
        return self.log_probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return np.exp(self.log_probs.max(1))


@torch.no_grad()
def predict_split(serving: ServingModel, split: dataset.Split, batch_size: int, tta: bool) -> Predictions:
    """Log-probabilities for every image of `split`, on CUDA when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    serving = serving.to(device)
    out = []
    for start in range(0, len(split), batch_size):
        images = torch.from_numpy(split.images[start:start + batch_size]).to(device)
        log_probs = torch.log_softmax(serving.logits(images), dim=1)
        if tta:  # mean of the two probabilities, in log space: logsumexp - log 2
            flipped = torch.log_softmax(serving.logits(images.flip(2)), dim=1)
            log_probs = torch.logsumexp(torch.stack([log_probs, flipped]), dim=0) - math.log(2)
        out.append(log_probs.float().cpu())
    return Predictions(torch.cat(out).numpy(), split.labels)


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """counts[actual, predicted]."""
    return np.bincount(actual * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def summarize(preds: Predictions, class_names: list[str], tta: bool) -> dict:
    correct = preds.predicted == preds.labels
    loss = -preds.log_probs[np.arange(len(preds.labels)), preds.labels].mean()
    per_class = {}
    for i, name in enumerate(class_names):
        mask = preds.labels == i
        per_class[name] = round(float(correct[mask].mean()), 6) if mask.any() else None
    return {
        "accuracy": round(float(correct.mean()), 6),
        "loss": round(float(loss), 6),
        "images": int(len(preds.labels)),
        "tta": tta,
        "per_class_accuracy": per_class,
    }


def confusion_csv(preds: Predictions, class_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((class_names[a], class_names[p]) for a, p in zip(preds.labels, preds.predicted))
    return buf.getvalue()


def most_confidently_wrong(preds: Predictions, count: int) -> np.ndarray:
    """Indices of up to `count` wrong predictions, most confident first."""
    wrong = np.flatnonzero(preds.predicted != preds.labels)
    return wrong[np.argsort(-preds.confidence[wrong], kind="stable")][:count]


# --- pictures ---------------------------------------------------------------------------------

def plot_confusion(counts: np.ndarray, class_names: list[str], accuracy: float, dest: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (row, col), n in np.ndenumerate(counts):
        if n:
            ax.text(col, row, str(n), ha="center", va="center", fontsize=7,
                    color="white" if rates[row, col] > 0.5 else "black")
    ax.set_title(f"Test confusion matrix ({counts.sum()} images, accuracy {accuracy:.2%})")
    save_png(fig, dest, bbox_inches="tight")


def plot_wrong(images: np.ndarray, preds: Predictions, index: np.ndarray, class_names: list[str], dest: Path) -> None:
    plt = pyplot()
    if len(index) == 0:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no wrong predictions to show", ha="center", va="center")
        save_png(fig, dest, bbox_inches="tight")
        return
    cols = min(len(index), 6)
    rows = math.ceil(len(index) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.3 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, index):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(
            f"true: {class_names[preds.labels[i]]}\npred: {class_names[preds.predicted[i]]} {preds.confidence[i]:.0%}",
            fontsize=8, color="firebrick",
        )
    fig.suptitle("Most confidently wrong test images")
    save_png(fig, dest, bbox_inches="tight")


# --- the stage --------------------------------------------------------------------------------

def run(cfg: EvaluateConfig) -> dict:
    from cifar_pipeline.tracking import read_run_handoff

    read_run_handoff()  # fail before the work, not after it, when there is no run to append to
    model, model_cfg, class_names = checkpoint.load_model()
    split = dataset.load_split("test")
    manifest = dataset.load_manifest()
    if manifest["class_names"] != class_names:
        raise PipelineError(
            f"models/model.pt was trained on classes {class_names} but data/prepared has "
            f"{manifest['class_names']}; train again on this data"
        )
    preds = predict_split(serving_model(model, model_cfg), split, cfg.batch_size, cfg.tta)
    report = summarize(preds, class_names, cfg.tta) | {"data_digest": manifest["digest"]}
    counts = confusion_matrix(preds.labels, preds.predicted, len(class_names))

    write_text(CONFUSION_CSV, confusion_csv(preds, class_names))
    plot_confusion(counts, class_names, report["accuracy"], CONFUSION_PNG)
    plot_wrong(split.images, preds, most_confidently_wrong(preds, cfg.wrong_examples), class_names, WRONG_PNG)
    write_json(EVAL_JSON, report)
    log_to_mlflow(report)
    log.info("test accuracy %.2f%% (loss %.4f, %d images%s)", 100 * report["accuracy"], report["loss"],
             report["images"], ", flip TTA" if cfg.tta else "")
    return report


def log_to_mlflow(report: dict) -> None:
    from cifar_pipeline.tracking import resume_run

    metrics = {"eval_accuracy": report["accuracy"], "eval_loss": report["loss"]}
    metrics |= {f"eval_accuracy_{name}": acc for name, acc in report["per_class_accuracy"].items() if acc is not None}
    with resume_run() as (mlflow, _):
        mlflow.log_metrics(metrics)
        mlflow.set_tag("eval_tta", str(report["tta"]).lower())
        for path in (EVAL_JSON, CONFUSION_CSV, CONFUSION_PNG, WRONG_PNG):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
