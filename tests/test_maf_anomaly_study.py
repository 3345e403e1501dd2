"""benchmarks/maf_anomaly_study.py at smoke size on a CPU: two tiny models (one records its validation files, one
gives its seed), every score, mean ± std over the models."""

import json
import os
import subprocess
import sys

from modeling_maf.anomaly_scores import ANOMALY_SCORES
from synthetic_data import make_mvtec_category
from tiny_models import save_tiny_maf


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_model(path, seed, train_results):
    save_tiny_maf(path, seed=seed)
    (path / "train_results.json").write_text(json.dumps(train_results))


def test_anomaly_study_smoke(tmp_path):
    data = make_mvtec_category(str(tmp_path / "data"), num_train=12, num_test_good=3,
                               defects=(("crack", 2), ("poke", 2)), masks={"crack"})
    recorded = [f"train/good/{i:03d}.png" for i in (1, 4, 7)]
    save_model(tmp_path / "s0", 0, {"validation_files": recorded})
    save_model(tmp_path / "s1", 1, {"seed": 1})
    result = subprocess.run(
        [sys.executable, "benchmarks/maf_anomaly_study.py", "--model_dirs", str(tmp_path / "s0"), str(tmp_path / "s1"),
         "--data_dir", data, "--output_dir", str(tmp_path / "out"), "--validation_split_percentage", "25",
         "--window_sizes", "1", "3", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "anomaly_study.json").read_text())
    assert report["num_models"] == 2 and (tmp_path / "out" / "anomaly_study.png").stat().st_size > 1000
    first, second = report["per_model"]
    assert first["validation_files"] == recorded and first["validation_seed"] is None
    assert second["validation_seed"] == 1 and second["num_validation_images"] == 3
    plain = [name for name, score in ANOMALY_SCORES.items() if not score.needs_statistics]
    windowed = [f"{name} (window {w})" for name in ("standardized-map", "standardized-topk") for w in (1, 3)]
    # positive-z-sum and patch-z-top3 have no window in them
    assert set(report["summary"]) == set(plain) | set(windowed) | {"positive-z-sum", "patch-z-top3"}
    for label, row in report["summary"].items():
        mean, std = row["image_auroc"]
        assert 0 <= mean <= 1 and std >= 0, label
        assert row["pixel_auroc"][0] is not None  # crack images have masks
    assert "| standardized-map (window 3) |" in result.stdout
