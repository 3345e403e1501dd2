"""`host_memory.keep_freed_memory`, which `run_main` calls: the feature maps of batch after batch reuse freed memory
instead of page-faulting fresh mappings."""

import os
import subprocess
import sys

import pytest

from hf_dgm_training import host_memory


def _transparent_huge_pages_always():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            return "[always]" in file.read()
    except OSError:
        return False


# A CPU job in small: an EfficientNet-Lite0 (random weights) over a few batches of 384x384 images, which makes and
# drops feature maps of up to ~20 MB per layer. Prints the page faults of the batches after the first.
PROBE = """
import resource
import torch
from hf_dgm_training.errors import run_main
from modeling_maf import EfficientNetLiteBackbone, EfficientNetLiteConfig

def faults_of_a_few_batches(argv=None):
    torch.set_num_threads(1)
    backbone = EfficientNetLiteBackbone(EfficientNetLiteConfig(out_features=["stage4", "stage5"])).eval()
    images = torch.rand(4, 3, 384, 384).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        backbone(images)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            backbone(images)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

run_main(faults_of_a_few_batches)
"""


def _page_faults(**environment):
    tuning = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", host_memory.OPT_OUT_ENV)
    env = {key: value for key, value in os.environ.items() if key not in tuning}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env | environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not host_memory._is_glibc(), reason="keep_freed_memory tunes glibc's malloc only")
@pytest.mark.skipif(_transparent_huge_pages_always(), reason="huge pages hide the page faults this test counts")
def test_run_main_keeps_freed_memory_for_the_next_large_tensor():
    kept = _page_faults()
    fresh = _page_faults(**{host_memory.OPT_OUT_ENV: "0"})
    assert kept * 5 < fresh, (kept, fresh)


def test_it_does_nothing_when_the_environment_tunes_malloc_or_opts_out(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert host_memory.keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "off")
    assert host_memory.keep_freed_memory() is False
