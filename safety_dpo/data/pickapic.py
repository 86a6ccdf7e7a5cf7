"""The Pick-a-Pic layout, which Diffusion-DPO code reads: its preference labels, and exporting a CoProV2 build to it.

Pick-a-Pic (Kirstain et al., 2023; `yuvalkirstain/pickapic_v2`) holds one comparison per row:

| column | type | content |
| --- | --- | --- |
| `jpg_0`, `jpg_1` | `datasets.Value("binary")` | the two images, as the raw bytes of their PNG or JPEG files |
| `label_0` | float64 | 1: `jpg_0` is preferred; 0: `jpg_1` is; 0.5: a tie |
| `caption` | string | the prompt both images were drawn from |

diffusers' `examples/research_projects/diffusion_dpo/train_diffusion_dpo.py` reads exactly these four columns (its
`preprocess_train`): `Image.open(io.BytesIO(value))` on every `jpg_0`/`jpg_1` value, the pair swapped when
`label_0 == 0`, `caption` tokenized; other columns are carried along and never read. It keeps ties, with `jpg_0`
taken as preferred; the Diffusion-DPO authors' `train.py` (SalesforceAIResearch/DiffusionDPO) drops them ("eliminate
no-decisions"), and so does `orient_pairs`, which `SafetyDPOTrainer` uses.

CoProV2 follows the SafetyDPO authors' use of this layout (Visualignment/SafetyDPO `train.py`): the model is
conditioned on the *unsafe* prompt (`caption`) and prefers the image of the safe prompt (`jpg_0`) over that of the
unsafe one (`jpg_1`).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
LABELS = {1.0: "jpg_0 preferred", 0.0: "jpg_1 preferred", 0.5: "a tie"}
TIE = 0.5


def orient_pairs(dataset: Dataset) -> Dataset:
    """Drop the ties and swap the pairs whose `jpg_1` is preferred, so that every row has `jpg_0` preferred and
    `label_0` 1. A dataset without `label_0` is returned as it is: CoProV2's `jpg_0` is the preferred image.

    Args:
        dataset: A `datasets.Dataset` with `jpg_0`, `jpg_1` and optionally `label_0`.

    Returns:
        The oriented dataset; the number of dropped ties is logged.

    Raises:
        ValueError: If `label_0` holds a value other than 0, 0.5 or 1 (listing the values found).
    """
    if "label_0" not in dataset.column_names:
        return dataset
    labels = np.asarray(dataset["label_0"], dtype=float)  # None (a missing label) becomes NaN and is refused
    unknown = sorted({float(value) for value in labels[~np.isin(labels, list(LABELS))]}, key=str)
    if unknown:
        accepted = ", ".join(f"{value:g} ({meaning})" for value, meaning in LABELS.items())
        raise ValueError(f"label_0 holds {unknown[:5]}; Pick-a-Pic's labels are {accepted}.")
    ties = labels == TIE
    if ties.any():
        logger.info(
            "Dropping %d of %d pairs tied (label_0 = 0.5): neither image is preferred.", ties.sum(), len(labels)
        )
        dataset = dataset.select(np.flatnonzero(~ties))
        labels = labels[~ties]
    if (labels == 0).any():
        dataset = dataset.map(_swap_if_rejected_first)
    return dataset


def _swap_if_rejected_first(row: dict) -> dict:
    if row["label_0"] == 0:
        row["jpg_0"], row["jpg_1"], row["label_0"] = row["jpg_1"], row["jpg_0"], 1.0
    return row


def image_bytes(image: Any, column: str = "image", row: int | None = None) -> bytes:
    """The file bytes of an image as `datasets` gives it: raw bytes (`Value("binary")`), a `{"bytes", "path"}` dict
    (`Image(decode=False)`) or a PIL image (`Image()`, encoded as PNG unless it was read from a JPEG).

    Raises:
        TypeError: Naming the column and row, and what an image column holds, for any other value.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, dict) and image.get("bytes") is not None:
        return bytes(image["bytes"])
    if isinstance(image, dict) and image.get("path"):
        return Path(image["path"]).read_bytes()
    from PIL import Image

    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        kind = "JPEG" if image.format == "JPEG" else "PNG"  # re-encoding a JPEG as PNG would only grow it
        image.save(buffer, format=kind)
        return buffer.getvalue()
    where = f"Row {row} of {column!r}" if row is not None else f"Column {column!r}"
    raise TypeError(
        f"{where} holds a {type(image).__name__}; an image column holds PIL images (datasets.Image), "
        "PNG/JPEG bytes (datasets.Value('binary'), as Pick-a-Pic) or {'bytes', 'path'} dicts "
        "(datasets.Image(decode=False))."
    )


