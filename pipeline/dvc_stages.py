"""The DVC pipeline as Prefect sees it: the stages in dvc.yaml's dependency order, and running
one of them through `dvc repro`, so DVC's cache and dvc.lock stay the source of truth."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VENV_BIN = Path(sys.executable).parent


def stage_order(root: Path) -> list[str]:
    """Stage names in an order that respects every dependency DVC sees, ties broken by their
    order in dvc.yaml."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = repo.index.stages
        position = {stage: i for i, stage in enumerate(stages)}
        # DVC's graph points from a stage to the stages it depends on; reversed, it is run order.
        order = nx.lexicographical_topological_sort(repo.index.graph.reverse(), key=lambda s: position[s])
        return [stage.addressing for stage in order]


@dataclass(frozen=True)
class StageResult:
    stage: str
    cached: bool
    output: str


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message is the stage's own last error line."""


def dvc_command(*args: str) -> list[str]:
    dvc = VENV_BIN / "dvc"
    return [str(dvc) if dvc.exists() else "dvc", *args]


def dvc_env() -> dict[str, str]:
    """The environment for DVC: this venv's tools (cifar-pipeline) first on PATH."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def run_dvc_streaming(args: list[str], root: Path, on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run `dvc ARGS` in `root`, passing each output line (stdout and stderr merged) to `on_line`."""
    proc = subprocess.Popen(
        dvc_command(*args), cwd=root, env=dvc_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
    )
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        for line in raw.replace("\r", "\n").splitlines():  # progress bars redraw with \r
            if line.strip():
                lines.append(line)
                on_line(line)
    return proc.wait(), lines


def last_error_line(lines: list[str]) -> str:
    """The stage's own one-line error (`error: ...`) when it printed one, else its last line."""
    errors = [line for line in lines if line.startswith("error:") or line.startswith("ERROR:")]
    if errors:
        ours = [line for line in errors if line.startswith("error:")]
        return (ours or errors)[-1]
    return lines[-1] if lines else "no output"


def repro_stage(stage: str, root: Path, on_line: Callable[[str], None]) -> StageResult:
    code, lines = run_dvc_streaming(["repro", "--single-item", stage], root, on_line)
    if code != 0:
        raise StageFailed(f"stage '{stage}' failed: {last_error_line(lines)}")
    cached = any(f"Stage '{stage}' didn't change, skipping" in line for line in lines)
    return StageResult(stage, cached, "\n".join(lines))
