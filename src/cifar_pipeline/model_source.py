"""Where a model to serve comes from: a registered version in the MLflow registry, or a file.

    models:/NAME@ALIAS      the version an alias points at (e.g. models:/cifar10-resnet@champion)
    models:/NAME/VERSION    a version by number
    path/to/model.onnx      an exported model on disk

Registry sources are looked up at tracking.tracking_uri() and their ONNX file downloaded to a
directory the caller gives. MLflow is imported only for them: a file needs onnxruntime alone.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cifar_pipeline.errors import ConfigError

URI_PATTERN = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION or a path to an .onnx file"
MAX_LISTED = 10
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None
    version: str | None


def parse_source(source: str) -> RegistryRef | Path:
    if source.startswith("models:"):
        match = URI_PATTERN.match(source)
        if not match:
            raise ConfigError(f"model source {source!r} is not understood; give {FORMS}")
        return RegistryRef(match["name"], match["alias"], match["version"])
    path = Path(source)
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"model source {source!r} is not an .onnx file; give {FORMS}")
    if not path.is_file():
        raise ConfigError(f"{path}: model file not found; run `cifar-pipeline export` or give {FORMS}")
    return path


def resolve(source: str, download_dir: Path) -> tuple[Path, str]:
    """The local ONNX file of `source` and a description of what it is (name and version)."""
    ref = parse_source(source)
    if isinstance(ref, Path):
        return ref, str(ref)
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from cifar_pipeline.tracking import tracking_uri

    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = _version(client, ref, uri)
    with _artifact_progress_bar_off():  # a few small files; the bar would only clutter the log
        local = Path(download_artifacts(artifact_uri=f"models:/{ref.name}/{version}", dst_path=str(download_dir),
                                        tracking_uri=uri, registry_uri=uri))
    onnx_files = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not onnx_files:
        raise ConfigError(f"models:/{ref.name}/{version} holds no .onnx file; register an ONNX model (cifar-pipeline register)")
    return onnx_files[0], f"models:/{ref.name}/{version}"


def _version(client, ref: RegistryRef, uri: str) -> str:
    """The version number `ref` names, checked to exist; else ConfigError listing what exists."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(ref.name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=MAX_LISTED + 1)]
        raise ConfigError(
            f"no registered model {ref.name!r} in {uri}; registered models: {_listing(names)}"
        ) from None
    if ref.alias is not None:
        if ref.alias not in model.aliases:
            aliases = [f"@{a} (version {v})" for a, v in sorted(model.aliases.items())]
            raise ConfigError(f"model {ref.name!r} has no alias {ref.alias!r}; its aliases: {_listing(aliases)}")
        return str(model.aliases[ref.alias])
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{ref.name}'")), reverse=True)
    if int(ref.version) not in versions:
        raise ConfigError(f"model {ref.name!r} has no version {ref.version}; its versions: {_listing([str(v) for v in versions])}")
    return ref.version


@contextlib.contextmanager
def _artifact_progress_bar_off() -> Iterator[None]:
    """MLflow's artifact download bar off, unless the user set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR."""
    if PROGRESS_BAR_VARIABLE in os.environ:
        yield
        return
    os.environ[PROGRESS_BAR_VARIABLE] = "false"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_BAR_VARIABLE, None)


def _listing(items: list[str]) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (", ..." if len(items) > MAX_LISTED else "")
