"""`cifar-pipeline`: one subcommand per pipeline stage.

Stage modules are imported only when their subcommand runs, so `--help` starts fast and the
core (model, loader, training step) never drags MLflow or Prefect in.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cifar_pipeline.errors import PipelineError


def _download(args: argparse.Namespace) -> None:
    from cifar_pipeline import download
    from cifar_pipeline.config import load_section

    download.run(load_section("data", args.params))


COMMANDS = {
    "download": (_download, "fetch CIFAR-10, verify it and write data/prepared/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    handler, _ = COMMANDS[args.command]
    try:
        handler(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
