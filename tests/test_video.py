"""Video tokens (planner/video.py) against LLaMA-Factory's own Qwen2-VL / Qwen3-VL plugins, which compute the video
grid without decoding frames (`_get_qwen_video_grid_metadata`, calling transformers' smart_resize of the image and
Qwen3-VL video processors) and expand `<video>` in `process_messages`: the number of `<|video_pad|>` tokens and
of the text around them, on random sizes, frame counts, durations, frame rates and LLaMA-Factory caps. The stream
metadata LLaMA-Factory reads with PyAV is given through its own `_get_video_sample_indices` on a stream stand-in;
`test_video_file_*` read a real file that PyAV writes."""

import functools
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llamafactory_modules import import_llamafactory
from vlplan.planner.errors import VlplanError
from vlplan.planner.registry import resolve
from vlplan.planner.video import (
    QWEN3_VIDEO_MAX_PIXELS,
    QWEN3_VIDEO_MIN_PIXELS,
    Video,
    sample_indices,
    timestamp_tokens,
    video_tokens,
)

mm_plugin = import_llamafactory("llamafactory.data.mm_plugin")

QWEN2 = resolve("qwen2-vl-7b")
QWEN25 = resolve("qwen2.5-vl-7b")
QWEN3 = resolve("qwen3-vl-8b")
VIDEO_TOKEN = "<|video_pad|>"


def _processor(spec, *, video_fps, video_maxlen, video_max_pixels, video_min_pixels):
    """The attributes of a Qwen processor that LLaMA-Factory reads (ProcessorArguments are set on it by
    patch_processor), with the checkpoint's video-processor size."""
    p = spec.processor
    if spec.family.startswith("qwen3"):
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        size = {"shortest_edge": QWEN3_VIDEO_MIN_PIXELS, "longest_edge": QWEN3_VIDEO_MAX_PIXELS}
        timestamps = functools.partial(Qwen3VLProcessor._calculate_timestamps, None)
    else:
        size = {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels}
        timestamps = None
    video = SimpleNamespace(patch_size=p.patch_size, temporal_patch_size=2, merge_size=p.merge_size, size=size)
    image = SimpleNamespace(patch_size=p.patch_size, temporal_patch_size=2, merge_size=p.merge_size)
    return SimpleNamespace(image_processor=image, video_processor=video, video_fps=video_fps,
                           video_maxlen=video_maxlen, video_max_pixels=video_max_pixels,
                           video_min_pixels=video_min_pixels, _calculate_timestamps=timestamps)


def _plugin(spec, stream):
    name = "qwen3_vl" if spec.family.startswith("qwen3") else "qwen2_vl"
    plugin = mm_plugin.get_mm_plugin(name, image_token="<|image_pad|>", video_token=VIDEO_TOKEN)

    def metadata(video, video_fps, video_maxlen):  # what _get_qwen_video_stream_metadata reads with PyAV
        indices = plugin._get_video_sample_indices(stream, video_fps=video_fps, video_maxlen=video_maxlen)
        return {"width": stream.width, "height": stream.height, "average_fps": float(stream.average_rate),
                "sample_indices": indices}

    plugin._get_qwen_video_stream_metadata = metadata
    _without_torchvision(plugin)
    return plugin


def _without_torchvision(plugin) -> None:
    """Qwen2VLPlugin._get_qwen_video_resize imports smart_resize from image_processing_qwen2_vl, whose module needs
    torchvision; the same function of the PIL image processor's module (image_processing_pil_qwen2_vl.smart_resize,
    one code) is used where torchvision is missing. Qwen3VLPlugin's own import works without it."""
    import importlib

    if importlib.util.find_spec("torchvision") is not None or plugin.__class__.__name__ != "Qwen2VLPlugin":
        return
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    def resize(num_frames, height, width, patch_size, temporal_patch_size, merge_size, min_pixels, max_pixels):
        return smart_resize(height=height, width=width, factor=patch_size * merge_size, min_pixels=min_pixels,
                            max_pixels=max_pixels)

    plugin._get_qwen_video_resize = resize


def _llamafactory(spec, stream, **caps):
    """(grid_thw, <|video_pad|> tokens, other text pieces) as LLaMA-Factory computes them."""
    processor = _processor(spec, **caps)
    plugin = _plugin(spec, stream)
    grid = plugin._get_qwen_video_grid_metadata(["clip.mp4"], processor)["video_grid_thw"][0].tolist()
    content = plugin.process_messages([{"role": "user", "content": "<video>"}], [], ["clip.mp4"], [],
                                      processor)[0]["content"]
    return grid, content.count(VIDEO_TOKEN), content.replace(VIDEO_TOKEN, "")


caps = st.fixed_dictionaries({
    "video_fps": st.sampled_from([0.5, 1.0, 2.0, 3.0, 0.3]),
    "video_maxlen": st.integers(1, 200),
    "video_max_pixels": st.sampled_from([128 * 128, 256 * 256, 448 * 448, 1024 * 1024]),
    "video_min_pixels": st.sampled_from([16 * 16, 32 * 32, 64 * 64]),
})
streams = st.tuples(st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 3000),  # width, height, frames
                    st.integers(1, 600_000), st.integers(1, 60))  # duration in ms, frame-rate numerator


