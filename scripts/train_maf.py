#!/usr/bin/env python
"""Train a Masked Autoregressive Flow (or IAF) on the normal images of an MVTec AD category.

Defaults are the seed specification: 128x128x3, MADE 49152->512->512->2*49152, 7 blocks, batch 8, 100 epochs,
Adam at lr 1e-4, on capsule train/good.

    accelerate launch scripts/train_maf.py --data_dir data/mvtec_capsule --output_dir runs/maf --mixed_precision bf16
    python scripts/train_maf.py --data_dir data/mvtec_capsule --image_size 32 --num_train_epochs 2 --hidden_sizes 64 64

Writes to --output_dir: metrics.jsonl (every step and every epoch), checkpoints/step_N (accelerate state, atomic),
the final model (model.safetensors + config.json + modeling code + README.md model card), nll_curve.png and
train_summary.json (wall time, throughput, final bits/dim).
"""

import argparse
import logging
import math
import os
import time

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.data import load_mvtec, load_split_as_tensors
from modeling_maf.optimization_maf import MaskedAdam
from hf_dgm_training import (
    CheckpointManager,
    CUDAGraphStep,
    HubPusher,
    MetricsLogger,
    add_common_args,
    add_config_override_args,
    checkpointing_interval,
    config_overrides_from_args,
    device_description,
    plot_curves,
    resolve_hub_token,
    setup_accelerator,
    write_json,
    write_model_card,
)

logger = get_logger(__name__)
FLOW_CLASSES = {"maf": (MAFConfig, MAFModel), "iaf": (IAFConfig, IAFModel)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, defaults=dict(
        num_train_epochs=100, per_device_train_batch_size=8, learning_rate=1e-4, image_size=128, seed=0,
        output_dir="runs/maf", checkpointing_steps="700", checkpoints_total_limit=1,
    ))
    parser.add_argument("--model_name_or_path", type=str, default=None,
                        help="Start from a saved model (local folder or Hub id) instead of a fresh one.")
    parser.add_argument("--flow_type", choices=sorted(FLOW_CLASSES), default="maf",
                        help="'maf' (fast density, the default) or 'iaf' (fast sampling, slow density to train).")
    parser.add_argument("--category", type=str, default="capsule", help="MVTec AD category (for --download).")
    parser.add_argument("--download", action="store_true",
                        help="Fetch MVTec's official archive of --category into --data_dir if it is missing.")
    parser.add_argument("--logging_steps", type=int, default=25,
                        help="Fetch losses from the device every N steps (all steps still go to metrics.jsonl).")
    parser.add_argument("--max_grad_norm", type=float, default=None,
                        help="Clip the global gradient norm to this value (off by default, as in the seed spec; the "
                             "spec runs showed rare loss spikes that clipping would bound).")
    parser.add_argument("--plain", action="store_true",
                        help="Fall back to the plain path: foreach (unfused) Adam instead of the fused CUDA kernel, "
                             "and no CUDA graph.")
    parser.add_argument("--optimizer", choices=("auto", "masked_adam", "adam"), default="auto",
                        help="'masked_adam' (modeling_maf.optimization_maf.MaskedAdam): Adam that forms each MADE "
                             "weight gradient inside its update, for connected tiles only, and never writes the dense "
                             "gradient; with several processes it all-gathers the small per-layer factors instead of "
                             "all-reducing 2.1 GB of gradients; it clips (--max_grad_norm) over every parameter "
                             "itself. 'adam': torch.optim.Adam. auto: masked_adam for a MAF on a CUDA device unless "
                             "--plain (on a CPU its torch path is slower than torch.optim.Adam).")
    parser.add_argument("--cuda_graphs", choices=("auto", "true", "false"), default="auto",
                        help="Replay the whole training step (forward, backward, clipping, Adam) as one CUDA graph "
                             "after 3 eager warm-up steps: no host work per step (auto: on for one CUDA process "
                             "unless --plain; a last partial batch runs eagerly).")
    add_config_override_args(parser, MAFConfig, skip=("image_size",))
    args = parser.parse_args(argv)
    if args.data_dir is None and args.dataset_name is None:
        parser.error("pass --data_dir (a local MVTec category folder) or --dataset_name (a Hub dataset id).")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id, e.g. --hub_model_id <user>/maf-capsule.")
    # A spec checkpoint (weights + Adam state) is ~8.5 GB: every 700 steps (25 epochs) by default, "no" for none.
    try:
        args.checkpointing_steps = checkpointing_interval(args.checkpointing_steps)
    except ValueError as error:
        parser.error(str(error))
    return args


