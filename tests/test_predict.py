"""Batch inference: `cifar-pipeline predict` and its Python API, against a plain onnxruntime
session on the same model: the shared project's models/model.onnx, made by the real export stage."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from cifar_fixture import CLASSES, make_images
from conftest import register_model
from cifar_pipeline.cli import main
from cifar_pipeline.inputs import load_image
from cifar_pipeline.predict import Predictor


@pytest.fixture(scope="module")
def onnx_model(exported_project) -> Path:
    return exported_project / "models" / "model.onnx"


@pytest.fixture
def logs() -> io.StringIO:
    """What cifar_pipeline logs during the test, INFO and up (without relying on pytest's caplog)."""
    stream, logger = io.StringIO(), logging.getLogger("cifar_pipeline")
    handler, level = logging.StreamHandler(stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def reference(onnx_model: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


def predict(*args: str | Path) -> int:
    return main(["predict", *map(str, args)])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def gradient(height: int, width: int) -> np.ndarray:
    """A smooth RGB image, so that JPEG and resizing change it only a little."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1).astype(np.uint8)


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient(64, 64)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def odd_folder(root: Path) -> Path:
    """A corrupt image, a text file, a grayscale PNG, an RGBA PNG and a 640x480 JPEG."""
    root.mkdir(parents=True)
    (root / "corrupt.jpg").write_bytes(truncated_jpeg())
    (root / "notes.txt").write_text("not an image\n")
    save_png(root / "gray.png", gradient(32, 32)[..., 0], "L")
    rgba = np.dstack([gradient(32, 32), np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))])
    save_png(root / "rgba.png", rgba, "RGBA")
    Image.fromarray(gradient(480, 640)).save(root / "photo.jpg", quality=95)
    return root


# --- decoding -------------------------------------------------------------------------------

def test_images_of_any_mode_and_size_become_32x32_rgb(tmp_path):
    folder = odd_folder(tmp_path / "in")
    gray = np.asarray(Image.open(folder / "gray.png"))
    assert np.array_equal(load_image(folder / "gray.png"), np.stack([gray] * 3, axis=-1))

    rgba = np.asarray(Image.open(folder / "rgba.png")).astype(np.float64)
    alpha = rgba[..., 3:] / 255
    on_white = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(load_image(folder / "rgba.png") - on_white).max() <= 1

    deep = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30)
    Image.fromarray(deep).resize((32, 32), Image.Resampling.NEAREST).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    top_bits = (np.asarray(Image.open(tmp_path / "16bit.png")) >> 8).astype(np.uint8)
    assert np.array_equal(load_image(tmp_path / "16bit.png"), np.stack([top_bits] * 3, axis=-1))

    photo = load_image(folder / "photo.jpg")
    full = np.asarray(Image.open(folder / "photo.jpg").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert photo.shape == (32, 32, 3) and photo.dtype == np.uint8
    assert np.abs(photo.astype(int) - full).mean() < 2  # the decoder's DCT shrinking changes little


# --- arrays and the Python API --------------------------------------------------------------

def test_npy_predictions_equal_the_onnx_session(tmp_path, onnx_model):
    images, _ = make_images(3, seed=5)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "p.csv"
    assert predict("--model", onnx_model, "--input", tmp_path / "x.npy", "--output", out, "--top-k", "3", "--batch-size", "7") == 0

    expected = reference(onnx_model, images)
    rows = read_csv(out)
    assert [int(r["index"]) for r in rows] == list(range(len(images)))
    assert [int(r["class_index"]) for r in rows] == expected.argmax(1).tolist()
    assert [r["class_name"] for r in rows] == [CLASSES[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], expected.max(1), rtol=1e-5)
    for k in (2, 3):  # the k-th most likely class and its probability (checked by value: ties among tiny ones)
        chosen = [int(r[f"top{k}_class_index"]) for r in rows]
        given = [float(r[f"top{k}_confidence"]) for r in rows]
        np.testing.assert_allclose(given, np.sort(expected, axis=1)[:, -k], atol=1e-6)
        np.testing.assert_allclose(given, expected[np.arange(len(rows)), chosen], atol=1e-6)
    assert read_csv(tmp_path / "p.errors.csv") == []


def test_python_api(onnx_model, tmp_path):
    images, _ = make_images(2, seed=6)
    predictor = Predictor(onnx_model, providers=["CPUExecutionProvider"], threads=2, workers=3)
    assert predictor.class_names == CLASSES
    np.testing.assert_allclose(predictor.predict(images, batch_size=8), reference(onnx_model, images), atol=1e-6)

    np.save(tmp_path / "x.npy", images)
    batches = list(predictor.iter_batches(tmp_path, batch_size=8))
    assert [len(b.paths) for b in batches] == [8, 8, 4]
    assert np.concatenate([b.indices for b in batches]).tolist() == list(range(20))


def test_input_is_streamed_not_loaded(tmp_path, onnx_model, monkeypatch):
    import cifar_pipeline.predict as predict_module
    from cifar_pipeline.inputs import open_array

    images, _ = make_images(10, seed=1)
    for i, image in enumerate(images):
        save_png(tmp_path / "in" / f"{i:03}.png", image)
    listed, real_iter_files = [], predict_module.iter_files

    def counting_iter_files(root):
        for path in real_iter_files(root):
            listed.append(path)
            yield path

    monkeypatch.setattr(predict_module, "iter_files", counting_iter_files)
    predictor = Predictor(onnx_model, workers=2)
    batches = predictor.iter_batches(tmp_path / "in", batch_size=4)
    assert len(next(batches).paths) == 4
    in_flight = predictor.workers + predict_module.PREFETCH_BATCHES + 1
    assert len(listed) <= 4 * in_flight < len(images)  # only a few batches ahead
    batches.close()

    np.save(tmp_path / "x.npy", images)
    assert isinstance(open_array(tmp_path / "x.npy"), np.memmap)  # rows are read batch by batch


def test_predict_does_not_import_torch(onnx_model):
    code = (
        "import sys, numpy as np\n"
        "from cifar_pipeline.predict import Predictor\n"
        f"p = Predictor({str(onnx_model)!r})\n"
        "assert p.predict(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 10)\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_npz_input_and_jsonl_output(tmp_path, onnx_model):
    images, labels = make_images(2, seed=8)
    folder = tmp_path / "in"
    folder.mkdir()
    np.savez(folder / "a.npz", images=images, labels=labels)
    np.savez(folder / "b.npz", images=images.astype(np.float32))  # wrong dtype: an unreadable file
    out = tmp_path / "p.jsonl"
    assert predict("--model", onnx_model, "--input", folder, "--output", out, "--top-k", "2") == 1

    expected = reference(onnx_model, images)
    rows = read_jsonl(out)
    assert [(r["path"], r["index"]) for r in rows] == [(str(folder / "a.npz"), i) for i in range(len(images))]
    assert [r["class_index"] for r in rows] == expected.argmax(1).tolist()
    assert [r["top_k"][0]["class_index"] for r in rows] == expected.argmax(1).tolist()
    np.testing.assert_allclose([r["top_k"][1]["confidence"] for r in rows], np.sort(expected, axis=1)[:, -2], atol=1e-6)
    (error,) = read_csv(tmp_path / "p.errors.csv")
    assert error["path"] == str(folder / "b.npz") and "uint8" in error["reason"]


# --- folders, bad files and exit status ------------------------------------------------------

def test_folder_with_bad_files_scores_the_rest(tmp_path, onnx_model, logs):
    folder = odd_folder(tmp_path / "in")
    out = tmp_path / "p.csv"
    assert predict("--model", onnx_model, "--input", folder, "--output", out) == 1

    scored = ["gray.png", "photo.jpg", "rgba.png"]
    rows = read_csv(out)
    assert [Path(r["path"]).name for r in rows] == scored
    expected = reference(onnx_model, np.stack([load_image(folder / name) for name in scored]))
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], expected.max(1), rtol=1e-5)
    errors = {Path(r["path"]).name: r["reason"] for r in read_csv(tmp_path / "p.errors.csv")}
    assert sorted(errors) == ["corrupt.jpg", "notes.txt"]
    assert "truncated" in errors["corrupt.jpg"].lower() and "cannot identify image" in errors["notes.txt"]
    assert "3 images, 2 errors" in logs.getvalue() and "2 of 5 files could not be read" in logs.getvalue()


def test_strict_stops_at_the_first_bad_file_and_writes_nothing(tmp_path, onnx_model, capsys):
    folder = odd_folder(tmp_path / "in")
    out = tmp_path / "p.csv"
    assert predict("--model", onnx_model, "--input", folder, "--output", out, "--strict") == 1
    assert "corrupt.jpg" in capsys.readouterr().err
    assert list(tmp_path.glob("p*")) == []


def test_exit_2_when_nothing_can_be_scored(tmp_path, onnx_model, logs):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here\n")
    out = tmp_path / "p.csv"
    assert predict("--model", onnx_model, "--input", folder, "--output", out) == 2
    assert read_csv(out) == [] and len(read_csv(tmp_path / "p.errors.csv")) == 1
    assert "none of the 1 files could be read" in logs.getvalue()

    (folder / "notes.txt").unlink()
    assert predict("--model", onnx_model, "--input", folder, "--output", out) == 2
    assert "no files under" in logs.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--input", "missing"], "no such file or directory"),
    (["--output", "p.json"], "must end in .csv or .jsonl"),
    (["--top-k", "11"], "--top-k must be between 1 and 10"),
    (["--model", "model.pt"], "is not an .onnx file"),
    (["--model", "models:/x"], "is not understood"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--workers", "0"], "must be at least 1"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, onnx_model, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", make_images(1, seed=0)[0])
    defaults = {"--model": str(onnx_model), "--input": "x.npy", "--output": "p.csv"}
    defaults.update(zip(args[::2], args[1::2]))
    assert predict(*[v for pair in defaults.items() for v in pair]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_a_provider_that_cannot_work_here_is_refused(tmp_path, onnx_model, capsys):
    from cifar_pipeline.onnx_session import usable_providers

    if "CUDAExecutionProvider" in usable_providers():
        pytest.skip("the CUDA provider works on this GPU host, so it cannot be refused")
    np.save(tmp_path / "x.npy", make_images(1, seed=0)[0])
    assert predict("--model", onnx_model, "--input", tmp_path / "x.npy", "--output", tmp_path / "p.csv", "--providers", "cuda") == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err


def test_accuracy_from_class_folders(tmp_path, onnx_model, logs):
    images, labels = make_images(2, seed=7)
    labels[0] = 1  # a class-0 image in the class-1 folder: one wrong row even for a perfect model
    folder = tmp_path / "in"
    for i, (image, label) in enumerate(zip(images, labels)):
        save_png(folder / CLASSES[label] / f"{i}.png", image)
    save_png(folder / "unsorted" / "x.png", images[0])
    out = tmp_path / "p.jsonl"
    assert predict("--model", onnx_model, "--input", folder, "--output", out, "--labels-from-folders") == 0

    predicted = reference(onnx_model, images).argmax(1)
    accuracy = (predicted == labels).mean()
    assert 0 < accuracy < 1  # both kinds of row below
    assert f"accuracy {accuracy:.4f} on 20 labelled images" in logs.getvalue()
    rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in read_jsonl(out)}
    for i, label in enumerate(labels):
        row = rows[f"{CLASSES[label]}/{i}.png"]
        assert row["label"] == CLASSES[label] and row["correct"] == bool(predicted[i] == label)
    assert rows["unsorted/x.png"]["label"] is None and rows["unsorted/x.png"]["correct"] is None


# --- the registry ---------------------------------------------------------------------------

def test_registry_sources_and_unknown_names(exported, tmp_path, capsys):
    registry = register_model(exported, tmp_path, model_name="predict-test")
    assert registry["version"] == "1" and "champion" in registry["aliases"]
    images, _ = make_images(1, seed=9)
    expected = reference(exported / "models" / "model.onnx", images)
    for source in ("models:/predict-test@champion", "models:/predict-test/1"):
        predictor = Predictor(source)
        assert predictor.description == "models:/predict-test/1" and predictor.class_names == CLASSES
        np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-6)

    np.save(tmp_path / "x.npy", images)
    capsys.readouterr()
    for source, listing in [
        ("models:/predict-test@nope", "has no alias 'nope'; its aliases: @challenger (version 1), @champion (version 1)"),
        ("models:/predict-test/7", "has no version 7; its versions: 1"),
        ("models:/no-such-model@champion", "no registered model 'no-such-model'"),
    ]:
        assert predict("--model", source, "--input", tmp_path / "x.npy", "--output", tmp_path / "p.csv") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and listing in err and len(err.splitlines()) == 1
    assert "registered models: " in err and "none" not in err  # the shared store's models, listed
