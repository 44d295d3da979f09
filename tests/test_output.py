"""The job's output files: pixel values, PNG channels, grid layout, names on disk, the
fingerprint and the workdir check, each against values written out by hand."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from erg_jax.jobs import output


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def test_to_uint8_maps_minus_one_to_one_onto_0_to_255_rounding_to_nearest():
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 1.2], np.float32)
    # (x + 1) * 127.5: 0, 0.1275, 127.5 (ties to even: 128), 191.25, 255; clipped outside.
    np.testing.assert_array_equal(output.to_uint8(x), [0, 0, 0, 128, 191, 255, 255])
    assert output.to_uint8(x).dtype == np.uint8


@pytest.mark.parametrize(
    "channels, shown",
    [
        (1, lambda im: im[..., 0]),
        (2, lambda im: np.repeat(im[..., :1], 3, -1)),
        (3, None),
        (4, None),
    ],
)
def test_png_keeps_grey_and_rgb_and_shows_other_counts_as_rgb(channels, shown):
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (5, 7, channels), np.uint8)  # not square: axes stay put
    want = shown(image) if shown else image[..., :3]
    np.testing.assert_array_equal(_decode(output.png_bytes(image)), want)


def test_samples_are_written_under_their_index_and_found_again(tmp_path):
    images = np.linspace(-1.0, 1.0, 2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    output.write_samples(str(tmp_path), "cfg", [7, 12], images)
    output.write_samples(str(tmp_path), "cfg", [3], images[:1])  # the folder exists now
    assert sorted(os.listdir(tmp_path / "cfg")) == ["00000003.png", "00000007.png", "00000012.png"]
    read = output.read_png(output.sample_path(str(tmp_path), "cfg", 12))
    np.testing.assert_array_equal(read, output.to_uint8(images[1]))
    # only finished PNGs named by their index count as done
    for name in ("notes.txt", "0005.txt", "grid.png", ".00000004.png.partial-p0-1"):
        (tmp_path / "cfg" / name).write_bytes(b"x")
    assert output.done_indices(str(tmp_path), "cfg") == {3, 7, 12}
    assert output.done_indices(str(tmp_path), "erg") == set()
    with pytest.raises(ValueError):  # one index per image
        output.write_samples(str(tmp_path), "cfg", [1, 2, 3], images)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_grid_places_image_i_at_row_i_div_columns_column_i_mod_columns(tmp_path, channels):
    n, h, w, columns = 5, 2, 3, 2
    # pixel values k, written as 2 k / 255 - 1; every channel different
    k = np.random.default_rng(channels).integers(0, 256, (n, h, w, channels))
    images = (2 * k / 255 - 1).astype(np.float32)
    output.write_grid(str(tmp_path / "g.png"), images, columns=columns)
    # what a PNG shows: grey stays grey, 3 channels as they are, 4 as the first 3, 2 as
    # the first one in grey RGB; 3 rows of 2 cells, the last cell empty
    shown = {1: k, 2: np.repeat(k[..., :1], 3, -1), 3: k, 4: k[..., :3]}[channels]
    empty = np.zeros_like(shown[0])
    rows = [(shown[0], shown[1]), (shown[2], shown[3]), (shown[4], empty)]
    want = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    grid = output.read_png(str(tmp_path / "g.png"))
    np.testing.assert_array_equal(grid, want[..., 0] if channels == 1 else want)
    # fewer images than columns: the grid is as wide as the images; 8 columns by default
    output.write_grid(str(tmp_path / "one.png"), images[:1])
    assert output.read_png(str(tmp_path / "one.png")).shape[:2] == (h, w)
    output.write_grid(str(tmp_path / "nine.png"), np.concatenate([images, images[:4]]))
    assert output.read_png(str(tmp_path / "nine.png")).shape[:2] == (2 * h, 8 * w)


CONFIG = {
    "model": {"preset": "tiny", "scan_blocks": False},
    "guidance": {"scale": 3.0, "methods": "cfg"},
    "output": {"num_samples": 8, "progress": True},
    "mesh": {"data": 1},
    "seed": 0,
}


def _changed(path, value):
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in CONFIG.items()}
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def test_fingerprint_ignores_the_neutral_fields_and_key_order_only():
    base = output.fingerprint(CONFIG)
    for path, value in [
        (("model", "scan_blocks"), True),
        (("guidance", "methods"), "erg"),
        (("output", "num_samples"), 64),
        (("mesh",), {"data": 8}),
    ]:
        assert output.fingerprint(_changed(path, value)) == base, path
    for path, value in [(("guidance", "scale"), 4.0), (("seed",), 1), (("model", "preset"), "b")]:
        assert output.fingerprint(_changed(path, value)) != base, path
    assert output.fingerprint(dict(reversed(list(CONFIG.items())))) == base


def test_a_workdir_of_another_config_is_refused_naming_the_fields(tmp_path):
    workdir = str(tmp_path)
    output.check_workdir(workdir, CONFIG)  # no manifest yet: any config
    output.write_manifest(workdir, CONFIG, {"cfg": 8})
    output.check_workdir(workdir, _changed(("output", "num_samples"), 99))
    changed = _changed(("guidance", "scale"), 5.0)
    changed["mesh"] = {"data": 4}
    with pytest.raises(ValueError, match=r"differing fields: \['guidance.scale'\]"):
        output.check_workdir(workdir, changed)
    # a section that became a value is named as a whole
    with pytest.raises(ValueError, match=r"differing fields: \['model'\]"):
        output.check_workdir(workdir, {**CONFIG, "model": "tiny"})


def test_a_restart_removes_only_its_own_process_temporary_files(tmp_path):
    ours = output._tmp_path(str(tmp_path / "00000001.png"))
    names = [
        os.path.basename(ours),
        ".00000002.png.partial-p1-77",  # another host's
        "00000003.png",  # a finished sample
        "x.partial-p0-5",  # not hidden: not one of ours
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert output.remove_partial(str(tmp_path), 0) == [names[0]]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
    assert output.remove_partial(str(tmp_path / "missing"), 0) == []
