"""The start of a child-process script that must run without hf-dgm importable (run it with `python -I`): code a
test loads from the Hub or a folder then proves that it travels with the model."""

WITHOUT_HF_DGM = '''
import sys
# The editable install of hf-dgm is an import finder: drop it, so only code downloaded with the model is there.
sys.meta_path[:] = [finder for finder in sys.meta_path
                    if "__editable__" not in getattr(finder, "__module__", "") + type(finder).__module__]
for module in ("modeling_maf", "modeling_cyclegan", "hf_dgm_training"):
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        sys.exit(f"{module} is importable in the child process; the test would prove nothing")
'''


def run_without_hf_dgm(script: str, jobs_path, hub_server, child_home):
    """Runs `script` (prefixed with `JOBS = <jobs_path>`) in `python -I` with an empty HF home at `child_home`,
    pointed at the loopback Hub; asserts it succeeded and returns the JSON object of its last line of output."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-I", "-c", f"JOBS = {str(jobs_path)!r}\n" + script],
        cwd=str(child_home.parent),
        env=hub_server.subprocess_env(HF_HOME=str(child_home), PYTHONPATH=None),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
