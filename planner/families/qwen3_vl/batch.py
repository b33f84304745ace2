"""Qwen3-VL / Qwen3-VL-MoE batches (Qwen2VLImageProcessor output with patch 16, rope positions and the vision
tower's data-dependent helper tensors, precomputed)."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import place_images


def qwen3_vl_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """pixel_values (sum of patches, C*T*P*P) fp32 as the processor returns them, image_grid_thw, rope position_ids
    from the model's own `get_rope_index`, and what Qwen3VLVisionModel.forward would compute from grid_thw with host
    syncs (`.tolist()`, `repeat_interleave`): vision rope positions, cu_seqlens and the bilinear interpolation
    indices/weights of the learned position embedding. They go in as `image_*` kwargs, which
    `accepts_precomputed_kwargs` strips to the names the vision_utils helpers pop (models/qwen3_vl/modeling_qwen3_vl.py
    Qwen3VLVisionModel.forward; transformers/vision_utils.py)."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    spec = setup.model
    vision = spec.vision
    tokens = setup.image_tokens()
    config = model.config
    ids, types = place_images(setup, tokens, spec.image_token_id,
                              (config.vision_start_token_id, config.vision_end_token_id))
    # No attention_mask: see qwen_vl.py (transformers drops an all-ones mask for sdpa)
    batch = {"input_ids": ids, "labels": ids.clone(), "mm_token_type_ids": types}
    if tokens:
        grids = [[1, t.resized_height // vision.patch_size, t.resized_width // vision.patch_size] for t in tokens]
        grid = torch.tensor(grids * setup.batch_size, dtype=torch.long)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        patches = int(grid.prod(-1).sum())
        batch["pixel_values"] = torch.empty(patches, patch_dim, dtype=torch.float32)
        batch["image_grid_thw"] = grid
        batch["image_position_ids"] = get_vision_position_ids(grid, vision.spatial_merge_size)
        batch["image_cu_seqlens"] = get_vision_cu_seqlens(grid)
        # Qwen3VLVisionModel: bilinear, align_corners=True over the int(sqrt(num_position_embeddings)) grid
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=int(vision.num_position_embeddings**0.5), mode="bilinear", align_corners=True,
            spatial_merge_size=vision.spatial_merge_size)
        batch["image_interp_indices"] = indices
        batch["image_interp_weights"] = weights
        rope_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        position_ids, _ = rope_model.model.get_rope_index(ids, types, image_grid_thw=grid)
        batch["position_ids"] = position_ids
    return batch


BUILDERS = {"qwen3_vl": qwen3_vl_batch, "qwen3_vl_moe": qwen3_vl_batch}
