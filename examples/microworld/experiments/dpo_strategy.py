"""Experiment 2, the DPO strategy ablation: which prompt conditions the pair, and which preference loss.

    python examples/microworld/experiments/dpo_strategy.py --output-dir runs/exp-dpo --dataset safety-dpo-align/data

For two categories (violence and sexual by default), one expert each per setting: `prompt_condition` unsafe / safe /
both (the loss `sigmoid`), and `loss_type` sigmoid / hinge / ipo (the condition `both`, the default); everything
else as `safety-dpo align` trains. Each expert is measured alone on its own category's test prompts (trained and
held-out names) and on the neutral ones. Writes OUTPUT_DIR/table.md and table.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

SETTINGS = {
    "condition unsafe": {"prompt_condition": "unsafe"},
    "condition safe": {"prompt_condition": "safe"},
    "condition both (sigmoid)": {"prompt_condition": "both"},
    "loss hinge": {"loss_type": "hinge"},
    "loss ipo": {"loss_type": "ipo"},
}
COLUMNS = {
    "name": "setting",
    "category": "category",
    "ip_trained": "IP trained",
    "ip_held_out": "IP held-out",
    "neutral_fidelity_ratio": "neutral fidelity / base",
    "fd_judge": "fd_judge",
    "train_seconds": "train (s)",
}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    categories = common.categories_of(args, default=["violence", "sexual"])
    out = args.output_dir
    dataset = args.dataset or common.build_data(out / "data", categories, args.pairs_per_concept)
    rows = []
    for category in categories:
        prompts = common.protocol_prompt_set([category], args.limit)
        base_dir = out / "eval" / category / "base"
        rows.append(
            common.row("base", common.evaluate(None, out, prompts, base_dir), variant="base", category=category)
        )
        for name, change in SETTINGS.items():
            slug = name.replace(" ", "_").replace("(", "").replace(")", "")
            with common.Timer() as timer:
                expert = common.train_expert(
                    dataset, out / "experts" / slug / category, [category], common.training(args, **change)
                )
            results = common.evaluate(expert, out / "eval" / category / slug, prompts, base_dir)
            rows.append(common.row(name, results, category=category, train_seconds=timer.seconds))
    command = "python examples/microworld/experiments/dpo_strategy.py " + " ".join(argv or sys.argv[1:])
    notes = "train (s) is the wall time of the run that trained the expert (0 when it was already trained)."
    markdown = common.write_table(out, "DPO strategy ablation", command, rows, COLUMNS, notes)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
