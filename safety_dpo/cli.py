"""The `safety-dpo` command.

Each subcommand is registered by a small `_add_<name>` function; heavy imports happen inside the
handlers, so `safety-dpo --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from collections.abc import Sequence

from safety_dpo import __version__

logger = logging.getLogger("safety_dpo")


def _run_env(args: argparse.Namespace) -> int:
    """Print the versions a bug report needs, like `diffusers-cli env`."""
    import importlib.metadata as metadata

    packages = [
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "huggingface_hub",
        "accelerate",
        "safetensors",
        "evaluate",
    ]
    print(f"- safety_dpo: {__version__}")
    print(f"- Python: {platform.python_version()} ({platform.platform()})")
    for name in packages:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"- {name}: {version}")
    import torch

    print(f"- CUDA available: {torch.cuda.is_available()}; CPU threads: {torch.get_num_threads()}")
    return 0


def _add_env(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="Print the installed versions, for bug reports.")
    parser.set_defaults(handler=_run_env)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand that exists."""
    parser = argparse.ArgumentParser(
        prog="safety-dpo",
        description="Safety-align text-to-image diffusion models with SafetyDPO (arXiv 2412.10493).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_subcommand in (_add_env,):
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safety-dpo` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
