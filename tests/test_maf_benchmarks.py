"""The MAF benchmarks run on a CPU at tiny sizes (--smoke) and write the rows and JSON their READMEs describe."""

import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def test_bench_maf_smoke_has_every_optimizer_row_and_both_floors(tmp_path):
    result = run(["benchmarks/bench_maf.py", "--smoke", "--skip_nflows", "--skip_iaf_train",
                  "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_maf.json").read_text())
    measures = {(row["model"], row["measure"]) for row in report["rows"]}
    for name in ("hf-dgm MAF (fused Adam)", "hf-dgm MAF (plain Adam)", "hf-dgm MAF (MaskedAdam)"):
        assert (name, "train step b8 fp32") in measures and (name, "train step b8 bf16") in measures
    assert all(row["ms"] > 0 for row in report["rows"])
    fractions = report["floor_masked_adam"]["fractions"]
    assert 0.4 < fractions["connected"] <= fractions["tiles"]
    assert "MaskedAdam" in result.stdout  # the printed floors
    for batch in (16, 8):
        for dtype in ("fp32", "bf16"):
            for matmul in ("block-sparse", "dense"):
                assert ("hf-dgm MAF (fused Adam)", f"log_prob b{batch} {dtype} {matmul}") in measures
    assert [floor["batch"] for floor in report["floor_log_prob"]] == [16, 8]
    assert all(floor["bytes"] > 0 and floor["gflop"] > 0 for floor in report["floor_log_prob"])


def test_time_maf_log_prob_smoke(tmp_path):
    output = tmp_path / "log_prob.json"
    result = run(["benchmarks/time_maf_log_prob.py", "--smoke", "--skip_nflows", "--output_json", str(output)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    variants = {(row["variant"], row["batch"], row["dtype"]) for row in report["log_prob"]}
    assert {("dense", 8, "bf16"), ("block-sparse", 8, "bf16"), ("block-sparse ieee", 20, "fp32")} <= variants
    assert len(report["layers"]) == 12 and len(report["floor"]) == 2


def test_bench_maf_ddp_smoke_two_processes(tmp_path):
    result = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                  "benchmarks/bench_maf_ddp.py", "--smoke", "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_maf_ddp_2gpu.json").read_text())
    assert report["world_size"] == 2 and [row["optimizer"] for row in report["rows"]] == ["masked_adam", "adam"]
    for row in report["rows"]:
        assert 0 < row["forward_ms"] < row["step_ms"] and row["images_per_s"] > 0


