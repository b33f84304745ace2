"""LLaMA-Factory's packing of samples into rows (`packing`, `neat_packing`), as data/processor/supervised.py
`PackedSupervisedDatasetProcessor.preprocess_dataset` runs it (v0.9.5):

- `DataArguments.__post_init__` lowers cutoff_len by one when packing (`neat_packing` turns packing on);
- within each group of `preprocessing_batch_size` (1000) examples that `dataset.map(batched=True)` hands it, a
  sample longer than the lowered cutoff is dropped, the others' lengths are packed by `greedy_knapsack`
  (processor_utils.py: sort ascending, then fill one knapsack at a time with the largest length that still fits,
  found by bisect), and each knapsack's samples are taken back by length (`length2indexes[length].pop()`, the last
  sample of that length first);
- every row is padded to the lowered cutoff + 1 tokens, the YAML's `cutoff_len`: a packed row always holds exactly
  cutoff_len tokens, position ids restarting at 0 for each sample;
- `packing`: attention_mask is all ones (padding included), so the model sees one causal sequence of cutoff_len
  tokens (sdpa drops the all-ones mask; FlashAttention-2 runs dense);
- `neat_packing`: attention_mask holds each token's sample number (1, 2, ...; 0 on padding); the collator expands it
  to a block-diagonal causal (batch, 1, seq, seq) mask in the compute dtype for sdpa and eager
  (collator.py `prepare_4d_attention_mask`, used when `block_diag_attn`), and for FlashAttention-2 drops the mask and
  the padding so transformers runs the varlen kernel on the position ids' sample boundaries.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# LLaMA-Factory DataArguments.preprocessing_batch_size: the examples packed together
LF_PREPROCESSING_BATCH_SIZE = 1000


def greedy_knapsack(lengths: list[int], capacity: int) -> list[list[int]]:
    """processor_utils.greedy_knapsack: the lengths of each knapsack, in the order it fills them. Every length must
    fit `capacity` (LLaMA-Factory drops longer samples first; a longer one would never be packed)."""
    numbers = sorted(lengths)
    if numbers and numbers[-1] > capacity:
        raise ValueError(f"a length of {numbers[-1]} does not fit a knapsack of {capacity}")
    knapsacks = []
    while numbers:
        knapsack, remaining = [], capacity
        while True:
            index = bisect.bisect(numbers, remaining) - 1
            if index < 0:
                break
            remaining -= numbers[index]
            knapsack.append(numbers.pop(index))
        knapsacks.append(knapsack)
    return knapsacks


@dataclass(frozen=True)
class Packing:
    """The rows LLaMA-Factory builds from a dataset: the sample indices of each row, and the dropped samples."""

    cutoff_len: int  # the YAML's: every row holds this many tokens
    rows: tuple[tuple[int, ...], ...]
    dropped: tuple[int, ...]  # longer than cutoff_len - 1

    def samples_per_row(self) -> list[int]:
        return [len(row) for row in self.rows]

    def to_dict(self, totals: list[int]) -> dict:
        from .dataset import distribution

        fill = [sum(totals[i] for i in row) / self.cutoff_len for row in self.rows]
        return {"cutoff_len": self.cutoff_len, "rows": len(self.rows), "dropped": list(self.dropped),
                "samples_per_row": distribution(self.samples_per_row()),
                "mean_fill": round(sum(fill) / len(fill), 4) if fill else 0.0}


def pack(totals: list[int], cutoff_len: int, group: int = LF_PREPROCESSING_BATCH_SIZE) -> Packing:
    """The rows of samples with `totals` tokens each under LLaMA-Factory packing with the YAML's `cutoff_len`."""
    capacity = cutoff_len - 1  # DataArguments.__post_init__: `if self.packing: self.cutoff_len -= 1`
    rows, dropped = [], []
    for start in range(0, len(totals), group):
        lengths, by_length = [], {}
        for index in range(start, min(start + group, len(totals))):
            length = totals[index]
            if length > capacity:
                dropped.append(index)  # "Dropped lengthy example with length ..."
                continue
            lengths.append(length)
            by_length.setdefault(length, []).append(index)
        for knapsack in greedy_knapsack(lengths, capacity):
            rows.append(tuple(by_length[length].pop() for length in knapsack))
    return Packing(cutoff_len, tuple(rows), tuple(dropped))