def pickapic_features(features: Features) -> Features:
    """`features` (a `datasets.Features`) in the Pick-a-Pic layout: its four columns first, typed as Pick-a-Pic
    types them, then every other column as it was."""
    import datasets

    layout = {
        "jpg_0": datasets.Value("binary"),
        "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"),
        "caption": datasets.Value("string"),
    }
    return datasets.Features({**layout, **{name: kind for name, kind in features.items() if name not in layout}})


def to_pickapic(dataset: Dataset | DatasetDict) -> Dataset | DatasetDict:
    """A CoProV2 build in the exact layout of Pick-a-Pic, which diffusers' `train_diffusion_dpo.py` reads.

    Every row gets `jpg_0` = the preferred (safe) image and `jpg_1` = the rejected (unsafe) one, both as raw PNG or
    JPEG bytes (`datasets.Value("binary")`), `label_0` = 1.0, and `caption` = the unsafe prompt (`unsafe_prompt`,
    else the existing `caption`): the model learns, conditioned on the unsafe prompt, to prefer the safe image. Ties
    are dropped and pairs with `label_0` 0 are swapped (`orient_pairs`), since that script would train on a tie as if
    `jpg_0` were preferred. Other columns (`category`, `concept`, `safe_prompt`, ...) are kept; the script never
    reads them.

    Args:
        dataset: A `datasets.Dataset` or `DatasetDict` in CoProV2's columns (a `build-data` output, a Hub CoProV2,
            or Pick-a-Pic itself).

    Returns:
        The same kind of object in the Pick-a-Pic layout. Save it where `load_dataset` finds it:
        `push_to_hub(repo_id)`, or `to_parquet(f"{folder}/{split}.parquet")` per split.

    Raises:
        ValueError: Naming the missing columns (image columns, or a prompt column), or for a bad `label_0`.
        TypeError: Naming the row, for an image value that is no image.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({split: to_pickapic(part) for split, part in dataset.items()})
    columns = dataset.column_names
    prompt = next((column for column in ("unsafe_prompt", "caption") if column in columns), None)
    missing = [column for column in IMAGE_COLUMNS if column not in columns]
    if prompt is None:
        missing.append("unsafe_prompt (or caption)")
    if missing:
        raise ValueError(
            f"to_pickapic needs the columns {missing}; the dataset has {columns}. It reads CoProV2's columns: jpg_0 "
            "(the preferred, safe image), jpg_1, label_0 (optional), unsafe_prompt or caption."
        )
    for column in IMAGE_COLUMNS:
        if isinstance(dataset.features[column], datasets.Image):  # read the stored file bytes, do not decode them
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    features = pickapic_features(dataset.features)
    dataset = dataset.map(
        _pickapic_rows,
        batched=True,
        with_indices=True,
        fn_kwargs={"prompt": prompt},
        features=features,
        desc="Pick-a-Pic layout",
    )
    return orient_pairs(dataset).select_columns(list(features))


def _pickapic_rows(rows: dict[str, list], indices: list[int], prompt: str) -> dict[str, list]:
    for column in IMAGE_COLUMNS:
        rows[column] = [image_bytes(image, column, index) for image, index in zip(rows[column], indices, strict=True)]
    rows["caption"] = list(rows[prompt])
    labels = rows.get("label_0", [1.0] * len(indices))  # no label_0: CoProV2's jpg_0 is the preferred image
    rows["label_0"] = [float("nan") if label is None else float(label) for label in labels]
    return rows
