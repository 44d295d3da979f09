"""Preemption-safe output of a sampling job: PNGs (or a video model's MP4s), the
manifest, grids, the fingerprint.

Every file is written whole or not at all (a hidden temporary file in the same folder,
then ``os.replace``), so a job killed at any moment leaves only complete files under
their real names, and the set of samples on disk is the truth about what is done. A kill
between the write and the rename can leave a temporary file behind; its name carries the
writing process's index, and that process removes it when the job starts again
(``remove_partial``), so no host sweeps files another host is writing.

The manifest records the config's fingerprint: the fields that change the images (not
the number of samples, the batch size, the mesh, the block layout or the method list),
so a restarted or extended job may continue a workdir and a changed one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from erg_jax.pipeline import to_uint8

# Fields that do not change any image: a run may change them and keep its workdir.
NEUTRAL_FIELDS = (
    ("output", "num_samples"),
    ("output", "progress"),
    ("output", "grid_size"),
    ("sampler", "batch_size"),
    ("guidance", "methods"),
    ("mesh",),
    ("logical_axis_rules",),
    ("compile_cache_dir",),
    ("dry_run",),
    ("dry_run_memory_gb",),
    ("evaluation",),  # the evaluation job's section (configs/coco.py): no image changes
    ("model", "scan_blocks"),
    ("model", "attention_implementation"),
)


_TMP_TAG = ".partial-p"


def _process_index() -> int:
    import jax

    return jax.process_index()


def _tmp_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{_TMP_TAG}{_process_index()}-{os.getpid()}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_partial(folder: str, process_index: int | None = None) -> list[str]:
    """Deletes the temporary files this process left in folder when it was killed.

    Only names written by ``atomic_write_bytes`` of the same process index are touched;
    returns the names removed.
    """
    if not os.path.isdir(folder):
        return []
    index = _process_index() if process_index is None else process_index
    tag = f"{_TMP_TAG}{index}-"
    removed = []
    for name in os.listdir(folder):
        if name.startswith(".") and tag in name:
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def png_bytes(image: np.ndarray) -> bytes:
    """One HWC uint8 image (1 or 3 channels; other counts show the first 3) as PNG."""
    import io

    from PIL import Image

    if image.shape[-1] == 1:
        pil = Image.fromarray(image[..., 0], mode="L")
    else:
        pil = Image.fromarray(
            image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, -1)
        )
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


EXTENSIONS = (".png", ".mp4")  # an image sample, a video sample


def sample_path(workdir: str, method: str, index: int, ext: str = ".png") -> str:
    return os.path.join(workdir, method, f"{index:08d}{ext}")


def sample_file(workdir: str, method: str, index: int) -> str:
    """The file a written sample is in (its PNG, or a video's MP4)."""
    for ext in EXTENSIONS:
        path = sample_path(workdir, method, index, ext)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no sample {index} of {method} in {workdir}")


def write_samples(
    workdir: str, method: str, indices, images: np.ndarray, *, fps: int = 16, crf: int = 17
) -> None:
    """Writes each sample's file atomically: images (b, H, W, C) in [-1, 1] as PNGs,
    videos (b, frames, H, W, 3) as H.264 MP4s at ``fps`` and ``crf`` (``jobs.video``)."""
    os.makedirs(os.path.join(workdir, method), exist_ok=True)
    if np.ndim(images) == 5:
        from erg_jax.jobs import video

        for i, frames in zip(indices, to_uint8(images), strict=True):
            data = video.mp4_bytes(frames, fps=fps, crf=crf)
            atomic_write_bytes(sample_path(workdir, method, int(i), ".mp4"), data)
        return
    for i, img in zip(indices, to_uint8(images), strict=True):
        atomic_write_bytes(sample_path(workdir, method, int(i)), png_bytes(img))


def done_indices(workdir: str, method: str) -> set[int]:
    """Indices whose PNG or MP4 is on disk (complete by construction)."""
    folder = os.path.join(workdir, method)
    if not os.path.isdir(folder):
        return set()
    out = set()
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext in EXTENSIONS and stem.isdigit():
            out.add(int(stem))
    return out


def read_sample(workdir: str, method: str, index: int) -> np.ndarray:
    """A written sample as uint8: an image (H, W, C) or a video's frames (F, H, W, 3)."""
    path = sample_file(workdir, method, index)
    if path.endswith(".mp4"):
        from erg_jax.jobs import video

        return video.read_mp4(path)
    return read_png(path)


def still(sample: np.ndarray, frames: int = 4) -> np.ndarray:
    """How a grid shows a sample: an image as it is (a channel axis added to a grey one),
    a video as ``frames`` of its frames side by side (``video.frame_strip``)."""
    if sample.ndim == 4:
        from erg_jax.jobs import video

        return video.frame_strip(sample, frames)
    return sample[..., None] if sample.ndim == 2 else sample


def metadata_path(workdir: str, method: str) -> str:
    return os.path.join(workdir, method, "samples.jsonl")


def write_metadata(workdir: str, method: str, lines: list[dict]) -> None:
    """One JSON line per written image of a method, rewritten whole (atomically), so a
    restarted job's file matches its PNGs."""
    path = metadata_path(workdir, method)
    if not lines and not os.path.exists(path):
        return  # a method not started yet has no folder
    text = "".join(json.dumps(line, sort_keys=True, default=str) + "\n" for line in lines)
    atomic_write_bytes(path, text.encode())


def read_metadata(workdir: str, method: str) -> list[dict]:
    path = metadata_path(workdir, method)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def write_grid(path: str, images: np.ndarray, columns: int = 8) -> None:
    """A grid PNG of NHWC images in [-1, 1]."""
    imgs = to_uint8(images)
    if imgs.shape[-1] not in (1, 3):
        imgs = imgs[..., :3] if imgs.shape[-1] > 3 else np.repeat(imgs[..., :1], 3, -1)
    n, h, w, c = imgs.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, min(n, columns) * w, c), np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    atomic_write_bytes(path, png_bytes(grid))


