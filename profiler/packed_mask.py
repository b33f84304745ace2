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
