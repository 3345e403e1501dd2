"""Code that a model folder must carry itself stays the same as its source.

A saved or pushed model is self-contained: `save_pretrained` copies its modeling file and the files it imports
relatively, and `trust_remote_code=True` loads them without this package. So `modeling_cyclegan` cannot import from
`modeling_maf`, and the few pieces both need live in both. As in transformers, such a copy is marked by the line
`# Copied from <module>.<name>` right above it; this test checks that each marked copy equals its source (after
removing their common indentation), so a change to one that is not made to the other fails here.
"""

import difflib
import importlib
import inspect
import pathlib
import re
import textwrap

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_maf", "modeling_cyclegan", "hf_dgm_training")
MARKER = re.compile(r"^\s*# Copied from ([\w.]+)\s*$")


def marked_copies(root=ROOT, packages=PACKAGES):
    """(path, line number of the marker, dotted name of the source) of every marked copy under `packages`."""
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                match = MARKER.match(line)
                if match:
                    yield path, number, match.group(1)


def copied_block(lines, marker_index):
    """The decorators, `def` or `class` line and body that follow the marker at `lines[marker_index]`."""
    start = marker_index + 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and lines[end - 1].lstrip().startswith("@"):  # decorators, then the header
        end += 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return textwrap.dedent("\n".join(lines[start:end])).strip()


def source_of(dotted_name):
    """The source of `module.attribute[.attribute...]`, importing the longest prefix that is a module."""
    parts = dotted_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return textwrap.dedent(inspect.getsource(obj)).strip()
    raise ImportError(f"no module in {dotted_name}")


def copy_difference(path, number, dotted_name):
    """'' when the copy below line `number` of `path` equals `dotted_name`'s source, else a unified diff."""
    copy = copied_block(path.read_text().splitlines(), number - 1)
    source = source_of(dotted_name)
    if copy == source:
        return ""
    return "\n".join(difflib.unified_diff(source.splitlines(), copy.splitlines(), dotted_name, f"{path}:{number}",
                                          lineterm=""))


COPIES = list(marked_copies())


def test_the_copies_are_found():
    names = {name for _, _, name in COPIES}
    assert {"modeling_maf.pipeline_maf.AnomalyDetectionPipeline._read_image",
            "modeling_maf.modeling_maf.name_custom_pipelines"} <= names


@pytest.mark.parametrize("path, number, name", COPIES, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in COPIES])
def test_every_copy_matches_its_source(path, number, name):
    difference = copy_difference(path, number, name)
    assert not difference, (f"{path.relative_to(ROOT)}:{number} is marked as a copy of {name} but differs; make the "
                            f"two the same:\n{difference}")


def test_a_copy_that_differs_is_caught(tmp_path, monkeypatch):
    package = tmp_path / "copies_demo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "source.py").write_text("class Reader:\n    @staticmethod\n    def read(value):\n"
                                       "        return value + 1\n")
    copy = "class Other:\n    # Copied from copies_demo.source.Reader.read\n    @staticmethod\n    def read(value):\n" \
           "        return value + {}\n\n    def after(self):\n        return 0\n"
    monkeypatch.syspath_prepend(str(tmp_path))
    (package / "same.py").write_text(copy.format(1))
    (package / "changed.py").write_text(copy.format(2))
    found = {path.name: (path, number, name) for path, number, name in marked_copies(tmp_path, ("copies_demo",))}
    assert copy_difference(*found["same.py"]) == ""
    difference = copy_difference(*found["changed.py"])
    assert "-    return value + 1" in difference and "+    return value + 2" in difference