@pytest.mark.parametrize("spec", [QWEN2, QWEN25, QWEN3], ids=lambda s: s.name)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams, caps=caps)
def test_video_tokens_equal_llamafactory(spec, stream, caps):
    width, height, frames, duration_ms, rate = stream
    if max(width, height) / min(width, height) > 150:
        width = height = min(width, height)  # both refuse (or reshape) such frames; the image tests cover it
    average_rate = Fraction(rate * 1000, 1001)
    stand_in = SimpleNamespace(width=width, height=height, frames=frames, duration=duration_ms,
                               time_base=Fraction(1, 1000), average_rate=average_rate)
    video = Video(width, height, frames, duration_ms / 1000, fps=float(average_rate))
    try:
        grid, pads, text = _llamafactory(spec, stand_in, **caps)
    except ValueError:  # transformers' smart_resize refuses (Qwen3-VL: fewer frames than temporal_factor)
        with pytest.raises(VlplanError):
            video_tokens(spec, video, **caps)
        return  # refused by both
    ours = video_tokens(spec, video, **caps)
    assert [ours.grid_t, ours.grid_h, ours.grid_w] == grid
    assert ours.llm_tokens == pads
    if spec is QWEN3:
        # per temporal patch: "<t seconds>" + <|vision_start|> + <|vision_end|>; the timestamps' tokens by the rule
        stamps = text.split("<|vision_start|><|vision_end|>")[:-1]
        assert len(stamps) == ours.grid_t
        assert ours.special_tokens == sum(2 + timestamp_tokens(float(s[1:-len(" seconds>")])) for s in stamps)
    else:
        assert text == "<|vision_start|><|vision_end|>" and ours.special_tokens == 2


def test_frame_lists_keep_every_frame():
    """A video given as a list of frame images: LLaMA-Factory keeps all of them, whatever video_maxlen."""
    plugin = mm_plugin.get_mm_plugin("qwen2_vl", image_token="<|image_pad|>", video_token=VIDEO_TOKEN)
    from PIL import Image

    frames = [Image.new("RGB", (64, 48)) for _ in range(7)]
    out = plugin._regularize_videos([frames], image_max_pixels=256 * 256, image_min_pixels=16 * 16, video_fps=2.0,
                                    video_maxlen=4)
    ours = video_tokens(QWEN2, Video(64, 48, frames=7), video_max_pixels=256 * 256, video_min_pixels=256,
                        video_fps=2.0, video_maxlen=4)
    assert ours.frames == len(out["videos"][0]) == 8  # 7 kept, the odd count padded by the last
    assert ours.seconds_per_grid == 2 / out["fps_per_video"][0]


def test_sample_indices_equal_llamafactory():
    plugin = mm_plugin.get_mm_plugin("qwen2_vl", image_token="<|image_pad|>", video_token=VIDEO_TOKEN)
    for frames, duration_ms, fps, maxlen in [(300, 10_000, 2.0, 128), (7, 3_000, 2.0, 128), (1000, 100_000, 0.7, 33),
                                             (0, 5_000, 2.0, 9), (50, 100, 2.0, 128)]:
        stream = SimpleNamespace(frames=frames, duration=duration_ms, time_base=Fraction(1, 1000))
        expected = plugin._get_video_sample_indices(stream, video_fps=fps, video_maxlen=maxlen).tolist()
        assert sample_indices(Video(64, 64, frames, duration_ms / 1000), fps, maxlen) == expected


def test_other_families_refuse_videos():
    with pytest.raises(VlplanError, match="takes no video"):
        video_tokens(resolve("llava-1.5-7b"), Video(64, 64, 4), video_max_pixels=65536, video_min_pixels=256,
                     video_fps=2.0, video_maxlen=128)


def test_timestamp_tokens_with_the_qwen_tokenizer():
    """The timestamp rule against a Qwen tokenizer when the machine has one cached (none is downloaded)."""
    transformers = pytest.importorskip("transformers")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained("Qwen/Qwen3-VL-8B-Instruct", local_files_only=True)
    except OSError:
        pytest.skip("no cached Qwen tokenizer")
    for seconds in (0.0, 0.5, 9.95, 12.3, 123.4, 1234.5):
        text = f"<{seconds:.1f} seconds>"
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == timestamp_tokens(seconds)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    """A 40-frame 96x64 clip at 10 fps, written with PyAV (mpeg4 in mp4; nothing committed)."""
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), i * 6, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("spec", [QWEN25, QWEN3], ids=lambda s: s.name)
def test_video_file_equal_llamafactory(video_file, spec):
    """The file read by vlplan's scan reader and by LLaMA-Factory's own PyAV path give the same grid."""
    from vlplan.planner.video_file import read_video

    processor = _processor(spec, video_fps=2.0, video_maxlen=128, video_max_pixels=256 * 256,
                           video_min_pixels=16 * 16)
    name = "qwen3_vl" if spec is QWEN3 else "qwen2_vl"
    plugin = mm_plugin.get_mm_plugin(name, image_token="<|image_pad|>", video_token=VIDEO_TOKEN)
    _without_torchvision(plugin)
    grid = plugin._get_qwen_video_grid_metadata([str(video_file)], processor)["video_grid_thw"][0].tolist()
    video = read_video(str(video_file))
    assert (video.width, video.height, video.frames) == (96, 64, 40)
    ours = video_tokens(spec, video, video_fps=2.0, video_maxlen=128, video_max_pixels=256 * 256,
                        video_min_pixels=256)
    assert [ours.grid_t, ours.grid_h, ours.grid_w] == grid