def build_model(args):
    config_class, model_class = FLOW_CLASSES[args.flow_type]
    overrides = config_overrides_from_args(args, MAFConfig)
    if args.model_name_or_path:
        model = model_class.from_pretrained(args.model_name_or_path, token=args.hub_token)
        if model.config.image_size != args.image_size:
            raise ValueError(f"{args.model_name_or_path} was trained at image_size={model.config.image_size}; "
                             f"pass --image_size {model.config.image_size}.")
        return model
    return model_class(config_class(image_size=args.image_size, **overrides))


def load_data(args):
    dataset = load_mvtec(args.data_dir, args.dataset_name, download=args.download, category=args.category,
                         token=args.hub_token)
    train = load_split_as_tensors(dataset["train"], args.image_size)
    test_good = None
    if "test" in dataset:
        test = load_split_as_tensors(dataset["test"], args.image_size)
        good = test.labels == 0
        test_good = test.pixel_values[good] if bool(good.any()) else None
    return train.pixel_values, test_good


class EpochSeededSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees exactly the batches it would have.

    The epoch is set with `use_epoch`, not `set_epoch`: accelerate calls `set_epoch` with the number of times the
    (prepared) loader was iterated, which restarts at 0 for the loader that skips the batches already done."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def use_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self):
        return self.size


@torch.no_grad()
def mean_bits_per_dim(model, pixel_values, batch_size=32):
    """Deterministic (eval-mode) bits/dim averaged over images."""
    was_training = model.training
    model.eval()
    values = [model(chunk).bits_per_dim for chunk in pixel_values.split(batch_size)]
    model.train(was_training)
    return float(torch.cat(values).mean())


def model_card_body(args, config, summary):
    repo = args.hub_model_id or "<user>/<repo>"
    return f"""# {config.model_type.upper()} on MVTec AD {args.category}

A {'Masked' if config.model_type == 'maf' else 'Inverse'} Autoregressive Flow over {config.image_size}x{config.image_size}x{config.num_channels} images
({config.num_blocks} MADE blocks, hidden sizes {config.hidden_sizes}, degrees `{config.degree_assignment}`,
normalisation `{config.normalization}`), trained by maximum likelihood on the normal (`train/good`) images, made
with [hf-dgm](https://github.com/hf-dgm/hf-dgm). Its negative log-likelihood is an anomaly score.

## Usage

```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
images = model.sample(5, generator=torch.Generator().manual_seed(0))     # (5, 3, H, W) in [0, 1]
scores = model.anomaly_scores(images)                                   # per-image NLL in nats
```

## Training

| hyper-parameter | value |
|---|---|
| epochs | {args.num_train_epochs} |
| batch size per device | {args.per_device_train_batch_size} |
| learning rate (Adam) | {args.learning_rate} |
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |
| parameters | {summary['parameters']:,} |

## Results

| measure | value |
|---|---|
| train bits/dim (last epoch, noisy dequantisation) | {summary['final_train_bits_per_dim']:.4f} |
| test-good bits/dim (deterministic) | {summary.get('test_good_bits_per_dim') if summary.get('test_good_bits_per_dim') is not None else 'n/a'} |
| training wall time | {summary['train_wall_time_s']:.1f} s |

![NLL curve](nll_curve.png)
"""


