#!/usr/bin/env python
# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Train CycleGAN (Zhu et al. 2017) on unpaired images with `accelerate`.

Defaults are the paper's: ResNet generators, 70x70 PatchGANs, least-squares GAN loss, lambda_cycle 10, identity
weight 0.5, image pools of 50, Adam (2e-4, betas 0.5/0.999), batch 1, learning rate constant for the first half of
the epochs then decaying linearly towards 0, resize to 1.12x then random crop and flip.

    python scripts/train_cyclegan.py --data_dir data/horse2zebra --image_size 128 --output_dir outputs/h2z
    accelerate launch scripts/train_cyclegan.py --dataset_name huggan/horse2zebra --image_size 256 --push_to_hub

The fast path (the default) runs the step in bf16 autocast with channels_last tensors and fused Adam, keeps the
dataset on the device as uint8 with the augmentation done there, fetches the losses every --logging_steps, and
replays the generator and discriminator updates as CUDA graphs on one GPU. `--fast_path false` runs the plain eager
float32 step in the reference's call order; the maths is the paper's either way.

Outputs in --output_dir: metrics.jsonl (the eight losses every step, their means every epoch), plots/*.png,
preview.png, grids/epoch_*.png (palette PNGs; --grid_colors 0 for lossless), checkpoints/step_*, the final model
(save_pretrained, image processor, model card) and train_results.json.
"""

import argparse
import os
import random

import torch

from hf_dgm_training import (
    ProcessLogger,
    TrainingLoop,
    TrainingTask,
    UsageError,
    add_common_args,
    add_config_override_args,
    check_config_overrides,
    config_overrides_from_args,
    finish_common_args,
    load_pretrained,
    plot_curves,
    run_main,
    save_small_grid,
    setup_accelerator,
    write_model_card,
)
from hf_dgm_training.arguments import NON_NEGATIVE_INT, POSITIVE_INT, Number, auto_bool
from hf_dgm_training.cyclegan import (
    STEP_LOSS_NAMES,
    CycleGANTrainStep,
    ImagePool,
    build_optimizers,
    learning_rate_factor,
    make_gradient_averager,
    new_batch_buffers,
    prepare_model,
    resolve_fast_path,
)


# The model package and the data loading (transformers, datasets) are imported where they are used: they take
# seconds to import, which `--help` and a refused flag do not wait for.
logger = ProcessLogger(__name__)
CONFIG = "modeling_cyclegan.configuration_cyclegan:CycleGANConfig"
ADAM_BETA = Number(float, minimum=0, below=1)
# --preset cpu: a small CycleGAN that trains in minutes on a few CPU cores (docs/RESULTS.md#cyclegan-on-a-cpu); the
# flags given on the command line win.
PRESETS = {
    "paper": {},
    "cpu": {"image_size": 64, "generator_filters": 16, "discriminator_filters": 16, "num_residual_blocks": 3,
            "num_train_epochs": 2},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, defaults={
        "num_train_epochs": 20, "per_device_train_batch_size": 1, "learning_rate": 2e-4, "logging_steps": 100,
        "mixed_precision": None,  # resolved below: bf16 on the fast path on a GPU, else no
        "checkpointing_steps": "epoch",
    })
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="'paper': the paper's model and the flags' defaults. 'cpu': a small model (64x64 images, "
                             "16 filters, 3 residual blocks) for 2 epochs, minutes on 2 CPU cores: "
                             f"{PRESETS['cpu']}. Flags given on the command line win.")
    parser.add_argument("--adam_beta1", type=ADAM_BETA, default=0.5, help="Adam beta1 (paper: 0.5).")
    parser.add_argument("--adam_beta2", type=ADAM_BETA, default=0.999, help="Adam beta2 (paper: 0.999).")
    parser.add_argument("--num_decay_epochs", type=NON_NEGATIVE_INT, default=None,
                        help="Epochs over which the learning rate decays linearly towards 0, at the end of training "
                             "(default: half of --num_train_epochs, as the paper's 100 + 100).")
    parser.add_argument("--load_size", type=POSITIVE_INT, default=None,
                        help="Images are resized to this size before the random crop of --image_size (default: "
                             "1.117 x image_size, the reference's 286 for 256).")
    parser.add_argument("--no_flip", action="store_true", help="Disable the random horizontal flips.")
    parser.add_argument("--test_split", type=str, default="test",
                        help="Split with the images of the epoch grids and the final evaluation (local folders "
                             "<split>A, <split>B).")
    group = parser.add_argument_group("figures")
    group.add_argument("--num_grid_images", type=NON_NEGATIVE_INT, default=4,
                       help="Test images per domain in the per-epoch grids (0: no grids).")
    group.add_argument("--grid_colors", type=Number(int, minimum=0, maximum=256), default=192,
                       help="Palette size of the grid and preview PNGs (2-256; 0: lossless full colour). A palette "
                            "keeps grids of photos small enough to fetch and to put into documentation.")
    group.add_argument("--grid_tile_size", type=NON_NEGATIVE_INT, default=128,
                       help="Largest side of one image in the grids and the preview; larger images are downscaled "
                            "(0: full size).")
    group = parser.add_argument_group("speed (the maths is the same on every path)")
    group.add_argument("--torch_compile", type=auto_bool, default="auto",
                       help="torch.compile the generator and discriminator loss computations (auto: off, as it is "
                            "slower than the CUDA-graph step here; docs/RESULTS.md#cyclegan-speed). If compiling "
                            "fails the step runs eagerly and train_results.json says why.")
    group.add_argument("--torch_compile_mode", type=str, default="default", help="Mode for torch.compile.")
    group.add_argument("--channels_last", type=auto_bool, default="auto",
                       help="channels_last tensors (auto: on CUDA on the fast path).")
    add_config_override_args(parser, CONFIG)
    # The flags a preset sets read None when not given, so that a preset's value never hides one given explicitly.
    preset_names = sorted({name for preset in PRESETS.values() for name in preset})
    defaults = {name: parser.get_default(name) for name in preset_names}
    parser.set_defaults(**dict.fromkeys(preset_names))
    args = parser.parse_args(argv)
    args._script_defaults = set()  # fields the preset set, not the command line: an error names them as defaults
    for name in preset_names:
        if getattr(args, name) is None:
            setattr(args, name, PRESETS[args.preset].get(name, defaults[name]))
            args._script_defaults.add(name)
    args = finish_common_args(parser, args)

    if args.mixed_precision == "fp16":
        parser.error("--mixed_precision fp16 needs loss scaling, which this script does not do; use bf16 or no.")
    if args.mixed_precision is None:
        on_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.mixed_precision = "bf16" if args.fast_path != "false" and on_gpu else "no"
    if args.num_decay_epochs is None:
        args.num_decay_epochs = args.num_train_epochs // 2
    if not 0 <= args.num_decay_epochs <= args.num_train_epochs:
        parser.error(f"--num_decay_epochs must be in [0, {args.num_train_epochs}], got {args.num_decay_epochs}.")
    if args.grid_colors != 0 and not 2 <= args.grid_colors <= 256:
        parser.error("--grid_colors must be 0 (lossless) or in [2, 256].")
    from modeling_cyclegan import CycleGANConfig

    check_config_overrides(parser, args, CycleGANConfig)
    return args


def build_model(args):
    from modeling_cyclegan import CycleGANConfig, CycleGANModel

    overrides = config_overrides_from_args(args, CycleGANConfig)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.model_name_or_path:
        return load_pretrained(CycleGANModel, args.model_name_or_path, model_types=("cyclegan",), token=args.hub_token,
                               **overrides)
    return CycleGANModel(CycleGANConfig(**overrides))


class CycleGANTask(TrainingTask):
    """Both domains on the device as uint8, the reference's sampling and augmentation, the paper's step; a grid of
    translated test images after every epoch."""

    loss_names = STEP_LOSS_NAMES

    def __init__(self, args, accelerator, model, images_a, images_b, grid_a, grid_b):
        from hf_dgm_training.data.unpaired import UnpairedSampler

        config, device = model.config, accelerator.device
        self.args, self.model, self.is_main = args, model, accelerator.is_main_process
        self.grid_a, self.grid_b = grid_a, grid_b
        self.options = resolve_fast_path(args, device, accelerator.num_processes, config)
        if self.options.cuda_graphs or self.options.torch_compile or self.options.channels_last:
            torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick the fastest kernels once
        logger.info(f"Step options: {self.options.describe()}", main_process_only=True)
        prepare_model(model, device, self.options)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            for tensor in model.state_dict().values():  # identical start on every process
                tensor.copy_(broadcast(tensor.clone(), from_process=0))
        optimizer_g, optimizer_d = build_optimizers(model, args.learning_rate, (args.adam_beta1, args.adam_beta2),
                                                    self.options)
        self.pools = ImagePool(config.pool_size), ImagePool(config.pool_size)
        self.step = CycleGANTrainStep(model, optimizer_g, optimizer_d, *self.pools, self.options,
                                      make_gradient_averager(accelerator))
        accelerator.register_for_checkpointing(model, optimizer_g, optimizer_d, *self.pools)
        batch_size = args.per_device_train_batch_size
        self.sampler = UnpairedSampler(images_a, images_b, config.image_size, batch_size, args.seed,
                                       accelerator.process_index, accelerator.num_processes, flip=not args.no_flip)
        self.buffers = new_batch_buffers(batch_size, config, device, self.options)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.images_per_step = batch_size * accelerator.num_processes
        self.warmup_steps = self.options.warmup_steps + 2

    def start_epoch(self, epoch):
        args = self.args
        learning_rate = args.learning_rate * learning_rate_factor(epoch, args.num_train_epochs, args.num_decay_epochs)
        self.step.set_learning_rate(learning_rate)
        return {"lr": learning_rate}

    def epoch_batches(self, epoch, first_step):
        real_a, real_b = self.buffers
        for indices in self.sampler.epoch_order(epoch)[first_step:]:
            self.sampler.fill_batch(real_a, real_b, indices)
            yield real_a, real_b

    def train_step(self, batch):
        return self.step(*batch)

    def end_epoch(self, epoch, epoch_means):
        if self.grid_a is not None and self.is_main:
            path = os.path.join(self.args.output_dir, "grids", f"epoch_{epoch + 1:03d}.png")
            save_epoch_grid(self.model, self.grid_a, self.grid_b, path, self.args.grid_colors, self.args.grid_tile_size)
        return {}


# ----------------------------------------------------------------------------------------------------------
# Figures, evaluation, model card
# ----------------------------------------------------------------------------------------------------------


def write_loss_plots(records: list[dict], plots_dir: str, with_identity: bool) -> dict[str, str]:
    """One PNG per loss (G_A, G_B, D_A, D_B), cycle A and B, identity A and B (when on), and all eight together."""
    from modeling_cyclegan import LOSS_NAMES

    records = [record for record in records if "G_A" in record]  # the step lines
    if not records:
        return {}
    steps = [record["step"] for record in records]

    def series(*names):
        return {name: (steps, [record[name] for record in records]) for name in names}

    figures = {
        "G_A": (series("G_A"), "Generator A->B adversarial loss (G_A)"),
        "G_B": (series("G_B"), "Generator B->A adversarial loss (G_B)"),
        "D_A": (series("D_A"), "Discriminator of domain B (D_A)"),
        "D_B": (series("D_B"), "Discriminator of domain A (D_B)"),
        "cycle": (series("cycle_A", "cycle_B"), "Cycle-consistency losses (x lambda)"),
    }
    if with_identity:
        figures["identity"] = (series("idt_A", "idt_B"), "Identity losses (x lambda x lambda_identity)")
    figures["all"] = (series(*LOSS_NAMES), "CycleGAN losses")
    paths = {}
    for name, (data, title) in figures.items():
        paths[name] = os.path.join(plots_dir, f"loss_{name}.png")
        plot_curves(data, paths[name], title=title, ylabel="loss", smoothing=0.99 if len(records) > 2000 else 0.9)
    return paths


def save_epoch_grid(model, grid_a, grid_b, path: str, colors: int = 192, tile_size: int = 128) -> None:
    """Rows of [A | G_A(A) | G_B(G_A(A)) | B | G_B(B) | G_A(G_B(B))] for the fixed test images."""
    from modeling_cyclegan.image_processing_cyclegan import pixel_values_to_unit_interval

    with torch.no_grad():
        fake_b = model.generator_a_to_b(grid_a)
        reconstructed_a = model.generator_b_to_a(fake_b)
        fake_a = model.generator_b_to_a(grid_b)
        reconstructed_b = model.generator_a_to_b(fake_a)
    columns = (grid_a, fake_b, reconstructed_a, grid_b, fake_a, reconstructed_b)
    rows = torch.stack([torch.stack([column[i] for column in columns]) for i in range(len(grid_a))])
    images = pixel_values_to_unit_interval(rows.flatten(0, 1).float()).contiguous()
    save_small_grid(images, path, nrow=len(columns), colors=colors, tile_size=tile_size)


def grid_images(domain, count: int, size: int, device) -> torch.Tensor:
    from hf_dgm_training.data.unpaired import images_to_uint8_tensor
    from modeling_cyclegan.image_processing_cyclegan import levels_to_pixel_values

    levels = images_to_uint8_tensor(domain.select(range(count)), size, "grid images", False)
    return levels_to_pixel_values(levels).to(device)


def evaluate_cycle_consistency(model, test_a, test_b, size: int, device, batch_size: int = 16) -> dict:
    """Mean L1 distance (pixel values in [-1, 1]) between held-out images and their reconstructions:
    |G_B(G_A(a)) - a| over domain A and |G_A(G_B(b)) - b| over domain B."""
    from hf_dgm_training.data.unpaired import images_to_uint8_tensor
    from modeling_cyclegan.image_processing_cyclegan import levels_to_pixel_values

    results = {}
    directions = (("A", test_a, model.generator_a_to_b, model.generator_b_to_a),
                  ("B", test_b, model.generator_b_to_a, model.generator_a_to_b))
    for name, domain, forward, backward in directions:
        pixels = images_to_uint8_tensor(domain, size, f"evaluation images {name}", False)
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for chunk in pixels.split(batch_size):
                images = levels_to_pixel_values(chunk.to(device))
                total += (backward(forward(images)) - images).abs().mean(dim=(1, 2, 3)).sum()
        results[f"cycle_l1_{name}"] = total.item() / len(pixels)
    return results


def model_card_body(args, config, results: dict, data_name: str) -> str:
    hyper_parameters = {
        "image size": config.image_size,
        "load size (before the random crop)": results["load_size"],
        "residual blocks": config.num_residual_blocks,
        "generator / discriminator filters": f"{config.generator_filters} / {config.discriminator_filters}",
        "norm": config.norm_type,
        "upsampling": config.upsample_mode,
        "GAN loss": config.gan_mode,
        "lambda_cycle": config.lambda_cycle,
        "lambda_identity": config.lambda_identity,
        "image pool size": config.pool_size,
        "epochs (decay epochs)": f"{args.num_train_epochs} ({args.num_decay_epochs})",
        "batch size per device x processes": f"{args.per_device_train_batch_size} x {results['num_processes']}",
        "Adam lr, betas": f"{args.learning_rate}, ({args.adam_beta1}, {args.adam_beta2})",
        "mixed precision": args.mixed_precision,
        "seed": args.seed,
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in hyper_parameters.items())
    grid = results["grids"].get("last")
    grid_text = (f"![Translations after the last epoch]({grid})\n\nEach row: A, G_A(A), G_B(G_A(A)), B, G_B(B), "
                 "G_A(G_B(B)).\n") if grid else ""
    return f"""
# CycleGAN trained on {data_name}

Unpaired image-to-image translation (Zhu et al. 2017, "Unpaired Image-to-Image Translation using
Cycle-Consistent Adversarial Networks"), trained with `hf-dgm`'s `scripts/train_cyclegan.py`.
`generator_a_to_b` is the reference's G_A, `generator_b_to_a` G_B; `discriminator_b` (D_A) judges domain B.

## Use

```python
from transformers import pipeline

translator = pipeline("image-translation", model="{results['repo_id']}", trust_remote_code=True)
translator("horse.jpg").save("zebra.png"); translator("zebra.jpg", direction="b_to_a").save("horse.png")
```

## Training

| hyper-parameter | value |
|---|---|
{table}

Held-out cycle-consistency L1 ({results['evaluation_split']} images, pixel values in [-1, 1]):
A -> B -> A {results['evaluation']['cycle_l1_A']:.4f}, B -> A -> B {results['evaluation']['cycle_l1_B']:.4f}.

Steps: {results['global_step']}, training time {results['train_seconds']:.0f} s on {results['device']}.

![Losses](plots/loss_all.png)

{grid_text}"""


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    from hf_dgm_training.data.unpaired import default_load_size, images_to_uint8_tensor, load_unpaired_split
    from modeling_cyclegan import LOSS_NAMES, CycleGANImageProcessor

    accelerator = setup_accelerator(args, "train_cyclegan")
    device, is_main = accelerator.device, accelerator.is_main_process
    # Sampling and the pools draw from Python's `random`: give each process its own stream.
    random.seed(args.seed + accelerator.process_index)

    # Model
    model = build_model(args)
    config = model.config
    load_size = args.load_size or default_load_size(config.image_size)
    if load_size < config.image_size:
        raise UsageError(f"--load_size {load_size} is smaller than the crop size --image_size {config.image_size}.")

    # Data: both domains resized once to the load size, kept on the device as uint8.
    evaluation_split = args.test_split
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        train_a, train_b = load_unpaired_split(args.data_dir, args.dataset_name, "train", token=args.hub_token)
        try:
            test_a, test_b = load_unpaired_split(args.data_dir, args.dataset_name, evaluation_split,
                                                 token=args.hub_token)
        except (FileNotFoundError, ValueError) as error:
            logger.warning(f"No test images ({error}); grids and evaluation use training images.",
                           main_process_only=True)
            test_a, test_b, evaluation_split = train_a, train_b, "train"
    images_a = images_to_uint8_tensor(train_a, load_size, "domain A", is_main).to(device)
    images_b = images_to_uint8_tensor(train_b, load_size, "domain B", is_main).to(device)
    num_grid = min(args.num_grid_images, len(test_a), len(test_b))
    grid_a = grid_images(test_a, num_grid, config.image_size, device) if num_grid else None
    grid_b = grid_images(test_b, num_grid, config.image_size, device) if num_grid else None
    if is_main:  # the training images at the crop size, from a stream of its own
        preview_rng = random.Random(args.seed)
        picks = [images[preview_rng.randrange(len(images))] for images in (images_a, images_b) for _ in range(8)]
        tile = min(config.image_size, args.grid_tile_size) if args.grid_tile_size else config.image_size
        save_small_grid(torch.stack(picks).float().div(255), os.path.join(args.output_dir, "preview.png"), nrow=8,
                        colors=args.grid_colors, tile_size=tile)

    # Train
    task = CycleGANTask(args, accelerator, model, images_a, images_b, grid_a, grid_b)
    loop = TrainingLoop(accelerator, args, task, model_config=config)
    loop.resume()
    loop.run()

    # Results, plots, final model
    if is_main:
        records = loop.records()
        plots = write_loss_plots(records, os.path.join(args.output_dir, "plots"), config.lambda_identity > 0)
        grids_dir = os.path.join(args.output_dir, "grids")
        names = sorted(os.listdir(grids_dir)) if os.path.isdir(grids_dir) else []
        grids = {"first": f"grids/{names[0]}", "middle": f"grids/{names[(len(names) - 1) // 2]}",
                 "last": f"grids/{names[-1]}"} if names else {}
        epoch_rows = [record for record in records if f"epoch/{LOSS_NAMES[0]}" in record]
        evaluation = evaluate_cycle_consistency(model, test_a, test_b, config.image_size, device)
        results = {
            **loop.results(),
            "images_per_second_counts":
                "images of one domain per second; every step also processes as many of the other",
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "load_size": load_size,
            "train_images": {"A": len(images_a), "B": len(images_b)},
            "fast_path": task.step.describe(),
            "final_epoch_mean_losses":
                {name: epoch_rows[-1][f"epoch/{name}"] for name in LOSS_NAMES} if epoch_rows else {},
            "evaluation": evaluation,
            "evaluation_split": evaluation_split,
            "repo_id": args.hub_model_id or os.path.abspath(args.output_dir),
            "grids": grids,
            "plots": {name: os.path.relpath(path, args.output_dir) for name, path in plots.items()},
            "preview": "preview.png",
            "config": config.to_diff_dict(),
        }
        # The final model: contiguous weights (channels_last is a training-time layout), image processor, card.
        state_dict = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        model.save_pretrained(args.output_dir, state_dict=state_dict)
        CycleGANImageProcessor(size=config.image_size).save_pretrained(args.output_dir)
        data_name = args.dataset_name or os.path.basename(os.path.normpath(args.data_dir))
        eval_results = [{"task_type": "image-to-image", "dataset_type": args.dataset_name or data_name,
                         "dataset_name": data_name, "dataset_split": evaluation_split,
                         "metric_type": f"cycle_l1_{domain}",
                         "metric_name": f"Cycle-consistency L1, {domain} -> {other} -> {domain}",
                         "metric_value": evaluation[f"cycle_l1_{domain}"]}
                        for domain, other in (("A", "B"), ("B", "A"))]
        write_model_card(args.output_dir, model_name=os.path.basename(os.path.abspath(args.output_dir)), metadata={
            "library_name": "transformers", "license": "apache-2.0", "pipeline_tag": "image-to-image",
            "tags": ["cyclegan", "image-to-image", "unpaired-image-translation", "hf-dgm"],
            **({"datasets": [args.dataset_name]} if args.dataset_name else {}), "eval_results": eval_results,
        }, body=model_card_body(args, config, results, data_name))
        results = loop.finish(results)
        logger.info(loop.summary(results), main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
