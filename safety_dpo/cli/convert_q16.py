"""`safety-dpo convert-q16`: Q16's pickled prompt embeddings to safetensors (one-off; unpickles)."""

from __future__ import annotations

import argparse

NAME = "convert-q16"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Convert Q16's pickled prompt embeddings (prompts.p) to safetensors (one-off; unpickles).",
        description="Q16's learned prompt embeddings are published as a pickle file (prompts.p). Unpickling can run "
        "code from the file, so this command refuses to run without --allow-unpickle; even then it only accepts "
        "numpy arrays. Run it once on a file you trust and use the .safetensors it writes from then on.",
    )
    parser.add_argument("source", help="The upstream prompts.p file.")
    parser.add_argument("--output", required=True, help="The .safetensors file to write.")
    parser.add_argument(
        "--allow-unpickle", action="store_true", help="Confirm that you trust the file: it is unpickled."
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert Q16's pickled prompt embeddings to safetensors, once, on explicit request."""
    from safety_dpo.evaluation.q16 import convert_q16_prompts

    output = convert_q16_prompts(args.source, args.output, allow_unpickle=args.allow_unpickle)
    print(f"Q16 prompts written to {output}; use them with --q16-prompts {output}.")
    return 0
