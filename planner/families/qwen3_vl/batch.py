"""Qwen3-VL / Qwen3-VL-MoE batches (Qwen2VLImageProcessor output with patch 16, rope positions and the vision
tower's data-dependent helper tensors, precomputed).

With videos, what LLaMA-Factory's Qwen3VLPlugin and collator hand the model: each sample holds its images, then its
videos; an image is `<|vision_start|>` + placeholders + `<|vision_end|>`, a video is, per temporal patch,
`<{t:.1f} seconds>` (text) + `<|vision_start|>` + grid_h*grid_w/merge**2 `<|video_pad|>` + `<|vision_end|>`
(Qwen3VLPlugin.process_messages; planner/video.py counts the timestamp tokens). pixel_values_videos is (sum of
grid_t*h*w, C*T*P*P) fp32 as Qwen3VLVideoProcessor returns it; video_grid_thw one row per video; get_rope_index
splits it per temporal patch to match the timestamps between them."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup

from ..qwen2_vl.batch import place_media, vision_inputs


def qwen3_vl_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """pixel_values (sum of patches, C*T*P*P) fp32 as the processor returns them (pixel_values_videos for videos),
    the grids, rope position_ids from the model's own `get_rope_index`, and what Qwen3VLVisionModel.forward would
    compute from grid_thw with host syncs (`.tolist()`, `repeat_interleave`): vision rope positions, cu_seqlens and
    the bilinear interpolation indices/weights of the learned position embedding. They go in as `image_*` /
    `video_*` kwargs, which `accepts_precomputed_kwargs` strips to the names the vision_utils helpers pop
    (models/qwen3_vl/modeling_qwen3_vl.py Qwen3VLVisionModel.forward; transformers/vision_utils.py)."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    vision, config = setup.model.vision, model.config
    images, videos = setup.image_tokens(), setup.video_tokens()
    # images (type 1), then each video's temporal patches (type 2), each after its timestamp text
    runs = [(0, config.image_token_id, t.llm_tokens, 1) for t in images]
    for video in videos:
        per_frame = video.llm_tokens // video.grid_t
        runs += [(stamp, config.video_token_id, per_frame, 2) for stamp in video.timestamp_tokens]
    ids, types = place_media(setup, runs, (config.vision_start_token_id, config.vision_end_token_id))
    # No attention_mask: see qwen2_vl/batch.py (transformers drops an all-ones mask for sdpa)
    batch = {"input_ids": ids, "labels": ids.clone(), "mm_token_type_ids": types}

    def interpolation(kind: str, grid) -> None:
        # Qwen3VLVisionModel: bilinear, align_corners=True over the int(sqrt(num_position_embeddings)) grid
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=int(vision.num_position_embeddings**0.5), mode="bilinear", align_corners=True,
            spatial_merge_size=vision.spatial_merge_size)
        batch[f"{kind}_interp_indices"] = indices
        batch[f"{kind}_interp_weights"] = weights

    grids = vision_inputs(setup, batch, images, videos, interpolation)
    if grids:
        rope_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        position_ids, _ = rope_model.model.get_rope_index(ids, types, image_grid_thw=grids.get("image"),
                                                          video_grid_thw=grids.get("video"))
        batch["position_ids"] = position_ids
    return batch


BUILDERS = {"qwen3_vl": qwen3_vl_batch, "qwen3_vl_moe": qwen3_vl_batch}
