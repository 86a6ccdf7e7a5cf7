"""The argument style every subcommand shares: comma lists, both flag spellings, SafetyDPOConfig fields as flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def comma_list(value: str) -> list[str]:
    """An argparse type: `a, b,c` -> ["a", "b", "c"]; an empty list is refused."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    return items


def comma_floats(value: str) -> list[float]:
    """An argparse type: `0.5,1` -> [0.5, 1.0]."""
    try:
        return [float(item) for item in comma_list(value)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from error


def accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Accept `--name_with_underscores` for every `--name-with-dashes` flag (HfArgumentParser's rule), and show only
    the dashed spelling in `--help` (the alias is registered for parsing, not listed among the action's options)."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            alias = "--" + option[2:].replace("-", "_")
            if option.startswith("--") and alias != option and alias not in parser._option_string_actions:
                parser._option_string_actions[alias] = action


def add_config_flags(parser: argparse.ArgumentParser, exclude: Sequence[str]) -> None:
    """Add every SafetyDPOConfig (and so TrainingArguments) field as a flag, the way `HfArgumentParser` builds them.

    Their defaults are suppressed, so the handler sees only the flags given (`config_settings`): those go over the
    defaults of the run (the microworld's training settings, or SafetyDPOConfig's), which `--help` states.
    """
    import dataclasses

    from transformers import HfArgumentParser, TrainingArguments

    from safety_dpo.trainer.config import SafetyDPOConfig

    source = HfArgumentParser(SafetyDPOConfig, add_help=False)
    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    own = parser.add_argument_group(
        "SafetyDPO training flags (SafetyDPOConfig)",
        "Those not given take the run's defaults: without --model the microworld's training settings "
        "(safety_dpo.align.MICROWORLD_TRAINING), else SafetyDPOConfig's (shown). See docs/training.md.",
    )
    trainer = parser.add_argument_group("transformers.TrainingArguments flags (inherited by SafetyDPOConfig)")
    dests = []
    for action in source._actions:
        if action.dest in exclude:
            continue
        if not isinstance(action, argparse._StoreFalseAction) and action.default is not None:
            default = str(action.default).replace("%", "%%")
            action.help = f"{action.help or ''} (SafetyDPOConfig default: {default})".strip()
        action.default = argparse.SUPPRESS
        (trainer if action.dest in inherited else own)._add_action(action)  # registers both spellings
        dashed = [option for option in action.option_strings if "_" not in option]
        action.option_strings = dashed or action.option_strings  # --help shows the dashed one, like ours
        dests.append(action.dest)
    parser.set_defaults(config_dests=tuple(dict.fromkeys(dests)))


def config_settings(args: argparse.Namespace) -> dict:
    """The SafetyDPOConfig fields given as flags, and only those."""
    return {dest: getattr(args, dest) for dest in getattr(args, "config_dests", ()) if hasattr(args, dest)}
