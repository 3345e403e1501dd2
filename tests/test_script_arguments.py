"""Issue 22.2: every numeric flag of every script is checked before any work. A bad value (negative, zero where a
positive number is needed, NaN) ends parsing with argparse's usage and one error line naming the flag, exit status 2,
and no traceback. The flags are found by introspecting each script's parser, so a new flag is tested too."""

import argparse
import importlib

import pytest

from hf_dgm_training.arguments import Number


# Each script with the required flags that let parsing reach the flag under test.
SCRIPTS = {
    "train_maf": ["--data_dir", "d"],
    "train_cyclegan": ["--data_dir", "d"],
    "sample_maf": ["--model_name_or_path", "m"],
    "detect_anomalies": ["--model_name_or_path", "m", "--data_dir", "d"],
    "translate": ["--model_name_or_path", "m", "--input", "x"],
    "push_mvtec_dataset": ["--data_dir", "d", "--repo_id", "me/mvtec"],
    "run_maf_pipeline": ["--data_dir", "d"],
}


class _Captured(Exception):
    pass


def parser_of(module) -> argparse.ArgumentParser:
    """The parser a script's `parse_args` builds (captured when it starts parsing: `parse_args` and the main job's
    `parse_known_args` both go through `parse_known_args`)."""
    captured = {}
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise _Captured

    argparse.ArgumentParser.parse_known_args = capture
    try:
        with pytest.raises(_Captured):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return captured["parser"]


def numeric_flags(parser):
    """(flag, type) of every option that reads numbers."""
    for action in parser._actions:
        kind = action.type.kind if isinstance(action.type, Number) else action.type
        if kind in (int, float) and action.option_strings:
            yield action.option_strings[0], action.type, kind


def bad_values(number_type, kind):
    """Values every such flag must refuse: NaN (floats); -1 (every integer flag, and floats bounded below by 0 or
    more); 0 where the flag needs a positive number."""
    values = ["nan"] if kind is float else ["-1", "1.5"]
    lowest = number_type.lowest if isinstance(number_type, Number) else None
    if kind is float and lowest is not None and lowest >= 0:
        values.append("-1")
    if isinstance(number_type, Number) and (number_type.minimum == 1 or number_type.above == 0):
        values.append("0")
    return values


CASES = []
for _script in SCRIPTS:
    _module = importlib.import_module(_script)
    for _flag, _type, _kind in numeric_flags(parser_of(_module)):
        for _value in bad_values(_type, _kind):
            CASES.append(pytest.param(_script, _flag, _value, id=f"{_script}{_flag}={_value}"))


def test_every_script_has_numeric_flags_to_check():
    scripts = {case.values[0] for case in CASES}
    assert scripts == set(SCRIPTS) - {"push_mvtec_dataset"}  # it has no numeric flag
    assert len(CASES) > 100


@pytest.mark.parametrize("script, flag, value", CASES)
def test_a_bad_number_is_one_line_naming_the_flag(script, flag, value, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args([*SCRIPTS[script], flag, value])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert ": error: " in last and flag in last and value in last, last


@pytest.mark.parametrize("script, argv, flag", [
    ("train_maf", ["--num_blocks", "0"], "--num_blocks"),
    ("train_maf", ["--hidden_sizes", "16", "0"], "--hidden_sizes"),
    ("train_maf", ["--flow_type", "iaf", "--image_size", "8", "--patch_size", "16"], "--patch_size"),
    ("train_maf", ["--flow_type", "feature_maf", "--feature_pooling_size", "2"], "--feature_pooling_size"),
    ("train_maf", ["--flow_type", "feature_maf", "--calibration_folds", "1"], "--calibration_folds"),
    ("train_maf", ["--calibration_folds", "2"], "--calibration_folds"),  # a pixel MAF: no out-of-fold calibration
    ("train_maf", ["--flow_type", "feature_maf", "--calibration_folds", "2", "--model_name_or_path", "runs/detector"],
     "--calibration_folds"),
    ("train_cyclegan", ["--generator_filters", "0"], "--generator_filters"),
    ("train_cyclegan", ["--init_gain", "0"], "--init_gain"),
])
def test_a_config_field_the_config_refuses_is_one_line_before_any_work(script, argv, flag, capsys):
    """Config fields as flags are checked by the config itself while parsing (positive sizes, odd pooling, ...)."""
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).parse_args([*SCRIPTS[script], *argv])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert ": error: " in last and flag in last, last


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_defaults_parse(script):
    """The check refuses bad values, not the defaults (nor the required flags' values)."""
    importlib.import_module(script).parse_args(SCRIPTS[script])


def test_number_describes_what_is_allowed():
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number > 0, got '-1'"):
        Number(float, above=0)("-1")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number >= 0 and < 100, got 'inf'"):
        Number(float, minimum=0, below=100)("inf")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer >= 1, got 'x'"):
        Number(int, minimum=1)("x")
    assert Number(int, minimum=1)("3") == 3 and Number(float)("-2.5") == -2.5
