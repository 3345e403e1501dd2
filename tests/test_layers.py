"""The layers point one way: scripts -> hf_dgm_training -> the model packages. A model package holds what loading a
model needs and imports nothing of the training library; its files import each other relatively, so that a Hub
repository with its copied files loads with `trust_remote_code` without this package installed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
MODEL_PACKAGES = ("modeling_maf", "modeling_cyclegan")
TRAINING_PACKAGE = "hf_dgm_training"


def layer_violations(path: Path, package_dir: Path) -> list[str]:
    """What is wrong with the imports of `path`, a file of the model package in `package_dir`: an import of the
    training library, an absolute import of a model package, a relative import that leaves the package."""
    depth = len(path.relative_to(package_dir).parts)  # 1 for a file at the package's top
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            imports = [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imports = [(node.level, node.module or "")]
        else:
            continue
        for level, module in imports:
            top, where = module.split(".")[0], f"{path.name}:{node.lineno}"
            if level == 0 and top == TRAINING_PACKAGE:
                problems.append(f"{where} imports the training library ({module})")
            elif level == 0 and top in MODEL_PACKAGES:
                problems.append(f"{where} imports {module} absolutely; files of a model package import each other "
                                "relatively (from .x import ...), so that trust_remote_code loading works")
            elif level > depth:
                problems.append(f"{where}: a relative import (level {level}) that leaves {package_dir.name}")
    return problems


def _model_files():
    files = [(path, ROOT / package) for package in MODEL_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) >= 10, f"expected the model packages' files under {ROOT}, found {files}"
    return files


@pytest.mark.parametrize("path,package_dir", _model_files(), ids=lambda value: value.name)
def test_model_package_files_import_no_training_code_and_each_other_relatively(path, package_dir):
    assert layer_violations(path, package_dir) == []


@pytest.mark.parametrize("package", MODEL_PACKAGES)
def test_importing_a_model_package_does_not_load_the_training_library(package):
    code = (f"import sys, {package}\n"
            f"print(sorted(name for name in sys.modules if name.split('.')[0] == {TRAINING_PACKAGE!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {package} loaded {result.stdout.strip()}"


def test_the_check_catches_each_kind_of_wrong_import(tmp_path):
    package_dir = tmp_path / "modeling_bad"
    package_dir.mkdir()
    bad = package_dir / "modeling_bad.py"
    bad.write_text("from hf_dgm_training.errors import DataError\nimport modeling_maf.configuration_maf\n"
                   "from .configuration_bad import BadConfig\nfrom ..elsewhere import thing\n")
    problems = layer_violations(bad, package_dir)
    assert len(problems) == 3, problems
    assert "training library" in problems[0] and "absolutely" in problems[1] and "leaves" in problems[2]
