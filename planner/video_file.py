"""Reading a video's size, frame count, duration and frame rate from its container header with PyAV (the library
LLaMA-Factory decodes videos with: data/mm_plugin.py `av.open`, `stream.frames`, `stream.duration *
stream.time_base`, `stream.average_rate`). No frame is decoded. PyAV is the optional `video` extra; the planner
imports it only here, when a dataset has videos."""

from __future__ import annotations

from .errors import VlplanError
from .video import Video


class VideoError(VlplanError):
    """A video file that cannot be read (missing, not a video, no video stream)."""


def read_video(path: str) -> Video:
    try:
        import av
    except ImportError:
        raise VlplanError("reading videos needs PyAV: pip install 'vlplan[video]' (or pip install av)") from None
    try:
        container = av.open(path, "r")
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: {type(err).__name__}: {err}") from None
    try:
        stream = next((s for s in container.streams if s.type == "video"), None)
        if stream is None:
            raise VideoError(f"{path}: no video stream")
        duration = float(stream.duration * stream.time_base) if stream.duration is not None else None
        if duration is None and container.duration is not None:
            duration = container.duration / 1_000_000  # AV_TIME_BASE microseconds
        rate = float(stream.average_rate) if stream.average_rate else None
        frames = stream.frames
        if duration is None or duration <= 0:
            if not frames:
                raise VideoError(f"{path}: the container states neither a duration nor a frame count")
            # LLaMA-Factory's `stream.duration * stream.time_base` would fail on such a stream; its frames are
            # counted as a list
            return Video(stream.width, stream.height, frames=frames, fps=rate)
        return Video(stream.width, stream.height, frames=frames, duration_s=duration, fps=rate)
    finally:
        container.close()
