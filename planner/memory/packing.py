"""Memory of LLaMA-Factory's neat packing (planner/packing.py) in the language model.

With sdpa or eager attention the collator hands the model a block-diagonal causal mask of (batch, 1, seq, seq) in the
compute dtype (collator.py `prepare_4d_attention_mask`: `torch.where(mask, 0, finfo.min)`, then every floating
feature `.to(compute_dtype)`), and transformers passes a 4D mask through unchanged (masking_utils
`_preprocess_mask_arguments`). It stays alive for the whole step (an input of the batch).
- sdpa: with a mask, transformers expands K and V to every query head (`repeat_kv`; `use_gqa_in_sdpa` is false
  with a mask) and CUDA cannot use FlashAttention: cuDNN attention takes the mask as an additive bias and keeps it,
  the expanded K/V, the output and an fp32 logsumexp for backward (ops.masked_fused_attention; the tracer's
  profiler/emulate.py `_cudnn_masked_sdpa`).
- eager: the mask is added to the scores where the causal mask would be (the same size; no causal mask is built).
- FlashAttention-2: the collator drops the mask and the padding (`_unpad_packed_features`) and transformers runs the
  varlen kernel on the sample boundaries it finds in position_ids: the memory of a dense row of the same tokens.
"""

from __future__ import annotations

from ..setup import TrainSetup
from . import ops
from .sim import Engine, T

# The families whose language model runs BaseModel.language (planner/memory/model.py) with this mask, held equal to
# traces (tests/test_accuracy_packing.py); the others get a warning that the mask is left out
MASKED_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def block_diagonal_mask_modelled(setup: TrainSetup) -> bool:
    return setup.neat_packing and setup.attn != "fa2" and setup.model.family in MASKED_FAMILIES


def mask_warning(setup: TrainSetup) -> str | None:
    """The warning of a setup whose block-diagonal mask is not modelled (None when there is none to give)."""
    if not setup.neat_packing or setup.attn == "fa2" or setup.model.family in MASKED_FAMILIES:
        return None
    size = setup.batch_size * setup.seq_len**2 * (2 if COMPUTE_DTYPE[setup.precision] != "fp32" else 4)
    return (f"neat_packing with --attn {setup.attn}: LLaMA-Factory's block-diagonal attention mask "
            f"({size / 2**30:.2f} GiB, and the masked attention kernel's K/V copies) is modelled for Qwen2-VL and "
            f"Qwen2.5-VL only; the estimate of {setup.model.name} leaves it out (use --attn fa2, which needs no mask)")


# LLaMA-Factory model_args.compute_dtype (hparams/parser.py `_set_transformers_logging` / get_train_args:
# bf16 or pure_bf16 -> bfloat16, fp16 -> float16, else float32)
COMPUTE_DTYPE = {"bf16": "bf16", "pure-bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def packed_attention_mask(e: Engine, setup: TrainSetup) -> T:
    return e.new(setup.batch_size * setup.seq_len * setup.seq_len, COMPUTE_DTYPE[setup.precision],
                 name="attention_mask", category="inputs/batch")


def block_diagonal_attention(e: Engine, q: T, k: T, v: T, mask: T, heads: int, kv_heads: int, tokens: int,
                             name: str) -> T:
    """transformers sdpa_attention_forward with a 4D mask: repeat_kv, then the masked CUDA kernel."""
    key, value = (_repeat_kv(e, t, heads, kv_heads, name) for t in (k, v))
    if e.autocast:
        q, key, value = (ops.cast(e, t, e.autocast) for t in (q, key, value))
    return ops.masked_fused_attention(e, q, key, value, mask, heads, tokens, name=name)


def _repeat_kv(e: Engine, x: T, heads: int, kv_heads: int, name: str) -> T:
    """`x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)`: a copy to every query head (a view
    when there is one K/V head per query head or a single one)."""
    if heads == kv_heads:
        return x
    if kv_heads == 1:
        return x.view(x.numel * heads, name=f"{name}.{x.name}_rep")
    return ops._copy(e, x, x.numel * (heads // kv_heads), f"{name}.{x.name}_rep")
