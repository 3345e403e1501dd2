#!/usr/bin/env python
"""Generate images with a trained MAF or IAF (local folder or Hub id): exact samples, and refined ones next to them.

    python scripts/sample_maf.py --model_name_or_path runs/maf --num_samples 5 --temperature 1.0 0.7 \\
        --data_dir data/mvtec_capsule

Exact samples are draws from the model. An image flow's draws can look like coloured static even when the model
has learnt the data well: its typical set is not where the data lie (docs/maf.md explains why). Refined samples
start from the same draws and take --refine_steps steps of annealed Langevin dynamics towards higher density
(MAFModel.sample's refine_* arguments): they look like the data but are density-guided, NOT draws from the model,
and the figures say so. --refine_steps 0 writes exact samples only.

Writes to --output_dir, for each temperature T: sample_t<T>_<i>.png and samples_t<T>.png (exact, one grid),
refined_t<T>_<i>.png and refined_t<T>.png (refined), exact_vs_refined_t<T>.png (both grids side by side, labelled),
and samples.json: seconds in total and per image for exact and refined samples (refined seconds include the exact
pass they start from; all temperatures are drawn, and refined, in one batch, and each gets its share of the batch's
seconds), sequential MADE evaluations per block, device, and the measures of
hf_dgm_training.metrics.sample_quality on the 8-bit images: bits/dim under the model, roughness (mean |Laplacian| in
8-bit levels) and diversity (mean pairwise L2). With --data_dir or --dataset_name (the data the model was trained
on) also roughness and diversity relative to the training images and the distance to the nearest training image
relative to that of the test-good images (refined samples must not be copies of training images).
"""

import argparse
import os
import time

from hf_dgm_training import (
    add_debug_arg,
    device_description,
    load_model_for_inference,
    run_main,
    save_image_grid,
    save_labelled_grids,
    write_json,
)
from hf_dgm_training.arguments import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED


