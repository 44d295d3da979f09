"""What a run shows a person: a labelled comparison grid and an HTML report.

``labelled_grid`` draws a row of samples per method with the method's name in a band on
the left and each column's condition (prompt or class) in a band on top, with Pillow's
built-in font, so the picture explains itself. ``write_html`` writes a self-contained
page: the grid, a table of figures per method, and the settings. ``job_report`` builds
both for any sampling job's workdir from what the job left there (manifest.json,
summary.json, every method's samples.jsonl and PNGs or MP4s: a video's grid cell shows
four of its frames, and the page plays each MP4 in an HTML video); ``python -m
launch.report``.
"""

from __future__ import annotations

import html
import json
import os
import textwrap
from collections.abc import Sequence

import numpy as np

from erg_jax.jobs import output

BACKGROUND, INK = 255, 0
LABEL_SIZE = 14  # px of the label font
PAD = 6


def _font(size: int = LABEL_SIZE):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _text_size(text: str, font) -> tuple[int, int]:
    from PIL import Image, ImageDraw

    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox(
        (0, 0), text, font=font
    )
    return right - left, bottom - top


def draw_label(text: str, size: tuple[int, int], font=None) -> np.ndarray:
    """A (height, width) uint8 band with ``text`` at its top left, inset by PAD."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size[1], size[0]), BACKGROUND)
    ImageDraw.Draw(img).text((PAD, PAD), text, fill=INK, font=font or _font())
    return np.asarray(img)


def _wrap(label: str, width_px: int, font) -> str:
    chars = max(4, int(width_px / max(_text_size("n", font)[0], 1)))
    return "\n".join(textwrap.wrap(label, chars)[:5]) or " "


def labelled_grid(
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    scale: int = 4,
) -> np.ndarray:
    """One image: a row of samples per method, labelled on the left and on top.

    Args:
      rows: per row, (n, h, w, c) images in [-1, 1] (c = 1 or 3), n the same in every row.
      row_labels: a label per row (the method).
      column_labels: a label per column (the prompt or class of that sample).
      scale: nearest-neighbour upscaling of the samples (small models draw 32 px).

    Returns:
      (H, W, 3) uint8: the top band (column labels), the left band (row labels) and the
      grid of upscaled samples. ``label_bands`` gives the bands' sizes.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"labelled_grid: {len(rows)} rows but {len(row_labels)} row labels")
    n, h, w, _ = rows[0].shape
    if len(column_labels) != n:
        raise ValueError(f"labelled_grid: {n} columns but {len(column_labels)} column labels")
    h, w = h * scale, w * scale
    left, top = label_bands(row_labels, column_labels, w)
    font = _font()
    canvas = np.full((top + len(rows) * h, left + n * w), BACKGROUND, np.uint8)
    canvas = np.repeat(canvas[..., None], 3, -1)
    for j, label in enumerate(column_labels):
        band = draw_label(_wrap(label, w - 2 * PAD, font), (top, w), font)
        canvas[:top, left + j * w : left + (j + 1) * w] = band[..., None]
    for i, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        canvas[top + i * h : top + (i + 1) * h, :left] = draw_label(label, (h, left), font)[
            ..., None
        ]
        imgs = output.to_uint8(row)
        imgs = np.repeat(np.repeat(imgs, scale, axis=1), scale, axis=2)
        if imgs.shape[-1] == 1:
            imgs = np.repeat(imgs, 3, -1)
        for j, img in enumerate(imgs[..., :3]):
            canvas[top + i * h : top + (i + 1) * h, left + j * w : left + (j + 1) * w] = img
    return canvas


def label_bands(row_labels, column_labels, column_width: int) -> tuple[int, int]:
    """(left band width, top band height) in px for these labels."""
    font = _font()
    left = max(_text_size(label, font)[0] for label in row_labels) + 2 * PAD
    wrapped = [_wrap(label, column_width - 2 * PAD, font) for label in column_labels]
    top = max(_text_size(label, font)[1] for label in wrapped) + 3 * PAD
    return left, top


def write_png(path: str, image: np.ndarray) -> None:
    output.atomic_write_bytes(path, output.png_bytes(image))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_html(
    path: str,
    *,
    title: str,
    grid: str | None,
    grid_caption: str,
    columns: Sequence[str],
    rows: Sequence[dict],
    settings: dict,
    notes: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    extra: str = "",
) -> None:
    """A self-contained report page: title, grid image (a path relative to the page),
    the grid's column labels as text, a table with a row per method (``rows``: dicts
    keyed by ``columns``), the settings. The grid's pixel width is written to its
    ``data-width`` once it loads (a check that the page found it). ``extra`` is HTML
    placed after the table (the evaluation's table)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    figure = (
        f'<figure><img id="grid" src="{html.escape(grid)}" alt="{html.escape(grid_caption)}" '
        'onload="this.dataset.width = this.naturalWidth">'
        f"<figcaption>{html.escape(grid_caption)}</figcaption></figure>"
        if grid
        else ""
    )
    if column_labels:
        items = "".join(f"<li>{html.escape(c)}</li>" for c in column_labels)
        figure += f'<p>Columns, left to right:</p><ol id="columns">{items}</ol>'

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:4px 8px;text-align:left}} img{{max-width:100%}}
pre{{background:#f4f4f4;padding:1em}}</style></head>
<body><h1>{html.escape(title)}</h1>
{figure}
<h2>Per method</h2>
<table id="methods"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}
{extra}
<h2>Settings</h2>
<pre id="settings">{html.escape(json.dumps(settings, indent=2, default=str))}</pre>
</body></html>
"""
    output.atomic_write_bytes(path, page.encode())


