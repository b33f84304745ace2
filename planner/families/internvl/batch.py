"""InternVL3 batches (GotOcr2ImageProcessor output, as LLaMA-Factory's InternVLPlugin collates it)."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import place_images


def internvl_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """input_ids with `<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>` per image (InternVLProcessor
    `replace_image_token`; `<img>`/`</img>` are the two ids below `<IMG_CONTEXT>` in the InternVL3 tokenizer), and
    pixel_values (tiles of all images, 3, 448, 448) fp32: GotOcr2ImageProcessor stacks every image's tiles (and
    thumbnail) along the first axis and InternVLModel runs them as one batch."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    spec = setup.model
    vision = spec.vision
    tokens = setup.image_tokens()
    image_id = spec.image_token_id
    ids, _ = place_images(setup, tokens, image_id, (image_id - 2, image_id - 1))
    # No attention_mask: the collator's all-ones mask is dropped for sdpa (see planner/families/qwen2_vl/batch.py)
    batch = {"input_ids": ids, "labels": ids.clone()}
    tiles = sum(t.views for t in tokens) * setup.batch_size
    if tiles:
        batch["pixel_values"] = torch.empty(tiles, vision.in_channels, vision.image_size, vision.image_size,
                                            dtype=torch.float32)
    return batch


BUILDERS = {"internvl": internvl_batch}
