"""The estimator's video inputs (Qwen2-VL and Qwen2.5-VL: pixel_values_videos through the vision tower frame by
frame, window attention per frame, video embeddings scattered after the image ones) against the tracer running the
real transformers code on the same batch, per phase, on tiny specs."""

import pytest
from tiny import assert_phases_match, tiny_spec
from vlplan.planner.memory.step import simulate
from vlplan.planner.setup import make_setup
from vlplan.planner.video import Video

CASES = [
    # a list of 7 frames (padded to 8 by LLaMA-Factory: 4 temporal patches), no image
    ("qwen2-vl-2b", dict(method="full", num_images=0, videos=(Video(160, 120, frames=7),))),
    # an image and a video in one sample, gradient accumulation
    ("qwen2-vl-2b", dict(method="lora", image_size=(112, 112), videos=(Video(200, 150, frames=90, duration_s=3.0),),
                         gradient_accumulation_steps=2)),
    # two videos (a file's frames and duration; a duration alone), trained vision tower with window attention
    ("qwen2.5-vl-3b", dict(method="lora", train_vision=True, num_images=0,
                           videos=(Video(320, 240, frames=16), Video(200, 200, duration_s=3.0)),
                           video_max_pixels=160 * 160, seq_len=1024)),
    ("qwen2.5-vl-3b", dict(method="full", train_vision=True, train_projector=True, image_size=(112, 112),
                           videos=(Video(224, 224, frames=300, duration_s=10.0),), video_maxlen=6)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_video_simulation_matches_trace(name, kwargs):
    pytest.importorskip("transformers")
    from vlplan.profiler.trace import run_trace

    settings = {"seq_len": 512, "video_max_pixels": 112 * 112, **kwargs}
    setup = make_setup(tiny_spec(name), **settings)
    assert setup.video_tokens()
    assert_phases_match(simulate(setup), run_trace(setup))


def test_videos_change_the_estimate():
    from vlplan.planner.memory.estimate import estimate
    from vlplan.planner.registry import resolve

    spec = resolve("qwen2.5-vl-7b")
    # the vision tower trains, so its activations over the video frames are held for backward
    base = make_setup(spec, seq_len=16384, train_vision=True)
    clip = make_setup(spec, seq_len=16384, train_vision=True,
                      videos=(Video(1280, 720, frames=600, duration_s=20.0),))
    more = make_setup(spec, seq_len=16384, train_vision=True,
                      videos=(Video(1280, 720, frames=600, duration_s=20.0),), video_max_pixels=448 * 448)
    peaks = [estimate(s).peak_bytes for s in (base, clip, more)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert clip.vision_tokens_per_sample > base.vision_tokens_per_sample


# Qwen3-VL (planner/families/qwen3_vl/memory.py): the video tower run after the image tower, one attention segment per
# temporal patch, the interpolated position embedding over every frame, the DeepStack features of the video (merged
# with the images' into one tensor per layer when both are there), and the timestamps' text between the frames
QWEN3_CASES = [
    # a 7-frame list (8 after LLaMA-Factory's padding: 4 temporal patches), no image, LoRA
    ("qwen3-vl-4b", dict(method="lora", num_images=0, videos=(Video(160, 120, frames=7),)), "DENSE"),
    # an image and a clip with its duration, the vision tower and projector trained in full: the joint DeepStack
    # features carry gradients
    ("qwen3-vl-4b", dict(method="full", train_vision=True, train_projector=True, image_size=(128, 128),
                         videos=(Video(200, 150, frames=90, duration_s=3.0),)), "DENSE"),
    # the MoE model, an image and two videos, no checkpointing
    ("qwen3-vl-30b-a3b", dict(method="lora", image_size=(128, 128), gradient_checkpointing=False,
                              videos=(Video(160, 120, frames=6), Video(128, 128, duration_s=2.0))), "MOE"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, counts", QWEN3_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(QWEN3_CASES)])
def test_qwen3_video_simulation_matches_trace(name, kwargs, counts):
    pytest.importorskip("transformers")
    import test_accuracy_qwen3_vl as qwen3
    from vlplan.profiler.trace import run_trace

    setup = make_setup(qwen3.tiny(name), **{"seq_len": 512, "video_max_pixels": 128 * 128, **kwargs})
    assert setup.video_tokens() and all(t.timestamp_tokens for t in setup.video_tokens())
    layers = getattr(qwen3, counts)
    assert_phases_match(simulate(setup, layers), run_trace(setup, layers))
