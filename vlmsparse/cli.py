"""The ``vlmsparse`` command line: argument parsing and printing only (logic lives in the library).

Each subcommand is a pair of functions ``_add_<name>(subparsers)`` and ``_run_<name>(args) -> int``,
registered in ``_COMMANDS``. Heavy imports happen inside ``_run_*`` so ``vlmsparse --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from . import __version__


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------------------------------------- inspect
def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-module sparsity report of a safetensors file or a Hugging Face model folder",
        description="Print, for every linear weight, its shape, sparsity and whether it is 2:4 / 4:8, "
        "with totals per model part when the architecture is known.",
    )
    p.add_argument("path", help="a .safetensors file or a model folder (model.safetensors or shards)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all", action="store_true", help="list every 2-D weight, not only linear layers")


def _run_inspect(args: argparse.Namespace) -> int:
    from .pipeline.inspect import inspect_checkpoint

    report = inspect_checkpoint(args.path, linear_only=not args.all)
    if args.json:
        _print_json(report.to_dict())
    else:
        report.print()
    return 0


_COMMANDS: list[tuple[str, Callable, Callable]] = [
    ("inspect", _add_inspect, _run_inspect),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmsparse",
        description="Prune vision-language models, restore them with SparseLoRA, run 2:4 weights fast.",
    )
    parser.add_argument("--version", action="version", version=f"vlmsparse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, add, _ in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    run = {name: run for name, _, run in _COMMANDS}[args.command]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"vlmsparse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
