"""`python -m resnet_lightning.report`: tables (markdown, CSV) and figures (PNG) from runs and
from the model zoo.

    python -m resnet_lightning.report outputs/multirun/<date>        # summary of a sweep
    python -m resnet_lightning.report params model=resnet56          # parameter distribution
    python -m resnet_lightning.report compare                        # ResNet-50 vs VGG-16, ...
    python -m resnet_lightning.report degradation outputs/multirun/<date>_degradation

Bad input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnet_lightning.errors import UsageError

REPORTS_DIR = Path("outputs/reports")
COMMANDS = ("summary", "params", "compare", "degradation")


# Each report imports what it needs when it runs: a summary should not wait for Lightning.
def run_summary(args: argparse.Namespace) -> list[Path]:
    from .summary import write_summary

    return write_summary(args.directory, args.out)


def run_params(args: argparse.Namespace) -> list[Path]:
    from .params import write_params_report

    return write_params_report(args.overrides, args.out)


def run_compare(args: argparse.Namespace) -> list[Path]:
    from .compare import MODELS, write_comparison

    models = args.models.split(",") if args.models else MODELS
    return write_comparison(
        args.out, models, args.image_size, args.batch_size, args.iters, args.device
    )


def run_degradation(args: argparse.Namespace) -> list[Path]:
    from .degradation import write_degradation_report

    return write_degradation_report(args.directory, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_lightning.report",
        description="Reports from runs and from the model zoo. A directory alone means summary.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    summary = commands.add_parser("summary", help="one row per job of a sweep, best first")
    summary.add_argument("directory", type=Path, help="a multirun (or run) directory")
    summary.add_argument("--out", type=Path, help="output folder (default: the directory)")
    summary.set_defaults(run=run_summary)

    params = commands.add_parser("params", help="parameters per stage and layer type")
    params.add_argument("overrides", nargs="+", help="config overrides, e.g. model=resnet56")
    params.add_argument("--out", type=Path, default=REPORTS_DIR, help="output folder")
    params.set_defaults(run=run_params)

    compare = commands.add_parser("compare", help="ResNet-50 against VGG-16, GoogLeNet, ...")
    compare.add_argument(
        "--models",
        help="comma-separated names (default: resnet50,vgg16,googlenet,alexnet,densenet121)",
    )
    compare.add_argument("--image-size", type=int, default=224)
    compare.add_argument("--batch-size", type=int, default=8)
    compare.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    compare.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    compare.add_argument("--out", type=Path, default=REPORTS_DIR, help="output folder")
    compare.set_defaults(run=run_compare)

    degradation = commands.add_parser("degradation", help="plain vs residual error curves")
    degradation.add_argument("directory", type=Path, help="the sweep, e.g. experiment=degradation")
    degradation.add_argument("--out", type=Path, help="output folder (default: the directory)")
    degradation.set_defaults(run=run_degradation)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["summary", *argv]
    args = build_parser().parse_args(argv)
    try:
        written = args.run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
