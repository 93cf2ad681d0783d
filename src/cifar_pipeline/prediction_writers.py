"""The prediction files `cifar-pipeline predict` writes: CSV, or JSON Lines for a .jsonl name.

One record per scored image: path (and row index for arrays), the top-1 class and confidence, the
other top-k classes, and with folder labels the label and whether the prediction matches it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from cifar_pipeline.predict import BatchResult


def writer_for(output: Path, file, class_names: list[str], top_k: int, labels: bool):
    cls = _JsonlWriter if output.suffix.lower() == ".jsonl" else _CsvWriter
    return cls(file, class_names, top_k, labels)


class _Rows:
    """One record per prediction: path, index, top-1 class and confidence, the other top-k
    classes, and with folder labels the label and whether the prediction matches it."""

    def __init__(self, file, class_names: list[str], top_k: int, labels: bool):
        self.file, self.class_names, self.top_k, self.labels = file, class_names, top_k, labels

    def records(self, batch: BatchResult, labels: np.ndarray | None) -> Iterator[tuple[dict, list[tuple]]]:
        probs = batch.probabilities
        order = np.argsort(-probs, axis=1, kind="stable")[:, :self.top_k]
        confidence = np.take_along_axis(probs, order, axis=1)
        for row, (path, index) in enumerate(zip(batch.paths, batch.indices)):
            top = [(int(c), self.class_names[c], _round(p)) for c, p in zip(order[row], confidence[row])]
            record = {"path": path, "index": index, "class_index": top[0][0], "class_name": top[0][1],
                      "confidence": top[0][2]}
            if self.labels:
                label = int(labels[row])
                record["label"] = self.class_names[label] if label >= 0 else None
                record["correct"] = (label == top[0][0]) if label >= 0 else None
            yield record, top


class _CsvWriter(_Rows):
    def __init__(self, *args):
        super().__init__(*args)
        self.csv = csv.writer(self.file)
        header = ["path", "index", "class_index", "class_name", "confidence"]
        header += ["label", "correct"] if self.labels else []
        for k in range(2, self.top_k + 1):
            header += [f"top{k}_class_index", f"top{k}_class_name", f"top{k}_confidence"]
        self.csv.writerow(header)

    def write(self, batch: BatchResult, labels: np.ndarray | None) -> None:
        for record, top in self.records(batch, labels):
            values = ["" if v is None else int(v) if isinstance(v, bool) else v for v in record.values()]
            self.csv.writerow(values + [v for entry in top[1:] for v in entry])


class _JsonlWriter(_Rows):
    def write(self, batch: BatchResult, labels: np.ndarray | None) -> None:
        for record, top in self.records(batch, labels):
            if self.top_k > 1:
                record["top_k"] = [{"class_index": c, "class_name": n, "confidence": p} for c, n, p in top]
            self.file.write(json.dumps(record) + "\n")


def _round(p: float) -> float:
    return float(f"{p:.6g}")