def test_profile_maf_step_smoke(tmp_path):
    result = run(["benchmarks/profile_maf_step.py", "--smoke", "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "profile_maf_step.json").is_file()


def test_detector_calibration_study_keeps_each_seeds_folds_apart():
    """With folds, each seed's out-of-fold goods give that seed's threshold and ranks: another seed's models, which
    scored the same files, must not overwrite them or set the realised false-positive rates."""
    import types

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from detector_calibration_study import summaries_of

    test = types.SimpleNamespace(files=["test/good/0.png", "test/good/1.png", "test/crack/0.png", "test/crack/1.png"],
                                 labels=torch.tensor([0, 0, 1, 1]))
    records = []
    for seed, offset in ((0, 0.0), (1, 100.0)):  # seed 1's models score everything 100 higher
        for fold, files in enumerate((["a.png", "b.png"], ["c.png", "d.png"])):
            goods = [offset + 1 + 2 * fold, offset + 2 + 2 * fold]
            records.append(dict(seed=seed, fold=fold, validation_files=files, validation=goods,
                                validation_bank=goods, threshold=max(goods), test=[offset + 1, offset + 2,
                                                                                   offset + 9, offset + 10],
                                test_bank=[offset + 1, offset + 2, offset + 9, offset + 10]))
    args = types.SimpleNamespace(folds=2, target_fpr=0.25, watch=["test/crack/0.png"])
    summaries = summaries_of(args, "v", records, test)
    assert [row["seeds"] for row in summaries] == [[0], [1]]
    for row, offset in zip(summaries, (0.0, 100.0)):
        assert row["cross_fitted"]["num_goods"] == 4 and offset < row["cross_fitted"]["threshold"] <= offset + 4
        assert row["cross_fitted"]["caught"] == 1.0
        assert row["watch"]["test/crack/0.png"]["goods_above_cross_fitted"] == 0
        # fold 0's threshold passes all of fold 1's goods, fold 1's none of fold 0's (min, mean, max)
        assert tuple(row["own_threshold"]["realised_fpr"]) == (0.0, 0.5, 1.0)
    args.folds = 0  # each run its own split: one summary over every seed
    assert [row["seeds"] for row in summaries_of(args, "v", records, test)] == [[0, 1]]


def test_detector_calibration_study_counts_maps_that_peak_on_the_defect():
    """Each run's defective test images whose map peaks on the marked defect, averaged over the runs, and for a
    watched image the runs in which it does; runs recorded without peaks give no such rows."""
    import types

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from detector_calibration_study import summaries_of

    test = types.SimpleNamespace(files=["test/good/0.png", "test/crack/0.png", "test/crack/1.png", "test/poke/0.png"],
                                 labels=torch.tensor([0, 1, 1, 1]))
    records = [dict(seed=0, fold=fold, validation_files=["a.png"], validation=[1.0], validation_bank=[1.0],
                    threshold=1.0, test=[0.0, 5.0, 5.0, 5.0], test_bank=[0.0, 5.0, 5.0, 5.0],
                    test_peaks=[None, True, fold == 0, None],  # poke/0 has no mask
                    test_peaks_bank=[None, False, False, None]) for fold in range(2)]
    args = types.SimpleNamespace(folds=0, target_fpr=0.25, watch=["test/crack/1.png"])
    row, = summaries_of(args, "v", records, test)
    assert row["peak_on_defect"] == {"on_defect": 1.5, "images": 2}
    assert row["peak_on_defect_bank"] == {"on_defect": 0, "images": 2}
    assert row["watch"]["test/crack/1.png"]["peak_on_defect_runs"] == 1
    assert row["watch"]["test/crack/1.png_bank"]["peak_on_defect_runs"] == 0
    for record in records:
        del record["test_peaks"], record["test_peaks_bank"]
    row, = summaries_of(args, "v", records, test)
    assert "peak_on_defect" not in row and "peak_on_defect_runs" not in row["watch"]["test/crack/1.png"]


def test_detector_calibration_study_scores_every_good_out_of_fold_and_deletes_each_detector(tmp_path):
    """The study end to end with a tiny random detector: two folds score every training good once, the JSON holds
    every run and a summary with the flow and both peers on its features (memory bank, per-location Gaussian), and
    each fold's detector is deleted once scored unless --keep_checkpoints."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from synthetic_data import make_mvtec_category

    data = make_mvtec_category(str(tmp_path / "capsule"), size=32, num_train=8, num_test_good=2,
                               defects=(("crack", 2),))
    tiny = ["--image_size", "32", "--backbone_padding", "0", "--use_pretrained_backbone", "false", "--hidden_sizes",
            "16", "--num_blocks", "1", "--num_train_epochs", "1"]
    for keep in (False, True):
        output = tmp_path / f"study_keep_{keep}"
        result = run(["benchmarks/detector_calibration_study.py", "--data_dir", str(data), "--output_dir", str(output),
                      "--folds", "2", "--seeds", "0", "--variants", json.dumps({"tiny": tiny}),
                      "--watch", "test/crack/000.png", *(["--keep_checkpoints"] if keep else [])],
                     env={**os.environ, "TQDM_DISABLE": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        study = json.loads((output / "calibration_study.json").read_text())
        records = study["results"]["tiny"]["records"]
        assert len(records) == 2
        scored = [file for record in records for file in record["validation_files"]]
        assert sorted(scored) == sorted(f"train/good/{i:03d}.png" for i in range(8))  # each good once
        summary, = study["summaries"]
        assert summary["cross_fitted"]["num_goods"] == 8 and "test/crack/000.png" in summary["watch"]
        num_test = len(study["results"]["tiny"]["test_files"])
        for kind in ("", "_bank", "_gaussian"):
            assert all(len(record["test" + kind]) == num_test for record in records)
            assert all(0 <= record["pixel_auroc" + kind] <= 1 for record in records)
            assert 0 <= summary["auroc" + kind][0] <= 1 and 0 <= summary["pixel_auroc" + kind][0] <= 1
            assert "test/crack/000.png" + kind in summary["watch"]
        kept = sorted(os.listdir(output / "runs"))
        assert len(kept) == (2 if keep else 0)
        if keep:
            assert all((output / "runs" / run_dir / "config.json").is_file() for run_dir in kept)


def test_study_peers_match_their_definitions():
    """The studies' peers on (N, D, h, w) feature maps: the memory bank is the distance to the nearest training vector
    at any location, the per-location Gaussian the Mahalanobis distance under that location's mean and covariance
    (unbiased, plus the ridge); both checked against a direct computation, the bank also one query at a time."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from feature_detector_study import gaussian_maps, memory_bank_maps

    generator = torch.Generator().manual_seed(0)
    train = torch.randn(12, 3, 2, 2, generator=generator, dtype=torch.float64)
    test = torch.randn(4, 3, 2, 2, generator=generator, dtype=torch.float64)
    bank = train.permute(0, 2, 3, 1).reshape(-1, 3)
    for n in range(4):
        for i in range(2):
            for j in range(2):
                nearest = (bank - test[n, :, i, j]).norm(dim=1).min()
                assert torch.isclose(memory_bank_maps(train, test)[n, i, j].double(), nearest, rtol=1e-5)
                location = train[:, :, i, j]
                covariance = torch.cov(location.T) + 0.01 * torch.eye(3, dtype=torch.float64)
                centred = test[n, :, i, j] - location.mean(dim=0)
                mahalanobis = (centred @ torch.linalg.inv(covariance) @ centred).sqrt()
                assert torch.isclose(gaussian_maps(train, test)[n, i, j].double(), mahalanobis, rtol=1e-5)
    assert torch.allclose(memory_bank_maps(train, test, max_distances=50), memory_bank_maps(train, test))  # a query


def test_rotated_category_turns_each_image_and_its_mask_alike(tmp_path):
    """The rotated copy has the same files; each defect's bright square stays under its mask (image and mask turned by
    the same angle), masks stay binary, images are turned (not copied), a second run writes the same pixels, and an
    existing destination is refused with one line."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from synthetic_data import make_mvtec_category

    source = make_mvtec_category(str(tmp_path / "category"), size=64, num_train=3, num_test_good=1,
                                 defects=(("crack", 4),))

    def files(root):
        return sorted(os.path.relpath(os.path.join(folder, name), root)
                      for folder, _, names in os.walk(root) for name in names)

    copies = []
    for name in ("rotated", "again"):
        result = run(["benchmarks/rotated_category.py", source, str(tmp_path / name)])
        assert result.returncode == 0, result.stderr[-2000:]
        copies.append(str(tmp_path / name))
    assert files(copies[0]) == files(source)
    for index in range(4):
        image = np.asarray(Image.open(os.path.join(copies[0], "test", "crack", f"{index:03d}.png")).convert("L"))
        mask = np.asarray(Image.open(os.path.join(copies[0], "ground_truth", "crack", f"{index:03d}_mask.png")))
        original = np.asarray(Image.open(os.path.join(source, "test", "crack", f"{index:03d}.png")).convert("L"))
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).sum() > 50
        assert image[mask > 0].mean() > 230 > 140 > image[mask == 0].mean()
        assert not np.array_equal(image, original)
    for relative in files(source):
        first, second = (np.asarray(Image.open(os.path.join(root, relative))) for root in copies)
        assert np.array_equal(first, second)
    result = run(["benchmarks/rotated_category.py", source, copies[0]])
    assert result.returncode == 2 and "exists already" in result.stderr.strip().splitlines()[-1]
