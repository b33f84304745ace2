"""Qwen2-VL / Qwen2.5-VL batches (Qwen2VLImageProcessor output, rope positions and vision index tensors)."""

from __future__ import annotations

import torch
from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import place_images


def qwen_vl_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """Qwen2-VL / Qwen2.5-VL: pixel_values (sum of patches, C*T*P*P) fp32 as Qwen2VLImageProcessor returns them,
    image_grid_thw, rope position_ids from the model's own `get_rope_index`, and the vision helper tensors."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    spec = setup.model
    vision = spec.vision
    tokens = setup.image_tokens()
    config = model.config
    ids, types = place_images(setup, tokens, spec.image_token_id,
                               (config.vision_start_token_id, config.vision_end_token_id))
    # No attention_mask: an all-ones mask is what the collator gives unpadded samples, and transformers drops it
    # for sdpa (masking_utils._ignore_causal_mask_sdpa); fake tensors cannot evaluate that data-dependent check.
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
        if vision.window_size:
            index, cu_window = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size,
                                                       vision.patch_size)
            batch["image_window_index"] = index
            batch["image_cu_window_seqlens"] = cu_window
        rope_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        position_ids, _ = rope_model.model.get_rope_index(ids, types, image_grid_thw=grid)
        batch["position_ids"] = position_ids
    return batch



BUILDERS = {"qwen2_vl": qwen_vl_batch, "qwen2_5_vl": qwen_vl_batch}
