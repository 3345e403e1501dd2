"""scripts/run_maf_pipeline.sh (setup, then scripts/run_maf_pipeline.py in one process) reads relative paths from the
folder it is started in, trains the detectors it is asked for with the flags meant for them, and does not run pip
again while its setup stamp matches setup.py."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from synthetic_data import make_mvtec_category


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "scripts", "run_maf_pipeline.sh")
TINY = ["--image_size", "8", "--hidden_sizes", "16", "16", "--num_blocks", "1", "--num_train_epochs", "1"]


def run_pipeline(*args, cwd, **env):
    environment = {key: value for key, value in os.environ.items() if key != "HF_DGM_DEBUG"}
    environment.update(TQDM_DISABLE="1", PYTHONPATH=ROOT, **env)
    return subprocess.run(["bash", PIPELINE, *args], capture_output=True, text=True, cwd=cwd, env=environment,
                          timeout=600)


def test_relative_paths_resolve_from_the_callers_folder(tmp_path):
    work = tmp_path / "work"
    make_mvtec_category(str(work / "data" / "capsule"), size=8, num_train=4)
    result = run_pipeline("--data_dir", "data/capsule", *TINY, "--detector", "off", cwd=work, SKIP_SETUP="1",
                          PYTHON=sys.executable, OUTPUT_DIR="out/maf")
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "out" / "maf"
    assert (out / "model.safetensors").is_file()
    assert len([name for name in os.listdir(out / "samples") if name.startswith("sample_t1_")]) == 5
    report = json.loads((out / "anomaly" / "anomaly_report.json").read_text())
    assert report["num_test_images"] == 3
    assert not os.path.exists(os.path.join(ROOT, "out"))  # nothing written relative to the repository
    assert not (out / "patch_detector").exists() and not (out / "detector").exists()
    phases = json.loads((out / "pipeline_results.json").read_text())["phase_seconds"]
    assert set(phases) == {"imports", "train_maf", "sample", "detect_maf"}


@pytest.mark.parametrize("preset, epochs", [("spec", 3), ("cpu", 1)])
def test_the_feature_detector_is_trained_and_recommended(tmp_path, preset, epochs):
    """The default: after the whole-image model, the feature detector (DETECTOR_EXTRA shrinks it for the test) for the
    preset's epochs, and its report; the last lines name the detector with the best image AUROC and its folder."""
    make_mvtec_category(str(tmp_path / "capsule"), size=64, num_train=10, num_test_good=3, defects=(("crack", 3),))
    detector_extra = ("--image_size 64 --hidden_sizes 16 16 --num_blocks 1 --validation_split_percentage 30 "
                      "--use_pretrained_backbone false")
    result = run_pipeline("--data_dir", "capsule", "--preset", preset, *TINY, "--seed", "2", cwd=tmp_path,
                          SKIP_SETUP="1", PYTHON=sys.executable, OUTPUT_DIR="maf", DETECTOR_EXTRA=detector_extra)
    assert result.returncode == 0, result.stderr[-3000:]
    detector = tmp_path / "maf" / "detector"
    results = json.loads((detector / "train_results.json").read_text())
    assert results["flow_type"] == "feature_maf" and results["config"]["image_size"] == 64
    assert results["config"]["backbone_config"]["out_features"] == ["stage3", "stage4"]
    assert results["config"]["backbone_padding"] == 32  # train_maf.py's detector default
    assert results["num_train_epochs"] == results["epochs_completed"] == epochs
    assert "| seed | 2 |" in (detector / "README.md").read_text()
    report = json.loads((detector / "anomaly" / "anomaly_report.json").read_text())
    assert report["score"] == "map-max" and report["num_test_images"] == 6
    summary = json.loads((tmp_path / "maf" / "pipeline_results.json").read_text())
    assert set(summary["reports"]) == {"whole-image MAF", "feature detector"}
    assert {"train_detector", "detect_detector"} <= set(summary["phase_seconds"])
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"Use the {summary['recommended_detector']} for anomaly detection")


def test_the_patch_detector_gets_only_the_seed_of_the_extra_flags(tmp_path):
    """--patch_detector on trains the patch detector after the whole-image model and writes its report, scored by
    patch-z-top3; of the extra flags only --seed reaches it (PATCH_EXTRA shrinks it for the test)."""
    make_mvtec_category(str(tmp_path / "capsule"), size=8, num_train=12, num_test_good=3, defects=(("crack", 3),))
    patch_extra = ("--image_size 8 --patch_size 4 --patch_stride 2 --hidden_sizes 16 16 --num_blocks 1 "
                   "--num_train_epochs 1 --mixed_precision no --validation_split_percentage 30")
    result = run_pipeline("--data_dir", "capsule", *TINY, "--seed", "3", "--learning_rate", "0.5", "--detector", "off",
                          "--patch_detector", "on", cwd=tmp_path, SKIP_SETUP="1", PYTHON=sys.executable,
                          OUTPUT_DIR="maf", PATCH_EXTRA=patch_extra)
    assert result.returncode == 0, result.stderr[-3000:]
    detector = tmp_path / "maf" / "patch_detector"
    results = json.loads((detector / "train_results.json").read_text())
    card = (detector / "README.md").read_text()
    assert results["patch_model"]["patch_size"] == 4 and results["config"]["num_blocks"] == 1
    assert "| seed | 3 |" in card and "| learning rate (Adam) | 0.001 |" in card  # not the extra --learning_rate
    report = json.loads((detector / "anomaly" / "anomaly_report.json").read_text())
    assert report["score"] == "patch-z-top3" and report["num_test_images"] == 6
    assert "patch detector maf/patch_detector/anomaly" in result.stdout

    refused = run_pipeline("--data_dir", "capsule", "--patch_detector", "maybe", cwd=tmp_path, SKIP_SETUP="1",
                           PYTHON=sys.executable)
    assert refused.returncode == 2 and "--patch_detector: invalid choice: 'maybe'" in refused.stderr


