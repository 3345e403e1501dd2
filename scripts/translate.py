#!/usr/bin/env python
# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Translate images with a trained CycleGAN (local folder or Hub id), in either direction.

    python scripts/translate.py --model_name_or_path outputs/h2z --input data/horse2zebra/testA --save_grids
    python scripts/translate.py --model_name_or_path user/cyclegan-h2z --dataset_name huggan/horse2zebra \\
        --dataset_split test --direction b_to_a --output_dir zebras2horses

Only the generators are loaded. Writes one PNG per input image (same name, .png) in --output_dir, optionally
side-by-side grids (input | translation) in <output_dir>/grids, and translate_results.json (count, seconds,
images per second, device, and the inputs that could not be read).

An input image that cannot be read (damaged, truncated, not an image) is skipped with a warning that names it;
the others are translated, and translate_results.json lists the skipped ones under "skipped".

Exit status: 0 when every input was translated; 3 when some inputs were skipped (the rest were translated);
1 on an error (nothing readable to translate, a wrong model path, ...); 2 for a wrong command line.
"""

import argparse
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from hf_dgm_training import (
    DataError,
    UnreadableImageError,
    add_debug_arg,
    device_description,
    iter_dataset_images,
    load_pretrained,
    open_image,
    resolve_device,
    run_main,
    save_image_grid,
    write_json,
)
from hf_dgm_training.arguments import POSITIVE_INT


# The model package and the data loading are imported where they are used: with transformers they take seconds to
# import, which `--help` and a refused flag do not wait for.


logger = logging.getLogger(__name__)
EXIT_SOME_SKIPPED = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Folder written by train_cyclegan.py, or a Hub id.")
    source = parser.add_argument_group("input (one of)")
    source.add_argument("--input", default=None, help="An image file or a folder of images (searched recursively).")
    source.add_argument("--dataset_name", default=None, help="A dataset (Hub id or local dataset folder).")
    source.add_argument("--dataset_split", default="test", help="Split of --dataset_name.")
    source.add_argument(
        "--image_column",
        default=None,
        help="Image column of the dataset (default: imageA for a_to_b and imageB for b_to_a when present, else image).",
    )
    parser.add_argument("--direction", default="a_to_b", choices=["a_to_b", "b_to_a"], help="Which generator to use.")
    parser.add_argument("--output_dir", default=None,
                        help="Where the images go (default: <model>/translated_<direction> for a local model, "
                             "./translated_<direction> for a Hub model).")
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=8, help="Images per forward pass.")
    parser.add_argument("--image_size", type=POSITIVE_INT, default=None,
                        help="Resize inputs to this size (default: the model's).")
    parser.add_argument("--keep_size", action="store_true", help="Resize each output back to its input's size.")
    parser.add_argument("--save_grids", action="store_true", help="Also write input | translation grids.")
    parser.add_argument("--grid_rows", type=POSITIVE_INT, default=8, help="Image pairs per grid file.")
    parser.add_argument("--max_images", type=POSITIVE_INT, default=None, help="Translate at most this many images.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"], help="bf16 autocast on the device.")
    parser.add_argument("--hub_token", default=None, help="Token for a private Hub model or dataset.")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if (args.input is None) == (args.dataset_name is None):
        parser.error("Pass exactly one of --input (an image file or folder) or --dataset_name.")
    return args


def list_images(path: str) -> list[str]:
    from hf_dgm_training.data.unpaired import IMAGE_EXTENSIONS

    if os.path.isfile(path):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{path} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)}).")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path} does not exist; pass an image file or a folder of images.")
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(path)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise DataError(f"--input {path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return files


def iterate_inputs(args, skipped: list):
    """(name, RGB PIL image) pairs from --input or the dataset split, and how many inputs there are. An input that
    cannot be read is logged and appended to `skipped` as {"input": ..., "error": ...} instead."""

    def readable(pairs):
        for name, source, where in pairs:
            try:
                image = open_image(source, where)
            except UnreadableImageError as error:
                reason = str(error.__cause__ or error)
                logger.warning(f"Skipping {where}: cannot read it ({reason}).")
                skipped.append({"input": where, "error": reason})
                continue
            yield name, image.convert("RGB")

    if args.input is not None:
        files = list_images(args.input)[: args.max_images]
        root = args.input if os.path.isdir(args.input) else os.path.dirname(args.input)
        pairs = ((os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "__"), path, path) for path in files)
        return readable(pairs), len(files)

    from datasets import load_dataset

    dataset = load_dataset(args.dataset_name, split=args.dataset_split, token=args.hub_token)
    column = args.image_column
    if column is None:
        preferred = "imageA" if args.direction == "a_to_b" else "imageB"
        column = preferred if preferred in dataset.column_names else "image"
    if column not in dataset.column_names:
        raise DataError(f"Dataset {args.dataset_name!r} has no column {column!r}; columns: {dataset.column_names}.")
    dataset = dataset.select_columns([column])
    if args.max_images:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    # Empty rows (the shorter domain of a HugGAN dataset) are left out by iter_dataset_images.
    pairs = ((f"{index:05d}", value, name) for index, name, value in iter_dataset_images(dataset, column))
    return readable(pairs), len(dataset)


def main(argv=None):
    args = parse_args(argv)
    from modeling_cyclegan import CycleGANImageProcessor, CycleGANModel

    device = resolve_device(args.device)
    model = load_pretrained(CycleGANModel, args.model_name_or_path, model_types=("cyclegan",), token=args.hub_token,
                            with_discriminators=False)
    model.to(device).eval()
    model_path = os.path.expanduser(args.model_name_or_path)
    try:
        processor = CycleGANImageProcessor.from_pretrained(model_path, token=args.hub_token)
    except OSError:  # a model saved without its image processor
        processor = CycleGANImageProcessor(size=model.config.image_size)
    if args.image_size is not None:
        processor = CycleGANImageProcessor(size=args.image_size, resample=processor.resample)
    output_dir = args.output_dir or os.path.join(
        model_path if os.path.isdir(model_path) else ".", f"translated_{args.direction}"
    )
    os.makedirs(output_dir, exist_ok=True)

    skipped = []
    inputs, total = iterate_inputs(args, skipped)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    written, pairs, grid_index, seconds = 0, [], 0, 0.0

    def translate_batch(batch):
        nonlocal written, grid_index, seconds
        names, images = zip(*batch)
        pixel_values = processor(list(images), return_tensors="pt")["pixel_values"].to(device)
        started = time.perf_counter()
        with autocast:
            translated = model.translate(pixel_values, direction=args.direction)
        outputs = processor.postprocess(translated.float())  # waits for the device
        seconds += time.perf_counter() - started
        for name, image, output in zip(names, images, outputs):
            if args.keep_size and output.size != image.size:
                output = output.resize(image.size, resample=processor.resample)
            output.save(os.path.join(output_dir, f"{name}.png"))
            written += 1
            if args.save_grids:
                pairs.extend([image.resize(output.size, resample=processor.resample), output])
        while args.save_grids and len(pairs) >= 2 * args.grid_rows:
            grid_path = os.path.join(output_dir, "grids", f"grid_{grid_index:03d}.png")
            save_image_grid(pairs[: 2 * args.grid_rows], grid_path, nrow=2)
            del pairs[: 2 * args.grid_rows]
            grid_index += 1

    batch = []
    for item in tqdm(inputs, total=total, desc=f"Translating {args.direction}"):
        batch.append(item)
        if len(batch) == args.batch_size:
            translate_batch(batch)
            batch = []
    if batch:
        translate_batch(batch)
    if args.save_grids and pairs:
        save_image_grid(pairs, os.path.join(output_dir, "grids", f"grid_{grid_index:03d}.png"), nrow=2)

    results = {
        "model": args.model_name_or_path,
        "direction": args.direction,
        "images": written,
        "seconds": seconds,
        "images_per_second": written / seconds if seconds > 0 else None,
        "image_size": processor.size,
        "device": device_description(device),
        "output_dir": output_dir,
        "skipped": skipped,
    }
    results_path = os.path.join(output_dir, "translate_results.json")
    write_json(results_path, results)
    if written == 0:
        reason = f"none of the {len(skipped)} inputs could be read" if skipped else "the input had no images"
        raise DataError(f"No images were translated: {reason} (listed in {results_path}).")
    print(f"Translated {written} images ({args.direction}) into {output_dir}."
          + (f" Skipped {len(skipped)} unreadable input(s), listed in {results_path}." if skipped else ""))
    return results


def exit_status(results: dict) -> int:
    """0 when every input was translated, EXIT_SOME_SKIPPED when some could not be read."""
    return EXIT_SOME_SKIPPED if results["skipped"] else 0


if __name__ == "__main__":
    run_main(main, exit_status=exit_status)
