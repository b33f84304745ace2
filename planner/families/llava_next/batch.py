"""LLaVA-NeXT batches (LlavaNextImageProcessor output)."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup
from vlplan.planner.tokens import llamafactory_preresize
from vlplan.profiler.batch import place_images


def llava_next_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """pixel_values (images, views, 3, 336, 336) fp32: each image's base view and anyres tiles, the views dimension
    zero-padded to the largest image of the batch (LlavaNextImageProcessor `_pad_for_batching`); image_sizes
    (images, 2) holding the (height, width) the processor saw, i.e. after LLaMA-Factory's pre-resize."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    spec = setup.model
    tokens = setup.image_tokens()
    ids, _ = place_images(setup, tokens, spec.image_token_id, None)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if tokens:
        size = spec.vision.image_size
        views = max(t.views for t in tokens)
        n = len(tokens) * setup.batch_size
        batch["pixel_values"] = torch.empty(n, views, spec.vision.in_channels, size, size, dtype=torch.float32)
        sizes = []
        for t in tokens:
            w, h = llamafactory_preresize(t.width, t.height, setup.image_max_pixels, setup.image_min_pixels)
            sizes.append([h, w])
        batch["image_sizes"] = torch.tensor(sizes * setup.batch_size, dtype=torch.long)
    return batch


BUILDERS = {"llava_next": llava_next_batch}
