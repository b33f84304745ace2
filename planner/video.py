"""Video -> sampled frames -> temporal patches -> vision-encoder patches and language-model tokens.

The path LLaMA-Factory takes (src/llamafactory/data/mm_plugin.py, v0.9.5):
1. `_get_video_sample_indices`: `n = min(total_frames, video_maxlen, max(1, floor(duration_s * video_fps)))` frames,
   at `np.linspace(0, total_frames - 1, n).astype(int32)` (a stream of unknown length: `video_maxlen` frames);
2. `Qwen2VLPlugin._regularize_videos`: an odd frame count gets its last frame repeated;
3. every frame goes through the image pre-resize with `video_max_pixels` / `video_min_pixels` as the caps
   (`_regularize_images` -> `Qwen2VLPlugin._preprocess_image`: the same rule as images, planner/tokens.py);
4. the checkpoint's video processor resizes all frames to one size and patchifies them in groups of
   `temporal_patch_size` (2) frames:
   - Qwen2-VL / Qwen2.5-VL: `Qwen2VLVideoProcessor` (transformers models/qwen2_vl/video_processing_qwen2_vl.py:
     `resize` -> `smart_resize(height, width, factor=patch*merge, min_pixels=size.shortest_edge,
     max_pixels=size.longest_edge)`, `patchify`: grid (frames / temporal_patch_size, h / patch, w / patch)). The
     checkpoints ship no video_preprocessor_config.json, so the video processor loads preprocessor_config.json
     (video_processing_utils.get_video_processor_dict falls back to IMAGE_PROCESSOR_NAME) and takes the image
     processor's min_pixels / max_pixels;
   - Qwen3-VL: `Qwen3VLVideoProcessor` (models/qwen3_vl/video_processing_qwen3_vl.py: `smart_resize(num_frames,
     height, width, temporal_factor, factor, min_pixels, max_pixels)`, which bounds frames x pixels), with the
     checkpoints' video_preprocessor_config.json `size` {shortest_edge 4096, longest_edge 25165824}.
   LLaMA-Factory computes the same grid without decoding in `Qwen2VLPlugin._get_qwen_video_grid_metadata`, which
   tests/test_video.py holds this module equal to on random sizes, frame counts and durations;
5. the language-model sequence: `<|vision_start|>` + grid_t*h*w / merge**2 `<|video_pad|>` + `<|vision_end|>`
   (Qwen2VLPlugin.process_messages); Qwen3-VL puts `<{t:.1f} seconds><|vision_start|>..<|vision_end|>` around each
   temporal patch (Qwen3VLPlugin.process_messages, Qwen3VLProcessor._calculate_timestamps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import VlplanError
from .spec import ModelSpec
from .tokens import llamafactory_preresize, qwen_plugin_preresize, smart_resize

# Families whose processors take videos, as far as vlplan counts them (the Qwen2-VL plugin family of LLaMA-Factory)
QWEN2_VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
QWEN3_VIDEO_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
VIDEO_FAMILIES = QWEN2_VIDEO_FAMILIES + QWEN3_VIDEO_FAMILIES
# Qwen3-VL checkpoints' video_preprocessor_config.json `size` (the same file in every Qwen3-VL release, e.g.
# https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/video_preprocessor_config.json)
QWEN3_VIDEO_MIN_PIXELS = 4096
QWEN3_VIDEO_MAX_PIXELS = 25165824
# Bounds against typos (see setup.py's MAX_* bounds): a day of video at 30 fps; LLaMA-Factory's video_maxlen caps
# the sampled frames far below
MAX_VIDEO_FRAMES = 30 * 86400
MAX_VIDEO_DURATION_S = 86400.0


@dataclass(frozen=True)
class Video:
    """One video as its container describes it (PyAV: stream.width/height, stream.frames, stream.duration *
    stream.time_base). `frames` 0: the stream does not say (LLaMA-Factory then takes `video_maxlen` frames); None: not
    given, assumed not limiting (the duration decides); `duration_s` None: a list of frame images, which LLaMA-Factory
    keeps whole (its frames are taken as sampled at `video_fps`)."""

    width: int
    height: int
    frames: int | None = None
    duration_s: float | None = None
    fps: float | None = None  # the stream's average frame rate (stream.average_rate); None: frames / duration_s

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise VlplanError(f"video size must be positive, got {self.width}x{self.height}")
        if self.frames is None and self.duration_s is None:
            raise VlplanError("a video needs its frame count (--video-frames) or its duration (--video-duration)")
        if self.frames is not None and not (0 < self.frames <= MAX_VIDEO_FRAMES
                                            or self.frames == 0 and self.duration_s is not None):
            raise VlplanError(f"--video-frames must be between 1 and {MAX_VIDEO_FRAMES}, got {self.frames}")
        if self.duration_s is not None and not (math.isfinite(self.duration_s)
                                                and 0 < self.duration_s <= MAX_VIDEO_DURATION_S):
            raise VlplanError(f"--video-duration must be positive seconds up to {MAX_VIDEO_DURATION_S:g}, got "
                              f"{self.duration_s}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise VlplanError(f"a video's frame rate must be positive, got {self.fps}")

    def label(self) -> str:
        parts = [f"{self.width}x{self.height}"]
        if self.frames is not None:
            parts.append(f"{self.frames} frames")
        if self.duration_s is not None:
            parts.append(f"{self.duration_s:g} s")
        return ", ".join(parts)


@dataclass(frozen=True)
class VideoTokens:
    width: int
    height: int
    frames: int  # frames the processor gets (sampled, an odd count padded by one)
    resized_width: int
    resized_height: int
    grid_t: int  # temporal patches (frames / temporal_patch_size)
    grid_h: int  # patches per column
    grid_w: int
    vision_patches: int  # grid_t * grid_h * grid_w: the vision tower's sequence
    llm_tokens: int  # <|video_pad|> tokens in the language-model sequence
    special_tokens: int  # text tokens around them (vision start/end; Qwen3-VL's timestamps)
    seconds_per_grid: float  # Qwen2.5-VL second_per_grid_ts: temporal_patch_size / sampled fps
    # Qwen3-VL: the tokens of each temporal patch's "<t seconds>" text before its <|vision_start|> (empty otherwise)
    timestamp_tokens: tuple[int, ...] = ()

    @property
    def frame_patches(self) -> int:
        """Patches of one temporal patch: the vision tower attends within each (cu_seqlens repeats h*w grid_t
        times: transformers vision_utils.get_vision_cu_seqlens)."""
        return self.grid_h * self.grid_w

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "frames": self.frames,
                "resized_width": self.resized_width, "resized_height": self.resized_height,
                "grid_thw": [self.grid_t, self.grid_h, self.grid_w], "vision_patches": self.vision_patches,
                "llm_tokens": self.llm_tokens, "special_tokens": self.special_tokens}


def sample_indices(video: Video, video_fps: float, video_maxlen: int) -> list[int]:
    """LLaMA-Factory `_get_video_sample_indices`: the frames it decodes (np.linspace(0, total - 1, n).astype(int32),
    reproduced in plain Python: numpy computes `arange(n) * step + start` with step = (stop - start) / (n - 1) and
    sets the last value to stop)."""
    if video.duration_s is None:
        # a list of frame images: the plugin keeps all of them, whatever video_maxlen (the nested-images branch of
        # Qwen2VLPlugin._regularize_videos)
        return list(range(video.frames))
    if video.frames == 0:  # an infinite stream: np.linspace(0, video_maxlen - 1, video_maxlen)
        return list(range(video_maxlen))
    count = max(1, math.floor(video.duration_s * video_fps))
    if video.frames is None:
        count = min(video_maxlen, count)
        return list(range(count))  # the positions do not matter without a frame count; only their number does
    count = min(video.frames, video_maxlen, count)
    return _linspace(video.frames, count)


def _linspace(total: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    step = (total - 1) / (count - 1)
    return [int(i * step) for i in range(count - 1)] + [total - 1]


def sampled_frames(video: Video, video_fps: float, video_maxlen: int) -> int:
    return len(sample_indices(video, video_fps, video_maxlen))


def check_video_family(spec: ModelSpec) -> None:
    if spec.family not in VIDEO_FAMILIES:
        raise VlplanError(f"{spec.name} takes no video in vlplan: video tokens are counted for Qwen2-VL, Qwen2.5-VL "
                          "and Qwen3-VL (their LLaMA-Factory plugin and transformers video processor); drop the "
                          "videos or choose one of those models")


def video_tokens(spec: ModelSpec, video: Video, *, video_max_pixels: int, video_min_pixels: int, video_fps: float,
                 video_maxlen: int) -> VideoTokens:
    """Patches and tokens of one video after LLaMA-Factory's sampling and pre-resize and the video processor's
    resize (see the module docstring for each step's source)."""
    check_video_family(spec)
    indices = sample_indices(video, video_fps, video_maxlen)
    frames = len(indices)
    fps_sampled = frames / video.duration_s if video.duration_s else video_fps  # Qwen2VLPlugin fps_per_video
    if frames % 2:
        frames += 1  # Qwen2VLPlugin._regularize_videos: frames.append(frames[-1])
        indices = indices + indices[-1:]
    w, h = llamafactory_preresize(video.width, video.height, video_max_pixels, video_min_pixels)
    w, h = qwen_plugin_preresize(w, h)
    p, v = spec.processor, spec.vision
    factor = p.patch_size * p.merge_size
    temporal = v.temporal_patch_size
    if spec.family in QWEN3_VIDEO_FAMILIES:
        rh, rw = smart_resize_frames(frames, h, w, temporal, factor, QWEN3_VIDEO_MIN_PIXELS, QWEN3_VIDEO_MAX_PIXELS)
    else:
        rh, rw = smart_resize(h, w, factor, p.min_pixels, p.max_pixels)
    grid_t, grid_h, grid_w = math.ceil(frames / temporal), rh // p.patch_size, rw // p.patch_size
    patches = grid_t * grid_h * grid_w
    special = 2  # <|vision_start|> ... <|vision_end|>
    stamps = ()
    if spec.family in QWEN3_VIDEO_FAMILIES:
        stamps = tuple(timestamp_tokens(t) for t in qwen3_timestamps(video, indices, video_fps, temporal))
        special = sum(2 + n for n in stamps)
    return VideoTokens(video.width, video.height, frames, rw, rh, grid_t, grid_h, grid_w, patches,
                       patches // p.merge_size**2, special, temporal / fps_sampled, stamps)


def smart_resize_frames(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                        min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers models/qwen3_vl/video_processing_qwen3_vl.py::smart_resize: the pixel bounds apply to frames x
    height x width (Python's round: half to even)."""
    if num_frames < temporal_factor:
        raise VlplanError(f"a Qwen3-VL video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise VlplanError(f"a video frame of {width}x{height} has an aspect ratio above 200, which the Qwen video "
                          "processor refuses; crop or pad it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen3_timestamps(video: Video, indices: list[int], video_fps: float, merge: int) -> list[float]:
    """Qwen3VLPlugin: frames_indices = [i / average_fps * video_fps for i in sample_indices], then
    Qwen3VLProcessor._calculate_timestamps(frames_indices, video_fps, merge_size): indices padded to a multiple of
    merge with the last one, / video_fps, each temporal patch's first and last averaged. The average frame rate is
    the container's, else frames / duration when both are known, else `video_fps` (frames already at that rate)."""
    average_fps = video.fps or (video.frames / video.duration_s if video.frames and video.duration_s else video_fps)
    stamps = [i / average_fps * video_fps for i in indices]
    if len(stamps) % merge:
        stamps += [stamps[-1]] * (merge - len(stamps) % merge)
    seconds = [s / video_fps for s in stamps]
    return [(seconds[i] + seconds[i + merge - 1]) / 2 for i in range(0, len(seconds), merge)]


def timestamp_tokens(seconds: float) -> int:
    """Tokens of the text f"<{seconds:.1f} seconds>" in the Qwen2/Qwen3 tokenizer: its pre-tokenizer splits every
    digit alone (`\\p{N}`) and punctuation runs, so '<', each digit, '.', ' seconds' and '>' are one token each
    (tokenizer.json of the Qwen3-VL checkpoints; tests/test_video.py checks the rule on the installed tokenizer when
    one is there)."""
    text = f"{seconds:.1f}"
    return 3 + len(text)  # '<' + digits and '.' + ' seconds' + '>'


def parse_video_size(text: str) -> tuple[int, int]:
    from .tokens import parse_size

    try:
        return parse_size(text)
    except VlplanError:
        raise VlplanError(f"video size {text!r} is not WIDTHxHEIGHT (e.g. 1280x720)") from None
