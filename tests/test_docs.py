"""The repository's documentation stands on its own: every relative link resolves inside
it, and no text points readers to files or tracker numbers they do not have."""

import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _files(*patterns):
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [f for f in out if os.path.exists(os.path.join(ROOT, f))]


def _text(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        if path.endswith(".ipynb"):
            cells = json.load(f)["cells"]
            return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        return f.read()


def _relative_links(text):
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, mailto:, or an anchor in the same page
        yield target.split("#")[0]


def test_the_link_pattern_finds_relative_links_only():
    text = '[a](docs/X.md#part) [b](https://x.org) [c](#top) ![d](img.png "t")'
    assert list(_relative_links(text)) == ["docs/X.md", "img.png"]


@pytest.mark.parametrize("path", _files("*.md", "*.ipynb"))
def test_every_relative_link_resolves_inside_the_repository(path):
    folder = os.path.dirname(os.path.join(ROOT, path))
    for target in _relative_links(_text(path)):
        resolved = os.path.realpath(os.path.join(folder, target))
        assert resolved.startswith(ROOT + os.sep), f"{path}: {target} leaves the repository"
        assert os.path.exists(resolved), f"{path}: {target} does not exist"


def test_no_text_points_outside_the_repository():
    """Docstrings, comments and docs name our own docs, never a design file or tracker."""
    bad = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|\b[Ii]ssues? #?\d+\b")
    files = _files("*.py", "*.md", "*.ipynb", "*.sh", "*.toml")
    hits = []
    for path in files:
        if path == "tests/test_docs.py":
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if bad.search(line):
                    hits.append(f"{path}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
