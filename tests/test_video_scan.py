"""`vlplan scan` with videos: each file's size, frame count and duration read with PyAV (a clip written here with
PyAV, nothing committed), its tokens counted as LLaMA-Factory's Qwen2-VL plugin would, and the planned setup
carrying the sample's videos into the estimate."""

import json

import pytest
from typer.testing import CliRunner
from vlplan.planner.dataset import scan_dataset
from vlplan.planner.registry import resolve
from vlplan.planner.video import Video, video_tokens

from vlplan.cli.main import app

av = pytest.importorskip("av")


def _write_clip(path, frames: int, fps: int, width: int, height: int) -> None:
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), (i * 7) % 255, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    _write_clip(root / "a.mp4", frames=60, fps=10, width=320, height=240)  # 6 s: 12 frames at 2 fps
    records = [
        {"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "A."}],
         "videos": ["a.mp4"]},
        {"messages": [{"role": "user", "content": "<video>And here?"}, {"role": "assistant", "content": "B."}],
         "videos": ["missing.mp4"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root


def test_scan_counts_video_tokens(dataset):
    from vlplan.planner.video_file import read_video

    spec = resolve("qwen2.5-vl-7b")
    clip = read_video(str(dataset / "a.mp4"))
    assert (clip.width, clip.height, clip.frames) == (320, 240, 60)
    assert clip.duration_s == pytest.approx(6.0, abs=0.2)
    scan = scan_dataset(dataset / "data.json", spec)
    expected = video_tokens(spec, clip, video_max_pixels=256 * 256, video_min_pixels=256, video_fps=2.0,
                            video_maxlen=128)
    assert expected.frames == 12
    assert scan.vision_tokens[0] == expected.llm_tokens and scan.special_tokens[0] == 2
    assert scan.vision_tokens[1] == 0 and scan.missing_videos == [str(dataset / "missing.mp4")]
    assert scan.video_clips[0] == (clip,)
    assert not [w for w in scan.warnings if "not counted in the vision tokens" in w]
    # the caps are LLaMA-Factory's: fewer frames a second, fewer tokens
    slower = scan_dataset(dataset / "data.json", spec, video_fps=1.0)
    assert slower.vision_tokens[0] == expected.llm_tokens // 2


def test_scan_cli_plans_with_the_videos(dataset):
    result = CliRunner().invoke(app, ["scan", str(dataset / "data.json"), "-m", "qwen2-vl-2b", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["videos"] == 2 and out["missing_videos"] == [str(dataset / "missing.mp4")]
    settings = out["worst_case"]["estimate"]["settings"]
    assert out["worst_case"]["sample"] == 0 and len(settings["videos"]) == 1
    assert out["worst_case"]["estimate"]["tokens"]["videos"][0]["frames"] == 12


def test_scan_warns_for_a_model_without_video(dataset):
    scan = scan_dataset(dataset / "data.json", resolve("llava-1.5-7b"))
    assert scan.vision_tokens[0] == 0
    assert [w for w in scan.warnings if "2 video(s) not counted" in w and "takes no video" in w]


def test_qwen3_estimates_the_scanned_videos(dataset):
    """Qwen3-VL's video memory is modelled (planner/families/qwen3_vl/memory.py): the sample's clips go into the
    setup, and its vision tokens equal the scan's."""
    from vlplan.planner.dataset import setup_for_dataset
    from vlplan.planner.memory.estimate import estimate
    from vlplan.planner.setup import make_setup

    spec = resolve("qwen3-vl-8b")
    scan = scan_dataset(dataset / "data.json", spec)
    assert scan.vision_tokens[0] > 0
    setup, warnings = setup_for_dataset(make_setup(spec, num_images=0), scan)
    assert len(setup.videos) == len(scan.video_clips[0]) > 0
    assert setup.vision_tokens_per_sample == scan.vision_tokens[0]
    assert not [w for w in warnings if "modelled for" in w]
    assert estimate(setup).peak_bytes > estimate(make_setup(spec, num_images=0, seq_len=setup.seq_len)).peak_bytes


def test_video_clip_validation():
    from vlplan.planner.errors import VlplanError

    with pytest.raises(VlplanError, match="frame count .--video-frames. or its duration"):
        Video(64, 64)
    with pytest.raises(VlplanError, match="--video-duration must be positive"):
        Video(64, 64, duration_s=-1.0)


def test_cli_video_flags():
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "-m", "qwen2.5-vl-7b", "--videos", "2", "--video-size", "1280x720",
                                 "--video-duration", "30", "--video-fps", "1", "--seq-len", "8192", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [v["frames"] for v in out["tokens"]["videos"]] == [30, 30]  # 30 s at 1 fps
    assert out["settings"]["videos"] == ["1280x720, 30 s"] * 2
    refused = runner.invoke(app, ["estimate", "-m", "qwen2.5-vl-7b", "--videos", "1"])
    assert refused.exit_code != 0 and "--video-size" in refused.output