def main(argv=None):
    args = parse_args(argv)
    hub_token = resolve_hub_token(args.hub_token) if args.push_to_hub else None  # fail before any training
    accelerator = setup_accelerator(args, project_name="train_maf")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    train_pixels, test_good = load_data(args)
    model = build_model(args)
    logger.info(f"{model.config.model_type.upper()} with {model.num_parameters():,} parameters; "
                f"{len(train_pixels)} training images.", main_process_only=True)

    dataset = torch.utils.data.TensorDataset(train_pixels)
    sampler = EpochSeededSampler(len(dataset), args.seed)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_train_batch_size, sampler=sampler,
                                             num_workers=args.dataloader_num_workers,
                                             pin_memory=accelerator.device.type == "cuda",
                                             # Its own generator: creating an iterator then leaves the global RNG
                                             # (dequantisation noise) alone, so a resumed run draws the same noise.
                                             generator=torch.Generator().manual_seed(args.seed))
    on_cuda = accelerator.device.type == "cuda"
    use_graphs = args.cuda_graphs == "true" or (args.cuda_graphs == "auto" and on_cuda and not args.plain
                                                and accelerator.num_processes == 1)
    if use_graphs and (not on_cuda or accelerator.num_processes > 1):
        raise ValueError("--cuda_graphs true needs one process on a CUDA device; leave it on auto or pass false.")
    fused = on_cuda and not args.plain
    use_masked_adam = args.optimizer == "masked_adam" or (
        # On a CPU the torch path of MaskedAdam is 1.6x slower than torch.optim.Adam (64x64 preset): auto = CUDA only.
        args.optimizer == "auto" and args.flow_type == "maf" and on_cuda and not args.plain)
    adam_options = dict(lr=args.learning_rate, fused=fused or None, foreach=False if args.plain else None,
                        capturable=use_graphs)
    # MaskedAdam hooks the unwrapped model (and keeps its MADE weights out of DDP's all-reduce): before prepare.
    if use_masked_adam:  # it clips itself: the MADE weight gradients exist only inside it
        optimizer = MaskedAdam(model, max_grad_norm=args.max_grad_norm, **adam_options)
    else:
        optimizer = torch.optim.Adam(model.parameters(), **adam_options)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    def training_step(pixel_values):
        loss = model(pixel_values).loss
        accelerator.backward(loss)
        if args.max_grad_norm is not None and not use_masked_adam:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        return loss.detach()

    # One CUDA graph per step on one GPU: the step's ~440 kernels then cost no Python or launch time.
    step_runner = CUDAGraphStep(training_step, enabled=use_graphs,
                                reset_fn=lambda: optimizer.zero_grad(set_to_none=True))

    steps_per_epoch = len(dataloader)
    total_steps = steps_per_epoch * args.num_train_epochs
    if args.max_train_steps is not None:
        total_steps = min(total_steps, args.max_train_steps)
    checkpoints = CheckpointManager(accelerator, args.output_dir, args.checkpoints_total_limit)
    pusher = HubPusher(args.hub_model_id, hub_token, args.hub_private_repo) \
        if args.push_to_hub and accelerator.is_main_process else None

    global_step, start_epoch, resume_step_in_epoch = 0, 0, 0
    state = checkpoints.resume(args.resume_from_checkpoint)
    if state is not None:
        global_step = state["step"]
        start_epoch, resume_step_in_epoch = divmod(global_step, steps_per_epoch)
        logger.info(f"Resumed at step {global_step} (epoch {start_epoch}, batch {resume_step_in_epoch}).")
    metrics = MetricsLogger(accelerator, os.path.join(args.output_dir, "metrics.jsonl"))

    def save_checkpoint(epoch):
        path = checkpoints.save(global_step, epoch)
        if pusher is not None:
            pusher.push_folder(path, path_in_repo=f"checkpoints/{os.path.basename(path)}",
                               commit_message=f"Checkpoint at step {global_step}")

    num_features = accelerator.unwrap_model(model).config.num_features
    progress = tqdm(total=total_steps, initial=global_step, desc="training", unit="step",
                    disable=not accelerator.is_local_main_process)
    step_curve, epoch_curve, test_curve = ([], []), ([], []), ([], [])
    pending = []  # (step, epoch, loss tensor): fetched in bulk so the loop never waits for the GPU
    train_time, samples_seen = 0.0, 0
    epoch_timings = []  # (seconds, images) of every epoch of this run, for the steady rate

    def flush(epoch):
        if not pending:
            return []
        values = torch.stack([loss for _, _, loss in pending]).float().cpu().tolist()
        for (step, ep, _), nll in zip(pending, values):
            bpd = nll / (num_features * math.log(2))
            metrics.log({"train/nll": nll, "train/bits_per_dim": bpd, "epoch": ep}, step=step)
            step_curve[0].append(step)
            step_curve[1].append(bpd)
        pending.clear()
        progress.set_postfix(bits_per_dim=f"{step_curve[1][-1]:.3f}")
        return values

    stop = False
    for epoch in range(start_epoch, args.num_train_epochs):
        model.train()
        sampler.use_epoch(epoch)
        epoch_loader = dataloader
        if epoch == start_epoch and resume_step_in_epoch:
            epoch_loader = accelerator.skip_first_batches(dataloader, resume_step_in_epoch)
        epoch_losses = []
        accelerator.wait_for_everyone()
        epoch_start_time, epoch_start_samples = train_time, samples_seen
        started = time.perf_counter()
        for (pixel_values,) in epoch_loader:
            loss = step_runner(pixel_values).clone()  # a replay returns the graph's own loss tensor
            global_step += 1
            samples_seen += pixel_values.shape[0] * accelerator.num_processes
            pending.append((global_step, epoch, accelerator.reduce(loss, "mean")))
            progress.update(1)
            if global_step % args.logging_steps == 0:
                epoch_losses += flush(epoch)
            if isinstance(args.checkpointing_steps, int) and global_step % args.checkpointing_steps == 0:
                epoch_losses += flush(epoch)
                train_time += time.perf_counter() - started
                save_checkpoint(epoch)
                started = time.perf_counter()
            if global_step >= total_steps:
                stop = True
                break
        epoch_losses += flush(epoch)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - started
        epoch_timings.append((train_time - epoch_start_time, samples_seen - epoch_start_samples))
        if epoch_losses:
            epoch_bpd = sum(epoch_losses) / len(epoch_losses) / (num_features * math.log(2))
            epoch_metrics = {"epoch/train_bits_per_dim": epoch_bpd, "epoch": epoch}
            epoch_curve[0].append(global_step)
            epoch_curve[1].append(epoch_bpd)
            if test_good is not None:
                test_bpd = mean_bits_per_dim(model, test_good.to(accelerator.device))
                epoch_metrics["epoch/test_good_bits_per_dim"] = test_bpd
                test_curve[0].append(global_step)
                test_curve[1].append(test_bpd)
            metrics.log(epoch_metrics, step=global_step)
        epoch_complete = not stop or global_step % steps_per_epoch == 0
        if args.checkpointing_steps == "epoch" and epoch_complete:
            save_checkpoint(epoch + 1)
        if stop:
            break
    progress.close()
    metrics.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        final_train_bpd = epoch_curve[1][-1] if epoch_curve[1] else float("nan")
        summary = {
            "flow_type": args.flow_type,
            "parameters": unwrapped.num_parameters(),
            "steps": global_step,
            "epochs": args.num_train_epochs,
            "train_wall_time_s": train_time,
            "steps_per_s": (global_step - (state or {}).get("step", 0)) / train_time if train_time else None,
            "images_per_s": samples_seen / train_time if train_time else None,
            # Without this run's first epoch (kernel compilation, CUDA graph capture, allocator warm-up).
            "steady_images_per_s": (sum(images for _, images in epoch_timings[1:])
                                    / sum(seconds for seconds, _ in epoch_timings[1:])) if len(epoch_timings) > 1 else None,
            "epoch_seconds": [round(seconds, 4) for seconds, _ in epoch_timings],
            "final_train_bits_per_dim": final_train_bpd,
            "test_good_bits_per_dim": test_curve[1][-1] if test_curve[1] else None,
            "mixed_precision": args.mixed_precision,
            "num_processes": accelerator.num_processes,
            "fast_path": {"fused_adam": bool(fused), "optimizer": type(optimizer.optimizer).__name__,
                          **step_runner.describe()},
            "device": device_description(accelerator.device),
            "config": unwrapped.config.to_diff_dict(),
        }
        curves = {"train bits/dim (per step)": step_curve, "train bits/dim (epoch mean)": epoch_curve}
        if test_curve[0]:
            curves["test-good bits/dim (eval)"] = test_curve
        plot_curves(curves, os.path.join(args.output_dir, "nll_curve.png"), title="MAF negative log-likelihood",
                    ylabel="bits / dim")
        unwrapped.save_pretrained(args.output_dir)
        eval_results = []
        if summary["test_good_bits_per_dim"] is not None:
            eval_results.append({"task_type": "unconditional-image-generation", "dataset_type": "mvtec_ad",
                                 "dataset_name": f"MVTec AD {args.category} (test/good)", "metric_type": "bits_per_dim",
                                 "metric_name": "test-good bits/dim", "metric_value": summary["test_good_bits_per_dim"]})
        write_model_card(args.output_dir, model_name=f"{args.flow_type}-{args.category}", body=model_card_body(
            args, unwrapped.config, summary), metadata={
                "library_name": "transformers", "license": "cc-by-nc-sa-4.0", "datasets": ["mvtec_ad"],
                "tags": ["hf-dgm", "normalizing-flow", args.flow_type, "anomaly-detection", args.category],
                "pipeline_tag": "unconditional-image-generation", "eval_results": eval_results})
        write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
        if pusher is not None:
            pusher.push_folder(args.output_dir, commit_message="Final model", ignore_patterns=["checkpoints/*", "logs/*"])
            pusher.wait()
        print(f"Training done: {global_step} steps in {train_time:.1f} s; model, metrics and nll_curve.png in "
              f"{args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
