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


def place_images(setup: TrainSetup, tokens: list[ImageTokens], image_token_id: int,
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


# Integer tensors whose values the model reads on the host (.tolist(), .item()): they must be constant fakes
CONSTANT_KEYS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "image_grid_thw", "position_ids",
                 "image_position_ids", "image_cu_seqlens", "image_window_index", "image_cu_window_seqlens",
                 "image_sizes", "video_grid_thw", "video_position_ids", "video_cu_seqlens", "video_window_index",
                 "video_cu_window_seqlens", "kl_input_ids", "kl_labels", "kl_attention_mask", "kto_tags")


def synthetic_batch(setup: TrainSetup, model, fake_mode=None) -> Batch:
    """The batch as real CPU tensors, or as fake tensors of `fake_mode` (integer index tensors kept constant)."""
    from .batches import builder_for

    builder = builder_for(setup.model.family)
    if builder is None:
        raise VlplanError(f"no synthetic batch for family {setup.model.family!r}")
    real = builder(setup, model)
    if setup.stage == "kto":  # KTODataCollatorWithPadding's KL rows, attention masks and tags (profiler/preference.py)
        from .preference import kto_inputs

        kto_inputs(real)
    from vlplan.planner.memory.packing import block_diagonal_mask_modelled, varlen_attention_modelled

    if block_diagonal_mask_modelled(setup):
        from .packed_mask import packed_attention_mask

        real["attention_mask"] = packed_attention_mask(setup)
    if varlen_attention_modelled(setup):
        from .packed_mask import packed_position_ids

        real["position_ids"] = packed_position_ids(setup, real)
    if fake_mode is None:
        return Batch(real)
    converter = fake_mode.fake_tensor_converter
    tensors = {}
    # A builder may name more constant inputs (`builder.constant_keys`), e.g. pixel values the model inspects on the
    # host (Idefics3 drops all-zero padding images by boolean indexing): fake tensors then propagate their values
    # through ops up to their size, so the constant-propagation limit is raised to it for this trace (cuda_emulation
    # restores it on exit).
    extra = getattr(builder, "constant_keys", ())
    if extra:
        from torch._subclasses import fake_tensor

        largest = max(real[key].numel() for key in extra if key in real)
        fake_tensor.CONSTANT_NUMEL_LIMIT = max(fake_tensor.CONSTANT_NUMEL_LIMIT, largest)
    for key, tensor in real.items():
        # (neat packing's float 4D attention_mask is read by no host code: an ordinary fake)
        constant = key in extra or (key in CONSTANT_KEYS and not tensor.is_floating_point())
        tensors[key] = converter.from_real_tensor(fake_mode, tensor, make_constant=constant)
    return Batch(tensors, keepalive=list(real.values()))
