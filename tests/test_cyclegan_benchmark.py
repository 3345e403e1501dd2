"""benchmarks/bench_cyclegan.py --smoke: runs the training script's step on a CPU and reports agreeing losses."""

import importlib.util
import json
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    path = os.path.join(ROOT, "benchmarks", "bench_cyclegan.py")
    spec = importlib.util.spec_from_file_location("bench_cyclegan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_a_table_and_json_with_agreeing_losses(tmp_path, capsys):
    bench = load_benchmark()
    report = bench.main(["--smoke", "--device", "cpu", "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_cyclegan.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    runs = {(r["batch"], r["variant"]): r for r in saved["results"]}
    assert set(runs) == {(1, "plain"), (2, "plain"), (1, "fast"), (2, "fast")}  # GPU-only variants are left out
    for run in runs.values():
        assert "error" not in run, run
        assert run["finite"] and run["iterations_per_second"] > 0 and run["host_syncs_per_step"] == 0
    # the fast path's batched passes compute the plain path's losses
    assert runs[(1, "fast")]["max_loss_diff_vs_plain"] < 1e-4 and runs[(2, "fast")]["max_loss_diff_vs_plain"] < 1e-4
    assert runs[(1, "fast")]["options"]["batch_passes"] and not runs[(1, "plain")]["options"]["batch_passes"]
    assert "variant" in capsys.readouterr().out
