"""The download stage against a real HTTP server on 127.0.0.1 and real archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

import numpy as np
import pytest

from cifar_fixture import CLASSES, build_archive, make_images
from cifar_pipeline.cli import main
from cifar_pipeline.dataset import load_manifest, load_split
from conftest import write_params


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level("INFO")


def snapshot(root):
    """Every file under data/ with its content hash, to prove a failure changed nothing."""
    data = root / "data"
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(data.rglob("*")) if p.is_file()}


def test_download_prepares_arrays_and_manifest(prepared):
    train, test = load_split("train"), load_split("test")
    assert train.images.shape == (300, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (100, 32, 32, 3) and test.labels.dtype == np.int64
    # The NHWC conversion is right: the fixture's images come back pixel for pixel.
    expected, labels = make_images(30, seed=0)
    np.testing.assert_array_equal(train.images, expected)
    np.testing.assert_array_equal(train.labels, labels)
    manifest = load_manifest()
    assert manifest["class_names"] == CLASSES
    assert manifest["splits"]["train"]["count"] == 300
    assert manifest["splits"]["test"]["per_class"] == {c: 10 for c in CLASSES}
    assert manifest["digest"].startswith("sha256:") and len(manifest["digest"]) == 71
    assert not list((prepared.parent).glob(".*tmp")), "temporary files left behind"


def test_loading_a_split_is_fast(prepared):
    start = time.perf_counter()
    load_split("train")
    assert time.perf_counter() - start < 1.0


def test_present_archive_is_reused_without_download(prepared, project, caplog, tiny_archive):
    before = (project / "data/raw/cifar-10-python.tar.gz").stat().st_mtime_ns
    write_params(project, data={"url": "http://127.0.0.1:9/unreachable.tar.gz"})  # would fail if fetched
    assert main(["download"]) == 0
    assert (project / "data/raw/cifar-10-python.tar.gz").stat().st_mtime_ns == before
    assert "reusing" in caplog.text


def test_subsets_are_class_balanced_and_seeded(project):
    write_params(project, data={"train_size": 105, "test_size": 50, "subset_seed": 3})
    assert main(["download"]) == 0
    train = load_split("train")
    counts = np.bincount(train.labels, minlength=10)
    assert len(train) == 105 and counts.max() - counts.min() <= 1
    assert np.bincount(load_split("test").labels).tolist() == [5] * 10
    first = train.images.copy()
    assert main(["download"]) == 0
    np.testing.assert_array_equal(load_split("train").images, first)  # same seed, same subset


def test_subset_larger_than_split_is_rejected(project, capsys):
    write_params(project, data={"test_size": 5000})
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert "data.test_size is 5000" in err and err.count("\n") == 1


def test_file_url(project, tiny_archive, capsys):
    write_params(project, data={"url": tiny_archive[0].as_uri()})
    assert main(["download"]) == 0
    assert load_manifest()["splits"]["train"]["count"] == 300


def test_missing_file_url_is_one_line(project, tmp_path, capsys):
    write_params(project, data={"url": (tmp_path / "nope.tar.gz").as_uri()})
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read file://") and err.count("\n") == 1


def test_unreachable_url_fails_after_retries(project, capsys, caplog):
    write_params(project, data={"url": "http://127.0.0.1:9/cifar.tar.gz", "retries": 2})
    assert main(["download"]) == 1
    assert "gave up after 3 attempts" in capsys.readouterr().err
    assert caplog.text.count("retrying") == 2
    assert snapshot(project) == {}


def test_http_404_is_not_retried(project, http_server, capsys, caplog):
    write_params(project, data={"url": f"{http_server}/missing.tar.gz", "retries": 3})
    assert main(["download"]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert "retrying" not in caplog.text


def test_checksum_mismatch_shows_both_sums_and_keeps_old_outputs(prepared, project, http_root, http_server, capsys):
    before = snapshot(project)
    other = http_root / "other.tar.gz"
    other_md5 = build_archive(other, train_per_class=5, test_per_class=2, seed=7)
    wrong = "0" * 32
    write_params(project, data={"url": f"{http_server}/other.tar.gz", "md5": wrong})
    (project / "data/raw/cifar-10-python.tar.gz").write_bytes(b"stale")  # forces a fetch
    before = snapshot(project)
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert f"expected md5 {wrong}, got {other_md5}" in err and err.count("\n") == 1
    assert snapshot(project) == before


def test_truncated_archive(project, http_root, http_server, tiny_archive, capsys):
    data = tiny_archive[0].read_bytes()
    (http_root / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    write_params(project, data={"url": f"{http_server}/truncated.tar.gz", "md5": None})
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and err.count("\n") == 1
    assert snapshot(project) == {}


def test_not_an_archive(project, http_root, http_server, capsys):
    (http_root / "page.tar.gz").write_text("<html>not found</html>")
    write_params(project, data={"url": f"{http_server}/page.tar.gz", "md5": None})
    assert main(["download"]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err


def test_archive_without_expected_files(project, http_root, http_server, capsys):
    md5 = build_archive(http_root / "partial.tar.gz", omit=("data_batch_3", "test_batch"))
    write_params(project, data={"url": f"{http_server}/partial.tar.gz", "md5": md5})
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert "missing cifar-10-batches-py/data_batch_3, cifar-10-batches-py/test_batch" in err
    assert snapshot(project) == {}


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "link"])
def test_unsafe_members_are_refused(project, http_root, http_server, capsys, member):
    info = tarfile.TarInfo(member)
    if member == "link":
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
    else:
        info.size = 4
    name = f"unsafe-{abs(hash(member))}.tar.gz"
    md5 = build_archive(http_root / name, extra_members=[info])
    write_params(project, data={"url": f"{http_server}/{name}", "md5": md5})
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert "unsafe archive member" in err and err.count("\n") == 1
    assert snapshot(project) == {}
    assert not (project.parent / "evil.txt").exists()


def test_pickle_with_code_is_refused(project, http_root, http_server, capsys):
    """A batch whose pickle would call os.system is rejected, not executed."""
    payload = b"cos\nsystem\n(S'touch pwned'\ntR."
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (http_root / "evil.tar.gz").write_bytes(buf.getvalue())
    write_params(project, data={"url": f"{http_server}/evil.tar.gz", "md5": None})
    assert main(["download"]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not (project / "pwned").exists()


def test_manifest_digest_changes_with_content(project, http_root, http_server):
    assert main(["download"]) == 0
    first = json.loads((project / "data/prepared/manifest.json").read_text())["digest"]
    md5 = build_archive(http_root / "seed5.tar.gz", seed=5)
    write_params(project, data={"url": f"{http_server}/seed5.tar.gz", "md5": md5})
    assert main(["download"]) == 0
    assert load_manifest()["digest"] != first
