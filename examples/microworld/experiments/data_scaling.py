"""Experiment 4, data scaling: does an expert improve with more CoProV2 pairs per concept?

    python examples/microworld/experiments/data_scaling.py --output-dir runs/exp-data --pairs 2,5,10,20

For one category (violence by default), a CoProV2 build with each number of pairs per concept and an expert trained
on it with the settings of `safety-dpo align` (the same steps for every size), measured alone on the category's test
prompts and the neutral ones. Writes OUTPUT_DIR/table.md and table.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

COLUMNS = {
    "name": "model",
    "pairs_per_concept": "pairs per concept",
    "train_pairs": "training pairs",
    "ip_trained": "IP trained",
    "ip_held_out": "IP held-out",
    "neutral_fidelity_ratio": "neutral fidelity / base",
    "fd_judge": "fd_judge",
}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--pairs", default="2,5,10,20", help="Comma-separated pairs per concept.")
    args = parser.parse_args(argv)
    (category,) = common.categories_of(args, default=["violence"])
    out = args.output_dir
    prompts = common.protocol_prompt_set([category], args.limit)
    base_dir = out / "eval" / "base"
    rows = [common.row("base", common.evaluate(None, out, prompts, base_dir), variant="base")]
    for pairs in (int(value) for value in args.pairs.split(",")):
        dataset = common.build_data(out / f"data-{pairs}", [category], pairs)
        expert = common.train_expert(dataset, out / "experts" / f"pairs-{pairs}", [category], common.training(args))
        from safety_dpo.trainer.experts import load_pairs

        results = common.evaluate(expert, out / "eval" / f"pairs-{pairs}", prompts, base_dir)
        rows.append(
            common.row(f"expert {category}", results, pairs_per_concept=pairs, train_pairs=len(load_pairs(dataset)))
        )
    command = "python examples/microworld/experiments/data_scaling.py " + " ".join(argv or sys.argv[1:])
    markdown = common.write_table(out, f"Data scaling ({category})", command, rows, COLUMNS)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
