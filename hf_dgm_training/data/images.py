# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Reading images so that a damaged one is named: files, and the image columns of `datasets`.

`datasets` decodes an image column lazily and, for a truncated or damaged file, raises PIL's bare error ("image
file is truncated") without the file's name. Here every image is decoded from the column's undecoded value
(`{"path", "bytes"}`) and a failure names the file (or the dataset row, for bytes without a path).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

from ..errors import UnreadableImageError


MAX_NAMED = 10  # an error lists at most this many files


def open_image(source, name: str | None = None):
    """A fully decoded PIL image from a path, bytes, or an undecoded `datasets` value (`{"path", "bytes"}`).

    Raises `UnreadableImageError` naming `name` (default: the path) when the image cannot be decoded. Decoding is
    complete (`load()`), so a truncated file fails here and not later in the middle of training.
    """
    from PIL import Image

    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        name = name or path
        source = io.BytesIO(data) if data is not None else path
    elif isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    else:
        name = name or str(source)
    try:
        with Image.open(source) as image:
            image.load()
            return image
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... for bad files
        raise UnreadableImageError(
            f"Cannot read image {name or 'bytes'}: {error}. The file is damaged, truncated or not an image; replace it "
            "with a good copy or delete it."
        ) from error


def unreadable_images_error(failures: list[tuple[str, str]], what: str = "images") -> UnreadableImageError:
    """One error listing every (name, reason) in `failures`, with the fix."""
    shown = "; ".join(f"{name} ({reason})" for name, reason in failures[:MAX_NAMED])
    more = f"; and {len(failures) - MAX_NAMED} more" if len(failures) > MAX_NAMED else ""
    return UnreadableImageError(
        f"{len(failures)} of the {what} cannot be read (damaged, truncated or not images): {shown}{more}. Replace "
        "them with good copies or delete them."
    )


def iter_dataset_images(dataset, column: str = "image") -> Iterator[tuple[int, str, object]]:
    """(row index, name, undecoded value) of every non-empty image of `dataset[column]`, without decoding.

    The name is the image's file path when the dataset reads a local file, else "<column> of row <index>"; pass
    the value to `open_image(value, name)` to decode it.
    """
    from datasets import Image as ImageFeature

    undecoded = dataset.select_columns([column]).cast_column(column, ImageFeature(decode=False))
    for index, row in enumerate(undecoded):  # row by row: the bytes of a whole column never sit in memory at once
        value = row[column]
        if value is None:
            continue
        path = value.get("path")
        # A local file is named by its path; a Hub dataset's image by its row (and the file name it was pushed with).
        name = path if path and os.path.isabs(path) else f"{column} of row {index}" + (f" ({path})" if path else "")
        yield index, name, value


def check_dataset_images(dataset, column: str = "image", what: str = "images") -> None:
    """Decodes every image of `dataset[column]` once and raises one `UnreadableImageError` naming all that fail."""
    failures = []
    for _, name, value in iter_dataset_images(dataset, column):
        try:
            open_image(value, name)
        except UnreadableImageError as error:
            failures.append((name, str(error.__cause__ or error)))
    if failures:
        raise unreadable_images_error(failures, what)
