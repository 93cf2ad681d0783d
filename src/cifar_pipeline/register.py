"""The register stage: the exported ONNX model becomes a version in the MLflow model registry.

Every registered model gets alias `challenger`. Alias `champion`, the one to serve, moves to it
only through the promotion gate: its test accuracy is at least `register.min_accuracy` and at
least the current champion's plus `register.min_improvement`. The registry lives outside DVC, so
the stage is safe to re-run: a model whose file digest is already registered reuses its version.
reports/registry.json records the outcome and its reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cifar_pipeline.atomic import write_json
from cifar_pipeline.config import RegisterConfig
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.evaluate import EVAL_JSON
from cifar_pipeline.export import EXPORT_JSON, ONNX_PATH, file_digest

log = logging.getLogger(__name__)

REGISTRY_JSON = Path("reports/registry.json")
CHALLENGER = "challenger"
CHAMPION = "champion"
DIGEST_TAG = "model_digest"
ACCURACY_TAG = "accuracy"


@dataclass(frozen=True)
class Decision:
    outcome: str  # promoted | held | kept
    reason: str


def decide(accuracy: float, champion: tuple[str, float | None] | None, version: str, cfg: RegisterConfig) -> Decision:
    """The promotion gate. `champion` is the current champion's (version, accuracy), if any."""
    if champion is not None and champion[0] == version:
        return Decision("kept", f"version {version} is already the champion")
    if accuracy < cfg.min_accuracy:
        return Decision("held", f"accuracy {accuracy:.4f} is below register.min_accuracy {cfg.min_accuracy:.4f}")
    if champion is None:
        return Decision("promoted", f"accuracy {accuracy:.4f} meets register.min_accuracy {cfg.min_accuracy:.4f} and there is no champion yet")
    champion_version, champion_accuracy = champion
    if champion_accuracy is None:
        return Decision("held", f"champion version {champion_version} has no '{ACCURACY_TAG}' tag to compare with; tag it or move the alias by hand")
    needed = champion_accuracy + cfg.min_improvement
    if accuracy < needed:
        return Decision("held", f"accuracy {accuracy:.4f} is below champion version {champion_version}'s {champion_accuracy:.4f} "
                                f"plus register.min_improvement {cfg.min_improvement:.4f}")
    return Decision("promoted", f"accuracy {accuracy:.4f} meets register.min_accuracy {cfg.min_accuracy:.4f} and beats champion "
                                f"version {champion_version}'s {champion_accuracy:.4f} by at least {cfg.min_improvement:.4f}")


def read_report(path: Path, stage: str) -> dict:
    if not path.exists():
        raise PipelineError(f"{path} not found; run `cifar-pipeline {stage}` (or `dvc repro {stage}`) first")
    return json.loads(path.read_text())


def run(cfg: RegisterConfig) -> dict:
    from mlflow import MlflowClient

    from cifar_pipeline.tracking import git_state, read_run_handoff, setup_mlflow, tracking_uri

    exported, evaluated, handoff = read_report(EXPORT_JSON, "export"), read_report(EVAL_JSON, "evaluate"), read_run_handoff()
    if not ONNX_PATH.exists() or file_digest(ONNX_PATH) != exported["onnx_sha256"]:
        raise PipelineError(f"{ONNX_PATH} is missing or is not the model {EXPORT_JSON} describes; run `cifar-pipeline export` again")
    digest, accuracy = exported["onnx_sha256"], exported["onnx_accuracy"]  # the registered artifact's own accuracy
    mlflow = setup_mlflow()
    client = MlflowClient(tracking_uri(), registry_uri=tracking_uri())

    version = find_version(client, cfg.model_name, digest)
    reused = version is not None
    if version is None:
        tags = {
            "run_id": handoff["run_id"], **git_state(), "data_digest": evaluated["data_digest"],
            ACCURACY_TAG: str(accuracy), "eval_accuracy": str(evaluated["accuracy"]), DIGEST_TAG: digest,
        }
        version = mlflow.register_model(exported["mlflow"]["model_uri"], cfg.model_name, tags=tags).version
    version = str(version)

    client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
    champion = current_champion(client, cfg.model_name)
    decision = decide(accuracy, champion, version, cfg)
    if decision.outcome == "promoted":
        client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    client.set_tag(handoff["run_id"], "registered_model", f"{cfg.model_name}/{version}")

    report = {
        "name": cfg.model_name,
        "version": version,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "aliases": sorted(client.get_model_version(cfg.model_name, version).aliases),
        "decision": decision.outcome,
        "reason": decision.reason,
        "accuracy": accuracy,
        "champion_version": (current_champion(client, cfg.model_name) or (None,))[0],
        "reused_version": reused,
        DIGEST_TAG: digest,
    }
    write_json(REGISTRY_JSON, report)
    log.info("%s version %s%s: %s (%s)", cfg.model_name, version, " (reused)" if reused else "", decision.outcome, decision.reason)
    return report


def find_version(client, name: str, digest: str) -> str | None:
    """The version already registered from a model file with this digest, if any."""
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(DIGEST_TAG) == digest:
            return str(mv.version)
    return None


def current_champion(client, name: str) -> tuple[str, float | None] | None:
    """(version, accuracy tag) of the version alias `champion` points at, or None."""
    aliases = client.get_registered_model(name).aliases
    if CHAMPION not in aliases:
        return None
    version = str(aliases[CHAMPION])
    accuracy = client.get_model_version(name, version).tags.get(ACCURACY_TAG)
    return version, float(accuracy) if accuracy is not None else None
