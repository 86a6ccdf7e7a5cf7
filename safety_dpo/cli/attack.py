"""`safety-dpo attack`: attack a model (base, with a safety adapter, or a baseline) with adversarial prompts."""

from __future__ import annotations

import argparse

from safety_dpo.cli.arguments import comma_list

NAME = "attack"

# safety_dpo.attacks.ATTACKS, written out so that `--help` does not import torch.
_METHODS = ("ring-a-bell", "mma", "unlearndiff", "sneaky", "soft-prompt")
# The config field that --steps sets, per method (the black-box attack counts queries instead: --queries).
_STEP_FIELDS = {"ring-a-bell": "generations", "mma": "steps", "unlearndiff": "steps", "soft-prompt": "steps"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Attack a model with adversarial prompts and measure how often it draws harmful images.",
        description="For each harmful prompt (the microworld's harmful test prompts when no model is named), ban its "
        "harmful words and search for a prompt that still makes the attacked model draw the harm: Ring-A-Bell "
        "(concept vector + genetic search, text encoder only), mma (text-encoder white-box token substitution), "
        "unlearndiff (UNet white-box: denoise like the base model), sneaky (black-box: images and a detector's "
        "verdict, a query budget) or soft-prompt (continuous text states, an upper bound). The adversarial prompts, "
        "the prompts without attack and with the words deleted are drawn with the evaluation's seeds and scored by "
        "its detectors; results.json and report.md give the attack success per category. An interrupted run "
        "resumes at the next prompt. See docs/attacks.md.",
    )
    parser.add_argument("--method", required=True, choices=_METHODS, help="The attack family.")
    parser.add_argument("--output-dir", required=True, help="Where records, images and results go.")
    parser.add_argument("--model", help="Path or Hub id of a Stable Diffusion 1.x/2.x pipeline (default: microworld).")
    attacked = parser.add_mutually_exclusive_group()
    attacked.add_argument(
        "--safety-adapter", help="Attack the model with this safety adapter fused (folder or Hub id)."
    )
    attacked.add_argument(
        "--baseline",
        help="Attack a baseline instead: an adapter folder made by `safety-dpo baseline` (ESD-u, UCE) or an SLD preset "
        "(sld-weak, sld-medium, sld-strong, sld-max; not with the UNet white-box attacks).",
    )
    parser.add_argument("--prompts", help="Prompt source (needed with --model): i2p, a CSV file, a Hub dataset id.")
    parser.add_argument("--categories", type=comma_list, help="Attack only the prompts of these categories.")
    parser.add_argument("--limit", type=int, help="Attack only the first N prompts.")
    parser.add_argument(
        "--banned-words",
        help="A text file of words no adversarial prompt may hold, one per line (default: every name of every "
        "harmful concept of the taxonomy).",
    )
    parser.add_argument("--taxonomy", help="A taxonomy file (default: the microworld's, or CoProV2's with --model).")
    parser.add_argument("--detectors", type=comma_list, help="Detector specs, as in `safety-dpo evaluate`.")
    parser.add_argument("--q16-prompts", help="Q16 prompt embeddings (.safetensors; see safety-dpo convert-q16).")
    budget = parser.add_argument_group("budget (the attack's defaults when left out; docs/attacks.md)")
    budget.add_argument("--steps", type=int, help="Optimisation steps per prompt (generations for ring-a-bell).")
    budget.add_argument("--queries", type=int, help="Images the black-box attack may ask for, per prompt.")
    budget.add_argument("--max-seconds", type=float, help="Seconds per prompt.")
    budget.add_argument("--time-limit", type=float, help="Seconds for this call; run again to go on.")
    budget.add_argument("--num-tokens", type=int, help="Free tokens that replace the banned words.")
    budget.add_argument("--attack-seed", type=int, help="Seed of the attack's random choices.")
    budget.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Any other field of the attack's config (e.g. --set top_k=64); repeatable.",
    )
    parser.add_argument(
        "--search-seeds",
        type=comma_list,
        help="Seeds the attack may draw with while searching (default: 1000,1001; never evaluation seeds).",
    )
    parser.add_argument(
        "--transfer-from",
        help="Another run's output folder (same method and prompts): draw its adversarial prompts on this model "
        "instead of searching (a transfer attack).",
    )
    parser.add_argument("--device", help="Where to run (default: CUDA when available, else the CPU).")
    parser.set_defaults(handler=run)
    return parser


def attack_options(args: argparse.Namespace) -> dict:
    """The attack config fields given as flags, and only those."""
    options: dict = {}
    for item in args.set:
        field, separator, value = item.partition("=")
        if not separator or not field.strip():
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set top_k=64.")
        options[field.strip()] = _number(value.strip())
    if args.steps is not None:
        if args.method not in _STEP_FIELDS:
            raise ValueError(f"--steps does not apply to {args.method}; its budget is --queries.")
        options[_STEP_FIELDS[args.method]] = args.steps
    if args.queries is not None:
        if args.method != "sneaky":
            raise ValueError(f"--queries is the black-box attack's budget; {args.method} counts --steps.")
        options["max_queries"] = args.queries
    given = {"max_seconds": args.max_seconds, "num_tokens": args.num_tokens, "seed": args.attack_seed}
    options.update({field: value for field, value in given.items() if value is not None})
    return options


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from safety_dpo.attacks.runner import DEFAULT_SEARCH_SEEDS, run_attack

    banned = None
    if args.banned_words:
        path = Path(args.banned_words)
        if not path.is_file():
            raise FileNotFoundError(f"--banned-words {args.banned_words!r} is not a file (one word per line).")
        banned = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        search_seeds = [int(seed) for seed in args.search_seeds] if args.search_seeds else list(DEFAULT_SEARCH_SEEDS)
    except ValueError as error:
        raise ValueError(f"--search-seeds {args.search_seeds!r}: give whole numbers, e.g. 1000,1001.") from error
    results = run_attack(
        args.method,
        args.output_dir,
        model=args.model,
        safety_adapter=args.safety_adapter,
        baseline=args.baseline,
        options=attack_options(args),
        prompts=args.prompts,
        categories=args.categories,
        limit=args.limit,
        banned_words=banned,
        taxonomy=args.taxonomy,
        detectors=args.detectors,
        detector_options={"q16": {"prompts": args.q16_prompts}} if args.q16_prompts else None,
        search_seeds=search_seeds,
        time_limit=args.time_limit,
        transfer_from=args.transfer_from,
        device=args.device,
    )
    metrics = results["metrics"]
    left = "" if results["complete"] else " (incomplete: run the same command again to go on)"
    print(
        f"{args.method} on {results['attacked']}: IP under attack {metrics['ip_attack']:.3f}, ASR "
        f"{metrics['asr']:.3f}, clean IP {metrics['ip_clean']:.3f}, words removed {metrics['ip_removed']:.3f} over "
        f"{metrics['num_prompts']} prompts in {metrics['attack_seconds']:.0f} s{left}. Report: {args.output_dir}/report.md"
    )
    return 0
