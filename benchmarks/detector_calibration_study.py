"""How the feature detector's calibrated threshold behaves, and where chosen test images rank among good images.

    python benchmarks/detector_calibration_study.py --data_dir data/mvtec_capsule --output_dir runs/calibration_study \
        --folds 10 --seeds 0 --watch test/crack/000.png

Every run trains the detector with `scripts/train_maf.py` (in this process, its defaults plus a variant's flags) and
scores the validation and test images with its default score (`map-max`), and with its two simple peers on the same
standardised features through the same upsampling, smoothing and max: a memory bank (the nearest training vector,
PatchCore without coreset; `_bank` in the JSON) and a per-location Gaussian (PaDiM: the Mahalanobis distance to the
Gaussian of the location's training vectors; `_gaussian`).

- `--folds 0`: one run per seed, each with train_maf.py's own validation split (10 %, drawn by the seed).
- `--folds K` (K >= 2): train/good is cut into K folds (drawn by the seed); run k holds out fold k as its validation
  split. Every good training image is then scored once by a detector that did not train on it (out of fold), which
  gives the threshold at `--target_fpr` over all of them (cross-fitted), the false-positive rate each run's own
  threshold has on the other folds' images, and each run's decisions at both thresholds.

For each variant (and with folds, each seed) the table gives the image and pixel AUROC of each scorer, the defects
caught and good test images flagged at the thresholds, how many defective test images' maps peak on their marked
defect (a score read off a blemish elsewhere ranks the image without finding its defect), and, for every `--watch`
test image, how many good images score above it and in how many runs its map peaks on its defect. Writes
calibration_study.json (every score) to --output_dir; each run's detector is deleted once scored unless
`--keep_checkpoints`. Needs the `features` extra; minutes on one GPU.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "scripts"), HERE]  # train_maf.py; feature_detector_study.py's scorers
SCORERS = ("", "_bank", "_gaussian")  # the JSON keys' suffixes: the flow, the memory bank, the per-location Gaussian


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--variants", default='{"default": []}',
                        help='JSON: name -> extra train_maf.py flags, e.g. \'{"448": ["--image_size", "448"]}\'.')
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--folds", type=int, default=0, help="0: train_maf.py's validation split; K >= 2: K folds.")
    parser.add_argument("--target_fpr", type=float, default=0.05)
    parser.add_argument("--watch", nargs="*", default=[], help="Test files (relative to --data_dir) to rank.")
    parser.add_argument("--keep_checkpoints", action="store_true",
                        help="Keep every run's detector under --output_dir/runs (by default each is deleted once "
                             "scored: each carries its frozen backbone, and a ten-fold study trains ten per seed).")
    args = parser.parse_args(argv)
    if args.folds == 1 or args.folds < 0:
        parser.error("--folds must be 0 or at least 2.")
    return args


def standardised(model, features):
    """The detector's per-channel standardisation of feature maps (B, D, h, w), in the same layout."""
    return model._standardise(features).transpose(1, 2).reshape(features.shape)


def threshold_at(good_scores, target_fpr):
    """The project's threshold (`anomaly_scores.threshold_at_fpr`) of a list of good scores."""
    from modeling_maf.anomaly_scores import threshold_at_fpr

    return threshold_at_fpr(torch.as_tensor(np.asarray(good_scores, dtype=np.float64)), target_fpr)[0]


