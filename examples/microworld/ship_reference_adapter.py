"""Copy the adapter of a `safety-dpo align` run into the package as the microworld's reference adapter.

    safety-dpo align --output-dir safety-dpo-align            # the documented run: no other arguments, seed 0
    python examples/microworld/ship_reference_adapter.py safety-dpo-align
    python examples/microworld/ship_reference_adapter.py safety-dpo-align --compare other-run   # reproducibility

The adapter's weights, `safety_dpo.json` (with the evaluation) and card go to
`safety_dpo/microworld/assets/reference_adapter/`. `--compare` prints the largest difference between the weights of two runs' adapters.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

DESTINATION = Path(__file__).resolve().parents[2] / "safety_dpo" / "microworld" / "assets" / "reference_adapter"
FILES = ("pytorch_lora_weights.safetensors", "safety_dpo.json", "README.md")


def max_difference(first: Path, second: Path) -> float:
    a, b = (load_file(str(path / FILES[0])) for path in (first, second))
    if a.keys() != b.keys():
        raise ValueError(f"The adapters hold different layers: {sorted(a.keys() ^ b.keys())[:4]} ...")
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="The output folder of `safety-dpo align`.")
    parser.add_argument("--compare", type=Path, help="Another run's folder: print the largest weight difference.")
    args = parser.parse_args()
    adapter = args.run / "safety-adapter"
    state = json.loads((args.run / "align.json").read_text())
    if set(state["stages"]) != {"data", "experts", "merge", "evaluate"}:
        raise SystemExit(f"{args.run} is not a finished alignment (stages done: {sorted(state['stages'])}).")
    if args.compare is not None:
        print(
            f"largest |weight difference| between the two adapters: {max_difference(adapter, args.compare / 'safety-adapter'):.3e}"
        )
        return
    DESTINATION.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(adapter / name, DESTINATION / name)
    print(f"Reference adapter written to {DESTINATION}.")


if __name__ == "__main__":
    main()
