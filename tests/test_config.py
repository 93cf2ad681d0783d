"""params.yaml validation: one line naming the file, the key and what was expected; exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cifar_pipeline.cli import main
from cifar_pipeline.config import SECTIONS, load_section
from conftest import REPO


def test_repository_params_are_valid():
    for name in SECTIONS:
        load_section(name, REPO / "params.yaml")


def edit(project, change):
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["data"].update(colour=1), "unknown key 'data.colour'"),
    (lambda p: p["data"].pop("md5"), "missing key 'data.md5'"),
    (lambda p: p["data"].update(train_size="many"), "key 'data.train_size'"),
    (lambda p: p["data"].update(url="ftp://x/y"), "key 'data.url'"),
    (lambda p: p["data"].update(md5="abc"), "key 'data.md5'"),
    (lambda p: p.update(trian={}), "unknown section 'trian'"),
    (lambda p: p.pop("data"), "missing section 'data'"),
])
def test_bad_params_fail_in_one_line(project, capsys, change, expected):
    edit(project, change)
    assert main(["download"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "params.yaml" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (project / "data").exists()


@pytest.mark.parametrize("section, change, expected", [
    ("model", {"blocks_per_stage": []}, "model.blocks_per_stage"),
    ("model", {"widths": [16, 32]}, "one width per stage"),
    ("train", {"lr": -0.1}, "train.lr"),
    ("train", {"schedule": "linear"}, "train.schedule"),
    ("train", {"precision": "fp16"}, "train.precision"),
    ("export", {"min_agreement": 1.5}, "export.min_agreement"),
])
def test_bad_values_name_the_key(project, section, change, expected):
    edit(project, lambda p: p[section].update(change))
    with pytest.raises(Exception) as info:
        load_section(section)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_invalid_yaml(project, capsys):
    (project / "params.yaml").write_text("data: [unclosed\n")
    assert main(["download"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cli_exit_status_and_no_traceback(project):
    edit(project, lambda p: p["data"].update(retries="three"))
    out = subprocess.run([sys.executable, "-m", "cifar_pipeline", "download"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: params.yaml: key 'data.retries'")
    assert "Traceback" not in out.stderr