def make_fake_venv(venv):
    """A virtualenv whose python logs every call and answers `-m pip` without installing (no network in tests);
    everything else runs the test's interpreter, which imports this repository through PYTHONPATH."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{venv / "calls.log"}"\n'
        'if [ "$1" = -m ] && [ "$2" = pip ]; then exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return venv


def pip_calls(venv):
    log = venv / "calls.log"
    calls = [line for line in log.read_text().splitlines() if line.startswith("-m pip")] if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def test_setup_runs_pip_once_until_setup_py_changes(tmp_path):
    venv = make_fake_venv(tmp_path / "venv")
    # A data folder that does not exist makes train_maf.py fail at once, right after the setup under test.
    args = ("--data_dir", "missing", *TINY)

    first = run_pipeline(*args, cwd=tmp_path, VENV=str(venv))
    assert first.returncode == 1, first.stderr[-3000:]
    assert "run_maf_pipeline.py: error: No data for category" in first.stderr, first.stderr[-3000:]
    assert pip_calls(venv) == ["-m pip install -q --upgrade pip", "-m pip install -q torch==2.13.0",
                               f"-m pip install -q -e {ROOT}[features]"]
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        assert (venv / ".hf-dgm-setup").read_text().split() == [hashlib.sha256(f.read()).hexdigest(), "torch==2.13.0",
                                                                 "extras=features"]

    second = run_pipeline(*args, cwd=tmp_path, VENV=str(venv))
    assert second.returncode == 1 and "is up to date" in second.stdout
    assert pip_calls(venv) == []

    (venv / ".hf-dgm-setup").write_text("an older setup.py torch==2.13.0\n")
    third = run_pipeline(*args, cwd=tmp_path, VENV=str(venv))
    assert third.returncode == 1
    assert len(pip_calls(venv)) == 3


def setup_as(venv, extras=""):
    """scripts/setup_env.sh's hf_dgm_setup, as run_tests.sh (extras dev,demo) or the main job (none) call it."""
    script = f'source "{ROOT}/scripts/setup_env.sh" && hf_dgm_setup "{ROOT}" {extras} && echo "PYTHON=$PYTHON"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, VENV=str(venv), PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"PYTHON={venv}/bin/python" in result.stdout
    return result.stdout


def test_one_setup_stamp_whichever_command_sets_up_first(tmp_path):
    """Issue 22.4: the test command and the main job share the virtualenv and its stamp; the tests add only their
    extras on top of the main job's setup, and neither reinstalls after the other."""
    digest = hashlib.sha256(open(os.path.join(ROOT, "setup.py"), "rb").read()).hexdigest()
    venv = make_fake_venv(tmp_path / "main-first")
    setup_as(venv, "features")  # the main job
    assert len(pip_calls(venv)) == 3
    assert (venv / ".hf-dgm-setup").read_text().split() == [digest, "torch==2.13.0", "extras=features"]
    setup_as(venv, "dev,demo,features")  # then the tests: only the extras they add
    assert pip_calls(venv) == [f"-m pip install -q -e {ROOT}[dev,demo]"]
    assert (venv / ".hf-dgm-setup").read_text().split() == [digest, "torch==2.13.0", "extras=features,dev,demo"]
    assert "is up to date" in setup_as(venv, "dev,demo,features") and "is up to date" in setup_as(venv, "features")
    assert pip_calls(venv) == []

    venv = make_fake_venv(tmp_path / "tests-first")
    setup_as(venv, "dev,demo,features")
    assert pip_calls(venv)[-1] == f"-m pip install -q -e {ROOT}[dev,demo,features]"
    assert "is up to date" in setup_as(venv, "features")  # the main job after the tests: no pip at all
    assert pip_calls(venv) == []


def test_the_main_job_twice_into_one_folder(tmp_path):
    """Issue 22.1 for the main job: a second run into the same folder refuses in one line naming the ways out; with
    --overwrite_output_dir no file of the first run is left (its model, samples, reports, summary), the user's stay."""
    from script_runner import run_in_process

    make_mvtec_category(str(tmp_path / "capsule"), size=8, num_train=4)
    args = ["--data_dir", tmp_path / "capsule", "--output_dir", tmp_path / "maf", *TINY, "--detector", "off"]
    run_in_process("run_maf_pipeline.py", *args)
    out = tmp_path / "maf"
    (out / "notes.txt").write_text("mine")
    first = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.rglob("*") if path.is_file()}
    assert (out / "pipeline_results.json") in first and any(path.parent.name == "samples" for path in first)

    refused = run_in_process("run_maf_pipeline.py", *args, expect_ok=False)
    errors = [line for line in refused.stderr.splitlines() if ": error: " in line]
    assert refused.returncode == 1 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "already holds another run" in errors[0] and "--overwrite_output_dir" in errors[0]
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in first} == first

    run_in_process("run_maf_pipeline.py", *args, "--overwrite_output_dir")
    left = [path for path, identity in first.items()
            if path.exists() and (path.stat().st_ino, path.stat().st_mtime_ns) == identity]
    assert left == [out / "notes.txt"]
