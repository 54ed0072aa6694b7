"""Test clips, written by the tests with PyAV (none is committed): moving colour ramps, so that every frame and
every pixel differs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame ``i`` of the test pattern, [height, width, 3] uint8."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = (np.arange(width)[None, :] * 3 + i * 10) % 256
    image[..., 1] = (np.arange(height)[:, None] * 4 + i * 7) % 256
    image[..., 2] = (i * 30 + np.arange(width)[None, :] // 8 * 16) % 256
    return image


def write_clip(path: Path, frames: int, fps: int | float, width: int, height: int, codec: str = "mpeg4",
               display_matrix: tuple[int, ...] | None = None) -> Path:
    """A clip of ``frames`` frames at ``fps`` (mpeg4 in .mp4 by default: the encoder every FFmpeg build has);
    ``display_matrix``: nine integers the container records as the display transformation (PyAV 18 and later)."""
    from fractions import Fraction

    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if display_matrix is not None:
            stream.set_display_matrix(list(display_matrix))
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i, width, height), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frames(folder: Path, frames: int, width: int, height: int) -> Path:
    """A folder of PNG frames named so that their sorted order is their time order."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        Image.fromarray(frame(i, width, height)).save(folder / f"frame_{i:04d}.png")
    return folder
