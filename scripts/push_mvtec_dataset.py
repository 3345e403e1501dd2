# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Convert one local MVTec AD category (or any folder in its layout) to a `datasets.DatasetDict` and push it to a
Hub dataset repo.

    python scripts/push_mvtec_dataset.py --data_dir data/mvtec/capsule --hub_dataset_id <user>/mvtec-capsule

Afterwards `load_dataset("<user>/mvtec-capsule")` (or `--dataset_name <user>/mvtec-capsule` in the scripts)
gives splits train/test with the columns image, label (good/anomaly), defect_type, mask (None where a defective
image has none) and file, exactly as `hf_dgm_training.data.anomaly.load_anomaly_dataset` builds them from the folder.
One category per repo (the default config).
"""

import argparse
from typing import Optional, Sequence

from hf_dgm_training import add_debug_arg, run_main


# The data loading (datasets) is imported where it is used: it takes seconds, which `--help` does not wait for.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial, share-alike, with attribution to Bergmann et "
            "al., CVPR 2019); a pushed copy must keep that licence. Data: MVTec AD's homepage "
            "(hf_dgm_training.data.anomaly.MVTEC_HOMEPAGE)."
        ),
    )
    parser.add_argument(
        "--data_dir",
        required=True,
        help="Local MVTec category folder (holding train/good, test/<defect>, optionally ground_truth/<defect>), or a "
        "folder holding <category>/. With --download, where the archive is unpacked when no data is there.",
    )
    parser.add_argument(
        "--category",
        default="capsule",
        help="MVTec AD category (default: capsule). --download knows MVTec's 15 categories (an unknown one is refused "
        "with their names).",
    )
    parser.add_argument(
        "--hub_dataset_id",
        "--repo_id",
        dest="hub_dataset_id",
        required=True,
        help="Hub dataset repo to push to, as <user or org>/<name>; created when it does not exist.",
    )
    parser.add_argument(
        "--hub_token",
        default=None,
        help="Hub token with write access (default: the HF_TOKEN variable or the `hf auth login` token).",
    )
    parser.add_argument(
        "--private", action="store_true", help="Create the repo as private (an existing repo keeps its visibility)."
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="When --data_dir holds no data for --category, fetch MVTec's official archive for it and unpack it "
        "into --data_dir/<category> first (needs internet).",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="Cache folder for `datasets` (default: the HF datasets cache)."
    )
    add_debug_arg(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_dataset(args: argparse.Namespace):
    """The DatasetDict that gets pushed: `load_anomaly_dataset` on the local category."""
    from hf_dgm_training.data.anomaly import load_anomaly_dataset

    return load_anomaly_dataset(args.data_dir, download=args.download, category=args.category, cache_dir=args.cache_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    dataset = build_dataset(args)
    sizes = ", ".join(f"{split} {len(rows)}" for split, rows in dataset.items())
    print(f"Pushing MVTec AD {args.category} ({sizes} images) to the Hub dataset {args.hub_dataset_id} ...")
    dataset.push_to_hub(
        args.hub_dataset_id,
        private=args.private or None,  # None leaves an existing repo's visibility alone
        token=args.hub_token,
        commit_message=f"MVTec AD {args.category}: train/test with image, label, defect_type, mask, file",
    )
    print(f"Done: load it with load_dataset({args.hub_dataset_id!r}) or --dataset_name {args.hub_dataset_id}.")
    return 0


if __name__ == "__main__":
    run_main(main, exit_status=int)
