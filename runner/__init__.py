"""Launching real fine-tunes: data (LLaMA-Factory datasets -> batches), train (the Trainer and its records),
launch (torchrun / DeepSpeed / accelerate), tiny (tiny same-family models for smoke tests)."""

import os


def name_cpu_accelerator() -> None:
    """DeepSpeed probes for an accelerator when transformers imports it, and on a machine without CUDA logs a
    warning to stdout (deepspeed/accelerator/real_accelerator.py); naming the CPU accelerator keeps stdout clean
    for `--json`. A machine with CUDA is left alone."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