def run_one(args, flags, seed, validation_files, dataset, device, test_cache):
    import hf_dgm_training.data.anomaly as anomaly_data
    import train_maf
    from feature_detector_study import gaussian_maps, memory_bank_maps
    from hf_dgm_training.data.anomaly import load_split_as_tensors
    from hf_dgm_training.metrics.evaluation import peak_on_defect, pixel_metrics
    from modeling_maf import FeatureMAFModel, MAFImageProcessor
    from modeling_maf.anomaly_scores import NLLMaps

    output_dir = os.path.join(args.output_dir, "runs", f"{time.time_ns()}")
    argv = ["--flow_type", "feature_maf", "--data_dir", args.data_dir, "--output_dir", output_dir, "--seed",
            str(seed), "--report_to", "none", "--target_fpr", str(args.target_fpr), *flags]
    original_split = anomaly_data.split_validation
    if validation_files is not None:  # train_maf.load_data imports split_validation from this module when it runs
        anomaly_data.split_validation = lambda train, *_, **__: original_split(train, validation_files=validation_files)
    try:
        start = time.perf_counter()
        train_maf.main(argv)
        train_s = time.perf_counter() - start
        _, train, validation, _ = train_maf.load_data(train_maf.parse_args(argv))
    finally:
        anomaly_data.split_validation = original_split
    model = FeatureMAFModel.from_pretrained(output_dir).to(device).eval()
    size = model.config.image_size
    if size not in test_cache:
        test_cache[size] = load_split_as_tensors(dataset["test"],
                                                 image_processor=MAFImageProcessor(size=size, num_channels=3))
    test = test_cache[size]

    def features(pixel_values):
        return torch.cat([model.extract_features(chunk.to(device)) for chunk in pixel_values.split(32)])

    def peaks(maps):
        found = peak_on_defect(maps.cpu().numpy(), test.masks.numpy(), test.has_masks.numpy(), test.labels.numpy())
        return [None if peak is None else peak["peak_on_defect"] for peak in found]

    record = dict(seed=seed, train_s=train_s, validation_files=list(validation.files),
                  threshold=float(model.anomaly_threshold()))
    with torch.no_grad():  # every split's features extracted once; the peers fitted once, read on both splits
        train_features = standardised(model, features(train.pixel_values))
        splits = {"test": features(test.pixel_values), "validation": features(validation.pixel_values)}
        both = standardised(model, torch.cat(list(splits.values())))
        peer_maps = {"_bank": memory_bank_maps(train_features, both), "_gaussian": gaussian_maps(train_features, both)}
        start = 0
        for name, split_features in splits.items():
            grid_maps = {"": torch.cat([model(features=chunk).nll_map for chunk in split_features.split(32)]),
                         **{kind: maps[start:start + len(split_features)] for kind, maps in peer_maps.items()}}
            start += len(split_features)
            for kind in SCORERS:  # each through the flow's upsampling, smoothing and max; the flow's own default score
                maps, scores = model.score_nll_maps(NLLMaps(model.grid_maps_to_pixels(grid_maps[kind]),
                                                            grid_maps[kind]), None if kind == "" else "map-max")
                record[name + kind] = scores.cpu().tolist()
                if name == "test":
                    record["test_peaks" + kind] = peaks(maps)
                    record["pixel_auroc" + kind] = pixel_metrics(
                        maps.cpu().numpy(), test.masks.numpy(), test.has_masks.numpy())["pixel_auroc"]
    if not args.keep_checkpoints:
        shutil.rmtree(output_dir)
    return record, test


def summaries_of(args, variant, records, test):
    """One summary per seed with --folds (a seed's folds score every good image once: their thresholds and ranks
    must not mix with another seed's models), else one over every seed's run."""
    if not args.folds:
        return [summarise(args, variant, records, test)]
    seeds = sorted({record["seed"] for record in records})
    return [summarise(args, variant, [record for record in records if record["seed"] == seed], test)
            for seed in seeds]


