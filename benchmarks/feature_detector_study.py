"""The feature-space detectors side by side on identical features: the MAF (FeatureMAFModel's flow), a memory bank
(nearest training feature, PatchCore without coreset) and a per-location Gaussian (PaDiM), for several backbone stage
sets and flow settings, on one anomaly data folder.

    python benchmarks/feature_detector_study.py --data_dir data/mvtec_capsule --output_dir runs/feature_study

For every feature variant (--variants: backbone stages, image size) the features of train/good (less a validation
split, as train_maf.py holds out), of the validation images and of the test images are extracted once with the
frozen pretrained EfficientNet-Lite0; each scorer then gives per-location scores, upsampled to the image, from which
the image scores (max of the Gaussian-smoothed map, and the mean of its top 1 %) and the pixel AUROC are measured.
Flows train with Adam on random batches of training vectors (--flow_steps, --flow_batch_size, --seeds). Writes
feature_study.json to --output_dir and prints a table.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from modeling_maf import FeatureMAFConfig, FeatureMAFModel
from modeling_maf.anomaly_scores import gaussian_smooth, top_k_mean
from modeling_maf.configuration_efficientnet_lite import EfficientNetLiteConfig
from modeling_maf.modeling_efficientnet_lite import EfficientNetLiteBackbone, efficientnet_lite0_weights_file


VARIANTS = {
    "s3+s5@256": (["stage3", "stage5"], 256),
    "s3+s5@224": (["stage3", "stage5"], 224),
    "s2+s3+s5@256": (["stage2", "stage3", "stage5"], 256),
    "s3+s4+s5@256": (["stage3", "stage4", "stage5"], 256),
    "s3+s5@320": (["stage3", "stage5"], 320),
    "s4+s6@320": (["stage4", "stage6"], 320),
    "s4+s6@256": (["stage4", "stage6"], 256),
    "s4+s5+s6@320": (["stage4", "stage5", "stage6"], 320),
    "s3+s4+s5+s6@320": (["stage3", "stage4", "stage5", "stage6"], 320),
    "s4+s5@320": (["stage4", "stage5"], 320),
    "s4+s5@256": (["stage4", "stage5"], 256),
}
# A flow run: its settings, over which seeds. The first entry of every variant is its reference flow.
# `whiten`: the per-location Gaussian whitening under the flow (FeatureMAFConfig.location_whitening), the flow then
# trained on out-of-fold whitened vectors.
SPEC = dict(steps=2000, batch=4096, blocks=6, hidden=512, normalization="batch_norm", position=True, lr=1e-3,
            whiten=False)
CPU = dict(SPEC, steps=300, batch=1024, blocks=4, hidden=128)
ROUND2 = dict(SPEC, steps=3000, normalization="none", evaluate_at=(250, 500, 1000, 2000, 3000))
ROUND3 = dict(ROUND2, steps=1000, batch=1600, whiten=True, evaluate_at=(0, 100, 250, 500, 1000))
CPU3 = dict(ROUND3, steps=600, batch=400, blocks=4, hidden=128, evaluate_at=(0, 150, 300, 600))
PLANS = {
    "round3": {
        "s4+s5@320": [(ROUND3, [0, 1, 2]), (CPU3, [0, 1, 2]),
                      (dict(ROUND3, hidden=256, blocks=4, batch=800), [0, 1, 2]),
                      (dict(ROUND3, whiten=False), [0]), (dict(ROUND3, position=False), [0])],
        "s4+s5@256": [(ROUND3, [0])],
        "s3+s5@256": [(ROUND3, [0])],
        "s4+s5+s6@320": [(ROUND3, [0])],
    },
    "round2": {
        "s4+s6@320": [(ROUND2, [0]), (dict(ROUND2, normalization="batch_norm"), [0]),
                      (dict(ROUND2, hidden=256, blocks=4), [0]), (dict(ROUND2, noise=0.1), [0]),
                      (dict(ROUND2, position=False), [0])],
        "s3+s5@320": [(ROUND2, [0]), (dict(ROUND2, noise=0.1), [0])],
        "s4+s5+s6@320": [(ROUND2, [0])],
        "s4+s6@256": [(ROUND2, [0]), (dict(CPU, steps=600, evaluate_at=(150, 300, 600)), [0]),
                      (dict(CPU, steps=600, normalization="none", evaluate_at=(150, 300, 600)), [0])],
        "s3+s5@256": [(ROUND2, [0]), (dict(CPU, steps=600, normalization="none", evaluate_at=(150, 300, 600)), [0])],
        "s3+s4+s5+s6@320": [(ROUND2, [0])],
    },
    "full": {
        "s3+s5@256": [(SPEC, [0, 1, 2]), (dict(SPEC, steps=4000), [0]), (dict(SPEC, blocks=8), [0]),
                      (dict(SPEC, hidden=1024), [0]), (dict(SPEC, normalization="none"), [0]),
                      (dict(SPEC, position=False), [0]), (CPU, [0, 1, 2]), (dict(CPU, steps=600), [0])],
        "s3+s5@224": [(CPU, [0]), (SPEC, [0])],
        "s2+s3+s5@256": [(SPEC, [0])],
        "s3+s4+s5@256": [(SPEC, [0])],
        "s3+s5@320": [(SPEC, [0])],
        "s4+s6@320": [(SPEC, [0])],
    },
}


KEYS = ("variant", "scorer", "aggregation", "steps", "batch", "blocks", "hidden", "normalization", "position", "noise",
        "whiten")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--plan", default="full", choices=sorted(PLANS), help="Which variants and flow runs.")
    parser.add_argument("--smoothing_sigma", type=float, default=4.0, help="At 256 pixels; scaled with the size.")
    parser.add_argument("--validation_split_percentage", type=float, default=10)
    parser.add_argument("--budget_s", type=float, default=480, help="Stop starting new runs after this many seconds.")
    return parser.parse_args(argv)


def load_data(data_dir, image_size, percentage):
    from hf_dgm_training.data.anomaly import load_anomaly_dataset, load_split_as_tensors, split_validation

    dataset = load_anomaly_dataset(data_dir)
    train, validation = split_validation(dataset["train"], percentage, seed=0)
    tensors = [load_split_as_tensors(split, image_size, 3) for split in (train, validation, dataset["test"])]
    return tensors, list(dataset["test"]["defect_type"])


def image_and_pixel_scores(location_maps, image_size, sigma):
    """Per-location scores (N, h, w) -> (max, top-1 % mean) image scores and pixel maps (N, S, S)."""
    maps = F.interpolate(location_maps[:, None].float(), size=(image_size, image_size), mode="bilinear",
                         align_corners=False)[:, 0]
    smooth = gaussian_smooth(maps, sigma)
    return smooth.flatten(1).amax(dim=1), top_k_mean(smooth, 0.01), smooth


def memory_bank_maps(train, test, max_distances=2**27):
    """Distance of every test vector to its nearest training vector (any location): (N, h, w). Queries go a chunk at
    a time, so that at most `max_distances` distances (half a GB of float32) exist at once."""
    bank = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
    queries = test.permute(0, 2, 3, 1).reshape(-1, test.shape[1])
    bank_sq = bank.square().sum(dim=1)
    nearest = []
    for part in queries.split(max(1, max_distances // len(bank))):
        distances = part.square().sum(dim=1, keepdim=True) - 2 * part @ bank.T + bank_sq
        nearest.append(distances.amin(dim=1).clamp_min(0).sqrt())
    return torch.cat(nearest).view(test.shape[0], *test.shape[2:])


def gaussian_maps(train, test, shrinkage=0.01):
    """Mahalanobis distance of every test vector to the Gaussian of its location's training vectors: (N, h, w)."""
    n, d, h, w = train.shape
    x = train.permute(2, 3, 0, 1).reshape(h * w, n, d).double()
    mean = x.mean(dim=1, keepdim=True)
    centred = x - mean
    covariance = centred.transpose(1, 2) @ centred / (n - 1) + shrinkage * torch.eye(d, device=x.device, dtype=x.dtype)
    lower = torch.linalg.cholesky(covariance)
    y = test.permute(2, 3, 0, 1).reshape(h * w, test.shape[0], d).double() - mean
    whitened = torch.linalg.solve_triangular(lower, y.transpose(1, 2), upper=False)
    distance = whitened.square().sum(dim=1).sqrt()
    return distance.T.reshape(test.shape[0], h, w).float()


