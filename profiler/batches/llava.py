"""LLaVA batches (CLIPImageProcessor output)."""

from __future__ import annotations

import torch

from vlplan.planner.setup import TrainSetup

from ..batch import place_images


def llava_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """LLaVA-1.5: pixel_values (images, 3, 336, 336) fp32 as CLIPImageProcessor returns them."""
    spec = setup.model
    tokens = setup.image_tokens()
    ids, _ = place_images(setup, tokens, spec.image_token_id, None)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if tokens:
        size = spec.vision.image_size
        batch["pixel_values"] = torch.empty(len(tokens) * setup.batch_size, spec.vision.in_channels, size, size,
                                            dtype=torch.float32)
    return batch



BUILDERS = {"llava": llava_batch}
