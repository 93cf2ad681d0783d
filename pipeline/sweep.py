"""A grid of DVC experiments that fills the MLflow comparison: residual against plain, by depth.

    python -m pipeline.sweep                              # residual {true,false} x blocks {1,1,1; 2,2,2; 3,3,3}
    python -m pipeline.sweep --epochs 3 --blocks 3,3,3 9,9,9 --set train.batch_size=256

Each variant is one `dvc exp run` in the workspace, one after another (so every run lands in the
workspace's MLflow store), running the pipeline up to the train stage. params.yaml, dvc.lock and
the cached outputs are put back afterwards (`dvc exp show` still lists every variant). reports/sweep.csv and a Prefect table artifact hold one row per variant.
"""

from __future__ import annotations

from pipeline import settings  # noqa: F401  (must precede the Prefect import)

import argparse
import csv
import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from cifar_pipeline.atomic import write_csv
from cifar_pipeline.tracking import RUN_FILE, read_run_handoff
from pipeline.dvc_stages import StageFailed, last_error_line, run_dvc_streaming

SWEEP_CSV = Path("reports/sweep.csv")
COLUMNS = [
    "variant", "blocks_per_stage", "depth", "epochs", "test_accuracy", "train_seconds", "peak_memory_mb",
    "grad_norm_first_stage", "grad_norm_last_stage", "num_parameters", "mlflow_run_id",
]


def weight_layers(blocks: list[int]) -> int:
    """Depth as the ResNet paper counts it: the stem conv, two convs a block, the classifier."""
    return 2 * sum(blocks) + 2


def read_result(root: Path, residual: bool, blocks: list[int]) -> dict:
    report = json.loads((root / "reports/train.json").read_text())
    with open(root / "reports/train_curve.csv") as f:
        curve = list(csv.DictReader(f))
    run = read_run_handoff(root / RUN_FILE)

    def mean(column: str) -> float:
        values = [float(r[column]) for r in curve if r[column]]
        return sum(values) / len(values)

    return {
        "variant": "residual" if residual else "plain",
        "blocks_per_stage": "-".join(map(str, blocks)),
        "depth": weight_layers(blocks),
        "epochs": report["epochs"],
        "test_accuracy": report["test_accuracy"],
        "train_seconds": round(report["train_seconds"], 2),
        "peak_memory_mb": round(report["peak_memory_mb"], 1),
        "grad_norm_first_stage": mean("grad_norm_first_stage"),  # averaged over the epochs
        "grad_norm_last_stage": mean("grad_norm_last_stage"),
        "num_parameters": report["num_parameters"],
        "mlflow_run_id": run["run_id"],
    }


@task(task_run_name="dvc exp run: residual={residual} blocks={blocks}")
def run_variant(residual: bool, blocks: list[int], extra: list[str], target: str, root: str) -> dict:
    logger = get_run_logger()
    sets = [f"model.residual={str(residual).lower()}", f"model.blocks_per_stage=[{','.join(map(str, blocks))}]", *extra]
    args = ["exp", "run", target, *[arg for s in sets for arg in ("-S", s)]]
    code, lines = run_dvc_streaming(args, Path(root), logger.info)
    if code != 0:
        raise StageFailed(f"experiment {' '.join(sets)} failed: {last_error_line(lines)}")
    return read_result(Path(root), residual, blocks)


@flow(name="cifar10-sweep")
def sweep(
    residual: list[bool] = (True, False),
    blocks: list[list[int]] = ((1, 1, 1), (2, 2, 2), (3, 3, 3)),
    epochs: int | None = None,
    set_params: list[str] = (),
    target: str = "train",
    root: str = ".",
) -> list[dict]:
    """Run every (residual, blocks) variant as a DVC experiment; return one row per variant."""
    root_path = Path(root).resolve()
    extra = [*([f"train.epochs={epochs}"] if epochs else []), *set_params]
    saved = {name: (root_path / name).read_bytes() for name in ("params.yaml", "dvc.lock") if (root_path / name).exists()}
    rows = []
    try:
        for res in residual:
            for b in blocks:
                rows.append(run_variant(bool(res), list(b), extra, target, str(root_path)))
    finally:
        for name, content in saved.items():  # the workspace goes back to what it was
            (root_path / name).write_bytes(content)
        if "dvc.lock" in saved:
            run_dvc_streaming(["checkout", "--force", "--quiet"], root_path, get_run_logger().info)
    write_csv(root_path / SWEEP_CSV, rows, COLUMNS)
    create_table_artifact(key="cifar10-sweep", table=rows, description="residual vs plain, by depth")
    return rows


def parse_blocks(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--residual", nargs="+", choices=["true", "false"], default=["true", "false"])
    parser.add_argument("--blocks", nargs="+", type=parse_blocks, default=[[1, 1, 1], [2, 2, 2], [3, 3, 3]],
                        help="blocks per stage for each depth, e.g. 1,1,1 3,3,3")
    parser.add_argument("--epochs", type=int, help="train.epochs for every variant")
    parser.add_argument("--set", dest="set_params", action="append", default=[], metavar="KEY=VALUE",
                        help="another params override for every variant (repeatable)")
    parser.add_argument("--target", default="train", help="the DVC stage each experiment runs up to")
    args = parser.parse_args(argv)
    try:
        sweep([r == "true" for r in args.residual], args.blocks, args.epochs, args.set_params, args.target, str(Path.cwd()))
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(SWEEP_CSV.read_text(), end="")  # sweep() wrote it, one line per variant
    return 0


if __name__ == "__main__":
    sys.exit(main())
