"""The export stage: the ONNX serving contract, parity with PyTorch, int8, the logged model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import yaml

from cifar_fixture import CLASSES
from conftest import training_run_id
from cifar_pipeline import checkpoint, dataset
from cifar_pipeline.cli import main
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.export import file_digest, serving_model
from cifar_pipeline.onnx_session import create_session, predict, usable_providers


def export_report(project) -> dict:
    return json.loads((project / "reports/export.json").read_text())


def test_onnx_matches_pytorch_on_the_whole_test_split(exported):
    report = export_report(exported)
    assert report["images"] == 100
    assert report["top1_agreement"] >= 0.999 and report["max_prob_diff"] <= 1e-4
    assert report["onnx_accuracy"] == pytest.approx(report["pytorch_accuracy"])
    # measured again here, not taken from the report
    model, model_cfg, _ = checkpoint.load_model()
    test = dataset.load_split("test")
    with torch.no_grad():
        reference = serving_model(model, model_cfg)(torch.from_numpy(test.images)).numpy()
    probs = predict(create_session("models/model.onnx"), test.images)
    assert np.abs(probs - reference).max() <= 1e-4
    assert (probs.argmax(1) == reference.argmax(1)).all()


def test_graph_takes_uint8_nhwc_and_returns_probabilities_with_metadata(exported):
    model = onnx.load("models/model.onnx")
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.name == "probabilities" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [32, 32, 3]  # dynamic batch
    assert isinstance(out_dims[0], str) and out_dims[1:] == [10]
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert not [p for p in (exported / "models").iterdir() if p.suffix not in (".onnx", ".pt", ".json")]  # no side files
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES
    assert json.loads(meta["model_config"]) == yaml.safe_load((exported / "params.yaml").read_text())["model"]


def test_normalization_constants_broadcast_over_the_batch_only(exported):
    # A per-channel [1,1,1,3] constant made the int8 model's normalization 14% of its time
    # (see ServingModel); the constants must span the whole image.
    model = onnx.load("models/model.onnx")
    constants = {t.name: list(t.dims) for t in model.graph.initializer}  # named after ServingModel's buffers
    assert constants["scale"] == constants["shift"] == [1, 3, 32, 32]


def test_batches_of_1_and_37(exported):
    session = create_session("models/model.onnx")
    images = dataset.load_split("test").images[:37]
    one_by_one = np.concatenate([session.run(None, {"images": images[i:i + 1]})[0] for i in range(37)])
    (batch,) = session.run(["probabilities"], {"images": images})
    assert batch.shape == (37, 10) and batch.dtype == np.float32
    np.testing.assert_allclose(batch.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(batch, one_by_one, atol=1e-6)


def test_batches_side_by_side_come_back_in_order(exported):
    images = dataset.load_split("test").images
    one_at_a_time = predict(create_session("models/model.onnx"), images, batch_size=7)
    side_by_side = predict(create_session("models/model.onnx", threads=1), images, batch_size=7, workers=3)
    np.testing.assert_allclose(side_by_side, one_at_a_time, atol=1e-6)


def test_wrong_dtype_or_shape_is_a_clear_error(exported):
    session = create_session("models/model.onnx")
    images = dataset.load_split("test").images[:4]
    with pytest.raises(Exception, match=r"expected: \(tensor\(uint8\)\)"):  # onnxruntime's own check
        session.run(None, {"images": images.astype(np.float32)})
    with pytest.raises(Exception, match="[Ii]nvalid dimensions"):
        session.run(None, {"images": np.ascontiguousarray(images.transpose(0, 3, 1, 2))})
    with pytest.raises(PipelineError, match="images must be uint8"):
        predict(session, images.astype(np.float32))
    with pytest.raises(PipelineError, match=r"shape \[batch, 32, 32, 3\].*got \[4, 3, 32, 32\]"):
        predict(session, np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def test_int8_model_runs_and_its_figures_are_recorded(exported):
    report = export_report(exported)
    for key in ("int8_accuracy", "int8_top1_agreement", "int8_images_per_s", "onnx_images_per_s", "pytorch_images_per_s", "int8_speedup"):
        assert report[key] > 0, key
    for model in ("onnx", "int8"):  # both ways of running batches measured; each model's best is its figure
        ways = [report[f"{model}_op_parallel_images_per_s"], report[f"{model}_batch_parallel_images_per_s"]]
        assert min(ways) > 0 and report[f"{model}_images_per_s"] == max(ways)
    assert report["int8_speedup"] == pytest.approx(report["int8_images_per_s"] / report["onnx_images_per_s"], abs=0.01)
    assert report["int8_accuracy"] >= report["onnx_accuracy"] - 0.05
    assert report["int8_bytes"] < report["onnx_bytes"] / 2  # int8 weights
    model = onnx.load("models/model.int8.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Softmax" in ops
    probs = predict(create_session("models/model.int8.onnx"), dataset.load_split("test").images[:37])
    assert probs.shape == (37, 10)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)


def test_onnx_model_is_logged_to_the_training_run(exported):
    import mlflow

    report = export_report(exported)
    assert report["mlflow"]["run_id"] == training_run_id(exported)
    assert report["onnx_sha256"] == file_digest(exported / "models/model.onnx")
    uri = report["mlflow"]["model_uri"]
    info = mlflow.models.get_model_info(uri)
    (spec,) = info.signature.inputs.inputs
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 32, 32, 3)
    assert info.flavors["onnx"]["providers"] == list(usable_providers())
    requirements = open(mlflow.pyfunc.get_model_dependencies(uri)).read().split()
    assert any(r.startswith("onnxruntime-gpu==") for r in requirements)
    assert not any(r == "onnxruntime" or r.startswith(("onnxruntime=", "onnxruntime<", "onnxruntime>")) for r in requirements)
    proto = mlflow.onnx.load_model(uri)
    assert [i.name for i in proto.graph.input] == ["images"]


def test_failed_parity_gate_fails_the_stage_and_keeps_the_old_model(exported, tmp_path, capsys):
    params = yaml.safe_load((exported / "params.yaml").read_text())
    params["export"]["max_prob_diff"] = 0.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    before = {p.name: file_digest(p) for p in (exported / "models").glob("*.onnx")}
    assert main(["--params", str(tmp_path / "params.yaml"), "export"]) == 1
    assert "ONNX parity gate failed: max probability difference" in capsys.readouterr().err
    assert {p.name: file_digest(p) for p in (exported / "models").glob("*.onnx")} == before
    assert not list((exported / "models").glob(".*.tmp"))


def test_missing_model_is_one_clear_error(project, capsys):
    from cifar_pipeline.tracking import write_run_handoff

    write_run_handoff("0" * 32, "0")
    assert main(["export"]) == 1
    assert "models/model.pt not found; run `cifar-pipeline train`" in capsys.readouterr().err
    assert not (project / "models/model.onnx").exists()


def test_explicit_unusable_provider_is_refused(exported):
    with pytest.raises(PipelineError, match="NoSuchExecutionProvider is not in this onnxruntime build"):
        create_session("models/model.onnx", providers=["NoSuchExecutionProvider"])
    with pytest.raises(PipelineError, match="ONNX model not found"):
        create_session("models/nothing.onnx")