def train_flow(model, features, steps, batch_size, learning_rate, seed, noise=0.0, evaluate_at=(), evaluate=None):
    """Adam at a constant learning rate on random batches of the training vectors (`model.out_of_fold_vectors`, as
    train_maf.py trains), the step replayed as a CUDA graph on a GPU (hf_dgm_training.CUDAGraphStep); `evaluate(step)`
    runs after the steps in `evaluate_at` (0: before the first, the untrained flow: with `whiten`, the per-location
    Gaussian alone). `noise`: the standard deviation of Gaussian noise added to the training vectors. Returns
    (seconds, last loss)."""
    from hf_dgm_training import CUDAGraphStep

    torch.manual_seed(seed)
    vectors, locations = model.out_of_fold_vectors(features)
    on_cuda = vectors.is_cuda
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                 capturable=on_cuda)
    model.train()

    def step(index):
        batch = vectors[index]
        if noise:
            batch = batch + noise * torch.randn_like(batch)
        loss = -model.vector_log_prob(batch, locations[index]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    runner = CUDAGraphStep(step, enabled=on_cuda, reset_fn=lambda: optimizer.zero_grad(set_to_none=False))
    generator = torch.Generator(device=vectors.device).manual_seed(seed)
    torch.cuda.synchronize() if on_cuda else None
    start, evaluated = time.perf_counter(), 0.0
    if 0 in evaluate_at and evaluate is not None:
        model.eval()
        evaluate(0, float("nan"))
        model.train()
        evaluated = time.perf_counter() - start
    for number in range(1, steps + 1):
        index = torch.randint(0, vectors.shape[0], (batch_size,), device=vectors.device, generator=generator)
        loss = runner(index)
        if number in evaluate_at and evaluate is not None:
            torch.cuda.synchronize() if on_cuda else None
            paused = time.perf_counter()
            model.eval()
            evaluate(number, float(loss))
            model.train()
            evaluated += time.perf_counter() - paused
    torch.cuda.synchronize() if on_cuda else None
    model.eval()
    return time.perf_counter() - start - evaluated, float(loss)


@torch.no_grad()
def flow_maps(model, features, chunk=64):
    return torch.cat([model(features=part).nll_map for part in features.split(chunk)])


def metrics(image_scores, pixel_maps, labels, masks, has_masks):
    from sklearn.metrics import roc_auc_score

    result = {"image_auroc": float(roc_auc_score(labels, image_scores.cpu().numpy()))}
    if has_masks.any():
        keep = has_masks.cpu()
        maps = pixel_maps.cpu()[keep].numpy().reshape(-1)
        truth = (masks.cpu()[keep].numpy().reshape(-1) > 0)
        result["pixel_auroc"] = float(roc_auc_score(truth, maps))
    return result


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    weights = efficientnet_lite0_weights_file()
    rows = []
    for variant in PLANS[args.plan]:
        stages, image_size = VARIANTS[variant]
        (train, validation, test), defects = load_data(args.data_dir, image_size, args.validation_split_percentage)
        labels = (test.labels.numpy() != 0).astype(int) if hasattr(test, "labels") else None
        sigma = args.smoothing_sigma * image_size / 256
        base_config = dict(backbone_config=EfficientNetLiteConfig(out_features=stages), image_size=image_size)
        extractor = FeatureMAFModel(FeatureMAFConfig(**base_config, num_blocks=1))
        extractor.backbone = EfficientNetLiteBackbone.from_efficientnet_pytorch(
            weights, config=extractor.config.backbone_config)
        extractor.to(device).eval()
        t0 = time.perf_counter()
        feats = {}
        for name, split in (("train", train), ("validation", validation), ("test", test)):
            feats[name] = torch.cat([extractor.extract_features(part.to(device))
                                     for part in split.pixel_values.split(32)])
        torch.cuda.synchronize() if device.type == "cuda" else None
        extract_s = time.perf_counter() - t0
        n_images = sum(len(f) for f in feats.values())
        print(f"[{variant}] features {tuple(feats['train'].shape)} of {n_images} images in {extract_s:.2f} s",
              flush=True)
        masks, has_masks = test.masks, test.has_masks
        for scorer, maps in (("memory_bank", memory_bank_maps(feats["train"], feats["test"])),
                             ("gaussian", gaussian_maps(feats["train"], feats["test"]))):
            top, topk, pixel = image_and_pixel_scores(maps, image_size, sigma)
            for agg, scores in (("max", top), ("top1%", topk)):
                row = {"variant": variant, "scorer": scorer, "aggregation": agg, **metrics(scores, pixel, labels,
                                                                                             masks, has_masks)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        for spec, seeds in PLANS[args.plan][variant]:
            for seed in seeds:
                if time.perf_counter() - started > args.budget_s:
                    print(f"budget reached: skipping {variant} {spec} seed {seed}", flush=True)
                    continue
                config = FeatureMAFConfig(**base_config, num_blocks=spec["blocks"],
                                          hidden_sizes=[spec["hidden"], spec["hidden"]],
                                          normalization=spec["normalization"], condition_on_position=spec["position"],
                                          location_whitening=spec["whiten"])
                model = FeatureMAFModel(config)
                model.backbone = extractor.backbone
                model.to(device)
                model.fit_feature_statistics(feats["train"])
                validation_vectors = model.vectors(feats["validation"])

                def evaluate(step, loss, spec=spec, seed=seed, model=model):
                    with torch.no_grad():
                        validation_nll = -float(model.vector_log_prob(*validation_vectors).mean())
                        maps = flow_maps(model, feats["test"])
                    top, topk, pixel = image_and_pixel_scores(maps, image_size, sigma)
                    for agg, scores in (("max", top), ("top1%", topk)):
                        row = {"variant": variant, "scorer": "flow", "aggregation": agg,
                               **{k: v for k, v in spec.items() if k != "evaluate_at"}, "steps": step, "seed": seed,
                               "train_loss": loss, "validation_nll": validation_nll,
                               **metrics(scores, pixel, labels, masks, has_masks)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)

                evaluate_at = spec.get("evaluate_at", (spec["steps"],))
                seconds, last_loss = train_flow(model, feats["train"], spec["steps"], spec["batch"], spec["lr"], seed,
                                                noise=spec.get("noise", 0.0), evaluate_at=evaluate_at,
                                                evaluate=evaluate)
                t1 = time.perf_counter()
                flow_maps(model, feats["test"])
                torch.cuda.synchronize() if device.type == "cuda" else None
                score_s = time.perf_counter() - t1
                timing = {"variant": variant, "timing": True, **{k: v for k, v in spec.items() if k != "evaluate_at"},
                          "seed": seed, "train_s": round(seconds, 2), "flow_images_per_s": len(feats["test"]) / score_s,
                          "extract_images_per_s": n_images / extract_s}
                rows.append(timing)
                print(json.dumps(timing), flush=True)
    with open(os.path.join(args.output_dir, "feature_study.json"), "w") as file:
        json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows,
                   "args": vars(args)}, file, indent=1)
    groups = {}
    for row in rows:
        if row.get("timing"):
            continue
        key = tuple((k, row.get(k)) for k in KEYS)
        groups.setdefault(key, []).append(row)
    print("\n" + " | ".join(KEYS) + " | image AUROC | pixel AUROC | validation NLL | n")
    for key, group in groups.items():
        values = dict(key)
        image = [row["image_auroc"] for row in group]
        pixel = [row.get("pixel_auroc", float("nan")) for row in group]
        spread = statistics.stdev(image) if len(image) > 1 else 0.0
        train_s = statistics.mean(row.get("validation_nll", 0.0) for row in group)
        print(" | ".join(str(values[k]) for k in KEYS)
              + f" | {statistics.mean(image):.4f} ± {spread:.4f} | {statistics.mean(pixel):.4f} | {train_s:.1f} | "
              f"{len(group)}")


if __name__ == "__main__":
    main()
