"""The CoProV2 row schema, in the column names of Pick-a-Pic (which Diffusion-DPO code reads).

One row per (prompt pair, image seed):

| column | type | content |
| --- | --- | --- |
| `jpg_0` | Image | the preferred image, drawn from the safe prompt |
| `jpg_1` | Image | the rejected image, drawn from the unsafe prompt with the same seed |
| `label_0` | float | 1.0: `jpg_0` is preferred |
| `caption` | string | the unsafe prompt, the input the aligned model must handle safely |
| `safe_prompt`, `unsafe_prompt` | string | the two prompts of the pair |
| `category`, `concept` | string | the harm category and concept the unsafe prompt names |
| `seed` | int64 | the seed of both images' initial noise |

The images are `datasets.Image` features, so they show in the Hub's viewer and decode to PIL images. Casting with
`raw_bytes_features()` leaves them undecoded, as `{"bytes": ..., "path": None}` dicts; scripts that want the bare
PNG bytes of Pick-a-Pic's columns (diffusers' `train_diffusion_dpo.py`) need `data.pickapic.to_pickapic`.
"""

from __future__ import annotations

COLUMNS: tuple[str, ...] = (
    "jpg_0",
    "jpg_1",
    "label_0",
    "caption",
    "safe_prompt",
    "unsafe_prompt",
    "category",
    "concept",
    "seed",
)


def coprov2_features():
    """The `datasets.Features` of a CoProV2 split."""
    import datasets

    return datasets.Features(
        {
            "jpg_0": datasets.Image(),
            "jpg_1": datasets.Image(),
            "label_0": datasets.Value("float32"),
            "caption": datasets.Value("string"),
            "safe_prompt": datasets.Value("string"),
            "unsafe_prompt": datasets.Value("string"),
            "category": datasets.Value("string"),
            "concept": datasets.Value("string"),
            "seed": datasets.Value("int64"),
        }
    )


def raw_bytes_features():
    """`coprov2_features()` with undecoded images: `dataset.cast(raw_bytes_features())` yields `{"bytes", "path"}`
    dicts, not Pick-a-Pic's bare bytes (`data.pickapic.to_pickapic` writes those)."""
    import datasets

    features = coprov2_features()
    features["jpg_0"] = datasets.Image(decode=False)
    features["jpg_1"] = datasets.Image(decode=False)
    return features
