"""Videos as files: H.264 MP4s written whole or not at all, read back, and frame strips.

A video sample is one ``.mp4`` per index beside the PNGs of image samples (the same
folder per method, the same atomic write and resume rules as ``erg_jax.jobs.output``).
Encoding runs the ffmpeg binary the ``imageio-ffmpeg`` wheel ships, so no system ffmpeg
is assumed. The stream is H.264 in yuv420p, the pixel format every browser plays, at a
constant rate factor ``crf`` (0-51, lower is closer; 17 is visually lossless for most
content): yuv420p halves the colour resolution, so decoded frames equal the sampler's
up to that subsampling and the codec's rounding, not bit for bit. ``read_mp4`` decodes a
file back to (frames, H, W, 3) uint8 for checks and for the report's frame grids.
"""

from __future__ import annotations

import os

import numpy as np

DEFAULT_FPS = 16  # Wan's frame rate
DEFAULT_CRF = 17


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError as e:  # a core dependency; a broken install is named, not hidden
        raise ImportError(
            "writing videos needs the imageio-ffmpeg package (pip install imageio-ffmpeg), "
            "which ships its own ffmpeg binary"
        ) from e
    return imageio_ffmpeg


def check_frames(frames: np.ndarray) -> np.ndarray:
    """(frames, H, W, 3) uint8 with even H and W (yuv420p), else a ValueError."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a video is (frames, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(
            f"H.264 in yuv420p needs an even height and width, got {frames.shape[1:3]}"
        )
    return frames


def write_mp4(path: str, frames: np.ndarray, *, fps: int = DEFAULT_FPS, crf: int = DEFAULT_CRF):
    """Encodes (frames, H, W, 3) uint8 into ``path`` as H.264 (the name need not end in
    .mp4: the container is named explicitly, so a temporary name works)."""
    frames = check_frames(frames)
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    if int(fps) < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    writer = _ffmpeg().write_frames(
        path,
        (frames.shape[2], frames.shape[1]),
        fps=int(fps),
        codec="libx264",
        quality=None,
        macro_block_size=1,  # our sizes are even; never rescale a frame
        output_params=["-crf", str(int(crf)), "-f", "mp4", "-movflags", "+faststart"],
    )
    writer.send(None)  # starts ffmpeg
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def mp4_bytes(frames: np.ndarray, *, fps: int = DEFAULT_FPS, crf: int = DEFAULT_CRF) -> bytes:
    """The MP4 file of ``frames`` as bytes (``erg_jax.jobs.output.atomic_write_bytes``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        write_mp4(path, frames, fps=fps, crf=crf)
        with open(path, "rb") as f:
            return f.read()


def read_mp4(path: str) -> np.ndarray:
    """The decoded frames of an MP4 file, (frames, H, W, 3) uint8."""
    reader = _ffmpeg().read_frames(path, pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


def frame_strip(video: np.ndarray, count: int = 4) -> np.ndarray:
    """``count`` frames of a video (frames, H, W, C) evenly spaced from the first to the
    last, side by side: (H, count * W, C), how a grid shows a video."""
    n = video.shape[0]
    picks = np.unique(np.round(np.linspace(0, n - 1, min(count, n))).astype(int))
    return np.concatenate([video[i] for i in picks], axis=1)
