"""Figures as PNG files: matplotlib without a display (servers, CI), written atomically."""

from __future__ import annotations

from pathlib import Path

from cifar_pipeline.atomic import atomic_file

DPI = 100


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, dest: Path, **savefig_options) -> None:
    """Write `fig` to `dest` as a PNG (atomically) and close it."""
    with atomic_file(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, **savefig_options)
    pyplot().close(fig)
