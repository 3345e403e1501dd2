"""`host_memory.keep_freed_memory`, which `run_main` calls: the feature maps of batch after batch reuse freed memory
instead of page-faulting fresh mappings. Measured with benchmarks/time_cpu_feature_extraction.py, whose timing
processes run through `run_main` with the switch on and off."""

import json
import os
import subprocess
import sys

import pytest

from hf_dgm_training import host_memory


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _transparent_huge_pages_always():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            return "[always]" in file.read()
    except OSError:
        return False


def run_benchmark(tmp_path, *flags):
    output = tmp_path / "cpu_features.json"
    result = subprocess.run([sys.executable, "benchmarks/time_cpu_feature_extraction.py", *flags,
                             "--output_json", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())["rows"], result.stdout


def test_the_cpu_feature_extraction_benchmark_times_both_settings(tmp_path):
    rows, stdout = run_benchmark(tmp_path, "--smoke")
    assert [(row["batch_size"], row["keep_freed_memory"]) for row in rows] == [(2, True), (2, False)]
    assert all(row["seconds"] > 0 and row["images_per_s"] > 0 and row["minor_faults"] >= 0 for row in rows)
    assert "given back" in stdout


@pytest.mark.skipif(not host_memory._is_glibc(), reason="keep_freed_memory tunes glibc's malloc only")
@pytest.mark.skipif(_transparent_huge_pages_always(), reason="huge pages hide the page faults this test counts")
def test_run_main_keeps_freed_memory_for_the_next_batch(tmp_path):
    # An EfficientNet-Lite0 over three batches of four 384x384 images after a first one: feature maps of up to
    # ~20 MB per layer, made and dropped batch after batch.
    rows, _ = run_benchmark(tmp_path, "--num_images", "12", "--image_size", "384", "--batch_sizes", "4",
                            "--threads", "1")
    faults = {row["keep_freed_memory"]: row["minor_faults"] for row in rows}
    assert faults[True] * 5 < faults[False], faults


def test_it_does_nothing_when_the_environment_tunes_malloc_or_opts_out(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert host_memory.keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "off")
    assert host_memory.keep_freed_memory() is False
