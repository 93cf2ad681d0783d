"""The evaluate stage: honest test-set figures, the confusion data and pictures, MLflow."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_fixture import CLASSES
from conftest import training_run_id
from cifar_pipeline import checkpoint, dataset, evaluate
from cifar_pipeline.cli import main
from cifar_pipeline.export import serving_model


def read_csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_evaluate_writes_figures_confusion_and_pictures(exported):
    report = json.loads((exported / "reports/eval.json").read_text())
    assert report["images"] == 100 and report["tta"] is False
    assert report["accuracy"] >= 0.9  # the tiny data's pattern is learnt in two epochs
    assert 0 < report["loss"] < 2.3  # below chance level's ln(10)
    assert list(report["per_class_accuracy"]) == CLASSES
    assert report["data_digest"] == dataset.load_manifest()["digest"]

    rows = read_csv_rows(exported / "reports/confusion.csv")
    assert rows[0] == ["actual", "predicted"] and len(rows) == 101
    assert np.mean([a == p for a, p in rows[1:]]) == pytest.approx(report["accuracy"])
    assert [a for a, _ in rows[1:]] == [CLASSES[i] for i in dataset.load_split("test").labels]

    for name in ("confusion.png", "wrong.png"):
        with Image.open(exported / "reports" / name) as image:
            assert image.format == "PNG" and image.width >= 200


def test_evaluate_appends_to_the_training_run(exported):
    import mlflow

    run_id = training_run_id(exported)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    report = json.loads((exported / "reports/eval.json").read_text())
    assert run.data.metrics["eval_accuracy"] == pytest.approx(report["accuracy"])
    assert run.data.metrics["eval_loss"] == pytest.approx(report["loss"])
    assert f"eval_accuracy_{CLASSES[0]}" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/eval.json", "evaluation/confusion.png", "evaluation/wrong.png", "evaluation/confusion.csv"} <= logged


def test_tta_averages_each_image_with_its_mirror(exported):
    model, model_cfg, _ = checkpoint.load_model()
    serving = serving_model(model, model_cfg)
    test = dataset.load_split("test")
    with_tta = evaluate.predict_split(serving, test, batch_size=32, tta=True)
    without = evaluate.predict_split(serving, test, batch_size=32, tta=False)
    images = torch.from_numpy(test.images)
    with torch.no_grad():
        expected = (serving(images) + serving(images.flip(2))) / 2  # flip along the width (NHWC)
    np.testing.assert_allclose(np.exp(with_tta.log_probs), expected.numpy(), atol=1e-5)
    assert not np.allclose(with_tta.log_probs, without.log_probs)


def predictions(probs: list[list[float]], labels: list[int]) -> evaluate.Predictions:
    return evaluate.Predictions(np.log(np.array(probs, dtype=np.float32)), np.array(labels))


def test_most_confidently_wrong_orders_by_confidence_and_skips_right_ones():
    preds = predictions([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.05, 0.95], [0.6, 0.4]], [0, 0, 0, 1, 1])
    assert evaluate.most_confidently_wrong(preds, 10).tolist() == [2, 1, 4]
    assert evaluate.most_confidently_wrong(preds, 2).tolist() == [2, 1]
    assert evaluate.most_confidently_wrong(preds, 0).tolist() == []


def test_confusion_matrix_counts_actual_by_predicted():
    counts = evaluate.confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 0, 2]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_wrong_grid_shows_each_wrong_image(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    preds = predictions([[0.2, 0.8]] * 8, [0] * 8)
    evaluate.plot_wrong(images, preds, evaluate.most_confidently_wrong(preds, 7), ["cat", "dog"], tmp_path / "grid.png")
    evaluate.plot_wrong(images, preds, np.array([], dtype=int), ["cat", "dog"], tmp_path / "none.png")
    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "none.png") as none:
        assert grid.height > 2 * none.height  # two rows of pictures against one line of text


def test_missing_model_is_one_clear_error(project, capsys):
    from cifar_pipeline.tracking import write_run_handoff

    assert main(["evaluate"]) == 1
    assert "models/run.json not found; run `cifar-pipeline train`" in capsys.readouterr().err
    write_run_handoff("0" * 32, "0")
    assert main(["evaluate"]) == 1
    assert "models/model.pt not found; run `cifar-pipeline train`" in capsys.readouterr().err
    assert not (project / "reports").exists()