def summarise(args, variant, records, test):
    from hf_dgm_training.metrics.anomaly_detection.ranking import roc_auc

    labels = test.labels.numpy()
    rows = {"variant": variant, "seeds": sorted({record["seed"] for record in records}), "runs": len(records)}
    for kind in (kind for kind in SCORERS if "test" + kind in records[0]):  # older JSON: no Gaussian
        scores = np.array([record["test" + kind] for record in records])
        aurocs = [roc_auc(row, labels) for row in scores]
        rows[f"auroc{kind}"] = (statistics.mean(aurocs), statistics.pstdev(aurocs))
        pixel = [record.get("pixel_auroc" + kind) for record in records]
        if all(value is not None for value in pixel):  # None: no masks, or recorded before pixel AUROCs were
            rows[f"pixel_auroc{kind}"] = (statistics.mean(pixel), statistics.pstdev(pixel))
        goods = {file: score for record in records
                 for file, score in zip(record["validation_files"], record["validation" + kind])}
        thresholds = ([record["threshold"] for record in records] if kind == "" else
                      [threshold_at(record["validation" + kind], args.target_fpr) for record in records])
        own = [(float((row[labels == 1] > t).mean()), int((row[labels == 0] > t).sum())) for row, t in
               zip(scores, thresholds)]
        peaks = [record.get("test_peaks" + kind) for record in records]  # None: recorded before peaks were
        has_peaks = all(peak is not None for peak in peaks)
        if has_peaks:
            rows[f"peak_on_defect{kind}"] = dict(
                on_defect=statistics.mean(sum(bool(on) for on in row) for row in peaks),
                images=sum(on is not None for on in peaks[0]))
        rows[f"own_threshold{kind}"] = dict(min=min(thresholds), max=max(thresholds),
                                           caught=statistics.mean(c for c, _ in own),
                                           goods_flagged=statistics.mean(f for _, f in own))
        if args.folds:
            good_scores = np.array(list(goods.values()))
            cross_fitted = threshold_at(good_scores, args.target_fpr)
            realised = [float(np.mean(np.concatenate([other["validation" + kind] for other in records
                                                      if other is not record]) > t))
                        for record, t in zip(records, thresholds)]
            rows[f"own_threshold{kind}"]["realised_fpr"] = (min(realised), statistics.mean(realised), max(realised))
            rows[f"cross_fitted{kind}"] = dict(
                threshold=cross_fitted, num_goods=len(good_scores),
                caught=float((scores[:, labels == 1] > cross_fitted).mean()),
                goods_flagged=float((scores[:, labels == 0] > cross_fitted).sum(axis=1).mean()),
                top_goods=[file for file, _ in sorted(goods.items(), key=lambda item: -item[1])[:10]])
        for file in args.watch:
            index = test.files.index(file)
            rows.setdefault("watch", {})[file + kind] = dict(
                score=statistics.mean(scores[:, index]),
                caught_own=sum(int(row[index] > t) for row, t in zip(scores, thresholds)),
                **({"peak_on_defect_runs": sum(row[index] is True for row in peaks)} if has_peaks else {}),
                goods_above=statistics.mean(
                    float(np.sum(np.concatenate([record["validation" + kind], row[labels == 0]]) > row[index]))
                    for record, row in zip(records, scores)),
                **({"goods_above_cross_fitted": float(np.sum(np.array(list(goods.values())) > scores[:, index].mean())),
                    "caught_cross_fitted": int(np.sum(scores[:, index] > rows[f"cross_fitted{kind}"]["threshold"]))}
                   if args.folds else {}))
    return rows


def main(argv=None):
    args = parse_args(argv)
    from hf_dgm_training.data.anomaly import load_anomaly_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = load_anomaly_dataset(args.data_dir)
    train_files = sorted(dataset["train"]["file"])
    missing = [file for file in args.watch if file not in dataset["test"]["file"]]
    if missing:
        raise SystemExit(f"--watch: not test files of {args.data_dir}: {', '.join(missing)}")
    os.makedirs(args.output_dir, exist_ok=True)
    test_cache, results, summaries = {}, {}, []
    for variant, flags in json.loads(args.variants).items():
        records, test = [], None
        for seed in (int(seed) for seed in args.seeds.split(",")):
            folds = [None]
            if args.folds:
                order = np.random.default_rng(1000 + seed).permutation(len(train_files))
                folds = [[train_files[i] for i in order[k::args.folds]] for k in range(args.folds)]
            for fold, validation_files in enumerate(folds):
                record, test = run_one(args, flags, seed, validation_files, dataset, device, test_cache)
                records.append(dict(record, fold=fold))
                print(f"{variant} seed {seed} fold {fold}: threshold {record['threshold']:.1f}, "
                      f"{record['train_s']:.1f} s", flush=True)
                results[variant] = dict(flags=flags, records=records, test_files=list(test.files),
                                        test_labels=test.labels.tolist())
                write_json(args, results, summaries)  # every run kept, should a later one not finish
        summaries.extend(summaries_of(args, variant, records, test))
        write_json(args, results, summaries)
    print(json.dumps(summaries, indent=1))


def write_json(args, results, summaries):
    path = os.path.join(args.output_dir, "calibration_study.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(args=vars(args), results=results, summaries=summaries), f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
