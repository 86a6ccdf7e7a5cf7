"""Plot the loss curves that train_microworld.py logged (needs matplotlib, in the [eval] extra).

python examples/microworld/plot_losses.py --work-dir runs/microworld --output docs/figures/microworld_losses.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/microworld")
    parser.add_argument("--output", default="docs/figures/microworld_losses.png")
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    vae, unet = read_log(work_dir / "vae_log.jsonl"), read_log(work_dir / "unet_log.jsonl")
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot([row["step"] for row in vae], [row["mse"] for row in vae])
    left.set(title="VAE reconstruction MSE (pixels in [-1, 1])", xlabel="step", yscale="log")
    right.plot([row["step"] for row in unet], [row["mse"] for row in unet], label="epsilon MSE", alpha=0.8)
    right.plot([row["step"] for row in unet], [row["loss"] for row in unet], label="min-SNR weighted loss", alpha=0.8)
    right.set(title="UNet + text encoder (batch 128)", xlabel="step", yscale="log")
    right.legend()
    figure.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=80)


if __name__ == "__main__":
    main()
