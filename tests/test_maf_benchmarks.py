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
