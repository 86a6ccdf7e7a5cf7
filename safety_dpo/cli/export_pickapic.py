"""`safety-dpo export-pickapic`: a CoProV2 dataset in Pick-a-Pic's layout, for diffusers' train_diffusion_dpo.py."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "export-pickapic"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Write a CoProV2 dataset in Pick-a-Pic's layout, for diffusers' train_diffusion_dpo.py.",
        description="Export a CoProV2 dataset (a build-data folder, a saved dataset or a Hub id) to the columns of "
        "Pick-a-Pic that diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py reads: jpg_0 (the "
        "safe image) and jpg_1 (the unsafe one) as PNG bytes, label_0 = 1, caption = the unsafe prompt; other columns "
        "are kept. Ties are dropped and label_0 = 0 rows swapped. One parquet file per split under "
        "OUTPUT_DIR/data/, which datasets.load_dataset(OUTPUT_DIR) reads.",
    )
    parser.add_argument("dataset", metavar="DATASET", help="A build-data folder, a saved dataset or a Hub id.")
    parser.add_argument("--output-dir", required=True, help="Where the parquet files are written (a new folder).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the export to this Hub dataset repo.")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write a CoProV2 dataset in Pick-a-Pic's layout, which diffusers' train_diffusion_dpo.py reads."""
    from safety_dpo.data.pickapic import to_pickapic
    from safety_dpo.trainer.experts import load_pairs

    exported = to_pickapic(load_pairs(args.dataset, split=None))  # every split; a damaged folder is named
    output_dir = Path(args.output_dir)
    written = [output_dir / "data" / f"{split}-00000-of-00001.parquet" for split in exported]
    existing = [str(file) for file in written if file.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]!r} exists; choose a new --output-dir. Nothing was written.")
    for file, split in zip(written, exported, strict=True):
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(f".{file.name}.tmp")
        exported[split].to_parquet(str(temporary))
        temporary.replace(file)
    rows = ", ".join(f"{split}: {len(exported[split])}" for split in exported)
    print(
        f"Pick-a-Pic layout written to {args.output_dir} ({rows} rows; jpg_0 = the safe image, label_0 = 1, caption = "
        "the unsafe prompt); datasets.load_dataset reads the folder, and train_diffusion_dpo.py --dataset_name it "
        "(with --dataset_split_name train)."
    )
    if args.push_to_hub:
        exported.push_to_hub(args.push_to_hub)
        print(f"Pushed to {args.push_to_hub}")
    return 0
