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


def _stage(module: str, section: str | None = None):
    """The handler of a stage whose module has run(config of params section `section`, by default
    the module's own name)."""
    def handler(args: argparse.Namespace) -> None:
        import importlib

        from cifar_pipeline.config import load_section

        importlib.import_module(f"cifar_pipeline.{module}").run(load_section(section or module, args.params))

    return handler


def _train(args: argparse.Namespace) -> None:
    from cifar_pipeline import train
    from cifar_pipeline.config import load_section

    sections = {name: load_section(name, args.params) for name in ("model", "train", "data")}  # checked before any launch
    if args.nproc > 1:
        from cifar_pipeline import distributed

        if distributed.launched_by_torchrun():
            raise PipelineError("--nproc starts torchrun itself; under torchrun leave it out")
        worker = ["--params", str(args.params), *(["--verbose"] if args.verbose else []), "train"]
        distributed.launch(args.nproc, worker + (["--resume"] if args.resume else []))
        return
    train.run(sections["model"], sections["train"], sections["data"], resume=args.resume)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue from models/checkpoint.pt in the same MLflow run")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train in N processes with DistributedDataParallel, started by torchrun: "
                             "one per GPU, or sharing the CPU (default: 1)")


def _predict(args: argparse.Namespace) -> int:
    from cifar_pipeline import predict

    options = {k: getattr(args, k) for k in ("errors", "top_k", "labels_from_folders", "batch_size", "strict")}
    return predict.run(args.model, args.input, args.output, providers=args.providers, threads=args.threads,
                       workers=args.workers, **options).exit_code


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "exit status: 0 every image scored, 1 some files unreadable (see the errors file), 2 none scored or bad arguments"
    parser.add_argument("--model", required=True, metavar="SRC", help="models:/NAME@ALIAS, models:/NAME/VERSION or an .onnx file")
    parser.add_argument("--input", required=True, type=Path, metavar="PATH",
                        help="a folder (searched recursively) or a file: images in any format Pillow reads, or .npy/.npz uint8 [N,32,32,3]")
    parser.add_argument("--output", type=Path, default=Path("predictions.csv"), metavar="FILE",
                        help="predictions, CSV or JSON Lines (.jsonl) (default: predictions.csv)")
    parser.add_argument("--errors", type=Path, metavar="FILE", help="unreadable files and why (default: OUTPUT.errors.csv)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="also write the K most likely classes (default: 1)")
    parser.add_argument("--labels-from-folders", action="store_true",
                        help="images in folders named after classes are labelled by them; print the accuracy")
    parser.add_argument("--batch-size", type=int, default=256, help="images per onnxruntime call (default: 256)")
    parser.add_argument("--providers", metavar="LIST", help="auto (default: CUDA where it really works, else CPU), cpu, cuda, "
                        "or onnxruntime provider names, comma-separated")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="batches decoded and run at once, each in its own thread (default: one per core, plus one)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="onnxruntime threads per batch (default: 1; the workers use the cores)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file (exit 1, no output written)")


# name: (handler, help[, function adding the subcommand's own arguments])
COMMANDS = {
    "download": (_stage("download", section="data"), "fetch CIFAR-10, verify it and write data/prepared/"),
    "train": (_train, "train the ResNet on data/prepared; write models/model.pt and the MLflow run", _train_arguments),
    "evaluate": (_stage("evaluate"), "test-set accuracy, loss, confusion matrix and wrong examples of models/model.pt"),
    "export": (_stage("export"), "write models/model.onnx (+ int8), check it against PyTorch, log it to MLflow"),
    "register": (_stage("register"), "register the ONNX model in MLflow; set challenger, and champion by the gate"),
    "predict": (_predict, "classify images or arrays with onnxruntime, from the registry or an .onnx file", _predict_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text, *add_arguments) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        for add in add_arguments:
            add(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    handler = COMMANDS[args.command][0]
    try:
        code = handler(args)  # None, or the exit status of a command that has several (predict)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
