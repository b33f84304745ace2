"""Llama 3.2 Vision batches: MllamaImageProcessor tiles and LLaMA-Factory's cross-attention mask."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import TEXT_TOKEN_ID

from . import tokens as rule


def mllama_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """pixel_values (batch, images, max_tiles, 3, tile, tile) fp32 with the unused tile slots zero-filled
    (`pack_images`), aspect_ratio_ids (batch, images) and aspect_ratio_mask (batch, images, max_tiles) int64, one
    <|image|> token per image at the start of the sample, and the cross_attention_mask (batch, seq, images, max_tiles)
    int64 that LLaMA-Factory's MllamaPlugin builds (`get_cross_attention_token_mask`,
    `convert_sparse_cross_attention_mask_to_dense`): every token from an image's <|image|> on attends to that image's
    real tiles."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    from .memory import check_setup

    check_setup(setup)
    spec = setup.model
    p = spec.processor
    tokens = setup.image_tokens()
    ids = torch.full((setup.seq_len,), TEXT_TOKEN_ID, dtype=torch.long)
    batch = {}
    if tokens:
        n = len(tokens)
        ids[1:1 + n] = spec.image_token_id
        grids = [rule.tiles(p, w, h) for w, h in setup.images]
        batch["pixel_values"] = torch.zeros(setup.batch_size, n, p.max_tiles, spec.vision.in_channels, p.image_size,
                                            p.image_size, dtype=torch.float32)
        batch["aspect_ratio_ids"] = torch.tensor([[rule.aspect_ratio_id(p, w, h) for w, h in setup.images]]
                                                 * setup.batch_size, dtype=torch.long)
        mask = torch.zeros(n, p.max_tiles, dtype=torch.long)
        cross = torch.zeros(setup.seq_len, n, p.max_tiles, dtype=torch.long)
        for index, (rows, cols) in enumerate(grids):
            mask[index, :rows * cols] = 1
            cross[1 + index:, index, :rows * cols] = 1
        batch["aspect_ratio_mask"] = mask.repeat(setup.batch_size, 1, 1)
        batch["cross_attention_mask"] = cross.repeat(setup.batch_size, 1, 1, 1)
    ids = ids.repeat(setup.batch_size, 1)
    return {"input_ids": ids, "labels": ids.clone(), **batch}


BUILDERS = {"mllama": mllama_batch}
