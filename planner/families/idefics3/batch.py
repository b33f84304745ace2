"""Idefics3 / SmolVLM-Instruct batches (Idefics3ImageProcessor output: tiles plus global view per image, padded)."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import place_images


def idefics3_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """pixel_values (batch, views of all images, 3, M, M) fp32 and pixel_attention_mask (batch, views, M, M) int64 of
    ones, as `Idefics3ImageProcessor._preprocess` pads them (every view is M x M, so no padding inside a view).
    The values are non-zero: `Idefics3Model.get_image_features` drops all-zero (padding) images, which the tracer
    evaluates on these constant tensors. Placeholders: views * image_seq_len <image> tokens per image (the tile tags
    around them are ordinary text tokens for memory)."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    spec = setup.model
    tokens = setup.image_tokens()
    ids, _ = place_images(setup, tokens, spec.image_token_id, None)
    batch = {"input_ids": ids, "labels": ids.clone()}
    views = sum(t.views for t in tokens)
    if views:
        size = spec.vision.image_size
        batch["pixel_values"] = torch.full((setup.batch_size, views, spec.vision.in_channels, size, size), 0.5,
                                           dtype=torch.float32)
        batch["pixel_attention_mask"] = torch.ones(setup.batch_size, views, size, size, dtype=torch.long)
    return batch


# get_image_features reads the pixel values and mask on the host (all-zero padding images are dropped by boolean
# indexing, split sizes come from `.tolist()`): the tracer keeps them as constant fakes (profiler/batch.py)
idefics3_batch.constant_keys = ("pixel_values", "pixel_attention_mask")

BUILDERS = {"idefics3": idefics3_batch, "smolvlm": idefics3_batch}
