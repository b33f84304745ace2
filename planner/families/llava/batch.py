"""LLaVA batches: CLIPImageProcessor output (LLaVA-1.5, LLaVA-LLaMA-3) and PixtralImageProcessor output (Pixtral)."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import TEXT_TOKEN_ID, place_images

IMG_BREAK_ID, IMG_END_ID = 12, 13  # Pixtral-12B's [IMG_BREAK] / [IMG_END] (tekken special tokens)


def llava_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """LLaVA-1.5: pixel_values (images, 3, 336, 336) fp32 as CLIPImageProcessor returns them. Pixtral: see
    `pixtral_batch`."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    spec = setup.model
    if spec.vision.arch == "pixtral":
        return pixtral_batch(setup, model)
    tokens = setup.image_tokens()
    ids, _ = place_images(setup, tokens, spec.image_token_id, None)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if tokens:
        size = spec.vision.image_size
        batch["pixel_values"] = torch.empty(len(tokens) * setup.batch_size, spec.vision.in_channels, size, size,
                                            dtype=torch.float32)
    return batch


def pixtral_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """Pixtral (LLaMA-Factory PixtralPlugin + PixtralImageProcessor): pixel_values (images, 3, H_max, W_max) fp32,
    every image padded to the largest height and width of the batch (`do_pad`), and image_sizes (images, 2) holding
    each image's resized (height, width). Each image row is `[IMG]` x columns followed by `[IMG_BREAK]`, the last
    row by `[IMG_END]`."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    spec = setup.model
    tokens = setup.image_tokens()
    ids = torch.full((setup.seq_len,), TEXT_TOKEN_ID, dtype=torch.long)
    pos = 1
    merge = spec.processor.merge_size * spec.vision.patch_size
    for image in tokens:
        rows, columns = image.resized_height // merge, image.resized_width // merge
        for row in range(rows):
            ids[pos:pos + columns] = spec.image_token_id
            ids[pos + columns] = IMG_END_ID if row == rows - 1 else IMG_BREAK_ID
            pos += columns + 1
    ids = ids.repeat(setup.batch_size, 1)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if tokens:
        height = max(t.resized_height for t in tokens)
        width = max(t.resized_width for t in tokens)
        n = len(tokens) * setup.batch_size
        batch["pixel_values"] = torch.empty(n, spec.vision.in_channels, height, width, dtype=torch.float32)
        sizes = [[t.resized_height, t.resized_width] for t in tokens]
        batch["image_sizes"] = torch.tensor(sizes * setup.batch_size, dtype=torch.long)
    return batch


BUILDERS = {"llava": llava_batch}
