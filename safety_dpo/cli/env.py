"""`safety-dpo env`: the installed versions, for bug reports."""

from __future__ import annotations

import argparse
import platform

from safety_dpo import __version__

NAME = "env"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="Print the installed versions, for bug reports.")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
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