def fingerprint(config: dict) -> str:
    """Hash of the config fields that change the images."""
    pruned = json.loads(json.dumps(config, default=str))
    for path in NEUTRAL_FIELDS:
        node = pruned
        for key in path[:-1]:  # a section may be missing, or not a section at all
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(pruned, sort_keys=True).encode()).hexdigest()[:16]


def check_workdir(workdir: str, config: dict) -> None:
    """Refuses a workdir whose manifest was made by a config that draws other images."""
    path = os.path.join(workdir, "manifest.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        manifest = json.load(f)
    old = manifest.get("fingerprint")
    new = fingerprint(config)
    if old != new:
        diff = _config_diff(manifest.get("config", {}), config)
        raise ValueError(
            f"workdir {workdir} was made with another config (fingerprint {old}, this one "
            f"{new}); differing fields: {diff or 'unknown'}. Use a new --workdir, or the "
            "old config."
        )


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, name + ".")
        elif a != b and not any(
            name == ".".join(p) or name.startswith(".".join(p) + ".") for p in NEUTRAL_FIELDS
        ):
            out.append(name)
    return out


def write_manifest(workdir: str, config: dict, methods: dict[str, int]) -> None:
    """The manifest: fingerprint, config, and per method the samples on disk."""
    atomic_write_json(
        os.path.join(workdir, "manifest.json"),
        {"fingerprint": fingerprint(config), "config": config, "samples": methods},
    )


def read_manifest(workdir: str) -> dict:
    """A sampling job's manifest.json, or a clear error when the folder holds none."""
    path = os.path.join(workdir, "manifest.json")
    if not os.path.exists(path):
        raise ValueError(f"--workdir: {workdir!r} has no manifest.json (not a sampling job's)")
    with open(path) as f:
        return json.load(f)


def manifest_methods(manifest: dict) -> list[str]:
    """The methods with samples on disk, in the config's order (the manifest's JSON sorts
    its keys); names the config does not list (a sweep's suffixed ones) after, sorted."""
    on_disk = manifest.get("samples", {})
    config = manifest.get("config", {})
    named = [m.strip() for m in str(config.get("guidance", {}).get("methods", "")).split(",")]
    return [m for m in named if m in on_disk] + sorted(m for m in on_disk if m not in named)
