"""Synthetic training batches with the right vision tokens: the tensors the processor and the collator produce.

Every sample holds `setup.seq_len` tokens with the setup's images placed as the processor lays them out, so the
vision tower sees the same pixel/grid tensors it would for those image sizes. Values do not matter for memory, but
shapes, dtypes and the data-dependent index tensors (Qwen's grid_thw, rope positions, window indexes) do: those are
computed here on real tensors by the transformers helpers themselves, then handed to the model precomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup
from vlplan.planner.tokens import ImageTokens

TEXT_TOKEN_ID = 100  # an ordinary text token in every family's vocabulary


@dataclass
class Batch:
    """`tensors` go to model(**tensors); `keepalive` holds the real tensors behind constant fake tensors."""

    tensors: dict[str, torch.Tensor]
    keepalive: list = field(default_factory=list)


def _place_images(setup: TrainSetup, tokens: list[ImageTokens], image_token_id: int,
                  special: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (batch, seq) with each image's placeholder run (wrapped in `special` start/end ids if given) and the
    mm_token_type_ids marking image tokens with 1."""
    ids = torch.full((setup.seq_len,), TEXT_TOKEN_ID, dtype=torch.long)
    types = torch.zeros(setup.seq_len, dtype=torch.int32)
    pos = 1
    for image in tokens:
        if special:
            ids[pos] = special[0]
            pos += 1
        ids[pos:pos + image.llm_tokens] = image_token_id
        types[pos:pos + image.llm_tokens] = 1
        pos += image.llm_tokens
        if special:
            ids[pos] = special[1]
            pos += 1
    if pos > setup.seq_len:
        raise VlplanError(f"the images need {pos} tokens but the sequence holds {setup.seq_len}")
    return ids.repeat(setup.batch_size, 1), types.repeat(setup.batch_size, 1)


def qwen_vl_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """Qwen2-VL / Qwen2.5-VL: pixel_values (sum of patches, C*T*P*P) fp32 as Qwen2VLImageProcessor returns them,
    image_grid_thw, rope position_ids from the model's own `get_rope_index`, and the vision helper tensors."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    spec = setup.model
    vision = spec.vision
    tokens = setup.image_tokens()
    config = model.config
    ids, types = _place_images(setup, tokens, spec.image_token_id,
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


def llava_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """LLaVA-1.5: pixel_values (images, 3, 336, 336) fp32 as CLIPImageProcessor returns them."""
    spec = setup.model
    tokens = setup.image_tokens()
    ids, _ = _place_images(setup, tokens, spec.image_token_id, None)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if tokens:
        size = spec.vision.image_size
        batch["pixel_values"] = torch.empty(len(tokens) * setup.batch_size, spec.vision.in_channels, size, size,
                                            dtype=torch.float32)
    return batch


BATCH_BUILDERS = {"qwen2_vl": qwen_vl_batch, "qwen2_5_vl": qwen_vl_batch, "llava": llava_batch}

# Integer tensors whose values the model reads on the host (.tolist(), .item()): they must be constant fakes
CONSTANT_KEYS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "image_grid_thw", "position_ids",
                 "image_position_ids", "image_cu_seqlens", "image_window_index", "image_cu_window_seqlens")


def synthetic_batch(setup: TrainSetup, model, fake_mode=None) -> Batch:
    """The batch as real CPU tensors, or as fake tensors of `fake_mode` (integer index tensors kept constant)."""
    builder = BATCH_BUILDERS.get(setup.model.family)
    if builder is None:
        raise VlplanError(f"no synthetic batch for family {setup.model.family!r}")
    real = builder(setup, model)
    if fake_mode is None:
        return Batch(real)
    converter = fake_mode.fake_tensor_converter
    tensors = {}
    for key, tensor in real.items():
        constant = key in CONSTANT_KEYS
        tensors[key] = converter.from_real_tensor(fake_mode, tensor, make_constant=constant)
    return Batch(tensors, keepalive=list(real.values()))
