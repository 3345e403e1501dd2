"""Relative links in README.md, benchmarks/README.md and docs/*.md, and `docs/<file>.md#anchor` references anywhere
in the code, resolve.

A link's file must exist and its `#anchor` must be the slug of a heading of the target file, by GitHub's rules
(lower case; punctuation and symbols dropped, `-` and `_` kept; spaces become `-`; repeats get `-1`, `-2`, ...).
So a renamed heading or a moved section fails here instead of leaving a dead link.
"""

import glob
import os
import re
import unicodedata

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "README.md"),
        *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"\]\(([^)\s]+)\)|<img[^>]*\ssrc=\"([^\"]+)\"")
CODE_REFERENCE = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")


def slug(heading):
    """GitHub's anchor for a heading's text (github-slugger)."""
    kept = "".join(ch for ch in heading.strip().lower()
                   if ch in "-_ " or unicodedata.category(ch)[0] in "LM" or unicodedata.category(ch) in ("Nd", "Nl"))
    return kept.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a markdown file (headings inside fenced code blocks are not headings)."""
    found, seen, fenced = set(), {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if match:
                base = slug(match.group(1))
                count = seen.get(base, 0)
                seen[base] = count + 1
                found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path):
    """(line number, target) of every link and image outside fenced code blocks."""
    fenced = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                for match in LINK.finditer(line):
                    yield number, match.group(1) or match.group(2)


def broken(target, base_dir):
    """Why a relative link does not resolve, or None."""
    if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
        return None
    path, _, anchor = target.partition("#")
    path = os.path.normpath(os.path.join(base_dir, path)) if path else None
    if path is not None and not os.path.exists(path):
        return f"no file {os.path.relpath(path, ROOT)}"
    if anchor and (path is None or path.endswith(".md")):
        if anchor not in anchors(path):
            return f"no heading with anchor #{anchor} in {os.path.relpath(path, ROOT)}"
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_markdown_links_resolve(doc):
    problems = []
    for number, target in links(doc):
        path = target if not target.startswith("#") else os.path.basename(doc) + target
        why = broken(path, os.path.dirname(doc))
        if why:
            problems.append(f"{os.path.relpath(doc, ROOT)}:{number}: ({target}) {why}")
    assert not problems, "\n".join(problems)


def test_code_references_to_doc_anchors_resolve():
    problems = []
    for path in glob.glob(os.path.join(ROOT, "**", "*"), recursive=True):
        relative = os.path.relpath(path, ROOT)
        if (not path.endswith((".py", ".sh", ".md")) or relative.split(os.sep)[0] in (".venv", "runs", "data")
                or not os.path.isfile(path)):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                for name, anchor in CODE_REFERENCE.findall(line):
                    target = os.path.join(ROOT, "docs", name)
                    if not os.path.exists(target) or anchor not in anchors(target):
                        problems.append(f"{relative}:{number}: docs/{name}#{anchor} does not resolve")
    assert not problems, "\n".join(problems)


def test_slug_follows_github():
    assert slug("4. Why sampling an autoregressive flow is slow, and the exact fast inverse") == (
        "4-why-sampling-an-autoregressive-flow-is-slow-and-the-exact-fast-inverse")
    assert slug("Appendix: every run by date") == "appendix-every-run-by-date"
    assert slug("`patch-z-top3` at 128², x × y") == "patch-z-top3-at-128-x--y"
