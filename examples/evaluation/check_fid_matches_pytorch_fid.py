"""Check that our FID is pytorch-fid's FID: the same images through `run_evaluation`'s path (PytorchFIDInception,
`extract_features`, `fid_from_features(..., "pytorch-fid")`) and through pytorch-fid's own `calculate_fid_given_paths`.

Needs the `fid` extra (pytorch-fid, torchvision, scipy). With `--random-weights` both sides get the same seeded random
Inception weights instead of downloading pytorch-fid's (where no download is possible); the comparison checks the
image handling (no resizing before the network, [0, 1] floats, the network's own bilinear resize to 299) and the
distance, which do not depend on the weights.

    python examples/evaluation/check_fid_matches_pytorch_fid.py --random-weights
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = ((64, 64), (512, 512), (300, 200))  # mixed sizes: nothing may be resized before the network


def write_images(folder: Path, seed: int, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        # Smooth random images (low-frequency noise, enlarged), so that resizing methods would give different pixels.
        small = generator.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        path = folder / f"{index:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def random_weights_loader():
    """A stand-in for pytorch-fid's weight download: the FID Inception's state dict with seeded random values."""
    from pytorch_fid import inception
    from torchvision.models import Inception3

    state: dict = {}

    def load(url: str, *args, **kwargs):
        if "value" in state:
            return state["value"]
        state["value"] = "building"  # the nested fid_inception_v3 call below asks again
        captured = {}
        original = Inception3.load_state_dict
        Inception3.load_state_dict = lambda self, *a, **k: captured.setdefault("model", self)
        try:
            inception.fid_inception_v3()
        finally:
            Inception3.load_state_dict = original
        generator = torch.Generator().manual_seed(0)
        weights = {}
        for name, tensor in captured["model"].state_dict().items():
            if name.endswith("running_var"):
                weights[name] = torch.ones_like(tensor)
            elif name.endswith("running_mean") or name.endswith("bias"):
                weights[name] = torch.zeros_like(tensor)
            elif name.endswith("num_batches_tracked"):
                weights[name] = tensor.clone()
            elif tensor.ndim > 1:  # He initialisation keeps activations alive through 100 layers
                fan_in = tensor[0].numel()
                weights[name] = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            else:
                weights[name] = torch.ones_like(tensor)
        state["value"] = weights
        return weights

    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-weights", action="store_true", help="Seeded random weights instead of downloading.")
    parser.add_argument("--images", type=int, default=12, help="Images per set (default 12).")
    args = parser.parse_args()

    from pytorch_fid import inception
    from pytorch_fid.fid_score import calculate_fid_given_paths

    from safety_dpo.evaluation import quality

    if args.random_weights:
        loader = random_weights_loader()
        inception.load_state_dict_from_url = loader
        quality._load_weights_only = loader
    with tempfile.TemporaryDirectory() as root:
        real = write_images(Path(root) / "real", 0, args.images)
        generated = write_images(Path(root) / "generated", 1, args.images)
        # pytorch-fid batches images of one folder together, so mixed sizes need batch size 1 there.
        theirs = calculate_fid_given_paths([str(real[0].parent), str(generated[0].parent)], 1, "cpu", 2048, 0)
        extractor, description = quality.fid_feature_extractor("inception")
        features = [
            quality.extract_features([Image.open(path).convert("RGB") for path in paths], extractor)
            for paths in (real, generated)
        ]
        ours = quality.fid_from_features(*features, implementation="pytorch-fid")
        # For contrast: the same network on images first resized to 299 by PIL (antialiased), as before pytorch-fid.
        extractor.input_size = 299
        resized = [
            quality.extract_features([Image.open(path).convert("RGB") for path in paths], extractor)
            for paths in (real, generated)
        ]
        pil_resized = quality.fid_from_features(*resized, implementation="pytorch-fid")
    print(f"pytorch-fid calculate_fid_given_paths: {theirs:.6f}")
    print(f"safety_dpo (run_evaluation's path):    {ours:.6f}")
    print(f"relative difference: {abs(ours - theirs) / max(abs(theirs), 1e-12):.2e}")
    print(f"image handling: {description['image_handling']}")
    print(f"the same with images resized to 299 by PIL first: {pil_resized:.6f}")


if __name__ == "__main__":
    main()
