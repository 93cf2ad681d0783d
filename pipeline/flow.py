"""The Prefect flow that runs the DVC pipeline, one task per stage.

    python -m pipeline.flow                 # run once (Prefect's local mode; no server to start)
    python -m pipeline.flow --serve [--cron "0 3 * * *"]   # a deployment, run on demand or by schedule

DVC decides what to run (cache, dvc.lock); Prefect adds retries for the download, one observable
task per stage with its output in the logs, the flow run id on the MLflow run, and a summary.
"""

from __future__ import annotations

from pipeline import settings  # noqa: F401  (must precede the Prefect import)

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from cifar_pipeline.tracking import RUN_FILE, read_run_handoff
from pipeline.dvc_stages import StageFailed, StageResult, repro_stage, stage_order

DOWNLOAD_STAGE = "download"
TRAIN_STAGE = "train"


@task(task_run_name="dvc repro {stage}")
def run_stage(stage: str, root: str) -> StageResult:
    logger = get_run_logger()
    result = repro_stage(stage, Path(root), logger.info)
    logger.info("stage %s %s", stage, "was up to date (cached)" if result.cached else "ran")
    return result


def tag_mlflow_run(root: Path, flow_run_id: str) -> str | None:
    """Put the Prefect flow run id on the training's MLflow run (models/run.json)."""
    handoff = root / RUN_FILE
    if not handoff.exists():
        return None
    from mlflow import MlflowClient

    run = read_run_handoff(handoff)
    MlflowClient(tracking_uri=run["tracking_uri"]).set_tag(run["run_id"], "prefect.flow_run_id", flow_run_id)
    return run["run_id"]


def read_report(root: Path, name: str) -> dict:
    path = root / "reports" / name
    return json.loads(path.read_text()) if path.exists() else {}


def summary_markdown(root: Path, results: list[StageResult], run_id: str | None) -> str:
    evaluation, export, registry = (read_report(root, n) for n in ("eval.json", "export.json", "registry.json"))
    rows = [
        ("stages", ", ".join(f"{r.stage} ({'cached' if r.cached else 'ran'})" for r in results)),
        ("test accuracy", _pct(evaluation.get("accuracy"))),
        ("ONNX top-1 agreement", _pct(export.get("top1_agreement"))),
        ("ONNX max probability difference", _num(export.get("max_prob_diff"))),
        ("int8 accuracy", _pct(export.get("int8_accuracy"))),
        ("registered model", f"{registry.get('name', '-')} version {registry.get('version', '-')}"),
        ("aliases", ", ".join(registry.get("aliases", [])) or "-"),
        ("promotion", registry.get("reason", "-")),
        ("MLflow run", run_id or "-"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# CIFAR-10 pipeline run\n\n| | |\n|---|---|\n{table}\n"


def _pct(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def _num(value) -> str:
    return f"{value:.2e}" if isinstance(value, (int, float)) else "-"


@flow(name="cifar10-pipeline")
def pipeline(root: str = ".", download_retries: int = 2, retry_delay_s: float = 10.0) -> list[StageResult]:
    """Run every DVC stage in dependency order; a failing stage fails the flow and stops it."""
    root_path = Path(root).resolve()
    results = []
    run_id = None
    for stage in stage_order(root_path):
        options = {}
        if stage == DOWNLOAD_STAGE:
            options = {"retries": download_retries, "retry_delay_seconds": [retry_delay_s * 2**i for i in range(download_retries)]}
        results.append(run_stage.with_options(**options)(stage, str(root_path)))
        if stage == TRAIN_STAGE:
            run_id = tag_mlflow_run(root_path, str(flow_run.id))
    create_markdown_artifact(
        key="cifar10-pipeline-summary", markdown=summary_markdown(root_path, results, run_id),
        description="accuracy, ONNX parity, registered version",
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flow", description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="serve the flow as a deployment (flow.serve)")
    parser.add_argument("--cron", help="with --serve: a cron schedule, e.g. '0 3 * * *'")
    parser.add_argument("--download-retries", type=int, default=2)
    args = parser.parse_args(argv)
    if args.serve:
        pipeline.serve(name="cifar10-pipeline", cron=args.cron, parameters={"root": str(Path.cwd())})
        return 0
    try:
        pipeline(root=str(Path.cwd()), download_retries=args.download_retries)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
