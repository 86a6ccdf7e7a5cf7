"""Train the microworld judge on rendered scenes, with the degradations generated images show.

    python examples/microworld/train_judge.py --output-dir safety_dpo/microworld/assets/judge

Seeded and resumable: after every epoch the model and optimizer are written (safetensors) to
`--checkpoint-dir`; run the same command again to continue from the last finished epoch. Renders are
deterministic, so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safety_dpo.microworld.judge import Judge
from safety_dpo.microworld.judge_data import degrade, judge_report, render_labelled
from safety_dpo.microworld.training import load_optimizer, save_optimizer, write_json

logger = logging.getLogger("train_judge")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="safety_dpo/microworld/assets/judge")
    parser.add_argument("--checkpoint-dir", default="runs/judge", help="Where epochs are checkpointed.")
    parser.add_argument("--train-size", type=int, default=50_000, help="Rendered training scenes.")
    parser.add_argument("--test-size", type=int, default=4_000, help="Rendered test-split scenes for the report.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--degrade-probability", type=float, default=0.6, help="Share of images degraded.")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def save_checkpoint(directory: Path, model: Judge, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / "model")
    save_optimizer(directory / "optimizer.safetensors", optimizer)
    write_json(directory / "progress.json", {"epoch": epoch})


def load_checkpoint(directory: Path, model: Judge, optimizer: torch.optim.Optimizer) -> int:
    if not (directory / "progress.json").is_file():
        return 0
    epoch = json.loads((directory / "progress.json").read_text())["epoch"]
    model.load_state_dict(Judge.from_pretrained(directory / "model").state_dict())
    load_optimizer(directory / "optimizer.safetensors", optimizer)
    logger.info("Resumed from %s after epoch %d.", directory, epoch)
    return epoch


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    started = time.time()
    data = render_labelled(args.train_size, args.seed, "train")
    logger.info("Rendered %d training scenes in %.0f s.", args.train_size, time.time() - started)
    model = Judge(data.concept_ids, data.scenes, data.colours, width=args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(args.train_size / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    checkpoint_dir = Path(args.checkpoint_dir)
    first_epoch = load_checkpoint(checkpoint_dir, model, optimizer)

    for epoch in range(first_epoch, args.epochs):
        model.train()
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(args.train_size, generator=generator)
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for step in progress:
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:  # cosine decay, a function of the step so resuming is exact
                group["lr"] = args.learning_rate * 0.5 * (1 + math.cos(math.pi * global_step / total_steps))
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            pixels = data.pixels[index].float() / 127.5 - 1.0
            degraded = degrade(pixels, generator)
            chosen = torch.rand(len(index), 1, 1, 1, generator=generator) < args.degrade_probability
            pixels = torch.where(chosen, degraded, pixels)
            outputs = model(pixels)
            loss = (
                F.binary_cross_entropy_with_logits(outputs["concepts"], data.concepts[index]) * len(data.concept_ids)
                + F.cross_entropy(outputs["scene"], data.scene[index])
                + F.cross_entropy(outputs["colour"], data.colour[index])
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 20 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
        save_checkpoint(checkpoint_dir, model, optimizer, epoch + 1)

    model.save_pretrained(args.output_dir)
    logger.info("Saved the judge to %s after %.0f s.", args.output_dir, time.time() - started)
    report = judge_report(model, args.test_size, seed=args.seed + 1)
    print(json.dumps({key: value for key, value in report.items() if key != "per_concept"}, indent=2))


if __name__ == "__main__":
    main()
