"""The videos of a dataset scan (planner/dataset.py): each file's header read once with PyAV (video_file.py), its
tokens counted with the setup's LLaMA-Factory video caps (video.py). Missing, unreadable and remote videos are
reported by name and not counted; a model whose processor takes no video, or a machine without PyAV, gets one
warning and no video tokens."""

from __future__ import annotations

from .errors import VlplanError
from .spec import ModelSpec
from .video import VIDEO_FAMILIES, Video, video_tokens


class VideoCounter:
    def __init__(self, spec: ModelSpec, *, video_max_pixels: int, video_min_pixels: int, video_fps: float,
                 video_maxlen: int) -> None:
        self.spec = spec
        self.caps = dict(video_max_pixels=video_max_pixels, video_min_pixels=video_min_pixels, video_fps=video_fps,
                         video_maxlen=video_maxlen)
        self.clips: dict[str, Video | str | None] = {}  # path -> clip, why unreadable, or None (missing)
        self.tokens: dict[Video, tuple[int, int]] = {}
        self.missing: dict[str, None] = {}
        self.corrupt: dict[str, str] = {}
        self.remote: dict[str, None] = {}
        self.uncounted = 0  # videos not counted because the model or the machine cannot
        self.reason = None
        if spec.family not in VIDEO_FAMILIES:
            self.reason = (f"{spec.name}'s processor takes no video in vlplan (video tokens are counted for "
                           "Qwen2-VL, Qwen2.5-VL and Qwen3-VL)")
        else:
            try:
                import av  # noqa: F401
            except ImportError:
                self.reason = "PyAV is not installed (pip install 'vlplan[video]') to read the videos' headers"

    def count(self, paths: list[str]) -> tuple[int, int, tuple[Video, ...]]:
        """(placeholder tokens, special tokens, readable clips) of one sample's videos."""
        if not paths:
            return 0, 0, ()
        if self.reason:
            self.uncounted += len(paths)
            return 0, 0, ()
        from pathlib import Path

        from .video_file import read_video

        llm = special = 0
        clips = []
        for path in paths:
            if path.startswith(("http://", "https://", "data:")):
                self.remote[path] = None
                continue
            if path not in self.clips:
                try:
                    self.clips[path] = read_video(path)
                except VlplanError as err:
                    self.clips[path] = str(err).split(": ", 1)[-1] if Path(path).exists() else None
            clip = self.clips[path]
            if clip is None:
                self.missing[path] = None
                continue
            if isinstance(clip, str):
                self.corrupt[path] = clip
                continue
            if clip not in self.tokens:
                t = video_tokens(self.spec, clip, **self.caps)
                self.tokens[clip] = (t.llm_tokens, t.special_tokens)
            tokens, specials = self.tokens[clip]
            llm += tokens
            special += specials
            clips.append(clip)
        return llm, special, tuple(clips)

    def warnings(self) -> list[str]:
        out = []
        if self.uncounted:
            out.append(f"{self.uncounted} video(s) not counted in the vision tokens: {self.reason}")
        if self.missing or self.corrupt:
            out.append(f"{len(self.missing)} missing and {len(self.corrupt)} unreadable video(s): their tokens are "
                       "not counted")
        if self.remote:
            out.append(f"{len(self.remote)} remote video(s) (URLs) not fetched: their tokens are not counted")
        return out
