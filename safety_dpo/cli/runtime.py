"""What every subcommand runs inside: the one error handler, logging levels and torch's CPU threads."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("safety_dpo")


def run_handler(args: argparse.Namespace) -> int:
    """Run the subcommand's handler: the one error handler of every subcommand.

    Bad input, a missing or unreadable file, an unreachable Hub, a folder in use: say what is wrong in one line, not a
    traceback (-v shows the traceback), and exit with status 2. OSError covers FileNotFoundError, PermissionError,
    ConnectionError and the Hub client's HTTP errors.
    """
    from safety_dpo.data.writers import PromptWriterError
    from safety_dpo.folder_lock import FolderInUseError

    try:
        return args.handler(args)
    except (ValueError, OSError, PromptWriterError, FolderInUseError, _yaml_error()) as error:
        logger.debug("Traceback of the error:", exc_info=True)
        kind = (
            "" if isinstance(error, (ValueError, FileNotFoundError, FileExistsError)) else f"{type(error).__name__}: "
        )
        hint = "" if args.verbose or not kind else " (-v shows the traceback)"
        print(f"safety-dpo {args.command}: error: {kind}{error}{hint}", file=sys.stderr)
        return 2


def configure_logging(verbose: bool) -> int:
    """safety_dpo's own messages at INFO (DEBUG with -v); other libraries' at WARNING (INFO with -v), so that the
    Hub client's HTTP requests, say, are not printed by default. Returns safety_dpo's level to restore afterwards."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    previous = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return previous


def set_threads(args: argparse.Namespace) -> int | None:
    """`--num-threads` / `$SAFETY_DPO_NUM_THREADS` when given; for the microworld, the cores other processes leave
    free (1 or 2, chosen again at each stage: safety_dpo/threads.py); torch's default for real models. Returns the
    thread count to restore afterwards, None when nothing was changed."""
    import os

    from safety_dpo.threads import disable_adaptive_threads, enable_adaptive_threads

    disable_adaptive_threads()
    threads = args.num_threads
    if threads is None and os.environ.get("SAFETY_DPO_NUM_THREADS"):
        try:
            threads = int(os.environ["SAFETY_DPO_NUM_THREADS"])
        except ValueError:
            value = os.environ["SAFETY_DPO_NUM_THREADS"]
            raise SystemExit(f"SAFETY_DPO_NUM_THREADS must be an integer, got {value!r}.") from None
    if threads is not None and threads < 1:
        raise SystemExit(f"--num-threads must be at least 1, got {threads}.")
    microworld = getattr(args, "model", None) is None and args.command not in ("env", "convert-q16", "merge")
    if threads is None and not microworld:
        return None
    import torch

    previous = torch.get_num_threads()
    if threads is None:
        enable_adaptive_threads()
    else:
        torch.set_num_threads(threads)
    return previous


def restore_threads(previous: int | None) -> None:
    """Undo `set_threads`: adaptive threads off, and torch's thread count back to `previous` when one is given."""
    from safety_dpo.threads import disable_adaptive_threads

    disable_adaptive_threads()
    if previous is not None:
        import torch

        torch.set_num_threads(previous)


def _yaml_error() -> type[Exception]:
    import yaml

    return yaml.YAMLError
