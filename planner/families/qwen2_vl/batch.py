"""Qwen2-VL / Qwen2.5-VL batches (Qwen2VLImageProcessor output, rope positions and vision index tensors).

With videos, what LLaMA-Factory's Qwen2VLPlugin and collator hand the model for samples with images and videos
(mm_plugin.py `_get_mm_inputs`, `process_messages`; collator.py computes the rope positions with the model's
`get_rope_index`).

Each sample holds its images, then its videos: `<|vision_start|>` + placeholder run + `<|vision_end|>` each, image
tokens marked 1 and video tokens 2 in mm_token_type_ids. pixel_values_videos is (sum of grid_t*h*w,
C*T*P*P) fp32 as Qwen2VLVideoProcessor returns it; video_grid_thw one row per video; the vision helper tensors of
the videos go in as `video_*` kwargs (get_video_features is wrapped by accepts_precomputed_kwargs(modality="video")).
Qwen2.5-VL's second_per_grid_ts (temporal_patch_size / sampled fps, planner/video.py) enters the rope positions
computed here; the model gets the positions precomputed.
"""

from __future__ import annotations

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import TEXT_TOKEN_ID


def qwen_vl_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """Qwen2-VL / Qwen2.5-VL: pixel_values (sum of patches, C*T*P*P) fp32 as Qwen2VLImageProcessor returns them
    (pixel_values_videos for videos), the grids, rope position_ids from the model's own `get_rope_index`, and the
    vision helper tensors (`vision_inputs`; Qwen2.5-VL's window index too)."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    from transformers.vision_utils import get_vision_window_index

    spec, vision, config = setup.model, setup.model.vision, model.config
    images, videos = setup.image_tokens(), setup.video_tokens()
    runs = [(0, config.image_token_id, t.llm_tokens, 1) for t in images]
    runs += [(0, config.video_token_id, t.llm_tokens, 2) for t in videos]
    ids, types = place_media(setup, runs, (config.vision_start_token_id, config.vision_end_token_id))
    # No attention_mask: an all-ones mask is what the collator gives unpadded samples, and transformers drops it
    # for sdpa (masking_utils._ignore_causal_mask_sdpa); fake tensors cannot evaluate that data-dependent check.
    batch = {"input_ids": ids, "labels": ids.clone(), "mm_token_type_ids": types}

    def windows(kind: str, grid) -> None:  # Qwen2.5-VL's window attention: the window order and boundaries
        index, cu_window = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size,
                                                   vision.patch_size)
        batch[f"{kind}_window_index"] = index
        batch[f"{kind}_cu_window_seqlens"] = cu_window

    grids = vision_inputs(setup, batch, images, videos, windows if vision.window_size else None)
    if grids:
        kwargs = {}
        if videos and spec.family == "qwen2_5_vl":
            kwargs["second_per_grid_ts"] = torch.tensor([t.seconds_per_grid for t in videos] * setup.batch_size)
        rope_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        position_ids, _ = rope_model.model.get_rope_index(ids, types, image_grid_thw=grids.get("image"),
                                                          video_grid_thw=grids.get("video"), **kwargs)
        batch["position_ids"] = position_ids
    return batch


def place_media(setup: TrainSetup, runs: list[tuple[int, int, int, int]], start_end: tuple[int, int]):
    """input_ids and mm_token_type_ids (batch, seq): each (text tokens before it, token id, count, type) run after its
    text (Qwen3-VL's video timestamps; 0 elsewhere), wrapped in the start/end ids."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)

    ids = torch.full((setup.seq_len,), TEXT_TOKEN_ID, dtype=torch.long)
    types = torch.zeros(setup.seq_len, dtype=torch.int32)
    pos = 1
    for text, token_id, count, kind in runs:
        pos += text
        ids[pos] = start_end[0]
        ids[pos + 1:pos + 1 + count] = token_id
        types[pos + 1:pos + 1 + count] = kind
        ids[pos + 1 + count] = start_end[1]
        pos += count + 2
    if pos > setup.seq_len:
        raise VlplanError(f"the images and videos need {pos} tokens but the sequence holds {setup.seq_len}")
    return ids.repeat(setup.batch_size, 1), types.repeat(setup.batch_size, 1)


def vision_inputs(setup: TrainSetup, batch: dict, images: list, videos: list, extra=None) -> dict:
    """The vision inputs of the images, then the videos, into `batch`: per kind the grid (a row per image or video
    of every sample), fp32 pixels of (sum of grid_t*h*w, C*T*P*P), the `*_grid_thw`, and what the tower would
    compute from it with host syncs (rope position ids, cu_seqlens), plus `extra(kind, grid)`'s tensors. Returns the
    grids by kind (none for a text-only batch)."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    vision = setup.model.vision
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    grids = {}
    for kind, pixels, rows in (
            ("image", "pixel_values", [[1, t.resized_height // vision.patch_size,
                                        t.resized_width // vision.patch_size] for t in images]),
            ("video", "pixel_values_videos", [[t.grid_t, t.grid_h, t.grid_w] for t in videos])):
        if not rows:
            continue
        grid = torch.tensor(rows * setup.batch_size, dtype=torch.long)
        grids[kind] = grid
        batch[pixels] = torch.empty(int(grid.prod(-1).sum()), patch_dim, dtype=torch.float32)
        batch[f"{kind}_grid_thw"] = grid
        batch[f"{kind}_position_ids"] = get_vision_position_ids(grid, vision.spatial_merge_size)
        batch[f"{kind}_cu_seqlens"] = get_vision_cu_seqlens(grid)
        if extra is not None:
            extra(kind, grid)
    return grids


BUILDERS = {"qwen2_vl": qwen_vl_batch, "qwen2_5_vl": qwen_vl_batch}
