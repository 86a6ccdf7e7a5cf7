"""The `safety-dpo` command: one module per subcommand, like diffusers' `commands/` and trl's `scripts/`.

Each subcommand module holds `NAME`, `add_parser(subparsers)`, which registers the subcommand's flags and help and
returns its parser, and `run(args)`, which does the work and returns the exit status. Plain functions rather than
diffusers' `BaseDiffusersCLICommand` classes: a command keeps no state between parsing and running, so a class would
only wrap two static methods. Heavy imports happen inside `run`, so that `safety-dpo --help` answers at once.

Shared by all of them: `arguments` (the argument style: comma lists, `--dashes` and `--underscores`, SafetyDPOConfig
fields as flags) and `runtime` (the one error handler, logging levels and torch threads, around every `run`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from safety_dpo import __version__
from safety_dpo.cli import (
    align,
    attack,
    baseline,
    build_data,
    convert_q16,
    env,
    evaluate,
    export_pickapic,
    generate,
    merge,
    train,
)
from safety_dpo.cli.arguments import accept_both_spellings, add_config_flags
from safety_dpo.cli.runtime import configure_logging, logger, restore_threads, run_handler, set_threads

__all__ = ["build_parser", "main"]

# In the order `safety-dpo --help` lists them.
SUBCOMMANDS = (
    env,
    build_data,
    export_pickapic,
    train,
    merge,
    baseline,
    generate,
    evaluate,
    attack,
    convert_q16,
    align,
)

# The subcommands that take every SafetyDPOConfig field as a flag, and the fields they leave out because a flag of
# their own has that name.
_CONFIG_FLAG_COMMANDS = {train.NAME: train.OWN_FLAGS, align.NAME: align.OWN_FLAGS}


def build_parser(config_flags_for: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand that exists.

    Every long flag is accepted in two spellings, `--output-dir` and `--output_dir`, as `HfArgumentParser` accepts
    the config's fields; `--help` shows the dashed one.

    Args:
        config_flags_for: "train" or "align": also add that subcommand's SafetyDPOConfig / TrainingArguments flags
            (listed by its --help). They are added only for the subcommand being run, because building them imports
            transformers and torch, and `safety-dpo --help` should answer at once.
    """
    parser = argparse.ArgumentParser(
        prog="safety-dpo",
        description="Safety-align text-to-image diffusion models with SafetyDPO (arXiv 2412.10493).",
        epilog="Every flag of every command is also accepted with underscores (--output_dir, --learning_rate), as in "
        "transformers' and trl's scripts. `safety-dpo COMMAND --help` lists a command's flags.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Log more: safety_dpo's debug messages and the other libraries' information (HTTP requests, ...); "
        "errors with their traceback.",
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        help="CPU threads per process for torch (default: $SAFETY_DPO_NUM_THREADS; else, for the microworld, the cores "
        "other processes leave free, at most 2, because its tiny models slow down badly on cores another process "
        "uses; else torch's default).",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    accept_both_spellings(parser)
    for command in SUBCOMMANDS:
        subparser = command.add_parser(subparsers)
        subparser.allow_abbrev = False  # "--learning_rat" is a typo, not "--learning_rate"
        accept_both_spellings(subparser)
        if command.NAME == config_flags_for and command.NAME in _CONFIG_FLAG_COMMANDS:
            add_config_flags(subparser, exclude=_CONFIG_FLAG_COMMANDS[command.NAME])
    return parser


def _subcommand_in(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line, found without parsing it (which needs the subcommand's flags)."""
    names = {command.NAME for command in SUBCOMMANDS}
    return next((token for token in argv if token in names), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safety-dpo` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(config_flags_for=_subcommand_in(argv))
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    previous_level = configure_logging(args.verbose)
    previous_threads = set_threads(args)
    try:
        return run_handler(args)
    finally:
        restore_threads(previous_threads)  # main() may be called in a process that goes on (tests, notebooks)
        logger.setLevel(previous_level)
