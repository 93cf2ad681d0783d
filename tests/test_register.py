"""The register stage: registry versions, tags, aliases and the promotion gate, on a real
SQLite MLflow store. Each test registers under a model name of its own in the shared project."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from cifar_pipeline import dataset
from cifar_pipeline.cli import main
from cifar_pipeline.config import RegisterConfig
from cifar_pipeline.errors import ConfigError
from cifar_pipeline.export import file_digest
from cifar_pipeline.onnx_session import create_session, predict
from cifar_pipeline.register import decide
from conftest import register_model as register
from conftest import training_run_id


def test_register_tags_the_version_and_sets_both_aliases(exported, tmp_path):
    report = register(exported, tmp_path)  # defaults: cifar10-resnet, min_accuracy 0.5
    exported_report = json.loads((exported / "reports/export.json").read_text())
    assert report["name"] == "cifar10-resnet" and report["version"] == "1"
    assert report["decision"] == "promoted" and report["aliases"] == ["challenger", "champion"]
    assert report["champion_version"] == "1" and "no champion yet" in report["reason"]

    version = mlflow.MlflowClient().get_model_version("cifar10-resnet", "1")
    assert version.tags["run_id"] == training_run_id(exported)
    assert version.tags["data_digest"] == dataset.load_manifest()["digest"]
    assert version.tags["model_digest"] == file_digest(exported / "models/model.onnx")
    assert float(version.tags["accuracy"]) == exported_report["onnx_accuracy"]
    assert version.tags["git_commit"]


def test_champion_loads_with_mlflow_onnx_and_pyfunc_and_predicts(exported, tmp_path):
    register(exported, tmp_path, model_name="load-test")
    images = dataset.load_split("test").images[:5]
    expected = predict(create_session("models/model.onnx"), images)

    proto = mlflow.onnx.load_model("models:/load-test@champion")
    assert [i.name for i in proto.graph.input] == ["images"]
    predicted = mlflow.pyfunc.load_model("models:/load-test@champion").predict(images)
    predicted = predicted["probabilities"] if isinstance(predicted, dict) else np.asarray(predicted)
    np.testing.assert_allclose(predicted, expected, atol=1e-6)


def test_unknown_alias_names_the_existing_ones(exported, tmp_path):
    from cifar_pipeline.model_source import resolve

    register(exported, tmp_path, model_name="alias-test")
    with pytest.raises(ConfigError, match=r"no alias 'nope'.*@challenger \(version 1\), @champion \(version 1\)"):
        resolve("models:/alias-test@nope", tmp_path)


def test_repeated_register_reuses_the_version(exported, tmp_path):
    first = register(exported, tmp_path, model_name="idem-test")
    again = register(exported, tmp_path, model_name="idem-test")
    assert (first["version"], first["reused_version"], first["decision"]) == ("1", False, "promoted")
    assert (again["version"], again["reused_version"], again["decision"]) == ("1", True, "kept")
    assert again["aliases"] == ["challenger", "champion"]
    assert len(mlflow.MlflowClient().search_model_versions("name = 'idem-test'")) == 1


def test_gate_holds_the_champion_unless_the_challenger_is_better_enough(exported, tmp_path):
    client = mlflow.MlflowClient()
    exported_report = json.loads((exported / "reports/export.json").read_text())
    accuracy = exported_report["onnx_accuracy"]
    # an earlier champion as good as this model (registered by hand, without a model digest)
    earlier = mlflow.register_model(exported_report["mlflow"]["model_uri"], "gate-test", tags={"accuracy": str(accuracy)})
    client.set_registered_model_alias("gate-test", "champion", earlier.version)

    held = register(exported, tmp_path, model_name="gate-test", min_improvement=0.01)
    assert (held["version"], held["decision"], held["champion_version"]) == ("2", "held", "1")
    assert held["aliases"] == ["challenger"] and "min_improvement" in held["reason"]
    assert client.get_registered_model("gate-test").aliases == {"champion": 1, "challenger": 2}

    promoted = register(exported, tmp_path, model_name="gate-test", min_improvement=0.0)
    assert (promoted["version"], promoted["decision"], promoted["champion_version"]) == ("2", "promoted", "2")
    assert client.get_registered_model("gate-test").aliases == {"champion": 2, "challenger": 2}


GATE = RegisterConfig(model_name="m", min_accuracy=0.5, min_improvement=0.01)


@pytest.mark.parametrize(("accuracy", "champion", "outcome"), [
    (0.49, None, "held"),           # below min_accuracy, even with no champion
    (0.50, None, "promoted"),       # exactly min_accuracy
    (0.70, ("3", 0.695), "held"),   # better, but by less than min_improvement
    (0.71, ("3", 0.70), "promoted"),
    (0.40, ("3", 0.30), "held"),    # beats the champion but not min_accuracy
    (0.90, ("3", None), "held"),    # a champion without an accuracy tag is not replaced blindly
    (0.10, ("7", 0.90), "kept"),    # this version already is the champion
])
def test_decide(accuracy, champion, outcome):
    assert decide(accuracy, champion, "7", GATE).outcome == outcome


def test_register_needs_the_export_report(project, capsys):
    assert main(["register"]) == 1
    assert "reports/export.json not found; run `cifar-pipeline export`" in capsys.readouterr().err


@pytest.mark.slow
def test_dvc_repro_runs_all_five_stages_and_reruns_safely(dvc_repo):
    from conftest import TINY_TRAINING, run_dvc, write_params

    write_params(dvc_repo, train=TINY_TRAINING)
    out = run_dvc(dvc_repo, "repro").stdout
    for stage in ("download", "train", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in out
    metrics = run_dvc(dvc_repo, "metrics", "show", "--json").stdout
    shown = json.loads(metrics)[""]["data"]  # "": the workspace
    assert {"reports/train.json", "reports/eval.json", "reports/export.json"} <= set(shown)
    assert shown["reports/export.json"]["data"]["top1_agreement"] >= 0.999
    assert json.loads((dvc_repo / "reports/registry.json").read_text())["decision"] == "promoted"

    again = run_dvc(dvc_repo, "repro").stdout
    assert "Running stage" not in again
    run_dvc(dvc_repo, "repro", "--force", "--single-item", "register")  # as after a lost dvc.lock
    registry = json.loads((dvc_repo / "reports/registry.json").read_text())
    assert (registry["version"], registry["reused_version"], registry["decision"]) == ("1", True, "kept")
