"""The labelled grid and the HTML report: what a person sees, read back.

The page is loaded in headless Chromium (scripts/test.sh installs it) and its rendered
DOM is read: method names, the columns' prompts, and the grid image actually loaded.
"""

import html.parser
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from erg_jax.jobs import output, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rows(n_rows=2, n=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32) for _ in range(n_rows)]


def test_grid_places_each_sample_under_its_labels():
    rows = _rows()
    grid = report.labelled_grid(rows, ["none", "erg (w=2)"], ["a red circle", "b", "c"], scale=2)
    left, top = report.label_bands(["none", "erg (w=2)"], ["a red circle", "b", "c"], 16)
    assert grid.shape == (top + 2 * 16, left + 3 * 16, 3)
    for i, row in enumerate(rows):
        for j in range(3):
            want = np.repeat(np.repeat(output.to_uint8(row[j]), 2, 0), 2, 1)
            cell = grid[top + i * 16 : top + (i + 1) * 16, left + j * 16 : left + (j + 1) * 16]
            np.testing.assert_array_equal(cell, want)


def test_label_bands_carry_the_text_as_pillow_draws_it():
    rows = _rows()
    names, prompts = ["none", "cfg"], ["red", "blue", "green"]
    grid = report.labelled_grid(rows, names, prompts, scale=8)  # 64 px: no label wraps
    left, top = report.label_bands(names, prompts, 64)
    font = ImageFont.load_default(size=report.LABEL_SIZE)
    for i, name in enumerate(names):  # each row's band: the name drawn at (PAD, PAD)
        ref = Image.new("L", (left, 64), 255)
        ImageDraw.Draw(ref).text((report.PAD, report.PAD), name, fill=0, font=font)
        band = grid[top + 64 * i : top + 64 * (i + 1), :left, 0]
        np.testing.assert_array_equal(band, np.asarray(ref))
        assert band.min() < 128  # ink
    for j, prompt in enumerate(prompts):
        ref = Image.new("L", (64, top), 255)
        ImageDraw.Draw(ref).text((report.PAD, report.PAD), prompt, fill=0, font=font)
        np.testing.assert_array_equal(
            grid[:top, left + 64 * j : left + 64 * (j + 1), 0], np.asarray(ref)
        )
    with pytest.raises(ValueError, match="3 columns but 2 column labels"):
        report.labelled_grid(rows, names, prompts[:2])


class _Page(html.parser.HTMLParser):
    """Text per element id, table cells per row, and the grid image's attributes."""

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.rows, self.img, self.items = [], {}, [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("id") == "grid":
            self.img = attrs
        if tag == "tr":
            self.rows.append([])
        if tag == "li":
            self.items.append("")
        self.stack.append((tag, attrs.get("id")))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _tag, ident in self.stack:
            if ident:
                self.text[ident] = self.text.get(ident, "") + data
        if any(t == "td" for t, _ in self.stack) and self.rows:
            self.rows[-1].append(data.strip())
        if any(t == "li" for t, _ in self.stack):
            self.items[-1] += data


def _rendered(path) -> _Page:
    if CHROMIUM is None:
        pytest.skip("needs chromium (scripts/test.sh installs it with apt-get)")
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", "file://" + os.path.abspath(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    page = _Page()
    page.feed(out.stdout)
    return page


def test_report_page_shows_methods_prompts_and_the_grid(tmp_path):
    rows = _rows(3, 2)
    names, prompts = ["none", "cfg (w=2)", "erg (w=2)"], ["a small red circle", "a blue square"]
    grid = report.labelled_grid(rows, names, prompts)
    report.write_png(str(tmp_path / "grid.png"), grid)
    report.write_html(
        str(tmp_path / "index.html"),
        title="demo <report>",
        grid="grid.png",
        grid_caption="rows: methods",
        columns=["method", "consistency"],
        rows=[{"method": m, "consistency": 0.25 * k} for k, m in enumerate(names)],
        settings={"guidance": {"scale": 2.0, "tau": 0.8}},
        column_labels=prompts,
    )
    page = _rendered(tmp_path / "index.html")
    assert [r[0] for r in page.rows if r] == names
    assert [r[1] for r in page.rows if r] == ["0", "0.25", "0.5"]
    assert page.items == prompts
    assert '"tau": 0.8' in page.text["settings"]
    assert page.img.get("data-width") == str(grid.shape[1])  # the browser loaded the PNG


def test_job_report_reads_a_workdir(tmp_path):
    """A workdir as the job leaves it: PNGs, samples.jsonl, manifest, summary."""
    work = str(tmp_path)
    methods = {"none": _rows(1, 3, seed=1)[0], "erg": _rows(1, 3, seed=2)[0]}
    for m, imgs in methods.items():
        output.write_samples(work, m, [0, 1, 2], imgs)
        output.write_metadata(
            work, m, [{"index": i, "condition": f"class {i + 7}"} for i in range(3)]
        )
    output.write_manifest(work, {"guidance": {"methods": "none,erg"}}, {m: 3 for m in methods})
    output.atomic_write_json(
        os.path.join(work, "summary.json"),
        {"methods": {"none": {"samples_per_second": 2.0}, "erg": {"samples_per_second": 1.0}}},
    )
    page = _rendered(report.job_report(work))
    assert [r[0] for r in page.rows if r] == ["none", "erg"]
    assert page.items == ["class 7", "class 8", "class 9"]
    png = np.asarray(Image.open(os.path.join(work, "report_grid.png")))
    assert page.img.get("data-width") == str(png.shape[1])
    with pytest.raises(ValueError, match="no manifest.json"):
        report.job_report(str(tmp_path / "nothing"))
