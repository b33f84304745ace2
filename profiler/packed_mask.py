"""Neat packing's block-diagonal attention mask in a synthetic batch (planner/packing.py, planner/memory/packing.py):
LLaMA-Factory's collator (`prepare_4d_attention_mask`) turns each row's sample numbers into a (batch, 1, seq, seq)
mask of the compute dtype, 0 where a token may attend (same sample, not later) and the dtype's minimum elsewhere.
The row here holds two samples (the first half and the rest); the mask's values change no memory, its size does."""

from __future__ import annotations

import torch
from vlplan.planner.setup import TrainSetup

DTYPES = {"bf16": torch.bfloat16, "pure-bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def packed_attention_mask(setup: TrainSetup) -> torch.Tensor:
    seq = setup.seq_len
    sample = torch.ones(seq, dtype=torch.long)
    sample[seq // 2:] = 2
    allowed = (sample[None, :] == sample[:, None]) & torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    dtype = DTYPES[setup.precision]
    mask = torch.where(allowed, torch.tensor(0, dtype=dtype), torch.finfo(dtype).min)
    return mask[None, None].expand(setup.batch_size, 1, seq, seq).contiguous()


def packed_position_ids(setup: TrainSetup, batch: dict) -> torch.Tensor:
    """Neat packing under FlashAttention-2: no mask, the position ids restart for each sample. LLaMA-Factory's collator
    computes the rope positions per sample (`_compute_rope_position_ids_with_packing`) and prepends their first row as
    the text positions ((4, batch, seq): transformers' Qwen2-VL reads row 0 for the packed-sequence boundaries). The
    row here holds two samples: the first with the images and videos (at least half the row), then text."""
    seq = setup.seq_len
    ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:  # no media: text positions of the whole row on the three rope rows
        positions = torch.arange(seq).view(1, 1, seq).expand(3, ids.shape[0], seq).clone()
    split = max(seq // 2, setup.vision_tokens_per_sample + setup.special_tokens_per_sample + 1)
    positions = positions.clone()
    positions[:, :, split:] = torch.arange(seq - split)
    return torch.cat([positions[:1], positions])
