"""A seeded validation split of the good training images: held out from training, it serves model selection
(validation bits/dim), the per-location statistics of the standardised scores and the decision threshold."""

from typing import Optional, Sequence

import datasets
import numpy as np

from .schema import AnomalyDataError


def split_validation(train: datasets.Dataset, percentage: float = 10, seed: int = 0,
                     validation_files: Optional[Sequence[str]] = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split `train` (a split in the schema, e.g. `load_anomaly_dataset(...)["train"]`) into `(train, validation)`.

    The validation split holds `round(N * percentage / 100)` images (at least one when `percentage > 0`, and at least
    one image is left to train on), drawn by `numpy.random.default_rng(seed)` from the rows sorted by `file`: the same
    files, percentage and seed give the same split on any machine, whatever the row order. Both splits keep the row
    order of `train`; `validation["file"]` lists the held-out files. `percentage=0` gives an empty validation split.
    `validation_files` instead names the validation files of an earlier split (e.g. from train_results.json) and
    reproduces it exactly.
    """
    files = list(train["file"])
    if validation_files is not None:
        wanted = set(validation_files)
        unknown = sorted(wanted - set(files))
        if unknown:
            raise AnomalyDataError(f"{len(unknown)} validation file(s) are not in the training images: "
                                   f"{', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
        chosen = {index for index, name in enumerate(files) if name in wanted}
    else:
        if not 0 <= percentage < 100:
            raise ValueError(f"The validation split percentage must be in [0, 100), got {percentage}.")
        count = round(len(files) * percentage / 100)
        if percentage > 0:
            count = max(1, count)
        if count >= len(files):
            raise AnomalyDataError(
                f"A {percentage}% validation split of {len(files)} training image(s) leaves none to train on: add "
                "images or lower the validation split percentage."
            )
        by_name = sorted(range(len(files)), key=lambda index: files[index])
        permutation = np.random.default_rng(seed).permutation(len(files))
        chosen = {by_name[position] for position in permutation[:count]}
    keep = [index for index in range(len(files)) if index not in chosen]
    return train.select(keep), train.select(sorted(chosen))