DEFAULT_REFINE_STEPS = 300


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Folder written by train_maf.py, or a Hub id.")
    parser.add_argument("--output_dir", default=None,
                        help="Where images and samples.json go (default: <model>/samples).")
    parser.add_argument("--num_samples", type=POSITIVE_INT, default=5, help="Images to generate per temperature.")
    parser.add_argument("--temperature", type=POSITIVE_FLOAT, nargs="+", default=[1.0],
                        help="Standard deviation(s) of the base noise; below 1 trades diversity for cleaner images.")
    parser.add_argument("--seed", type=SEED, default=0, help="Seed of the base noise and of the refinement noise.")
    parser.add_argument("--refine_steps", type=NON_NEGATIVE_INT, default=DEFAULT_REFINE_STEPS,
                        help="Steps of density-guided refinement (annealed Langevin dynamics on log p) applied to the "
                             "exact samples; each costs about one forward and backward pass of the model (MAF) or of "
                             "its one-pass direction (IAF). 0: exact samples only.")
    parser.add_argument("--refine_step_size", type=POSITIVE_FLOAT, default=None,
                        help="How far each value moves per refinement step, about (logit units for a MAF, latent "
                             "units for an IAF; default: the model's, see MAFModel.sample).")
    parser.add_argument("--refine_temperature", type=NON_NEGATIVE_FLOAT, default=None,
                        help="Noise temperature at the first refinement step, falling linearly to 0 at the last: 1 "
                             "samples the model's own density, 0 is preconditioned gradient ascent from each draw "
                             "(default: the model's, see MAFModel.sample).")
    parser.add_argument("--refine_batch_size", type=POSITIVE_INT, default=None,
                        help="Samples refined at a time, which bounds memory (default: the model's).")
    parser.add_argument("--data_dir", default=None,
                        help="The data folder the model was trained on (train/good and test/<good or defect>): adds "
                             "the measures relative to its training and test-good images.")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset id (image + label) instead of --data_dir.")
    parser.add_argument("--category", default="capsule", help="MVTec AD category, when --data_dir holds <category>/.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
    parser.add_argument("--hub_token", default=None, help="Token for a private Hub model or dataset.")
    parser.add_argument("--nrow", type=POSITIVE_INT, default=None,
                        help="Images per grid row (default: all in one row).")
    add_debug_arg(parser)
    return parser.parse_args(argv)


def refinement_arguments(args) -> dict:
    names = ("refine_step_size", "refine_temperature", "refine_batch_size")
    chosen = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {"refine_steps": args.refine_steps, **chosen}


def generate(model, args, show_progress=True, **refinement):
    """Samples from `args.seed` on the model's device, every temperature of `args.temperature` in one batch,
    returned as a CPU tensor whose rows go temperature by temperature; and the seconds the batch took
    (device-synchronised)."""
    import torch

    device = model.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    images = model.sample(args.num_samples, generator=generator, temperature=args.temperature,
                          show_progress=show_progress, **refinement)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images.cpu(), time.perf_counter() - started


def write_images(images, output_dir, grid_name, image_name, nrow):
    """<grid_name>.png (all images) and <image_name>_<i>.png (each); returns the grid's path."""
    grid = os.path.join(output_dir, f"{grid_name}.png")
    save_image_grid(images, grid, nrow=nrow)
    for index, image in enumerate(images):
        save_image_grid(image[None], os.path.join(output_dir, f"{image_name}_{index}.png"), nrow=1, padding=0)
    return grid


def main(argv=None):
    args = parse_args(argv)
    # torch, transformers and the model package are imported once the model path is known to be good.
    device, output_dir, model = load_model_for_inference(args, "samples", model_types=("maf", "iaf"))
    from hf_dgm_training.metrics.sample_quality import load_reference_images, reference_statistics, sample_quality
    from modeling_maf import MAFImageProcessor

    reference = statistics = None
    if args.data_dir is not None or args.dataset_name is not None:
        # The processor saved with the model: the data are preprocessed as the training images were.
        processor = MAFImageProcessor.from_model(args.model_name_or_path, model.config, token=args.hub_token)
        reference = load_reference_images(processor, args.data_dir, args.dataset_name, args.category,
                                          token=args.hub_token)
        statistics = reference_statistics(model, reference)
    refinement = refinement_arguments(args)
    report = {"model": args.model_name_or_path, "model_type": model.config.model_type,
              "device": device_description(device),
              "num_samples": args.num_samples, "sequential_passes_per_block": model.num_sequential_passes()
              if model.config.model_type == "maf" else [1] * model.config.num_blocks,
              "refinement": refinement,
              "reference": statistics if statistics is not None else
              "data-relative measures omitted: pass --data_dir or --dataset_name (the data the model was trained on)",
              "runs": []}
    nrow = args.nrow or args.num_samples
    # A patch model's images are mosaics of independent patches, each drawn given its location.
    mosaic = "; patch mosaic: independent patches" if getattr(model.config, "patch_size", None) else ""
    report["patch_mosaic"] = bool(mosaic)
    # Every temperature in one batch (exact, then refined): the same base draws scaled by each temperature.
    num_images = args.num_samples * len(args.temperature)
    exact, exact_seconds = generate(model, args)
    exact_batches = exact.split(args.num_samples)
    print(f"{num_images} exact images ({len(args.temperature)} temperatures) in {exact_seconds:.3f} s")
    if args.refine_steps > 0:
        refined, refined_seconds = generate(model, args, **refinement)
        refined_batches = refined.split(args.num_samples)
        print(f"{num_images} refined images in {refined_seconds:.3f} s")
    # A run's seconds are its share of the batch's: the temperatures were drawn and refined together.
    report["temperatures_in_one_batch"] = len(args.temperature) > 1
    for index, temperature in enumerate(args.temperature):
        tag = f"t{temperature:g}"
        images, seconds = exact_batches[index], exact_seconds * args.num_samples / num_images
        grid = write_images(images, output_dir, f"samples_{tag}", f"sample_{tag}", nrow)
        run = {"temperature": temperature, "seconds_total": seconds, "seconds_per_image": seconds / args.num_samples,
               "grid": grid, "measures": sample_quality(model, images, reference, statistics)}
        print(f"temperature {temperature:g}: {args.num_samples} exact images -> {grid}")
        if args.refine_steps > 0:
            refined = refined_batches[index]
            refined_grid = write_images(refined, output_dir, f"refined_{tag}", f"refined_{tag}", nrow)
            comparison = os.path.join(output_dir, f"exact_vs_refined_{tag}.png")
            save_labelled_grids([(f"exact samples: draws from the model{mosaic} (T = {temperature:g})", images),
                                 (f"refined: density-guided ({args.refine_steps} Langevin steps on log p{mosaic}), "
                                  "not draws from the model", refined)], comparison, nrow=nrow)
            share = refined_seconds * args.num_samples / num_images
            run["refined"] = {"seconds_total": share, "seconds_per_image": share / args.num_samples,
                              "grid": refined_grid, "comparison": comparison,
                              "measures": sample_quality(model, refined, reference, statistics)}
            print(f"temperature {temperature:g}: {args.num_samples} refined images -> {comparison}")
        report["runs"].append(run)
    write_json(os.path.join(output_dir, "samples.json"), report)
    return report


if __name__ == "__main__":
    run_main(main)
