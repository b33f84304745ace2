"""PaliGemma (2) batches: SiglipImageProcessor pixel values and LLaMA-Factory's token_type_ids (the prefix mask)."""

from __future__ import annotations

from vlplan.planner.setup import TrainSetup
from vlplan.profiler.batch import TEXT_TOKEN_ID


def paligemma_batch(setup: TrainSetup, model) -> dict[str, torch.Tensor]:
    """LLaMA-Factory `PaliGemmaPlugin`: `process_token_ids` prepends image_seq_length image tokens per image before the
    whole sequence; `get_mm_inputs` adds `token_type_ids` = 0 on those image tokens and 1 on every text token
    (`_get_paligemma_token_type_ids`), so the images form the bidirectional prefix block and the text is causal.
    pixel_values: (images, 3, size, size) fp32 from SiglipImageProcessor."""
    import torch  # lazily: the planner never imports torch (tests/test_layers.py)
    spec = setup.model
    tokens = setup.image_tokens()
    image_len = sum(t.llm_tokens for t in tokens)
    ids = torch.full((setup.seq_len,), TEXT_TOKEN_ID, dtype=torch.long)
    ids[:image_len] = spec.image_token_id
    types = torch.ones(setup.seq_len, dtype=torch.long)
    types[:image_len] = 0
    ids, types = ids.repeat(setup.batch_size, 1), types.repeat(setup.batch_size, 1)
    batch = {"input_ids": ids, "labels": ids.clone(), "token_type_ids": types}
    if tokens:
        size = spec.vision.image_size
        batch["pixel_values"] = torch.empty(len(tokens) * setup.batch_size, spec.vision.in_channels, size, size,
                                            dtype=torch.float32)
    return batch


BUILDERS = {"paligemma": paligemma_batch}