def _scale(width: int) -> int:
    """Upscaling that gives columns at least 96 px (room for a prompt), at most 8x."""
    return max(1, min(8, -(-96 // width)))


def evaluation_html(workdir: str) -> str:
    """The evaluation job's table (OUT/evaluation/metrics.json), or "" when there is none."""
    path = os.path.join(workdir, "evaluation", "metrics.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        result = json.load(f)
    labels = result["columns"]
    keys = [k for k in labels if any(k in row for row in result["methods"].values())]
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in ["method", "samples"] + [labels[k] for k in keys]
    )
    body = ""
    for method, row in result["methods"].items():
        cells = [method, row["samples"]]
        for k in keys:
            value = row.get(k, "")
            if k == "kid" and "kid_std" in row:
                value = f"{row['kid']:.5f} ± {row['kid_std']:.5f}"
            cells.append(value)
        body += "<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>"
    reference = result.get("reference", {}).get("source", "")
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in result.get("notes", []))
    return (
        f"<h2>Evaluation</h2><p>Against {html.escape(str(reference))} "
        "(python -m launch.evaluate; evaluation/metrics.json).</p>"
        f'<table id="evaluation"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        + notes
    )


def job_report(workdir: str, *, columns: int = 8) -> str:
    """index.html (and report_grid.png) for a sampling job's workdir; returns the page.

    Rows of the grid are the methods in the manifest, columns the first ``columns``
    indices every method has written, labelled from each sample's metadata line.
    """
    manifest = output.read_manifest(workdir)
    summary = {}
    if os.path.exists(os.path.join(workdir, "summary.json")):
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    config = manifest.get("config", {})
    methods = output.manifest_methods(manifest)
    meta = {m: {r["index"]: r for r in output.read_metadata(workdir, m)} for m in methods}
    done = [output.done_indices(workdir, m) for m in methods]
    shared = sorted(set.intersection(*done)) if done else []
    shown = shared[:columns]
    grid, labels = None, []
    if shown:
        rows = [
            np.stack([output.still(output.read_sample(workdir, m, i)) for i in shown])
            for m in methods
        ]
        rows = [r.astype(np.float32) / 127.5 - 1.0 for r in rows]
        labels = [meta[methods[0]].get(i, {}).get("condition", f"sample {i}") for i in shown]
        grid = "report_grid.png"
        image = labelled_grid(rows, methods, labels, scale=_scale(rows[0].shape[2]))
        write_png(os.path.join(workdir, grid), image)
    table = []
    for m in methods:
        stats = summary.get("methods", {}).get(m, {})
        table.append(
            {
                "method": m,
                "samples": manifest["samples"][m],
                "samples / s": stats.get("samples_per_second", ""),
                "compile s": stats.get("compile_seconds", ""),
            }
        )
    path = os.path.join(workdir, "index.html")
    write_html(
        path,
        title=f"Sampling job: {os.path.basename(os.path.abspath(workdir))}",
        grid=grid,
        grid_caption="rows: methods; columns: the condition of each sample (same noise per column)",
        columns=["method", "samples", "samples / s", "compile s"],
        rows=table,
        settings={
            k: config.get(k) for k in ("model", "sampler", "guidance", "seed") if k in config
        },
        column_labels=labels,
        extra=videos_html(workdir, methods, shown) + evaluation_html(workdir),
    )
    return path


def videos_html(workdir: str, methods: Sequence[str], shown: Sequence[int]) -> str:
    """A video model's samples as HTML videos, a row per method ("" for image samples)."""
    files = {(m, i): output.sample_file(workdir, m, i) for m in methods for i in shown}
    if not files or not all(f.endswith(".mp4") for f in files.values()):
        return ""
    rows = ""
    for m in methods:
        cells = "".join(
            f'<td><video controls loop muted preload="metadata" '
            f'src="{html.escape(os.path.relpath(files[m, i], workdir))}"></video></td>'
            for i in shown
        )
        rows += f"<tr><th>{html.escape(m)}</th>{cells}</tr>"
    return (
        "<h2>Videos</h2><p>The MP4 of each sample; the grid above shows 4 frames of each, "
        'first to last.</p><table id="videos">' + rows + "</table>"
    )
