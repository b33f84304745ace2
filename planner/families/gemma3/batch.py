"""Gemma 3 batches (Gemma3ImageProcessor output and the token_type_ids LLaMA-Factory's Gemma3Plugin adds)."""

from __future__ import annotations

from vlplan.planner.errors import VlplanError
from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import TEXT_TOKEN_ID


def gemma3_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """input_ids with `<start_of_image>` + 256 `<image_soft_token>` + `<end_of_image>` per view
    (Gemma3Processor `full_image_sequence`; pan & scan crops are further views, each wrapped alike),
    token_type_ids (int64, 1 on image tokens: LLaMA-Factory `_get_gemma3_token_type_ids`), which make
    Gemma3Model build the bidirectional-within-image attention masks, and pixel_values (views, 3, 896, 896) fp32."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    spec = setup.model
    vision = spec.vision
    config = model.config
    tokens = setup.image_tokens()
    per_view = spec.processor.tokens_per_view
    vocab = spec.text.vocab_size
    # the real <start_of_image>/<end_of_image> ids, unless a shrunken test vocabulary lacks them
    boi, eoi = ((config.boi_token_id, config.eoi_token_id) if config.eoi_token_id < vocab
                else (TEXT_TOKEN_ID, TEXT_TOKEN_ID))
    ids = torch.full((setup.seq_len,), TEXT_TOKEN_ID, dtype=torch.long)
    types = torch.zeros(setup.seq_len, dtype=torch.long)
    pos = 1
    for image in tokens:
        for _ in range(image.views):
            if pos + per_view + 2 > setup.seq_len:
                raise VlplanError(f"the images need more than the {setup.seq_len} tokens of the sequence")
            ids[pos] = boi
            ids[pos + 1:pos + 1 + per_view] = spec.image_token_id
            types[pos + 1:pos + 1 + per_view] = 1
            ids[pos + 1 + per_view] = eoi
            pos += per_view + 2
    ids, types = ids.repeat(setup.batch_size, 1), types.repeat(setup.batch_size, 1)
    # Gemma3Plugin.get_mm_inputs adds token_type_ids to every batch, text-only ones included
    batch = {"input_ids": ids, "labels": ids.clone(), "token_type_ids": types}
    views = sum(t.views for t in tokens) * setup.batch_size
    if views:
        batch["pixel_values"] = torch.empty(views, vision.in_channels, vision.image_size, vision.image_size,
                                            dtype=torch.float32)
    return batch


BUILDERS = {"gemma3": gemma3_batch}
